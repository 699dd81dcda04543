"""The ray driver on a real multi-node Ray cluster on this machine (``ray.cluster_utils``): a head, a
worker with a (logical) GPU and a worker without, the orchestrator attached as a separate process.

Backends land by what they ask for, serve through the orchestrator, come back configured on another
node when theirs dies, wait as "pending" (naming the GPU) when no node can take them, hold no actor
and no GPU while asleep, and leave no process behind when deleted. Skipped, with the reason, where Ray is not installed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests

from harness.calls import predict_images
from harness.raycluster import add_gpu_node, local_cluster
from harness.servers import OrchestratorProcess, wait_until
from lsmlflow.pickling import encode_hook
from tests.support import hooks

ray = pytest.importorskip("ray", reason="the ray driver's tests need the ray package (requirements-dev.txt)")


@pytest.fixture(scope="module")
def cluster():
    """Head (no backends: it offers no backend slot), a GPU worker and a CPU worker, on loopback."""
    with local_cluster() as made:
        yield made


def backend_processes(state_dir: Path) -> list[int]:
    """Pids of every process whose environment names a MODEL_DIR under ``state_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"MODEL_DIR={state_dir}".encode() in environ:
            found.append(int(entry.name))
    return found


def predict(url, images, name):
    response = predict_images(url, images, name)
    assert response.status_code == 200, response.text
    prediction = response.json()["results"][0]
    return prediction["result"][0]["value"]["choices"][0], prediction["meta"]["cuda_visible_devices"]


def info_of(backend_id: str) -> dict:
    actor = ray.get_actor(f"lsbackend-{backend_id}", namespace="lsbackend")
    return ray.get(actor.info.remote(), timeout=10)


def node_of(backend_id: str) -> str:
    return info_of(backend_id)["node_id"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def test_backends_land_by_what_they_ask_move_when_their_node_dies_and_leave_nothing(cluster, registry, images, tmp_path):
    made, nodes = cluster
    state_dir = (tmp_path / "state").resolve()
    env = {
        "ORCHESTRATOR_DRIVER": "ray", "RAY_ADDRESS": made.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "MLFLOW_TRACKING_URI": registry, "LOCAL_FILES_ROOTS": str(images["white"].parent), "ORCHESTRATOR_ON_EXIT": "keep",
        "CONFIGURE_WAIT_S": "90",  # a load on a busy machine (the suite in parallel) may pass the default 20 s
    }
    orchestrator = OrchestratorProcess(state_dir, env).start()
    body = {"pre_hook": encode_hook(hooks.brightness_pre), "post_hook": encode_hook(hooks.gpu_peeking_post)}
    try:
        gpu = requests.post(orchestrator.url + "/configure", json={**body, "model_uri": "models:/brightness/1", "gpus": 1},
                            timeout=120)
        assert gpu.status_code == 200, gpu.text
        cpu = requests.post(orchestrator.url + "/configure", json={**body, "model_uri": "models:/brightness/2"}, timeout=120)
        assert cpu.status_code == 200, cpu.text
        gpu, cpu = gpu.json(), cpu.json()
        assert node_of(gpu["id"]) == nodes["gpu"].node_id
        assert predict(gpu["label_studio_url"], images, "white") == ("light", "0")  # the GPU Ray gave it
        assert predict(cpu["label_studio_url"], images, "white") == ("dark", "")  # none, even on a GPU node

        # No GPU left: a third GPU model cannot be placed, and says so at once instead of timing out.
        third = requests.post(orchestrator.url + "/configure",
                              json={**body, "model_uri": "models:/brightness@champion", "gpus": 1}, timeout=120)
        assert third.status_code == 409 and "no GPU is free" in third.json()["error"], third.text

        # A new orchestrator (the old one left its backends, as production servers do) adopts them by name.
        handles = {i: (b["handle"], b["port"]) for i, b in orchestrator.backends().items()}
        orchestrator.stop()
        assert "left 2 backend(s) running (ORCHESTRATOR_ON_EXIT=keep)" in orchestrator.output()
        orchestrator = OrchestratorProcess(state_dir, env, port=orchestrator.port).start()  # Label Studio's URLs hold
        assert {i: (b["handle"], b["port"]) for i, b in orchestrator.backends().items()} == handles
        assert predict(gpu["label_studio_url"], images, "black") == ("dark", "0")

        # The CPU backend's node dies: the supervisor starts it on the other node, configured from its MODEL_DIR;
        # the dead actor's backend does not outlive it.
        cpu_node = node_of(cpu["id"])
        old_backend = info_of(cpu["id"])["pid"]
        made.remove_node(nodes["gpu"] if cpu_node == nodes["gpu"].node_id else nodes["cpu"], allow_graceful=False)
        wait_until(lambda: not alive(old_backend), 20, "the dead node's backend gone")
        wait_until(lambda: orchestrator.backends()[cpu["id"]]["restarts"] >= 1, 60, "restarted elsewhere")
        wait_until(lambda: requests.get(cpu["label_studio_url"] + "health", timeout=2).json().get("configured"),
                   90, "serving again, configured")
        assert node_of(cpu["id"]) != cpu_node
        assert predict(cpu["label_studio_url"], images, "white") == ("dark", "")
        described = requests.get(f"{orchestrator.url}/backends/{cpu['id']}", timeout=10).json()
        assert described["host"] == "127.0.0.1" and described["log"]

        # The last worker dies too: nothing can take the backends, so they wait as "pending", naming what is
        # missing; a new GPU node takes them, and they serve again, configured.
        survivor = nodes["cpu"] if cpu_node == nodes["gpu"].node_id else nodes["gpu"]
        made.remove_node(survivor, allow_graceful=False)

        def pending(backend_id: str) -> str:
            record = orchestrator.backends()[backend_id]
            return record["last_error"] if record["state"] == "pending" else ""

        wait_until(lambda: "no node of the cluster has 1 GPU" in pending(gpu["id"]), 60, "the GPU backend pending")
        add_gpu_node(made)
        for backend in (gpu, cpu):
            wait_until(lambda b=backend: requests.get(b["label_studio_url"] + "health", timeout=2).json().get("configured"),
                       90, f"{backend['id']} serving again on the new node")
        assert predict(gpu["label_studio_url"], images, "white") == ("light", "0")
        assert orchestrator.backends()[gpu["id"]]["state"] == "ready"

        # Asleep, a backend holds no actor and no GPU on the cluster; a prediction places it again.
        again = requests.post(orchestrator.url + "/configure", timeout=120,
                              json={**body, "model_uri": "models:/brightness/1", "gpus": 1, "idle_stop_s": 1})
        assert again.status_code == 200, again.text
        wait_until(lambda: orchestrator.backends()[gpu["id"]]["handle"] == "", 60, "the GPU backend asleep")
        assert orchestrator.backends()[gpu["id"]]["state"] == "sleeping"
        with pytest.raises(ValueError):
            ray.get_actor(f"lsbackend-{gpu['id']}", namespace="lsbackend")
        wait_until(lambda: ray.available_resources().get("GPU", 0) >= 1, 30, "its GPU free on the cluster")
        assert predict(gpu["label_studio_url"], images, "white") == ("light", "0")
        assert orchestrator.backends()[gpu["id"]]["wakes"] == 1

        for backend in (gpu, cpu):
            assert requests.delete(f"{orchestrator.url}/backends/{backend['id']}", timeout=60).status_code == 200
        wait_until(lambda: backend_processes(state_dir) == [], 20, "no backend process left")
        with pytest.raises(ValueError):
            ray.get_actor(f"lsbackend-{cpu['id']}", namespace="lsbackend")
    finally:
        orchestrator.stop()
        for name in ray.util.list_named_actors():
            ray.kill(ray.get_actor(name, namespace="lsbackend"), no_restart=True)
        for pid in backend_processes(state_dir):
            os.kill(pid, signal.SIGKILL)
