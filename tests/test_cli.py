"""``ls-mlflow`` as a user gets it: the wheel built from this checkout, installed into a folder of its
own and run from another, with hooks in a file of the user's. Every command runs against real servers
it started itself; Ctrl-C on the orchestrator stops its backend and says so."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from examples.hooks import IMAGE_CONFIG
from harness.calls import labels, predict_images
from harness.servers import ROOT, Process, base_env, free_port, wait_until

USER_HOOKS = """
import numpy as np
from PIL import Image

def pre(paths):
    return np.array([[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths])

def post(labels):  # swapped, so a prediction shows this file's code ran
    swap = {"dark": "light", "light": "dark"}
    return [{"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                         "value": {"choices": [swap[str(label)]]}}]} for label in labels]
"""
NOT_SHIPPED = (".git", ".venv", "tests", "bench", "harness", "*_cache", ".demo", "model_dir", "orchestrator_state",
               "mlruns", "*.db", "build", "*.egg-info")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of this checkout, installed with --target into a folder the checkout is not on."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (root / "dist").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return root / "site"


@pytest.fixture
def user(tmp_path, installed, registry, images):
    """A user's folder with their hooks, and how to run the installed ls-mlflow from it."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "myhooks.py").write_text(USER_HOOKS)
    (folder / "config.xml").write_text(IMAGE_CONFIG)
    env = base_env(PYTHONPATH=str(installed), MLFLOW_TRACKING_URI=registry, LOCAL_FILES_ROOTS=str(images["white"].parent))
    command = [str(installed / "bin" / "ls-mlflow")]

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(*args: str) -> tuple[Process, str]:
        """``ls-mlflow serve|orchestrator ARGS`` on a free port, once it answers; the process and its URL. The
        backend is given its port as a container is, in ``$PORT``; the orchestrator with ``--port``."""
        port = free_port()
        if args[0] == "serve":
            server = Process([*command, *args], {**env, "PORT": str(port)}, tmp_path / f"{args[0]}.log", cwd=folder)
        else:
            server = Process([*command, *args, "--port", str(port)], env, tmp_path / f"{args[0]}.log", cwd=folder)
        server.start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: requests.get(url + "/health", timeout=1).ok, 60, f"ls-mlflow {args[0]}", server.proc)
        except BaseException:
            server.stop()
            raise
        return server, url

    return folder, env, run, start


def succeeded(done: subprocess.CompletedProcess) -> dict:
    """The JSON a successful command prints."""
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_installed_package_runs_outside_the_checkout(installed, user):
    folder, env, run, _ = user
    shown = subprocess.run([sys.executable, "-c", ("import backend, lsmlflow, orchestrator, wsgi, hooks\n"
                            "print(backend.__file__, lsmlflow.__file__, orchestrator.__file__, wsgi.__file__, hooks.__file__)")],
                           cwd=folder, env=env, capture_output=True, text=True, check=True)
    assert all(Path(path).is_relative_to(installed) for path in shown.stdout.split()), shown.stdout
    helped = run("--help")
    assert helped.returncode == 0
    for command in ("serve", "orchestrator", "configure", "connect", "status", "check"):
        assert command in helped.stdout
    assert "--pre-hook" in run("configure", "--help").stdout


def test_serve_configure_status_check_against_a_real_backend(user, images):
    folder, _, run, start = user
    backend, url = start("serve", "--model-dir", str(folder / "model_dir"))
    try:
        configured = run("configure", "--url", url, "--model", "models:/brightness/1",
                         "--pre-hook", "myhooks.py:pre", "--post-hook", "myhooks:post")
        answer = succeeded(configured)
        assert (answer["url"], answer["model_version"]) == (url, "brightness:1")
        assert "configuring models:/brightness/1" in configured.stderr and "ls-mlflow connect" in configured.stderr
        assert labels(predict_images(url, images, "white", "black")) == ["dark", "light"]

        status = run("status", "--url", url)
        assert status.returncode == 0 and "brightness:1" in status.stdout and "models:/brightness/1" in status.stdout
        shown = json.loads(run("status", "--url", url, "--json").stdout)
        assert shown["model_version"] == "brightness:1"
        assert shown["push"].startswith("off: no Label Studio address and token")  # none given: each press stores its part
        assert "off: no Label Studio address" in status.stdout

        failed = run("configure", "--url", url, "--model", "models:/no-such-model/1", "--post-hook", "myhooks:post")
        assert failed.returncode == 1 and failed.stderr.count("error: ") == 1 and "no-such-model" in failed.stderr
        assert "  fix: " in failed.stderr
        missing = run("configure", "--url", url, "--model", "models:/brightness/1", "--post-hook", "myhooks:nothing")
        assert missing.returncode == 1 and "error: --post-hook: 'myhooks' has no 'nothing'" in missing.stderr
        assert labels(predict_images(url, images, "white")) == ["dark"]  # still the working configuration

        checked = run("check", "--model", "models:/brightness/1", "--label-config", "config.xml",
                      "--pre-hook", "myhooks:pre", "--post-hook", "myhooks.py:post", str(images["black"]))
        assert checked.returncode == 0, checked.stderr
        assert "OK: 1 predictions" in checked.stderr
        assert json.loads(checked.stdout)["results"][0]["result"][0]["value"]["choices"] == ["light"]
    finally:
        backend.stop()
    assert "Listening at: " + url in backend.output()


def test_the_orchestrator_command_configures_routes_and_stops_its_backends_on_ctrl_c(user, images, tmp_path):
    _folder, _, run, start = user
    orchestrator, url = start("orchestrator", "--state-dir", str(tmp_path / "state"))
    try:
        configured = run("configure", "--url", url, "--model", "models:/brightness@champion",
                         "--pre-hook", "myhooks:pre", "--post-hook", "myhooks:post")
        answer = succeeded(configured)
        assert answer["url"] == f"{url}/models/{answer['backend_id']}/" and answer["model_version"] == "brightness:1"
        assert labels(predict_images(answer["url"], images, "black")) == ["light"]

        status = run("status", "--url", url)
        assert status.returncode == 0 and f"orchestrator at {url}: 1 backend(s)" in status.stdout
        assert answer["backend_id"] in status.stdout and "brightness:1" in status.stdout
        [row] = json.loads(run("status", "--url", url, "--json").stdout)["backends"]
        assert (row["state"], row["version"], row["url"]) == ("ready", "brightness:1", answer["url"])
        assert row["push"].startswith("off: ")
        handle = requests.get(f"{url}/backends/{answer['backend_id']}", timeout=5).json()["handle"]
        backend_pid = int(handle.partition(":")[0])
    finally:
        orchestrator.stop(signal.SIGINT, timeout=60)  # Ctrl-C: flask run's default is to stop the backends
    assert orchestrator.proc.returncode is not None
    assert "stopped 1 backend(s)" in orchestrator.output()
    assert not Path(f"/proc/{backend_pid}").exists()
