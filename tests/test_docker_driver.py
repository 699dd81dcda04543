"""The docker driver's whole lifecycle against a real engine: podman serving the Docker API.

Skipped, with the reason, only where no engine can be started at all (.ci/run installs podman).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import docker
import pytest
import requests
import yaml

from harness.calls import labels, predict_images
from harness.servers import ROOT, OrchestratorProcess, free_port, wait_until
from lsmlflow import Client, ConfigureFailed
from lsmlflow.pickling import encode_hook
from orchestrator.drivers.docker import LABEL
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG
from tests.support.podman import EngineUnavailable, Podman, host_mounts


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
                "pre_hook": encode_hook(hooks.brightness_pre),
                "post_hook": encode_hook(hooks.choices_post),
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

        def labels_now():
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

        assert labels_now() == ["light", "dark"]

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
        assert labels_now() == ["light", "dark"]
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


def test_the_compose_orchestrator_service_runs_in_a_container(engine, registry, images, tmp_path):
    """compose.yaml's orchestrator service, its command and environment as written, in a container of the
    local image: it refuses configure without the token, runs a backend per model inside the container,
    routes to it, and stops it when the container stops."""
    podman, image = engine
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["orchestrator"]
    registry_dir = registry.removeprefix("sqlite:///").rpartition("/")[0]
    images_dir = str(images["white"].parent)
    (tmp_path / "data").mkdir()
    env = {name: str(value) for name, value in service["environment"].items()}
    env.update(  # what compose would interpolate, and the host paths this engine mounts instead of MLflow's server
        CONFIGURE_TOKEN="compose-t0ken", LABEL_STUDIO_API_KEY="", MLFLOW_TRACKING_URI=registry,
        LOCAL_FILES_ROOTS=images_dir, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
        MLFLOW_DISABLE_TELEMETRY="true", GRACEFUL_TIMEOUT="3",
    )
    port = free_port()
    client = docker.DockerClient(base_url=podman.base_url)
    container = client.containers.run(
        image, command=service["command"], environment=env, detach=True, labels={LABEL: "compose-test"},
        ports={f"{env['PORT']}/tcp": ("127.0.0.1", port)},
        volumes=[*host_mounts(), f"{registry_dir}:{registry_dir}", f"{images_dir}:{images_dir}:ro", f"{tmp_path / 'data'}:/data"],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/health", timeout=1).ok, 90, "the orchestrator service")
        health = requests.get(url + "/health", timeout=5).json()
        assert health["model_class"] == "orchestrator" and health["runtime"]["python"] == platform.python_version()
        with pytest.raises(ConfigureFailed) as refused:
            Client(url).configure("models:/brightness/1", post_hook=hooks.choices_post)
        assert refused.value.status == 401

        served = Client(url, token="compose-t0ken").configure("models:/brightness/1", pre_hook=hooks.brightness_pre,
                                                              post_hook=hooks.choices_post)
        assert served.url == f"{url}/models/{served.backend_id}/"
        assert labels(predict_images(served.url, images, "white", "black")) == ["light", "dark"]
        assert (tmp_path / "data" / "orchestrator" / "registry.db").exists()  # its state, on the service's volume

        container.stop(timeout=30)
        assert "stopped 1 backend(s)" in container.logs().decode(errors="replace")
    except BaseException:
        print(container.logs(tail=80).decode(errors="replace"))
        raise
    finally:
        container.remove(force=True)
