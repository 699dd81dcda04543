"""The backend's application factory: settings, state and routes wired once per app, never at import."""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping
from typing import ClassVar

from flask import Flask

from backend.antenna.routes import antenna
from backend.core.errors import register_error_handlers
from backend.core.metrics import BackendMetrics
from backend.core.redact import SECRETS, install_log_redaction
from backend.core.settings import Settings
from backend.core.ticker import Ticker
from backend.isolation.zygote import Zygote
from backend.labeling.answers import PlainValuesJSONProvider
from backend.labeling.validation import data_objects
from backend.quality.ledger import QualityLedger
from backend.quality.webhooks import WebhookLog, WebhookRecorder
from backend.serving.batching import DynamicBatcher
from backend.serving.continuation import CACHE_FILE, Continuation, PredictionCache, Predictions
from backend.serving.follower import RegistryFollower
from backend.serving.prediction import finish_outputs, resume
from backend.serving.push import SCHEMA as PUSH_SCHEMA
from backend.serving.push import Outbox, Pusher
from backend.serving.repeats import RepeatedClicks
from backend.serving.runtime import Runtime, Serving
from backend.serving.shared import FILE_NAME, SCHEMA, SharedPredictions, SharedWebhookLog
from backend.state.sqlitedb import SharedDb
from backend.state.store import ConfigurationStore
from backend.state.training_records import TrainingRecords
from backend.tasks.fetcher import TaskDataFetcher, dagshub_access, fetch_limits
from backend.tasks.labelstudio import LabelStudioAuth
from backend.training.trainer import Trainer
from backend.web.api import Services, api
from backend.web.api import services as current_services

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, env: Mapping[str, str] | None = None, zygote: Zygote | None = None) -> Flask:
    """Build a backend; restores the configuration stored under MODEL_DIR in the background.

    ``zygote``: the fork server model processes come from; by default the app starts its own (tests
    share one across apps, which is what keeps an in-process test from importing MLflow again).
    """
    settings = settings or Settings.from_env(env)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    SECRETS.add(*settings.secrets)
    install_log_redaction()
    routed = PreparedRoutes.take()
    app = routed or Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    metrics = BackendMetrics()
    store = ConfigurationStore(settings.model_dir)
    cache, webhooks = _worker_state(settings)
    owns_zygote = zygote is None
    zygote = zygote or Zygote(settings.warm_imports, template=settings.template, model_dir=settings.model_dir).start()

    def on_loaded(serving: Serving) -> None:
        metrics.model_loaded.set(1)
        metrics.model_load_seconds.set(float(serving.info.get("load_seconds", 0.0)))
        resume_waiting(serving)

    def resume_waiting(serving: Serving) -> None:
        """What the background had not finished when this backend last stopped goes on (the push's outbox kept it)."""
        if settings.background:
            for label_config, tasks in pusher.outbox.waiting(serving.model_version):
                inputs = services.fetcher.start_tasks(tasks, data_objects(label_config), services.label_studio_access(),
                                                      dagshub_access(serving.spec))
                taken = resume(serving, tasks, inputs, label_config)
                log.info("resumed %d of %d task(s) the background had not finished before the restart", taken, len(tasks))

    def make_continuation(*, hooks_id: str, identity: str, model_version: str, batch_size: int,
                          batcher: DynamicBatcher) -> Continuation:
        cache.keep_only(identity)
        pusher.serve(model_version)
        return Continuation(
            batcher, cache, hooks_id, batch_size, finish_outputs(model_version),
            settings.background_max_tasks, on_progress=lambda state, n: metrics.background_tasks.labels(state).set(n),
            on_adopt=lambda tasks, label_config: pusher.remember(tasks, label_config, model_version),
            on_done=lambda task, encoded: pusher.offer(task, encoded, model_version),
            on_failed=lambda task, reason: pusher.failed(task, reason, model_version),
        )

    limits = fetch_limits(settings)
    label_studio_auth = LabelStudioAuth()
    runtime = Runtime(settings, store, zygote, make_continuation, on_loaded=on_loaded)
    records = TrainingRecords(settings.model_dir)
    quality = QualityLedger(settings.model_dir / "quality.sqlite")
    follower = RegistryFollower(settings, runtime, records, metrics)
    services = Services(
        settings=settings,
        store=store,
        metrics=metrics,
        runtime=runtime,
        fetcher=TaskDataFetcher(
            store.cache_dir, settings.fetch_concurrency, limits, cache_max_bytes=settings.cache_max_bytes,
            label_studio_auth=label_studio_auth,
        ),
        cache=cache,
        webhooks=webhooks,
        zygote=zygote,
        owns_zygote=owns_zygote,
        quality=quality,
        follower=follower,
        repeats=RepeatedClicks(settings.interactive_repeat_s),
    )
    trainer = Trainer(settings, records, metrics, lambda: runtime.active, services.label_studio_access, quality.summary)
    services.trainer = trainer
    pusher = Pusher(Outbox(SharedDb(settings.model_dir / "push.sqlite", PUSH_SCHEMA)), services.label_studio_access,
                    label_studio_auth, enabled=settings.push_predictions,
                    on_result=lambda result, n: metrics.pushed_predictions.labels(result).inc(n),
                    on_stored=lambda rows: quality.note_predictions([{"id": row.task} for row in rows],
                                                                   [row.prediction for row in rows], rows[0].model_version))
    services.pusher = pusher
    # First of what is left: the model process's fork and the model's load (in the background) overlap the
    # routes' making, rather than wait for it; a woken backend's first prediction waits for the load.
    services.runtime.restore()
    app.extensions["lsbackend"] = services
    if routed is None:
        _route(app)
    # Only a sibling worker writes the stored configuration behind this one's back: follow it when there are some.
    siblings = [runtime.follow_store] if settings.workers > 1 else []
    services.ticker = Ticker(1.0, [runtime.tick, *siblings, trainer.tick, follower.tick, quality.flush, cache.maintain]).start()
    atexit.register(services.close)
    return app


class PreparedRoutes:
    """An app with its routes made, before any backend's settings exist: the backends' template makes one
    (``prepare``) before it forks, and the first ``create_app`` in each fork (its gunicorn worker's) takes it
    instead of making its own. Making them is ~10 ms of CPU, on every woken backend's way to answering, and on
    its load's way too: the worker's main thread makes them while the thread that asks for its model
    process waits for the GIL."""

    app: ClassVar[Flask | None] = None

    @classmethod
    def prepare(cls) -> None:
        cls.app = _route(Flask(__name__))

    @classmethod
    def take(cls) -> Flask | None:
        app, cls.app = cls.app, None
        return app


def prepare_for_forks() -> None:
    """The routes, made once by the backends' template before it forks (``template.prepare_forks``)."""
    PreparedRoutes.prepare()


def _route(app: Flask) -> Flask:
    """The routes, their JSON and their errors, for any backend: what they serve comes from the app's
    ``lsbackend`` extension, set by ``create_app``."""
    app.json = PlainValuesJSONProvider(app)
    app.register_blueprint(api)
    app.register_blueprint(antenna)
    register_error_handlers(app, on_error=_count_error)
    return app


def _count_error(exc: Exception) -> None:
    current_services().metrics.errors.labels(type(exc).__name__).inc()


def _worker_state(settings: Settings) -> tuple[Predictions, WebhookRecorder]:
    """The prediction cache and the webhook log: in memory for one worker, in a file the workers share
    for several (``backend/serving/shared.py``), so that no task is predicted twice whichever worker a round reaches."""
    if settings.workers <= 1:
        cache = PredictionCache(settings.prediction_cache_bytes, settings.prediction_cache_ttl_s)
        taken = cache.load(settings.model_dir / CACHE_FILE)  # what the last run of this backend finished
        if taken:
            log.info("prediction cache: %d prediction(s) kept from this backend's last run", taken)
        return cache, WebhookLog()
    db = SharedDb(settings.model_dir / FILE_NAME, SCHEMA)
    return SharedPredictions(db, settings.prediction_cache_bytes, settings.prediction_cache_ttl_s), SharedWebhookLog(db)
