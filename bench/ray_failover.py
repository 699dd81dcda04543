"""The ray driver on a real three-node Ray cluster on this machine, against the process driver.

Configure to ready: a new model's backend started cold (no spare) on each driver, median of three.
Failover: a node holding a backend is killed (its raylet and workers SIGKILLed, as a crash); from
then until the backend answers a /predict through the orchestrator again, configured from its
MODEL_DIR on another node. Its baseline is what a backend costs anyway: a cold start on the process
driver. The cluster notices a dead node after ~3 s here (health checks every 1 s, 3 misses; Ray's
defaults take ~15 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from examples.hooks import IMAGE_CONFIG, brightness_pre, choices_post
from harness.raycluster import local_cluster
from harness.servers import ROOT, OrchestratorProcess, base_env, register_models, wait_until
from lsmlflow.pickling import encode_hook

from .common import Row, Table, median
from .orchestrator_ready import ALIASES, configure_seconds

ROUNDS = 3


def _predicts(url: str, image: Path) -> bool:
    try:
        answer = requests.post(url + "predict", json={"tasks": [{"id": 1, "data": {"image": str(image)}}],
                                                      "label_config": IMAGE_CONFIG}, timeout=5)
        return answer.status_code == 200 and bool(answer.json()["results"][0])
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return False


def _cold_starts(orchestrator: OrchestratorProcess, first_alias: int) -> list[float]:
    return [configure_seconds(orchestrator, f"models:/brightness@b{first_alias + i}") for i in range(ROUNDS)]


def run(table: Table, workdir: Path) -> None:
    import ray

    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    register_models(registry, with_torch=False)
    subprocess.run([sys.executable, "-c", ALIASES, registry, str(2 * ROUNDS + 1)], cwd=ROOT, env=base_env(), check=True)
    image = workdir / "white.png"
    from PIL import Image

    Image.new("RGB", (32, 24), (240, 240, 240)).save(image)
    common = {"MLFLOW_TRACKING_URI": registry, "LOCAL_FILES_ROOTS": str(workdir), "WARM_SPARES": "0"}

    process = OrchestratorProcess(workdir / "process-state", common).start()
    try:
        process_cold = _cold_starts(process, 0)
    finally:
        process.remove_all()
        process.stop()

    with local_cluster() as (cluster, nodes):
        orchestrator = OrchestratorProcess(workdir / "ray-state", {
            **common, "ORCHESTRATOR_DRIVER": "ray", "RAY_ADDRESS": cluster.address, "RAY_BACKEND_RESOURCE": "lsbackend",
        }).start()
        try:
            ray_cold = _cold_starts(orchestrator, ROUNDS)
            orchestrator.remove_all()  # free their nodes' backend slots: the survivor must have room
            hooks = {"pre_hook": encode_hook(brightness_pre), "post_hook": encode_hook(choices_post)}
            moved = requests.post(orchestrator.url + "/configure", timeout=120,
                                  json={"model_uri": f"models:/brightness@b{2 * ROUNDS}", **hooks}).json()
            url = moved["label_studio_url"]
            actor = ray.get_actor(f"lsbackend-{moved['id']}", namespace="lsbackend")
            node_id = ray.get(actor.info.remote(), timeout=10)["node_id"]
            doomed = next(n for n in nodes.values() if n.node_id == node_id)
            started = time.perf_counter()
            cluster.remove_node(doomed, allow_graceful=False)
            wait_until(lambda: not _predicts(url, image), 30, "the backend gone with its node")
            wait_until(lambda: _predicts(url, image), 120, "the backend serving again")
            failover = time.perf_counter() - started
        finally:
            orchestrator.remove_all()
            orchestrator.stop()

    table.add(Row("ray driver", "configure to ready, new backend started cold (median of 3)", median(ray_cold),
                  median(process_cold), "s", "process driver, same run", target="close to the process driver"))
    table.add(Row("ray driver", "a backend's node crashes: until it serves again, configured, on another node",
                  failover, median(process_cold), "s", "a cold start on the process driver",
                  target="seconds, no configure"))
    table.notes.append(
        f"ray driver: cold starts {', '.join(f'{s:.2f}' for s in ray_cold)} s on Ray, "
        f"{', '.join(f'{s:.2f}' for s in process_cold)} s on the process driver; a dead node is noticed after "
        "~3 s (health checks every 1 s, 3 misses)"
    )
