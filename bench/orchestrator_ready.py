"""Configure-to-ready through the orchestrator, against the old design's fixed 10 s wait; backend memory.

Ten distinct models (ten aliases of one registered model: the model's identity is its URI, so each
gets its own backend) are configured one after another; each time is from POST /configure to the
answer "ready" (a started backend with the model loaded). The old design slept 10 s before it even
forwarded the configure, so 10 s is a floor for it, and the ratio flatters it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from examples.hooks import brightness_pre, choices_post
from harness.servers import ROOT, OrchestratorProcess, base_env, register_models, wait_until
from lsmlflow.pickling import encode_hook

from .common import Row, Table, median, tree_pss_mib, tree_rss_mib

OLD_FIXED_WAIT_S = 10.0
BACKENDS = 10

ALIASES = """
import mlflow, sys
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
for i in range(int(sys.argv[2])):
    client.set_registered_model_alias("brightness", f"b{i}", "1")
"""


def configure_seconds(orchestrator: OrchestratorProcess, model_uri: str) -> float:
    """From POST /configure to the answer that the backend is ready with the model loaded."""
    hooks = {"pre_hook": encode_hook(brightness_pre), "post_hook": encode_hook(choices_post)}
    started = time.perf_counter()
    answer = requests.post(orchestrator.url + "/configure", json={"model_uri": model_uri, **hooks}, timeout=120)
    seconds = time.perf_counter() - started
    assert answer.status_code == 200 and answer.json()["state"] == "ready", answer.text
    return seconds


def run(table: Table, workdir: Path) -> None:
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    register_models(registry, with_torch=False)
    subprocess.run([sys.executable, "-c", ALIASES, registry, str(BACKENDS)], cwd=ROOT, env=base_env(), check=True)
    orchestrator = OrchestratorProcess(
        workdir / "state", {"MLFLOW_TRACKING_URI": registry, "MAX_BACKENDS": str(BACKENDS + 1), "WARM_SPARES": "0"}
    )
    orchestrator.start()
    try:
        seconds = [configure_seconds(orchestrator, f"models:/brightness@b{i}") for i in range(BACKENDS)]
        table.add(
            Row(
                "orchestrator",
                "configure to ready, new backend started cold (WARM_SPARES=0; median of 10)",
                median(seconds),
                OLD_FIXED_WAIT_S,
                "s",
                "old design's fixed wait alone",
                target="a few seconds",
            )
        )
        table.add(
            Row(
                "orchestrator",
                "configure again, same model (hooks only)",
                configure_seconds(orchestrator, "models:/brightness@b0"),
                OLD_FIXED_WAIT_S,
                "s",
                "old design's fixed wait alone",
            )
        )
        pids = [int(b["handle"].partition(":")[0]) for b in orchestrator.backends().values()]
        one, ten = tree_rss_mib(pids[0]), sum(tree_rss_mib(pid) for pid in pids)
        pss_one, pss_ten = tree_pss_mib(pids[0]), sum(tree_pss_mib(pid) for pid in pids)
        table.notes.append(
            f"memory of one idle configured backend: {one:.0f} MiB RSS, {pss_one:.0f} MiB PSS; of ten: {ten:.0f} MiB RSS, "
            f"{pss_ten:.0f} MiB PSS (gunicorn master, worker, zygote and model process each; the model is a small "
            "scikit-learn one; RSS counts the pages a fork shares with its zygote twice, PSS splits them)"
        )
        table.notes.append(
            "MLflow 3.17 saves scikit-learn models with skops by default; loading one runs scikit-learn's estimator "
            "discovery, which imports torch when it is installed (as in this dev environment): about +2 s and +200 MiB "
            "per backend. A model logged with serialization_format='cloudpickle', or an image without torch, avoids it."
        )
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
    with_spares(table, workdir, registry)


def with_spares(table: Table, workdir: Path, registry: str, models: int = 5) -> None:
    """The default: one warm spare started ahead, claimed by the next new model and then replaced."""
    orchestrator = OrchestratorProcess(workdir / "state-spares", {"MLFLOW_TRACKING_URI": registry, "WARM_SPARES": "1"})
    orchestrator.start()
    try:
        seconds = []
        for i in range(models):
            wait_until(
                lambda: (
                    [s["state"] for s in requests.get(orchestrator.url + "/backends", timeout=5).json()["spares"]]
                    == ["ready"]
                ),
                120,
                "a ready spare",
            )
            seconds.append(configure_seconds(orchestrator, f"models:/brightness@b{i}"))
        table.add(
            Row(
                "orchestrator",
                f"configure to ready, new model on a warm spare (the default; median of {models})",
                median(seconds),
                OLD_FIXED_WAIT_S,
                "s",
                "old design's fixed wait alone",
                target="a few seconds",
            )
        )
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
        orchestrator.kill_leftovers()  # the spare it kept ready
