"""The backend's HTTP contract, in process, against a real MLflow registry (SQLite) and real models."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from harness.calls import configure, image_tasks, labels, predict
from harness.servers import wait_until
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

FIXTURES = Path(__file__).parent / "fixtures"


def choices_of(body):
    return [p["result"][0]["value"]["choices"][0] if p and p["result"] else None for p in body["results"]]


def test_health_before_configure(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["configured"] is False
    assert client.get("/").get_json()["status"] == "UP"
    assert client.get("/readyz").status_code == 503
    assert client.post("/setup", json={"project": "1.1", "schema": IMAGE_CONFIG}).get_json() == {"model_version": "unconfigured"}


def test_predict_before_configure_is_503_with_the_fix(client, images):
    response = predict(client, image_tasks(images, "white"))
    assert response.status_code == 503
    assert "POST /configure" in response.get_json()["detail"]


def test_configure_and_predict_images(client, images):
    response = configure(client)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model_version"] == "brightness:1"
    response = predict(client, image_tasks(images, "white", "black", "light", "dark"))
    assert response.status_code == 200
    assert labels(response) == ["light", "dark", "light", "dark"]
    for prediction in response.get_json()["results"]:
        assert prediction["model_version"] == "brightness:1"
        assert prediction["result"][0]["id"]
    assert client.post("/setup", json={}).get_json() == {"model_version": "brightness:1"}
    assert client.get("/versions").get_json() == {"versions": ["brightness:1"]}
    # /readyz is Antenna's: ready pipelines, and a configure without a label_config offers none.
    assert client.get("/readyz").status_code == 503 and client.get("/readyz").get_json()["status"] == []


@pytest.mark.parametrize(
    "uri, version",
    [("models:/brightness/latest", "brightness:2"), ("models:/brightness@champion", "brightness:1"), ("models:/brightness/2", "brightness:2")],
)
def test_latest_and_alias_resolve_to_a_concrete_version(client, images, uri, version):
    assert configure(client, model_uri=uri).status_code == 200
    response = predict(client, image_tasks(images, "white"))
    expected = "dark" if version == "brightness:2" else "light"  # v2 is the flipped model
    assert labels(response) == [expected]
    assert response.get_json()["model_version"] == version


def test_text_tasks_pass_text_to_hooks(client):
    assert configure(client, model_uri="models:/sentiment/1", pre_hook="", post_hook=encode_hook(hooks.sentiment_post)).status_code == 200
    tasks = [{"id": 1, "data": {"text": "great lovely good"}}, {"id": 2, "data": {"text": "awful bad"}}]
    assert labels(predict(client, tasks, TEXT_CONFIG)) == ["positive", "negative"]


def test_hooks_by_import_reference_and_batches(client, images):
    response = configure(client, pre_hook="tests.support.hooks:brightness_pre", post_hook="tests.support.hooks:choices_post", batch_size=2)
    assert response.status_code == 200
    assert response.get_json()["batch_size"] == 2
    assert labels(predict(client, image_tasks(images, "white", "black", "white", "black", "dark"))) == [
        "light", "dark", "light", "dark", "dark",
    ]


def test_torch_model_with_native_loader(client, images):
    response = configure(
        client, model_uri="models:/tiny_torch/1", loader="native",
        pre_hook=encode_hook(hooks.torch_brightness_pre), post_hook=encode_hook(hooks.torch_choices_post),
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["flavor"] == "mlflow.pytorch"
    assert response.get_json()["device"] in ("cpu", "cuda")
    response = predict(client, image_tasks(images, "white", "black"))
    assert labels(response) == ["light", "dark"]
    assert 0.5 < response.get_json()["results"][0]["score"] <= 1.0


def test_local_model_path(client, images, tmp_path, registry, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    path = mlflow.artifacts.download_artifacts(artifact_uri="models:/brightness/1", dst_path=str(tmp_path / "m"), tracking_uri=registry)
    assert configure(client, model_uri=path).status_code == 200
    assert labels(predict(client, image_tasks(images, "black"))) == ["dark"]


def test_a_failing_task_fails_alone_and_stores_nothing(client, images):
    configure(client)
    missing = str(images["white"].parent / "missing.png")
    tasks = image_tasks(images, "white") + [
        {"id": 9, "data": {"image": missing}},
        {"id": 10, "data": {}},
        {"id": 11, "data": {"image": 42}},
        {"id": 12, "data": {"image": ["a.png"]}},
        {"id": 13, "data": {"image": None}},
    ]
    body = predict(client, tasks).get_json()
    assert body["results"][0]["result"][0]["value"]["choices"] == ["light"]
    # An empty list, not an empty prediction: Label Studio stores nothing, so the next round asks again.
    assert body["results"][1:] == [[], [], [], [], []]
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "no such local file" in errors[9]
    assert "task data has no 'image'" in errors[10]
    assert "task data 'image' is int '42', not a URL or file path" in errors[11]
    assert "task data 'image' is list" in errors[12] and "task data 'image' is null" in errors[13]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "lsbackend_failed_tasks_total 5.0" in metrics and "lsbackend_predictions_total 1.0" in metrics


def test_text_of_the_wrong_type_fails_its_task_not_the_model(client):
    configure(client, model_uri="models:/sentiment/1", pre_hook="", post_hook=encode_hook(hooks.sentiment_post))
    tasks = [{"id": 1, "data": {"text": "great lovely good"}}, {"id": 2, "data": {"text": 17}},
             {"id": 3, "data": {"text": {"nested": "x"}}}, {"id": 4, "data": {"text": "awful bad"}}]
    body = predict(client, tasks, TEXT_CONFIG).get_json()
    assert choices_of(body) == ["positive", None, None, "negative"]
    assert {e["task"] for e in body["errors"]} == {2, 3}
    assert "task data 'text' is int '17', not text" in body["errors"][0]["error"]


def test_data_uri_tasks(client, images):
    configure(client)
    uri = "data:image/png;base64," + base64.b64encode(images["black"].read_bytes()).decode()
    assert labels(predict(client, [{"id": 1, "data": {"image": uri}}])) == ["dark"]


def test_context_and_tasks_reach_hooks_that_ask(client, images):
    def post(labels, tasks, context):
        return [
            {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                         "value": {"choices": ["dark" if context else str(label)]}}], "score": t["id"] / 10}
            for label, t in zip(labels, tasks)
        ]

    configure(client, post_hook=encode_hook(post))
    body = predict(client, image_tasks(images, "white", "white"), params={"context": {"result": []}}).get_json()
    assert [p["score"] for p in body["results"]] == [0.1, 0.2]
    assert labels(predict(client, image_tasks(images, "white"), params={"context": {"x": 1}})) == ["dark"]
    assert labels(predict(client, image_tasks(images, "white"))) == ["light"]


# -- errors: each is JSON with a cause and a fix, and the working configuration keeps serving --------

def assert_still_serving(client, images):
    assert labels(predict(client, image_tasks(images, "white", "black"))) == ["light", "dark"]
    assert client.get("/health").get_json()["model_version"] == "brightness:1"


@pytest.mark.parametrize(
    "send, status, message",
    [
        (lambda c: c.post("/configure", data=b"{oops", content_type="application/json"), 400, "not valid JSON"),
        (lambda c: configure(c, post_hook="@@@notbase64@@@"), 400, "not valid base64"),
        (lambda c: configure(c, model_uri="models:/no_such_model/1"), 404, "not found"),
        (lambda c: configure(c, model_uri="models:/brightness/99"), 404, "not found"),
        (lambda c: configure(c, model_uri="/no/such/dir"), 404, "no MLflow model at path"),
        (lambda c: configure(c, tracking_uri="http://127.0.0.1:9"), 502, "unreachable"),
        (lambda c: configure(c, post_hook=(FIXTURES / "hook_py310_cloudpickle312.b64").read_text()), 422, "cannot be unpickled"),
        (lambda c: configure(c, post_hook=(FIXTURES / "hook_py312_cloudpickle312.b64").read_text()), 422, "another Python"),
        (lambda c: configure(c, post_hook="tests.support.hooks:missing"), 422, "no attribute"),
        (lambda c: predict(c, [], "<View><Nope"), 400, "cannot be parsed"),
        (lambda c: c.post("/predict", data=b"[]", content_type="application/json"), 400, "must be a JSON object"),
        (lambda c: c.post("/predict", json={"tasks": "x", "label_config": IMAGE_CONFIG}), 400, "'tasks' must be a list"),
        (lambda c: c.post("/predict", json={"tasks": []}), 400, "'label_config' is missing"),
        (lambda c: c.get("/no-such-route"), 404, "Not Found"),
        (lambda c: c.post("/train", json={}), 400, "'project' is missing"),
        (lambda c: c.post("/train", json={"project": 1}), 503, "has no train_hook"),
        (lambda c: c.post("/train", json={"project": ["../admin"]}), 400, "must be a Label Studio project id"),
        (lambda c: c.post("/train", json={"project": 1, "tasks": "all"}), 400, "'tasks' must be a list"),
        (lambda c: c.get("/predict"), 405, "Method Not Allowed"),
    ],
)
def test_bad_requests_answer_json_and_lose_nothing(client, images, send, status, message):
    assert configure(client).status_code == 200
    response = send(client)
    assert response.status_code == status
    body = response.get_json()
    assert message in body["error"] + body["detail"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert_still_serving(client, images)


@pytest.mark.parametrize(
    "post_hook, status, message",
    [
        (hooks.wrong_label_post, 422, "do not fit the labeling config"),
        (hooks.short_post, 422, "returned 1 predictions for 2 tasks"),
        (lambda labels: None, 422, "returned a NoneType predictions"),
        (hooks.set_post, 422, "the prediction for task 1 (#0) cannot be sent as JSON: Object of type set"),
        (hooks.nan_score_post, 422, "the prediction for task 2 (#1) cannot be sent as JSON: Out of range float"),
    ],
)
def test_bad_post_hooks_are_refused_at_predict_and_fixed_by_reconfigure(client, images, post_hook, status, message):
    assert configure(client, post_hook=encode_hook(post_hook)).status_code == 200
    response = predict(client, image_tasks(images, "white", "black"))
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert configure(client).status_code == 200
    assert_still_serving(client, images)


def test_numpy_values_in_predictions_go_out_as_plain_numbers(client, images):
    assert configure(client, post_hook=encode_hook(hooks.numpy_post)).status_code == 200
    response = predict(client, image_tasks(images, "white", "black"))
    assert response.status_code == 200, response.get_json()
    first, second = response.get_json()["results"]
    assert first["result"][0]["value"] == {"choices": ["light"]} and first["meta"] == {"logits": [0.25, 0.75]}
    assert (first["score"], second["score"]) == (0.25, 0.75)  # the mean of the numpy region scores


def test_a_raising_hook_is_a_500_naming_the_stage(client, images):
    configure(client, pre_hook=encode_hook(hooks.raising_pre))
    response = predict(client, image_tasks(images, "white"))
    assert response.status_code == 500
    assert response.get_json()["error"] == "pre_hook raised ValueError: this pre hook always fails"
    assert "Traceback" not in response.get_data(as_text=True)
    # The worker is fine: a corrected configure serves at once.
    configure(client)
    assert_still_serving(client, images)


def test_hook_only_reconfigure_keeps_the_loaded_model(client, app, images):
    configure(client)
    runtime = app.extensions["lsbackend"].runtime
    first = runtime.active
    configure(client, post_hook=encode_hook(hooks.wrong_label_post))
    assert runtime.active is not first and runtime.active.process is first.process  # same process, model not reloaded
    assert runtime.active.info == first.info and first.process.restarts == 0
    configure(client)
    assert runtime.active.process is first.process
    assert_still_serving(client, images)


def test_repeated_configure_is_idempotent(client, app):
    configure(client)
    first = app.extensions["lsbackend"].runtime.active
    assert configure(client).status_code == 200
    assert app.extensions["lsbackend"].runtime.active is first


def test_configuration_view_hides_secrets(client):
    configure(client, tracking_password="hunter2", tracking_username="bob")
    text = client.get("/configure").get_data(as_text=True)
    assert "hunter2" not in text and "bob" not in text
    assert json.loads(text)["configuration"]["model_uri"] == "models:/brightness/1"


def test_webhook_and_metrics(client, images):
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}}).status_code == 201
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 201
    configure(client)
    predict(client, image_tasks(images, "white", "black"))
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "lsbackend_predictions_total 2.0" in metrics
    for stage in ("fetch", "pre_hook", "predict", "post_hook", "validate"):
        assert f'lsbackend_stage_seconds_count{{stage="{stage}"}} 1.0' in metrics
    assert 'lsbackend_requests_total{endpoint="/webhook",status="201"} 2.0' in metrics
    assert "lsbackend_model_load_seconds" in metrics


# -- auth ---------------------------------------------------------------------------------------------

def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth(app_with):
    client = app_with(basic_auth_user="ls", basic_auth_pass="pw")
    assert client.post("/setup", json={}).status_code == 401
    assert client.post("/setup", json={}, headers=basic("ls", "wrong")).status_code == 401
    assert client.post("/setup", json={}, headers=basic("ls", "pw")).status_code == 200
    assert client.post("/configure", json={"model_uri": "x"}).status_code == 401
    assert client.get("/configure/status").status_code == 401  # it names the model being loaded
    # Open: liveness for probes.
    assert client.get("/health").status_code == 200


def test_only_label_studio_may_start_a_training(app_with):
    """The webhook Label Studio creates carries no credentials: the operator adds the basic auth or the
    webhook secret to its headers; a caller with neither is refused, with that fix in the answer."""
    client = app_with(basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="hook-secret-123")
    event = {"action": "START_TRAINING", "project": {"id": 7}}
    for route in ("/webhook", "/train"):
        refused = client.post(route, json=event)
        assert refused.status_code == 401 and "X-Webhook-Secret" in refused.get_json()["detail"], route
        assert client.post(route, json=event, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
    assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "hook-secret-123"}).status_code == 201
    assert client.post("/webhook", json=event, headers=basic("ls", "pw")).status_code == 201
    # Label Studio's "Start Training" sends the basic auth: /train then does what it says (no train hook here).
    assert client.post("/train", json={"project": 7}, headers=basic("ls", "pw")).status_code != 401
    # No credentials configured: loopback only, as /configure.
    open_bind = app_with(host="0.0.0.0")
    refused = open_bind.post("/webhook", json=event)
    assert refused.status_code == 403 and "WEBHOOK_SECRET" in refused.get_json()["detail"]
    remote = app_with().post("/webhook", json=event, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert remote.status_code == 403


def test_configure_refused_on_open_bind_without_credentials(app_with):
    client = app_with(host="0.0.0.0")
    response = client.post("/configure", json={"model_uri": "models:/brightness/1"})
    assert response.status_code == 403
    assert "CONFIGURE_TOKEN" in response.get_json()["detail"]


def test_configure_refused_from_a_remote_client_without_credentials(client):
    response = client.post("/configure", json={"model_uri": "x"}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert response.status_code == 403


def test_configure_token_on_open_bind(app_with):
    client = app_with(host="0.0.0.0", configure_token="tok")
    spec = {"model_uri": "models:/brightness/1"}
    assert client.post("/configure", json=spec).status_code == 401
    assert client.post("/configure", json=spec, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/configure", json=spec, headers={"Authorization": "Bearer tok"}).status_code == 200


@pytest.mark.parametrize("batching", [True, False])
def test_past_the_deadline_a_request_answers_what_is_done_and_the_rest_goes_on(app_with, images, batching):
    client = app_with(predict_timeout_s=1.0, batching=batching)
    configure(client, post_hook=encode_hook(hooks.sleeping_post(0.4)), batch_size=1)
    tasks = image_tasks(images, "white", "black", "white", "dark", "light")  # 2 s of work, a 1 s deadline
    first = predict(client, tasks)
    assert first.status_code == 200, first.get_json()
    body = first.get_json()
    answered = [label for label in choices_of(body) if label is not None]
    assert body["results"].count([]) == body["pending"]["tasks"] >= 2  # the rest: nothing stored, not lost
    assert "retrieve predictions again" in body["pending"]["detail"]
    assert all(body["results"][i] == [] or label == expected for i, (label, expected) in
               enumerate(zip(choices_of(body), ["light", "dark", "light", "dark", "light"])))
    wait_until(lambda: client.get("/health").get_json()["background"]["queued"] == 0, 30, "the background to finish")
    # The next round, as Label Studio sends it: only the tasks that have no prediction yet.
    rest = [task for task, result in zip(tasks, body["results"]) if result == []]
    second = predict(client, rest)
    assert len(answered) + len(labels(second)) == 5 and None not in labels(second)
    assert "pending" not in second.get_json()
    health = client.get("/health").get_json()
    assert health["batching"]["items"] == 5  # every task went through the model exactly once
    assert health["prediction_cache"]["hits"] == len(rest)


def test_an_interactive_prediction_past_the_deadline_is_a_504(app_with, images):
    # The request's own deadline, alone: with the model call's timeout equal to it (the default), the call's
    # (a 504 too, that stops the process) could fire first on a loaded machine; test_hardening covers that one.
    client = app_with(predict_timeout_s=1.0, model_call_timeout_s=10.0)
    configure(client, post_hook=encode_hook(hooks.slow_post))
    response = predict(client, image_tasks(images, "white"), params={"context": {"result": []}})
    assert response.status_code == 504
    assert "interactive prediction did not finish" in response.get_json()["error"]
    assert "PREDICT_TIMEOUT_S" in response.get_json()["detail"]


def test_the_templates_prepared_routes_serve_the_first_app_made_after_it_and_count_its_own_errors(app_with):
    """The backends' template makes an app's routes once before it forks (``PreparedRoutes``): the first app a
    fork makes is that one, with its own settings and services; the next makes routes of its own. Each counts
    the errors it answers in its own metrics."""
    from backend.app import PreparedRoutes

    PreparedRoutes.prepare()
    prepared = PreparedRoutes.app
    first = app_with(max_request_bytes=1 << 20)
    assert first.application is prepared and PreparedRoutes.app is None
    second = app_with()
    assert second.application is not prepared
    for client, refused in ((first, 1), (second, 0)):
        assert client.get("/health").get_json()["status"] == "UP"
        answer = client.post("/predict", data=b"x" * (1 << 20 | 1), content_type="application/json")
        assert answer.status_code == (413 if refused else 400), answer.get_data(as_text=True)
        assert client.get("/no-such-route").status_code == 404
        counted = client.get("/metrics").get_data(as_text=True)
        assert 'lsbackend_errors_total{type="NotFound"} 1.0' in counted
        assert ('lsbackend_errors_total{type="PayloadTooLarge"} 1.0' in counted) == bool(refused)
