"""Training through MLflow: train_hook → a registered version with its lineage → gate → alias → served.

Each test registers a model of its own (a sentiment model that has it backwards, version 1 @champion)
in the session's SQLite registry, so trainings never move the aliases other tests rely on.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import requests
from mlflow import MlflowClient

from backend.core.lifetime import start_time
from harness.servers import register_trainable, wait_until
from lsmlflow.pickling import encode_hook
from tests.support.hooks import TEXT_CONFIG, sentiment_post, sentiment_train

WORDS = {"positive": ["great good", "lovely fine", "wonderful great", "good lovely"],
         "negative": ["bad awful", "terrible bad", "awful horrid", "horrid terrible"]}


def annotated_tasks(first_id: int = 1) -> list[dict]:
    """Label Studio tasks as its export gives them: data, and annotations with results."""
    tasks = []
    for n, (label, text) in enumerate((label, text) for label, texts in WORDS.items() for text in texts):
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
        tasks.append({"id": first_id + n, "data": {"text": text},
                      "annotations": [{"id": 100 + n, "result": result, "was_cancelled": False, "updated_at": "2026-01-01"}]})
    return tasks


def failing_train(texts, annotations):
    raise RuntimeError("no GPU in this notebook")


def sleeping_train(seconds):
    def train(texts, annotations):
        import time

        from examples.hooks import sentiment_train

        time.sleep(seconds)
        return sentiment_train(texts, annotations)

    return train


@pytest.fixture(scope="module")
def fresh_models(registry):
    """Registered models for this module's tests, made in one go (each costs a process start otherwise)."""
    names = [f"trainable-{uuid.uuid4().hex[:8]}" for _ in range(10)]
    register_trainable(registry, *names)
    return iter(names)


@pytest.fixture
def trainable(registry, fresh_models):
    """A registered model of the test's own (v1 @champion, backwards) and a configure body for it."""
    name = next(fresh_models)

    def body(train_hook=sentiment_train, **training):
        return {"model_uri": f"models:/{name}@champion", "tracking_uri": registry, "post_hook": encode_hook(sentiment_post),
                "train_hook": encode_hook(train_hook), "training": training}

    return name, body, MlflowClient(tracking_uri=registry)


def predict_label(client, text: str, task_id: int = 9999) -> tuple[str, str]:
    answer = client.post("/predict", json={"tasks": [{"id": task_id, "data": {"text": text}}], "label_config": TEXT_CONFIG}).get_json()
    return answer["results"][0]["result"][0]["value"]["choices"][0], answer["model_version"]


def wait_job(client, timeout: float = 180) -> dict:
    """The newest training job once it ended."""
    found: dict = {}

    def ended() -> bool:
        status = client.get("/train/status").get_json()
        found.update(status)
        return bool(status["jobs"]) and status["current"] is None  # ended, and its outcome recorded

    wait_until(ended, timeout, "the training")
    return found["jobs"][0]


def test_a_training_registers_a_version_with_its_lineage_promotes_it_and_the_backend_serves_it(app_with, trainable):
    name, body, mlflow = trainable
    client = app_with(alias_poll_s=60)  # the promotion itself makes it look at once
    assert client.post("/configure", json=body(gate_tasks=50)).status_code == 200
    assert predict_label(client, "great good") == ("negative", f"{name}:1")  # version 1 has it backwards

    started = client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    assert started.status_code == 201, started.get_json()
    assert started.get_json()["status"] == "started"
    job = wait_job(client)
    assert job["state"] == "succeeded", job
    assert (job["outcome"], job["version"], job["gate"]["passed"]) == ("promoted", "2", True)
    assert job["gate"]["new"]["agreement"] == 1.0 and job["gate"]["serving"]["agreement"] == 0.0

    version = mlflow.get_model_version(name, "2")
    assert version.tags["ls.project_id"] == "7" and version.tags["ls.annotation_count"] == "8"
    assert version.tags["lsbackend.parent_version"] == f"{name}:1"
    assert version.tags["lsbackend.train_hook"].startswith("pickle:")
    assert version.tags["lsbackend.gate"] == "passed"
    assert mlflow.get_registered_model(name).aliases == {"champion": 2, "candidate": 2}
    run = mlflow.get_run(job["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ls.trigger"] == "POST /train"
    assert run.data.metrics["gate.new.agreement"] == 1.0 and run.data.params["annotated_tasks"] == "8"

    wait_until(lambda: client.get("/health").get_json()["model_version"] == f"{name}:2", 60, "the swap to version 2")
    assert predict_label(client, "great good") == ("positive", f"{name}:2")
    health = client.get("/health").get_json()
    assert health["training"]["last"]["outcome"] == "promoted"
    assert health["registry"]["registry_names"] == f"{name}:2"
    wait_until(lambda: b'lsbackend_model_swaps_total{reason="training"} 1.0' in client.get("/metrics").data, 10, "the swap counted")
    assert b'lsbackend_training_runs_total{result="promoted"} 1.0' in client.get("/metrics").data


def test_manual_promotion_sets_only_the_candidate_and_a_person_promotes_it_in_mlflow(app_with, trainable):
    name, body, mlflow = trainable
    client = app_with(alias_poll_s=0.5)
    assert client.post("/configure", json=body(promote="manual")).status_code == 200
    client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    job = wait_job(client)
    assert (job["state"], job["outcome"]) == ("succeeded", "candidate")
    assert mlflow.get_registered_model(name).aliases == {"champion": 1, "candidate": 2}
    assert predict_label(client, "great good")[1] == f"{name}:1"

    mlflow.set_registered_model_alias(name, "champion", "2")  # what someone does in the MLflow UI
    wait_until(lambda: client.get("/health").get_json()["model_version"] == f"{name}:2", 30, "following the alias")
    assert predict_label(client, "great good") == ("positive", f"{name}:2")


def test_a_failing_train_hook_leaves_serving_and_the_alias_alone_and_backs_off(app_with, trainable):
    name, body, mlflow = trainable
    client = app_with()
    assert client.post("/configure", json=body(train_hook=failing_train, trigger="annotations", backoff_s=120)).status_code == 200
    client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    job = wait_job(client)
    assert job["state"] == "failed"
    assert "train_hook raised RuntimeError: no GPU in this notebook" in job["error"]
    assert "no GPU in this notebook" in job["log_tail"]  # the traceback, for the person fixing it
    assert mlflow.get_run(job["run_id"]).info.status == "FAILED"
    assert [str(v.version) for v in mlflow.search_model_versions(f"name='{name}'")] == ["1"]
    assert mlflow.get_registered_model(name).aliases == {"champion": 1}
    assert predict_label(client, "great good") == ("negative", f"{name}:1")
    # The job's own status says failed first; /health's summary follows on the trainer's next tick.
    wait_until(lambda: "last" in client.get("/health").get_json()["training"], 10, "the failure in /health")
    training = client.get("/health").get_json()["training"]
    assert training["last"]["state"] == "failed" and training["failures_in_a_row"] == 1

    # Enough new annotations, but automatic trainings wait out the backoff after a failure.
    for n in range(25):
        client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": n, "task": n, "result": []},
                                      "project": {"id": 7, "useful_annotation_number": 30}})
    projects = lambda: client.get("/health").get_json()["training"].get("projects", {})
    wait_until(lambda: projects()["7"]["changed_since_training"] == 25, 10, "the annotations counted")
    assert client.get("/train/status").get_json()["current"] is None
    assert "without new annotations" in projects()["7"]["waits_for"]  # quiet_s first, then the backoff


def test_the_webhook_answers_at_once_while_a_training_runs_and_a_second_start_is_coalesced(app_with, trainable):
    _, body, _ = trainable
    client = app_with()
    assert client.post("/configure", json=body(train_hook=sleeping_train(5))).status_code == 200
    client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "label_config": TEXT_CONFIG}})
    assert answer.status_code == 201
    assert answer.get_json()["training"] == "coalesced"
    status = client.get("/train/status").get_json()
    assert status["jobs"][0]["state"] == "running"  # the webhook did not wait for it
    assert status["request"]["trigger"] == "START_TRAINING"
    refused = client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    assert refused.status_code == 409


def test_two_workers_never_run_two_trainings(start_backend, trainable):
    _, body, _ = trainable
    backend = start_backend(WORKERS="2")
    assert requests.post(f"{backend.url}/configure", json=body(train_hook=sleeping_train(3)), timeout=120).status_code == 200
    ready: set[int] = set()

    def both_workers_serve() -> bool:
        requests.post(f"{backend.url}/setup", json={}, timeout=5)  # a worker picks up the stored configuration
        health = requests.get(f"{backend.url}/health", timeout=5).json()
        if health["configured"]:
            ready.add(health["pid"])
        return len(ready) == 2

    wait_until(both_workers_serve, 60, "both workers configured")
    answers = [requests.post(f"{backend.url}/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()},
                             timeout=30) for _ in range(10)]
    assert sorted(a.status_code for a in answers) == [201] + [409] * 9, [a.text for a in answers]
    wait_until(lambda: requests.get(f"{backend.url}/train/status", timeout=5).json()["jobs"][0]["state"] != "running", 120,
               "the training")
    assert len(requests.get(f"{backend.url}/train/status", timeout=5).json()["jobs"]) == 1


def test_a_training_dies_with_its_backend_however_the_backend_dies(start_backend, trainable):
    _, body, _ = trainable
    backend = start_backend()
    assert requests.post(f"{backend.url}/configure", json=body(train_hook=sleeping_train(300)), timeout=120).status_code == 200
    started = requests.post(f"{backend.url}/train", json={"project": 7, "label_config": TEXT_CONFIG,
                                                          "tasks": annotated_tasks()}, timeout=30)
    assert started.status_code == 201, started.text
    status = requests.get(f"{backend.url}/train/status", timeout=5).json()
    training = status["jobs"][0]["pid"]
    assert start_time(training)  # running
    # /health and /train/status say the same, from the same state.
    assert requests.get(f"{backend.url}/health", timeout=1).json()["training"]["job"] == status["current"]
    worker = requests.get(f"{backend.url}/health", timeout=1).json()["pid"]
    os.kill(backend.proc.pid, signal.SIGKILL)  # no shutdown hook runs: master and worker killed outright
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not start_time(training), 15, "the training to end with its backend")


def test_predictions_are_scored_against_what_annotators_kept(app_with, trainable):
    name, body, _ = trainable
    client = app_with()
    assert client.post("/configure", json=body()).status_code == 200
    predict_label(client, "great good", task_id=1)  # predicted "negative"
    predict_label(client, "bad awful", task_id=2)  # predicted "positive"
    predict_label(client, "good lovely", task_id=3)

    def annotate(annotation_id: int, task_id: int, label: str, action: str = "ANNOTATION_CREATED") -> None:
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
        answer = client.post("/webhook", json={"action": action, "project": {"id": 7},
                                               "annotation": {"id": annotation_id, "task": task_id, "result": result}})
        assert answer.status_code == 201

    annotate(11, 1, "positive")  # changed
    annotate(12, 2, "positive")  # kept
    annotate(13, 3, "positive")  # changed, then...
    annotate(13, 3, "negative", "ANNOTATION_UPDATED")  # ...kept after all: counted once
    wait_until(lambda: f"{name}:1" in client.get("/health").get_json().get("prediction_quality", {}), 10, "the figures")
    quality = client.get("/health").get_json()["prediction_quality"][f"{name}:1"]
    assert (quality["tasks"], quality["choices_kept"]) == (3, round(2 / 3, 4))


def test_a_removed_alias_keeps_the_version_serving_and_says_so(app_with, trainable):
    name, body, mlflow = trainable
    client = app_with(alias_poll_s=0.2)
    assert client.post("/configure", json=body()).status_code == 200
    mlflow.delete_registered_model_alias(name, "champion")
    wait_until(lambda: "problem" in client.get("/health").get_json()["registry"], 30, "the follower noticing")
    registry = client.get("/health").get_json()["registry"]
    assert "no longer names a version" in registry["problem"] and f"still serving {name}:1" in registry["problem"]
    assert predict_label(client, "great good") == ("negative", f"{name}:1")


def test_training_needs_an_alias_and_a_valid_policy(app_with, registry):
    client = app_with()
    pinned = client.post("/configure", json={"model_uri": "models:/sentiment/1", "train_hook": encode_hook(sentiment_train)})
    assert pinned.status_code == 400 and "alias" in pinned.get_json()["error"]
    bad = client.post("/configure", json={"model_uri": "models:/sentiment@champion", "train_hook": encode_hook(sentiment_train),
                                          "training": {"trigger": "sometimes"}})
    assert bad.status_code == 400 and "training.trigger" in bad.get_json()["error"]
    without_hook = client.post("/configure", json={"model_uri": "models:/sentiment/1", "training": {"every": 5}})
    assert without_hook.status_code == 400 and "train_hook" in without_hook.get_json()["error"]


def test_a_training_past_train_timeout_is_killed_and_serving_goes_on(app_with, trainable):
    name, body, mlflow = trainable
    client = app_with(train_timeout_s=3)
    assert client.post("/configure", json=body(train_hook=sleeping_train(120))).status_code == 200
    client.post("/train", json={"project": 7, "label_config": TEXT_CONFIG, "tasks": annotated_tasks()})
    job = wait_job(client, timeout=60)
    assert job["state"] == "failed" and "TRAIN_TIMEOUT_S" in job["error"]
    assert mlflow.get_registered_model(name).aliases == {"champion": 1}
    assert predict_label(client, "great good") == ("negative", f"{name}:1")
    assert client.get("/train/status").get_json()["failures_in_a_row"] == 1
