"""The backend's settings, read once from the environment and validated at start."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", int, float)


def _number(env: Mapping[str, str], name: str, default: T, minimum: T, kind: Callable[[str], T]) -> T:
    """``env[name]`` as ``kind`` (int or float), at least ``minimum``; ``default`` when unset."""
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int)


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; the only binds where configure needs no credentials."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def basic_auth_from(env: Mapping[str, str]) -> tuple[str, str]:
    """BASIC_AUTH_USER and BASIC_AUTH_PASS: both, or neither."""
    user, password = env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", "")
    if bool(user) != bool(password):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    return user, password


def comma_list(raw: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (raw or "").split(",") if part.strip())


def env_megabytes(env: Mapping[str, str], name: str, default_mb: float) -> int:
    """A size setting given in MB (``MAX_REQUEST_MB=100``), as bytes."""
    return int(env_float(env, name, default_mb, 0.001) * (1 << 20))


SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def env_bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A size setting in bytes, or with a unit (``MEMORY_BUDGET=6G``, ``1500M``, ``512MiB``; binary units)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    number = raw.rstrip("BbIi").rstrip()  # 6G, 6GB, 6GiB alike
    unit = number[-1:].lower() if number[-1:].isalpha() else ""
    try:
        value = float(number[: len(number) - len(unit)]) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{name} must be a size in bytes or with a unit (K, M, G, T), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return int(value)


def env_switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be on or off, got {raw!r}")


# The backend settings an orchestrator passes on to every backend it starts in a container (a process
# backend inherits its environment anyway). Credentials for configure are the orchestrator's own.
BACKEND_ENVIRONMENT = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOG_LEVEL",
    "LOCAL_FILES_ROOTS", "LOCAL_FILES_DOCUMENT_ROOT", "FETCH_ALLOW_PRIVATE", "FETCH_MAX_MB", "FETCH_TIMEOUT_S",
    "FETCH_CONCURRENCY", "CACHE_MAX_MB", "MAX_REQUEST_MB", "REQUEST_READ_TIMEOUT_S", "QUICK_THREADS",
    "PREDICT_TIMEOUT_S", "PROCESS_TIMEOUT_S", "MODEL_CALL_TIMEOUT_S", "CONFIGURE_WAIT_S", "BATCH_SIZE", "BATCHING", "MAX_LATENCY_MS",
    "BACKGROUND", "BACKGROUND_MAX_TASKS", "PREDICTION_CACHE_MB", "PREDICTION_CACHE_TTL_S",
    "TRAIN_TIMEOUT_S", "TRAIN_CUDA_VISIBLE_DEVICES", "ALIAS_POLL_S",
)


@dataclass(frozen=True)
class ServerSettings:
    """How gunicorn runs the backend (``backend/web/gunicorn_conf.py``) and what its worker class enforces
    before a request reaches Flask (``backend/web/worker.py``)."""

    host: str = "127.0.0.1"
    port: int = 9090
    workers: int = 1  # a model is loaded once per worker: one worker with threads by default
    threads: int = 8
    timeout_s: int = 130  # longer than Label Studio's 100 s predict timeout, so the backend's 504 answers first
    graceful_timeout_s: int = 10
    access_log: bool = False
    log_level: str = "INFO"
    request_read_timeout_s: float = 60.0
    max_request_bytes: int = 100 << 20
    quick_threads: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        env = os.environ if env is None else env
        return cls(
            host=env.get("HOST") or "127.0.0.1",
            port=env_int(env, "PORT", 9090, 1),
            workers=env_int(env, "WORKERS", 1, 1),
            threads=env_int(env, "THREADS", 8, 1),
            timeout_s=env_int(env, "GUNICORN_TIMEOUT", 130, 1),
            graceful_timeout_s=env_int(env, "GRACEFUL_TIMEOUT", 10, 0),
            access_log=bool(env.get("ACCESS_LOG", "")),
            log_level=log_level_from(env),
            request_read_timeout_s=env_float(env, "REQUEST_READ_TIMEOUT_S", 60.0, 0.1),
            max_request_bytes=env_megabytes(env, "MAX_REQUEST_MB", 100),
            quick_threads=env_int(env, "QUICK_THREADS", 4, 1),
        )


def log_level_from(env: Mapping[str, str]) -> str:
    """LOG_LEVEL, checked: a typo should not silence the log."""
    level = (env.get("LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {env.get('LOG_LEVEL')!r}")
    return level


class AccessSettings:
    """What the auth rules read, shared by the backend's and the orchestrator's settings."""

    host: str
    basic_auth_user: str

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def open_bind(self) -> bool:
        """Listening beyond loopback: configure then needs a token or basic auth."""
        return not is_loopback(self.host)


@dataclass(frozen=True)
class Settings(AccessSettings):
    """Everything the backend reads from its environment.

    ``HOST``/``PORT`` are the bind (gunicorn.conf.py reads the same variables), so the backend
    knows whether it listens beyond loopback and must insist on credentials for ``/configure``.
    """

    model_dir: Path = field(default_factory=lambda: Path("model_dir"))
    host: str = "127.0.0.1"
    port: int = 9090
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    configure_token: str = ""
    webhook_secret: str = ""  # what Label Studio's webhooks send as X-Webhook-Secret (backend/web/auth.py)
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    configure_wait_s: float = 20.0
    predict_timeout_s: float = 90.0
    process_timeout_s: float = 600.0  # Antenna's /process: it waits as long as it takes, a deadline of our own
    model_call_timeout_s: float | None = None  # one model call longer than this is hung; default PREDICT_TIMEOUT_S
    fetch_concurrency: int = 16
    fetch_timeout_s: float = 30.0
    default_batch_size: int = 32
    store_poll_s: float = 1.0
    batching: bool = True
    max_latency_ms: float = 10.0
    warm_imports: tuple[str, ...] = ()  # modules imported in the background at start (the orchestrator's spares)
    template: str = ""  # the socket of the template to fork the zygote from (backend/isolation/template.py; the orchestrator sets it)
    # What task data may reach (see taskdata and addresses): local folders, private addresses, sizes.
    local_files_roots: tuple[str, ...] = ()
    fetch_allow_private: tuple[str, ...] = ()
    fetch_max_bytes: int = 100 << 20
    cache_max_bytes: int = 2 << 30
    max_request_bytes: int = 100 << 20
    # Big projects: what does not fit before the deadline goes on in the background into this cache.
    background: bool = True
    background_max_tasks: int = 50_000
    push_predictions: bool = True  # write what the background finishes into Label Studio (backend/serving/push.py)
    prediction_cache_bytes: int = 256 << 20
    prediction_cache_ttl_s: float = 3600.0
    # Interactive labeling (promptable models): the embed_hook's per-image states, kept in the model process,
    # and how long a click's answer is kept for the same click sent again (Label Studio re-sends on Submit).
    embed_cache_bytes: int = 256 << 20
    interactive_repeat_s: float = 60.0
    workers: int = 1  # gunicorn's WORKERS: with several, they share the cache above, claims and the webhook log
    # Training (backend/training) and following the registry (backend/serving/follower.py).
    train_timeout_s: float = 3600.0
    train_cuda_visible_devices: str | None = None  # the training's own GPUs; by default the backend's
    alias_poll_s: float = 30.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        user, password = basic_auth_from(env)
        return cls(
            model_dir=Path(env.get("MODEL_DIR") or "model_dir"),
            host=env.get("HOST") or "127.0.0.1",
            port=env_int(env, "PORT", 9090, 1),
            basic_auth_user=user,
            basic_auth_pass=password,
            configure_token=env.get("CONFIGURE_TOKEN", ""),
            webhook_secret=env.get("WEBHOOK_SECRET", ""),
            label_studio_url=(env.get("LABEL_STUDIO_URL") or "").rstrip("/"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
            configure_wait_s=env_float(env, "CONFIGURE_WAIT_S", 20.0),
            predict_timeout_s=env_float(env, "PREDICT_TIMEOUT_S", 90.0, 1.0),
            process_timeout_s=env_float(env, "PROCESS_TIMEOUT_S", 600.0, 1.0),
            model_call_timeout_s=env_float(env, "MODEL_CALL_TIMEOUT_S", 0.0) or None,
            fetch_concurrency=env_int(env, "FETCH_CONCURRENCY", 16, 1),
            fetch_timeout_s=env_float(env, "FETCH_TIMEOUT_S", 30.0, 0.1),
            default_batch_size=env_int(env, "BATCH_SIZE", 32, 1),
            store_poll_s=env_float(env, "STORE_POLL_S", 1.0),
            batching=env_switch(env, "BATCHING", True),
            max_latency_ms=env_float(env, "MAX_LATENCY_MS", 10.0),
            warm_imports=comma_list(env.get("WARM_IMPORTS")),
            template=env.get("BACKEND_TEMPLATE", ""),
            local_files_roots=comma_list(env.get("LOCAL_FILES_ROOTS"))
            + comma_list(env.get("LOCAL_FILES_DOCUMENT_ROOT")),  # Label Studio's local-files storage root
            fetch_allow_private=comma_list(env.get("FETCH_ALLOW_PRIVATE")),
            fetch_max_bytes=env_megabytes(env, "FETCH_MAX_MB", 100),
            cache_max_bytes=env_megabytes(env, "CACHE_MAX_MB", 2048),
            max_request_bytes=env_megabytes(env, "MAX_REQUEST_MB", 100),
            background=env_switch(env, "BACKGROUND", True),
            background_max_tasks=env_int(env, "BACKGROUND_MAX_TASKS", 50_000, 0),
            push_predictions=env_switch(env, "PUSH_PREDICTIONS", True),
            prediction_cache_bytes=env_megabytes(env, "PREDICTION_CACHE_MB", 256),
            prediction_cache_ttl_s=env_float(env, "PREDICTION_CACHE_TTL_S", 3600.0, 1.0),
            embed_cache_bytes=env_megabytes(env, "EMBED_CACHE_MB", 256),
            interactive_repeat_s=env_float(env, "INTERACTIVE_REPEAT_S", 60.0, 0.0),
            workers=env_int(env, "WORKERS", 1, 1),
            train_timeout_s=env_float(env, "TRAIN_TIMEOUT_S", 3600.0, 1.0),
            train_cuda_visible_devices=env.get("TRAIN_CUDA_VISIBLE_DEVICES"),
            alias_poll_s=env_float(env, "ALIAS_POLL_S", 30.0, 0.1),
            log_level=log_level_from(env),
        )

    @property
    def call_timeout_s(self) -> float:
        """How long one model call (a batch) may run before it counts as hung and its process is restarted."""
        return self.model_call_timeout_s or self.predict_timeout_s

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in an answer or a log line."""
        return tuple(s for s in (self.basic_auth_pass, self.configure_token, self.webhook_secret, self.label_studio_api_key) if s)
