"""The pieces of training that need no registry: when a training is due, and how much of a prediction annotators kept."""

from __future__ import annotations

import json

from backend.config.training_policy import TrainingPolicy
from backend.quality.agreement import compare


def test_automatic_training_waits_for_enough_annotations_a_quiet_moment_and_the_interval():
    policy = TrainingPolicy.parse({"trigger": "annotations", "min_annotations": 10, "every": 5, "quiet_s": 30,
                                   "min_interval_s": 300, "backoff_s": 60})
    base = {"annotations": 12, "changed": 5, "last_event_at": 0.0, "last_started_at": 0.0, "failures": 0, "last_failed_at": 0.0}
    assert policy.automatic_due(**base, now=1000) == "5 new annotation(s)"
    assert policy.automatic_due(**{**base, "annotations": 9}, now=1000) is None
    assert policy.automatic_due(**{**base, "changed": 4}, now=1000) is None
    assert policy.automatic_due(**{**base, "last_event_at": 990}, now=1000) is None  # a burst is still going on
    assert policy.automatic_due(**{**base, "last_started_at": 800}, now=1000) is None
    assert policy.automatic_due(**{**base, "failures": 2, "last_failed_at": 950}, now=1000) is None  # 120 s backoff
    assert policy.automatic_due(**{**base, "failures": 2, "last_failed_at": 850}, now=1000) is not None
    assert TrainingPolicy.parse({}).automatic_due(**base, now=1000) is None  # manual by default


def rect(label: str, x: float, y: float, w: float = 10, h: float = 10) -> dict:
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}}


def test_agreement_of_known_predictions_and_annotations():
    choice = lambda label: {"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [label]}}
    assert compare([choice("cat")], [choice("cat")]).summary()["agreement"] == 1.0
    assert compare([choice("cat")], [choice("dog")]).summary()["choices_kept"] == 0.0
    # Two predicted boxes, one kept (IoU 0.68 with the same label), one moved away; the annotator added a third.
    found = compare([rect("car", 10, 10), rect("car", 50, 50)], [rect("car", 11, 11), rect("car", 80, 80), rect("bus", 50, 50)])
    summary = found.summary()
    assert (summary["region_precision"], summary["region_recall"]) == (0.5, round(1 / 3, 4))
    assert summary["agreement"] == round(2 * 1 / (2 + 3), 4)
    assert compare([rect("car", 10, 10)], [rect("bus", 10, 10)]).regions_kept == 0  # same place, other label
    span = lambda s, e: {"from_name": "ner", "to_name": "text", "type": "labels", "value": {"start": s, "end": e, "labels": ["PER"]}}
    assert compare([span(0, 10)], [span(2, 10)]).regions_kept == 1 and compare([span(0, 10)], [span(8, 20)]).regions_kept == 0
    assert compare([], []).summary()["agreement"] == 1.0
    text = {"from_name": "t", "to_name": "x", "type": "textarea", "value": {"text": ["hello"]}}
    assert compare([text], [text]).summary()["values_kept"] == 1.0
    total = compare([choice("cat")], [choice("cat")]).add(compare([choice("cat")], [choice("dog")]))
    assert total.summary()["agreement"] == 0.5 and json.dumps(total.to_dict())


def test_training_targets_from_annotations():
    from hooks import boxes, choice_labels, polygons, spans

    choice = [{"from_name": "c", "type": "choices", "value": {"choices": ["cat"]}}]
    assert choice_labels([choice, [], choice], default="none") == ["cat", "none", "cat"]
    box = {"type": "rectanglelabels", "original_width": 200, "original_height": 100,
           "value": {"x": 10, "y": 20, "width": 50, "height": 50, "rectanglelabels": ["car"]}}
    assert boxes([box]) == [(20.0, 20.0, 120.0, 70.0, "car")]
    assert boxes([box], size=(100, 100))[0][:4] == (10.0, 20.0, 60.0, 70.0)
    poly = {"type": "polygonlabels", "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["roof"]}}
    assert polygons([poly], size=(200, 100)) == [([(0.0, 0.0), (100.0, 0.0), (100.0, 50.0)], "roof")]
    ner = {"type": "labels", "value": {"start": 0, "end": 5, "text": "Alice", "labels": ["PER"]}}
    assert spans([ner, box]) == [(0, 5, "PER", "Alice")]


def test_a_dagshub_configure_may_add_a_train_hook_and_name_an_alias_as_its_version():
    from backend.config.spec import parse_model_spec

    spec = parse_model_spec({"host": "https://dagshub.com", "username": "u", "repo": "u/r", "model": "m", "version": "champion",
                             "authtoken": "t", "train_hook": "examples.hooks:sentiment_train", "training": {"every": 5}})
    assert spec.model_uri == "models:/m@champion" and spec.registry_target == ("m", "champion")
    assert spec.train_hook == "examples.hooks:sentiment_train" and spec.training == {"every": 5}
    assert spec.public()["train_hook"] == "examples.hooks:sentiment_train"
    assert parse_model_spec({"host": "https://dagshub.com", "repo": "u/r", "model": "m", "version": "3"}).model_uri == "models:/m/3"
