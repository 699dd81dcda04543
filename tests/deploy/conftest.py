"""The image lane's engine: podman with the image built from this checkout (once per run, from the engine's
cache when nothing changed). Where podman or debootstrap cannot run the lane is skipped, saying why;
under CI it fails."""

from __future__ import annotations

import pytest

from tests.e2e.projects import under_ci
from tests.support.images import Engine
from tests.support.podman import EngineUnavailable

# The tokens the containers are started with: never in the image's layers, its history or its logs.
CONFIGURE_TOKEN = "deploy-test-configure-token-7f3a"
ORCHESTRATOR_TOKEN = "deploy-test-orchestrator-token-5c1e"


def unavailable(exc: Exception) -> None:
    if under_ci():
        pytest.fail(f"the image lane needs podman and debootstrap under CI: {exc}")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    try:
        made = Engine(tmp_path_factory.mktemp("engine"))
        made.build()
    except EngineUnavailable as exc:
        unavailable(exc)
    return made
