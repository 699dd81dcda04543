"""The orchestrator's application factory: registry, driver, manager, proxy and supervisor, wired once."""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
from collections.abc import Mapping

from flask import Flask

from backend.core.errors import register_error_handlers
from backend.core.redact import SECRETS, install_log_redaction

from .antenna import antenna
from .api import Orchestrator, api
from .drivers import BackendDriver, make_driver
from .gpus import detect_gpus
from .manager import BackendManager
from .metrics import OrchestratorMetrics
from .proxy import Proxy
from .registry import Registry
from .settings import OrchestratorSettings
from .shutdown import Shutdown
from .supervisor import Supervisor


def create_app(
    settings: OrchestratorSettings | None = None,
    env: Mapping[str, str] | None = None,
    driver: BackendDriver | None = None,
    supervise: bool = True,
) -> Flask:
    """Build an orchestrator; its supervisor re-adopts or restarts the backends its registry names."""
    settings = settings or OrchestratorSettings.from_env(env)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    SECRETS.add(settings.basic_auth_pass, settings.configure_token, settings.webhook_secret, settings.label_studio_api_key)
    install_log_redaction()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if settings.driver == "ray":
        gpus: tuple[str, ...] = ()  # Ray assigns the GPUs of its nodes
    else:
        gpus = settings.gpus if settings.gpus is not None else detect_gpus()
    manager = BackendManager(settings, Registry(settings.registry_path), driver or make_driver(settings), gpus)
    supervisor = Supervisor(manager)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider's setting
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    proxy = Proxy(settings.proxy_timeout_s, manager.registry.get)
    app.extensions["orchestrator"] = Orchestrator(settings, manager, proxy, supervisor, OrchestratorMetrics(manager))
    app.register_blueprint(api)
    app.register_blueprint(antenna)
    register_error_handlers(app)
    if supervise:
        supervisor.start()
        atexit.register(Shutdown(manager, supervisor, settings.on_exit))
        if settings.interactive and threading.current_thread() is threading.main_thread():
            # flask run ends on SIGTERM without running atexit: make it exit as on Ctrl-C, so the backends'
            # fate is carried out and said. gunicorn's workers exit through sys.exit on their own.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger(__name__).info(
        "orchestrator: %s driver, state in %s, GPUs: %s",
        manager.driver.name,
        settings.state_dir,
        ", ".join(gpus) or "none",
    )
    return app
