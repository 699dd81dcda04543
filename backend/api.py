"""Label Studio's ML backend routes, plus configure, readiness and metrics, as one blueprint.

``/health`` and ``/setup`` never load or wait for a model: Label Studio gives them 1 s and 3 s.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .answers import predictions_answer
from .auth import require_basic_auth, require_configure_rights
from .batching import DynamicBatcher
from .datapoints import DatasourceRef
from .errors import BadRequest, NotFound
from .metrics import BackendMetrics
from .runtime import Runtime
from .settings import Settings
from .spec import ModelSpec, decode_configure_body, parse_model_spec
from .store import ConfigurationStore
from .taskdata import DagshubAccess, LabelStudioAccess, TaskDataFetcher
from .validation import data_objects, validate_predictions

api = Blueprint("backend", __name__)

OPEN_ENDPOINTS = {"backend.health", "backend.livez", "backend.readyz", "backend.webhook", "backend.configure"}


@dataclass
class Services:
    """What the routes stand on; one instance per app."""

    settings: Settings
    store: ConfigurationStore
    metrics: BackendMetrics
    runtime: Runtime
    fetcher: TaskDataFetcher
    batcher: DynamicBatcher
    warming: threading.Event = field(default_factory=threading.Event)  # set while WARM_IMPORTS run

    _label_studio_cache: tuple[int | None, dict[str, Any]] = (None, {})
    _label_studio_checked: float = float("-inf")

    def _stored_label_studio(self) -> dict[str, Any]:
        """label_studio.json, re-read only when its stamp changes, and stat'ed at most every STORE_POLL_S
        (a stat costs ~0.4 ms on sandboxed file systems: too much for every request)."""
        now = time.monotonic()
        if now - self._label_studio_checked < self.settings.store_poll_s:
            return self._label_studio_cache[1]
        self._label_studio_checked = now
        stamp = self.store.label_studio.stamp()
        cached_stamp, document = self._label_studio_cache
        if stamp != cached_stamp:
            document = self.store.label_studio.load() or {}
            self._label_studio_cache = (stamp, document)
        return document

    def label_studio_access(self) -> LabelStudioAccess:
        """The environment wins (it may know a better address than Label Studio's own); else /setup's."""
        stored = self._stored_label_studio()
        return LabelStudioAccess(
            url=self.settings.label_studio_url or str(stored.get("hostname") or "").rstrip("/"),
            token=self.settings.label_studio_api_key or str(stored.get("access_token") or ""),
        )

    def remember_label_studio(self, hostname: Any, token: Any) -> None:
        if not isinstance(hostname, str) or not isinstance(token, str) or not hostname or not token:
            return
        document = {"hostname": hostname.rstrip("/"), "access_token": token}
        if self._stored_label_studio() != document:
            self.store.label_studio.save(document)
            self._label_studio_checked = float("-inf")  # this worker reads its own write at once


def services() -> Services:
    return current_app.extensions["lsbackend"]


def json_body(*, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what was wrong with it."""
    raw = request.get_data()
    if not raw:
        if required:
            raise BadRequest("the request has no body", "Send a JSON object.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the request body is not valid JSON", str(exc)) from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", f"got {type(body).__name__}")
    return body


@api.before_app_request
def _before() -> None:
    g.started = time.perf_counter()
    s = services()
    if request.endpoint not in OPEN_ENDPOINTS:
        require_basic_auth(request, s.settings)
    if request.endpoint not in ("backend.health", "backend.livez", "backend.metrics"):
        s.runtime.follow_store()


@api.after_app_request
def _after(response: Response) -> Response:
    s = services()
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    s.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    if "started" in g:
        s.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - g.started)
    return response


def _status() -> dict[str, Any]:
    runtime = services().runtime
    active = runtime.active
    body: dict[str, Any] = {
        "status": "UP",
        "model_class": "MLflowBackend",
        "configured": active is not None,
        "loading": runtime.loading,
        "warming": services().warming.is_set(),
        "uptime_s": round(time.time() - runtime.started_at, 1),
    }
    if active is not None:
        body.update(active.describe())
    body["batching"] = services().batcher.describe(active.batch_size if active else None)
    if runtime.last_error:
        body["last_error"] = runtime.last_error
    return body


@api.get("/")
@api.get("/health")
def health():
    return jsonify(_status())


@api.get("/livez")
def livez():
    return jsonify({"status": "alive"})


@api.get("/readyz")
def readyz():
    body = _status()
    return jsonify(body), (200 if body["configured"] else 503)


@api.post("/setup")
def setup():
    s = services()
    body = json_body(required=False)
    s.remember_label_studio(body.get("hostname"), body.get("access_token"))
    active = s.runtime.active
    return jsonify({"model_version": active.model_version if active else "unconfigured"})


@api.get("/versions")
def versions():
    active = services().runtime.active
    return jsonify({"versions": [active.model_version] if active else []})


def dagshub_access(spec: ModelSpec) -> DagshubAccess | None:
    """DagsHub's host and token for a dagshub-form configure, with its datasource for datapoint lookups."""
    source = spec.dagshub
    if source is None:
        return None
    datasource = None
    if source.datasource_repo and source.datasource_name:
        datasource = DatasourceRef(source.host, source.datasource_repo, source.datasource_name, spec.tracking_password)
    return DagshubAccess(source.host, spec.tracking_password, datasource)


@api.post("/predict")
def predict():
    s = services()
    deadline = time.monotonic() + s.settings.predict_timeout_s
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects", f"got {type(tasks).__name__}")
    label_config = body.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        raise BadRequest("'label_config' is missing", "Label Studio sends the project's labeling config with each /predict.")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    objects = data_objects(label_config)
    if not objects:
        raise BadRequest("the labeling config reads no task data", "Its object tags need value=\"$key\" attributes.")
    model = s.runtime.require_model(wait_s=min(s.settings.configure_wait_s, s.settings.predict_timeout_s))
    if not tasks:
        return jsonify({"results": [], "model_version": model.model_version})

    timer = lambda stage, seconds: s.metrics.stage_seconds.labels(stage).observe(seconds)
    inputs = s.fetcher.start_tasks(tasks, objects, s.label_studio_access(), dagshub_access(model.spec))
    predictions = model.predict_tasks(tasks, inputs, params.get("context"), label_config, deadline, timer, s.batcher)
    timer("fetch", inputs.fetch_seconds)
    started = time.perf_counter()
    validate_predictions(predictions, tasks, label_config)
    timer("validate", time.perf_counter() - started)

    failed = [{"task": t.get("id"), "error": i.error} for t, i in zip(tasks, inputs) if i.error]
    s.metrics.predictions.inc(len(predictions))
    s.metrics.failed_tasks.inc(len(failed))
    return predictions_answer(predictions, tasks, model.model_version, failed)


@api.post("/webhook")
def webhook():
    body = json_body(required=False)
    action = body.get("action")
    return jsonify({"status": "ok", "action": action}), 201


@api.post("/configure")
def configure():
    s = services()
    require_configure_rights(request, s.settings)
    spec = parse_model_spec(decode_configure_body(request.get_data()))
    job = s.runtime.configure(spec)
    if job is not None:
        job.done.wait(s.settings.configure_wait_s)
        if not job.done.is_set():
            return jsonify({"status": "loading", **job.status(), "status_url": "/configure/status"}), 202
        if job.error is not None:
            raise job.error
    active = s.runtime.active
    if active is None or active.spec.digest != spec.digest:  # a newer configure won meanwhile
        return jsonify({"status": "superseded", "detail": "a later configure replaced this one"}), 409
    return jsonify({"status": "ready", **active.describe(), "configuration": active.spec.public()})


@api.get("/configure")
def configuration():
    s = services()
    require_configure_rights(request, s.settings)
    body = _status()
    active = s.runtime.active
    body["configuration"] = active.spec.public() if active else None
    return jsonify(body)


@api.get("/configure/status")
def configure_status():
    job = services().runtime.job
    if job is None:
        raise NotFound("no configure has been started", "POST /configure first.")
    return jsonify(job.status())


@api.get("/metrics")
def metrics():
    m = services().metrics
    return Response(m.render(), mimetype=m.content_type)
