"""A real gunicorn backend against careless hooks, stalled clients, hung calls and hostile bodies: it
keeps its master and worker, keeps answering Label Studio's quick calls, keeps its deadlines and its
secrets."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness.calls import configure, labels, predict_images
from harness.servers import RawServer, file_server, free_port, trickling, wait_until
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG

predict = predict_images


def health(backend, timeout=1.0):
    return requests.get(backend.url + "/health", timeout=timeout).json()


@pytest.fixture(scope="module")
def backend(tmp_path_factory, registry, images):
    """One backend for the hook cases: each must leave it as it found it."""
    from harness.servers import Backend

    started = Backend(tmp_path_factory.mktemp("hardened"), {
        "MLFLOW_TRACKING_URI": registry, "LOCAL_FILES_ROOTS": str(images["white"].parent), "THREADS": "2",
    }).start()
    assert configure(started).status_code == 200
    yield started
    started.stop()


@pytest.mark.parametrize(
    "how, said",
    [
        ("sys.exit", "pre_hook raised SystemExit: 3"),
        ("exit", "pre_hook raised SystemExit"),
        ("KeyboardInterrupt", "pre_hook raised KeyboardInterrupt"),
        ("os._exit(1)", "the model process ended while running pre_hook (exit code 1)"),
        ("os._exit(3)", "the model process ended while running pre_hook (exit code 3)"),
        ("segfault", "the model process ended while running pre_hook (killed by SIGSEGV)"),
    ],
)
def test_a_hook_that_ends_its_process_costs_that_request_only(backend, images, how, said):
    before = health(backend)
    assert configure(backend, pre_hook=encode_hook(hooks.ending_pre(how))).status_code == 200
    crashed = predict(backend, images, "black")
    assert crashed.status_code == 500 and said in crashed.json()["error"], crashed.text
    assert "Traceback" not in crashed.text
    # No new configure: the same configuration serves the next request, from a restarted process if it ended.
    assert labels(predict(backend, images, "white")) == ["light"]
    after = health(backend)
    assert backend.proc.poll() is None and after["pid"] == before["pid"]  # the master and its worker live on
    assert backend.output().count("Booting worker") == 1
    ended = how.startswith("os._exit") or how == "segfault"
    assert after["model_process"]["restarts"] == before["model_process"]["restarts"] + (1 if ended else 0)
    assert configure(backend).status_code == 200


def test_what_a_task_may_not_read_or_reach_through_a_real_backend(backend, images, served):
    server, seen = served
    stored = backend.model_dir / "configuration.json"
    hostile = ["/etc/passwd", "file:///proc/self/environ", str(stored), f"{images['white'].parent}/../../../etc/passwd",
               "http://169.254.169.254/latest/meta-data/", f"{server.url}/white.png"]
    tasks = [{"id": i, "data": {"image": ref}} for i, ref in enumerate(hostile)]
    tasks.append({"id": 99, "data": {"image": str(images["white"])}})
    answer = requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=60)
    body = answer.json()
    assert body["results"][:-1] == [[]] * len(hostile) and labels(answer)[-1] == "light"
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "set LOCAL_FILES_ROOTS" in errors[0] and "set LOCAL_FILES_ROOTS" in errors[3]
    assert "task data may never read" in errors[1] and "task data may never read" in errors[2]
    assert "cloud metadata address" in errors[4] and "FETCH_ALLOW_PRIVATE" in errors[5]
    assert seen == []  # the loopback server was never contacted


def test_quick_routes_answer_while_every_thread_is_busy_and_clients_stall(backend, images):
    assert configure(backend, post_hook=encode_hook(hooks.sleeping_post(4))).status_code == 200
    stalled = []
    for _ in range(8):  # each sends its headers and part of a body, then nothing
        sock = socket.create_connection(("127.0.0.1", backend.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"ta")
        stalled.append(sock)
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(predict, backend, images, "white") for _ in range(2)]  # both of the 2 threads
        wait_until(lambda: health(backend)["model_process"]["state"] == "busy", 10, "a prediction to run")
        for _ in range(10):
            started = time.monotonic()
            assert health(backend, timeout=1)["status"] == "UP"
            assert requests.post(backend.url + "/setup", json={"project": "1.1"}, timeout=1).ok
            assert requests.post(backend.url + "/webhook", json={"action": "ANNOTATION_CREATED"}, timeout=1).status_code == 201
            assert time.monotonic() - started < 3
        assert [labels(f.result(60)) for f in slow] == [["light"], ["light"]]
    for sock in stalled:
        sock.close()
    assert configure(backend).status_code == 200


def test_a_stalled_request_gets_a_408_and_frees_nothing_it_never_held(start_backend):
    backend = start_backend(REQUEST_READ_TIMEOUT_S="1")
    sock = socket.create_connection(("127.0.0.1", backend.port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    sock.settimeout(10)
    answer = sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"REQUEST_READ_TIMEOUT_S" in answer


def test_deadlines_hold_for_interactive_requests_and_hung_model_calls(start_backend, images):
    backend = start_backend(PREDICT_TIMEOUT_S="3", MODEL_CALL_TIMEOUT_S="600")
    assert configure(backend, post_hook=encode_hook(hooks.hanging_post)).status_code == 200
    started = time.monotonic()
    interactive = predict(backend, images, "white", params={"context": {"result": []}})
    assert interactive.status_code == 504 and time.monotonic() - started < 3 + 3
    started = time.monotonic()
    batch = predict(backend, images, "white", "black")
    assert batch.status_code == 200 and batch.json()["pending"]["tasks"] == 2 and time.monotonic() - started < 3 + 3

    # The model process is stuck in a call for the next ten minutes: new hooks must not wait for it.
    assert configure(backend).status_code == 200
    started = time.monotonic()
    assert labels(predict(backend, images, "white", "black")) == ["light", "dark"]
    assert time.monotonic() - started < 3 + 3


def test_hung_downloads_of_allowed_hosts_keep_the_deadline(start_backend, images):
    backend = start_backend(PREDICT_TIMEOUT_S="3", FETCH_ALLOW_PRIVATE="127.0.0.1", FETCH_TIMEOUT_S="30")
    assert configure(backend).status_code == 200

    never = RawServer(lambda connection: time.sleep(120))  # answers nothing, ever
    slow = RawServer(trickling(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", 1.0))
    try:
        tasks = [{"id": 1, "data": {"image": str(images["white"])}}, {"id": 2, "data": {"image": never.url + "/a.png"}},
                 {"id": 3, "data": {"image": slow.url + "/b.png"}}]
        started = time.monotonic()
        answer = requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=60)
        took = time.monotonic() - started
    finally:
        never.close()
        slow.close()
    assert answer.status_code == 200 and took < 3 + 3
    body = answer.json()
    assert labels(answer)[0] == "light" and body["results"][1:] == [[], []]
    assert body["pending"]["tasks"] == 2  # still downloading: they go on in the background
    assert health(backend)["status"] == "UP"


def test_secrets_stay_out_of_answers_health_and_logs(start_backend, images):
    seen = []
    files = file_server(images["white"].parent, seen=seen)
    try:
        backend = start_backend(LABEL_STUDIO_API_KEY="envkey-0123456789abcdef", FETCH_ALLOW_PRIVATE="127.0.0.1")
        port = free_port()
        failed = configure(backend, tracking_uri=f"http://bob:hunter2pass@127.0.0.1:{port}")
        assert failed.status_code == 502 and "http://***@127.0.0.1" in failed.text and "bob" not in failed.text
        # An unauthenticated /setup names another host: the environment's key is not sent there.
        requests.post(backend.url + "/setup", json={"hostname": files.url, "access_token": "setup-token-12345"}, timeout=3)
        assert configure(backend).status_code == 200
        task = [{"id": 1, "data": {"image": "/data/upload/1/white.png"}}]
        requests.post(backend.url + "/predict", json={"tasks": task, "label_config": IMAGE_CONFIG}, timeout=30)
        assert seen and all("envkey" not in json.dumps(headers) for _, headers in seen)
        assert seen[-1][1].get("Authorization") == "Token setup-token-12345"  # the token that came with it
        # Hooks run where the backend's own credentials are not: nothing to read, nothing to leak.
        assert configure(backend, post_hook=encode_hook(hooks.environment_peeking_post)).status_code == 200
        peeked = predict(backend, images, "white").json()["results"][0]["meta"]
        assert peeked == {"key": None, "token": None}
        shown = json.dumps(health(backend)) + requests.get(backend.url + "/configure", timeout=5).text
        shown += requests.get(backend.url + "/metrics", timeout=5).text
        assert health(backend)["label_studio"]["warning"].startswith("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL")
    finally:
        files.close()
    for secret in ("hunter2pass", "envkey-0123456789abcdef", "setup-token-12345"):
        assert secret not in shown and secret not in failed.text
        assert secret not in backend.output(), secret


def test_hostile_bodies_and_a_broken_stored_configuration(start_backend, images, tmp_path):
    backend = start_backend(MAX_REQUEST_MB="1")
    deep = requests.post(backend.url + "/predict", data="[" * 100_000 + "]" * 100_000,
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert deep.status_code == 400 and "nests too deeply" in deep.json()["error"]
    big = requests.post(backend.url + "/predict", data=b"{" + b" " * (2 << 20) + b"}",
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413 and "MAX_REQUEST_MB" in big.json()["detail"]
    assert health(backend)["status"] == "UP"

    stored = backend.model_dir / "configuration.json"
    for broken_text in ('{"spec": {"model_uri": "models:/brightness/1", "tru', "", "{}"):  # cut, emptied, hollow
        backend.stop()
        backend.model_dir.mkdir(parents=True, exist_ok=True)
        stored.write_text(broken_text)
        backend.start()
        shown = health(backend)
        broken = shown["stored_configuration_error"]
        assert not shown["configured"] and broken["file"] == str(stored) and broken["reason"], broken
        assert "configuration.json cannot be used" in broken["error"] and "POST /configure again" in broken["detail"]
        assert "restore" in broken["detail"]
        answer = predict(backend, images, "white")
        assert answer.status_code == 503 and str(stored) in answer.json()["detail"]
        assert "POST /configure again" in answer.json()["detail"]
    assert configure(backend).status_code == 200  # a configure replaces it, and keeps the broken one aside
    assert "stored_configuration_error" not in health(backend)
    kept = list(backend.model_dir.glob("configuration.json.broken-*"))
    assert [path.read_text() for path in kept] == ["{}"]
