"""The orchestrator's memory: one row per backend in a SQLite file, so a restart re-adopts them.

Rows hold what is needed to find, check and restart a backend; never the model's credentials or
hooks, which each backend keeps in its own MODEL_DIR (and restores from there when restarted).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from backend.core.redact import redact_value

STATES = ("starting", "pending", "ready", "restarting", "stopped")


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


class Registry:
    """Rows of BackendRecord in SQLite; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS backends (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        path.chmod(0o600)  # it holds the backends' configure tokens

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10)

    def put(self, record: BackendRecord) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO backends VALUES (?, ?)", (record.id, json.dumps(asdict(record))))

    def get(self, backend_id: str) -> BackendRecord | None:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT record FROM backends WHERE id = ?", (backend_id,)).fetchone()
        return _record(row[0]) if row else None

    def delete(self, backend_id: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM backends WHERE id = ?", (backend_id,))

    def all(self) -> list[BackendRecord]:
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT record FROM backends").fetchall()
        return sorted((_record(row[0]) for row in rows), key=lambda r: r.created_at)

    def backends(self) -> list[BackendRecord]:
        return [r for r in self.all() if not r.spare]

    def spares(self) -> list[BackendRecord]:
        return [r for r in self.all() if r.spare]

    def newest_configured(self) -> BackendRecord | None:
        """The backend Label Studio's root routes go to: the most recently configured one."""
        configured = [r for r in self.all() if r.configured_at]
        return max(configured, key=lambda r: r.configured_at) if configured else None


def _record(raw: str) -> BackendRecord:
    data = json.loads(raw)
    return BackendRecord(**{k: v for k, v in data.items() if k in _COLUMNS})
