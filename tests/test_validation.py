"""Predictions are completed with what users forget and checked against the labeling config."""

from __future__ import annotations

import pytest

from backend.errors import PredictionsInvalid
from backend.validation import complete_prediction, data_objects, validate_predictions
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

REGION = {"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": ["dark"]}}


def test_data_objects_name_the_task_keys():
    (image,) = data_objects(IMAGE_CONFIG)
    assert (image.key, image.is_text) == ("image", False)
    (text,) = data_objects(TEXT_CONFIG)
    assert (text.key, text.is_text) == ("text", True)


def test_complete_fills_version_ids_and_score():
    done = complete_prediction([dict(REGION, score=0.5), dict(REGION, score=0.7)], "m:1", "task 1")
    assert done["model_version"] == "m:1"
    assert done["score"] == pytest.approx(0.6)
    ids = [r["id"] for r in done["result"]]
    assert len(set(ids)) == 2 and all(ids)


def test_complete_keeps_given_ids_and_score():
    done = complete_prediction({"result": [dict(REGION, id="r1")], "score": 0.9}, "m:1", "task 1")
    assert done["result"][0]["id"] == "r1" and done["score"] == 0.9


@pytest.mark.parametrize("bad", [None, "text", {"results": []}, {"result": "x"}])
def test_complete_refuses_shapes_label_studio_cannot_store(bad):
    with pytest.raises(PredictionsInvalid, match="task 9"):
        complete_prediction(bad, "m:1", "task 9")


def test_valid_prediction_passes():
    validate_predictions([complete_prediction([REGION], "v", "t")], [{"id": 1}], IMAGE_CONFIG)


@pytest.mark.parametrize(
    "region, message",
    [
        (dict(REGION, from_name="nope"), "'from_name' 'nope' not found"),
        (dict(REGION, to_name="nope"), "'to_name' 'nope' not found"),
        (dict(REGION, value={"choices": ["purple"]}), "valid labels"),
        ({k: v for k, v in REGION.items() if k != "value"}, "Missing required field 'value'"),
    ],
)
def test_mismatch_names_task_region_and_fix(region, message):
    predictions = [complete_prediction([REGION], "v", "t"), complete_prediction([region], "v", "t")]
    with pytest.raises(PredictionsInvalid, match=message) as info:
        validate_predictions(predictions, [{"id": 1}, {"id": 2}], IMAGE_CONFIG)
    assert "task 2 (#1)" in info.value.error
    assert "task 1" not in info.value.error
    assert "brightness (Choices: dark, light)" in info.value.detail
