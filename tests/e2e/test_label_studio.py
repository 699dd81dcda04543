"""End to end with the real Label Studio: projects connected to the orchestrator through Label
Studio's own API, "retrieve predictions" run by Label Studio, predictions read back from it.

Label Studio is installed once per machine (tests/support/label_studio.py). Under CI a Label Studio
that cannot be installed or started fails the run; elsewhere these tests are skipped, saying why.
"""

from __future__ import annotations

import os
import re

import pytest
import requests

from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG, encode
from tests.support.label_studio import LabelStudioUnavailable, start_label_studio
from tests.support.servers import OrchestratorProcess, file_server

pytestmark = pytest.mark.e2e

BOXES_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="dark"/><Label value="light"/></RectangleLabels></View>'
)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    try:
        server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    except LabelStudioUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Label Studio is required under CI and is unavailable: {exc}")
        pytest.skip(f"no Label Studio here: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory, registry):
    server = OrchestratorProcess(
        tmp_path_factory.mktemp("orchestrator") / "state", {"MLFLOW_TRACKING_URI": registry}
    ).start()
    yield server
    server.remove_all()
    server.stop()


@pytest.fixture(scope="module")
def served_images(images):
    server = file_server(images["white"].parent)
    yield server
    server.close()


def configure(orchestrator, model_uri, post_hook):
    response = requests.post(
        orchestrator.url + "/configure",
        timeout=120,
        json={"model_uri": model_uri, "pre_hook": encode(hooks.brightness_pre), "post_hook": encode(post_hook)},
    )
    assert response.status_code == 200, response.text
    return response.json()


def new_project(label_studio, title, config, urls=(), uploads=()):
    project = label_studio.api("POST", "/api/projects", json={"title": title, "label_config": config})["id"]
    if urls:
        label_studio.api("POST", f"/api/projects/{project}/import", json=[{"image": url} for url in urls])
    for path in uploads:  # stored by Label Studio: the backend must fetch them from it, with its token
        with open(path, "rb") as handle:
            label_studio.api(
                "POST", f"/api/projects/{project}/import", files={"file": (path.name, handle, "image/png")}
            )
    return project


def tasks_of(label_studio, project):
    listed = label_studio.api("GET", f"/api/tasks?project={project}&page_size=100")
    tasks = listed["tasks"] if isinstance(listed, dict) else listed
    return sorted(tasks, key=lambda t: t["id"])


def connect(label_studio, project, url):
    backend = label_studio.api("POST", "/api/ml", json={"url": url, "project": project, "title": "mlflow"})
    assert backend["state"] == "CO", backend  # Connected: Label Studio's /health and /setup went through
    return backend["id"]


def retrieve_predictions(label_studio, project):
    label_studio.api(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )


def stored(label_studio, task_id):
    return label_studio.api("GET", f"/api/predictions?task={task_id}")


def test_rectangle_project_through_its_model_url(label_studio, orchestrator, served_images, images):
    backend = configure(orchestrator, "models:/brightness/1", hooks.box_post)
    project = new_project(
        label_studio,
        "boxes",
        BOXES_CONFIG,
        urls=[f"{served_images.url}/white.png", f"{served_images.url}/black.png"],
        uploads=[images["light"]],
    )
    tasks = tasks_of(label_studio, project)
    assert tasks[2]["data"]["image"].startswith("/data/upload/")
    ml_backend = connect(label_studio, project, backend["label_studio_url"])

    retrieve_predictions(label_studio, project)
    expected = ["light", "dark", "light"]
    for task, label in zip(tasks, expected):
        [prediction] = stored(label_studio, task["id"])
        assert prediction["model_version"] == "brightness:1"
        [region] = prediction["result"]
        assert region["value"]["rectanglelabels"] == [label]
        # The centred half of a 32 x 24 image, in percent of the real size.
        assert (region["value"]["x"], region["value"]["y"], region["value"]["width"], region["value"]["height"]) == (
            25,
            25,
            50,
            50,
        )
        assert (region["original_width"], region["original_height"]) == (32, 24)
    following = label_studio.api("GET", f"/api/projects/{project}/next")
    assert following["predictions"] and following["predictions"][0]["model_version"] == "brightness:1"

    # "Start training" reaches the backend's /webhook, which answers 201.
    label_studio.api("POST", f"/api/ml/{ml_backend}/train", json={})
    metrics = requests.get(backend["label_studio_url"] + "metrics", timeout=5).text
    assert re.search(r'lsbackend_requests_total\{endpoint="/webhook",status="201"\} [1-9]', metrics), metrics[-2000:]


def test_choices_project_through_the_root_url_recovers_from_a_bad_hook(label_studio, orchestrator, served_images):
    broken = configure(
        orchestrator, "models:/brightness/2", hooks.wrong_label_post
    )  # now the newest: the root serves it
    project = new_project(
        label_studio, "choices", IMAGE_CONFIG, urls=[f"{served_images.url}/white.png", f"{served_images.url}/black.png"]
    )
    tasks = tasks_of(label_studio, project)
    connect(label_studio, project, orchestrator.url + "/")

    retrieve_predictions(label_studio, project)
    assert all(stored(label_studio, task["id"]) == [] for task in tasks)  # nothing broken was stored
    answer = requests.post(
        orchestrator.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=30
    )
    assert answer.status_code == 422
    assert "purple" in answer.json()["error"] and "Fix the post_hook" in answer.json()["detail"]
    log = requests.get(f"{orchestrator.url}/backends/{broken['id']}?log_lines=200", timeout=5).json()["log"]
    assert any("purple" in line and "do not fit the labeling config" in line for line in log)

    configure(orchestrator, "models:/brightness/2", hooks.choices_post)  # the corrected hook, same backend
    retrieve_predictions(label_studio, project)
    labels = [stored(label_studio, task["id"])[0]["result"][0]["value"]["choices"] for task in tasks]
    assert labels == [["dark"], ["light"]]  # version 2 says the opposite of version 1
