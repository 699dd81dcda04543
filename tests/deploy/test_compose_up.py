"""compose.yaml brought up as the README's walk-through says, with podman-compose, on images built here from
the same Debian base (deploy/compose.local.yaml selects them; the published names stay compose.yaml's):
a PAT made in that Label Studio as a user makes one, the demo models registered in that MLflow, the model
configured through the orchestrator with ``ls-mlflow configure``, the project connected, the predictions
stored in Label Studio."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from harness.label_studio import LabelStudioApi
from harness.servers import ROOT, base_env, wait_until
from orchestrator.drivers.base import port_is_free
from tests.deploy.conftest import ORCHESTRATOR_TOKEN, unavailable
from tests.e2e.projects import new_project, stored, tasks_of
from tests.support.hooks import IMAGE_CONFIG
from tests.support.images import Engine

pytestmark = pytest.mark.deploy
PROJECT = "lsmlflow-compose-test"
LOCAL = ROOT / "deploy" / "compose.local.yaml"
BIN = Path(sys.executable).parent


def published_ports() -> dict[str, int]:
    """Each service's host port, as compose.yaml publishes it (127.0.0.1:PORT:PORT)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    return {name: int(service["ports"][0].split(":")[1]) for name, service in services.items()}


class Compose:
    """podman-compose on compose.yaml and the local images' override, as the engine's tests run podman."""

    def __init__(self, engine: Engine, env: dict[str, str]) -> None:
        self.engine, self.env = engine, env

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(BIN / "podman-compose"), "--podman-path", self.engine.command[0],
                   "--podman-args", shlex.join(self.engine.command[1:]), "-p", PROJECT,
                   "-f", str(ROOT / "compose.yaml"), "-f", str(LOCAL), *args]
        done = subprocess.run(command, env={**self.engine.env, **self.env}, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert not check or done.returncode == 0, f"podman-compose {' '.join(args)}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def containers(self) -> dict[str, str]:
        """Each running service's container id, so a test can tell which ones an ``up`` recreated."""
        listed = self.engine.text("ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
                                  "--format", '{{index .Labels "com.docker.compose.service"}} {{.ID}}')
        return dict(line.split(" ", 1) for line in listed.splitlines() if line.strip())


@pytest.fixture(scope="module")
def stack(engine: Engine):
    """The three images built on the local base (from the engine's cache after the first time), then up."""
    local = yaml.safe_load(LOCAL.read_text())["services"]
    for service in ("label-studio", "mlflow"):
        engine.build(tag=local[service]["image"], step=f"build {service}", context=LOCAL.parent / local[service]["build"]["context"])
    taken = {name: port for name, port in published_ports().items() if not port_is_free(port)}
    if taken:
        unavailable(RuntimeError(f"compose.yaml publishes fixed ports, and these are taken here: {taken}"))
    compose = Compose(engine, {"CONFIGURE_TOKEN": ORCHESTRATOR_TOKEN, "LABEL_STUDIO_PASSWORD": "compose-test-pass"})
    compose("down", "-v", check=False)  # a run that was killed before its own down
    began = time.monotonic()
    compose("up", "-d")
    engine.costs["compose up"] = time.monotonic() - began
    yield compose
    compose("down", "-v", check=False)
    print(json.dumps({step: round(seconds, 1) for step, seconds in engine.costs.items()}))


def test_the_readme_walk_through_on_compose(stack, tmp_path):
    try:
        walk_through(stack, tmp_path)
    except BaseException:
        print(stack("logs", "--tail", "60", check=False).stdout[-8000:])
        raise


def walk_through(stack: Compose, tmp_path: Path) -> None:
    ports = published_ports()
    label_studio_url = f"http://127.0.0.1:{ports['label-studio']}"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    orchestrator_url = f"http://127.0.0.1:{ports['orchestrator']}"
    services = (mlflow_url, orchestrator_url, label_studio_url)
    for url in services:
        wait_until(lambda: requests.get(url + "/health", timeout=2).ok, 300, url)  # noqa: B023 - called at once

    # The README: register the demo models in its MLflow, from the checkout.
    subprocess.run([sys.executable, "-m", "examples.models", mlflow_url, "--no-torch"], cwd=ROOT, env=base_env(),
                   check=True, capture_output=True, timeout=600)
    # In Label Studio: a project with the image-classification config, images uploaded, a Personal Access Token.
    label_studio = LabelStudioApi.signed_in(label_studio_url, "admin@example.com", "compose-test-pass")
    uploads = []
    for name, grey in (("white", 240), ("black", 10)):
        Image.new("RGB", (32, 24), (grey, grey, grey)).save(tmp_path / f"{name}.png")
        uploads.append(tmp_path / f"{name}.png")
    project = new_project(label_studio, "compose", IMAGE_CONFIG, uploads=uploads)

    # The token to the orchestrator, so that its backends can read uploaded files; then connect the project.
    stack.env["LABEL_STUDIO_API_KEY"] = label_studio.pat
    # As the docs say: the changed environment recreates the orchestrator alone. (`--force-recreate` would
    # recreate MLflow and Label Studio too under podman-compose, and configure raced MLflow's start.)
    before = stack.containers()
    stack("up", "-d", "orchestrator")
    after = stack.containers()
    assert {name for name in after if after[name] != before.get(name)} == {"orchestrator"}, (before, after)
    for url in services:
        wait_until(lambda: requests.get(url + "/health", timeout=2).ok, 120, url + ", after the orchestrator's restart")  # noqa: B023
    configured = subprocess.run(
        [str(BIN / "ls-mlflow"), "configure", "--url", orchestrator_url, "--token", ORCHESTRATOR_TOKEN,
         "--model", "models:/brightness@champion", "--pre-hook", "examples/hooks.py:brightness_pre",
         "--post-hook", "examples/hooks.py:choices_post", "--project", str(project),
         "--label-studio-url", label_studio_url, "--api-key", label_studio.pat,
         "--backend-url", "http://orchestrator:9090"],
        cwd=ROOT, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, capture_output=True, text=True,
        timeout=600, check=False)
    assert configured.returncode == 0, configured.stdout + configured.stderr

    def predicted() -> dict[str, str]:
        return {task["data"]["image"].rpartition("-")[2]: prediction["result"][0]["value"]["choices"][0]
                for task in tasks_of(label_studio, project) for prediction in stored(label_studio, task["id"])}

    wait_until(lambda: len(predicted()) == 2, 120, "the predictions stored in Label Studio")
    assert predicted() == {"white.png": "light", "black.png": "dark"}, json.dumps(tasks_of(label_studio, project))[:3000]
