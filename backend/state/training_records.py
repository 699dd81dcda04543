"""What every worker of a backend sees of its trainings: small files under MODEL_DIR/training.

- ``lock``: held (``flock``) by the training process itself for as long as it lives, so two workers,
  or a worker and a restarted one, never run two trainings, and a training whose worker died is still
  known to be running;
- ``state.json``: per project, the annotation count and what changed since the last training; the
  request waiting for the running training to end; the failures in a row; the current and recent jobs.
  Read-modify-write under ``state.lock``;
- ``jobs/<id>.json``: one training's record; ``jobs/<id>.result.json``: what the training process
  reports as it goes (its MLflow run first, its outcome last); ``jobs/<id>.log``: its output.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.state.store import JsonFile, StoredFileBroken

RECENT_JOBS = 20
LOG_TAIL_BYTES = 4000


class TrainingRecords:
    """The files; every method is safe to call from any thread of any worker."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir / "training"
        self.jobs_dir = self.dir / "jobs"
        self.state_file = JsonFile(self.dir / "state.json")
        self.promoted = self.dir / "promoted"  # touched after a promotion: every worker's follower looks at once

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def state(self) -> Iterator[dict[str, Any]]:
        """The state document, saved when the block ends without an error."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "state.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                document = self.read_state()
                before = repr(document)
                yield document
                if repr(document) != before:
                    self.state_file.save(document)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read_state(self) -> dict[str, Any]:
        try:
            document = self.state_file.load() or {}
        except StoredFileBroken:
            document = {}  # nothing in it is worth more than a working trainer; it is rebuilt as events come
        document.setdefault("projects", {})
        document.setdefault("jobs", [])
        return document

    def take_training_lock(self) -> int | None:
        """An fd holding the training lock (to hand to the training process), or None when one runs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def training_runs(self) -> bool:
        """Whether a training process holds the lock (in any worker, or orphaned by one that died)."""
        fd = self.take_training_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    # -- jobs ----------------------------------------------------------------------------------

    def job_file(self, job_id: str) -> JsonFile:
        return JsonFile(self.jobs_dir / f"{job_id}.json")

    def result_file(self, job_id: str) -> JsonFile:
        return JsonFile(self.jobs_dir / f"{job_id}.result.json")

    def log_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.log"

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            return self.job_file(job_id).load()
        except StoredFileBroken:
            return None

    def result(self, job_id: str) -> dict[str, Any]:
        try:
            return self.result_file(job_id).load() or {}
        except StoredFileBroken:
            return {}

    def log_tail(self, job_id: str) -> str:
        try:
            with self.log_path(job_id).open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def add_job(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Record a new job as the current one; the oldest beyond RECENT_JOBS go, files and all."""
        self.job_file(record["id"]).save(record)
        state["current"] = record["id"]
        state["jobs"] = [record["id"], *state["jobs"]]
        for old in state["jobs"][RECENT_JOBS:]:
            for path in (self.job_file(old).path, self.result_file(old).path, self.log_path(old)):
                path.unlink(missing_ok=True)
        state["jobs"] = state["jobs"][:RECENT_JOBS]

    def note_promotion(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.promoted.write_text(str(time.time()))

    def promotion_stamp(self) -> int | None:
        try:
            return self.promoted.stat().st_mtime_ns
        except FileNotFoundError:
            return None
