"""The backend's live state: which ConfiguredModel serves, and the load that may replace it.

A configure decodes the hooks at once (a bad hook fails fast), then loads the model in a background
thread; the old configuration serves until the new one is completely ready, then one assignment
swaps it in. Repeating a configure that is loading or serving is idempotent; changing only the hooks
of the serving model swaps them without reloading. The serving spec is persisted under MODEL_DIR,
restored on start, and followed by sibling gunicorn workers through the file's stamp.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model import ConfiguredModel

from .errors import BackendError, NotConfigured
from .hookcodec import decode_hook
from .loading import load_model
from .settings import Settings
from .spec import ModelSpec
from .store import ConfigurationStore

log = logging.getLogger(__name__)


@dataclass
class LoadJob:
    """One configure's load, observable at /configure/status while it runs."""

    spec: ModelSpec
    seq: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: BackendError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def status(self) -> dict[str, Any]:
        state = "loading" if not self.done.is_set() else ("failed" if self.error else "ready")
        body: dict[str, Any] = {"job": self.id, "state": state, "model_uri": self.spec.model_uri, "started_at": self.started_at}
        if self.finished_at:
            body["finished_at"] = self.finished_at
        if self.error:
            body["error"] = self.error.to_dict()
        return body


class Runtime:
    """Owns the serving ConfiguredModel and the jobs that replace it."""

    def __init__(self, settings: Settings, store: ConfigurationStore, on_loaded: Callable[[ConfiguredModel], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.on_loaded = on_loaded
        self.active: ConfiguredModel | None = None
        self.last_error: dict[str, Any] | None = None
        self.job: LoadJob | None = None
        self._seq = itertools.count(1)
        self._swapped_seq = 0
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._next_poll = 0.0
        self.started_at = time.time()

    # -- configure -----------------------------------------------------------------------------

    def configure(self, spec: ModelSpec) -> LoadJob | None:
        """Apply a spec. Returns None when it took effect at once, else the job loading it."""
        pre_hook = decode_hook(spec.pre_hook, "pre_hook")
        post_hook = decode_hook(spec.post_hook, "post_hook")
        with self._lock:
            active = self.active
            if active is not None and active.spec.digest == spec.digest:
                return None  # an idempotent repeat (old dagshub clients re-send configure)
            if self.job is not None and not self.job.done.is_set() and self.job.spec.digest == spec.digest:
                return self.job
            if active is not None and active.spec.model_key == spec.model_key:
                swapped = ConfiguredModel(spec, active.loaded, pre_hook, post_hook, self._batch_size(spec))
                self._swap(swapped, next(self._seq))
                return None
            job = LoadJob(spec, next(self._seq))
            self.job = job
        threading.Thread(target=self._load, args=(job, pre_hook, post_hook), name=f"load-{job.id}", daemon=True).start()
        return job

    def _batch_size(self, spec: ModelSpec) -> int:
        return spec.batch_size or self.settings.default_batch_size

    def _load(self, job: LoadJob, pre_hook, post_hook) -> None:
        try:
            loaded = load_model(job.spec, self.store.artifacts_dir)
            configured = ConfiguredModel(job.spec, loaded, pre_hook, post_hook, self._batch_size(job.spec))
            with self._lock:
                if job.seq > self._swapped_seq:
                    self._swap(configured, job.seq)
                else:
                    log.info("discarding load %s: a newer configuration is already serving", job.id)
        except BackendError as exc:
            job.error = exc
        except Exception as exc:  # a load must never take the worker down
            log.exception("loading %s failed", job.spec.model_uri)
            job.error = BackendError(f"loading failed: {type(exc).__name__}: {exc}", "See the backend's log.")
        finally:
            if job.error is not None:
                self.last_error = {**job.error.to_dict(), "at": time.time(), "model_uri": job.spec.model_uri}
                log.error("configure of %s failed: %s", job.spec.model_uri, job.error.error)
            job.finished_at = time.time()
            job.done.set()

    def _swap(self, configured: ConfiguredModel, seq: int) -> None:
        """Persist, then serve. Caller holds the lock."""
        self._stamp = self.store.configuration.save({"spec": configured.spec.to_dict(), "saved_at": time.time()})
        self.active = configured
        self._swapped_seq = seq
        self.last_error = None
        if self.on_loaded is not None:
            self.on_loaded(configured)

    # -- restore and follow the store ----------------------------------------------------------

    def restore(self) -> LoadJob | None:
        """Start loading the stored configuration, if any (process start, or a sibling worker changed it)."""
        document = self.store.configuration.load()
        self._stamp = self.store.configuration.stamp()
        if not document or "spec" not in document:
            return None
        try:
            spec = ModelSpec.from_dict(document["spec"])
        except TypeError as exc:
            log.error("stored configuration is not usable: %s", exc)
            return None
        log.info("restoring configuration of %s from %s", spec.model_uri, self.store.configuration.path)
        try:
            return self.configure(spec)
        except BackendError as exc:
            self.last_error = {**exc.to_dict(), "at": time.time(), "model_uri": spec.model_uri}
            return None

    def follow_store(self) -> None:
        """Pick up a configuration another worker saved; a stat at most every STORE_POLL_S."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.settings.store_poll_s
        stamp = self.store.configuration.stamp()
        if stamp is not None and stamp != self._stamp:
            self.restore()

    # -- serving -------------------------------------------------------------------------------

    def require_model(self, wait_s: float) -> ConfiguredModel:
        """The serving model; waits up to ``wait_s`` for a first load in progress."""
        active = self.active
        if active is not None:
            return active
        job = self.job
        if job is not None and not job.done.is_set():
            job.done.wait(wait_s)
            if self.active is not None:
                return self.active
            raise NotConfigured(
                "the model is still loading",
                f"Retry shortly; /configure/status shows progress of {job.spec.model_uri!r}.",
            )
        detail = "POST /configure first (or run ds.add_annotation_model from the dagshub client)."
        if self.last_error:
            detail = f"The last configure failed: {self.last_error['error']}. " + detail
        raise NotConfigured("no model is configured", detail)

    @property
    def loading(self) -> bool:
        return self.job is not None and not self.job.done.is_set()
