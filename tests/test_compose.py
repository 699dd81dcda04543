"""compose.yaml, checked without pulling an image: the three services are wired to each other's names
and ports, published on loopback only, keep their state on volumes, and the orchestrator refuses to
start without a configure token. The orchestrator service itself runs in a container in
tests/test_docker_driver.py. Where docker compose or podman-compose is installed, it validates the file too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from harness.servers import ROOT

COMPOSE = ROOT / "compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_services_are_wired_by_name_and_port():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"label-studio", "mlflow", "orchestrator"}
    env = services["orchestrator"]["environment"]

    mlflow = urlparse(env["MLFLOW_TRACKING_URI"])
    command = services["mlflow"]["command"]
    assert mlflow.hostname == "mlflow" and f"--port {mlflow.port}" in command and "--host 0.0.0.0" in command
    # MLflow refuses Host headers it does not know (DNS rebinding protection): the service's name must be one.
    allowed = re.search(r"--allowed-hosts (\S+)", command)[1].split(",")
    assert f"mlflow:{mlflow.port}" in allowed
    label_studio = urlparse(env["LABEL_STUDIO_URL"])
    assert label_studio.hostname == "label-studio"
    assert any(p.endswith(f":{label_studio.port}") for p in services["label-studio"]["ports"])
    assert services["label-studio"]["environment"]["ML_BLOCK_LOCAL_IP"] == "false"  # it must reach the orchestrator

    orchestrator_port = env["PORT"]
    assert f"0.0.0.0:{orchestrator_port}" in services["orchestrator"]["command"]
    assert any(p.endswith(f":{orchestrator_port}") for p in services["orchestrator"]["ports"])
    assert set(services["orchestrator"]["depends_on"]) == {"mlflow", "label-studio"}


def test_it_is_secure_by_default_and_keeps_its_state():
    spec = compose()
    services = spec["services"]
    env = services["orchestrator"]["environment"]
    assert env["HOST"] == "0.0.0.0"  # reachable from Label Studio's container, so configure needs the token:
    assert env["CONFIGURE_TOKEN"].startswith("${CONFIGURE_TOKEN:?")  # compose refuses to start without one
    for name, service in services.items():
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), name  # loopback on the host
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in spec["volumes"], f"{name}: {volume} is not a named volume"
    assert env["ORCHESTRATOR_DIR"].startswith("/data/") and "orchestrator-data:/data" in services["orchestrator"]["volumes"]


def test_the_images_are_this_checkout_and_its_mlflow():
    services = compose()["services"]
    build = services["orchestrator"]["build"]
    dockerfile = (ROOT / build["context"] / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE" in dockerfile and "BASE_IMAGE" in build["args"]
    for needed in ("backend/", "hooks/", "lsmlflow/", "orchestrator/", "wsgi.py"):
        assert re.search(rf"^COPY .*{re.escape(needed)}", dockerfile, re.MULTILINE), needed
    pinned = re.search(r"^mlflow==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)[1]
    assert services["mlflow"]["image"].endswith(f":v{pinned}")
    tested = re.search(r'^VERSION = "(\S+)"', (ROOT / "harness/label_studio.py").read_text(), re.MULTILINE)[1]
    assert services["label-studio"]["image"].endswith(f":{tested}")  # the Label Studio the e2e tests run


@pytest.mark.parametrize("tool", [["docker", "compose"], ["podman-compose"]])
def test_compose_itself_accepts_the_file(tool, tmp_path):
    found = shutil.which(tool[0], path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None or subprocess.run([found, *tool[1:], "version"], capture_output=True, check=False).returncode:
        pytest.skip(f"{' '.join(tool)} is not installed here; the parsing tests above stand in")
    tool = [found, *tool[1:]]  # podman-compose: from requirements-dev.txt, in this environment
    done = subprocess.run([*tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "CONFIGURE_TOKEN": "x", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([*tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                             check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert refused.returncode != 0 and "CONFIGURE_TOKEN" in refused.stderr
