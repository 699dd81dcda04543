"""The orchestrator's routes: the backend's front door (configure), the backends' lifecycle, and
Label Studio's routes forwarded to the newest backend (``/predict``) or a chosen one (``/models/<id>/predict``).
Antenna's routes, by pipeline slug, are in ``antenna``."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from backend.core.errors import BadRequest, DeadlineExceeded, NotConfigured, NotFound, UpstreamUnavailable
from backend.model.hookcodec import RUNTIME
from backend.web.auth import require_basic_auth, require_configure_rights, require_training_rights

from .manager import BackendManager
from .metrics import OrchestratorMetrics
from .proxy import Proxy
from .registry import BackendRecord
from .settings import OrchestratorSettings
from .supervisor import Supervisor

api = Blueprint("orchestrator", __name__)

HEALTH_TIMEOUT_S = 0.8  # inside Label Studio's 1 s for /health
# Label Studio's calls at the root, sent to the most recently configured backend.
LABEL_STUDIO_ROUTES = (
    "setup",
    "predict",
    "webhook",
    "versions",
    "train",
    "job_status",
    "validate",
    "delete",
    "duplicate_model",
)
# A backend's routes that need configure rights, reachable through the orchestrator with its own.
CONFIGURE_RIGHTS_ROUTES = ("train/status", "configure/status")
# Routes that start trainings: the orchestrator's basic auth, webhook secret or configure token (backend/web/auth.py).
TRAINING_ROUTES = ("train", "webhook")
# Routes whose backend holds the request until its model is loaded: waking it for one, the orchestrator
# sends it on once the backend answers, without waiting for the restore itself (fewer polls of /health).
WAIT_FOR_THEIR_MODEL = ("predict",)
# Label Studio sends no credentials to the webhook it creates; health and Antenna's probes are public too.
OPEN_ENDPOINTS = {"orchestrator.configure", "orchestrator.delete_backend", "orchestrator.root_health",
                  "antenna.livez", "antenna.readyz"}


@dataclass
class Orchestrator:
    """What the routes stand on; one per app."""

    settings: OrchestratorSettings
    manager: BackendManager
    proxy: Proxy
    supervisor: Supervisor
    metrics: OrchestratorMetrics


def orchestrator() -> Orchestrator:
    return current_app.extensions["orchestrator"]


def _urls(record: BackendRecord) -> dict[str, str]:
    base = request.host_url
    return {"url": record.url, "label_studio_url": f"{base}models/{record.id}/", "root_url": base}


@api.before_app_request
def _before() -> None:
    if request.endpoint not in OPEN_ENDPOINTS and not _is_webhook():
        require_basic_auth(request, orchestrator().settings)


def _is_webhook() -> bool:
    args = request.view_args or {}
    return (args.get("path") or args.get("route") or "").strip("/") == "webhook"


@api.post("/configure")
def configure():
    """Start or reconfigure the model's backend; its answer passes through."""
    o = orchestrator()
    require_configure_rights(request, o.settings)
    record, status, answer, created = o.manager.configure(request.get_data())
    if status >= 300:  # the backend's own error, unchanged, with the backend it came from
        return jsonify({**answer, "backend_id": record.id, "backend_kept": not created}), status
    body = {"id": record.id, "state": record.state, "created": created, **_urls(record), "backend": answer}
    if status == 202:  # still loading: its status, through the orchestrator
        body["status_url"] = f"{request.host_url}models/{record.id}/configure/status"
    return jsonify(body), status


@api.get("/backends")
def list_backends():
    """Every backend: state, model, URL, uptime, restarts, last error, which is newest."""
    o = orchestrator()
    newest = o.manager.registry.newest_configured()
    fleet = o.manager.fleet
    fleet.measure()
    return jsonify(
        {
            "backends": [{**r.public(), **fleet.describe(r), **_urls(r)} for r in o.manager.registry.backends()],
            "spares": [{"id": r.id, "state": r.state, "port": r.port} for r in o.manager.registry.spares()],
            "newest": newest.id if newest else None,
            "driver": o.manager.driver.name,
            "max_backends": o.settings.max_backends,
            "memory": fleet.summary(),
        }
    )


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics: backends by state, memory against the budget, wakes and sleeps."""
    o = orchestrator()
    return Response(o.metrics.render(), content_type=o.metrics.content_type)


@api.get("/backends/<backend_id>")
def get_backend(backend_id: str):
    """One backend, with its own /health and its last log lines (?log_lines=50)."""
    o = orchestrator()
    record = o.manager.get(backend_id)
    lines = request.args.get("log_lines", "20")
    if not lines.isdigit():
        raise BadRequest("log_lines must be a whole number", f"got {lines!r}")
    return jsonify({**o.manager.describe(record, min(int(lines), 1000)), **_urls(record)})


@api.delete("/backends/<backend_id>")
def delete_backend(backend_id: str):
    """Stop a backend, free its port, remove its container and folder, forget it."""
    o = orchestrator()
    require_configure_rights(request, o.settings)
    record = o.manager.delete(backend_id)
    return jsonify({"id": record.id, "state": "deleted", "port_freed": record.port})


@api.route("/models/<backend_id>/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@api.route("/models/<backend_id>/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def model_route(backend_id: str, path: str) -> Response:
    """Any route of one backend (Label Studio's ML backend URL for that model)."""
    o = orchestrator()
    record = o.manager.get(backend_id)
    if path.strip("/").startswith("configure") and not (request.method == "GET" and path.strip("/") == "configure/status"):
        raise NotFound("configure goes through the orchestrator", "POST /configure; the model picks the backend.")
    return _forward(record, path)


def _forward(record: BackendRecord, path: str) -> Response:
    """To the backend; its routes that need configure rights (training) need the orchestrator's, and then
    carry the backend's own token, which only the orchestrator knows."""
    o = orchestrator()
    route = path.strip("/")
    if route in ("", "health") and request.method == "GET":
        return _backend_health(record)
    setup_key = _setup_key() if route == "setup" else ""  # read before the proxy takes the body
    if setup_key and record.state == "sleeping" and setup_key == record.setup_key:
        return jsonify({"model_version": record.model_version or "unconfigured"})  # nothing new for it to remember
    if route in CONFIGURE_RIGHTS_ROUTES or route in TRAINING_ROUTES:
        if route in TRAINING_ROUTES:
            require_training_rights(request, o.settings, route)
        else:
            require_configure_rights(request, o.settings, route)
        return send(record, path, authorization=f"Bearer {record.token}" if record.token else None)
    response = send(record, path)
    if setup_key and response.status_code == 200 and setup_key != record.setup_key:
        o.manager.registry.update(record.id, setup_key=setup_key)  # a sleeping backend's /setup is answered here
    return response


def send(record: BackendRecord, path: str, authorization: str | None = None, timeout_s: float | None = None) -> Response:
    """A request to the backend, waking it first where it sleeps (in its turn: ``turns``, given back once the
    answer has come, as the model's load and first prediction are part of the wake); while it is on its way
    the backend is not idle."""
    o = orchestrator()
    fleet = o.manager.fleet
    woke_s = 0.0
    waits_itself = path.strip("/") in WAIT_FOR_THEIR_MODEL
    with fleet.turns.turn() as turn:
        if _wakes(record):
            began = time.monotonic()
            record = fleet.wake(record, until_restored=not waits_itself, turn=turn)
            woke_s = time.monotonic() - began
        fleet.begin(record.id)
        try:
            try:
                response = o.proxy.forward(record, path, request, authorization=authorization, timeout_s=timeout_s)
            except UpstreamUnavailable:
                current = o.manager.registry.get(record.id)
                then = _after_unanswered(record, current)
                if current is None or not then:
                    raise
                if then == "wake":
                    began = time.monotonic()
                    current = fleet.wake(current, until_restored=not waits_itself, turn=turn)
                    woke_s += time.monotonic() - began
                response = o.proxy.forward(current, path, request, authorization=authorization, timeout_s=timeout_s)
        except BaseException:
            fleet.end(record.id)
            raise
    response.call_on_close(lambda: fleet.end(record.id))
    if woke_s:
        response.headers["X-Backend-Woke-S"] = f"{woke_s:.3f}"  # this request waited for the backend to wake
    return response


def _after_unanswered(sent: BackendRecord, current: BackendRecord | None) -> str:
    """What a request whose backend did not answer does next, by its record now: ``wake`` where it was put to
    sleep on the way (between the look at its state and the request) or another request is waking it;
    ``resend`` where it has been put to sleep and woken again meanwhile, or renewed (another process, which
    the one that did not answer was not); '' where the same process did not answer: the 502 stands."""
    if current is None:
        return ""
    if _wakes(current):
        return "wake"
    return "resend" if current.state == "ready" and current.handle and current.handle != sent.handle else ""


def _wakes(record: BackendRecord) -> bool:
    """Asleep, or started by a request that is waking it: a request then waits for it (``Fleet.wake``)."""
    return record.state == "sleeping" or (record.state == "starting" and bool(record.handle))


def _setup_key() -> str:
    """Which Label Studio and token a /setup names (a digest: the registry holds no secret)."""
    body = request.get_json(silent=True, cache=True)
    body = body if isinstance(body, dict) else {}
    named = f"{body.get('hostname') or ''}\0{body.get('access_token') or ''}"
    return hashlib.sha256(named.encode()).hexdigest()[:24]


def _backend_health(record: BackendRecord) -> Response:
    """Label Studio's health check of one backend (1 s): its own answer; while it sleeps, the orchestrator's
    from its record, without waking it; while it restarts, UP and not configured, so that Label Studio
    does not mark the model as failed."""
    o = orchestrator()
    if record.state == "sleeping":
        return jsonify({"status": "UP", "model_class": "MLflowBackend", "configured": True, "sleeping": True,
                        "model_version": record.model_version, "backend": record.id, "backend_state": record.state,
                        "detail": "asleep after no request for a while: the next request wakes it"})
    try:
        return o.proxy.forward(record, "health", request, timeout_s=HEALTH_TIMEOUT_S)
    except (UpstreamUnavailable, DeadlineExceeded) as exc:
        return jsonify({"status": "UP", "model_class": "orchestrator", "configured": False, "backend": record.id,
                        "backend_state": record.state, "detail": exc.error})


def _newest() -> BackendRecord:
    record = orchestrator().manager.registry.newest_configured()
    if record is None:
        raise NotConfigured(
            "no model is configured yet", "POST /configure (or run ds.add_annotation_model from the dagshub client)."
        )
    return record


@api.get("/")
@api.get("/health")
def root_health():
    """Label Studio's health check: the newest backend's answer, or the orchestrator's own before any."""
    record = orchestrator().manager.registry.newest_configured()
    if record is None:
        body: dict[str, Any] = {"status": "UP", "model_class": "orchestrator", "configured": False, "backends": 0}
        if orchestrator().manager.driver.name == "process":  # its backends run this Python
            body["runtime"] = RUNTIME
        return jsonify(body)
    return _backend_health(record)


@api.route(f"/<any({', '.join(LABEL_STUDIO_ROUTES)}):route>", methods=["GET", "POST"])
def root_route(route: str) -> Response:
    """Label Studio's routes at the root, forwarded to the newest backend."""
    return _forward(_newest(), route)
