"""Shared fixtures: a real MLflow registry (SQLite), images made with Pillow, backends as real gunicorn processes."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from backend.app import create_app
from backend.core.settings import Settings
from backend.isolation.zygote import Zygote
from harness.servers import (
    ROOT,
    Backend,
    MlflowServer,
    OrchestratorProcess,
    base_env,
    file_server,
    prefix_proxy,
    register_models,
    stop_group,
)
from orchestrator.drivers.process import model_modules
from orchestrator.drivers.template import BackendTemplate
from orchestrator.settings import OrchestratorSettings
from tests.support.clientside import write_user_modules

# No test reaches the internet: MLflow's telemetry stays off in this process and every child.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Read when Ray is imported: a loopback-only test cluster keeps 127.0.0.1 (see tests/support/raycluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Under pytest-xdist (``make test``: --dist loadfile --no-loadscope-reorder) files go to the workers in
# collection order, two each, then one more to each worker as it finishes one: the slowest first (measured:
# seconds of a 3-worker run on 2 cores), so that no long file starts last and runs on alone while the other
# workers wait. (Without --no-loadscope-reorder xdist orders files by their number of tests instead.)
SLOWEST_FIRST = (
    "tests/e2e/test_label_studio.py",  # 230
    "tests/test_orchestrator.py",  # 145
    "tests/e2e/test_browser.py",  # 115
    "tests/e2e/test_zoo.py",  # 100
    "tests/test_ray_driver.py",  # 95
    "tests/test_soak.py",  # 80
    "tests/test_training.py",  # 75
    "tests/test_hardening.py",  # 75
    "tests/test_fleet.py",  # 50
    "tests/test_gunicorn.py",  # 45
    "tests/test_api.py",  # 45
    "tests/test_cli.py",  # 40
    "tests/test_hooks.py",  # 35
    "tests/test_dependencies.py",  # 35
    "tests/test_mlflow_http.py",  # 35
    "tests/test_docker_driver.py",  # 30
    "tests/test_antenna.py",  # 20
    "tests/test_bodies.py",  # 20
    "tests/test_client.py",  # 15
    "tests/test_interactive.py",  # 12
    "tests/test_template.py",  # 9
    "tests/test_batching.py",  # 8
    "tests/test_churn.py",  # 6
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: place for place, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: a file's own order stays


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> str:
    """A SQLite MLflow registry holding the fixture models (brightness v1, v2 @champion=1, sentiment, tiny_torch).

    Under pytest-xdist (``make test``) the run's workers build it once, under a lock in the run's own
    folder, and each works on a copy of the database (tests register versions and move aliases); the
    models' artifacts, written once, are shared."""
    root = tmp_path_factory.mktemp("registry")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        register_models(f"sqlite:///{root / 'mlflow.db'}")
        return f"sqlite:///{root / 'mlflow.db'}"
    run_folder = tmp_path_factory.getbasetemp().parent  # pytest-N/popen-gwK -> pytest-N: this run's alone
    built = run_folder / "registry-built" / "mlflow.db"
    with open(run_folder / "registry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            built.parent.mkdir(exist_ok=True)
            register_models(f"sqlite:///{built.parent / 'building.db'}")
            (built.parent / "building.db").rename(built)
    shutil.copyfile(built, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    made = {}
    for name, grey in (("white", 240), ("black", 10), ("light", 200), ("dark", 40)):
        path = root / f"{name}.png"
        Image.new("RGB", (32, 24), (grey, grey, grey)).save(path)
        made[name] = path
    return made


@pytest.fixture(scope="session")
def zygote(registry):
    """One fork server for every in-process app of the session, MLflow and the fixture models' flavors
    imported once: each app's model processes are forked from it, as a backend's are from its own."""
    warm = ("mlflow.pyfunc", "mlflow.sklearn", "mlflow.pytorch", "skops.io", "sklearn", "torch")
    started = Zygote(warm, env=base_env(MLFLOW_TRACKING_URI=registry)).start()
    yield started
    started.close()


def make_app(tmp_path, zygote, images, **settings):
    """An in-process backend on the fixture registry, allowed to read the fixture images."""
    settings.setdefault("model_dir", tmp_path / "model_dir")
    settings.setdefault("configure_wait_s", 60)
    settings.setdefault("local_files_roots", (str(images["white"].parent),))
    return create_app(Settings(**settings), zygote=zygote)


@pytest.fixture
def served(images):
    """The fixture images over HTTP on loopback, and the path and headers of each request it got."""
    seen: list = []
    server = file_server(images["white"].parent, seen=seen)
    yield server, seen
    server.close()


@pytest.fixture
def app(tmp_path, zygote, images):
    app = make_app(tmp_path, zygote, images)
    yield app
    app.extensions["lsbackend"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def app_with(tmp_path, zygote, images):
    """``app_with(**settings)``: test clients of in-process backends with other settings, closed at teardown."""
    made = []

    def make(**settings):
        app = make_app(tmp_path / f"app-{len(made)}", zygote, images, **settings)
        made.append(app)
        return app.test_client()

    yield make
    for app in made:
        app.extensions["lsbackend"].close()


def on_fixtures(env: dict[str, str], registry: str, images: dict[str, Path]) -> dict[str, str]:
    """A server's environment: the fixture registry, and the right to read the fixture images, unless ``env`` says otherwise."""
    return {"MLFLOW_TRACKING_URI": registry, "LOCAL_FILES_ROOTS": str(images["white"].parent), **env}


@pytest.fixture(scope="session")
def backend_template(tmp_path_factory, registry):
    """The models' template, as the orchestrator starts it, for this test process's own backends: their
    zygotes fork from it instead of importing MLflow anew (about 3 s of CPU per backend started)."""
    state_dir = tmp_path_factory.mktemp("template")
    modules = model_modules(OrchestratorSettings(), {"MLFLOW_TRACKING_URI": registry})
    template = BackendTemplate(state_dir, base_env(), modules, ROOT, 60,  # base_env: no credentials
                               stem="models-template", name="lsb-model-tmpl")
    client = template.connect()  # its owner: it ends with this process, or after its last fork
    yield str(template.path)
    client.close()


@pytest.fixture
def start_backend(tmp_path, registry, images, backend_template):
    """Start real gunicorn backends on the fixture registry, allowed to read the fixture images; all
    are stopped at teardown. Their zygotes fork from the session's template; ``BACKEND_TEMPLATE=""``
    starts one as a user's standalone backend does, as a new Python."""
    started: list[Backend] = []

    def start(**env: str) -> Backend:
        backend = Backend(tmp_path, on_fixtures({"BACKEND_TEMPLATE": backend_template, **env}, registry, images)).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def start_orchestrator(tmp_path, registry, images):
    """Start orchestrators on one state folder (their backends may read the fixture images); at teardown
    every backend they started is removed."""
    started: list[OrchestratorProcess] = []
    state_dir = tmp_path / "state"

    def start(workers: int = 0, **env: str) -> OrchestratorProcess:
        orchestrator = OrchestratorProcess(state_dir, on_fixtures(env, registry, images), workers=workers).start()
        started.append(orchestrator)
        return orchestrator

    yield start
    if started and started[-1].proc.poll() is None:
        started[-1].remove_all()
    for orchestrator in started:
        orchestrator.stop()
        orchestrator.kill_leftovers()


@pytest.fixture
def client_side(tmp_path, monkeypatch):
    """A user's hook module (``clientside_hooks``, and the helper module it imports), importable in this
    process only: the backends started by the tests do not have it."""
    names = write_user_modules(tmp_path / "client-side")
    monkeypatch.syspath_prepend(str(tmp_path / "client-side"))
    yield importlib.import_module(names[0])
    for name in names:
        sys.modules.pop(name, None)


@dataclass(frozen=True)
class SharedServer:
    """A server of the whole run that another worker may have started: its address."""

    url: str


SHARED_MLFLOW = "mlflow-server.json"  # in the run's folder: the shared server's address and process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on loopback holding the fixture models (no torch). Under pytest-xdist one for the
    whole run: the first worker that needs it starts it under a lock, the others use it, and the run's
    controller stops it (pytest_sessionfinish below). Tests register models of their own names only."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
        try:
            register_models(server.url, with_torch=False)
            yield server
        finally:
            server.stop()
        return
    run_folder = tmp_path_factory.getbasetemp().parent
    record = run_folder / SHARED_MLFLOW
    with open(run_folder / "mlflow-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            (run_folder / "mlflow-server").mkdir(exist_ok=True)
            server = MlflowServer(run_folder / "mlflow-server").start()
            register_models(server.url, with_torch=False)
            record.write_text(json.dumps({"url": server.url, "pid": server.proc.pid if server.proc else 0}))
    yield SharedServer(json.loads(record.read_text())["url"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's controller (under pytest-xdist) stops what its workers shared (its own session group)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    record = session.config._tmp_path_factory.getbasetemp() / SHARED_MLFLOW  # type: ignore[attr-defined]
    if record.exists():
        stop_group(json.loads(record.read_text())["pid"])


@pytest.fixture(scope="session")
def dagshub_host(mlflow_server):
    proxy = prefix_proxy("/alice/models.mlflow", mlflow_server.url)
    yield proxy
    proxy.close()
