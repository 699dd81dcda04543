"""The orchestrator's settings, read once from the environment and validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.settings import (
    AccessSettings,
    basic_auth_from,
    comma_list,
    env_bytes,
    env_float,
    env_int,
    env_megabytes,
    env_switch,
    log_level_from,
)

from .turns import default_turns

DRIVERS = ("process", "docker", "ray")
ON_EXIT = ("stop", "keep")
# The flavors most models need, and Pillow, which image hooks (hooks/pre.py among them) import at their first call.
DEFAULT_WARM_IMPORTS = "mlflow.pyfunc,mlflow.sklearn,skops.io,PIL.Image,PIL.ImageOps"


@dataclass(frozen=True)
class OrchestratorSettings(AccessSettings):
    """Where state lives, how backends run, and who may configure them.

    ``HOST`` is the address the orchestrator is served on (``flask run --host`` or gunicorn's bind):
    beyond loopback, configure and delete need ``CONFIGURE_TOKEN`` or basic auth, as on a backend.
    """

    state_dir: Path = field(default_factory=lambda: Path("orchestrator_state"))
    driver: str = "process"
    max_backends: int = 8
    start_timeout_s: float = 60.0
    proxy_timeout_s: float = 110.0  # Label Studio waits 100 s for /predict; the backend's own 504 comes first
    process_timeout_s: float = 600.0  # the backends' PROCESS_TIMEOUT_S: Antenna's /process waits for them
    supervise_every_s: float = 1.0
    max_backoff_s: float = 30.0
    host: str = "127.0.0.1"
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    configure_token: str = ""
    webhook_secret: str = ""  # what Label Studio's webhooks send as X-Webhook-Secret (backend/web/auth.py)
    gpus: tuple[str, ...] | None = None  # None: detect; () : none
    backend_threads: int = 8
    idle_stop_s: float = 0.0  # a backend with no request for this long sleeps (orchestrator/fleet.py); 0: never
    memory_budget: int = 0  # bytes of PSS for everything the orchestrator started; 0: no budget
    gpu_memory_budget: int = 0  # bytes of GPU memory per GPU for the backends on it; 0: no budget
    wake_headroom: float = 4.0  # at most this many typical backends' room kept free under a budget (fleet.py); 0: none
    wake_turns: int = 0  # at most this many sleeping backends woken at once (turns.py); 0: no limit
    warm_spares: int = 1  # backends started ahead, unconfigured, so a new model skips the start
    spare_warm_imports: str = DEFAULT_WARM_IMPORTS  # also the models' template's (drivers/process.py)
    fork_backends: bool = True  # process driver: fork backends from the templates (backend/isolation/template.py)
    docker_image: str = "lsbackend:latest"
    docker_base_url: str = ""
    docker_mounts: tuple[str, ...] = ()  # extra "host:container[:ro]" binds for the backend containers
    docker_network: str = ""  # "": the engine's default, ports published on loopback; "host"; or a network's name
    max_request_bytes: int = 100 << 20  # the backends' MAX_REQUEST_MB: a larger body is refused here already
    on_exit: str = "keep"  # what the backends do when the orchestrator exits (orchestrator/shutdown.py)
    # The ray driver (orchestrator/drivers/raydriver.py).
    ray_address: str = ""
    ray_namespace: str = "lsbackend"
    ray_connect_timeout_s: float = 15.0
    backend_gpus: int = 0  # GPUs per backend where a configure names none ("gpus")
    ray_backend_resource: str = "lsbackend"  # a custom resource each backend takes one of; "" for none
    ray_spread: bool = True
    ray_node_labels: tuple[tuple[str, str], ...] = ()  # place backends only on nodes with these labels
    ray_backend_python: str = ""  # the Python on every node (same path); default: the orchestrator's
    ray_project_root: str = ""  # this checkout's path on every node; default: the orchestrator's
    log_level: str = "INFO"
    configure_wait_s: float = 20.0  # the backends' CONFIGURE_WAIT_S: how long their configure answer may take
    label_studio_api_key: str = ""  # passed on to the backends; kept out of the orchestrator's log
    interactive: bool = False  # run by ``flask run``: SIGTERM exits as Ctrl-C does (orchestrator/app.py)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrchestratorSettings:
        env = os.environ if env is None else env
        user, password = basic_auth_from(env)
        driver = env.get("ORCHESTRATOR_DRIVER") or "process"
        if driver not in DRIVERS:
            raise ValueError(f"ORCHESTRATOR_DRIVER must be one of {', '.join(DRIVERS)}, got {driver!r}")
        gpus = env.get("ORCHESTRATOR_GPUS")
        # flask run is the interactive case: Ctrl-C stops the backends too, unless told otherwise.
        on_exit = env.get("ORCHESTRATOR_ON_EXIT") or ("stop" if env.get("FLASK_RUN_FROM_CLI") == "true" else "keep")
        placement = env.get("RAY_PLACEMENT") or "spread"
        if placement not in ("spread", "pack"):
            raise ValueError(f"RAY_PLACEMENT must be spread or pack, got {placement!r}")
        if on_exit not in ON_EXIT:
            raise ValueError(f"ORCHESTRATOR_ON_EXIT must be one of {', '.join(ON_EXIT)}, got {on_exit!r}")
        return cls(
            state_dir=Path(env.get("ORCHESTRATOR_DIR") or "orchestrator_state"),
            driver=driver,
            max_backends=env_int(env, "MAX_BACKENDS", 8, 1),
            start_timeout_s=env_float(env, "BACKEND_START_TIMEOUT_S", 60.0, 1.0),
            proxy_timeout_s=env_float(env, "PROXY_TIMEOUT_S", 110.0, 1.0),
            process_timeout_s=env_float(env, "PROCESS_TIMEOUT_S", 600.0, 1.0),
            supervise_every_s=env_float(env, "SUPERVISE_EVERY_S", 1.0, 0.05),
            max_backoff_s=env_float(env, "MAX_BACKOFF_S", 30.0, 0.1),
            host=env.get("HOST") or env.get("FLASK_RUN_HOST") or "127.0.0.1",
            basic_auth_user=user,
            basic_auth_pass=password,
            configure_token=env.get("CONFIGURE_TOKEN", ""),
            webhook_secret=env.get("WEBHOOK_SECRET", ""),
            gpus=None if gpus is None else comma_list(gpus),
            backend_threads=env_int(env, "BACKEND_THREADS", 8, 1),
            idle_stop_s=env_float(env, "IDLE_STOP_S", 0.0),
            memory_budget=env_bytes(env, "MEMORY_BUDGET", 0),
            gpu_memory_budget=env_bytes(env, "GPU_MEMORY_BUDGET", 0),
            wake_headroom=env_float(env, "WAKE_HEADROOM", 4.0),
            wake_turns=env_int(env, "WAKE_TURNS", default_turns(driver), 0),
            warm_spares=env_int(env, "WARM_SPARES", 1, 0),
            spare_warm_imports=env.get("SPARE_WARM_IMPORTS", DEFAULT_WARM_IMPORTS),
            fork_backends=env_switch(env, "FORK_BACKENDS", True),
            docker_image=env.get("DOCKER_IMAGE") or "lsbackend:latest",
            docker_base_url=env.get("DOCKER_HOST", ""),
            docker_mounts=comma_list(env.get("DOCKER_MOUNTS")),
            docker_network=env.get("DOCKER_NETWORK", ""),
            max_request_bytes=env_megabytes(env, "MAX_REQUEST_MB", 100),
            on_exit=on_exit,
            ray_address=env.get("RAY_ADDRESS", ""),
            ray_namespace=env.get("RAY_NAMESPACE") or "lsbackend",
            ray_connect_timeout_s=env_float(env, "RAY_CONNECT_TIMEOUT_S", 15.0, 0.1),
            backend_gpus=env_int(env, "BACKEND_GPUS", 0, 0),
            ray_backend_resource=env.get("RAY_BACKEND_RESOURCE", "lsbackend"),
            ray_spread=placement == "spread",
            ray_node_labels=_labels(env.get("RAY_NODE_LABELS", "")),
            ray_backend_python=env.get("RAY_BACKEND_PYTHON", ""),
            ray_project_root=env.get("RAY_PROJECT_ROOT", ""),
            log_level=log_level_from(env),
            configure_wait_s=env_float(env, "CONFIGURE_WAIT_S", 20.0),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
            interactive=env.get("FLASK_RUN_FROM_CLI") == "true",
        )

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def backends_dir(self) -> Path:
        return self.state_dir / "backends"


def _labels(raw: str) -> tuple[tuple[str, str], ...]:
    """RAY_NODE_LABELS: ``key=value,key=value``."""
    pairs = []
    for item in comma_list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"RAY_NODE_LABELS must be key=value pairs separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)
