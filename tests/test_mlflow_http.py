"""Models fetched over HTTP from a real `mlflow server`, and the real dagshub client configuring a backend.

The DagsHub host is played by a prefix proxy in front of the MLflow server, so the backend talks to
``<host>/<owner>/<repo>.mlflow`` exactly as it would on DagsHub.
"""

from __future__ import annotations

import requests

from harness.calls import image_tasks, labels_and_version, predict
from harness.servers import closed_port
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.dagshub import add_annotation_model


def predict_labels(backend, images, *names):
    tasks = [{**task, "meta": {"datapoint_id": task["id"]}} for task in image_tasks(images, *names)]
    return labels_and_version(predict(backend, tasks))


def test_plain_configure_over_http_tracking(start_backend, images, mlflow_server):
    """With credentials in the tracking URI's userinfo, as users write them: they never show."""
    backend = start_backend(MLFLOW_TRACKING_URI="sqlite:////nonexistent/unused.db", BACKEND_TEMPLATE="")  # standalone
    with_credentials = mlflow_server.url.replace("http://", "http://bob-the-user:hunter2pass@")
    response = requests.post(backend.url + "/configure", timeout=60, json={
        "model_uri": "models:/brightness/latest", "tracking_uri": with_credentials,
        "pre_hook": encode_hook(hooks.brightness_pre), "post_hook": encode_hook(hooks.choices_post)})
    assert response.status_code == 200, response.text
    assert predict_labels(backend, images, "white", "black") == (["dark", "light"], "brightness:2")
    shown = response.text + requests.get(backend.url + "/configure", timeout=5).text
    shown += requests.get(backend.url + "/health", timeout=5).text
    assert "***@127.0.0.1" in shown
    for secret in ("hunter2pass", "bob-the-user"):
        assert secret not in shown and secret not in backend.output()


def test_tracking_server_down_is_502_and_old_model_serves(start_backend, images, mlflow_server):
    backend = start_backend()
    assert requests.post(backend.url + "/configure", timeout=60, json={
        "model_uri": "models:/brightness/1", "pre_hook": encode_hook(hooks.brightness_pre), "post_hook": encode_hook(hooks.choices_post)}).ok
    with closed_port() as port:  # held: no other worker's server can start answering there meanwhile
        response = requests.post(backend.url + "/configure", timeout=60, json={
            "model_uri": "models:/brightness/2", "tracking_uri": f"http://127.0.0.1:{port}"})
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]
    assert predict_labels(backend, images, "white") == (["light"], "brightness:1")
    assert requests.get(backend.url + "/health", timeout=1).json()["last_error"]["type"] == "RegistryUnreachable"


def test_real_dagshub_client_configures_the_backend(start_backend, images, dagshub_host, monkeypatch, capsys):
    backend = start_backend()
    add_annotation_model(monkeypatch, dagshub_host.url, backend.port, "brightness", version="1",
                         pre_hook=hooks.brightness_pre, post_hook=hooks.choices_post)
    assert f"Add LS endpoint: http://127.0.0.1:{backend.port}/" in capsys.readouterr().out
    health = requests.get(backend.url + "/health", timeout=1).json()
    assert health["flavor"] == "mlflow.sklearn"  # the dagshub form loads the native flavor, as the client does
    assert predict_labels(backend, images, "white", "black", "dark") == (["light", "dark", "dark"], "brightness:1")
    shown = requests.get(backend.url + "/configure", timeout=1).json()["configuration"]
    assert shown["tracking_uri"] == f"{dagshub_host.url}/alice/models.mlflow"
    assert "dagshub-token" not in str(shown)

    # version "latest" (the client's default) resolves to the newest registered version.
    add_annotation_model(monkeypatch, dagshub_host.url, backend.port, "brightness",
                         pre_hook=hooks.brightness_pre, post_hook=hooks.choices_post)
    assert predict_labels(backend, images, "white")[1] == "brightness:2"
