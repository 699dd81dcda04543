"""Follow the registry: a backend configured with ``models:/name@alias`` (or ``models:/name/latest``)
serves whatever version that names, without a new configure.

Every ``ALIAS_POLL_S`` (and at once after a training of this backend promoted a version) the serving
model process, which has MLflow imported, asks the registry which version the alias names (one small
call, ~9 ms over loopback; the first in a process sets up MLflow's store, ~0.25 s of CPU for a database,
~25 ms where the template made it for the default SQLite registry before forking: priming.prime_sqlite_store).
The first time comes at a random point within ``ALIAS_POLL_S`` of the worker's start: a backend woken
from sleep serves the version it resolved before, as an awake one would until its next look, and a
fleet of woken backends neither pays for that setup on every wake nor asks the registry all at once.
When the version changed, the runtime loads it in a new process while the old one serves, then swaps;
the model version string changes with it, so Label Studio predicts again. When the
alias is gone or the registry cannot be reached, the backend keeps serving what it has, says so on
``/health`` and asks again later, less often each time; a version that fails to load is not tried
again until the alias moves on.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from backend.core.errors import BackendError, NotFound
from backend.core.metrics import BackendMetrics
from backend.core.settings import Settings
from backend.serving.runtime import LoadJob, Runtime
from backend.state.training_records import TrainingRecords

log = logging.getLogger(__name__)

BUSY_RETRY_S = 1.0
MAX_BACKOFF_S = 600.0
RESOLVE_WAIT_S = 5.0


class RegistryFollower:
    """One per app; the app's ticker calls ``tick`` every second or so."""

    def __init__(self, settings: Settings, runtime: Runtime, records: TrainingRecords, metrics: BackendMetrics) -> None:
        self.settings = settings
        self.runtime = runtime
        self.records = records
        self.metrics = metrics
        self._next = time.monotonic() + random.uniform(0.0, settings.alias_poll_s)
        self._failures = 0
        self._promotion_stamp = records.promotion_stamp()
        self._reload: tuple[LoadJob, str, str] | None = None  # the load under way, its target and why
        self._failed_target = ""
        self.checked_at: float | None = None
        self.registry_names = ""
        self.problem = ""

    def tick(self) -> None:
        self._after_reload()
        serving = self.runtime.active
        if serving is None or serving.spec.registry_target is None or self._reload is not None:
            return
        stamp = self.records.promotion_stamp()
        promoted = stamp != self._promotion_stamp
        now = time.monotonic()
        if not promoted and now < self._next:
            return
        if self.runtime.loading:
            return
        try:
            resolved = serving.process.resolve(serving.spec, RESOLVE_WAIT_S)
        except BackendError as exc:
            self._failed(serving, exc)
            return
        if resolved is None:  # the model process is busy with a batch: ask again shortly
            self._next = now + BUSY_RETRY_S
            return
        self._promotion_stamp = stamp
        self._failures, self.problem = 0, ""
        self._next = now + self.settings.alias_poll_s
        self.checked_at = time.time()
        self.registry_names = resolved["label"]
        if resolved["uri"] == serving.info.get("uri") or resolved["uri"] == self._failed_target:
            return
        # A training moves the alias from its own process and notes the promotion once that has ended: a look
        # in between (this worker's own schedule) finds the move with the training still current.
        reason = "training" if promoted or self.records.read_state().get("current") else "registry"
        log.info("%s now names %s (serving %s): loading it", serving.spec.model_uri, resolved["label"], serving.model_version)
        job = self.runtime.reload()
        if job is not None:
            self._reload = (job, resolved["uri"], reason)

    def _after_reload(self) -> None:
        if self._reload is None:
            return
        job, target, reason = self._reload
        if not job.done.is_set():
            return
        self._reload = None
        if job.error is None:
            self.metrics.model_swaps.labels(reason).inc()
            self._failed_target = ""
            serving = self.runtime.active
            if serving is not None:
                self.records.note_promotion()  # sibling workers look at once
                self._promotion_stamp = self.records.promotion_stamp()
                log.info("now serving %s (%s)", serving.model_version, reason)
        else:
            self._failed_target = target
            active = self.runtime.active
            self.problem = (f"{target} failed to load ({job.error.error}); still serving "
                            f"{active.model_version if active else 'nothing'} until the alias moves on")
            log.error("%s", self.problem)

    def _failed(self, serving: Any, exc: BackendError) -> None:
        self._failures += 1
        delay = min(MAX_BACKOFF_S, self.settings.alias_poll_s * 2 ** (self._failures - 1))
        self._next = time.monotonic() + delay
        what = "no longer names a version" if isinstance(exc, NotFound) else "cannot be checked"
        self.problem = (f"{serving.spec.model_uri} {what} ({exc.error}); still serving {serving.model_version}, "
                        f"asking again in {delay:.0f} s")
        log.warning("%s", self.problem)

    def describe(self) -> dict[str, Any] | None:
        serving = self.runtime.active
        if serving is None or serving.spec.registry_target is None:
            return None
        shown: dict[str, Any] = {"follows": serving.spec.model_uri, "poll_s": self.settings.alias_poll_s,
                                 "serving": serving.info.get("label"), "checked_at": self.checked_at}
        if self.registry_names:
            shown["registry_names"] = self.registry_names
        if self._reload is not None:
            shown["loading"] = self._reload[1]
        if self.problem:
            shown["problem"] = self.problem
        return shown
