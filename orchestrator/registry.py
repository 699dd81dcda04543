"""The orchestrator's memory: one row per backend in a SQLite file, so a restart re-adopts them.

Rows hold what is needed to find, check and restart a backend; never the model's credentials or
hooks, which each backend keeps in its own MODEL_DIR (and restores from there when restarted).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from backend.core.redact import redact_value

STATES = ("starting", "pending", "ready", "restarting", "stopped", "sleeping")


@dataclass
class BackendRecord:
    """One backend: its model, where it runs, and how it has been doing."""

    id: str
    model: dict[str, Any]  # the public configuration: model URI, tracking server, loader; no secrets
    driver: str
    port: int
    model_dir: str
    token: str = field(default="", repr=False)  # the backend's own CONFIGURE_TOKEN
    gpu: str = ""
    handle: str = ""  # the driver's name for the running thing: "pid:starttime" or a container id
    state: str = "starting"
    created_at: float = field(default_factory=time.time)
    configured_at: float = 0.0
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive failed starts or deaths; sets the backoff, cleared once ready
    retry_at: float = 0.0
    last_error: str = ""
    spare: bool = False  # started ahead without a model; becomes a model's backend on its first configure
    host: str = "127.0.0.1"  # where it listens: loopback, or its Ray node's address (which changes when it moves)
    renewing: str = ""  # the handle of its replacement while a renewal starts one (supervisor.py): stopped if orphaned
    # Sleep and the memory budget (orchestrator/fleet.py).
    idle_stop_s: float | None = None  # the model's own; None: the orchestrator's IDLE_STOP_S
    always_on: bool = False
    last_used_at: float = 0.0  # the last request routed to it (written at most every few seconds)
    memory_bytes: int = 0  # its PSS when last measured awake: what waking it will take
    gpu_memory_bytes: int = 0  # the same on its GPU
    model_version: str = ""  # what it served when it fell asleep: /health and /setup answer with it meanwhile
    setup_key: str = ""  # a digest of the Label Studio address and token its last /setup carried
    slept_at: float = 0.0
    sleeps: int = 0
    wakes: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("token")
        data["model"] = redact_value(data["model"])  # rows an older version wrote may hold a URI's userinfo
        data["url"] = self.url
        data["uptime_s"] = round(time.time() - self.started_at, 1) if self.started_at and self.state == "ready" else 0.0
        return data


_COLUMNS = [f.name for f in fields(BackendRecord)]
_FIELDS = frozenset(_COLUMNS)


class Registry:
    """Rows of BackendRecord in SQLite; every write is its own transaction, on a connection kept for the next.

    In WAL mode with ``synchronous=NORMAL``: a write is one append to the log, no fsync, and reads never
    wait for writes (a wake and a sleep write the record several times, and every routed request reads
    it). The database stays consistent through a crash; a power cut may lose the last writes, which
    the supervisor's next pass puts right (it adopts what still runs).

    Opening a connection costs ~0.25 ms of CPU, as much as the rest of a read, and every routed request
    and every supervisor pass over every backend reads here: connections are kept, each used by one thread
    at a time (``_connection``), and never carried into a forked process. Kept in a pool, not one per
    thread as ``SharedDb`` keeps them: the orchestrator's server answers each connection on a new thread."""

    KEPT_CONNECTIONS = 8  # at most: more threads at once open more, and close them after

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()  # this process's writers, one at a time (others wait in SQLite)
        self._parsed: dict[str, BackendRecord] = {}  # by row: what ``all`` read last, never handed out
        self._kept: list[sqlite3.Connection] = []  # idle connections of the process ``_kept_by``
        self._kept_by = os.getpid()
        self._inherited: list[sqlite3.Connection] = []  # a parent's, never used nor closed here (below)
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS backends (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        for made in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if made.exists():
                made.chmod(0o600)  # they hold the backends' configure tokens

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A kept connection (or a new one), in a transaction: committed on success, rolled back on an
        error (sqlite3's own ``with``), then kept for the next caller."""
        if self._kept_by != os.getpid():  # a fork: its parent's connections are the parent's. Closing one
            self._inherited += self._kept  # here could checkpoint, or drop, the write-ahead log under it
            self._kept, self._kept_by = [], os.getpid()
        try:
            db = self._kept.pop()
        except IndexError:
            db = sqlite3.connect(self._path, timeout=10, check_same_thread=False)
            db.execute("PRAGMA synchronous=NORMAL")
        with db:
            yield db
        if len(self._kept) < self.KEPT_CONNECTIONS:
            self._kept.append(db)
        else:
            db.close()

    def put(self, record: BackendRecord) -> None:
        """Write the whole record; its ``last_used_at`` only ever moves forward (``touch`` writes it alone)."""
        with self._lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT json_extract(record, '$.last_used_at') FROM backends WHERE id = ?", (record.id,)).fetchone()
            if row and isinstance(row[0], (int, float)) and row[0] > record.last_used_at:
                record.last_used_at = row[0]
            db.execute("INSERT OR REPLACE INTO backends VALUES (?, ?)", (record.id, json.dumps(asdict(record))))

    def insert(self, record: BackendRecord) -> bool:
        """Register a new record; False where one with its id exists already: another process of the
        orchestrator (a gunicorn worker) registered the same model's backend a moment before, and starts it."""
        with self._lock, self._connection() as db:
            cursor = db.execute("INSERT OR IGNORE INTO backends VALUES (?, ?)", (record.id, json.dumps(asdict(record))))
            return cursor.rowcount == 1

    def rename(self, old_id: str, record: BackendRecord) -> bool:
        """``old_id``'s row becomes ``record`` (a spare becoming a model's backend), in one transaction; False
        where ``old_id`` is gone (another process claimed it) or ``record.id`` is taken."""
        with self._lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM backends WHERE id = ?", (record.id,)).fetchone():
                return False
            cursor = db.execute("UPDATE backends SET id = ?, record = ? WHERE id = ?",
                                (record.id, json.dumps(asdict(record)), old_id))
            return cursor.rowcount == 1

    def touch(self, backend_id: str, at: float) -> None:
        """A request was routed to it at ``at``: what its idle time counts from."""
        with self._lock, self._connection() as db:
            db.execute(
                "UPDATE backends SET record = json_set(record, '$.last_used_at', ?) "
                "WHERE id = ? AND coalesce(json_extract(record, '$.last_used_at'), 0) < ?",
                (at, backend_id, at),
            )

    def update(self, backend_id: str, **values: Any) -> None:
        """Set some fields of a record in place, leaving the others as whoever wrote them last left them."""
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"no such record fields: {', '.join(sorted(unknown))}")
        paths = ", ".join("?, ?" for _ in values)
        arguments = [item for name, value in values.items() for item in (f"$.{name}", value)]
        with self._lock, self._connection() as db:
            db.execute(f"UPDATE backends SET record = json_set(record, {paths}) WHERE id = ?", (*arguments, backend_id))

    def get(self, backend_id: str) -> BackendRecord | None:
        with self._connection() as db:
            row = db.execute("SELECT record FROM backends WHERE id = ?", (backend_id,)).fetchone()
        return _record(row[0]) if row else None

    def delete(self, backend_id: str) -> None:
        with self._lock, self._connection() as db:
            db.execute("DELETE FROM backends WHERE id = ?", (backend_id,))

    def all(self) -> list[BackendRecord]:
        """Every record, oldest first; each a copy of its own (callers change theirs). A row unchanged since
        the last call is not parsed again: the fleet reads them all several times for each wake and sleep."""
        with self._connection() as db:
            rows = db.execute("SELECT record FROM backends").fetchall()
        parsed, known = {}, self._parsed
        for (raw,) in rows:
            parsed[raw] = known.get(raw) or _record(raw)
        self._parsed = parsed  # what the rows are now: the rows since rewritten are forgotten
        return sorted((_copy(record) for record in parsed.values()), key=lambda r: r.created_at)

    def backends(self) -> list[BackendRecord]:
        return [r for r in self.all() if not r.spare]

    def spares(self) -> list[BackendRecord]:
        return [r for r in self.all() if r.spare]

    def newest_configured(self) -> BackendRecord | None:
        """The backend Label Studio's root routes go to: the most recently configured one."""
        configured = [r for r in self.all() if r.configured_at]
        return max(configured, key=lambda r: r.configured_at) if configured else None


def _copy(record: BackendRecord) -> BackendRecord:
    """A shallow copy (its ``model`` dict is shared: nothing changes one in place)."""
    copied = object.__new__(BackendRecord)
    copied.__dict__.update(record.__dict__)
    return copied


def _record(raw: str) -> BackendRecord:
    """A row as a record; fields an older or newer version wrote that this one does not know are left out.
    (Every routed request reads a record, and the fleet's choices read them all: this is hot.)"""
    data = json.loads(raw)
    if data.keys() <= _FIELDS:
        return BackendRecord(**data)
    return BackendRecord(**{k: v for k, v in data.items() if k in _FIELDS})
