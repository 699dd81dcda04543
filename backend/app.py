"""The backend's application factory: settings, state and routes wired once per app, never at import."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping

from flask import Flask

from .answers import PlainValuesJSONProvider
from .api import Services, api
from .batching import DynamicBatcher
from .errors import register_error_handlers
from .metrics import BackendMetrics
from .runtime import Runtime
from .settings import Settings
from .store import ConfigurationStore
from .taskdata import TaskDataFetcher


def create_app(settings: Settings | None = None, env: Mapping[str, str] | None = None) -> Flask:
    """Build a backend; restores the configuration stored under MODEL_DIR in the background."""
    settings = settings or Settings.from_env(env)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.json = PlainValuesJSONProvider(app)
    metrics = BackendMetrics()
    store = ConfigurationStore(settings.model_dir)

    def on_loaded(configured) -> None:
        metrics.model_loaded.set(1)
        metrics.model_load_seconds.set(configured.loaded.load_seconds)

    services = Services(
        settings=settings,
        store=store,
        metrics=metrics,
        runtime=Runtime(settings, store, on_loaded=on_loaded),
        fetcher=TaskDataFetcher(store.cache_dir, settings.fetch_concurrency, settings.fetch_timeout_s),
        batcher=DynamicBatcher(settings.max_latency_ms, enabled=settings.batching),
    )
    app.extensions["lsbackend"] = services
    app.register_blueprint(api)
    register_error_handlers(app, on_error=lambda exc: metrics.errors.labels(type(exc).__name__).inc())
    services.runtime.restore()
    if settings.warm_imports:
        services.warming.set()
        threading.Thread(target=_warm_imports, args=(settings.warm_imports, services.warming), name="warm-imports",
                         daemon=True).start()
    return app


def _warm_imports(modules: tuple[str, ...], warming: threading.Event) -> None:
    """Import what a configure will need before it comes: a warm spare then only loads the model."""
    log = logging.getLogger(__name__)
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                log.info("warm import of %s skipped: %s", name, exc)
    finally:
        warming.clear()
    log.info("warm imports done: %s", ", ".join(modules))
