"""The orchestrator with real gunicorn backends (process driver), a real registry and real HTTP.

Each configure starts or reuses a real backend; the lifecycle test kills one, restarts the
orchestrator itself, and deletes one, checking what Label Studio would see at every step.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness.calls import configure as configure_call
from harness.calls import labels_and_version, predict_images
from harness.servers import free_port, wait_until
from lsmlflow.pickling import encode_hook
from orchestrator.drivers import port_is_free
from tests.support import hooks
from tests.support.dagshub import add_annotation_model
from tests.support.hooks import IMAGE_CONFIG


def configure(orchestrator, **body):
    response = configure_call(orchestrator, **body)
    return response.status_code, response.json()


def predict(url, images, *names):
    return labels_and_version(predict_images(url, images, *names))


def test_two_models_routed_reconfigured_restarted_and_deleted(start_orchestrator, images):
    orchestrator = start_orchestrator(ORCHESTRATOR_ON_EXIT="keep")  # as production servers do: re-adopted below
    root = orchestrator.url + "/"

    status, first = configure(orchestrator, model_uri="models:/brightness/1")
    assert status == 200 and first["created"] and first["state"] == "ready", first
    status, second = configure(orchestrator, model_uri="models:/brightness/2")
    assert status == 200 and second["created"] and second["id"] != first["id"]
    assert first["label_studio_url"] == f"{root}models/{first['id']}/"

    # Each backend through its own URL, and the newest through the root.
    assert predict(first["label_studio_url"], images, "white", "black") == (["light", "dark"], "brightness:1")
    assert predict(second["label_studio_url"], images, "white", "black") == (["dark", "light"], "brightness:2")
    assert predict(root, images, "white") == (["dark"], "brightness:2")
    setup = requests.post(root + "setup", json={"project": "1.1", "schema": IMAGE_CONFIG}, timeout=5)
    assert setup.json()["model_version"] == "brightness:2"
    webhook = requests.post(f"{first['label_studio_url']}webhook", json={"action": "START_TRAINING"}, timeout=5)
    assert webhook.status_code == 201

    # The same model again reconfigures its backend: same process, new configuration, now the newest.
    handle = orchestrator.backends()[first["id"]]["handle"]
    status, again = configure(orchestrator, model_uri="models:/brightness/1", model_version="relabelled")
    assert status == 200 and not again["created"] and again["id"] == first["id"]
    assert orchestrator.backends()[first["id"]]["handle"] == handle
    assert predict(root, images, "white") == (["light"], "relabelled")

    # A backend that dies comes back by itself, configured from its MODEL_DIR.
    os.killpg(int(handle.partition(":")[0]), signal.SIGKILL)
    wait_until(lambda: orchestrator.backends()[first["id"]]["restarts"] == 1, 30, "restart")
    backend_url = first["label_studio_url"]
    wait_until(lambda: requests.get(backend_url + "health", timeout=1).json().get("configured"), 60, "restored")
    assert predict(backend_url, images, "black") == (["dark"], "relabelled")
    described = requests.get(f"{orchestrator.url}/backends/{first['id']}", timeout=5).json()
    assert described["last_error"] and described["log"] and described["health"]["configured"]

    # A new orchestrator on the same state folder adopts both backends: nothing restarted, nothing reconfigured.
    handles = {i: b["handle"] for i, b in orchestrator.backends().items()}
    orchestrator.stop()
    assert "left 2 backend(s) running (ORCHESTRATOR_ON_EXIT=keep)" in orchestrator.output()
    orchestrator = start_orchestrator(ORCHESTRATOR_ON_EXIT="keep")
    assert {i: b["handle"] for i, b in orchestrator.backends().items()} == handles
    assert predict(f"{orchestrator.url}/models/{second['id']}/", images, "white") == (["dark"], "brightness:2")
    assert predict(orchestrator.url + "/", images, "white") == (["light"], "relabelled")

    # Delete: stopped, port freed, forgotten.
    port = orchestrator.backends()[second["id"]]["port"]
    deleted = requests.delete(f"{orchestrator.url}/backends/{second['id']}", timeout=60)
    assert deleted.status_code == 200 and deleted.json()["state"] == "deleted"
    assert port_is_free(port)
    assert requests.get(f"{orchestrator.url}/backends/{second['id']}", timeout=5).status_code == 404
    gone = requests.post(f"{orchestrator.url}/models/{second['id']}/predict", json={}, timeout=5)
    assert gone.status_code == 404 and "GET /backends lists them" in gone.json()["detail"]
    assert list(orchestrator.backends()) == [first["id"]]


def test_ctrl_c_on_flask_run_stops_the_backends_and_the_next_start_brings_them_back(start_orchestrator, images):
    orchestrator = start_orchestrator()
    status, first = configure(orchestrator, model_uri="models:/brightness/1")
    assert status == 200, first
    record = orchestrator.backends()[first["id"]]
    pid = int(record["handle"].partition(":")[0])

    orchestrator.stop(signal.SIGINT)
    assert "stopped 1 backend(s) (ORCHESTRATOR_ON_EXIT=stop)" in orchestrator.output()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the backend's whole process group is gone
    assert port_is_free(record["port"])

    orchestrator = start_orchestrator(ORCHESTRATOR_ON_EXIT="keep")
    url = f"{orchestrator.url}/models/{first['id']}/"
    wait_until(lambda: requests.get(url + "health", timeout=1).json().get("configured"), 60, "started again, configured")
    assert predict(url, images, "white") == (["light"], "brightness:1")
    restarted = orchestrator.backends()[first["id"]]
    assert restarted["restarts"] == 0 and restarted["failures"] == 0  # started again, not counted as a crash
    orchestrator.stop()  # SIGTERM, with keep: the backend stays, and the orchestrator says where
    output = orchestrator.output()
    assert "left 1 backend(s) running (ORCHESTRATOR_ON_EXIT=keep)" in output and first["id"] in output
    assert requests.get(restarted["url"] + "/health", timeout=5).json()["configured"]


def test_failed_configures_leave_nothing_behind_and_keep_what_served(start_orchestrator, images):
    # Behind a corporate proxy that NO_PROXY does not bypass: requests would send even the loopback calls to the
    # backends through it (every backend "did not answer /health"); they are the orchestrator's own.
    refused = f"http://127.0.0.1:{free_port()}"
    orchestrator = start_orchestrator(MAX_BACKENDS="1", HTTP_PROXY=refused, http_proxy=refused, ALL_PROXY=refused,
                                      NO_PROXY="")

    malformed = requests.post(
        orchestrator.url + "/configure", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert malformed.status_code == 400 and malformed.json()["type"] == "BadRequest"
    status, unknown = configure(orchestrator, model_uri="models:/no-such-model/1")
    assert status == 404 and unknown["backend_kept"] is False  # the backend's own error, passed through
    assert orchestrator.backends() == {}  # the backend started for it is gone again

    status, served = configure(orchestrator, model_uri="models:/brightness/1")
    assert status == 200
    status, limit = configure(orchestrator, model_uri="models:/brightness/2")
    assert status == 409 and "limit of 1 backends" in limit["error"] and "MAX_BACKENDS" in limit["detail"]

    status, bad_hook = configure(orchestrator, model_uri="models:/brightness/1", post_hook="not base64 !!")
    assert status in (400, 422) and bad_hook["backend_kept"] is True
    assert predict(served["label_studio_url"], images, "white") == (["light"], "brightness:1")


def test_real_dagshub_client_against_the_orchestrator(start_orchestrator, images, dagshub_host, monkeypatch, capsys):
    orchestrator = start_orchestrator()
    add_annotation_model(
        monkeypatch,
        dagshub_host.url,
        orchestrator.port,
        "brightness",
        version="1",
        pre_hook=hooks.brightness_pre,
        post_hook=hooks.choices_post,
    )
    printed = f"http://127.0.0.1:{orchestrator.port}/"
    assert f"Add LS endpoint: {printed}" in capsys.readouterr().out
    # What Label Studio does with that URL: /health, /setup, then /predict.
    assert requests.get(printed + "health", timeout=1).json()["status"] == "UP"
    assert (
        requests.post(printed + "setup", json={"project": "1.1", "schema": IMAGE_CONFIG}, timeout=3).json()[
            "model_version"
        ]
        == "brightness:1"
    )
    assert predict(printed, images, "white", "dark") == (["light", "dark"], "brightness:1")


def test_a_warm_spare_becomes_the_new_models_backend_and_is_replaced(start_orchestrator, images):
    orchestrator = start_orchestrator(WARM_SPARES="1")
    spares = lambda: requests.get(orchestrator.url + "/backends", timeout=5).json()["spares"]
    wait_until(lambda: [s["state"] for s in spares()] == ["ready"], 60, "a ready spare")
    [spare] = spares()

    status, configured = configure(orchestrator, model_uri="models:/brightness/1")
    assert status == 200 and configured["created"]
    backend = orchestrator.backends()[configured["id"]]
    assert backend["port"] == spare["port"] and not backend["spare"]  # the spare's process took the model
    assert predict(configured["label_studio_url"], images, "white") == (["light"], "brightness:1")
    wait_until(lambda: len(spares()) == 1 and spares()[0]["id"] != spare["id"], 30, "a new spare")
    assert list(orchestrator.backends()) == [configured["id"]]  # spares are not listed as backends


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def test_backends_fork_from_templates_that_hold_no_credentials_and_outlive_their_orchestrator(start_orchestrator,
                                                                                             images):
    orchestrator = start_orchestrator(LABEL_STUDIO_API_KEY="envkey-0123456789abcdef", ORCHESTRATOR_ON_EXIT="keep")
    status, first = configure(
        orchestrator, model_uri="models:/brightness/1", post_hook=encode_hook(hooks.ancestry_peeking_post)
    )
    assert status == 200 and first["state"] == "ready", first
    answer = predict_images(first["label_studio_url"], images, "white").json()["results"][0]
    assert answer["result"][0]["value"]["choices"] == ["light"]
    # The model process <- the models' template; the backend's gunicorn master <- the backends' template.
    (model_pid, _), (models_pid, models_cmdline) = answer["meta"]["ancestors"][:2]
    assert "backend.isolation.template" in models_cmdline and models_cmdline.rstrip().endswith(" lsb-model-tmpl")
    master = int(orchestrator.backends()[first["id"]]["handle"].partition(":")[0])
    template_pid = _parent(master)
    assert template_pid != models_pid and Path(f"/proc/{template_pid}/cmdline").read_bytes().endswith(b"\0lsb-template\0")
    names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in (template_pid, master, models_pid, model_pid)]
    assert names == ["lsb-template", "lsb-backend", "lsb-model-tmpl", "lsb-model"]  # what ps shows
    # Its key reached the backend, never the templates nor the hooks' processes.
    assert not answer["meta"]["key_seen"]
    for pid in (template_pid, models_pid):
        assert b"envkey" not in Path(f"/proc/{pid}/environ").read_bytes()

    # The models' template gone, the backend serves on, in the same model process; the next new model gets a new
    # one, and the backends' template forks its master as before.
    os.kill(models_pid, signal.SIGKILL)
    black = predict_images(first["label_studio_url"], images, "black").json()["results"][0]
    assert black["result"][0]["value"]["choices"] == ["dark"] and black["meta"]["ancestors"][0][0] == model_pid
    status, second = configure(
        orchestrator, model_uri="models:/brightness/2", post_hook=encode_hook(hooks.ancestry_peeking_post)
    )
    # The driver forked its backend once the new models' template had imported MLflow's and the flavors'
    # modules, so its configure's wait did not pay for them (on a cold disk, longer than CONFIGURE_WAIT_S).
    assert status == 200 and second["created"] and second["state"] == "ready", second
    answer = predict_images(second["label_studio_url"], images, "white").json()["results"][0]
    assert answer["result"][0]["value"]["choices"] == ["dark"]
    new_models = answer["meta"]["ancestors"][1][0]
    assert new_models != models_pid and answer["meta"]["ancestors"][1][1].rstrip().endswith(" lsb-model-tmpl")
    assert _parent(int(orchestrator.backends()[second["id"]]["handle"].partition(":")[0])) == template_pid

    # The first backend's model process still holds the killed template's pages, alone: the backend is renewed,
    # forked again beside itself and moved there once it serves, while Label Studio's URL answers throughout.
    def renewed() -> bool:
        assert predict(first["label_studio_url"], images, "black") == (["dark"], "brightness:1")
        now = int(orchestrator.backends()[first["id"]]["handle"].partition(":")[0])
        return now != master and _parent(now) == template_pid

    wait_until(renewed, 60, "the first backend forked again, its model process from the new models' template")
    answer = predict_images(first["label_studio_url"], images, "white").json()["results"][0]
    assert answer["meta"]["ancestors"][1][0] == new_models
    wait_until(lambda: _is_zombie(master), 20, "the first backend's old process gone")
    wait_until(lambda: _is_zombie(model_pid), 20, "the first backend's old model process gone with its worker")

    # The orchestrator gone, its backends kept: the templates stay while they live. The orchestrator started
    # again adopts them and forks its next new backend from those same templates, sharing their pages.
    orchestrator.stop()
    assert predict(second["url"], images, "black") == (["light"], "brightness:2")
    assert not _is_zombie(template_pid) and not _is_zombie(new_models)
    again = start_orchestrator(LABEL_STUDIO_API_KEY="envkey-0123456789abcdef", ORCHESTRATOR_ON_EXIT="keep")
    status, third = configure(
        again, model_uri="models:/brightness@champion", post_hook=encode_hook(hooks.ancestry_peeking_post)
    )
    assert status == 200 and third["created"], third
    answer = predict_images(third["label_studio_url"], images, "white").json()["results"][0]
    assert answer["result"][0]["value"]["choices"] == ["light"]
    assert answer["meta"]["ancestors"][1][0] == new_models
    assert _parent(int(again.backends()[third["id"]]["handle"].partition(":")[0])) == template_pid

    # With their last owner and the last process they forked, the templates end.
    again.remove_all()
    again.stop()
    for pid in (template_pid, new_models):
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), 15, "template gone")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_without_the_template_backends_start_as_new_pythons(start_orchestrator, images):
    orchestrator = start_orchestrator(FORK_BACKENDS="off")
    status, first = configure(
        orchestrator, model_uri="models:/brightness/1", post_hook=encode_hook(hooks.ancestry_peeking_post)
    )
    assert status == 200 and first["state"] == "ready", first
    answer = predict_images(first["label_studio_url"], images, "white").json()["results"][0]
    commands = [cmdline for _, cmdline in answer["meta"]["ancestors"]]
    assert "backend.isolation.zygote" in commands[1] and "gunicorn" in commands[2] and "flask" in commands[4]
    assert not any("backend.isolation.template" in c for c in commands)


def test_gunicorn_workers_share_one_template_and_start_each_new_model_once(start_orchestrator, images):
    # Two workers of one orchestrator, each asked for both new models at once, while the template still imports.
    orchestrator = start_orchestrator(workers=2)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda uri: configure(orchestrator, model_uri=uri),
                                ["models:/brightness/1", "models:/brightness/2"] * 2))
    assert [status for status, _ in answers] == [200] * 4, answers
    masters = {int(b["handle"].partition(":")[0]) for b in orchestrator.backends().values()}
    assert len(masters) == 2
    (template,) = {_parent(pid) for pid in masters}
    forked = {pid for pid in _children_of(template) if Path(f"/proc/{pid}/comm").read_text().strip() == "lsb-backend"}
    assert forked == masters  # none started twice
    for _, answer in answers[:2]:
        labels, version = predict(answer["label_studio_url"], images, "white")
        assert version == answer["backend"]["model_version"] and labels in (["light"], ["dark"])


def _children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_backend_started_by_an_orchestrator_that_died_before_recording_it_is_adopted_not_doubled(
        start_orchestrator, images):
    """The orchestrator restarts a backend and is killed before it writes the new handle down: the next
    orchestrator finds the port taken by that very backend (it takes the record's token) and adopts it,
    rather than starting a second one on another port and leaving the first to run for ever."""
    import json
    import sqlite3
    from contextlib import closing

    orchestrator = start_orchestrator(ORCHESTRATOR_ON_EXIT="keep")
    status, made = configure(orchestrator, model_uri="models:/brightness/1")
    assert status == 200
    before = orchestrator.backends()[made["id"]]
    orchestrator.stop(signal.SIGKILL)
    with closing(sqlite3.connect(orchestrator.state_dir / "registry.db")) as db, db:
        (raw,) = db.execute("SELECT record FROM backends WHERE id = ?", (made["id"],)).fetchone()
        record = json.loads(raw)
        record.update(handle="4194303:1", state="restarting", retry_at=0)  # what it knew before that start
        db.execute("UPDATE backends SET record = ? WHERE id = ?", (json.dumps(record), made["id"]))
    orchestrator.start()
    wait_until(lambda: orchestrator.backends()[made["id"]]["state"] == "ready", 60, "the backend adopted")
    after = orchestrator.backends()[made["id"]]
    assert after["port"] == before["port"] and after["handle"] == before["handle"], (before, after)
    assert predict(made["label_studio_url"], images, "white") == (["light"], "brightness:1")
    orchestrator.remove_all()
    assert port_is_free(before["port"])  # nothing left serving it
