"""What the workers of one backend share when there are several (``WORKERS`` > 1).

Each gunicorn worker has its own model process, batcher and background queue, and Label Studio's next
"Retrieve predictions" may reach any of them. So, with several workers, what the backgrounds finished,
which tasks each background has taken on (its claims), and the webhook log live in one SQLite file
under MODEL_DIR, in WAL mode (readers never wait for the writer), as the quality ledger does. A round
that reaches worker B for tasks worker A's background works on waits for A's results instead of
predicting them again. A claim counts only while its worker lives (``lifetime.alive``): the tasks of a
worker that died are predicted again in the next round, never lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from backend.core.lifetime import alive, process_identity
from backend.quality import webhooks
from backend.serving.continuation import CacheKey
from backend.state.sqlitedb import SharedDb, in_chunks, placeholders

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (key TEXT PRIMARY KEY, identity TEXT NOT NULL, encoded TEXT NOT NULL,
                                        size INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_by_identity ON predictions (identity);
CREATE INDEX IF NOT EXISTS predictions_by_age ON predictions (at, size);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, identity TEXT NOT NULL, owner TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS claims_by_identity ON claims (identity);
CREATE TABLE IF NOT EXISTS webhook_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL,
                                           event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhook_events_by_project ON webhook_events (project, seq);
CREATE TABLE IF NOT EXISTS webhook_counts (project TEXT NOT NULL, action TEXT NOT NULL, n INTEGER NOT NULL,
                                           last_at REAL NOT NULL, last_seq INTEGER NOT NULL,
                                           PRIMARY KEY (project, action));
"""
FILE_NAME = "workers.sqlite"
POLL_S = (0.05, 0.25)  # waiting for another worker's results: the first pause, the longest
MAINTAIN_EVERY_S = 5.0
GONE = ("another worker's background stopped working on it (it failed, was replaced by a new configuration, "
        "or the worker restarted); it is predicted again in the next round")


def _text(key: CacheKey) -> str:
    return json.dumps(list(key), separators=(",", ":"), default=str)


def _select(db: Any, sql: str, keys: list[str], *before: Any) -> dict[str, Any]:
    """``key -> value`` for ``SELECT key, value ... key IN ({})``, in pieces small enough for SQLite."""
    found: dict[str, Any] = {}
    for chunk in in_chunks(keys):
        found.update(db.execute(sql.format(placeholders(chunk)), [*before, *chunk]))
    return found


class SharedPredictions:
    """The prediction cache (``continuation.Predictions``) of several workers, with their claims."""

    def __init__(self, db: SharedDb, max_bytes: int, ttl_s: float, owner: str | None = None) -> None:
        self.db, self.max_bytes, self.ttl_s = db, max_bytes, ttl_s
        self.owner = owner or process_identity()  # the worker: its claims last as long as it does
        self.hits = 0
        self._stats: dict[str, int] = {}
        self._maintained = float("-inf")
        self.maintain()

    def holds(self, identity: str) -> bool:
        row = self.db.db().execute(
            "SELECT EXISTS(SELECT 1 FROM predictions WHERE identity = ?) OR EXISTS(SELECT 1 FROM claims WHERE identity = ?)",
            (identity, identity)).fetchone()
        return bool(row[0])

    def get_many(self, keys: Sequence[CacheKey]) -> dict[int, str]:
        texts = [_text(key) for key in keys]
        found = _select(self.db.db(), "SELECT key, encoded FROM predictions WHERE at >= ? AND key IN ({})",
                        list(set(texts)), time.time() - self.ttl_s)
        answers = {index: found[text] for index, text in enumerate(texts) if text in found}
        self.hits += len(answers)
        return answers

    def settle(self, done: Sequence[tuple[CacheKey, str]], released: Sequence[CacheKey] = ()) -> None:
        """Store what this worker's background finished and drop its claims, in one transaction: a worker
        that waits for these tasks sees either the claim or the prediction, never neither."""
        if not done and not released:
            return
        now = time.time()
        rows = [(_text(key), key[0], encoded, len(encoded), now) for key, encoded in done if len(encoded) <= self.max_bytes]
        ours = [(_text(key), self.owner) for key in [*(key for key, _ in done), *released]]
        with self.db.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", ours)

    def claim(self, keys: Sequence[CacheKey]) -> set[CacheKey]:
        """Take on these tasks unless another live worker's background has them; returns those taken."""
        by_text = {_text(key): key for key in keys}
        with self.db.transaction() as db:
            holders = _select(db, "SELECT key, owner FROM claims WHERE key IN ({})", list(by_text))
            living = {owner for owner in set(holders.values()) if owner != self.owner and alive(owner)}
            free = [text for text in by_text if holders.get(text) not in living]
            db.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)",
                           [(text, by_text[text][0], self.owner) for text in free])
        return {by_text[text] for text in free}

    def watch(self, wanted: dict[int, CacheKey], deadline: float) -> dict[int, Future]:
        """Futures of the tasks another live worker's background has claimed, resolved by a thread that
        reads the file until they are predicted, given up, or the request's deadline passes."""
        texts = {index: _text(key) for index, key in wanted.items()}
        holders = _select(self.db.db(), "SELECT key, owner FROM claims WHERE key IN ({})", list(set(texts.values())))
        living = {owner for owner in set(holders.values()) if owner != self.owner and alive(owner)}
        futures: dict[int, Future] = {index: Future() for index, text in texts.items() if holders.get(text) in living}
        if futures:
            by_text: dict[str, list[Future]] = {}
            for index, future in futures.items():
                by_text.setdefault(texts[index], []).append(future)
            threading.Thread(target=self._follow, args=(by_text, deadline), name="shared-wait", daemon=True).start()
        return futures

    def _follow(self, by_text: dict[str, list[Future]], deadline: float) -> None:
        pause, wake = POLL_S[0], threading.Event()
        try:
            while by_text and time.monotonic() < deadline:
                wake.wait(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 1.5, POLL_S[1])
                keys = list(by_text)
                with self.db.snapshot() as db:
                    found = _select(db, "SELECT key, encoded FROM predictions WHERE key IN ({})", keys)
                    holders = _select(db, "SELECT key, owner FROM claims WHERE key IN ({})", keys)
                living = {owner for owner in set(holders.values()) if alive(owner)}
                for text in keys:
                    if text in found:
                        self.hits += 1
                        for future in by_text.pop(text):
                            future.set_result(found[text])
                    elif holders.get(text) not in living:
                        for future in by_text.pop(text):
                            future.set_exception(RuntimeError(GONE))
        except Exception as exc:  # the waiting request must hear of it, not hang to its deadline
            log.exception("waiting for another worker's predictions failed")
            for futures in by_text.values():
                for future in futures:
                    future.set_exception(RuntimeError(f"reading {self.db.path} failed: {exc}"))

    def maintain(self) -> None:
        """From the ticker: drop what is too old, the oldest beyond the size bound and the claims of dead
        workers; refresh the figures /health shows (every MAINTAIN_EVERY_S, not on every /health)."""
        if time.monotonic() - self._maintained < MAINTAIN_EVERY_S:
            return
        self._maintained = time.monotonic()
        db = self.db.db()
        db.execute("DELETE FROM predictions WHERE at < ?", (time.time() - self.ttl_s,))
        entries, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM predictions").fetchone()
        if size > self.max_bytes:
            excess, cutoff = size - self.max_bytes, None
            for cutoff, item_size in db.execute("SELECT at, size FROM predictions ORDER BY at"):
                excess -= item_size
                if excess <= 0:
                    break
            db.execute("DELETE FROM predictions WHERE at <= ?", (cutoff,))
            entries, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM predictions").fetchone()
        owners = [owner for (owner,) in db.execute("SELECT DISTINCT owner FROM claims")]
        db.executemany("DELETE FROM claims WHERE owner = ?", [(owner,) for owner in owners if not alive(owner)])
        claimed = db.execute("SELECT count(*) FROM claims").fetchone()[0]
        self._stats = {"entries": entries, "bytes": size, "claimed": claimed}

    def save(self, path: Path) -> int:
        """Nothing to write: the entries are in the shared file already, for the next start too."""
        return 0

    def keep_only(self, identity: str) -> None:
        """A new configuration serves: every worker follows it, so the others' entries go for all."""
        with self.db.transaction() as db:
            db.execute("DELETE FROM predictions WHERE identity != ?", (identity,))
            db.execute("DELETE FROM claims WHERE identity != ? AND owner = ?", (identity, self.owner))
        self._maintained = float("-inf")

    def describe(self) -> dict[str, Any]:
        return {**self._stats, "max_bytes": self.max_bytes, "hits": self.hits, "shared": str(self.db.path)}


class SharedWebhookLog:
    """``webhooks.WebhookLog`` for several workers: the same bounds and the same view, from any worker."""

    def __init__(self, db: SharedDb) -> None:
        self.db = db

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        project_id, event = webhooks.event_of(body)
        project = json.dumps(project_id, default=str)
        with self.db.transaction() as db:
            seq = db.execute("INSERT INTO webhook_events (project, event) VALUES (?, ?)",
                             (project, json.dumps(event))).lastrowid
            db.execute("INSERT INTO webhook_counts VALUES (?, ?, 1, ?, ?) ON CONFLICT (project, action) "
                       "DO UPDATE SET n = n + 1, last_at = excluded.last_at, last_seq = excluded.last_seq",
                       (project, event["action"], event["at"], seq))
            db.execute("DELETE FROM webhook_events WHERE project = ? AND seq <= (SELECT seq FROM webhook_events "
                       "WHERE project = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                       (project, project, webhooks.EVENTS_PER_PROJECT))
            stale = [(p,) for (p,) in db.execute("SELECT project FROM webhook_counts GROUP BY project "
                                                 "ORDER BY max(last_seq) DESC LIMIT -1 OFFSET ?",
                                                 (webhooks.MAX_PROJECTS,))]
            db.executemany("DELETE FROM webhook_counts WHERE project = ?", stale)
            db.executemany("DELETE FROM webhook_events WHERE project = ?", stale)
        return {"project": project_id, **event}

    def events(self, project_id: Any) -> list[dict[str, Any]]:
        rows = self.db.db().execute("SELECT event FROM webhook_events WHERE project = ? ORDER BY seq",
                                    (json.dumps(project_id, default=str),))
        return [json.loads(event) for (event,) in rows]

    def describe(self) -> dict[str, Any]:
        projects: dict[str, dict[str, Any]] = {}
        total = 0
        rows = self.db.db().execute("SELECT project, action, n, last_at FROM webhook_counts ORDER BY last_seq")
        for project, action, count, last_at in rows:
            shown = projects.setdefault(str(json.loads(project)), {"events": {}, "last_at": 0.0})
            shown["events"][action] = count
            shown["last_at"] = max(shown["last_at"], last_at)
            total += count
        return {"events": total, "projects": projects}
