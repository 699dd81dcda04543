"""Label Studio as a user drives it through its API: projects, uploads, the ML backend, "Retrieve
predictions", and what it stored."""

from __future__ import annotations

import os

import pytest
import requests

from harness.calls import configure as configure_call
from harness.label_studio import LabelStudioUnavailable, start_label_studio
from harness.servers import OrchestratorProcess
from lsmlflow.pickling import encode_hook
from tests.support import hooks

PLACE = 0.02  # of the image's size: strokes and rounding on a canvas about 770 pixels wide
BOXES_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="dark"/><Label value="light"/></RectangleLabels></View>'
)


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def start_label_studio_or_skip(folder):
    """Under CI a Label Studio that cannot be installed or started fails the run; elsewhere the test is skipped."""
    try:
        return start_label_studio(folder)
    except LabelStudioUnavailable as exc:
        if under_ci():
            pytest.fail(f"Label Studio is required under CI and is unavailable: {exc}")
        pytest.skip(f"no Label Studio here: {exc}")


def start_orchestrator(folder, registry, **env):
    return OrchestratorProcess(folder / "state", {"MLFLOW_TRACKING_URI": registry, **env}).start()


def configure(orchestrator, model_uri, post_hook, pre_hook=hooks.brightness_pre, **fields):
    """Configure ``model_uri`` with these hooks (a hook given as a string is sent as it is: "" for none)."""
    encoded = {name: hook if isinstance(hook, str) else encode_hook(hook)
               for name, hook in (("pre_hook", pre_hook), ("post_hook", post_hook))}
    response = configure_call(orchestrator, model_uri=model_uri, **encoded, **fields)
    assert response.status_code == 200, response.text
    return response.json()


def new_project(label_studio, title, config, uploads=(), tasks=()):
    project = label_studio.api("POST", "/api/projects", json={"title": title, "label_config": config})["id"]
    if tasks:
        label_studio.api("POST", f"/api/projects/{project}/import", json=list(tasks))
    for path in uploads:  # stored by Label Studio: the backend must fetch them from it, with a token it accepts
        with open(path, "rb") as handle:
            label_studio.api("POST", f"/api/projects/{project}/import", files={"file": (path.name, handle, "image/png")})
    return project


def tasks_of(label_studio, project):
    listed = label_studio.api("GET", f"/api/tasks?project={project}&page_size=5000")
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


def backend_health(url):
    return requests.get(url + "health", timeout=5).json()


def predicted_in_label_studio(label_studio, orchestrator, title, config, model_uri, post_hook,
                              pre_hook=hooks.brightness_pre, uploads=(), tasks=(), **fields):
    """Configure the model, make the project, connect it, press "Retrieve predictions": its tasks, each with
    the stored prediction of the backend."""
    backend = configure(orchestrator, model_uri, post_hook, pre_hook=pre_hook, **fields)
    project = new_project(label_studio, title, config, uploads=uploads, tasks=tasks)
    label_studio.api("PATCH", f"/api/projects/{project}", json={"show_collab_predictions": True})
    connect(label_studio, project, backend["label_studio_url"])
    retrieve_predictions(label_studio, project)
    listed = tasks_of(label_studio, project)
    for task in listed:
        assert len(stored(label_studio, task["id"])) == 1, f"{title}: task {task['id']} has no prediction"
    return project, listed


def near(box, expected):
    return all(abs(a - b) <= PLACE for a, b in zip(box, expected))


def logged_flavors(tracking_uri, name, version, folder):
    """The MLflow flavors a registered version was logged with, from its MLmodel file."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    stored_at = MlflowClient(tracking_uri=tracking_uri).get_model_version_download_uri(name, str(version))
    path = download_artifacts(artifact_uri=f"{stored_at}/MLmodel", tracking_uri=tracking_uri, dst_path=str(folder))
    return set(Model.load(path).flavors)
