"""The backend as it runs in production: real gunicorn processes, real HTTP, real restarts."""

from __future__ import annotations

import json
import threading

import requests

from harness.calls import configure, labels, predict_images
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG

predict = predict_images


def test_configure_predict_restart_predict(start_backend, images):
    # As a user's own gunicorn runs: its zygote a new Python, whose imports can pass the default 20 s configure
    # wait on a loaded CI machine (the answer is then a 202, tested below): the configure waits for the load.
    backend = start_backend(BACKEND_TEMPLATE="", CONFIGURE_WAIT_S="90")
    assert configure(backend).status_code == 200
    assert labels(predict(backend, images, "white", "black")) == ["light", "dark"]

    backend.stop()
    backend.start()  # same MODEL_DIR: the configuration is restored without a new configure
    health = backend.wait_configured()
    assert health["model_version"] == "brightness:1"
    assert labels(predict(backend, images, "black", "white")) == ["dark", "light"]
    assert "restoring configuration" in backend.output()


def test_a_predict_that_finds_the_stored_configuration_loading_waits_for_it(start_backend, images, tmp_path):
    # As a woken backend gets its first request: its restore takes longer than CONFIGURE_WAIT_S (0 here), and
    # the request is held until the model is loaded, not told that it is still loading.
    release = tmp_path / "release"
    backend = start_backend(CONFIGURE_WAIT_S="0", HOLD_IMPORT_UNTIL=str(release))
    release.touch()
    assert configure(backend, pre_hook="tests.support.held_import:brightness_pre").status_code == 202
    backend.wait_configured()
    backend.stop()
    release.unlink()
    backend.start()  # its restore now waits for the release
    assert requests.get(backend.url + "/health", timeout=1).json()["loading"]
    answered = {}
    held = threading.Thread(target=lambda: answered.setdefault("r", predict(backend, images, "white", "black")))
    held.start()
    held.join(1.0)
    assert held.is_alive()  # still held: before, a 503 "still loading" came back at once
    release.touch()
    held.join(60)
    assert labels(answered["r"]) == ["light", "dark"]


def test_health_and_setup_answer_while_a_long_predict_runs(start_backend, images):
    backend = start_backend()
    configure(backend, post_hook=encode_hook(hooks.slow_post))
    done = {}
    slow = threading.Thread(target=lambda: done.setdefault("r", predict(backend, images, "white")))
    slow.start()
    # Label Studio gives /health 1 s and /setup 3 s: they must not queue behind a prediction.
    for _ in range(5):
        assert requests.get(backend.url + "/health", timeout=1).ok
        assert requests.post(backend.url + "/setup", json={"project": "1.1"}, timeout=1).json()["model_version"] == "brightness:1"
    slow.join(30)
    assert labels(done["r"]) == ["light"]


def test_a_raising_hook_does_not_kill_the_worker(start_backend, images):
    backend = start_backend()
    configure(backend, pre_hook=encode_hook(hooks.raising_pre))
    for _ in range(3):
        response = predict(backend, images, "white")
        assert response.status_code == 500 and "ValueError" in response.json()["error"]
    assert requests.get(backend.url + "/health", timeout=1).json()["configured"]
    assert backend.output().count("Booting worker") == 1  # never replaced: no worker died


def test_configure_on_a_slow_load_answers_202_and_serves_the_old_model_meanwhile(start_backend, images):
    backend = start_backend(CONFIGURE_WAIT_S="0")
    response = configure(backend)
    assert response.status_code == 202
    assert response.json()["status_url"] == "/configure/status"
    backend.wait_configured()
    assert requests.get(backend.url + "/configure/status", timeout=1).json()["state"] == "ready"
    # A new model loads in the background; the old one serves until it is ready.
    response = configure(backend, model_uri="models:/brightness/2")
    assert response.status_code == 202
    assert predict(backend, images, "white").json()["model_version"] in ("brightness:1", "brightness:2")


def test_dagshub_client_body_over_http(start_backend, images, registry):
    # The exact bytes the dagshub client puts on the wire: a JSON string holding JSON.
    backend = start_backend()
    inner = {"host": "http://127.0.0.1:9", "username": "alice", "repo": "alice/models", "model": "brightness",
             "version": "1", "authtoken": "t", "datasource_repo": "alice/data", "datasource_name": "images",
             "pre_hook": encode_hook(hooks.brightness_pre), "post_hook": encode_hook(hooks.choices_post)}
    response = requests.post(backend.url + "/configure", data=json.dumps(json.dumps(inner)),
                             headers={"Content-Type": "application/json"}, timeout=60)
    # Port 9 has no tracking server: the parse succeeded and the load reports the unreachable host.
    assert response.status_code == 502
    assert "http://127.0.0.1:9/alice/models.mlflow" in response.json()["error"]


def test_label_studio_files_are_fetched_with_its_token(start_backend, images, tmp_path):
    from harness.servers import file_server

    seen = []
    server = file_server(images["white"].parent, seen=seen)
    try:
        backend = start_backend()
        configure(backend)
        # /setup tells the backend where Label Studio is and its token, as Label Studio does on connect.
        requests.post(backend.url + "/setup", json={"project": "1.2", "hostname": server.url, "access_token": "abc123",
                                                     "schema": IMAGE_CONFIG, "extra_params": {"a": 1}}, timeout=3)
        tasks = [{"id": 1, "data": {"image": "/data/upload/1/black.png"}}]
        response = requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30)
        assert response.json()["errors"][0]["error"].endswith("answered 404")  # the file server has no /data/upload
        tasks = [{"id": 1, "data": {"image": server.url + "/black.png"}}, {"id": 2, "data": {"image": server.url + "/white.png"}}]
        response = requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30)
        assert labels(response) == ["dark", "light"]
        assert all(headers.get("Authorization") == "Token abc123" for _, headers in seen)
        # Cached on disk by URL: predicting again fetches nothing.
        count = len(seen)
        requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30)
        assert len(seen) == count
    finally:
        server.close()


def test_basic_auth_end_to_end(start_backend, images):
    backend = start_backend(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pw")
    auth = ("ls", "pw")
    assert requests.post(backend.url + "/configure", json={"model_uri": "models:/brightness/1"}, timeout=60).status_code == 401
    response = requests.post(backend.url + "/configure", auth=auth, timeout=60, json={
        "model_uri": "models:/brightness/1", "pre_hook": encode_hook(hooks.brightness_pre), "post_hook": encode_hook(hooks.choices_post)})
    assert response.status_code == 200
    tasks = [{"id": 1, "data": {"image": str(images["white"])}}]
    assert requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30).status_code == 401
    assert requests.post(backend.url + "/predict", auth=auth, json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30).ok


def test_several_workers_follow_the_stored_configuration(start_backend, images):
    backend = start_backend(WORKERS="2", THREADS="2")
    assert configure(backend).status_code == 200  # reached one worker; the other picks it up from MODEL_DIR
    for _ in range(8):
        response = predict(backend, images, "white", "black")
        assert response.status_code == 200, response.text
        assert labels(response) == ["light", "dark"]
    assert configure(backend, model_uri="models:/brightness/2").status_code == 200
    # Within the store poll interval every worker serves v2; poll with a deadline rather than sleep.
    from harness.servers import wait_until

    wait_until(lambda: all(predict(backend, images, "white").json()["model_version"] == "brightness:2" for _ in range(6)),
               30, "both workers on v2")


def test_several_workers_share_the_background_so_no_task_is_predicted_twice(start_backend, images, tmp_path):
    """Label Studio's rounds reach any worker: what one worker's background works on or finished is
    waited for or answered by the others, never predicted again (backend/serving/shared.py)."""
    from collections import Counter

    from harness.calls import image_tasks
    from harness.calls import predict as predict_tasks
    from harness.servers import wait_until

    backend = start_backend(WORKERS="2", THREADS="4", PREDICT_TIMEOUT_S="1")
    record = tmp_path / "predicted"
    response = configure(backend, post_hook=encode_hook(hooks.recording_post(str(record), 0.15)), batch_size=1)
    assert response.status_code == 200, response.text

    serving: set[int] = set()

    def both_workers_serve() -> bool:
        body = requests.get(backend.url + "/health", timeout=5).json()  # a connection each: either worker
        if body["configured"]:
            serving.add(body["pid"])
        return len(serving) == 2

    wait_until(both_workers_serve, 60, "both workers serving the configuration")
    names = ["white", "black"] * 8  # 16 tasks of 0.15 s each against a 1 s deadline: several rounds
    tasks = image_tasks(images, *names)
    expected = {task["id"]: "light" if name == "white" else "dark" for task, name in zip(tasks, names)}
    answered: dict[int, str | None] = {}

    def round_of(sent: list[dict]) -> None:
        result = predict_tasks(backend, sent, timeout=30)
        assert result.status_code == 200, result.text
        for task, label in zip(sent, labels(result)):
            if label is not None:
                answered[task["id"]] = label

    round_of(tasks)
    assert len(answered) < len(tasks)  # the rest went on in the background of the worker that took it
    background = [task for task in tasks if task["id"] not in answered]

    def next_rounds() -> bool:
        rest = [task for task in tasks if task["id"] not in answered]
        clients = [threading.Thread(target=round_of, args=(rest,)) for _ in range(4)]  # 4 connections: both workers
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        return len(answered) == len(tasks)

    wait_until(next_rounds, 60, "every task answered")
    assert answered == expected

    hits: dict[int, int] = {}

    def both_workers_answered_from_the_shared_cache() -> bool:
        round_of(background)  # Label Studio would not ask again; a second project on the same model could
        for _ in range(4):
            body = requests.get(backend.url + "/health", timeout=5).json()
            hits[body["pid"]] = body["prediction_cache"]["hits"]
        return len([pid for pid, count in hits.items() if count]) >= 2

    wait_until(both_workers_answered_from_the_shared_cache, 60, "both workers answering from the shared cache")
    predicted = Counter(int(line) for line in record.read_text().split())
    assert predicted == Counter(list(expected)), predicted  # every task through the model exactly once, across both workers


def test_several_workers_keep_one_webhook_log(start_backend):
    backend = start_backend(WORKERS="2")
    for n in range(12):  # a connection each: they reach both workers
        event = {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "task": {"id": n}, "annotation": {"id": n}}
        assert requests.post(backend.url + "/webhook", json=event, timeout=5).status_code == 201
    from harness.servers import wait_until

    shown: dict[int, dict] = {}

    def both_workers_heard() -> bool:
        body = requests.get(backend.url + "/health", timeout=5).json()
        shown[body["pid"]] = body["webhooks"]["projects"]["5"]["events"]
        return len(shown) == 2

    wait_until(both_workers_heard, 30, "/health from both workers")
    assert list(shown.values()) == [{"ANNOTATION_CREATED": 12}] * 2  # each worker shows all 12, wherever they went
