"""A big project against Label Studio's single "Retrieve predictions" request.

``bigproject`` (``run_push``): one press in a real Label Studio (default token mode, a Personal Access
Token), 10,000 tasks at 15 ms each, the real 90 s deadline and Label Studio's real 100 s; the backend
writes what misses the deadline into Label Studio as it finishes. Measured: presses needed, the wall
time from the press to the last stored prediction against the pure compute time, predictions stored twice.

``big`` (``run``): rounds until all is stored, without the push, against a simulated Label Studio:

Label Studio sends every selected task in one /predict, waits 100 s, and stores nothing on an error or
a timeout. The Label Studio simulated here does just that, round after round, as a user pressing the
button again at once would: it sends the tasks that have no stored prediction yet, stores every
non-empty result, and counts. Time is scaled down ten times so the run takes seconds: 10,000 tasks at
1.5 ms each (15 ms), a 9 s deadline (the default 90 s) and a 10 s client timeout (Label Studio's 100 s).

The baseline is the previous release, whose rule was all or nothing: when the work did not fit, a 504
at the deadline, and Label Studio stores nothing. With 15 s of work and a 9 s deadline that is every
round, so its figures (nothing stored, never done) follow from the rule; they are not measured.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from harness.label_studio import LabelStudioUnavailable, start_label_studio
from harness.servers import ROOT, Backend, base_env, wait_until
from lsmlflow.pickling import encode_hook

from . import models
from .common import Row, Table

SCALE = 10
TASKS = 10_000
PER_TASK_MS = 15.0


def simulate_label_studio(url: str, tasks: list[dict], client_timeout_s: float, max_rounds: int = 10) -> tuple[list[int], float]:
    """Rounds of 'Retrieve predictions' until every task has a stored prediction: stored per round, seconds."""
    session = requests.Session()
    remaining, stored, started = tasks, [], time.perf_counter()
    for _ in range(max_rounds):
        answer = session.post(url + "/predict", json={"tasks": remaining, "label_config": models.TEXT_CONFIG},
                              timeout=client_timeout_s)
        answer.raise_for_status()
        results = answer.json()["results"]
        assert len(results) == len(remaining)
        stored.append(sum(1 for r in results if r))  # Label Studio stores a dict; [] stores nothing
        remaining = [task for task, result in zip(remaining, results) if not result]
        if not remaining:
            break
    return stored, time.perf_counter() - started


def run(table: Table, workdir: Path) -> None:
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "bench.models", registry], cwd=ROOT, env=base_env(), check=True,
                   capture_output=True)
    deadline_s = 90.0 / SCALE
    folder = workdir / "big"
    folder.mkdir()
    backend = Backend(folder, {"MLFLOW_TRACKING_URI": registry, "PREDICT_TIMEOUT_S": str(deadline_s)}).start()
    try:
        answer = requests.post(backend.url + "/configure", timeout=120, json={
            "model_uri": "models:/per_item_1_5ms/1", "pre_hook": encode_hook(models.pre_hook),
            "post_hook": encode_hook(models.post_hook)})
        assert answer.status_code == 200, answer.text
        tasks = [{"id": i, "data": {"text": f"task {i} " + "x" * (i % 12)}} for i in range(TASKS)]
        stored, seconds = simulate_label_studio(backend.url, tasks, 100.0 / SCALE)
    finally:
        backend.stop()
    what = f"{TASKS:,} tasks x {PER_TASK_MS:g} ms, Label Studio's 100 s limit (time scaled 1/{SCALE})"
    done = sum(stored) == TASKS
    table.add(Row("big project", f"{what}: rounds of 'Retrieve predictions' to store every task",
                  len(stored) if done else float("inf"), float("inf"), "rounds",
                  "previous release: a 504 each round, nothing stored", target="a few"))
    table.add(Row("big project", "same: predictions stored by the first round", stored[0], 0.0, "tasks",
                  "previous release", higher_is_better=True))
    table.add(Row("big project", "same: seconds until every task is stored, rounds back to back",
                  seconds * SCALE if done else float("inf"), float("inf"), "s (unscaled)", "previous release: never"))
    table.notes.append(f"big project: stored per round {stored} of {TASKS:,}; "
                       f"{sum(stored):,} stored in all, each task once")


PUSH_TASKS = 10_000
PUSH_PER_TASK_MS = 15.0


def run_push(table: Table, workdir: Path) -> None:
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "bench.models", registry], cwd=ROOT, env=base_env(), check=True,
                   capture_output=True)
    try:
        label_studio = start_label_studio(workdir / "label-studio")
    except LabelStudioUnavailable as exc:
        table.notes.append(f"bigproject: skipped, no Label Studio here: {exc}")
        return
    backend = None
    try:
        pat = label_studio.default_token_mode()
        (workdir / "push").mkdir()
        backend = Backend(workdir / "push", {"MLFLOW_TRACKING_URI": registry, "LABEL_STUDIO_URL": label_studio.url,
                                             "LABEL_STUDIO_API_KEY": pat}).start()
        answer = requests.post(backend.url + "/configure", timeout=120, json={
            "model_uri": "models:/per_item_15ms/1", "pre_hook": encode_hook(models.pre_hook),
            "post_hook": encode_hook(models.post_hook)})
        assert answer.status_code == 200, answer.text
        project = label_studio.api("POST", "/api/projects", json={"title": "big", "label_config": models.TEXT_CONFIG})["id"]
        label_studio.api("POST", f"/api/projects/{project}/import",
                         json=[{"text": f"task {i} " + "x" * (i % 12)} for i in range(PUSH_TASKS)])
        label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "bench"})
        count = lambda: label_studio.api("GET", f"/api/projects/{project}")["total_predictions_number"]
        compute_s = PUSH_TASKS * PUSH_PER_TASK_MS / 1000.0
        started = time.perf_counter()
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                         json={"selectedItems": {"all": True, "excluded": []}}, timeout=1800)  # the one press
        answered_s, answered = time.perf_counter() - started, count()
        while count() < PUSH_TASKS and time.perf_counter() - started < 3 * compute_s + 120:
            time.sleep(0.5)
        wall_s = time.perf_counter() - started
        stored = label_studio.api("GET", f"/api/predictions?project={project}")
        push = lambda: requests.get(backend.url + "/health", timeout=5).json()["push"]
        progress = lambda: push().get("projects", {}).get(str(project), {})
        wait_until(lambda: progress().get("left") == 0, 30, "the last chunk's answer")  # the count came first
        pushed = progress()
    finally:
        if backend is not None:
            backend.stop()
        label_studio.stop()
    tasks = {p["task"] for p in stored}
    twice = len(stored) - len(tasks)
    what = f"{PUSH_TASKS:,} tasks x {PUSH_PER_TASK_MS:g} ms in a real Label Studio (the 90 s deadline, its 100 s)"
    done = len(tasks) == PUSH_TASKS
    table.add(Row("big project", f"{what}: presses of 'Retrieve predictions' to store every task",
                  1 if done else float("inf"), float(-(-compute_s // 90)), "presses",
                  "without the push: one per 90 s of work", target="1"))
    table.add(Row("big project", "same: seconds from the press to the last stored prediction",
                  wall_s if done else float("inf"), compute_s, "s", "the pure compute time", target="<= 1.2x of it"))
    table.add(Row("big project", "same: predictions stored twice", float(twice), 0.0, "predictions", "none",
                  target="0"))
    table.notes.append(
        f"bigproject: the press returned after {answered_s:.1f} s (Label Studio's own preparation, then the 90 s "
        f"deadline), {answered:,} predictions already in Label Studio then; the push's figures: {pushed}; "
        f"{len(tasks):,} tasks with a prediction, {len(stored):,} predictions")
