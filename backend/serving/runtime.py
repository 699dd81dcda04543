"""The backend's live state: which configuration serves, and the load that may replace it.

A configure goes to a model process (``modelprocess``): a new model gets a new process, forked
from the zygote, which decodes the hooks first (a bad hook fails fast) and then loads the model;
the old configuration serves until the new one is completely ready, then one assignment swaps it
in and the old process is retired. Repeating a configure that is loading or serving is idempotent;
changing only the hooks of the serving model swaps them inside its process without reloading,
unless that process is busy (then a new one loads, so a hung call never holds up the new hooks).
The serving spec is persisted under MODEL_DIR, restored on start, and followed by sibling gunicorn
workers through the file's stamp.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from backend.config.spec import ModelSpec
from backend.core.errors import BackendError, NotConfigured, UpstreamUnavailable
from backend.core.redact import SECRETS
from backend.core.settings import Settings
from backend.isolation.modelprocess import ModelProcess, Retired
from backend.isolation.zygote import Zygote
from backend.serving.batching import DynamicBatcher
from backend.serving.continuation import Continuation
from backend.state.store import ConfigurationStore, StoredFileBroken

log = logging.getLogger(__name__)

HOOK_SWAP_WAIT_S = 1.0  # how long a hooks-only configure waits for a busy process before loading a new one
RESTORE_MAX_BACKOFF_S = 30.0
SERVE_ATTEMPTS = 3  # a request whose configuration was retired under it runs again on the new one, this often
T = TypeVar("T")


def serving_identity(spec: ModelSpec, info: dict[str, Any]) -> str:
    """Model, hooks and the version the URI resolved to: what a cached prediction depends on."""
    return f"{spec.digest}:{info.get('uri', '')}"


def serving_version(spec: ModelSpec, info: dict[str, Any]) -> str:
    """Stable for a configuration: Label Studio skips tasks already predicted with this version."""
    return spec.model_version or str(info.get("label", ""))


class MakeContinuation(Protocol):
    """The app's factory of a configuration's background queue (the prediction cache is the app's)."""

    def __call__(self, *, hooks_id: str, identity: str, model_version: str, batch_size: int,
                 batcher: DynamicBatcher) -> Continuation: ...


@dataclass(frozen=True)
class Serving:
    """One configuration as this worker serves it; immutable, a reconfigure makes a new one."""

    spec: ModelSpec
    info: dict[str, Any]  # what the model process reported of the loaded model
    hooks: dict[str, str]  # the hooks' sources, as shown on /health
    process: ModelProcess
    batcher: DynamicBatcher
    batch_size: int
    continuation: Continuation = field(repr=False)
    configured_at: float = field(default_factory=time.time)

    @property
    def hooks_id(self) -> str:
        return self.spec.digest

    @property
    def identity(self) -> str:
        return serving_identity(self.spec, self.info)

    @property
    def model_version(self) -> str:
        return serving_version(self.spec, self.info)

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "model_uri": self.info.get("uri"),
            "flavor": self.info.get("flavor"),
            "device": self.info.get("device"),
            "batch_size": self.batch_size,
            "pre_hook": self.hooks.get("pre_hook"),
            "post_hook": self.hooks.get("post_hook"),
            **({"embed_hook": self.hooks["embed_hook"]} if self.hooks.get("embed_hook") else {}),
            "load_seconds": round(float(self.info.get("load_seconds", 0.0)), 3),
            "configured_at": self.configured_at,
            "model_process": self.process.describe(),
            **({"loaded_offline": self.info["offline"]} if self.info.get("offline") else {}),
        }


@dataclass
class LoadJob:
    """One configure's load, observable at /configure/status while it runs."""

    spec: ModelSpec
    seq: int
    process: ModelProcess | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: BackendError | None = None
    superseded: bool = False  # a newer configure replaced it before it was ready: its load was stopped
    restoring: bool = False  # the stored configuration, loaded at start: tried again while the registry is down
    done: threading.Event = field(default_factory=threading.Event)
    settled: threading.Event = field(default_factory=threading.Event)  # done, or superseded: its caller can answer

    def supersede(self) -> None:
        self.superseded = True
        self.settled.set()

    def finish(self) -> None:
        self.finished_at = time.time()
        self.done.set()
        self.settled.set()

    def status(self) -> dict[str, Any]:
        state = "loading" if not self.done.is_set() else (
            "superseded" if self.superseded else "failed" if self.error else "ready")
        body: dict[str, Any] = {"job": self.id, "state": state, "model_uri": self.spec.model_uri, "started_at": self.started_at}
        if self.finished_at:
            body["finished_at"] = self.finished_at
        if self.error:
            body["error"] = self.error.to_dict()
        return body


class Runtime:
    """Owns the serving configuration, its model process, and the jobs that replace them."""

    def __init__(
        self,
        settings: Settings,
        store: ConfigurationStore,
        zygote: Zygote,
        make_continuation: MakeContinuation,
        on_loaded: Callable[[Serving], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.zygote = zygote
        self.make_continuation = make_continuation
        self.on_loaded = on_loaded
        self.active: Serving | None = None
        self.last_error: dict[str, Any] | None = None
        self.stored_error: dict[str, Any] | None = None  # a stored configuration that cannot be read
        self.job: LoadJob | None = None
        self._seq = itertools.count(1)
        self._swapped_seq = 0
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._next_poll = 0.0
        self._follow_lock = threading.Lock()
        self._restore_at: float | None = None  # when to try the stored configuration again
        self._restore_failures = 0
        self.started_at = time.time()

    # -- configure -----------------------------------------------------------------------------

    def configure(self, spec: ModelSpec, restoring: bool = False) -> LoadJob | None:
        """Apply a spec. Returns None when it took effect at once, else the job loading it."""
        SECRETS.add(*spec.secrets())
        with self._lock:
            active = self.active
            if active is not None and active.spec.digest == spec.digest:
                return None  # an idempotent repeat (old dagshub clients re-send configure)
            if self.job is not None and not self.job.done.is_set() and self.job.spec.digest == spec.digest:
                return self.job
        if active is not None and active.spec.model_key == spec.model_key and self._swap_hooks(active, spec):
            return None
        with self._lock:
            previous = self.job
            job = LoadJob(spec, next(self._seq), self._new_process(), restoring=restoring)
            self.job = job
            # A newer configure wins: a load still under way need not finish. One that already swapped in
            # (its job not yet marked done) is serving now, and keeps serving until this one is ready.
            replaced = previous if previous is not None and not previous.done.is_set() and previous.seq > self._swapped_seq else None
            if replaced is not None:
                replaced.supersede()
        if replaced is not None and replaced.process is not None:
            replaced.process.stop()
        threading.Thread(target=self._load, args=(job,), name=f"load-{job.id}", daemon=True).start()
        return job

    def reload(self) -> LoadJob | None:
        """Load the serving spec again in a new process (its alias moved): the old one serves until it is ready."""
        with self._lock:
            active = self.active
            if active is None:
                return None
            if self.job is not None and not self.job.done.is_set():
                return self.job
            job = LoadJob(active.spec, next(self._seq), self._new_process())
            self.job = job
        threading.Thread(target=self._load, args=(job,), name=f"reload-{job.id}", daemon=True).start()
        return job

    def _new_process(self) -> ModelProcess:
        return ModelProcess(self.zygote, self.store.artifacts_dir, self.settings.call_timeout_s,
                            self.settings.embed_cache_bytes)

    def _batch_size(self, spec: ModelSpec) -> int:
        return spec.batch_size or self.settings.default_batch_size

    def _swap_hooks(self, active: Serving, spec: ModelSpec) -> bool:
        """New hooks for the serving model, in its own process; False when that process is busy, or was
        retired under the swap by a load that finished meanwhile (then the hooks load with the model anew)."""
        try:
            sources = active.process.set_hooks(spec.digest, spec.pre_hook, spec.post_hook, spec.secrets(), HOOK_SWAP_WAIT_S,
                                               spec.embed_hook)
        except Retired:
            log.info("the serving configuration was replaced during a hook swap: loading the hooks in a new process")
            return False
        if sources is None:
            log.info("the model process is busy: loading the new hooks in a new one")
            return False
        with self._lock:
            if self.active is not active:
                return False
            self._swap(spec, active.info, sources, active.process, active.batcher, next(self._seq))
        return True

    def _load(self, job: LoadJob) -> None:
        process = job.process
        assert process is not None
        try:
            sources = process.set_hooks(job.spec.digest, job.spec.pre_hook, job.spec.post_hook, job.spec.secrets(),
                                        embed_hook=job.spec.embed_hook)
            assert sources is not None
            info = process.load(job.spec, prefer_local=job.restoring)
            batcher = DynamicBatcher(process, self.settings.max_latency_ms, enabled=self.settings.batching)
            with self._lock:
                if job.seq > self._swapped_seq and not job.superseded:
                    self._swap(job.spec, info, sources, process, batcher, job.seq, persist=not job.restoring)
                    process = None  # serving now
                else:
                    log.info("discarding load %s: a newer configuration is already serving", job.id)
        except BackendError as exc:
            job.error = exc
        except Exception as exc:  # a load must never take the worker down
            log.exception("loading %s failed", job.spec.model_uri)
            job.error = BackendError(f"loading failed: {type(exc).__name__}: {exc}", "See the backend's log.")
        finally:
            if process is not None:
                process.stop()
            if job.superseded:
                job.error = None  # not a failure: the newer configure answers for itself
            if job.error is not None:
                self.last_error = {**job.error.to_dict(), "at": time.time(), "model_uri": job.spec.model_uri}
                log.error("configure of %s failed: %s", job.spec.model_uri, job.error.error)
                if job.restoring and isinstance(job.error, UpstreamUnavailable):
                    self._restore_later()
            elif job.restoring:
                self._restore_failures = 0
            job.finish()

    def _swap(self, spec: ModelSpec, info: dict[str, Any], sources: dict[str, str], process: ModelProcess,
              batcher: DynamicBatcher, seq: int, persist: bool = True) -> Serving:
        """Persist (``persist``: not a restore, which loaded what the store held), then serve; the previous
        configuration's background work and process retire. Caller holds the lock.

        A restore writes nothing back: a sibling worker may have saved a newer configuration while it loaded,
        and writing the restored one over it would turn every worker back to the older one. Its stamp stays
        the one it read, so the next ``follow_store`` picks up anything newer."""
        if persist:
            if self.stored_error:
                self.store.configuration.keep_aside()  # never overwritten silently
            self._stamp = self.store.configuration.save({"spec": spec.to_dict(), "saved_at": time.time()})
        batch_size = self._batch_size(spec)
        continuation = self.make_continuation(hooks_id=spec.digest, identity=serving_identity(spec, info),
                                              model_version=serving_version(spec, info), batch_size=batch_size,
                                              batcher=batcher)
        serving = Serving(spec, info, sources, process, batcher, batch_size, continuation)
        old, self.active = self.active, serving
        self._swapped_seq = seq
        self.last_error = None
        self.stored_error = None
        if old is not None:
            old.continuation.stop()
            if old.process is not serving.process:
                old.batcher.retire(then=old.process.stop)
        if self.on_loaded is not None:
            self.on_loaded(serving)
        return serving

    def close(self) -> None:
        """Stop every model process this runtime started (the app is going away)."""
        with self._lock:
            active, job = self.active, self.job
        for process in {p for p in (active.process if active else None, job.process if job else None) if p}:
            process.stop()
        if active is not None:
            active.continuation.stop()

    # -- restore and follow the store ----------------------------------------------------------

    def restore(self) -> LoadJob | None:
        """Start loading the stored configuration, if any (process start, or a sibling worker changed it)."""
        self._stamp = self.store.configuration.stamp()
        try:
            document = self.store.configuration.load()
            if document is None:
                return None
            if "spec" not in document or not isinstance(document["spec"], dict):
                raise StoredFileBroken(self.store.configuration.path, "it has no 'spec' object")
            try:
                spec = ModelSpec.from_dict(document["spec"])
            except (TypeError, ValueError) as exc:
                raise StoredFileBroken(self.store.configuration.path, f"its spec does not fit this version: {exc}") from exc
        except StoredFileBroken as exc:
            self.stored_error = {"error": str(exc), "detail": exc.fix, "file": str(exc.path), "reason": exc.reason}
            log.error("%s; %s", exc, exc.fix)
            return None
        log.info("restoring configuration of %s from %s", spec.model_uri, self.store.configuration.path)
        try:
            return self.configure(spec, restoring=True)
        except BackendError as exc:
            self.last_error = {**exc.to_dict(), "at": time.time(), "model_uri": spec.model_uri}
            return None

    def _restore_later(self) -> None:
        self._restore_failures += 1
        delay = min(RESTORE_MAX_BACKOFF_S, 2.0 ** self._restore_failures)
        self._restore_at = time.monotonic() + delay
        if self.last_error is not None:
            self.last_error["retry_in_s"] = delay
        log.warning("the stored configuration could not be loaded (its registry is unreachable): trying again in %g s", delay)

    def tick(self) -> None:
        """The app's ticker: a stored configuration whose registry was down at start is tried again."""
        due = self._restore_at
        if due is None or time.monotonic() < due or self.active is not None or self.loading:
            return
        self._restore_at = None
        self.restore()

    def follow_store(self, force: bool = False) -> None:
        """Pick up a configuration another worker saved; a stat at most every STORE_POLL_S. Each request
        and the ticker call it, so an idle worker serves the new configuration too (its /health agrees).
        The next poll is due only once the load is registered: a request that comes meanwhile waits for it."""
        if time.monotonic() < self._next_poll and not force:
            return
        with self._follow_lock:
            now = time.monotonic()
            if now < self._next_poll and not force:
                return
            stamp = self.store.configuration.stamp()
            if stamp is not None and stamp != self._stamp:
                self.restore()
            self._next_poll = now + self.settings.store_poll_s

    # -- serving -------------------------------------------------------------------------------

    def require_model(self, wait_s: float) -> Serving:
        """The serving configuration; waits up to ``wait_s`` for a first load in progress."""
        active = self.active
        if active is not None:
            return active
        job = self.job
        if job is None or job.done.is_set():
            self.follow_store(force=True)  # a sibling worker may have saved one since the last poll
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
        if self.stored_error:
            detail = f"The stored configuration is unusable: {self.stored_error['error']} {self.stored_error['detail']} " + detail
        elif self.last_error:
            detail = f"The last configure failed: {self.last_error['error']}. " + detail
        raise NotConfigured("no model is configured", detail)

    def serve(self, wait_s: float, work: Callable[[Serving], T]) -> T:
        """``work`` on the serving configuration. A configure may retire that configuration between the
        moment a request takes it and the moment it reaches its model process: then the request runs
        again on the configuration that replaced it, so a configure never fails a request."""
        for attempt in range(SERVE_ATTEMPTS):
            serving = self.require_model(wait_s)
            try:
                return work(serving)
            except Retired:
                if self.active is serving or attempt == SERVE_ATTEMPTS - 1:
                    raise
                log.info("the configuration was replaced while a request was on its way to it: running it again")
        raise AssertionError("unreachable")

    @property
    def loading(self) -> bool:
        return self.job is not None and not self.job.done.is_set()

    @property
    def restoring(self) -> bool:
        """Loading the stored configuration, with none serving yet (just started, or woken)."""
        job = self.job
        return self.active is None and job is not None and job.restoring and not job.done.is_set()
