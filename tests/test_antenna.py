"""Antenna's processing-service API from the same configure that serves Label Studio: a detector and a
classifier, in process and through real gunicorn backends behind the orchestrator's root, every answer
validated against Antenna's schemas (``tests/support/antenna.py``) and the rules its platform saves by.
"""

from __future__ import annotations

import json

import pytest
import requests
from PIL import Image

from examples.hooks import DETECTOR_CONFIG
from harness.servers import OrchestratorProcess, file_server
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.antenna import (
    AntennaPlatform,
    PipelineResultsResponse,
    ProcessingServiceInfoResponse,
    processing_request,
)
from tests.support.hooks import IMAGE_CONFIG

DETECTOR = {
    "model_uri": "models:/critters/1",
    "pre_hook": encode_hook(hooks.critter_cells_pre),
    "post_hook": encode_hook(hooks.critter_boxes_post),
    "label_config": DETECTOR_CONFIG,
    "pipeline": {"slug": "critters", "name": "Critters", "description": "Moths and beetles by colour."},
}
CLASSIFIER = {
    "model_uri": "models:/tiny_torch/1",
    "loader": "native",
    "pre_hook": encode_hook(hooks.torch_brightness_pre),
    "post_hook": encode_hook(hooks.torch_choices_scores_post),
    "label_config": IMAGE_CONFIG,
}
MOTH_BOX = {"x1": 16.0, "y1": 0.0, "x2": 32.0, "y2": 12.0}  # cell (1, 0) of the 64x48 image's 4x4 grid
BEETLE_BOX = {"x1": 32.0, "y1": 24.0, "x2": 48.0, "y2": 36.0}  # cell (2, 2)


@pytest.fixture(scope="module")
def traps(tmp_path_factory):
    """Trap images made with Pillow, served over HTTP on loopback: url(name) gives each one's URL."""
    root = tmp_path_factory.mktemp("traps")
    scene = Image.new("RGB", (64, 48), (10, 10, 10))
    scene.paste((230, 20, 20), (16, 0, 32, 12))  # a red moth
    scene.paste((20, 20, 230), (32, 24, 48, 36))  # a blue beetle
    scene.save(root / "scene.png")
    Image.new("RGB", (64, 48), (10, 10, 10)).save(root / "empty.png")
    halves = Image.new("RGB", (40, 20), (10, 10, 10))
    halves.paste((240, 240, 240), (0, 0, 20, 20))  # white left half, black right half
    halves.save(root / "halves.png")
    Image.new("RGB", (40, 20), (240, 240, 240)).save(root / "bright.png")
    (root / "notes.png").write_text("not an image")
    server = file_server(root)
    yield lambda name: f"{server.url}/{name}"
    server.close()


@pytest.fixture
def antenna_client(app_with):
    """An in-process backend that may fetch from loopback (where the test's image server is)."""
    return app_with(fetch_allow_private=("127.0.0.1",))


def info_of(client) -> ProcessingServiceInfoResponse:
    response = client.get("/info")
    assert response.status_code == 200
    return ProcessingServiceInfoResponse.model_validate_json(response.get_data(as_text=True))


def process(client, slug, images, **extra) -> PipelineResultsResponse:
    response = client.post("/process", json=processing_request(slug, images, **extra))
    assert response.status_code == 200, response.get_json()
    return PipelineResultsResponse.model_validate_json(response.get_data(as_text=True))


def test_a_detector_serves_antenna_from_its_label_studio_configure(antenna_client, traps):
    client = antenna_client
    assert info_of(client).pipelines == []
    assert client.get("/readyz").status_code == 503 and client.get("/readyz").get_json()["status"] == []
    assert client.get("/livez").get_json() == {"status": True}

    assert client.post("/configure", json=DETECTOR).status_code == 200
    info = info_of(client)
    (pipeline,) = info.pipelines
    assert (pipeline.slug, pipeline.name, pipeline.version) == ("critters", "Critters", 1)
    detector, classifier = pipeline.algorithms
    assert detector.task_type == "detection" and detector.category_map is None
    assert classifier.task_type == "classification"
    assert classifier.category_map.labels == ["Moth", "Beetle"]
    assert classifier.category_map.data == [
        {"index": 0, "label": "Moth", "taxon_rank": "ORDER"}, {"index": 1, "label": "Beetle", "taxon_rank": "ORDER"}]
    assert client.get("/readyz").get_json() == {"status": ["critters"]}
    assert client.get("/health").get_json()["antenna_pipeline"] == "critters"

    platform = AntennaPlatform("http://unused/")
    platform.pipelines["critters"] = pipeline
    images = [("7", traps("scene.png")), ("8", traps("empty.png")), ("9", traps("gone.png")), ("10", traps("notes.png"))]
    results = process(client, "critters", images)
    platform.check_saved(results, processing_request("critters", images))
    boxes = {d.classifications[0].classification: d.bbox.model_dump() for d in results.detections}
    assert boxes == {"Moth": MOTH_BOX, "Beetle": BEETLE_BOX}
    assert {d.source_image_id for d in results.detections} == {"7"}
    for found in results.detections:
        (classification,) = found.classifications
        assert classification.algorithm.key == classifier.key and classification.terminal
        assert classification.labels == ["Moth", "Beetle"] and len(classification.scores) == 2
        assert 0.5 < max(classification.scores) <= 1.0 and min(classification.scores) > 0  # the model's own distribution
        assert found.algorithm.key == detector.key
    errors = " ".join(results.errors)
    assert "image 9: could not fetch" in errors and "404" in errors
    assert "image 10:" in errors and "not an image" in errors
    assert [i.id for i in results.source_images] == ["7", "8", "9", "10"]  # echoed, failed ones too

    # The same configure still serves Label Studio, with the same hooks.
    predicted = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": traps("scene.png")}}],
                                              "label_config": DETECTOR_CONFIG}).get_json()
    assert sorted(r["value"]["rectanglelabels"][0] for r in predicted["results"][0]["result"]) == ["Beetle", "Moth"]


def test_a_classifier_labels_whole_images_and_the_crops_antenna_sends_back(antenna_client, traps):
    client = antenna_client
    assert client.post("/configure", json=CLASSIFIER).status_code == 200
    (pipeline,) = info_of(client).pipelines
    assert pipeline.slug == "tiny-torch-v1" and pipeline.version == 1  # defaults from the model's name and version
    frame, classifier = pipeline.algorithms
    assert frame.task_type == "detection" and classifier.category_map.labels == ["dark", "light"]
    platform = AntennaPlatform("http://unused/")
    platform.pipelines[pipeline.slug] = pipeline

    images = [("1", traps("halves.png")), ("2", traps("empty.png"))]
    results = process(client, pipeline.slug, images)
    platform.check_saved(results, processing_request(pipeline.slug, images))
    by_image = {d.source_image_id: d for d in results.detections}
    assert by_image["1"].bbox.model_dump() == {"x1": 0.0, "y1": 0.0, "x2": 40.0, "y2": 20.0}  # the whole frame
    assert by_image["2"].classifications[0].classification == "dark"
    assert by_image["2"].algorithm.key == frame.key

    # Re-classification: Antenna sends another detector's boxes; each crop is classified, its box and algorithm kept.
    other = {"name": "Some Detector", "key": "some-detector"}
    sent = [
        {"source_image": {"id": "1", "url": traps("halves.png")}, "bbox": {"x1": 2, "y1": 2, "x2": 18, "y2": 18},
         "crop_image_url": None, "algorithm": other},
        {"source_image": {"id": "1", "url": traps("halves.png")}, "bbox": {"x1": 22, "y1": 2, "x2": 38, "y2": 18},
         "crop_image_url": None, "algorithm": other},
        {"source_image": {"id": "1", "url": traps("halves.png")}, "bbox": {"x1": 50, "y1": 30, "x2": 60, "y2": 40},
         "crop_image_url": None, "algorithm": other},
        {"source_image": {"id": "5", "url": traps("empty.png")}, "bbox": {"x1": 0, "y1": 0, "x2": 4, "y2": 4},
         "crop_image_url": None, "algorithm": other},
    ]
    images = [("1", traps("halves.png"))]
    results = process(client, pipeline.slug, images, detections=sent)
    platform.check_saved(results, processing_request(pipeline.slug, images, sent))
    assert [(d.bbox.x1, d.algorithm.key, d.classifications[0].classification) for d in results.detections] == [
        (2.0, "some-detector", "light"), (22.0, "some-detector", "dark")]
    assert any("image 1:" in e and "no area" in e for e in results.errors)  # the box outside the image
    assert any("image 5:" in e and "not in source_images" in e for e in results.errors)


def test_a_hook_may_answer_in_antennas_shape(antenna_client, traps):
    client = antenna_client
    body = {**CLASSIFIER, "post_hook": encode_hook(hooks.antenna_shaped_post), "pipeline": {"slug": "shaped"}}
    assert client.post("/configure", json=body).status_code == 200
    results = process(client, "shaped", [("3", traps("halves.png"))])
    (found,) = results.detections
    assert found.bbox.model_dump() == {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}
    assert found.classifications[0].classification == "light" and found.classifications[0].scores == [0.25, 0.75]
    assert found.classifications[0].algorithm.key.startswith("shaped-brightness-")


def test_bad_input_gets_antenna_shaped_errors_and_what_served_keeps_serving(antenna_client, traps):
    client = antenna_client
    response = client.post("/process", json=processing_request("critters", [("1", traps("scene.png"))]))
    assert response.status_code == 503 and "no model is configured" in response.get_json()["detail"]

    assert client.post("/configure", json=DETECTOR).status_code == 200
    refused = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"source_images": []}), 422, "'pipeline' must be the slug"),
        (json.dumps({"pipeline": "moths", "source_images": []}), 422, "unknown pipeline 'moths': This service runs pipeline 'critters'"),
        (json.dumps({"pipeline": "critters"}), 422, "'source_images' is missing"),
        (json.dumps({"pipeline": "critters", "source_images": [{"id": "1"}]}), 422, "source_images[0].url must be the image's URL"),
        (json.dumps({"pipeline": "critters", "source_images": [], "detections": [
            {"source_image": {"id": "1", "url": "x"}, "bbox": [1, 2, 3, 4], "algorithm": {"name": "d", "key": "d"}}]}),
         422, "detections[0].bbox must be an object"),
        (json.dumps({"pipeline": "critters", "source_images": [], "config": []}), 422, "'config' must be an object"),
    ]
    for body, status, message in refused:
        response = client.post("/process", data=body, content_type="application/json")
        assert response.status_code == status, (body, response.get_json())
        assert message in response.get_json()["detail"], response.get_json()
    assert client.get("/process").status_code == 405 and "detail" in client.get("/process").get_json()

    bad_configures = [
        ({**DETECTOR, "label_config": hooks.TEXT_CONFIG}, "reads one image per task"),
        ({**DETECTOR, "pipeline": {"slug": "no spaces"}}, "is not a slug"),
        ({**DETECTOR, "pipeline": {"version": 0}}, "'pipeline.version' must be a positive integer"),
        ({**DETECTOR, "pipeline": {"colour": "red"}}, "unknown 'pipeline' field(s): colour"),
        ({**DETECTOR, "label_config": ""}, "'pipeline' needs a 'label_config'"),
        ({**DETECTOR, "label_config": '<View><Image name="i" value="$i"/><TextArea name="t" toName="i"/></View>'},
         "no control Antenna can use"),
    ]
    for body, message in bad_configures:
        response = client.post("/configure", json=body)
        assert response.status_code == 400 and message in response.get_json()["error"], response.get_json()

    # Hooks whose answers Antenna could not save: 422 naming the fix; the good configuration serves on.
    for post, message in ((hooks.undeclared_algorithm_post, "which /info does not declare"),
                          (hooks.wasp_box_post, "do not fit the labeling config")):
        response = client.post("/configure", json={**DETECTOR, "post_hook": encode_hook(post)})
        assert response.status_code == 200
        response = client.post("/process", json=processing_request("critters", [("1", traps("scene.png"))]))
        assert response.status_code == 422 and message in response.get_json()["detail"], response.get_json()
    assert client.post("/configure", json=DETECTOR).status_code == 200
    assert len(process(client, "critters", [("1", traps("scene.png"))]).detections) == 2


def test_the_orchestrator_serves_every_backends_pipeline_at_its_root(tmp_path, registry, traps):
    orchestrator = OrchestratorProcess(
        tmp_path / "state", {"MLFLOW_TRACKING_URI": registry, "FETCH_ALLOW_PRIVATE": "127.0.0.1", "WARM_SPARES": "0"}
    ).start()
    try:
        url = orchestrator.url
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
        for body in (DETECTOR, CLASSIFIER):
            response = requests.post(f"{url}/configure", json=body, timeout=120)
            assert response.status_code == 200, response.text
        clash = requests.post(f"{url}/configure", json={**CLASSIFIER, "model_uri": "models:/brightness/1",
                                                        "pre_hook": encode_hook(hooks.brightness_pre),
                                                        "post_hook": encode_hook(hooks.choices_post),
                                                        "pipeline": {"slug": "critters"}}, timeout=60)
        assert clash.status_code == 409 and "critters" in clash.json()["error"]

        # What Antenna's platform does: register (readyz, info), then a job of one image per request.
        platform = AntennaPlatform(f"{url}/")
        assert sorted(platform.get_status()) == ["critters", "tiny-torch-v1"]
        info = platform.register_pipelines()
        assert sorted(p.slug for p in info.pipelines) == ["critters", "tiny-torch-v1"]
        images = [("1", traps("scene.png")), ("2", traps("empty.png"))]
        detected = platform.run_job("critters", images)
        assert [len(r.detections) for r in detected] == [2, 0]
        classified = platform.run_job("tiny-torch-v1", [("3", traps("empty.png")), ("4", traps("bright.png"))])
        assert [r.detections[0].classifications[0].classification for r in classified] == ["dark", "light"]
        assert platform.failures == []

        unknown = requests.post(f"{url}/process", json=processing_request("moths", images[:1]), timeout=10)
        assert unknown.status_code == 422
        assert "'critters'" in unknown.json()["detail"] and "'tiny-torch-v1'" in unknown.json()["detail"]
        assert platform.process("moths", images[:1]) is None and "HTTP 422" in platform.failures[0]
        assert requests.get(f"{url}/livez", timeout=10).json() == {"status": True}
    finally:
        orchestrator.remove_all()
        orchestrator.stop()
        orchestrator.kill_leftovers()
