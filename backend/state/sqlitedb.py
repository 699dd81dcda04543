"""One SQLite file under MODEL_DIR that a backend's workers share: WAL mode, so readers never wait
for the writer, and one connection per thread and process (a connection must not cross a fork)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SharedDb:
    """``db()`` for single statements (autocommit); ``transaction()`` for writes that go together;
    ``snapshot()`` for reads that must see one state of the file."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path, self.schema = path, schema
        self._local = threading.local()

    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self.schema)
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        db = self.db()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")


def in_chunks(values: list, size: int = 500) -> Iterator[list]:
    """Pieces small enough for one ``IN (?, ...)`` each."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def placeholders(values: list) -> str:
    return ",".join("?" * len(values))
