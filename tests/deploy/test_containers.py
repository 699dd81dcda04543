"""The docker driver on the image users run: an orchestrator, on the host and inside that image itself,
starts one container of ``localhost/lsbackend:latest`` per model through podman's Docker API, with
nothing of the host's Python or of this checkout mounted into it: only the model and the task data a
user would mount (DOCKER_MOUNTS) and each backend's own volume."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
import requests
from PIL import Image

from harness.calls import labels, predict_images
from harness.servers import ROOT, OrchestratorProcess, base_env, free_port, wait_until
from lsmlflow import Client, ConfigureFailed
from orchestrator.drivers.docker import LABEL
from tests.deploy.conftest import ORCHESTRATOR_TOKEN as TOKEN
from tests.deploy.conftest import unavailable
from tests.support import hooks
from tests.support.images import IMAGE
from tests.support.podman import EngineUnavailable, Podman, recording_proxy

pytestmark = pytest.mark.deploy


@dataclass
class DockerApi:
    podman: Podman
    recorded_url: str  # DOCKER_HOST for the proxy that records each request into ``seen``
    seen: list[tuple[str, str, Any]]
    client: Any  # docker.DockerClient, straight to the engine


@dataclass
class Mounted:
    models: str
    images: str


@pytest.fixture(scope="module")
def docker_api(engine, tmp_path_factory):
    """podman's Docker API on a socket, and a loopback proxy to it that records what a driver asks for."""
    try:
        podman = Podman(tmp_path_factory.mktemp("podman")).start()
    except EngineUnavailable as exc:
        unavailable(exc)
    seen: list = []
    proxy = recording_proxy(podman.socket, seen)
    api = DockerApi(podman, proxy.url.replace("http://", "tcp://"), seen, docker.DockerClient(base_url=podman.base_url))
    yield api
    for leftover in api.client.containers.list(all=True, filters={"label": LABEL}):
        leftover.remove(force=True)
    proxy.close()
    podman.stop()


def readable(folder: Path) -> str:
    """``folder`` made readable by the image's user (uid 10001), as a user's shared data is."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(folder)


@pytest.fixture(scope="module")
def data(mlflow_server, tmp_path_factory) -> Mounted:
    """A model folder (the brightness model, downloaded from the registry as a user downloads one) and two
    images, to be mounted read-only into the containers at /models and /images."""
    root = tmp_path_factory.mktemp("mounted")
    download = "import sys, mlflow; mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2])"
    subprocess.run([sys.executable, "-c", download, "models:/brightness/1", str(root / "models" / "brightness")],
                   env=base_env(MLFLOW_TRACKING_URI=mlflow_server.url), cwd=ROOT, check=True, capture_output=True)
    (root / "images").mkdir()
    for name, grey in (("white", 240), ("black", 10)):
        Image.new("RGB", (32, 24), (grey, grey, grey)).save(root / "images" / f"{name}.png")
    return Mounted(models=readable(root / "models"), images=readable(root / "images"))


def created(seen: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """The bodies of the container creations the engine was asked for."""
    return [body for method, path, body in seen if method == "POST" and urlsplit(path).path.endswith("/containers/create")]


IN_CONTAINER = {"white": Path("/images/white.png"), "black": Path("/images/black.png")}


def test_the_orchestrator_on_the_host_runs_a_container_per_model_from_the_image(docker_api, data, tmp_path):
    seen, client = docker_api.seen, docker_api.client
    orchestrator = OrchestratorProcess(tmp_path / "state", {
        "ORCHESTRATOR_DRIVER": "docker", "DOCKER_HOST": docker_api.recorded_url, "DOCKER_IMAGE": IMAGE,
        "DOCKER_MOUNTS": f"{data.models}:/models:ro,{data.images}:/images:ro", "LOCAL_FILES_ROOTS": "/images",
        "ORCHESTRATOR_GPUS": "",
    }).start()
    try:
        served = Client(orchestrator.url).configure("/models/brightness", pre_hook=hooks.brightness_pre,
                                                    post_hook=hooks.choices_post, wait=180)
        assert labels(predict_images(served.url, IN_CONTAINER, "white", "black")) == ["light", "dark"]

        [container] = client.containers.list(filters={"label": f"{LABEL}.id={served.backend_id}"})
        assert container.image.tags == [IMAGE] and container.attrs["Config"]["User"] == "backend"
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert set(mounts) == {"/data", "/models", "/images"}, mounts  # no Python, no checkout of the host's
        assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["Name"] == f"lsbackend-{served.backend_id}-data"
        [create] = created(seen)
        assert not create["HostConfig"].get("DeviceRequests")  # no GPU here, none asked for

        # Killed: a new container on the same volume, which restores the configuration and serves.
        container.kill()
        wait_until(lambda: orchestrator.backends()[served.backend_id]["restarts"] >= 1, 60, "a restart")
        wait_until(lambda: orchestrator.backends()[served.backend_id]["state"] == "ready", 120, "ready again")
        assert labels(predict_images(served.url, IN_CONTAINER, "white", "black")) == ["light", "dark"]

        # Deleted: its container and its volume go.
        assert requests.delete(f"{orchestrator.url}/backends/{served.backend_id}", timeout=60).status_code == 200
        assert client.containers.list(all=True, filters={"label": f"{LABEL}.id={served.backend_id}"}) == []
        assert f"lsbackend-{served.backend_id}-data" not in [v.name for v in client.volumes.list()]
    except BaseException:
        print(orchestrator.output()[-4000:])
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            print(f"--- {container.name} ({container.status}):\n{container.logs(tail=60).decode(errors='replace')}")
        raise
    finally:
        orchestrator.remove_all()
        orchestrator.stop()


def test_a_gpu_is_asked_for_the_docker_way(docker_api, data, tmp_path):
    """No GPU here: the request the engine got shows the device request that a GPU machine's engine honours
    (podman 4.3 without one accepts it and runs the backend on the CPU, which its /health then says)."""
    seen = docker_api.seen
    seen.clear()
    orchestrator = OrchestratorProcess(tmp_path / "state", {
        "ORCHESTRATOR_DRIVER": "docker", "DOCKER_HOST": docker_api.recorded_url, "DOCKER_IMAGE": IMAGE,
        "DOCKER_MOUNTS": f"{data.models}:/models:ro", "ORCHESTRATOR_GPUS": "0",
    }).start()
    try:
        served = Client(orchestrator.url).configure("/models/brightness", pre_hook=hooks.brightness_pre,
                                                    post_hook=hooks.choices_post, wait=180)
        [create] = created(seen)
        assert create["HostConfig"]["DeviceRequests"] == [
            {"Driver": "", "Count": 0, "DeviceIDs": ["0"], "Capabilities": [["gpu"]], "Options": {}}]
        assert "NVIDIA_VISIBLE_DEVICES=0" in create["Env"]
        assert orchestrator.backends()[served.backend_id]["gpu"] == "0"
        assert requests.get(served.url + "health", timeout=5).json()["device"] == "cpu"
    finally:
        orchestrator.remove_all()
        orchestrator.stop()


def test_the_orchestrator_in_the_image_runs_its_backends_as_sibling_containers(docker_api, engine, data, mlflow_server):
    """The image's own orchestrator (the engine's socket mounted, the host's network): it refuses configure
    without its token, starts a sibling container per model from the same image and routes to it."""
    client = docker_api.client
    socket = docker_api.podman.socket
    socket.chmod(0o660)  # the engine's socket for its group, as Docker's is for the docker group
    port = free_port()
    name = f"lsbackend-orchestrator-{port}"
    engine.run("run", "-d", "--name", name, "--network", "host", "--label", f"{LABEL}=orchestrator-test",
               "--group-add", str(socket.stat().st_gid), "-v", f"{socket}:/run/docker.sock",
               "-e", "ORCHESTRATOR_DRIVER=docker", "-e", "DOCKER_HOST=unix:///run/docker.sock", "-e", "DOCKER_NETWORK=host",
               "-e", f"DOCKER_IMAGE={IMAGE}", "-e", f"PORT={port}", "-e", f"CONFIGURE_TOKEN={TOKEN}",
               "-e", "ORCHESTRATOR_DIR=/data/orchestrator", "-e", f"MLFLOW_TRACKING_URI={mlflow_server.url}",
               "-e", f"DOCKER_MOUNTS={data.images}:/images:ro", "-e", "LOCAL_FILES_ROOTS=/images", "-e", "ORCHESTRATOR_GPUS=",
               IMAGE, "python", "-m", "lsmlflow", "orchestrator")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/health", timeout=1).ok, 90, "the orchestrator in its container")
        with pytest.raises(ConfigureFailed) as refused:
            Client(url).configure("models:/brightness/1", post_hook=hooks.choices_post)
        assert refused.value.status == 401
        served = Client(url, token=TOKEN).configure("models:/brightness/1", pre_hook=hooks.brightness_pre,
                                                    post_hook=hooks.choices_post, wait=180)
        assert labels(predict_images(served.url, IN_CONTAINER, "white", "black")) == ["light", "dark"]
        [backend] = client.containers.list(filters={"label": f"{LABEL}.id={served.backend_id}"})
        assert backend.attrs["HostConfig"]["NetworkMode"] == "host" and backend.image.tags == [IMAGE]
        assert requests.delete(f"{url}/backends/{served.backend_id}", timeout=60,
                               headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.containers.list(all=True, filters={"label": f"{LABEL}.id={served.backend_id}"}) == []
    except BaseException:
        print(engine.run("logs", name, check=False).stderr.decode(errors="replace")[-4000:])
        raise
    finally:
        engine.run("rm", "-f", name, check=False)
