"""The model zoo as an annotator sees it: a torchvision Faster R-CNN and Mask R-CNN logged with
``mlflow.pytorch``, and an ultralytics YOLO (detect and segment) behind the pyfunc wrapper a user writes
(``examples/zoo.py``), each served by the orchestrator running in the zoo's own environment
(``tests/support/zoo.py``: torchvision needs a torch build the main one is not), shaped by the ready-made
hooks, retrieved by real Label Studio and opened in the browser: boxes, polygons and brushes on the moth
and the beetle of the trap photo, with their labels. And the detector trained further on what an
annotator drew, through the ``register`` branch for torch modules, promoted and served."""

from __future__ import annotations

import pytest
import requests

import hooks as ready
from examples.hooks import DETECTOR_CONFIG
from examples.zoo import DETECTOR_MODEL, SEGMENTER_MODEL, YOLO_MODEL, YOLO_SEG_MODEL, detector_train
from harness.servers import OrchestratorProcess, wait_until
from lsmlflow.pickling import encode_hook
from tests.e2e.projects import (
    configure,
    connect,
    logged_flavors,
    near,
    new_project,
    predicted_in_label_studio,
    retrieve_predictions,
    stored,
    tasks_of,
    under_ci,
)
from tests.support.zoo import ZOO_ENV, ZooUnavailable, register_zoo, zoo_python

pytestmark = pytest.mark.e2e

CRITTERS = '<Label value="Moth"/><Label value="Beetle"/>'
POLYGON_CONFIG = (f'<View><Image name="image" value="$image"/><PolygonLabels name="outline" toName="image">'
                  f'{CRITTERS}</PolygonLabels></View>')
BRUSH_CONFIG = (f'<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                f'{CRITTERS}</BrushLabels></View>')
# Where the trap photo's moth and beetle are, as (x, y, width, height) fractions of the image.
PLACES = {"Moth": [0.25, 0.0, 0.25, 0.25], "Beetle": [0.5, 0.5, 0.25, 0.25]}

TORCHVISION = {"pre_hook": ready.images_to_tensors(),
               "post_hook": ready.torchvision_detection_post(threshold=0.5, class_names={1: "Moth", 2: "Beetle"}),
               "loader": "native"}
YOLO = {"pre_hook": "", "post_hook": ready.ultralytics_post(threshold=0.5)}  # the wrapper takes the image files


@pytest.fixture(scope="module")
def zoo_registry(tmp_path_factory):
    """The zoo's python, and a registry of its own holding its four models."""
    try:
        python = zoo_python()
        uri = f"sqlite:///{tmp_path_factory.mktemp('zoo-registry') / 'mlflow.db'}"
        register_zoo(python, uri)
    except ZooUnavailable as exc:
        if under_ci():
            pytest.fail(f"the model zoo is required under CI and is unavailable: {exc}")
        pytest.skip(str(exc))
    return python, uri


@pytest.fixture(scope="module")
def zoo_orchestrator(tmp_path_factory, zoo_registry, label_studio):
    """The orchestrator as a zoo user runs it: in the environment that holds torchvision and ultralytics."""
    python, uri = zoo_registry
    server = OrchestratorProcess(tmp_path_factory.mktemp("zoo-orchestrator") / "state",
                                 {"MLFLOW_TRACKING_URI": uri, "LABEL_STUDIO_URL": label_studio.url,
                                  "LABEL_STUDIO_API_KEY": label_studio.pat, **ZOO_ENV},
                                 python_bin=python.parent).start()
    yield server
    server.remove_all()
    server.stop()


@pytest.mark.parametrize(
    ("case", "model", "config", "hooks", "shape"),
    [
        ("fasterrcnn-boxes", DETECTOR_MODEL, DETECTOR_CONFIG, TORCHVISION, "Rect"),
        ("maskrcnn-polygons", SEGMENTER_MODEL, POLYGON_CONFIG, TORCHVISION, "Line"),
        ("maskrcnn-brush", SEGMENTER_MODEL, BRUSH_CONFIG, TORCHVISION, "Brush"),
        ("yolo-boxes", YOLO_MODEL, DETECTOR_CONFIG, YOLO, "Rect"),
        ("yolo-seg-polygons", YOLO_SEG_MODEL, POLYGON_CONFIG, YOLO, "Line"),
        ("yolo-seg-brush", YOLO_SEG_MODEL, BRUSH_CONFIG, YOLO, "Brush"),
    ],
)
def test_the_zoo_draws_each_critter_where_it_is(label_studio, zoo_orchestrator, annotator, scene,
                                                case, model, config, hooks, shape):
    project, [task] = predicted_in_label_studio(label_studio, zoo_orchestrator, case, config, f"models:/{model}/1",
                                                uploads=[scene], **hooks)
    drawn = annotator.open_task(project, task["id"], f"zoo-{case}", regions=2, shapes=2, kind=shape)
    labels = [row.split("\n")[0] for row in drawn.regions]
    assert sorted(labels) == ["Beetle", "Moth"], drawn.regions
    boxes = drawn.boxes(shape)
    assert len(boxes) == 2, boxes
    for label, place in PLACES.items():
        assert any(near(box, place) for box in boxes), (case, label, boxes)


def places_of(prediction):
    """{label: (x, y, width, height) fractions} of a stored prediction's rectangles."""
    return {r["value"]["rectanglelabels"][0]: [r["value"][k] / 100 for k in ("x", "y", "width", "height")]
            for r in prediction["result"]}


def test_the_detector_learns_from_annotated_boxes_and_its_new_version_serves(label_studio, zoo_orchestrator,
                                                                            zoo_registry, scene, tmp_path):
    """Start Training on a project whose annotator kept the detector's boxes: the train_hook fine-tunes the
    serving torch module (current_model), the backend logs it with mlflow.pytorch as version 2, the gate
    passes, the alias moves, the backend swaps, and Label Studio retrieves version 2's boxes."""
    from mlflow import MlflowClient

    _, registry = zoo_registry
    backend = configure(zoo_orchestrator, f"models:/{DETECTOR_MODEL}@champion", TORCHVISION["post_hook"],
                        pre_hook=TORCHVISION["pre_hook"], loader="native", train_hook=encode_hook(detector_train),
                        training={"params": {"steps": 3}})
    url = backend["label_studio_url"]
    project = new_project(label_studio, "trap training", DETECTOR_CONFIG, uploads=[scene])
    [task] = tasks_of(label_studio, project)
    ml_backend = connect(label_studio, project, url)
    retrieve_predictions(label_studio, project)
    [first] = stored(label_studio, task["id"])
    assert first["model_version"] == f"{DETECTOR_MODEL}:1"
    drawn = [{k: r[k] for k in ("from_name", "to_name", "type", "value", "original_width", "original_height")}
             for r in first["result"]]
    label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": drawn})  # the annotator agrees

    label_studio.api("POST", f"/api/ml/{ml_backend}/train", json={})  # the "Start Training" button
    status = lambda: requests.get(url + "train/status", timeout=10).json()
    wait_until(lambda: status()["jobs"] and status()["current"] is None, 240, "the training")
    job = status()["jobs"][0]
    assert (job["state"], job.get("outcome")) == ("succeeded", "promoted"), job
    client = MlflowClient(tracking_uri=registry)
    assert str(client.get_model_version_by_alias(DETECTOR_MODEL, "champion").version) == job["version"] == "2"
    assert "pytorch" in logged_flavors(registry, DETECTOR_MODEL, 2, tmp_path)  # by register's branch for torch modules

    new_version = f"{DETECTOR_MODEL}:2"
    wait_until(lambda: requests.post(url + "setup", json={}, timeout=5).json()["model_version"] == new_version, 60,
               "the swap")
    retrieve_predictions(label_studio, project)
    [latest] = [p for p in stored(label_studio, task["id"]) if p["model_version"] == new_version]
    places = places_of(latest)
    assert sorted(places) == ["Beetle", "Moth"]
    assert all(near(places[label], place) for label, place in PLACES.items()), places
