"""The image users run is the image these tests ran (``make test-deploy``): a Debian base made with
debootstrap, the real Dockerfile built on it with podman, and the container started as a user starts it.
Where podman or debootstrap cannot run these tests are skipped, saying why; under CI they fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from harness.calls import demo_configure_body
from harness.servers import free_port, wait_until
from tests.deploy.conftest import CONFIGURE_TOKEN as TOKEN
from tests.deploy.conftest import ORCHESTRATOR_TOKEN
from tests.support.hooks import IMAGE_CONFIG
from tests.support.images import IMAGE, layers_holding

pytestmark = pytest.mark.deploy


def test_the_image_runs_as_its_user_refuses_configure_without_the_token_and_predicts(engine, mlflow_server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (240, 240, 240)).save(images / "white.png")
    port = free_port()
    name = f"lsbackend-deploy-{port}"
    engine.run("run", "-d", "--name", name, "--network", "host", "-e", f"PORT={port}", "-e", f"CONFIGURE_TOKEN={TOKEN}",
               "-e", f"MLFLOW_TRACKING_URI={mlflow_server.url}", "-e", "LOCAL_FILES_ROOTS=/images",
               "-v", f"{images}:/images:ro", IMAGE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/health", timeout=1).ok, 60, "the container's backend")
        assert engine.text("exec", name, "id", "-u").strip() == "10001"  # its own user, not root
        assert engine.run("healthcheck", "run", name, check=False).returncode == 0  # the Dockerfile's HEALTHCHECK
        body = demo_configure_body()
        refused = requests.post(url + "/configure", json=body, timeout=30)
        assert refused.status_code == 401 and "CONFIGURE_TOKEN" in refused.json()["detail"]  # it listens on 0.0.0.0
        configured = requests.post(url + "/configure", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert configured.status_code == 200, configured.text
        answer = requests.post(url + "/predict", timeout=60, json={
            "tasks": [{"id": 1, "data": {"image": "/images/white.png"}}], "label_config": IMAGE_CONFIG})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["result"][0]["value"]["choices"] == ["light"]
        # Restarted, it restores its configuration from its volume.
        engine.run("restart", name)
        wait_until(lambda: requests.get(url + "/health", timeout=1).json()["configured"], 60, "restored after a restart")
    finally:
        logs = engine.run("logs", name, check=False)
        engine.run("rm", "-f", name, check=False)
    assert TOKEN not in (logs.stdout + logs.stderr).decode(errors="replace")  # the token never reaches the log


def test_the_image_holds_nothing_of_the_host_the_tests_or_a_secret(engine, tmp_path):
    listed = engine.text("run", "--rm", "--entrypoint", "ls", IMAGE, "-a", "/app").split()
    assert {"backend", "orchestrator", "hooks", "wsgi.py"} <= set(listed)
    assert not {"tests", ".venv", ".git", "bench", "model_dir", "__pycache__"} & set(listed)  # .dockerignore
    no_pip_conf = engine.run("run", "--rm", "--entrypoint", "test", IMAGE, "!", "-e", "/etc/pip.conf", check=False)
    assert no_pip_conf.returncode == 0  # the host's pip.conf was a build secret: in no layer
    history = engine.text("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE)
    assert TOKEN not in history and "index-url" not in history
    # Every file of every layer read through: no test token, nothing of the host's pip configuration.
    needles = [TOKEN.encode(), ORCHESTRATOR_TOKEN.encode()]
    if Path("/etc/pip.conf").exists():
        needles.append(Path("/etc/pip.conf").read_bytes().strip())
    assert layers_holding(engine, IMAGE, needles, tmp_path) == {}
    inspected = json.loads(engine.text("image", "inspect", IMAGE))[0]
    assert inspected["Config"]["User"] == "backend" and "livez" in str(inspected["Healthcheck"]["Test"])  # kept: docker format
    size_mb = inspected["Size"] / 2**20
    layers = len(inspected["RootFS"]["Layers"])
    # Built again with nothing changed: every step from the engine's cache.
    engine.build(step="build again")
    assert engine.outputs["build again"].count("Using cache") >= 5, engine.outputs["build again"][-2000:]
    print(json.dumps({"size_mib": round(size_mb), "layers": layers, "seconds": {k: round(v, 1) for k, v in engine.costs.items()}}))
