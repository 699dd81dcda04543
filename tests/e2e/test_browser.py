"""What an annotator sees: predictions made by the backend behind the orchestrator, retrieved by the real
Label Studio in its default token mode (files uploaded to it), then opened in its labeling UI in a real
browser (tests/support/browser.py), where what is drawn is read back: the regions panel, each shape's
place on the image canvas, the highlighted text, the checked choice, a region's caption.

Every case leaves a screenshot under ``artifacts/browser/`` (``LSBACKEND_ARTIFACTS`` moves it); two of
them are in the README. Under CI a missing chromium or Playwright fails the run; elsewhere these tests
are skipped, saying why.
"""

from __future__ import annotations

import pytest
from PIL import Image

import hooks as builders
from backend.core.errors import PredictionsInvalid
from backend.labeling.validation import complete_prediction, validate_predictions
from examples.hooks import DETECTOR_CONFIG
from tests.e2e.projects import near, new_project, predicted_in_label_studio, tasks_of
from tests.support import drawn_hooks, hooks
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

pytestmark = pytest.mark.e2e

NER_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Labels name="entities" toName="text"><Label value="PER"/><Label value="LOC"/></Labels></View>'
)
CHECKED = ".lsf-choices input:checked, .ant-checkbox-checked input, .ant-radio-checked input"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A white and a black photo, 320 x 240: big enough that the labeling UI scales them to its canvas (a
    32 x 24 image is drawn at its own size, a few pixels on the screen)."""
    root = tmp_path_factory.mktemp("photos")
    made = {}
    for name, grey in (("white", 240), ("black", 10)):
        made[name] = root / f"{name}.png"
        Image.new("RGB", (320, 240), (grey, grey, grey)).save(made[name])
    return made


def test_a_detectors_boxes_are_drawn_on_the_objects(label_studio, orchestrator, annotator, scene):
    project, [task] = predicted_in_label_studio(label_studio, orchestrator, "critter traps", DETECTOR_CONFIG,
                                                "models:/critters/1", hooks.critter_boxes_post,
                                                pre_hook=hooks.critter_cells_pre, uploads=[scene])
    drawn = annotator.open_task(project, task["id"], "detector-boxes", regions=2, shapes=2)
    assert sorted(row.split("\n")[0] for row in drawn.regions) == ["Beetle", "Moth"]
    boxes = drawn.boxes("Rect")
    assert len(boxes) == 2
    assert any(near(box, [0.25, 0.0, 0.25, 0.25]) for box in boxes), boxes  # the moth's cell
    assert any(near(box, [0.5, 0.5, 0.25, 0.25]) for box in boxes), boxes  # the beetle's cell


@pytest.mark.parametrize(
    ("kind", "config", "post_hook", "shape", "expected"),
    [
        ("polygon", drawn_hooks.POLYGON_CONFIG, drawn_hooks.polygon_post, "Line", [0.25, 0.25, 0.5, 0.5]),
        ("brush", drawn_hooks.BRUSH_CONFIG, drawn_hooks.brush_post, "Brush", [0.25, 0.25, 0.5, 0.5]),
        ("box", drawn_hooks.CAPTION_CONFIG, drawn_hooks.caption_post, "Rect", [0.25, 0.25, 0.5, 0.5]),
    ],
)
def test_image_regions_are_drawn_where_the_hook_put_them(label_studio, orchestrator, annotator, photos,
                                                         kind, config, post_hook, shape, expected):
    project, tasks = predicted_in_label_studio(label_studio, orchestrator, f"{kind} regions", config,
                                               "models:/brightness/1", post_hook,
                                               uploads=[photos["white"], photos["black"]])
    for task, label in zip(tasks, ["light", "dark"]):
        drawn = annotator.open_task(project, task["id"], f"{kind}-{label}", regions=1, shapes=1, kind=shape)
        assert [row.split("\n")[0] for row in drawn.regions] == [label]
        [box] = drawn.boxes(shape)
        assert near(box, expected), (kind, box)
        if kind == "box":  # the per-region caption, as the annotator sees it once the region is selected
            assert annotator.select_region(0).texts == [f"looks {label}"]


def test_a_keypoint_is_drawn_at_its_place(label_studio, orchestrator, annotator, photos):
    project, [task] = predicted_in_label_studio(label_studio, orchestrator, "keypoints", drawn_hooks.KEYPOINT_CONFIG,
                                                "models:/brightness/1", drawn_hooks.keypoint_post,
                                                uploads=[photos["white"]])
    drawn = annotator.open_task(project, task["id"], "keypoint", regions=1, shapes=1)
    assert [row.split("\n")[0] for row in drawn.regions] == ["light"]
    [(x, y, w, h)] = drawn.boxes("Circle")
    assert near((x + w / 2, y + h / 2), (0.25, 0.75))  # the point's centre


def test_entity_spans_highlight_the_right_characters(label_studio, orchestrator, annotator):
    texts = ["great lovely day", "awful bad weather"]
    project, tasks = predicted_in_label_studio(label_studio, orchestrator, "tone spans", drawn_hooks.SPAN_CONFIG,
                                               "models:/sentiment/1", drawn_hooks.first_word_post, pre_hook="",
                                               tasks=[{"text": text} for text in texts])
    for task, (word, label) in zip(tasks, [("great", "positive"), ("awful", "negative")]):
        drawn = annotator.open_task(project, task["id"], f"spans-{label}", regions=1, spans=1)
        assert drawn.spans == [word]
        assert [row.split("\n") for row in drawn.regions] == [[label, word]]


@pytest.mark.parametrize(
    ("kind", "model_uri", "post_hook", "pre_hook", "fields"),
    [
        ("sklearn", "models:/brightness/1", hooks.choices_post, hooks.brightness_pre, {}),
        ("pytorch", "models:/tiny_torch/1", hooks.torch_choices_post, hooks.torch_brightness_pre, {"loader": "native"}),
        ("onnx", "models:/brightness_onnx/1", hooks.onnx_choices_post, hooks.onnx_brightness_pre, {}),
    ],
)
def test_the_predicted_choice_is_checked(label_studio, orchestrator, annotator, photos, kind, model_uri,
                                         post_hook, pre_hook, fields):
    project, tasks = predicted_in_label_studio(label_studio, orchestrator, f"{kind} choices", IMAGE_CONFIG, model_uri,
                                               post_hook, pre_hook=pre_hook, uploads=[photos["white"], photos["black"]],
                                               **fields)
    for task, label in zip(tasks, ["light", "dark"]):
        drawn = annotator.open_task(project, task["id"], f"choices-{kind}-{label}", wait_for=CHECKED)
        assert drawn.choices == [label]


@pytest.mark.parametrize(
    ("kind", "model_uri", "post_hook", "fields"),
    [
        ("sklearn", "models:/sentiment/1", hooks.sentiment_post, {}),
        ("transformers", "models:/tiny_sentiment/1", builders.transformers_post(), {"loader": "native"}),
    ],
)
def test_a_text_classifiers_choice_is_checked(label_studio, orchestrator, annotator, kind, model_uri, post_hook, fields):
    project, tasks = predicted_in_label_studio(label_studio, orchestrator, f"{kind} sentiment", TEXT_CONFIG,
                                               model_uri, post_hook, pre_hook="",
                                               tasks=[{"text": "wonderful great day"}, {"text": "terrible bad weather"}],
                                               **fields)
    for task, label in zip(tasks, ["positive", "negative"]):
        assert annotator.open_task(project, task["id"], f"choices-{kind}-{label}", wait_for=CHECKED).choices == [label]


def test_a_transformers_ner_pipelines_entities_are_highlighted(label_studio, orchestrator, annotator):
    """mlflow.transformers' token classification, loaded natively (its pyfunc drops the offsets), through
    the ready-made hooks.transformers_post."""
    project, [task] = predicted_in_label_studio(label_studio, orchestrator, "entities", NER_CONFIG,
                                                "models:/tiny_ner/1", builders.transformers_post(), pre_hook="",
                                                tasks=[{"text": "Ada Lovelace lived in London ."}], loader="native")
    drawn = annotator.open_task(project, task["id"], "ner-transformers", regions=2, spans=2)
    assert drawn.spans == ["Ada Lovelace", "London"]
    assert sorted(row.split("\n")[0] for row in drawn.regions) == ["LOC", "PER"]


def stored_straight(label_studio, title, config, upload, results):
    """A prediction stored through Label Studio's API, past the backend's validator: it answers 201."""
    project = new_project(label_studio, title, config, uploads=[upload])
    label_studio.api("PATCH", f"/api/projects/{project}", json={"show_collab_predictions": True})
    [task] = tasks_of(label_studio, project)
    label_studio.api("POST", "/api/predictions", json={"task": task["id"], "result": results, "model_version": "raw:1"})
    return project, task


@pytest.mark.parametrize("rule", ["negative size", "caption off its region"])
def test_what_the_validator_refuses_is_drawn_wrongly_when_stored_past_it(label_studio, annotator, photos, rule):
    """Each rule validation.py adds to label-studio-sdk's is there because the screen shows it matters."""
    box = builders.rectangle((80, 60, 240, 180), "light", width=320, height=240, from_name="box", to_name="image")
    caption = builders.textarea("looks light", from_name="caption", to_name="image", region=box)
    if rule == "negative size":
        bad, refused = [dict(box, value={**box["value"], "width": -50.0})], "negative width"
    else:
        bad, refused = [box, dict(caption, id="not-the-box")], "which no labelled region has"
    with pytest.raises(PredictionsInvalid, match=refused):
        validate_predictions([complete_prediction(bad, "v")], [{"id": 1}], drawn_hooks.CAPTION_CONFIG)
    project, task = stored_straight(label_studio, f"raw {rule}", drawn_hooks.CAPTION_CONFIG, photos["white"], bad)
    drawn = annotator.open_task(project, task["id"], f"raw-{rule.replace(' ', '-')}", regions=len(bad))
    if rule == "negative size":
        assert drawn.regions == ["light"] and drawn.boxes("Rect") == []  # listed, drawn nowhere
    else:
        assert sorted(drawn.regions) == ["", "light"]  # a second, unlabelled region; the caption on neither
        assert len(drawn.boxes("Rect")) == 2 and drawn.texts == []


def test_a_brush_without_the_image_size_still_draws(label_studio, annotator, photos):
    """A rule the screen showed does not matter, so validation.py has none: the UI takes the image's size."""
    import numpy as np

    mask = np.zeros((240, 320), dtype=np.uint8)
    mask[60:180, 80:240] = 1
    brush = builders.brush(mask, "light", from_name="mask", to_name="image")
    del brush["original_width"], brush["original_height"]
    validate_predictions([complete_prediction([brush], "v")], [{"id": 1}], drawn_hooks.BRUSH_CONFIG)
    project, task = stored_straight(label_studio, "raw brush", drawn_hooks.BRUSH_CONFIG, photos["white"], [brush])
    drawn = annotator.open_task(project, task["id"], "raw-brush-without-size", regions=1, shapes=1, kind="Brush")
    [box] = drawn.boxes("Brush")
    assert near(box, [0.25, 0.25, 0.5, 0.5])


def test_a_click_with_the_smart_keypoint_draws_the_clicked_moths_mask(label_studio, orchestrator, annotator, registry,
                                                                      tmp_path):
    """Interactive pre-annotation in the labeling UI: Auto-Annotation on, the smart keypoint tool, one click
    on the moth; the promptable model's mask (examples/promptseg.py, with an embed_hook) is drawn over it."""
    import subprocess
    import sys

    import numpy as np

    from examples import promptseg
    from harness.servers import base_env
    from lsmlflow.pickling import encode_hook
    from tests.e2e.projects import configure

    subprocess.run([sys.executable, "-m", "examples.promptseg", registry], env=base_env(), check=True, capture_output=True)
    picture = np.full((240, 320, 3), 12, dtype=np.uint8)
    picture[60:120, 80:160] = (230, 20, 20)
    Image.fromarray(picture).save(tmp_path / "trap.png")
    config = """<View>
      <Image name="image" value="$image" zoom="false"/>
      <KeyPointLabels name="tag" toName="image" smart="true" smartOnly="true"><Label value="Moth" background="red"/></KeyPointLabels>
      <BrushLabels name="mask" toName="image"><Label value="Moth" background="blue"/></BrushLabels>
    </View>"""
    served = configure(orchestrator, "models:/promptseg/1", builders.sam_post(from_name="mask", to_name="image"),
                       pre_hook=promptseg.click_pre, embed_hook=encode_hook(promptseg.embed_hook))
    project = new_project(label_studio, "smart click", config, uploads=[tmp_path / "trap.png"])
    (task,) = tasks_of(label_studio, project)
    label_studio.api("POST", "/api/ml", json={"url": served["label_studio_url"], "project": project,
                                             "title": "promptseg", "is_interactive": True})
    drawn = annotator.smart_click(project, task["id"], "smart-keypoint-mask", "Moth", 0.375, 0.375)
    assert drawn.regions == ["Moth"]
    [mask] = drawn.boxes("Brush")
    assert near(mask, [0.25, 0.25, 0.25, 0.25])  # the moth: x 80..160 of 320, y 60..120 of 240
