"""Label Studio's ML backend routes, plus configure, health and metrics, as one blueprint (Antenna's are in ``antenna``).

``/health``, ``/setup`` and ``/webhook`` never load or wait for a model: Label Studio gives them 1 s
and 3 s (and drops webhooks after about one), and the gunicorn worker (``worker``) serves them from
threads of their own, so a busy or stalled request never holds them up.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from backend.config.antenna_pipeline import define_pipeline
from backend.config.spec import decode_configure_body, parse_model_spec
from backend.core.errors import BackendError, BadRequest, NotFound
from backend.core.metrics import BackendMetrics
from backend.core.redact import redact
from backend.core.settings import Settings
from backend.core.ticker import Ticker
from backend.isolation.zygote import Zygote
from backend.labeling.answers import prediction_json, predictions_answer
from backend.labeling.validation import data_objects
from backend.model.hookcodec import RUNTIME
from backend.quality.ledger import QualityLedger
from backend.quality.webhooks import WebhookRecorder
from backend.serving.continuation import CACHE_FILE, Predictions, task_keys
from backend.serving.follower import RegistryFollower
from backend.serving.prediction import Outcome, predict_tasks, recall
from backend.serving.push import Pusher
from backend.serving.repeats import RepeatedClicks, click_key
from backend.serving.runtime import Runtime
from backend.state.store import ConfigurationStore, StoredFileBroken
from backend.tasks.fetcher import TaskDataFetcher, dagshub_access
from backend.tasks.labelstudio import LabelStudioAccess, access_for
from backend.training.trainer import Trainer
from backend.web.auth import require_basic_auth, require_configure_rights, require_training_rights
from backend.web.bodies import json_body

log = logging.getLogger(__name__)
api = Blueprint("backend", __name__)

# Checked by their own rules (auth.py): /webhook and /train start trainings, /configure runs code.
OPEN_ENDPOINTS = {"backend.health", "antenna.livez", "antenna.readyz", "backend.webhook", "backend.configure",
                  "backend.train"}


@dataclass
class Services:
    """What the routes stand on; one instance per app."""

    settings: Settings
    store: ConfigurationStore
    metrics: BackendMetrics
    runtime: Runtime
    fetcher: TaskDataFetcher
    cache: Predictions
    webhooks: WebhookRecorder
    zygote: Zygote
    owns_zygote: bool = True
    quality: QualityLedger | None = None
    follower: RegistryFollower | None = None
    trainer: Trainer | None = None
    ticker: Ticker | None = None
    pusher: Pusher | None = None
    repeats: RepeatedClicks = field(default_factory=lambda: RepeatedClicks(0.0))

    _label_studio_cache: tuple[int | None, dict[str, Any]] = (None, {})
    _label_studio_checked: float = float("-inf")
    _closed: bool = False

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
            try:
                document = self.store.label_studio.load() or {}
            except StoredFileBroken as exc:
                log.error("%s; %s", exc, exc.fix)
                document = {}
            self._label_studio_cache = (stamp, document)
        return document

    def label_studio_access(self) -> LabelStudioAccess:
        stored = self._stored_label_studio()
        return access_for(
            self.settings.label_studio_url,
            self.settings.label_studio_api_key,
            str(stored.get("hostname") or "").rstrip("/"),
            str(stored.get("access_token") or ""),
        )

    def remember_label_studio(self, hostname: Any, token: Any) -> None:
        if not isinstance(hostname, str) or not isinstance(token, str) or not hostname or not token:
            return
        if not hostname.startswith(("http://", "https://")):
            return
        document = {"hostname": hostname.rstrip("/"), "access_token": token}
        if self._stored_label_studio() != document:
            self.store.label_studio.save(document)
            self._label_studio_checked = float("-inf")  # this worker reads its own write at once

    def close(self) -> None:
        """Stop the ticker, the trainings this worker started, the model processes (and the zygote, if this app
        started it), and keep what the next start takes up. Once: the worker calls it as it ends (a backend
        forked from the template leaves with ``os._exit``, which runs no atexit handler), and atexit again."""
        if self._closed:
            return
        self._closed = True
        if self.ticker is not None:
            self.ticker.stop()
        if self.trainer is not None:
            self.trainer.close()
        if self.pusher is not None:
            self.pusher.stop()
        self.runtime.close()
        self.fetcher.close()
        # Stopped to sleep (orchestrator/fleet.py) or restarted: what was finished is there at the next start.
        try:
            self.cache.save(self.settings.model_dir / CACHE_FILE)
            if self.quality is not None:
                self.quality.flush()
        except (OSError, sqlite3.Error) as exc:  # MODEL_DIR full or gone: the next start computes them again
            log.warning("could not keep the prediction cache or the quality ledger's last notes: %s", exc)
        if self.owns_zygote:
            self.zygote.close()


def services() -> Services:
    return current_app.extensions["lsbackend"]


def close_services(app: Any) -> None:
    """``Services.close`` of an app of ours (anything else, as a test's WSGI app, is left alone)."""
    found = getattr(app, "extensions", {}).get("lsbackend")
    if isinstance(found, Services):
        found.close()


@api.before_app_request
def _before() -> None:
    g.started = time.perf_counter()
    s = services()
    if request.endpoint not in OPEN_ENDPOINTS:
        require_basic_auth(request, s.settings)
    if request.endpoint not in ("backend.health", "antenna.livez", "backend.core.metrics", "backend.webhook"):
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
    s = services()
    runtime = s.runtime
    active = runtime.active
    body: dict[str, Any] = {
        "status": "UP",
        "model_class": "MLflowBackend",
        "configured": active is not None,
        "loading": runtime.loading,
        "warming": not s.zygote.warmed.is_set(),
        "uptime_s": round(time.time() - runtime.started_at, 1),
        "pid": os.getpid(),
        "runtime": RUNTIME,  # what pickled hooks must be made with
    }
    if active is not None:
        body.update(active.describe())
        pipeline = define_pipeline(active.spec)
        if pipeline is not None:
            body["antenna_pipeline"] = pipeline.slug
        body["batching"] = active.batcher.describe(active.batch_size)
        body["background"] = active.continuation.describe()
    else:
        body["batching"] = {"enabled": s.settings.batching, "max_latency_ms": s.settings.max_latency_ms}
    body["prediction_cache"] = s.cache.describe()
    body["task_data_cache"] = s.fetcher.cache.describe()
    body["label_studio"] = s.label_studio_access().describe()
    if s.pusher is not None:
        body["push"] = s.pusher.describe()
    body["webhooks"] = s.webhooks.describe()
    training = s.trainer.describe() if s.trainer else None
    if training is not None:
        body["training"] = training
    registry = s.follower.describe() if s.follower else None
    if registry is not None:
        body["registry"] = registry
    quality = s.quality.summary() if s.quality else {}
    if quality:
        body["prediction_quality"] = quality
    if s.zygote.warm_errors:  # WARM_IMPORTS that failed: those model processes import them on their own
        body["warm_import_errors"] = s.zygote.warm_errors
    if runtime.stored_error:
        body["stored_configuration_error"] = runtime.stored_error
    if runtime.last_error:
        body["last_error"] = runtime.last_error
    return body


@api.get("/")
@api.get("/health")
def health():
    """Label Studio's health check (it allows 1 s): status, what serves, the model process, caches, training."""
    return jsonify(_status())


@api.post("/setup")
def setup():
    """Label Studio connecting a project: the model version it will store predictions under."""
    s = services()
    body = json_body(required=False)
    s.remember_label_studio(body.get("hostname"), body.get("access_token"))
    active = s.runtime.active
    return jsonify({"model_version": active.model_version if active else "unconfigured"})


@api.get("/versions")
def versions():
    """The model versions this backend can name (the serving one)."""
    active = services().runtime.active
    return jsonify({"versions": [active.model_version] if active else []})


@api.post("/predict")
def predict():
    """Predictions for Label Studio's tasks, one per task, validated against the labeling config, by the deadline."""
    s = services()
    began, deadline = time.time(), time.monotonic() + s.settings.predict_timeout_s
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects", f"got {type(tasks).__name__}")
    label_config = body.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        raise BadRequest("'label_config' is missing", "Label Studio sends the project's labeling config with each /predict.")
    raw_params = body.get("params")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    objects = data_objects(label_config)
    if not objects:
        raise BadRequest("the labeling config reads no task data", "Its object tags need value=\"$key\" attributes.")
    timer = lambda stage, seconds: s.metrics.stage_seconds.labels(stage).observe(seconds)
    context = params.get("context")

    def run(serving: Any) -> tuple[Any, Outcome]:
        recalled = recall(serving, s.cache, tasks, label_config, deadline, context)  # what earlier rounds left
        inputs = s.fetcher.start_tasks(tasks, objects, s.label_studio_access(), dagshub_access(serving.spec),
                                       skip=recalled.known if recalled else frozenset())
        outcome = predict_tasks(serving, tasks, inputs, label_config=label_config, deadline=deadline,
                                recalled=recalled, context=context, timer=timer, background=s.settings.background)
        timer("fetch", inputs.fetch_seconds)
        return serving, outcome

    wait_s = min(s.settings.configure_wait_s, s.settings.predict_timeout_s)  # a configure's load: as a configure waits
    if s.runtime.restoring:  # just started (woken, say): nothing serves until the stored configuration is loaded
        wait_s = deadline - time.monotonic()
    if not tasks:
        return jsonify({"results": [], "model_version": s.runtime.require_model(wait_s).model_version})
    if context is None:
        return _predictions(s, tasks, label_config, context, began, s.runtime.serve(wait_s, run))
    # A click: the same one sent again (Label Studio does on Submit) is answered once.
    active = s.runtime.require_model(wait_s)
    key = click_key(f"{active.hooks_id}|{active.identity}", label_config, tasks, context)
    answer, repeated = s.repeats.once(
        key, lambda: _predictions(s, tasks, label_config, context, began, s.runtime.serve(wait_s, run)).get_data())
    if repeated:
        s.metrics.interactive_repeats.inc()
    return current_app.response_class(answer, mimetype="application/json")


def _predictions(s: Services, tasks: list[dict[str, Any]], label_config: str, context: Any, began: float,
                 done: tuple[Any, Outcome]) -> Response:
    """The answer to a /predict: what the push already stores withheld, the rest validated and encoded."""
    serving, outcome = done
    if s.pusher is not None and context is None:  # what the push has sent, or sends now, Label Studio must not store twice
        answered = [i for i, item in enumerate(outcome.items) if item is not None]
        try:
            withheld = s.pusher.outbox.reconcile([tasks[i].get("id") for i in answered], serving.model_version, began)
        except sqlite3.Error as exc:  # MODEL_DIR full or broken: answer all, as without the push
            log.warning("the push's outbox could not be read (%s): answering every finished task", exc)
            withheld = set()
        for i in answered:
            if tasks[i].get("id") in withheld:
                outcome.items[i] = None

    handed: set[int] = set()
    if outcome.left and s.pusher is not None and context is None:  # past the deadline: the push stores it all, in bulk
        encoded = {i: item if isinstance(item, str) else prediction_json(item, tasks[i], i)
                   for i, item in enumerate(outcome.items) if item is not None}
        handed = s.pusher.hand_over(tasks, encoded, serving.model_version)
        if handed:  # and to the cache, as the background's are: a round pressed before the push ends predicts none again
            keys = task_keys(serving.identity, label_config, tasks)
            s.cache.settle([(keys[i], encoded[i]) for i in handed])
        for i in handed:
            outcome.items[i] = None

    extra: dict[str, Any] = {}
    if outcome.errors:
        extra["errors"] = [{"task": tasks[i].get("id"), "error": redact(message)} for i, message in sorted(outcome.errors.items())]
    if outcome.left:
        extra["pending"] = _pending(serving, len(tasks), outcome.left, len(handed))
        s.metrics.partial_answers.inc()
    s.metrics.predictions.inc(sum(1 for item in outcome.items if item is not None))
    s.metrics.failed_tasks.inc(len(outcome.errors))
    s.metrics.cached_predictions.inc(outcome.from_cache)
    keep = None if s.quality is None else partial(s.quality.note_predictions, tasks, model_version=serving.model_version)
    return predictions_answer(outcome.items, tasks, serving.model_version, extra, on_encoded=keep)


def _pending(serving: Any, total: int, left: int, handed: int) -> dict[str, Any]:
    """What an answer at the deadline says about the rest, and the log line that tells the user."""
    s = services()
    progress = serving.continuation.describe()
    rate, timeout = progress["rate_per_s"], s.settings.predict_timeout_s
    eta = progress.get("eta_s")
    if handed or (s.pusher is not None and not s.pusher.why_off()):
        log.warning("%d of %d tasks done at the %g s deadline, %d go on in the background; all are written into Label "
                    "Studio as they finish%s: no need to press 'Retrieve predictions' again",
                    total - left, total, timeout, left, f" (~{rate:.1f} tasks/s, done in ~{eta:.0f} s)" if eta else "")
        return {"tasks": left, "eta_s": eta, "rounds_if_pressed_now": 0, "pushed": handed + left,
                "detail": "These tasks are written into Label Studio as they finish (GET /health: push)."}
    rounds = math.ceil(progress["queued"] / (rate * timeout)) if rate else None
    log.warning(
        "answered %d of %d tasks before the %g s deadline; %d go on in the background%s. Press 'Retrieve predictions' "
        "again to store them%s",
        total - left, total, timeout, left,
        f" (~{rate:.1f} tasks/s, done in ~{eta:.0f} s)" if eta else "",
        f": about {rounds} more round(s) if pressed now, one if pressed after that" if rounds else "",
    )
    return {"tasks": left, "eta_s": eta, "rounds_if_pressed_now": rounds,
            "detail": "These tasks go on in the background; retrieve predictions again to store them."}


@api.post("/webhook")
def webhook():
    """Label Studio's project events: annotations (for agreement and automatic training) and START_TRAINING."""
    s = services()
    require_training_rights(request, s.settings, "the webhook")
    body = json_body(required=False)
    noted = s.webhooks.record(body)
    s.metrics.webhook_events.labels(noted["action"]).inc()
    answer: dict[str, Any] = {"status": "ok", **noted}
    try:  # a few file writes at most: Label Studio drops the event after about a second
        if s.quality is not None:
            s.quality.on_annotation(body)
        if s.trainer is not None:
            answer.update(s.trainer.on_webhook(body))
    except BackendError as exc:  # never a 5xx: Label Studio would mark the backend as failed
        answer["training_error"] = exc.to_dict()
    except Exception as exc:
        log.exception("handling %s for training failed", noted["action"])
        answer["training_error"] = {"error": f"{type(exc).__name__}: {exc}"}
    return jsonify(answer), 201


def _trainer(s: Services) -> Trainer:
    if s.trainer is None:  # set by create_app; absent only in a Services made by hand
        raise NotFound("this backend does not train", "Create it with backend.app.create_app.")
    return s.trainer


@api.post("/train")
def train():
    """Start a training by hand; also takes Label Studio's legacy /train body, which carries the annotated tasks."""
    s = services()
    require_training_rights(request, s.settings, "train")
    body = json_body(required=False)
    tasks = body.get("annotations", body.get("tasks"))
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks)):
        raise BadRequest("'tasks' must be a list of Label Studio tasks with their annotations", f"got {type(tasks).__name__}")
    project = body.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, str) and "." in project:  # Label Studio's "<id>.<created timestamp>"
        project = project.split(".", 1)[0]
    if project is None:
        raise BadRequest("'project' is missing", "Name the Label Studio project whose annotations to train on: {\"project\": 7}.")
    if isinstance(project, bool) or not (isinstance(project, int) or (isinstance(project, str) and project.isdigit())):
        raise BadRequest("'project' must be a Label Studio project id", f"got {project!r}; send e.g. {{\"project\": 7}}.")
    raw_config = body.get("label_config")
    label_config = raw_config if isinstance(raw_config, str) else ""
    answer = _trainer(s).request("POST /train", str(project), label_config, tasks=tasks)
    return jsonify({"status": answer.get("training"), **answer}), 201


@api.get("/train/status")
def train_status():
    """The current training and the recent ones: stage, run, version, gate, outcome."""
    s = services()
    require_configure_rights(request, s.settings)
    return jsonify(_trainer(s).status())


@api.post("/configure")
def configure():
    """Serve a model with these hooks: 200 once it serves, 202 with a status URL while it loads."""
    s = services()
    require_configure_rights(request, s.settings)
    spec = parse_model_spec(decode_configure_body(request.get_data()))
    job = s.runtime.configure(spec)
    if job is not None:
        job.settled.wait(s.settings.configure_wait_s)
        if not job.settled.is_set():
            return jsonify({"status": "loading", **job.status(), "status_url": "/configure/status"}), 202
        if job.error is not None and not job.superseded:
            raise job.error
    active = s.runtime.active
    if active is None or active.spec.digest != spec.digest:  # a newer configure won meanwhile: coalesced into it
        serving = {"model_uri": active.spec.model_uri, "model_version": active.model_version} if active else None
        return jsonify({"status": "superseded", "detail": "a later configure replaced this one", "serving": serving}), 409
    return jsonify({"status": "ready", **active.describe(), "configuration": active.spec.public()})


@api.get("/configure")
def configuration():
    """What is configured, credentials redacted."""
    s = services()
    require_configure_rights(request, s.settings)
    body = _status()
    active = s.runtime.active
    body["configuration"] = active.spec.public() if active else None
    return jsonify(body)


@api.get("/configure/status")
def configure_status():
    """How the latest configure's load is going (the 202's status URL)."""
    s = services()
    require_configure_rights(request, s.settings, "configure status")
    job = s.runtime.job
    if job is None:
        raise NotFound("no configure has been started", "POST /configure first.")
    return jsonify(job.status())


@api.get("/metrics")
def metrics():
    """Prometheus metrics."""
    s = services()
    m = s.metrics
    active = s.runtime.active
    if active is not None:
        progress = active.continuation.describe()
        m.background_tasks.labels("queued").set(progress["queued"])
        m.background_tasks.labels("done").set(progress["done"])
        m.background_tasks.labels("failed").set(progress["failed"])
        m.background_eta_seconds.set(progress.get("eta_s") or 0)
        m.model_process_restarts.set(active.process.restarts)
    if s.pusher is not None:
        for project, counts in s.pusher.outbox.progress().items():
            for state in ("stored", "left", "failed"):
                m.push_tasks.labels(str(project), state).set(counts[state])
    return Response(m.render(), mimetype=m.content_type)

