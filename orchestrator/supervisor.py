"""Keeps backends alive: restarts the dead with backoff, marks the started ready, adopts after a restart,
and renews the running ones the driver says would be better started again.

One supervisor per state folder, whatever serves the orchestrator: a lock file elects it, so several
gunicorn workers of one orchestrator do not restart a backend twice. After an orchestrator restart
the first pass finds each registered backend by its handle: running ones are adopted as they are,
the others are restarted and restore their configuration from their own MODEL_DIR.

A renewal never interrupts serving: the replacement starts beside the backend, on its own port and the
same MODEL_DIR, restores the same configuration, and only once it answers with it ready does the
record point at it; the old one then stops gracefully, finishing what it was answering. The proxy
sends a request that met the old one closing to the new one (``api._forward``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from backend.core.errors import BackendError, OverBudget

from .drivers.base import free_port
from .fleet import busy
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
        self._measurer: threading.Thread | None = None
        self._lock_file: IO[str] | None = None
        self._renew_after: dict[str, float] = {}  # a backend whose renewal failed: not tried again before then
        self._renew_failures: dict[str, int] = {}  # renewals failed in a row, by backend

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
            if self._measurer is None:  # elected: the memory reads go on in a thread of their own
                self._measurer = threading.Thread(target=self.manager.fleet.measure_in_background,
                                                  args=(self._stop,), name="measurer", daemon=True)
                self._measurer.start()
            try:
                self.tick()
            except Exception:
                log.exception("supervisor pass failed")

    def tick(self) -> None:
        """One pass; tests call it directly. At most one renewal a pass: replacements start one at a time."""
        renewable: list[tuple[str, str]] = []
        for record in self.manager.registry.all():
            current = self._locked(record.id, self._check)
            if current is not None and current.state == "ready" and time.time() >= self._renew_after.get(record.id, 0):
                reason = self.manager.driver.renewal_reason(current)
                if reason:
                    renewable.append((record.id, reason))
        self.manager.fleet.tick()
        self.manager.replenish_spares()
        for backend_id, reason in renewable[:1]:
            self._locked(backend_id, functools.partial(self._renew, reason=reason))

    def _locked(self, backend_id: str, action: Callable[[BackendRecord], None]) -> BackendRecord | None:
        """``action`` on the backend's current record, under its lock; None where a configure or delete is
        working on it, or it is gone. The record as it stands after the action."""
        lock = self.manager.lock_for(backend_id)
        if not lock.acquire(blocking=False):
            return None
        try:
            current = self.manager.registry.get(backend_id)
            if current is not None:
                action(current)
            return current
        finally:
            lock.release()

    def _check(self, record: BackendRecord) -> None:
        manager, now = self.manager, time.time()
        if record.renewing:  # a renewal this process is not running (it holds the lock while it does): orphaned
            self._stop_orphaned_replacement(record)
        if manager.starting_elsewhere(record) or record.state == "sleeping":  # a request wakes it (fleet.py)
            return
        if record.state == "stopped" and not manager.driver.is_running(record):
            log.info("backend %s: stopped when the orchestrator last exited; starting it again", record.id)
            self._start(record)
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
            self._start(record)

    def _start(self, record: BackendRecord) -> None:
        """Start it again; where the memory budget has no room for it, it sleeps until a request wakes it."""
        try:
            self.manager.start(record)
        except OverBudget as exc:
            record.state, record.handle, record.slept_at = "sleeping", "", time.time()
            record.last_error = f"asleep rather than restarted: {exc.error}"
            self.manager.registry.put(record)
            log.warning("backend %s: %s", record.id, record.last_error)
        except BackendError as exc:  # its engine refused (the docker driver): tried again after a backoff
            record.last_error = f"could not start: {exc.error}"
            log.warning("backend %s: %s", record.id, record.last_error)
            self._died(record, time.time())

    def _stop_orphaned_replacement(self, record: BackendRecord) -> None:
        """The replacement an orchestrator started for a renewal and died before moving the backend to it."""
        handle, _, port = record.renewing.rpartition("@")
        orphan = dataclasses.replace(record, handle=handle, port=int(port) if port.isdigit() else record.port)
        if orphan.handle != record.handle and self.manager.driver.is_running(orphan):
            log.warning("backend %s: stopping the replacement %s an interrupted renewal left behind", record.id, handle)
            self.manager.driver.stop(orphan)
        record.renewing = ""
        self.manager.registry.put(record)

    def _died(self, record: BackendRecord, now: float) -> None:
        record.failures += 1
        backoff = min(self.settings.max_backoff_s, 0.5 * 2 ** (record.failures - 1))
        record.state, record.retry_at = "restarting", now + backoff
        last_lines = self.manager.driver.logs(record, 3)
        log.warning(
            "backend %s: %s; restarting in %.1f s. Last log: %s", record.id, record.last_error, backoff, last_lines
        )
        self.manager.registry.put(record)

    def _renew(self, record: BackendRecord, reason: str) -> None:
        """Start the backend again beside itself and move it there once the replacement serves the same
        configuration; a backend training or working through a background queue is left for a later pass."""
        manager, settings = self.manager, self.settings
        before = manager.health(record)
        if before is None or record.state != "ready" or busy(before):
            return
        log.info("backend %s: renewing it (%s)", record.id, reason)
        replacement = dataclasses.replace(record, port=free_port(), handle="", state="starting", started_at=time.time())
        replacement.handle = manager.driver.start(replacement)
        record.renewing = f"{replacement.handle}@{replacement.port}"  # an orchestrator that dies now: the next stops it
        manager.registry.put(record)
        problem = manager.driver.renewal_reason(replacement)
        deadline = time.monotonic() + settings.start_timeout_s
        while not problem:
            after = manager.health(replacement, timeout=0.5)
            if after is not None and _serves_as(after, before):
                break
            if self._stop.is_set():
                problem = "the orchestrator is stopping"
            elif not manager.driver.is_running(replacement):
                problem = f"its replacement stopped: {manager.driver.exit_reason(replacement)}"
            elif time.monotonic() > deadline:
                problem = f"its replacement did not serve its configuration within {settings.start_timeout_s:g} s"
            else:
                self._stop.wait(0.1)
        if problem:
            manager.driver.stop(replacement)
            record.renewing = ""
            manager.registry.put(record)
            self._renew_failures[record.id] = failures = self._renew_failures.get(record.id, 0) + 1
            retry_s = min(RENEW_RETRY_S, RENEW_FIRST_RETRY_S * 2 ** (failures - 1))
            self._renew_after[record.id] = time.time() + retry_s
            log.warning("backend %s: not renewed (%s); it serves on as it is, tried again in %g s. Its replacement's "
                        "log: %s", record.id, problem, retry_s, manager.driver.logs(replacement, 5))
            return
        self._renew_failures.pop(record.id, None)
        old = dataclasses.replace(record)
        record.port, record.handle, record.started_at = replacement.port, replacement.handle, replacement.started_at
        record.renewing = ""
        manager.registry.put(record)
        manager.driver.stop(old)  # SIGTERM first: what it was answering, it finishes
        log.info("backend %s: renewed; now %s on port %d", record.id, record.handle, record.port)


RENEW_FIRST_RETRY_S = 30.0  # a failed renewal is tried again after this, doubling up to RENEW_RETRY_S
RENEW_RETRY_S = 600.0


def _serves_as(after: dict[str, Any], before: dict[str, Any]) -> bool:
    """The replacement has restored what the backend serves, loaded and warm."""
    same = all(after.get(key) == before.get(key) for key in ("configured", "model_version"))
    return same and not after.get("loading") and not after.get("warming")
