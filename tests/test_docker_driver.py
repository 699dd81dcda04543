"""The docker driver's whole lifecycle against a real engine: podman serving the Docker API.

Skipped, with the reason, only where no engine can be started at all (.ci/run installs podman).
"""

from __future__ import annotations

import sys

import docker
import pytest
import requests

from orchestrator.drivers.docker import LABEL
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG, encode
from tests.support.podman import EngineUnavailable, Podman, host_mounts
from tests.support.servers import OrchestratorProcess, wait_until


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        podman = Podman(tmp_path_factory.mktemp("podman")).start()
        image = podman.import_backend_image(sys.executable)
    except EngineUnavailable as exc:
        pytest.skip(f"no container engine: {exc}")
    yield podman, image
    podman.stop()


def test_backend_containers_start_serve_restart_and_go(engine, registry, images, tmp_path):
    podman, image = engine
    registry_dir = registry.removeprefix("sqlite:///").rpartition("/")[0]
    images_dir = str(images["white"].parent)
    client = docker.DockerClient(base_url=podman.base_url)
    orchestrator = OrchestratorProcess(
        tmp_path / "state",
        {
            "ORCHESTRATOR_DRIVER": "docker",
            "DOCKER_HOST": podman.base_url,
            "DOCKER_IMAGE": image,
            "DOCKER_MOUNTS": ",".join(
                [*host_mounts(), f"{registry_dir}:{registry_dir}", f"{images_dir}:{images_dir}:ro"]
            ),
            "MLFLOW_TRACKING_URI": registry,
            "LOCAL_FILES_ROOTS": images_dir,  # passed on to the containers, where the folder is mounted
        },
    ).start()
    try:
        configured = requests.post(
            orchestrator.url + "/configure",
            timeout=120,
            json={
                "model_uri": "models:/brightness/1",
                "pre_hook": encode(hooks.brightness_pre),
                "post_hook": encode(hooks.choices_post),
            },
        )
        assert configured.status_code in (200, 202), configured.text  # 202: still loading after CONFIGURE_WAIT_S
        backend_id = configured.json()["id"]
        health_url = configured.json()["url"] + "/health"
        wait_until(lambda: requests.get(health_url, timeout=1).json()["configured"], 90, "configured")
        [container] = client.containers.list(filters={"label": f"{LABEL}.id={backend_id}"})
        assert (
            container.name == f"lsbackend-{backend_id}" and container.labels[f"{LABEL}.model"] == "models:/brightness/1"
        )

        def labels():
            tasks = [
                {"id": 1, "data": {"image": str(images["white"])}},
                {"id": 2, "data": {"image": str(images["black"])}},
            ]
            answer = requests.post(
                configured.json()["label_studio_url"] + "predict",
                timeout=30,
                json={"tasks": tasks, "label_config": IMAGE_CONFIG},
            )
            assert answer.status_code == 200, answer.text
            return [p["result"][0]["value"]["choices"][0] for p in answer.json()["results"]]

        assert labels() == ["light", "dark"]

        # Killed: the supervisor starts a new container on the same volume, which restores the configuration.
        container.kill()
        wait_until(lambda: orchestrator.backends()[backend_id]["restarts"] == 1, 60, "restart")
        wait_until(
            lambda: (
                orchestrator.backends()[backend_id]["state"] == "ready"
                and requests.get(health_url, timeout=1).json()["configured"]
            ),
            90,
            "restored",
        )
        assert labels() == ["light", "dark"]
        assert "exit code" in orchestrator.backends()[backend_id]["last_error"]

        # Deleted: container and volume removed.
        assert requests.delete(f"{orchestrator.url}/backends/{backend_id}", timeout=60).status_code == 200
        assert client.containers.list(all=True, filters={"label": f"{LABEL}.id={backend_id}"}) == []
        assert f"lsbackend-{backend_id}-data" not in [v.name for v in client.volumes.list()]
    except BaseException:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            print(f"--- {container.name} ({container.status}):\n{container.logs(tail=60).decode(errors='replace')}")
        raise
    finally:
        if orchestrator.proc.poll() is None:
            orchestrator.remove_all()
        orchestrator.stop()
        for leftover in client.containers.list(all=True, filters={"label": LABEL}):
            leftover.remove(force=True)
