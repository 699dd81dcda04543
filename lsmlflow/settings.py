"""The CLI's defaults, from the environment the servers read too (one name per thing)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientSettings:
    """``LS_MLFLOW_URL`` (the backend or orchestrator to talk to), its ``CONFIGURE_TOKEN`` or basic auth,
    and Label Studio's ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (a Personal Access Token)."""

    url: str = "http://127.0.0.1:9090"
    configure_token: str = ""
    basic_auth: tuple[str, str] | None = None
    label_studio_url: str = ""
    label_studio_api_key: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        user, password = env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", "")
        return cls(
            url=env.get("LS_MLFLOW_URL") or "http://127.0.0.1:9090",
            configure_token=env.get("CONFIGURE_TOKEN", ""),
            basic_auth=(user, password) if user and password else None,
            label_studio_url=env.get("LABEL_STUDIO_URL", ""),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
        )
