"""Predictions are completed with what users forget and checked against the labeling config."""

from __future__ import annotations

import pytest

from backend.core.errors import PredictionsInvalid
from backend.labeling.validation import PredictionCompleter, complete_prediction, data_objects, validate_predictions
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

REGION = {"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": ["dark"]}}


def test_data_objects_name_the_task_keys():
    (image,) = data_objects(IMAGE_CONFIG)
    assert (image.key, image.is_text) == ("image", False)
    (text,) = data_objects(TEXT_CONFIG)
    assert (text.key, text.is_text) == ("text", True)


def test_complete_fills_version_ids_and_score():
    done = complete_prediction([dict(REGION, score=0.5), dict(REGION, score=0.7)], "m:1")
    assert done["model_version"] == "m:1"
    assert done["score"] == pytest.approx(0.6)
    ids = [r["id"] for r in done["result"]]
    assert len(set(ids)) == 2 and all(ids)


def test_complete_keeps_given_ids_and_score():
    done = complete_prediction({"result": [dict(REGION, id="r1")], "score": 0.9}, "m:1")
    assert done["result"][0]["id"] == "r1" and done["score"] == 0.9


@pytest.mark.parametrize("bad", [None, "text", {"results": []}, {"result": "x"}])
def test_complete_refuses_shapes_label_studio_cannot_store(bad):
    with pytest.raises(PredictionsInvalid, match=r"task 9 \(#4\)"):
        complete_prediction(bad, "m:1", {"id": 9}, 4)


def test_completer_completes_each_distinct_prediction_once():
    complete = PredictionCompleter("m:1")
    dark, light = [dict(REGION)], [dict(REGION, value={"choices": ["light"]})]
    first, again, other = complete(dark), complete([dict(REGION)]), complete(light)
    assert again is first and other is not first  # equal content, new objects: one completion shared
    assert first["result"][0]["id"] and first["model_version"] == "m:1"
    assert other["result"][0]["value"] == {"choices": ["light"]}
    assert complete([dict(REGION, score=1)]) is not complete([dict(REGION, score=1.0)])  # 1 and 1.0 differ in JSON
    assert complete({"result": [REGION, REGION]})["result"][0]["id"] != complete({"result": [REGION, REGION]})["result"][1]["id"]
    unpicklable = {"result": [dict(REGION)], "note": lambda: None}
    assert complete(unpicklable) is not complete(unpicklable)  # completed each time, never merged
    with pytest.raises(PredictionsInvalid, match=r"task 9 \(#4\)"):
        complete("text", {"id": 9}, 4)


def test_a_shared_bad_prediction_names_every_task():
    complete = PredictionCompleter("v")
    predictions = [complete([dict(REGION, value={"choices": ["purple"]})]) for _ in range(3)]
    assert predictions[0] is predictions[2]
    with pytest.raises(PredictionsInvalid, match="3 prediction region") as info:
        validate_predictions(predictions, [{"id": 1}, {"id": 2}, {"id": 3}], IMAGE_CONFIG)
    assert all(f"task {n} (#{n - 1})" in info.value.error for n in (1, 2, 3))


def test_valid_prediction_passes():
    validate_predictions([complete_prediction([REGION], "v")], [{"id": 1}], IMAGE_CONFIG)


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
    predictions = [complete_prediction([REGION], "v"), complete_prediction([region], "v")]
    with pytest.raises(PredictionsInvalid, match=message) as info:
        validate_predictions(predictions, [{"id": 1}, {"id": 2}], IMAGE_CONFIG)
    assert "task 2 (#1)" in info.value.error
    assert "task 1" not in info.value.error
    assert "brightness (Choices: dark, light)" in info.value.detail


def test_identical_predictions_are_checked_once_but_each_task_is_named():
    bad = dict(REGION, value={"choices": ["purple"]})
    predictions = [complete_prediction([bad], "v") for _ in range(3)]  # ids differ, shape is the same
    with pytest.raises(PredictionsInvalid, match="3 prediction region") as info:
        validate_predictions(predictions, [{"id": 1}, {"id": 2}, {"id": 3}], IMAGE_CONFIG)
    assert all(f"task {n} (#{n - 1})" in info.value.error for n in (1, 2, 3))


RELATIONS_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>'
    '<Relations><Relation value="near"/></Relations></View>'
)


def _box(region_id: str) -> dict:
    value = {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}
    return {"id": region_id, "from_name": "box", "to_name": "image", "type": "rectanglelabels", "value": value}


def test_predictions_alike_but_for_which_ids_a_relation_joins_are_told_apart():
    def with_relation(first: str, second: str, to: str) -> dict:
        relation = {"type": "relation", "from_id": first, "to_id": to, "direction": "right"}
        return complete_prediction([_box(first), _box(second), relation], "v")

    predictions = [with_relation("r1", "r2", "r2"), with_relation("a", "b", "b"), with_relation("r1", "r2", "r9")]
    with pytest.raises(PredictionsInvalid, match="r9") as info:
        validate_predictions(predictions, [{"id": 1}, {"id": 2}, {"id": 3}], RELATIONS_CONFIG)
    assert "task 3 (#2)" in info.value.error
    assert "task 1 " not in info.value.error and "task 2 " not in info.value.error


def _box_and_caption():
    import hooks

    box = hooks.rectangle((80, 60, 240, 180), "light", width=320, height=240, from_name="box", to_name="image")
    return box, hooks.textarea("looks light", from_name="caption", to_name="image", region=box)


def test_what_the_labeling_ui_does_not_draw_is_refused_though_the_sdk_accepts_it():
    """The rules tests/e2e/test_browser.py proves on the screen: a negative size, a caption off its region."""
    from tests.support.drawn_hooks import CAPTION_CONFIG

    box, caption = _box_and_caption()
    validate_predictions([complete_prediction([box, caption], "v")], [{"id": 1}], CAPTION_CONFIG)
    flipped = dict(box, value={**box["value"], "width": -50.0})
    with pytest.raises(PredictionsInvalid, match="negative width") as info:
        validate_predictions([complete_prediction([flipped], "v")], [{"id": 1}], CAPTION_CONFIG)
    assert "positive width and height" in info.value.error
    stray = dict(caption, id="not-the-box")
    with pytest.raises(PredictionsInvalid, match="per-region TextArea 'caption' has id 'not-the-box'") as info:
        validate_predictions([complete_prediction([box, stray], "v")], [{"id": 1}], CAPTION_CONFIG)
    assert "hooks.textarea(..., region=box)" in info.value.error
