"""Shared fixtures: a real MLflow registry (SQLite), images made with Pillow, backends as real gunicorn processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from backend.app import create_app
from backend.settings import Settings
from tests.support.servers import Backend, MlflowServer, prefix_proxy, register_models

# No test reaches the internet: MLflow's telemetry stays off in this process and every child.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> str:
    """A SQLite MLflow registry holding the fixture models (brightness v1, v2 @champion=1, sentiment, tiny_torch)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_models(uri)
    return uri


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    made = {}
    for name, grey in (("white", 240), ("black", 10), ("light", 200), ("dark", 40)):
        path = root / f"{name}.png"
        Image.new("RGB", (32, 24), (grey, grey, grey)).save(path)
        made[name] = path
    return made


@pytest.fixture
def app(tmp_path, registry, monkeypatch):
    """An in-process backend on the fixture registry."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app = create_app(Settings(model_dir=tmp_path / "model_dir", configure_wait_s=60))
    yield app
    app.extensions["lsbackend"].fetcher.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def start_backend(tmp_path, registry):
    """Start real gunicorn backends on the fixture registry; all are stopped at teardown."""
    started: list[Backend] = []

    def start(**env: str) -> Backend:
        env.setdefault("MLFLOW_TRACKING_URI", registry)
        backend = Backend(tmp_path, env).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        register_models(server.url, with_torch=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dagshub_host(mlflow_server):
    proxy = prefix_proxy("/alice/models.mlflow", mlflow_server.url)
    yield proxy
    proxy.close()
