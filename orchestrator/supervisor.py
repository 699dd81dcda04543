"""Keeps backends alive: restarts the dead with backoff, marks the started ready, adopts after a restart.

One supervisor per state folder, whatever serves the orchestrator: a lock file elects it, so several
gunicorn workers of one orchestrator do not restart a backend twice. After an orchestrator restart
the first pass finds each registered backend by its handle: running ones are adopted as they are,
the others are restarted and restore their configuration from their own MODEL_DIR.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from typing import IO

from .manager import BackendManager
from .registry import BackendRecord

log = logging.getLogger(__name__)


class Supervisor:
    """A background pass over every backend each ``supervise_every_s``."""

    def __init__(self, manager: BackendManager) -> None:
        self.manager = manager
        self.settings = manager.settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: IO[str] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def elected(self) -> bool:
        """Whether this process supervises the state folder (and decides what its backends do at exit)."""
        return self._lock_file is not None

    def _elected(self) -> bool:
        if self._lock_file is None:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.settings.state_dir / "supervisor.lock", "w")  # noqa: SIM115 - held while elected
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._lock_file = handle  # held for the life of this process
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.settings.supervise_every_s if self._lock_file else 0):
            if not self._elected():
                self._stop.wait(5)
                continue
            try:
                self.tick()
            except Exception:
                log.exception("supervisor pass failed")

    def tick(self) -> None:
        """One pass; tests call it directly."""
        for record in self.manager.registry.all():
            lock = self.manager.lock_for(record.id)
            if not lock.acquire(blocking=False):
                continue  # a configure or delete is working on it
            try:
                current = self.manager.registry.get(record.id)
                if current is not None:
                    self._check(current)
            finally:
                lock.release()
        self.manager.replenish_spares()

    def _check(self, record: BackendRecord) -> None:
        manager, now = self.manager, time.time()
        if manager.starting_elsewhere(record):
            return
        if record.state == "stopped" and not manager.driver.is_running(record):
            log.info("backend %s: stopped when the orchestrator last exited; starting it again", record.id)
            manager.start(record)
            return
        if manager.driver.is_running(record):
            pending = manager.driver.pending_reason(record)
            if pending:  # Ray has not placed it (no free GPU): waiting is not failing
                if (record.state, record.last_error) != ("pending", pending):
                    record.state, record.last_error = "pending", pending
                    manager.registry.put(record)
                    log.warning("backend %s: pending: %s", record.id, pending)
                return
            if record.state == "pending":  # placed now: its start deadline begins
                record.state, record.started_at = "starting", now
                manager.registry.put(record)
            if record.state == "ready":
                return
            if manager.healthy(record, timeout=0.5):
                record.state, record.failures = "ready", 0
                manager.registry.put(record)
                log.info("backend %s: ready on %s", record.id, record.url)
            elif now - record.started_at > self.settings.start_timeout_s:
                record.last_error = f"no answer on /health within {self.settings.start_timeout_s:g} s; restarting"
                manager.driver.stop(record)
                self._died(record, now)
            return
        if record.state != "restarting":
            record.last_error = manager.driver.exit_reason(record)
            self._died(record, now)
            return
        if now >= record.retry_at:
            record.restarts += 1
            log.info("backend %s: restart %d", record.id, record.restarts)
            manager.start(record)

    def _died(self, record: BackendRecord, now: float) -> None:
        record.failures += 1
        backoff = min(self.settings.max_backoff_s, 0.5 * 2 ** (record.failures - 1))
        record.state, record.retry_at = "restarting", now + backoff
        last_lines = self.manager.driver.logs(record, 3)
        log.warning(
            "backend %s: %s; restarting in %.1f s. Last log: %s", record.id, record.last_error, backoff, last_lines
        )
        self.manager.registry.put(record)
