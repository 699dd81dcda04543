"""End to end with the real Label Studio, as people run it: its default token mode (legacy tokens
refused, a Personal Access Token for the backend), images uploaded to it, projects connected to the
orchestrator through Label Studio's own API, "retrieve predictions" run by Label Studio, predictions
read back from it. A second Label Studio keeps the legacy mode, where only the token ``/setup`` sends
is at hand.

Label Studio is installed once per machine (harness/label_studio.py). Under CI a Label Studio
that cannot be installed or started fails the run; elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

import hooks as builders
from harness.servers import base_env, closed_port, wait_until
from lsmlflow import Client, LabelStudioError, connect_project
from lsmlflow.pickling import encode_hook
from tests.e2e.projects import (
    BOXES_CONFIG,
    backend_health,
    configure,
    connect,
    logged_flavors,
    new_project,
    retrieve_predictions,
    start_label_studio_or_skip,
    start_orchestrator,
    stored,
    tasks_of,
)
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

pytestmark = pytest.mark.e2e


def test_rectangles_on_uploaded_images_with_a_personal_access_token(label_studio, orchestrator, images):
    backend = configure(orchestrator, "models:/brightness/1", hooks.box_post)
    project = new_project(label_studio, "boxes", BOXES_CONFIG, uploads=[images["white"], images["black"], images["light"]])
    tasks = tasks_of(label_studio, project)
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    ml_backend = connect(label_studio, project, backend["label_studio_url"])

    retrieve_predictions(label_studio, project)
    for task, label in zip(tasks, ["light", "dark", "light"]):
        [prediction] = stored(label_studio, task["id"])
        assert prediction["model_version"] == "brightness:1"
        [region] = prediction["result"]
        assert region["value"]["rectanglelabels"] == [label]
        # The centred half of a 32 x 24 image, in percent of the real size.
        assert (region["value"]["x"], region["value"]["y"], region["value"]["width"], region["value"]["height"]) == (
            25, 25, 50, 50,
        )
        assert (region["original_width"], region["original_height"]) == (32, 24)
        assert prediction["score"] == pytest.approx(0.9)
    following = label_studio.api("GET", f"/api/projects/{project}/next")
    assert following["predictions"] and following["predictions"][0]["model_version"] == "brightness:1"
    assert backend_health(backend["label_studio_url"])["label_studio"]["token"] == "personal access token"

    # Training events reach /webhook and are recorded there: "start training", and a new annotation.
    label_studio.api("POST", f"/api/ml/{ml_backend}/train", json={})
    result = [{"from_name": "box", "to_name": "image", "type": "rectanglelabels",
               "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 0, "rectanglelabels": ["dark"]}}]
    label_studio.api("POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": result})

    def recorded():
        return backend_health(backend["label_studio_url"])["webhooks"]["projects"].get(str(project), {}).get("events", {})

    wait_until(lambda: {"START_TRAINING", "ANNOTATION_CREATED"} <= set(recorded()), 30, "the webhook events")


def test_choices_through_the_root_url_recover_from_a_bad_hook(label_studio, orchestrator, images):
    broken = configure(orchestrator, "models:/brightness/2", hooks.wrong_label_post)  # the newest: the root serves it
    project = new_project(label_studio, "choices", IMAGE_CONFIG, uploads=[images["white"], images["black"]])
    tasks = tasks_of(label_studio, project)
    connect(label_studio, project, orchestrator.url + "/")

    retrieve_predictions(label_studio, project)
    assert all(stored(label_studio, task["id"]) == [] for task in tasks)  # nothing broken was stored
    answer = requests.post(orchestrator.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30)
    assert answer.status_code == 422
    assert "purple" in answer.json()["error"] and "Fix the post_hook" in answer.json()["detail"]
    log = requests.get(f"{orchestrator.url}/backends/{broken['id']}?log_lines=200", timeout=5).json()["log"]
    assert any("purple" in line and "do not fit the labeling config" in line for line in log)

    configure(orchestrator, "models:/brightness/2", hooks.choices_post)  # the corrected hook, same backend
    retrieve_predictions(label_studio, project)
    labels = [stored(label_studio, task["id"])[0]["result"][0]["value"]["choices"] for task in tasks]
    assert labels == [["dark"], ["light"]]  # version 2 says the opposite of version 1


def test_a_missing_image_stores_nothing_until_it_is_back(label_studio, orchestrator, images, tmp_path):
    backend = configure(orchestrator, "models:/brightness/1", hooks.choices_post)
    project = new_project(label_studio, "missing", IMAGE_CONFIG, uploads=[images["white"], images["dark"]])
    present, missing = tasks_of(label_studio, project)
    connect(label_studio, project, backend["label_studio_url"])
    kept = label_studio.uploaded_file(project, "dark.png")
    shutil.move(kept, tmp_path / "away.png")

    retrieve_predictions(label_studio, project)
    assert [p["result"][0]["value"]["choices"] for p in stored(label_studio, present["id"])] == [["light"]]
    assert stored(label_studio, missing["id"]) == []  # not an empty prediction that would hide it for good

    shutil.move(tmp_path / "away.png", kept)
    retrieve_predictions(label_studio, project)
    assert [p["result"][0]["value"]["choices"] for p in stored(label_studio, missing["id"])] == [["dark"]]
    assert len(stored(label_studio, present["id"])) == 1  # predicted once, not again


def test_the_client_and_the_cli_connect_projects_with_a_personal_access_token(label_studio, orchestrator, images):
    """From model to project without Label Studio's UI: configure from Python, connect with a PAT, and the
    project's stored predictions come back; then the same with `ls-mlflow connect`."""
    served = Client(orchestrator.url).configure("models:/brightness@champion", pre_hook=hooks.brightness_pre,
                                                post_hook=hooks.choices_post)
    project = new_project(label_studio, "client", IMAGE_CONFIG, uploads=[images["white"], images["black"]])
    connection = connect_project(project, served.url, label_studio_url=label_studio.url, api_key=label_studio.pat,
                                 model_version=served.model_version)
    assert connection.created and connection.predictions == 2 and connection.url == served.url
    for task, label in zip(tasks_of(label_studio, project), ["light", "dark"]):
        [prediction] = stored(label_studio, task["id"])
        assert prediction["model_version"] == served.model_version == "brightness:1"
        assert prediction["result"][0]["value"]["choices"] == [label]
    # The version whose scores order the Data Manager and uncertainty sampling: the served one.
    assert label_studio.api("GET", f"/api/projects/{project}")["model_version"] == "brightness:1"

    again = connect_project(project, served.url, label_studio_url=label_studio.url, api_key=label_studio.pat,
                            interactive=True, retrieve=False)
    assert not again.created and again.ml_backend_id == connection.ml_backend_id and again.predictions is None
    [ml_backend] = label_studio.api("GET", f"/api/ml?project={project}")
    assert ml_backend["is_interactive"] is True

    with closed_port() as port, pytest.raises(LabelStudioError) as unreachable:  # Label Studio cannot reach it: its reason
        connect_project(project, f"http://127.0.0.1:{port}/", label_studio_url=label_studio.url, api_key=label_studio.pat)
    assert "Connection refused" in unreachable.value.error and "reachable from Label Studio" in unreachable.value.detail
    with pytest.raises(LabelStudioError, match="401") as refused:
        connect_project(project, served.url, label_studio_url=label_studio.url, api_key="not-a-token")
    assert "Personal Access Token" in refused.value.detail

    second = new_project(label_studio, "cli", IMAGE_CONFIG, uploads=[images["light"]])
    env = base_env(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat)
    done = subprocess.run([sys.executable, "-m", "lsmlflow", "connect", "--url", orchestrator.url,
                           "--model", "models:/brightness@champion", "--project", str(second)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"] == 1 and "retrieving predictions" in done.stderr
    [task] = tasks_of(label_studio, second)
    assert [p["model_version"] for p in stored(label_studio, task["id"])] == ["brightness:1"]


def test_legacy_token_mode_with_only_the_token_setup_sends(tmp_path_factory, registry, images):
    legacy = start_label_studio_or_skip(tmp_path_factory.mktemp("label-studio-legacy"))
    orchestrator = start_orchestrator(tmp_path_factory.mktemp("orchestrator-legacy"), registry)  # no LABEL_STUDIO_*
    try:
        backend = configure(orchestrator, "models:/brightness/1", hooks.choices_post)
        project = new_project(legacy, "legacy", IMAGE_CONFIG, uploads=[images["white"], images["black"]])
        tasks = tasks_of(legacy, project)
        connect(legacy, project, backend["label_studio_url"])
        retrieve_predictions(legacy, project)
        labels = [stored(legacy, task["id"])[0]["result"][0]["value"]["choices"] for task in tasks]
        assert labels == [["light"], ["dark"]]
        shown = backend_health(backend["label_studio_url"])["label_studio"]
        assert shown == {"url": legacy.url, "token": "legacy token", "from": "setup"}
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
        legacy.stop()


def _stored_per_task(label_studio, project):
    by_task: dict = {}
    for prediction in label_studio.api("GET", f"/api/predictions?project={project}"):
        by_task.setdefault(prediction["task"], []).append(prediction)
    return by_task


def test_one_press_stores_a_big_project_each_task_once_across_a_backend_crash(tmp_path_factory, registry, label_studio):
    """Past Label Studio's deadline the background writes each prediction into Label Studio as it finishes:
    one press, every task stored exactly once even though the backend is killed halfway (the outbox and the
    unfinished tasks are on disk, and the restarted backend goes on), and a second press stores nothing."""
    orchestrator = start_orchestrator(tmp_path_factory.mktemp("orchestrator-big"), registry, PREDICT_TIMEOUT_S="3",
                                      LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat)
    try:
        count = 300  # 30 ms each: 9 s of work against a 3 s deadline (Label Studio itself takes ~20 ms a task)
        backend = configure(orchestrator, "models:/sentiment/1", hooks.sleeping_sentiment_post(0.03), pre_hook=None)
        url = backend["label_studio_url"]
        words = ["great lovely good", "awful bad terrible"]
        project = new_project(label_studio, "big", TEXT_CONFIG,
                              tasks=[{"text": f"{words[i % 2]} {i}"} for i in range(count)])
        connect(label_studio, project, url)

        retrieve_predictions(label_studio, project)
        assert backend_health(url)["background"]["queued"] > 0  # the rest goes on
        pid = int(orchestrator.backends()[backend["id"]]["handle"].partition(":")[0])
        os.killpg(pid, signal.SIGKILL)  # the whole backend, mid-way
        wait_until(lambda: len(_stored_per_task(label_studio, project)) == count, 120, "every task stored, one press")
        assert int(orchestrator.backends()[backend["id"]]["handle"].partition(":")[0]) != pid  # restarted meanwhile
        wait_until(lambda: backend_health(url)["push"]["projects"][str(project)]["left"] == 0, 30,
                   "the last chunk's answer from Label Studio")
        push = backend_health(url)["push"]
        assert push["mode"] == "on" and "why" not in push
        progress = push["projects"][str(project)]
        # The round handed what it had done at its deadline to the push too: all of it written in bulk.
        assert progress == {"stored": count, "left": 0, "failed": 0}, progress
        metrics = requests.get(url + "metrics", timeout=10).text
        assert f'lsbackend_push_tasks{{project="{project}",state="stored"}} {float(progress["stored"])}' in metrics

        retrieve_predictions(label_studio, project)  # pressed again: nothing new, nothing twice
        by_task = _stored_per_task(label_studio, project)
        assert len(by_task) == count and all(len(p) == 1 for p in by_task.values())
        labels = {t: p[0]["result"][0]["value"]["choices"][0] for t, p in by_task.items()}
        assert sorted(set(labels.values())) == ["negative", "positive"]
        assert {p[0]["model_version"] for p in by_task.values()} == {"sentiment:1"}
    finally:
        orchestrator.remove_all()
        orchestrator.stop()


def test_a_label_studio_briefly_down_gets_every_pushed_prediction_once_when_it_is_back(tmp_path_factory, registry):
    own = start_label_studio_or_skip(tmp_path_factory.mktemp("label-studio-down"))  # stopped and started here
    pat = own.default_token_mode()
    orchestrator = start_orchestrator(tmp_path_factory.mktemp("orchestrator-down"), registry, PREDICT_TIMEOUT_S="2",
                                      LABEL_STUDIO_URL=own.url, LABEL_STUDIO_API_KEY=pat)
    try:
        count = 200  # 30 ms each: 6 s of work against a 2 s deadline
        backend = configure(orchestrator, "models:/sentiment/1", hooks.sleeping_sentiment_post(0.03), pre_hook=None)
        url = backend["label_studio_url"]
        project = new_project(own, "down", TEXT_CONFIG, tasks=[{"text": f"great {i}"} for i in range(count)])
        connect(own, project, url)
        retrieve_predictions(own, project)
        own.stop()
        progress = lambda: backend_health(url)["push"]["projects"][str(project)]
        wait_until(lambda: "did not take them" in progress().get("last_error", ""), 30, "a push that found it down")
        own.start()
        wait_until(lambda: len(_stored_per_task(own, project)) == count, 120, "every task stored once it is back")
        wait_until(lambda: progress()["left"] == 0, 30, "the outbox written out")
        by_task = _stored_per_task(own, project)
        assert len(by_task) == count and all(len(p) == 1 for p in by_task.values())
        assert progress()["failed"] == 0
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
        own.stop()


def test_scores_that_measure_doubt_put_the_least_certain_tasks_first_in_label_studio(label_studio, orchestrator):
    """``sklearn_post(score="margin")`` on predict_proba: Label Studio's Data Manager, sorted by prediction score,
    and its uncertainty sampling both serve the tasks the model is torn on first."""
    post = builders.sklearn_post(classes=["negative", "positive"], score="margin")
    backend = configure(orchestrator, "models:/sentiment_proba/1", post, pre_hook=None)
    texts = ["great lovely good", "great bad", "awful bad terrible", "good awful", "wonderful"]  # sure, torn, sure, torn, leaning
    project = new_project(label_studio, "doubt", TEXT_CONFIG, tasks=[{"text": t} for t in texts])
    connect(label_studio, project, backend["label_studio_url"])
    retrieve_predictions(label_studio, project)
    # Which version's scores count: Settings > Predictions (ls-mlflow connect sets it to the served version).
    label_studio.api("PATCH", f"/api/projects/{project}", json={"model_version": "sentiment_proba:1"})

    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    listed = label_studio.api("GET", f"/api/tasks?project={project}&fields=all", params={"query": query})["tasks"]
    ordered = [task["data"]["text"] for task in listed]
    assert set(ordered[:2]) == {"great bad", "good awful"} and ordered[2:] == ["wonderful", "great lovely good",
                                                                               "awful bad terrible"], ordered
    scores = [task["predictions_score"] for task in listed]
    assert scores == sorted(scores) and scores[0] < 0.05 and scores[-1] > 0.5, scores

    label_studio.api("PATCH", f"/api/projects/{project}", json={"sampling": "Uncertainty sampling"})
    first = label_studio.api("GET", f"/api/projects/{project}/next")
    assert first["data"]["text"] in {"great bad", "good awful"}, first["data"]


def test_without_a_token_that_may_write_the_push_is_off_says_why_and_rounds_store_the_rest(tmp_path_factory, registry,
                                                                                            label_studio):
    """Label Studio in its default token mode, the backend given no token: /setup's legacy token is refused."""
    orchestrator = start_orchestrator(tmp_path_factory.mktemp("orchestrator-refused"), registry, PREDICT_TIMEOUT_S="2")
    try:
        count = 200  # 14 ms each: 2.8 s of work against a 2 s deadline
        backend = configure(orchestrator, "models:/sentiment/1", hooks.sleeping_sentiment_post(0.014), pre_hook=None)
        project = new_project(label_studio, "refused", TEXT_CONFIG, tasks=[{"text": f"great {i}"} for i in range(count)])
        connect(label_studio, project, backend["label_studio_url"])
        retrieve_predictions(label_studio, project)
        health = lambda: backend_health(backend["label_studio_url"])
        wait_until(lambda: health()["push"]["mode"] == "off", 60, "the push turned off by Label Studio's refusal")
        why = health()["push"]["why"]
        assert "Label Studio refused to store predictions" in why and "LABEL_STUDIO_API_KEY" in why, why
        wait_until(lambda: health()["background"]["queued"] == 0, 60, "the background done")
        retrieve_predictions(label_studio, project)  # as before the push: the next round stores the rest
        by_task = _stored_per_task(label_studio, project)
        assert len(by_task) == count and all(len(p) == 1 for p in by_task.values())
    finally:
        orchestrator.remove_all()
        orchestrator.stop()


TRAINABLE = {  # flavor: (post hook, train hook, what annotators chose); the transformers tokenizer knows a few words
    "sklearn": (hooks.sentiment_post, hooks.sentiment_train,
                {"great good": "positive", "lovely fine": "positive", "wonderful great": "positive",
                 "good lovely": "positive", "bad awful": "negative", "terrible bad": "negative",
                 "awful horrid": "negative", "horrid terrible": "negative"}),
    "transformers": (builders.transformers_post(), hooks.pipeline_train,
                     {"great good": "positive", "lovely wonderful": "positive", "wonderful great": "positive",
                      "good lovely": "positive", "bad awful": "negative", "terrible bad": "negative",
                      "awful terrible": "negative", "bad terrible": "negative"}),
}


@pytest.mark.parametrize("flavor", sorted(TRAINABLE))
def test_annotations_train_a_new_version_that_is_promoted_and_predicts_what_annotators_chose(label_studio, orchestrator,
                                                                                             mlflow_server, flavor, tmp_path):
    """The loop closed through MLflow: annotate in Label Studio, press Start Training (its API), a new registered
    version with its lineage (logged by ``register``'s branch for the flavor the train_hook returned), the alias
    moved, the backend swapped, and retrieved predictions that changed."""
    from mlflow import MlflowClient

    from harness.servers import register_trainable

    name = f"e2e-sentiment-{flavor}"
    post_hook, train_hook, texts = TRAINABLE[flavor]
    register_trainable(mlflow_server.url, name, flavor=flavor)  # version 1 @champion has it backwards
    response = requests.post(orchestrator.url + "/configure", timeout=120, json={
        "model_uri": f"models:/{name}@champion", "tracking_uri": mlflow_server.url, "post_hook": encode_hook(post_hook),
        "train_hook": encode_hook(train_hook), "training": {"gate_tasks": 50},
    })
    assert response.status_code == 200, response.text
    url = response.json()["label_studio_url"]
    project = new_project(label_studio, "learning", TEXT_CONFIG, tasks=[{"text": t} for t in texts])
    tasks = tasks_of(label_studio, project)
    ml_backend = connect(label_studio, project, url)
    retrieve_predictions(label_studio, project)
    before = {t["data"]["text"]: stored(label_studio, t["id"])[0] for t in tasks}
    assert {p["model_version"] for p in before.values()} == {f"{name}:1"}
    assert all(p["result"][0]["value"]["choices"] != [texts[text]] for text, p in before.items())

    for task in tasks:  # the annotators correct every prediction
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [texts[task["data"]["text"]]]}}]
        label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})
    quality = lambda: backend_health(url).get("prediction_quality", {}).get(f"{name}:1", {})
    wait_until(lambda: quality().get("tasks") == len(tasks), 30, "the annotations compared with the predictions")
    assert quality()["choices_kept"] == 0.0

    label_studio.api("POST", f"/api/ml/{ml_backend}/train", json={})  # the "Start Training" button
    status = lambda: requests.get(url + "train/status", timeout=10).json()
    wait_until(lambda: status()["jobs"] and status()["current"] is None, 240, "the training")
    job = status()["jobs"][0]
    assert (job["state"], job["outcome"], job["trigger"]) == ("succeeded", "promoted", "START_TRAINING"), job

    mlflow = MlflowClient(tracking_uri=mlflow_server.url)
    version = mlflow.get_model_version(name, job["version"])
    assert version.tags["ls.project_id"] == str(project) and version.tags["ls.annotation_count"] == str(len(tasks))
    assert version.tags["ls.host"] == label_studio.url and version.tags["lsbackend.parent_version"] == f"{name}:1"
    assert str(mlflow.get_model_version_by_alias(name, "champion").version) == job["version"]
    assert flavor in logged_flavors(mlflow_server.url, name, job["version"], tmp_path)  # register's branch for it
    first_run = mlflow.get_run(mlflow.get_model_version(name, "1").run_id)
    assert first_run.data.metrics["annotators.choices_kept"] == 0.0  # what annotators kept of version 1, in MLflow

    new_version = f"{name}:{job['version']}"
    wait_until(lambda: requests.post(url + "setup", json={}, timeout=5).json()["model_version"] == new_version, 60, "the swap")
    retrieve_predictions(label_studio, project)
    for task in tasks:
        latest = [p for p in stored(label_studio, task["id"]) if p["model_version"] == new_version]
        assert latest and latest[0]["result"][0]["value"]["choices"] == [texts[task["data"]["text"]]]


def test_a_click_in_label_studio_gets_the_clicked_moths_mask_and_the_same_click_again_costs_no_model_call(
        label_studio, orchestrator, registry, tmp_path):
    """Interactive pre-annotation as the editor asks for it: a backend connected with ``is_interactive``,
    a smart keypoint sent through Label Studio's /api/ml/{id}/interactive-annotating, a promptable model
    (examples/promptseg.py) serving with an embed_hook; the mask of the clicked moth comes back."""
    from examples import promptseg

    subprocess.run([sys.executable, "-m", "examples.promptseg", registry], env=base_env(), check=True, capture_output=True)
    picture = np.full((240, 320, 3), 12, dtype=np.uint8)
    picture[60:120, 80:160] = (230, 20, 20)
    Image.fromarray(picture).save(tmp_path / "trap.png")
    config = """<View>
      <Image name="image" value="$image"/>
      <KeyPointLabels name="tag" toName="image" smart="true"><Label value="Moth"/></KeyPointLabels>
      <BrushLabels name="mask" toName="image" smart="true"><Label value="Moth"/></BrushLabels>
    </View>"""
    served = configure(orchestrator, "models:/promptseg/1", builders.sam_post(from_name="mask", to_name="image"),
                       pre_hook=promptseg.click_pre, embed_hook=encode_hook(promptseg.embed_hook))
    project = new_project(label_studio, "interactive", config, uploads=[tmp_path / "trap.png"])
    (task,) = tasks_of(label_studio, project)
    ml = label_studio.api("POST", "/api/ml", json={"url": served["label_studio_url"], "project": project,
                                                   "title": "promptseg", "is_interactive": True})
    click = {"result": [{"original_width": 320, "original_height": 240, "image_rotation": 0, "id": "Kp1",
                         "from_name": "tag", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                         "is_positive": True, "value": {"x": 37.5, "y": 37.5, "width": 0.6, "keypointlabels": ["Moth"]}}]}
    answer = label_studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating", json={"task": task["id"], "context": click})
    assert "errors" not in answer, answer
    (region,) = answer["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Moth"]
    mask = decode_rle(region["value"]["rle"]).reshape(240, 320, 4)[..., 3]
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (80, 159, 60, 119)
    assert stored(label_studio, task["id"]) == []  # a click's answer goes to the editor, not to the task's predictions

    # Submit sends the click again: the same answer, and no second model call.
    again = label_studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating", json={"task": task["id"], "context": click})
    assert again["data"] == answer["data"]
    metrics = requests.get(served["label_studio_url"] + "metrics", timeout=5).text
    assert "lsbackend_interactive_repeats_total 1.0" in metrics
