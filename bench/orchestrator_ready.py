"""Configure-to-ready through the orchestrator, against the old design's fixed 10 s wait; backend memory.

Ten distinct models (ten aliases of one registered model: the model's identity is its URI, so each
gets its own backend) are configured one after another; each time is from POST /configure to the
answer "ready" (a started backend with the model loaded). The old design slept 10 s before it even
forwarded the configure, so 10 s is a floor for it, and the ratio flatters it. The same ten again
with FORK_BACKENDS=off (each backend a new Python, as before the template) are the baseline for the
template's start and memory.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from backend.core.memory import tree_pids
from examples.hooks import brightness_pre, choices_post
from harness.servers import ROOT, OrchestratorProcess, base_env, register_models, wait_until
from lsmlflow.pickling import encode_hook

from .common import Row, Table, median, pss_mib, rss_mib

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


def add_start_rows(table: Table, what: str, forked: list[float], started: list[float], target: str = "") -> None:
    """Configure to ready: against the old design's fixed wait, and forked from the template against the
    same started as new Pythons."""
    table.add(Row("orchestrator", f"configure to ready, {what}", median(forked), OLD_FIXED_WAIT_S, "s",
                  "old design's fixed wait alone", target="a few seconds"))
    table.add(Row("orchestrator", "same: forked from the template vs started as new Pythons", median(forked),
                  median(started), "s", "FORK_BACKENDS=off, same run", target=target))


def ten_backends(workdir: Path, registry: str, fork: bool) -> tuple[list[float], float, float, float]:
    """Ten new models configured one after another on a fresh orchestrator: each configure's seconds;
    then, idle, the proportional and the resident memory of everything the orchestrator started
    (templates, backends, zygotes where they run as new Pythons, model processes; not the orchestrator
    itself); then the first model configured again, hooks only (median of 5)."""
    orchestrator = OrchestratorProcess(
        workdir / f"state-{'fork' if fork else 'exec'}",
        {
            "MLFLOW_TRACKING_URI": registry,
            "MAX_BACKENDS": str(BACKENDS + 1),
            "WARM_SPARES": "0",
            "FORK_BACKENDS": "on" if fork else "off",
        },
    )
    orchestrator.start()
    try:
        seconds = [configure_seconds(orchestrator, f"models:/brightness@b{i}") for i in range(BACKENDS)]
        started = [pid for pid in tree_pids(orchestrator.proc.pid) if pid != orchestrator.proc.pid]
        again = median([configure_seconds(orchestrator, "models:/brightness@b0") for _ in range(5)])
        return seconds, pss_mib(started), rss_mib(started), again
    finally:
        orchestrator.remove_all()
        orchestrator.stop()


def run(table: Table, workdir: Path) -> None:
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    register_models(registry, with_torch=False)
    subprocess.run([sys.executable, "-c", ALIASES, registry, str(BACKENDS)], cwd=ROOT, env=base_env(), check=True)
    forked, forked_pss, forked_rss, again = ten_backends(workdir, registry, fork=True)
    started, started_pss, started_rss, _ = ten_backends(workdir, registry, fork=False)
    add_start_rows(table, "new backend started cold (WARM_SPARES=0; median of 10)", forked, started, "<= 3 s")
    table.add(
        Row(
            "orchestrator",
            "ten idle configured backends: proportional memory (PSS) of everything the orchestrator started",
            forked_pss / 1024,
            started_pss / 1024,
            "GiB",
            "FORK_BACKENDS=off, same run",
            target="<= 2 GiB",
        )
    )
    table.notes.append(
        f"configure to ready, each of ten new models in order: forked {', '.join(f'{s:.2f}' for s in forked)} s; "
        f"new Pythons {', '.join(f'{s:.2f}' for s in started)} s. The first forked one waits for the template's "
        "imports (the orchestrator starts the template with its first backend; with WARM_SPARES=1, the default, "
        "that is when the orchestrator starts)"
    )
    table.notes.append(
        f"memory of ten idle configured backends: forked {forked_pss:.0f} MiB PSS, {forked_rss:.0f} MiB RSS; new "
        f"Pythons {started_pss:.0f} MiB PSS, {started_rss:.0f} MiB RSS (a gunicorn master, worker, zygote and model "
        "process each, plus the template where forked; the model is a small scikit-learn one; RSS counts shared "
        "pages once per process, PSS splits them)"
    )
    table.notes.append(
        "MLflow 3.17 saves scikit-learn models with skops by default; loading one runs scikit-learn's estimator "
        "discovery, which imports torch when it is installed (as in this dev environment). The template imports "
        "SPARE_WARM_IMPORTS (mlflow.sklearn and skops.io by default) once for every backend; a backend started as a "
        "new Python imports them in its own model process."
    )
    table.add(
        Row(
            "orchestrator",
            "configure again, same model (hooks only; median of 5)",
            again,
            OLD_FIXED_WAIT_S,
            "s",
            "old design's fixed wait alone",
        )
    )
    with_spares(table, workdir, registry)


def with_spares(table: Table, workdir: Path, registry: str, models: int = 5) -> None:
    """The default: one warm spare started ahead, claimed by the next new model and then replaced; the same
    with FORK_BACKENDS=off beside it."""
    forked, started = on_spares(workdir, registry, models, fork=True), on_spares(workdir, registry, models, fork=False)
    add_start_rows(table, f"new model on a warm spare (the default; median of {models})", forked, started)
    table.notes.append(
        f"new model on a warm spare, each of {models}: forked {', '.join(f'{s:.3f}' for s in forked)} s; "
        f"new Pythons {', '.join(f'{s:.3f}' for s in started)} s"
    )


def on_spares(workdir: Path, registry: str, models: int, fork: bool) -> list[float]:
    """Seconds of each configure of a new model, each on a ready spare."""
    orchestrator = OrchestratorProcess(
        workdir / f"state-spares-{'fork' if fork else 'exec'}",
        {"MLFLOW_TRACKING_URI": registry, "WARM_SPARES": "1", "FORK_BACKENDS": "on" if fork else "off"},
    )
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
        return seconds
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
        orchestrator.kill_leftovers()  # the spare it kept ready
