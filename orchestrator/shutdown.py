"""What the backends do when the orchestrator exits, and a line that says so.

``ORCHESTRATOR_ON_EXIT=stop`` (the default under ``flask run``, the interactive case, where Ctrl-C
should not leave gigabytes of backends behind) stops every backend; the next start of the
orchestrator starts them again, each restoring its configuration from its own MODEL_DIR.
``keep`` (the default under gunicorn and other production servers) leaves them running for the
next orchestrator to re-adopt as they are. Only the elected supervisor acts: several gunicorn
workers of one orchestrator stop the backends once.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

from .manager import BackendManager
from .registry import BackendRecord
from .supervisor import Supervisor

log = logging.getLogger(__name__)

ON_EXIT = ("stop", "keep")


class Shutdown:
    """Called once at exit (``atexit``): stops the supervisor, then stops or keeps the backends."""

    def __init__(self, manager: BackendManager, supervisor: Supervisor, on_exit: str, out: TextIO | None = None) -> None:
        self.manager, self.supervisor, self.on_exit = manager, supervisor, on_exit
        self.out = out or sys.stderr
        self.done = False

    def __call__(self) -> str:
        if self.done:
            return ""
        self.done = True
        elected = self.supervisor.elected
        self.supervisor.stop()
        if not elected:
            return ""  # another process of this orchestrator supervises, and decides
        manager = self.manager
        running = [r for r in manager.registry.all() if manager.driver.is_running(r)]
        backends = [r for r in running if not r.spare]
        if self.on_exit == "stop":
            stoppers = [threading.Thread(target=self._stop, args=(r,), name=f"stop-{r.id}") for r in running]
            for stopper in stoppers:  # at once: each waits up to its grace period (no executor at exit)
                stopper.start()
            for stopper in stoppers:
                stopper.join()
            message = (
                f"orchestrator: stopped {len(backends)} backend(s) (ORCHESTRATOR_ON_EXIT=stop). Their configurations "
                f"are kept under {manager.settings.state_dir}: the orchestrator starts them again when it starts."
            )
        else:
            where = ", ".join(f"{r.id} ({_where(r)})" for r in backends)
            message = (
                f"orchestrator: left {len(backends)} backend(s) running (ORCHESTRATOR_ON_EXIT=keep)"
                + (f": {where}" if where else "")
                + ". The next start re-adopts them; DELETE /backends/<id> stops one, "
                "or set ORCHESTRATOR_ON_EXIT=stop to stop them all with the orchestrator."
            )
        print(message, file=self.out, flush=True)
        log.info("%s", message)
        return message

    def _stop(self, record: BackendRecord) -> None:
        with self.manager.lock_for(record.id):
            if record.spare:  # a spare holds nothing worth restarting
                self.manager.remove(record)
                return
            self.manager.driver.stop(record)
            record.state = "stopped"
            self.manager.registry.put(record)


def _where(record: BackendRecord) -> str:
    pid = record.handle.partition(":")[0]
    return f"pid {pid}, port {record.port}" if record.driver == "process" and pid.isdigit() else f"port {record.port}"
