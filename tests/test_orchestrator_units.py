"""The orchestrator's parts without backends: auth, routing errors, GPU assignment, driver specs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from docker.types import DeviceRequest
from flask import Flask, request

from backend.core.errors import DeadlineExceeded, UpstreamUnavailable
from backend.core.lifetime import start_time, wait_for_exit
from backend.model.hookcodec import RUNTIME
from orchestrator import create_app
from orchestrator.drivers import DockerDriver, ProcessDriver
from orchestrator.drivers.base import free_port
from orchestrator.gpus import assign_gpu
from orchestrator.manager import STARTED_CHECK_S, BackendManager, _until_listening
from orchestrator.proxy import Proxy
from orchestrator.registry import BackendRecord, Registry
from orchestrator.settings import OrchestratorSettings


def make_client(tmp_path: Path, **settings):
    app = create_app(OrchestratorSettings(state_dir=tmp_path / "state", gpus=(), **settings), supervise=False)
    return app.test_client()


def record(**fields) -> BackendRecord:
    defaults = {
        "id": "abc123",
        "model": {"model_uri": "models:/m/1"},
        "driver": "docker",
        "port": 18001,
        "model_dir": "/state/backends/abc123/model_dir",
        "token": "secret-token",
    }
    return BackendRecord(**{**defaults, **fields})


def test_configure_beyond_loopback_needs_credentials(tmp_path):
    open_bind = make_client(tmp_path, host="0.0.0.0")
    refused = open_bind.post("/configure", data=b"{}")
    assert refused.status_code == 403 and "CONFIGURE_TOKEN" in refused.json["detail"]
    assert open_bind.delete("/backends/x").status_code == 403

    with_token = make_client(tmp_path, host="0.0.0.0", configure_token="t0ken")
    assert with_token.post("/configure", data=b"{}").status_code == 401
    accepted = with_token.post("/configure", data=b"{}", headers={"Authorization": "Bearer t0ken"})
    assert accepted.status_code == 400  # past auth: the empty object names no model


def test_loopback_requests_to_a_dev_server_bound_everywhere_still_need_credentials(tmp_path):
    client = make_client(tmp_path)  # HOST unset, but `flask run --host 0.0.0.0` says so in SERVER_NAME
    response = client.post("/configure", data=b"{}", base_url="http://0.0.0.0:5000")
    assert response.status_code == 403


def test_label_studio_routes_before_any_model_and_unknown_ids(tmp_path):
    client = make_client(tmp_path)
    assert client.get("/health").json == {
        "status": "UP",
        "model_class": "orchestrator",
        "configured": False,
        "backends": 0,
        "runtime": RUNTIME,  # the process driver's backends run this Python: a client checks its hooks against it
    }
    setup = client.post("/setup", json={"project": "1.1", "schema": "<View/>"})
    assert setup.status_code == 503 and "POST /configure" in setup.json["detail"]
    assert client.post("/models/nope/predict", json={}).status_code == 404
    assert client.get("/backends").json["backends"] == []


def test_configure_goes_through_the_front_door_only(tmp_path):
    client = make_client(tmp_path)
    registry = Registry(tmp_path / "state" / "registry.db")
    registry.put(record(driver="process"))
    response = client.post("/models/abc123/configure", json={"model_uri": "models:/x/1"})
    assert response.status_code == 404 and "POST /configure" in response.json["detail"]
    assert client.get("/backends/abc123?log_lines=lots").status_code == 400


def test_basic_auth_guards_routes_but_not_label_studios_webhook(tmp_path):
    client = make_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw")
    assert client.get("/backends").status_code == 401
    assert client.get("/backends", auth=("ls", "pw")).status_code == 200
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 503  # not 401: no backend yet


def test_a_backend_that_does_not_answer_is_up_and_unconfigured_to_label_studios_health_check(tmp_path):
    """Label Studio marks a model failed when /health errs (1 s): while a backend restarts, the orchestrator
    answers for it, UP and not configured, and says why."""
    client = make_client(tmp_path)
    Registry(tmp_path / "state" / "registry.db").put(record(driver="process", state="restarting"))
    for path in ("/models/abc123/health", "/models/abc123/"):
        answer = client.get(path)
        assert answer.status_code == 200, answer.json
        assert answer.json["status"] == "UP" and answer.json["configured"] is False
        assert answer.json["backend_state"] == "restarting" and "not answering" in answer.json["detail"]
    assert client.post("/models/abc123/predict", json={}).status_code == 502  # the rest still says what it is


def test_routes_that_start_trainings_or_name_a_load_need_the_orchestrators_credentials(tmp_path):
    client = make_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="hook-secret-123")
    Registry(tmp_path / "state" / "registry.db").put(record(driver="process"))
    for path in ("webhook", "train", "configure/status", "train/status"):
        method = client.get if "status" in path else client.post
        assert method(f"/models/abc123/{path}", json={}).status_code == 401, path
    # With the secret Label Studio's webhook carries, the call goes on to the backend (not running here: 502).
    passed = client.post("/models/abc123/webhook", json={}, headers={"X-Webhook-Secret": "hook-secret-123"})
    assert passed.status_code == 502
    assert client.get("/models/abc123/configure/status", auth=("ls", "pw")).status_code == 502


def test_gpus_are_assigned_one_each_round_robin():
    gpus = ("0", "1")
    in_use: list[str] = []
    for _ in range(5):
        in_use.append(assign_gpu(gpus, in_use))
    assert in_use == ["0", "1", "0", "1", "0"]
    assert assign_gpu((), ["0"]) == ""
    assert assign_gpu(gpus, ["1", "1"]) == "0"


def test_process_backends_get_their_own_port_token_folder_and_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFIGURE_TOKEN", "the-orchestrators-own")
    env = ProcessDriver(OrchestratorSettings(state_dir=tmp_path)).environment(record(driver="process", gpu="1"))
    assert env["HOST"] == "127.0.0.1" and env["PORT"] == "18001"
    assert env["CONFIGURE_TOKEN"] == "secret-token" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["MODEL_DIR"] == "/state/backends/abc123/model_dir"


def test_docker_container_spec():
    settings = OrchestratorSettings(docker_image="lsbackend:test", docker_mounts=("/opt/venv:/opt/venv:ro",))
    spec = DockerDriver(settings, client_factory=lambda: None).container_spec(record(gpu="2"))
    assert spec["image"] == "lsbackend:test" and spec["name"] == "lsbackend-abc123" and spec["detach"]
    assert spec["labels"] == {
        "io.lsbackend": "backend",
        "io.lsbackend.id": "abc123",
        "io.lsbackend.model": "models:/m/1",
    }
    assert spec["ports"] == {"9090/tcp": ("127.0.0.1", 18001)}  # published on the host's loopback only
    env = spec["environment"]
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "9090" and env["MODEL_DIR"] == "/data/model_dir"
    assert env["CONFIGURE_TOKEN"] == "secret-token"  # the container listens beyond its loopback: a token is a must
    assert spec["volumes"] == {
        "lsbackend-abc123-data": {"bind": "/data", "mode": "rw"},
        "/opt/venv": {"bind": "/opt/venv", "mode": "ro"},
    }
    [request] = spec["device_requests"]
    assert isinstance(request, DeviceRequest) and request["DeviceIDs"] == ["2"] and request["Capabilities"] == [["gpu"]]
    assert "device_requests" not in DockerDriver(settings, client_factory=lambda: None).container_spec(record())


def test_a_container_engine_that_fails_is_a_502_naming_it_and_what_to_check():
    from docker.errors import DockerException, ImageNotFound

    def no_engine():
        raise DockerException("Error while fetching server API version: Permission denied")

    settings = OrchestratorSettings(docker_base_url="unix:///run/docker.sock", docker_image="lsbackend:latest")
    with pytest.raises(UpstreamUnavailable) as refused:
        DockerDriver(settings, client_factory=no_engine).start(record())
    assert refused.value.status == 502 and "unix:///run/docker.sock" in refused.value.error
    assert "Permission denied" in refused.value.error and "docker group" in refused.value.detail
    [said] = DockerDriver(settings, client_factory=no_engine).logs(record())
    assert said.startswith("(no log: the container engine at unix:///run/docker.sock failed") and "Permission denied" in said

    class Containers:
        def get(self, name):
            raise ImageNotFound("no container")  # a NotFound, as the engine answers for a name it does not know

        def run(self, **spec):
            raise ImageNotFound(f"{spec['image']}: image not known")

    class Engine:
        containers = Containers()

    with pytest.raises(UpstreamUnavailable, match="lsbackend:latest: image not known") as missing:
        DockerDriver(settings, client_factory=Engine).start(record())
    assert "lsbackend:latest is one of its images" in missing.value.detail


def test_docker_networks():
    """On the host's network a container listens on its own loopback port (nothing published: ports
    would clash); on a named one (compose's) it joins it and still publishes on loopback."""
    on_host = DockerDriver(OrchestratorSettings(docker_network="host"), client_factory=lambda: None).container_spec(record())
    assert on_host["network_mode"] == "host" and "ports" not in on_host
    assert on_host["environment"]["HOST"] == "127.0.0.1" and on_host["environment"]["PORT"] == "18001"
    named = DockerDriver(OrchestratorSettings(docker_network="labeling"), client_factory=lambda: None).container_spec(record())
    assert named["network"] == "labeling" and named["ports"] == {"9090/tcp": ("127.0.0.1", 18001)}
    assert OrchestratorSettings.from_env({"DOCKER_NETWORK": "host"}).docker_network == "host"


def test_settings_reject_what_they_cannot_use():
    with pytest.raises(ValueError, match="ORCHESTRATOR_DRIVER"):
        OrchestratorSettings.from_env({"ORCHESTRATOR_DRIVER": "kubernetes"})
    with pytest.raises(ValueError, match="MAX_BACKENDS"):
        OrchestratorSettings.from_env({"MAX_BACKENDS": "0"})
    assert OrchestratorSettings.from_env({"ORCHESTRATOR_GPUS": "0, 2"}).gpus == ("0", "2")
    with pytest.raises(ValueError, match="ORCHESTRATOR_ON_EXIT must be one of stop, keep"):
        OrchestratorSettings.from_env({"ORCHESTRATOR_ON_EXIT": "pause"})
    # Ctrl-C on flask run stops the backends; a production server leaves them to be re-adopted.
    assert OrchestratorSettings.from_env({"FLASK_RUN_FROM_CLI": "true"}).on_exit == "stop"
    assert OrchestratorSettings.from_env({}).on_exit == "keep"
    assert OrchestratorSettings.from_env({"FLASK_RUN_FROM_CLI": "true", "ORCHESTRATOR_ON_EXIT": "keep"}).on_exit == "keep"
    sizes = {"6G": 6 << 30, "1500M": 1500 << 20, "512MiB": 512 << 20, "2.5g": int(2.5 * (1 << 30)), "1000": 1000}
    for raw, size in sizes.items():
        assert OrchestratorSettings.from_env({"MEMORY_BUDGET": raw}).memory_budget == size
    with pytest.raises(ValueError, match="MEMORY_BUDGET must be a size"):
        OrchestratorSettings.from_env({"MEMORY_BUDGET": "lots"})
    with pytest.raises(ValueError, match="GPU_MEMORY_BUDGET must not be negative"):
        OrchestratorSettings.from_env({"GPU_MEMORY_BUDGET": "-1G"})
    assert OrchestratorSettings.from_env({}).wake_headroom == 4.0
    assert OrchestratorSettings.from_env({"WAKE_HEADROOM": "0"}).wake_headroom == 0.0  # off
    # one fewer than the cores it may use: one left to the awake backends
    assert OrchestratorSettings.from_env({}).wake_turns == max(1, len(os.sched_getaffinity(0)) - 1)
    assert OrchestratorSettings.from_env({"ORCHESTRATOR_DRIVER": "ray"}).wake_turns == 0  # the cluster's nodes wake them
    assert OrchestratorSettings.from_env({"WAKE_TURNS": "1"}).wake_turns == 1
    with pytest.raises(ValueError, match="WAKE_HEADROOM must be at least 0"):
        OrchestratorSettings.from_env({"WAKE_HEADROOM": "-1"})


def test_ray_actor_options_place_by_gpus_resource_and_labels():
    from orchestrator.drivers.raydriver import actor_options, wanted_gpus

    settings = OrchestratorSettings(driver="ray", ray_address="10.0.0.5:6379", backend_gpus=1)
    gpu_model = record(driver="ray", model={"model_uri": "models:/m/1"})
    options = actor_options(settings, gpu_model)
    assert options == {"name": "lsbackend-abc123", "namespace": "lsbackend", "lifetime": "detached", "max_restarts": 0,
                       "num_cpus": 0, "num_gpus": 1, "resources": {"lsbackend": 1}, "scheduling_strategy": "SPREAD"}
    assert wanted_gpus(settings, record(driver="ray", model={"gpus": 0})) == 0  # the configure's own wins
    labelled = OrchestratorSettings.from_env({"ORCHESTRATOR_DRIVER": "ray", "RAY_ADDRESS": "h:1", "RAY_NODE_LABELS": "pool=gpu",
                                              "RAY_BACKEND_RESOURCE": ""})
    options = actor_options(labelled, gpu_model)
    assert options["label_selector"] == {"pool": "gpu"} and "scheduling_strategy" not in options and "resources" not in options
    with pytest.raises(ValueError, match="RAY_NODE_LABELS must be key=value"):
        OrchestratorSettings.from_env({"RAY_NODE_LABELS": "gpu"})
    with pytest.raises(ValueError, match="RAY_PLACEMENT must be spread or pack"):
        OrchestratorSettings.from_env({"RAY_PLACEMENT": "random"})


def test_the_ray_driver_says_what_is_missing_before_anything_starts(tmp_path, monkeypatch):
    from backend.core.errors import UpstreamUnavailable
    from harness.servers import closed_port
    from orchestrator.drivers import make_driver, raydriver

    with pytest.raises(ValueError, match="needs RAY_ADDRESS"):
        make_driver(OrchestratorSettings(driver="ray"))
    monkeypatch.setattr(raydriver.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the ray package: pip install"):
        make_driver(OrchestratorSettings(driver="ray", ray_address="127.0.0.1:6379"))
    with closed_port() as port, pytest.raises(UpstreamUnavailable, match="no Ray cluster answers at 127.0.0.1"):
        raydriver.connect(OrchestratorSettings(driver="ray", ray_address=f"127.0.0.1:{port}", ray_connect_timeout_s=2))  # at once, not after minutes of Ray's own retries
    with pytest.raises(UpstreamUnavailable, match="is not host:port"):
        raydriver.connect(OrchestratorSettings(driver="ray", ray_address="ray-head"))


def test_a_ray_node_without_the_shared_folder_or_the_project_says_which(tmp_path):
    import sys

    from orchestrator.drivers.process import PROJECT_ROOT
    from orchestrator.drivers.rayhost import _check_paths

    model_dir = tmp_path / "backends" / "abc123" / "model_dir"
    with pytest.raises(RuntimeError, match="must be on storage every node mounts at the same path"):
        _check_paths(sys.executable, str(PROJECT_ROOT), str(model_dir))
    model_dir.parent.mkdir(parents=True)
    _check_paths(sys.executable, str(PROJECT_ROOT), str(model_dir))  # the backend creates model_dir itself
    with pytest.raises(RuntimeError, match="set RAY_PROJECT_ROOT"):
        _check_paths(sys.executable, str(tmp_path), str(model_dir))
    with pytest.raises(RuntimeError, match="set RAY_BACKEND_PYTHON"):
        _check_paths(str(tmp_path / "python"), str(PROJECT_ROOT), str(model_dir))


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_request_that_meets_a_renewed_backends_old_port_goes_to_its_new_one_body_and_all():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    old, renewed = record(driver="process", port=free_port()), record(driver="process", port=server.server_port)
    app = Flask(__name__)
    body = b'{"tasks": [1]}'
    try:
        with app.test_request_context("/predict", method="POST", data=body):
            answer = Proxy(5.0, lambda _: renewed).forward(old, "predict", request)
            assert answer.status_code == 200 and b"".join(answer.response) == body
            # The backend's Date and Server stay behind: the orchestrator's server sends its own (two Dates are not HTTP)
            assert answer.headers["Content-Length"] == str(len(body)) and not {"date", "server"} & {
                name.lower() for name, _ in answer.headers.items()}
        for unmoved in (old, None):  # it has not moved, or is gone: a 502 naming it
            with app.test_request_context("/predict", method="POST", data=body), \
                    pytest.raises(UpstreamUnavailable, match="abc123 is not answering"):
                Proxy(5.0, lambda _, unmoved=unmoved: unmoved).forward(old, "predict", request)
    finally:
        server.shutdown()


def test_a_backends_last_use_only_moves_forward_whoever_writes_its_record(tmp_path):
    registry = Registry(tmp_path / "registry.db")
    stale = record(model={"model_uri": "models:/m/1"})
    registry.put(stale)
    registry.touch(stale.id, 100.0)
    registry.touch(stale.id, 50.0)  # an older request's end, written late
    assert registry.get(stale.id).last_used_at == 100.0
    stale.state = "ready"  # a writer that read the record before the touch
    registry.put(stale)
    current = registry.get(stale.id)
    assert current.state == "ready" and current.last_used_at == 100.0
    registry.update(stale.id, memory_bytes=123, model_version="v2")
    current = registry.get(stale.id)
    assert (current.memory_bytes, current.model_version, current.state) == (123, "v2", "ready")
    with pytest.raises(ValueError, match="no such record fields: colour"):
        registry.update(stale.id, colour="red")


def test_every_read_of_all_records_is_the_rows_as_they_are_now_and_the_callers_own(tmp_path):
    registry = Registry(tmp_path / "registry.db")
    registry.put(record(id="a1", created_at=1.0))
    registry.put(record(id="b2", created_at=2.0))
    first = registry.all()
    first[0].state = "changed by its caller"
    again = registry.all()
    assert [r.id for r in again] == ["a1", "b2"] and again[0].state == "starting"  # not the caller's copy
    registry.update("b2", state="ready")
    registry.delete("a1")
    with sqlite3.connect(tmp_path / "registry.db") as db:  # a field a newer version wrote: left out, not an error
        db.execute("UPDATE backends SET record = json_set(record, '$.colour', 'red') WHERE id = 'b2'")
    assert [(r.id, r.state) for r in registry.all()] == [("b2", "ready")]


def test_the_registry_keeps_its_connections_for_the_next_caller_and_a_fork_opens_its_own(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry.db")
    registry.put(record(id="a1"))
    opened: list[int] = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: opened.append(threading.get_ident()) or real_connect(*a, **k))
    for _ in range(20):
        assert registry.get("a1").id == "a1"
    assert opened == []  # the connection made first is kept
    start = threading.Barrier(4)

    def read() -> None:
        start.wait()
        for _ in range(100):
            assert registry.get("a1").id == "a1" and len(registry.all()) == 1

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) <= 3  # one each for the threads that found none kept, at most
    with pytest.raises(TypeError):  # fails inside its transaction: rolled back, and its connection not kept
        registry.put(record(id="b2", model={"not JSON": object()}))
    another = Registry(tmp_path / "registry.db")  # would wait 10 s and fail on a transaction left open
    another.put(record(id="c3"))
    assert [r.id for r in registry.all()] == ["a1", "c3"]
    pid = os.fork()
    if pid == 0:  # the child writes on a connection of its own; the parent's go on working after it exits
        try:
            registry.put(record(id="d4"))
            os._exit(0 if registry.get("d4") else 1)
        except BaseException:  # noqa: BLE001 - a forked test process must never return into pytest
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    assert [r.id for r in registry.all()] == ["a1", "c3", "d4"] and registry.get("d4").id == "d4"


def test_a_request_sent_again_once_its_backend_has_woken_carries_its_body_again():
    # Put to sleep between the orchestrator's look at its state and the request (api.send): the first try meets
    # nobody, the backend is woken, and the same request goes again, to where it listens now.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asleep, woken = record(driver="process", port=free_port()), record(driver="process", port=server.server_port)
    body = b'{"tasks": [{"id": 1}]}'
    proxy = Proxy(5.0, lambda _: None)
    try:
        with Flask(__name__).test_request_context("/predict", method="POST", data=body):
            with pytest.raises(UpstreamUnavailable):
                proxy.forward(asleep, "predict", request)
            answer = proxy.forward(woken, "predict", request)
            assert answer.status_code == 200 and b"".join(answer.response) == body
    finally:
        server.shutdown()


def test_a_request_whose_backend_did_not_answer_wakes_it_goes_again_or_fails_by_what_its_record_says_now():
    from orchestrator.api import _after_unanswered

    sent = record(driver="process", state="ready", handle="100:5")
    assert _after_unanswered(sent, None) == ""  # deleted meanwhile
    assert _after_unanswered(sent, record(state="sleeping", handle="")) == "wake"  # put to sleep on its way
    assert _after_unanswered(sent, record(state="starting", handle="200:9")) == "wake"  # another request wakes it
    # Put to sleep and woken again by another request before this one looked (the bench's one 502 in 5,935):
    assert _after_unanswered(sent, record(state="ready", handle="200:9")) == "resend"
    assert _after_unanswered(sent, record(state="ready", handle="100:5")) == ""  # the same process: the 502 stands
    assert _after_unanswered(sent, record(state="failed", handle="200:9")) == ""


def test_a_backend_is_registered_once_whichever_process_asks_first(tmp_path):
    # Two gunicorn workers of one orchestrator, each configuring the same new model at the same moment.
    first, second = Registry(tmp_path / "registry.db"), Registry(tmp_path / "registry.db")
    assert first.insert(record(id="m1", port=18001))
    assert not second.insert(record(id="m1", port=18002))  # the second starts nothing: it waits for the first's
    assert second.get("m1").port == 18001
    first.insert(record(id="spare-1", spare=True))
    claimed = record(id="m2", spare=False)
    assert first.rename("spare-1", claimed)
    assert not second.rename("spare-1", record(id="m3"))  # claimed already
    first.insert(record(id="spare-2", spare=True))
    assert not second.rename("spare-2", record(id="m2"))  # the model has its backend: the spare stays one
    assert sorted(r.id for r in first.all()) == ["m1", "m2", "spare-2"] and not first.get("m2").spare


def test_a_stop_is_waited_for_until_the_process_ends_or_the_time_is_up():
    """``wait_for_exit`` (the process driver's stop): back at its timeout while the process runs, and back once
    it has ended, told by the kernel (a pidfd) rather than found at a later look."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        wait_for_exit(proc.pid, 0.05)
        assert proc.poll() is None
        threading.Timer(0.1, proc.terminate).start()
        wait_for_exit(proc.pid, 60)
        assert start_time(proc.pid) == ""  # ended: a zombie, until this test reaps it
    finally:
        proc.kill()
        proc.wait()
    wait_for_exit(proc.pid, 60)  # gone and reaped: at once


class _Unready(BaseHTTPRequestHandler):
    """A backend that listens but is not ready: every /health is a 503."""

    asks = 0

    def do_GET(self) -> None:
        type(self).asks += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Running(ProcessDriver):
    def is_running(self, record: BackendRecord) -> bool:
        return True

    def pending_reason(self, record: BackendRecord) -> str:
        return ""

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        return []


def test_a_starting_backends_port_is_tried_until_it_listens_and_then_health_is_asked_no_faster_than_before(tmp_path):
    """Until a woken backend listens its port is tried every few milliseconds (a refused connect is nearly
    free), so that /health is asked, and waits in the backlog, as soon as it can; once it listens and does not
    answer yet, /health is asked every STARTED_CHECK_S, not as fast as it refuses."""
    assert not _until_listening("127.0.0.1", free_port(), 0.05)  # nothing listens: it gives up in its time
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _until_listening("127.0.0.1", server.server_port, 0.05)
        settings = OrchestratorSettings(state_dir=tmp_path / "state", gpus=(), start_timeout_s=1.0)
        manager = BackendManager(settings, Registry(tmp_path / "registry.db"), _Running(settings), ())
        with pytest.raises(DeadlineExceeded, match="did not answer /health within 1 s"):
            manager.wait_ready(record(driver="process", port=server.server_port, handle="h", state="starting"))
        assert 2 <= _Unready.asks <= 1.0 / STARTED_CHECK_S + 3, _Unready.asks
    finally:
        server.shutdown()
