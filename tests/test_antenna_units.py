"""Antenna's pipeline from a labeling config, and Label Studio's regions as Antenna's detections: no
server, no model. The end-to-end paths are in test_antenna.py."""

from __future__ import annotations

import math

import pytest

from backend.antenna.convert import Stamp, Unit, from_antenna, from_label_studio, region_box
from backend.antenna.wire import SourceImage, parse_request
from backend.config.antenna_pipeline import default_slug, define_pipeline, model_label
from backend.config.spec import ModelSpec, parse_model_spec
from backend.core.errors import BadRequest, PredictionsInvalid, Unprocessable
from examples.hooks import DETECTOR_CONFIG, IMAGE_CONFIG

STAMP = Stamp("2026-12-01T00:00:00+00:00", 0.01)
UNIT = Unit(SourceImage("1", "http://x/1.png"), "/tmp/1.png", (200, 100))


def pipeline_for(label_config: str, uri: str = "models:/moths/3", **pipeline):
    return define_pipeline(ModelSpec(model_uri=uri, label_config=label_config, pipeline=pipeline))


@pytest.mark.parametrize("uri, slug, name, version", [
    ("models:/Moth Finder/3", "moth-finder-v3", "Moth Finder v3", 3),
    ("models:/moths@champion", "moths-champion", "moths@champion", 1),
    ("models:/moths/latest", "moths", "moths (latest)", 1),
    ("runs:/0123abcd/model", "0123abcd-model", "0123abcd model", 1),
    ("/srv/models/moth_detector", "moth-detector", "moth_detector", 1),
])
def test_a_pipeline_is_named_after_its_model_unless_the_configure_names_it(uri, slug, name, version):
    defined = pipeline_for(IMAGE_CONFIG, uri)
    assert (defined.slug, defined.name, defined.version) == (slug, name, version)
    assert default_slug(uri) == slug and model_label(uri) == name
    named = pipeline_for(IMAGE_CONFIG, uri, slug="my_moths", name="My moths", version=7, description="mine")
    assert (named.slug, named.name, named.version, named.description) == ("my_moths", "My moths", 7, "mine")


def test_algorithms_come_from_the_controls_and_keys_change_with_the_labels():
    detector = pipeline_for(DETECTOR_CONFIG)
    assert [a.task_type for a in detector.algorithms] == ["detection", "classification"]
    assert detector.detector.key == "moths-v3-detector" and not detector.whole_image
    classifier = detector.classifiers[0]
    assert classifier.labels == ("Moth", "Beetle") and classifier.control == "critter"
    assert classifier.config()["category_map"]["data"][0] == {"index": 0, "label": "Moth", "taxon_rank": "ORDER"}

    relabelled = pipeline_for(DETECTOR_CONFIG.replace("Beetle", "Wasp"))
    assert relabelled.detector.key == detector.detector.key  # a detector has no map to go stale
    assert relabelled.classifiers[0].key != classifier.key and relabelled.classifiers[0].name != classifier.name

    whole = pipeline_for(IMAGE_CONFIG)
    assert whole.whole_image and whole.detector.key == "moths-v3-whole-image"
    multiple = pipeline_for(IMAGE_CONFIG.replace('<Choices name="brightness"', '<Choices choice="multiple" name="brightness"'))
    assert multiple.classifiers[0].task_type == "tagging"


def test_configure_refuses_what_cannot_become_a_pipeline():
    base = {"model_uri": "models:/moths/1", "label_config": IMAGE_CONFIG}
    assert parse_model_spec(base).label_config == IMAGE_CONFIG
    dagshub = {"host": "https://dagshub.com", "repo": "alice/moths", "model": "moths", "version": "4", "label_config": IMAGE_CONFIG}
    assert define_pipeline(parse_model_spec(dagshub)).slug == "moths-v4"
    assert parse_model_spec({**base, "label_config": ""}).label_config == ""
    for change, message in [
        ({"label_config": "<View><Image"}, "cannot be parsed"),
        ({"label_config": '<View><Image name="i" value="$i"/><Image name="j" value="$j"/>'
                          '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'}, "reads one image"),
        ({"label_config": '<View><Image name="i" value="$i"/><Choices name="c" toName="i"></Choices></View>'}, "has no labels"),
        ({"pipeline": "moths"}, "must be a JSON object"),
        ({"pipeline": {"name": 5}}, "'pipeline.name' must be a string"),
        ({"pipeline": {"version": True}}, "positive integer"),
    ]:
        with pytest.raises(BadRequest, match=message):
            parse_model_spec({**base, **change})


def rect(x, y, w, h, label="Moth", rotation=0.0, **extra):
    return {"id": extra.pop("id", "r1"), "from_name": "critter", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}, **extra}


def test_regions_become_pixel_boxes_of_the_real_image():
    assert region_box(rect(10, 20, 50, 30), (200, 100)).as_dict() == {"x1": 20.0, "y1": 20.0, "x2": 120.0, "y2": 50.0}
    turned = region_box(rect(50, 50, 10, 20, rotation=90), (100, 100))  # turns about its top left corner
    assert [round(v, 6) for v in turned.as_dict().values()] == [30.0, 50.0, 50.0, 60.0]
    polygon = {"type": "polygonlabels", "value": {"points": [[10, 10], [50, 5], [30, 90]], "polygonlabels": ["Moth"]}}
    assert region_box(polygon, (200, 100)).as_dict() == {"x1": 20.0, "y1": 5.0, "x2": 100.0, "y2": 90.0}
    ellipse = {"type": "ellipselabels", "value": {"x": 50, "y": 50, "radiusX": 10, "radiusY": 5, "rotation": 0}}
    assert region_box(ellipse, (100, 100)).as_dict() == {"x1": 40.0, "y1": 45.0, "x2": 60.0, "y2": 55.0}
    outside = region_box(rect(90, 90, 30, 30), (100, 100))
    assert outside.as_dict() == {"x1": 90.0, "y1": 90.0, "x2": 100.0, "y2": 100.0}


def test_labels_become_classifications_with_scores_over_the_whole_map():
    pipeline = pipeline_for(DETECTOR_CONFIG)
    found = from_label_studio({"result": [rect(0, 0, 10, 10, "Beetle", score=0.8),
                                          rect(10, 0, 10, 10, "Moth", id="r2", scores={"Moth": 0.6, "Beetle": 0.3})]},
                              UNIT, pipeline, STAMP)
    assert [(d["classifications"][0]["classification"], d["classifications"][0]["scores"]) for d in found] == [
        ("Beetle", [0.0, 0.8]), ("Moth", [0.6, 0.3])]
    assert all(d["algorithm"] == pipeline.detector.ref and d["timestamp"] == STAMP.timestamp for d in found)
    unscored = from_label_studio({"result": [rect(0, 0, 10, 10, "Moth")], "score": 0.0}, UNIT, pipeline, STAMP)
    assert unscored[0]["classifications"][0]["scores"][0] > 0  # still the argmax Antenna takes
    with pytest.raises(PredictionsInvalid, match="rank 'Beetle' first"):
        from_label_studio({"result": [rect(0, 0, 10, 10, "Moth", scores=[0.1, 0.9])]}, UNIT, pipeline, STAMP)
    with pytest.raises(PredictionsInvalid, match="does not have"):
        from_label_studio({"result": [rect(0, 0, 10, 10, "Moth", scores={"Moth": 0.5, "Wasp": 0.1})]}, UNIT, pipeline, STAMP)
    with pytest.raises(PredictionsInvalid, match="finite"):
        from_label_studio({"result": [rect(0, 0, 10, 10, "Moth", scores=[math.nan, 0.1])]}, UNIT, pipeline, STAMP)


def test_whole_image_choices_classify_the_frame_and_per_region_choices_their_region():
    config = DETECTOR_CONFIG.replace("</View>", '<Choices name="seen" toName="image" perRegion="true">'
                                                '<Choice value="flying"/><Choice value="resting"/></Choices></View>')
    pipeline = pipeline_for(config)
    choice = {"from_name": "seen", "to_name": "image", "type": "choices", "value": {"choices": ["resting"]}}
    found = from_label_studio({"result": [{**choice, "id": "r1"}, rect(0, 0, 10, 10), {**choice, "id": "other"}]},
                              UNIT, pipeline, STAMP)
    region, frame = found
    assert [c["classification"] for c in region["classifications"]] == ["Moth", "resting"]
    assert frame["bbox"] == {"x1": 0.0, "y1": 0.0, "x2": 200.0, "y2": 100.0}
    assert [c["algorithm"]["key"] for c in frame["classifications"]] == [pipeline.classifier_for("seen").key]
    assert from_label_studio({"result": []}, UNIT, pipeline, STAMP) == []


def test_antennas_own_shape_is_checked_against_what_info_declares():
    pipeline = pipeline_for(DETECTOR_CONFIG)
    classifier = pipeline.classifiers[0]
    found = from_antenna({"detections": [{"bbox": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}, "classifications": [
        {"classification": "Moth", "scores": {"Moth": 0.9}, "logits": [2.0, -1.0], "terminal": False}]}]}, UNIT, pipeline, STAMP)
    (only,) = found[0]["classifications"]
    assert only["scores"] == [0.9, 0.0] and only["logits"] == [2.0, -1.0] and only["terminal"] is False
    assert only["algorithm"] == classifier.ref
    for output, message in [
        ({"detections": {}}, "not a list"),
        ({"detections": [{"bbox": [1, 2, 3]}]}, "must be an object"),
        ({"detections": [{"bbox": [1, 2, 3, 4], "algorithm": classifier.key}]}, "which /info does not declare"),
        ({"detections": [{"bbox": [1, 2, 3, 4], "classifications": [{"classification": "Wasp"}]}]}, "does not have"),
        ({"detections": [{"bbox": [1, 2, 3, 4], "classifications": [{"scores": [1, 0]}]}]}, "without a 'classification'"),
        ({"detections": [{"bbox": [1, 2, 3, 4], "classifications": [{"classification": "Moth", "logits": ["a"]}]}]},
         "'logits' that are not"),
    ]:
        with pytest.raises((PredictionsInvalid, Unprocessable), match=message):
            from_antenna(output, UNIT, pipeline, STAMP)


def test_requests_are_read_as_the_platform_writes_them():
    request = parse_request({"pipeline": "moths", "source_images": [{"id": 42, "url": "http://x/1.jpg", "extra": 1}],
                             "detections": None, "config": None})
    assert request.source_images == [SourceImage("42", "http://x/1.jpg")] and request.detections == [] and request.config == {}
    request = parse_request({"pipeline": "moths", "source_images": [], "detections": [
        {"source_image": {"id": "1", "url": "u"}, "bbox": None, "algorithm": {"key": "d"}}]})
    assert request.detections[0].bbox is None and request.detections[0].algorithm == {"name": "d", "key": "d"}
    for body, message in [
        ({"pipeline": "moths", "source_images": [{"id": None, "url": "u"}]}, r"source_images\[0\].id is missing"),
        ({"pipeline": "moths", "source_images": [{"id": "1", "url": ""}]}, "non-empty string"),
        ({"pipeline": "moths", "source_images": [], "detections": [{"source_image": {"id": "1", "url": "u"},
          "bbox": {"x1": 0, "y1": 0, "x2": "1", "y2": 1}, "algorithm": {"key": "d"}}]}, "x2 must be a finite number"),
        ({"pipeline": "moths", "source_images": [], "detections": [{"source_image": {"id": "1", "url": "u"}}]}, "algorithm"),
    ]:
        with pytest.raises(Unprocessable, match=message):
            parse_request(body)
