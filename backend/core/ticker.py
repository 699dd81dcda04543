"""One thread per app that does the periodic work: finishing and starting trainings, following the
registry, writing prediction notes. Each job's failure is logged and never stops the others."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Ticker:
    def __init__(self, interval_s: float, jobs: list[Callable[[], None]]) -> None:
        self.interval_s = interval_s
        self.jobs = jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for job in self.jobs:
                try:
                    job()
                except Exception:
                    log.exception("periodic %s failed", getattr(job, "__qualname__", job))

    def stop(self) -> None:
        self._stop.set()
