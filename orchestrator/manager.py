"""Configure calls to running backends: one backend per model, started, readied and reconfigured.

A model's identity (tracking server, registry, URI, loader, user) names its backend: the same model
configured again goes to the same backend (new hooks, no new process). A new backend is started
through the driver, polled on ``/health`` until it answers (never a fixed sleep), then sent the
configure body exactly as it came. A new backend whose configure fails is removed again; an existing
one keeps serving its previous configuration, as a backend always does.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from backend.config.spec import ModelSpec, decode_configure_body, parse_model_spec
from backend.core.errors import BackendError, Conflict, DeadlineExceeded, NotFound, UpstreamUnavailable
from backend.core.lifetime import listening_pid, start_time

from .drivers import BackendDriver, free_port, port_is_free
from .fleet import Fleet
from .gpus import assign_gpu
from .proxy import backend_session
from .registry import BackendRecord, Registry
from .settings import OrchestratorSettings

if TYPE_CHECKING:
    from backend.config.antenna_pipeline import PipelineDefinition

log = logging.getLogger(__name__)

STARTED_CHECK_S = 0.05  # a starting backend's driver is asked this often whether it still runs
LISTEN_POLL_S = 0.004  # and its port tried this often meanwhile
PUBLIC_MODEL_FIELDS = ("model_uri", "tracking_uri", "registry_uri", "loader", "model_version", "batch_size", "gpus")
# A backend answers a configure within its CONFIGURE_WAIT_S (then 202 while loading); wait that and a margin.


def _antenna_pipeline(spec: ModelSpec) -> PipelineDefinition | None:
    """The Antenna pipeline a configure defines (label-studio-sdk is imported only for one that does)."""
    if not spec.label_config:
        return None
    from backend.config.antenna_pipeline import define_pipeline

    return define_pipeline(spec)


def backend_id_for(model_key: str) -> str:
    return hashlib.sha256(model_key.encode()).hexdigest()[:12]


class BackendManager:
    """Starts, readies, reconfigures, restarts and removes backends; the registry remembers them."""

    def __init__(
        self, settings: OrchestratorSettings, registry: Registry, driver: BackendDriver, gpus: tuple[str, ...]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.driver = driver
        self.gpus = gpus
        self.http = backend_session()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()  # guards the dict of per-backend locks only
        self._create_lock = threading.Lock()  # one creation (limit check, spare claim) at a time
        self.fleet = Fleet(self)  # sleep when idle, wake on demand, the memory budgets

    def lock_for(self, backend_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[backend_id]

    # --- configure -------------------------------------------------------------------------------

    def configure(self, raw: bytes) -> tuple[BackendRecord, int, dict[str, Any], bool]:
        """Route one configure body; returns the backend, its answer's status and body, and whether it is new."""
        spec = parse_model_spec(decode_configure_body(raw))  # bad bodies fail here, before anything starts
        backend_id = backend_id_for(spec.model_key)
        pipeline = _antenna_pipeline(spec)
        if pipeline is not None:
            self._check_slug_free(pipeline.slug, backend_id)
        with self.lock_for(backend_id):
            record = self.registry.get(backend_id)
            created = record is None
            if record is None:
                record = self._create(backend_id, {k: v for k, v in spec.public().items() if k in PUBLIC_MODEL_FIELDS})
                if record is None:  # another of this orchestrator's processes registered it a moment before and
                    created = False  # starts it: this configure waits for it (wait_ready), as for any start elsewhere
                    record = self.registry.get(backend_id)
                if record is None:
                    raise Conflict(f"backend {backend_id} was created and removed again while this configure "
                                   "waited for it", "Send the configure again.")
            elif not self.starting_elsewhere(record) and not self.driver.is_running(record):
                if record.state == "sleeping":
                    record.wakes += 1
                    self.fleet.events["wake"] += 1
                self.start(record)  # asleep, or down and waiting for its backoff: a configure is reason enough
            try:
                self.wait_ready(record)
                status, answer = self._send_configure(record, raw)
            except BackendError:
                if created:
                    self.remove(record)
                raise
            if status < 300:
                record.model = {**record.model, "pipeline": pipeline.config() if pipeline else None}
                record.idle_stop_s, record.always_on = spec.idle_stop_s, spec.always_on
                record.configured_at = time.time()
                record.state = "ready"
                record.failures = 0
                self.registry.put(record)
                if status == 200:  # loaded: what it holds now is what it adds (fleet.py)
                    self.fleet.note_loaded(record)
            elif created:
                self.remove(record)
            return record, status, answer, created

    def _check_slug_free(self, slug: str, backend_id: str) -> None:
        """Antenna keys pipelines by slug, and /process is routed by it: one backend per slug."""
        for record in self.registry.backends():
            taken = (record.model.get("pipeline") or {}).get("slug")
            if record.id != backend_id and taken == slug:
                raise Conflict(
                    f"the pipeline slug {slug!r} is taken by backend {record.id} ({record.model.get('model_uri')})",
                    'Give this model another: "pipeline": {"slug": "..."}; or DELETE /backends/<id> the other first.',
                )

    def _create(self, backend_id: str, model: dict[str, Any]) -> BackendRecord | None:
        """A backend for a new model: a warm spare when one is ready, else a fresh start; None where another
        process of this orchestrator registered it first (the registry decides, in one transaction)."""
        with self._create_lock:
            existing = self.registry.backends()
            if len(existing) >= self.settings.max_backends:
                raise Conflict(
                    f"the limit of {self.settings.max_backends} backends is reached",
                    "DELETE /backends/<id> one you no longer need, or raise MAX_BACKENDS.",
                    backends=[r.id for r in existing],
                )
            record = self._claim_spare(backend_id, model)
            if record is not None:
                return record
            record = self._new_record(backend_id, model, spare=False)
            if record is None:
                return None
        log.info("backend %s: new, for %s on port %s%s", backend_id, model.get("model_uri"), record.port,
                 f", GPU {record.gpu}" if record.gpu else "")
        try:
            self.start(record)
        except BackendError:  # no room within the memory budget: nothing is left behind
            self.registry.delete(record.id)
            raise
        return record

    def _new_record(self, backend_id: str, model: dict[str, Any], spare: bool) -> BackendRecord | None:
        record = BackendRecord(
            id=backend_id,
            model=model,
            driver=self.driver.name,
            port=0 if self.driver.name == "ray" else free_port(),  # a Ray backend's node picks its port
            model_dir=str((self.settings.backends_dir / backend_id / "model_dir").resolve()),
            token=secrets.token_urlsafe(24),
            gpu="" if self.driver.name == "ray" else assign_gpu(self.gpus, (r.gpu for r in self.registry.all())),
            spare=spare,
        )
        return record if self.registry.insert(record) else None

    def _claim_spare(self, backend_id: str, model: dict[str, Any]) -> BackendRecord | None:
        """Turn a ready, answering spare into this model's backend (same process, port and folder)."""
        for spare in self.registry.spares():
            lock = self.lock_for(spare.id)
            if not lock.acquire(blocking=False):
                continue  # the supervisor is looking at it
            try:
                if spare.state != "ready" or not self.driver.is_running(spare) or not self.healthy(spare, timeout=0.5):
                    continue
                spare_id = spare.id
                spare.id, spare.model, spare.spare = backend_id, model, False
                if not self.registry.rename(spare_id, spare):
                    continue  # another process of the orchestrator claimed it, or registered this model first
                log.info("backend %s: a warm spare on port %s, for %s", backend_id, spare.port, model.get("model_uri"))
                return spare
            finally:
                lock.release()
        return None

    def replenish_spares(self) -> None:
        """Keep WARM_SPARES spares started, within MAX_BACKENDS counting them; the supervisor calls this."""
        if self.driver.name == "ray":
            return  # a spare's node and GPUs would be chosen before its model is known
        with self._create_lock:
            spares, everything = self.registry.spares(), self.registry.all()
            if len(spares) >= self.settings.warm_spares or len(everything) >= self.settings.max_backends:
                return
            if not self.fleet.spare_fits():
                return  # a spare never puts a backend to sleep
            record = self._new_record(f"spare-{secrets.token_hex(4)}", {}, spare=True)
        if record is None:
            return  # (a random id taken: the next pass tries again)
        log.info("spare %s: starting on port %s", record.id, record.port)
        self.start(record)

    def start(self, record: BackendRecord) -> None:
        """Start (or restart) the backend; it restores its configuration from its MODEL_DIR itself."""
        if record.driver == "process" and not port_is_free(record.port):
            adopted = self._adoptable(record)
            if adopted:  # an earlier process of this orchestrator started it, and died before saying so
                log.warning("backend %s: adopting the backend already serving its port %d (%s)", record.id, record.port, adopted)
                record.handle = adopted
                record.state, record.started_at = "starting", time.time()
                self.registry.put(record)
                return
            record.port = free_port()  # someone took the port while it was down
        Path(record.model_dir).mkdir(parents=True, exist_ok=True)
        with self.fleet.room_for(record):  # OverBudget where it cannot fit even with the idle ones asleep
            record.handle = self.driver.start(record)
            record.state = "starting"
            record.started_at = time.time()
            self.registry.put(record)

    def _adoptable(self, record: BackendRecord) -> str:
        """``pid:starttime`` of the process on the record's port if it is this backend: it takes the record's
        own configure token, which only this orchestrator gave out; '' otherwise."""
        try:
            answer = self.http.get(f"{record.url}/configure", headers={"Authorization": f"Bearer {record.token}"}, timeout=2)
        except requests.RequestException:
            return ""
        pid = listening_pid(record.port) if answer.status_code == 200 and record.token else None
        return f"{pid}:{start_time(pid)}" if pid else ""

    def health(self, record: BackendRecord, timeout: float = 1.0) -> dict[str, Any] | None:
        """Its /health answer; None where it does not answer 200 with a JSON object."""
        try:
            response = self.http.get(f"{record.url}/health", timeout=timeout)
            answer = response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def healthy(self, record: BackendRecord, timeout: float = 1.0) -> bool:
        """It answers /health; a spare must also have finished its warm imports."""
        answer = self.health(record, timeout)
        return answer is not None and not (record.spare and answer.get("warming"))

    def starting_elsewhere(self, record: BackendRecord) -> bool:
        """Another process of this orchestrator (a gunicorn worker) is starting it: it is registered, and that
        process's driver has not answered with its handle yet (a template still importing takes seconds)."""
        return not record.handle and record.state == "starting" and time.time() - record.created_at < self.settings.start_timeout_s

    def wait_ready(self, record: BackendRecord) -> None:
        """Ask /health until it answers, the backend dies, cannot be placed, or the start deadline passes.

        Until its port listens, the port is tried every ``LISTEN_POLL_S`` (the driver asked every
        ``STARTED_CHECK_S`` whether it still runs): /health is then asked at once, and waits in the port's
        backlog until the worker takes it. A backend forked from the template listens ~15 ms after its start
        and answers ~10 ms later; asked every 50 ms, it was found answering only at the next ask, and a
        woken backend's first prediction came ~20 ms after its model was loaded."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        while self.starting_elsewhere(record) and time.monotonic() < deadline:
            time.sleep(0.05)
            fresh = self.registry.get(record.id)
            if fresh is None:
                break
            record.handle, record.port, record.state, record.started_at = (
                fresh.handle, fresh.port, fresh.state, fresh.started_at)
        listening = False
        while not self.healthy(record, timeout=0.5):
            pending = self.driver.pending_reason(record)
            if pending:
                record.state, record.last_error = "pending", pending
                self.registry.put(record)
                raise Conflict(
                    f"backend {record.id} cannot be placed on the Ray cluster: {pending}",
                    "Free what it needs (DELETE /backends/<id> of another), add a node that has it, "
                    'or configure this model with fewer GPUs ("gpus": 0).',
                )
            if not self.driver.is_running(record):
                reason = self.driver.exit_reason(record)
                record.last_error = reason
                self.registry.put(record)
                lines = self.driver.logs(record, 20)
                # Said here too: a backend that never started is removed with its folder and its log.
                log.error("backend %s did not start (%s); its log ends:\n%s", record.id, reason, "\n".join(lines))
                raise UpstreamUnavailable(
                    f"backend {record.id} did not start: {reason}",
                    "Its last log lines are below; GET /backends/<id> shows more.",
                    log=lines,
                )
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"backend {record.id} did not answer /health within {self.settings.start_timeout_s:g} s",
                    "Raise BACKEND_START_TIMEOUT_S, or read its log: GET /backends/<id>.",
                    log=self.driver.logs(record, 20),
                )
            if listening:  # and asked, but it did not answer yet (a spare still importing, a slow start)
                time.sleep(STARTED_CHECK_S)
            else:
                listening = _until_listening(record.host, record.port, STARTED_CHECK_S)
        if record.state != "ready":
            record.state = "ready"
            self.registry.put(record)

    def _send_configure(self, record: BackendRecord, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            response = self.http.post(
                f"{record.url}/configure",
                data=raw,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {record.token}"},
                timeout=(2.0, self.settings.configure_wait_s + 15.0),  # the backend answers 202 after its wait
            )
        except requests.RequestException as exc:
            raise UpstreamUnavailable(
                f"backend {record.id} did not take the configure: {exc}", "GET /backends/<id> shows its log."
            ) from exc
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": "the backend answered without JSON", "detail": response.text[:500]}
        return response.status_code, answer if isinstance(answer, dict) else {"answer": answer}

    # --- lifecycle -------------------------------------------------------------------------------

    def get(self, backend_id: str) -> BackendRecord:
        record = self.registry.get(backend_id)
        if record is None:
            raise NotFound(f"no backend {backend_id!r}", "GET /backends lists them; POST /configure starts one.")
        return record

    def describe(self, record: BackendRecord, log_lines: int = 20) -> dict[str, Any]:
        """The record, the backend's own /health when it answers, and its recent log."""
        body = record.public()
        body["health"] = self.health(record)
        if body["health"] and body["health"].get("training"):
            body["training"] = body["health"]["training"]  # its state and last outcome, at a glance
        body["log"] = self.driver.logs(record, log_lines)
        return body

    def remove(self, record: BackendRecord) -> None:
        """Stop it, free its port, delete its container and folder, and forget it."""
        self.driver.stop(record)
        self.driver.forget(record)
        shutil.rmtree(Path(record.model_dir).parent, ignore_errors=True)
        self.registry.delete(record.id)
        log.info("backend %s: removed", record.id)

    def delete(self, backend_id: str) -> BackendRecord:
        with self.lock_for(backend_id):
            record = self.get(backend_id)
            self.remove(record)
            record.state = "stopped"
            return record


def _until_listening(host: str, port: int, within_s: float) -> bool:
    """Whether ``host:port`` takes connections, tried every LISTEN_POLL_S for up to ``within_s``: a refused
    connect costs some 30 microseconds, an ask for /health a millisecond of this process's CPU. The connection
    is closed unused (the worker reads nothing from it and closes its end)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            socket.create_connection((host, port), timeout=within_s).close()
            return True
        except OSError:
            if time.monotonic() + LISTEN_POLL_S > deadline:
                return False
            time.sleep(LISTEN_POLL_S)
