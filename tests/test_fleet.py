"""Many models on one machine, with real processes: backends that sleep when idle and wake on demand,
Label Studio's /health and /setup answered for a sleeping one without waking it, and a memory budget
(PSS) that puts the least recently used backend to sleep to make room, or refuses a start with a 503."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import requests

from harness.calls import configure as configure_call
from harness.calls import image_tasks, labels, labels_and_version, predict, predict_images
from harness.servers import ROOT, wait_until
from lsmlflow.pickling import encode_hook
from orchestrator.fleet import MEASURE_NICE
from orchestrator.turns import default_turns
from tests.support.hooks import IMAGE_CONFIG, recording_post


def configure(orchestrator, **body):
    answer = configure_call(orchestrator, **body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def state(orchestrator, backend_id):
    return orchestrator.backends()[backend_id]


def asleep_now(orchestrator, backend_id) -> bool:
    """Asleep, and stopped (its state says sleeping a moment before its process has ended)."""
    record = state(orchestrator, backend_id)
    return record["state"] == "sleeping" and record["handle"] == ""


def alive(handle: str) -> bool:
    pid = int(handle.partition(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def metric(orchestrator, name: str) -> float:
    text = requests.get(orchestrator.url + "/metrics", timeout=5).text
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_an_idle_backend_sleeps_label_studio_does_not_wake_it_and_a_prediction_does(start_orchestrator, images):
    orchestrator = start_orchestrator()
    sleepy = configure(orchestrator, model_uri="models:/brightness/1", idle_stop_s=1.5)
    pinned = configure(orchestrator, model_uri="models:/brightness/2", idle_stop_s=1, always_on=True)
    url = sleepy["label_studio_url"]
    assert labels_and_version(predict_images(url, images, "white", "black")) == (["light", "dark"], "brightness:1")
    connect = {"project": "3.1", "schema": IMAGE_CONFIG, "hostname": "http://127.0.0.1:8080", "access_token": "pat-1"}
    assert requests.post(url + "setup", json=connect, timeout=5).json()["model_version"] == "brightness:1"
    handle = state(orchestrator, sleepy["id"])["handle"]

    wait_until(lambda: asleep_now(orchestrator, sleepy["id"]), 30, "the idle backend to sleep")
    asleep = state(orchestrator, sleepy["id"])
    assert not alive(handle) and asleep["handle"] == "" and asleep["sleeps"] == 1
    assert asleep["model_version"] == "brightness:1" and asleep["memory_bytes"] > 0  # what waking it will take
    awake = state(orchestrator, pinned["id"])
    assert awake["state"] == "ready" and awake["idle_s"] > 1 and awake["sleeps_after_idle_s"] is None  # always on

    # Label Studio opening the project: health and setup from the record, the backend left asleep.
    health = requests.get(url + "health", timeout=1)
    assert health.ok and health.json()["status"] == "UP" and health.json()["sleeping"]
    assert health.json()["model_version"] == "brightness:1"
    assert requests.post(url + "setup", json=connect, timeout=1).json() == {"model_version": "brightness:1"}
    status = subprocess.run([sys.executable, "-m", "lsmlflow", "status", "--url", orchestrator.url, "--json"],
                            capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    shown = {row["id"]: row for row in json.loads(status.stdout)["backends"]}
    assert shown[sleepy["id"]]["state"] == "sleeping" and shown[sleepy["id"]]["version"] == "brightness:1"
    assert shown[sleepy["id"]]["memory"].endswith(" MiB") and shown[pinned["id"]]["state"] == "ready"
    assert state(orchestrator, sleepy["id"])["state"] == "sleeping"

    # A prediction wakes it: the right answer, from a new process that restored the configuration.
    assert labels_and_version(predict_images(url, images, "black", "white")) == (["dark", "light"], "brightness:1")
    woken = state(orchestrator, sleepy["id"])
    assert woken["state"] == "ready" and woken["wakes"] == 1 and woken["handle"] not in ("", handle)
    assert metric(orchestrator, 'lsorchestrator_fleet_events_total{event="wake"}') == 1
    assert metric(orchestrator, 'lsorchestrator_fleet_events_total{event="sleep_idle"}') == 1
    turns = requests.get(orchestrator.url + "/backends", timeout=5).json()["memory"]["wake_turns"]
    assert turns == {"limit": default_turns("process"), "held": 0, "waiting": 0}  # given back with its answer
    assert metric(orchestrator, "lsorchestrator_wake_turns_waiting") == 0

    # A /setup with a token the backend has not seen is its to keep: that wakes it too.
    wait_until(lambda: asleep_now(orchestrator, sleepy["id"]), 30, "the backend to sleep again")
    renewed = requests.post(url + "setup", json={**connect, "access_token": "pat-2"}, timeout=30)
    assert renewed.json()["model_version"] == "brightness:1"
    assert state(orchestrator, sleepy["id"])["wakes"] == 2


def test_what_the_background_finished_is_kept_across_a_sleep_and_not_predicted_again(start_orchestrator, images, tmp_path):
    # A backend forked from the template leaves with os._exit: its worker keeps the prediction cache itself.
    orchestrator = start_orchestrator(PREDICT_TIMEOUT_S="1")
    record = tmp_path / "predicted"
    backend = configure(orchestrator, model_uri="models:/brightness/1", idle_stop_s=1, batch_size=1,
                        post_hook=encode_hook(recording_post(str(record), 0.15)))
    names = ["white", "black"] * 8  # 16 tasks of 0.15 s each against a 1 s deadline: most go on in the background
    tasks = image_tasks(images, *names)
    first = predict(backend["label_studio_url"], tasks, timeout=30)
    assert first.status_code == 200, first.text
    assert None in labels(first)
    wait_until(lambda: asleep_now(orchestrator, backend["id"]), 60, "the background to finish and the backend to sleep")
    background = [task for task, label in zip(tasks, labels(first)) if label is None]
    kept = Path(state(orchestrator, backend["id"])["model_dir"]) / "prediction-cache.json"
    assert len(json.loads(kept.read_text())) == len(background)

    again = predict(backend["label_studio_url"], background, timeout=30)  # it wakes, and answers from what it kept
    expected = {task["id"]: "light" if name == "white" else "dark" for task, name in zip(tasks, names)}
    assert labels(again) == [expected[task["id"]] for task in background]
    assert Counter(int(line) for line in record.read_text().split()) == Counter(list(expected))  # each once, in all


def thread_priorities(pid: int) -> list[int]:
    """The nice value of each thread of a process (field 19 of its stat)."""
    found = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            found.append(int(stat.read_text().rpartition(")")[2].split()[16]))
        except (OSError, ValueError, IndexError):
            pass
    return found


def test_a_budget_for_one_backend_puts_the_least_recently_used_to_sleep_or_refuses_the_start(start_orchestrator, images):
    # How much one backend holds here, measured first: the budget is set between one and two of them.
    measuring = start_orchestrator(ORCHESTRATOR_ON_EXIT="keep")
    first = configure(measuring, model_uri="models:/brightness/1")
    url = lambda orchestrator, backend: f"{orchestrator.url}/models/{backend['id']}/"
    assert labels_and_version(predict_images(url(measuring, first), images, "white")) == (["light"], "brightness:1")
    wait_until(lambda: state(measuring, first["id"]).get("private_memory_now_bytes"), 30, "a measurement")
    measured = state(measuring, first["id"])
    one = max(measured["private_memory_now_bytes"], measured["memory_bytes"])  # what a second backend adds
    memory = requests.get(measuring.url + "/backends", timeout=5).json()["memory"]
    with_one = max(memory["in_use_bytes"], memory["pss_bytes"])  # a start counts the one, a read the other
    measuring.stop()  # ORCHESTRATOR_ON_EXIT=keep: the next orchestrator adopts it as it is, loaded

    budget = int(with_one + 0.6 * one)
    orchestrator = start_orchestrator(MEMORY_BUDGET=str(budget))
    adopted = state(orchestrator, first["id"])
    assert adopted["state"] == "ready", (budget, one, memory, adopted, orchestrator.output()[-3000:])
    # Its memory reads run in a thread of their own, at a lower priority than the requests' threads.
    wait_until(lambda: MEASURE_NICE in thread_priorities(orchestrator.proc.pid), 10, "the measuring thread")
    assert thread_priorities(orchestrator.proc.pid).count(0) >= 2
    second = configure(orchestrator, model_uri="models:/brightness/2")  # no room beside the first: it sleeps
    assert state(orchestrator, first["id"])["state"] == "sleeping"
    for turn in range(2):  # each in turn: the other makes room
        assert labels_and_version(predict_images(url(orchestrator, first), images, "white")) == (["light"], "brightness:1")
        assert state(orchestrator, second["id"])["state"] == "sleeping"
        assert labels_and_version(predict_images(url(orchestrator, second), images, "white")) == (["dark"], "brightness:2")
        assert state(orchestrator, first["id"])["state"] == "sleeping"
    listed = requests.get(orchestrator.url + "/backends", timeout=5).json()["memory"]
    assert listed["budget_bytes"] == budget and listed["in_use_bytes"] <= budget, listed
    assert metric(orchestrator, 'lsorchestrator_fleet_events_total{event="sleep_budget"}') >= 4

    # The awake one pinned: nothing may sleep for the other, whose start is refused, naming the budget.
    configure(orchestrator, model_uri="models:/brightness/2", always_on=True)
    refused = predict_images(url(orchestrator, first), images, "white")
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["type"] == "OverBudget" and "MEMORY_BUDGET" in body["error"] and "Raise MEMORY_BUDGET" in body["detail"]
    assert [holder["id"] for holder in body["held_by"]] == [second["id"]]
    assert body["held_by"][0]["why_awake"] == "always on"
    assert state(orchestrator, first["id"])["state"] == "sleeping" and state(orchestrator, second["id"])["state"] == "ready"
