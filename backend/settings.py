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


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
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
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    configure_wait_s: float = 20.0
    predict_timeout_s: float = 90.0
    fetch_concurrency: int = 16
    fetch_timeout_s: float = 30.0
    default_batch_size: int = 32
    store_poll_s: float = 1.0
    batching: bool = True
    max_latency_ms: float = 10.0
    warm_imports: tuple[str, ...] = ()  # modules imported in the background at start (the orchestrator's spares)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        user, password = basic_auth_from(env)
        return cls(
            model_dir=Path(env.get("MODEL_DIR") or "model_dir"),
            host=env.get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 9090, 1),
            basic_auth_user=user,
            basic_auth_pass=password,
            configure_token=env.get("CONFIGURE_TOKEN", ""),
            label_studio_url=(env.get("LABEL_STUDIO_URL") or "").rstrip("/"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
            configure_wait_s=_float(env, "CONFIGURE_WAIT_S", 20.0),
            predict_timeout_s=_float(env, "PREDICT_TIMEOUT_S", 90.0, 1.0),
            fetch_concurrency=_int(env, "FETCH_CONCURRENCY", 16, 1),
            fetch_timeout_s=_float(env, "FETCH_TIMEOUT_S", 30.0, 0.1),
            default_batch_size=_int(env, "BATCH_SIZE", 32, 1),
            store_poll_s=_float(env, "STORE_POLL_S", 1.0),
            batching=(env.get("BATCHING") or "on").lower() not in ("off", "0", "false", "no"),
            max_latency_ms=_float(env, "MAX_LATENCY_MS", 10.0),
            warm_imports=comma_list(env.get("WARM_IMPORTS")),
        )
