"""hooks/: every builder and adapter on realistic inputs, checked to the pixel and against label-studio-sdk.

Images are 200 x 100 (width x height), so a swapped width and height cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import hooks
from backend.core.errors import PredictionsInvalid
from backend.labeling.validation import validate_predictions
from harness.servers import ROOT, base_env

W, H = 200, 100
IMAGE_OBJ = '<Image name="image" value="$image"/>'
DETECTION = f'<View>{IMAGE_OBJ}<RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
POLYGONS = f'<View>{IMAGE_OBJ}<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels></View>'
BRUSHES = f'<View>{IMAGE_OBJ}<BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels></View>'
KEYPOINTS = f'<View>{IMAGE_OBJ}<KeyPointLabels name="kp" toName="image"><Label value="nose"/><Label value="tail"/></KeyPointLabels></View>'
CLASSES = (
    f'<View>{IMAGE_OBJ}<Choices name="cls" toName="image"><Choice value="cat"/><Choice value="dog"/></Choices></View>'
)
MULTI = f'<View>{IMAGE_OBJ}<Choices name="tags" toName="image" choice="multiple"><Choice value="indoor"/><Choice value="pet"/></Choices></View>'
NER = '<View><Text name="text" value="$text"/><Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels></View>'
OCR = (
    f'<View>{IMAGE_OBJ}<RectangleLabels name="bbox" toName="image"><Label value="Text"/></RectangleLabels>'
    '<TextArea name="transcription" toName="image" perRegion="true"/></View>'
)
ASR = '<View><Audio name="audio" value="$audio"/><TextArea name="transcription" toName="audio"/></View>'
SCALES = f'<View>{IMAGE_OBJ}<Number name="count" toName="image"/><Rating name="quality" toName="image"/></View>'


def check(predictions, config, count):
    """One prediction per task, and every one renders (label-studio-sdk's own validation)."""
    assert len(predictions) == count
    validate_predictions(predictions, [{"id": i} for i in range(count)], config)


def pixels(value):
    return (value["x"] * W / 100, value["y"] * H / 100, value["width"] * W / 100, value["height"] * H / 100)


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"p{i}.png"
        Image.new("RGB", (W, H), (40 + 100 * i,) * 3).save(path)
        paths.append(str(path))
    return paths


# --- builders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box,box_format,normalized",
    [
        ((20, 10, 120, 60), "xyxy", False),
        ((20, 10, 100, 50), "xywh", False),
        ((70, 35, 100, 50), "cxcywh", False),
        ((0.1, 0.1, 0.6, 0.6), "xyxy", True),
    ],
)
def test_rectangle_in_every_box_format_lands_on_the_same_pixels(box, box_format, normalized):
    result = hooks.rectangle(
        box,
        "cat",
        width=W,
        height=H,
        from_name="box",
        to_name="image",
        box_format=box_format,
        normalized=normalized,
        score=0.9,
    )
    assert pixels(result["value"]) == pytest.approx((20, 10, 100, 50))
    assert (result["original_width"], result["original_height"]) == (W, H)
    check([hooks.prediction([result])], DETECTION, 1)


def test_rotation_ids_and_prediction_scores():
    a = hooks.rectangle(
        (0, 0, 10, 10), "cat", width=W, height=H, from_name="box", to_name="image", rotation=30, score=0.2
    )
    b = hooks.rectangle((0, 0, 10, 10), "dog", width=W, height=H, from_name="box", to_name="image", score=0.6)
    assert a["value"]["rotation"] == 30 and a["id"] != b["id"]
    assert hooks.prediction([a, b])["score"] == pytest.approx(0.4)
    assert hooks.prediction([a, b], score="min", model_version="v7") == {
        "result": [a, b],
        "score": 0.2,
        "model_version": "v7",
    }
    assert "score" not in hooks.prediction([])  # unknown, not a made-up 0: Label Studio sorts tasks by it


def test_polygon_keypoint_brush_span_textarea_number_rating():
    poly = hooks.polygon([(20, 10), (120, 10), (120, 60)], "dog", width=W, height=H, from_name="poly", to_name="image")
    assert poly["value"]["points"] == [[10.0, 10.0], [60.0, 10.0], [60.0, 60.0]]
    check([hooks.prediction([poly])], POLYGONS, 1)
    normalized = hooks.polygon(
        [(0.1, 0.1), (0.6, 0.1), (0.6, 0.6)],
        "dog",
        width=W,
        height=H,
        from_name="poly",
        to_name="image",
        normalized=True,
    )
    assert normalized["value"]["points"] == poly["value"]["points"]

    point = hooks.keypoint(50, 25, "nose", width=W, height=H, from_name="kp", to_name="image")
    assert (point["value"]["x"], point["value"]["y"]) == (25.0, 25.0)
    check([hooks.prediction([point])], KEYPOINTS, 1)

    mask = np.zeros((H, W), dtype=bool)
    mask[10:60, 20:120] = True
    painted = hooks.brush(mask, "cat", from_name="mask", to_name="image")
    assert painted["value"]["format"] == "rle" and painted["original_width"] == W and painted["original_height"] == H
    from label_studio_sdk.converter.brush import decode_rle

    decoded = decode_rle(painted["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
    assert (decoded == mask).all()  # the RLE decodes back to the very same pixels
    check([hooks.prediction([painted])], BRUSHES, 1)

    text = "Ada Lovelace was born in London."
    person = hooks.span(0, 12, "PER", text=text, from_name="ner", to_name="text")
    assert person["value"] == {"start": 0, "end": 12, "text": "Ada Lovelace", "labels": ["PER"]}
    check([hooks.prediction([person])], NER, 1)

    region = hooks.rectangle((20, 10, 120, 60), "Text", width=W, height=H, from_name="bbox", to_name="image")
    words = hooks.textarea("HELLO", from_name="transcription", to_name="image", region=region)
    assert words["id"] == region["id"] and words["value"]["text"] == ["HELLO"] and words["value"]["x"] == 10.0
    check([hooks.prediction([region, words])], OCR, 1)
    check([hooks.prediction([hooks.textarea("hello world", from_name="transcription", to_name="audio")])], ASR, 1)

    scales = [
        hooks.number(3, from_name="count", to_name="image"),
        hooks.rating(4, from_name="quality", to_name="image"),
    ]
    check([hooks.prediction(scales)], SCALES, 1)
    check([hooks.prediction([hooks.choices(["indoor", "pet"], from_name="tags", to_name="image")])], MULTI, 1)


def test_names_and_labels_come_from_the_config():
    control = hooks.find_control(DETECTION, "RectangleLabels", label_map={"kitty": "cat", "person": None})
    assert (control.from_name, control.to_name, control.labels) == ("box", "image", ("cat", "dog"))
    assert control.label("Dog") == "dog" and control.label("kitty") == "cat" and control.label("person") is None
    assert control.label(1, {0: "cat", 1: "dog"}) == "dog"
    assert control.label("horse") is None and control.skipped == 1
    strict = hooks.find_control(DETECTION, "RectangleLabels", on_unknown="error")
    with pytest.raises(hooks.HookConfigError, match="'horse' is not a label of RectangleLabels 'box'"):
        strict.label("horse")
    with pytest.raises(hooks.HookConfigError, match="no PolygonLabels control"):
        hooks.find_control(DETECTION, "PolygonLabels")


# --- adapters ------------------------------------------------------------------------------------


class Boxes:
    def __init__(self, xyxy, cls, conf):
        self.xyxy, self.cls, self.conf = np.array(xyxy, float), np.array(cls, float), np.array(conf, float)

    def __len__(self):
        return len(self.conf)


class Result:
    """The attributes of an ultralytics Results object that the adapter reads."""

    def __init__(self, boxes=None, masks=None, keypoints=None, probs=None):
        self.boxes, self.masks, self.keypoints, self.probs = boxes, masks, keypoints, probs
        self.names = {0: "cat", 1: "dog"}
        self.orig_shape = (H, W)  # (height, width), as ultralytics has it


def test_ultralytics_boxes_one_prediction_per_image_never_merged():
    output = [
        Result(Boxes([[20, 10, 120, 60], [0, 0, 5, 5]], [0, 1], [0.9, 0.1])),
        Result(Boxes([[100, 50, 200, 100]], [1], [0.8])),
    ]
    predictions = hooks.ultralytics_post(threshold=0.25)(output, label_config=DETECTION)
    check(predictions, DETECTION, 2)
    [first], [second] = predictions[0]["result"], predictions[1]["result"]
    assert pixels(first["value"]) == pytest.approx((20, 10, 100, 50)) and first["value"]["rectanglelabels"] == ["cat"]
    assert pixels(second["value"]) == pytest.approx((100, 50, 100, 50)) and second["value"]["rectanglelabels"] == [
        "dog"
    ]
    assert predictions[0]["score"] == pytest.approx(0.9)


def test_ultralytics_masks_keypoints_and_classification():
    mask = np.zeros((1, H, W), dtype=float)
    mask[0, 10:60, 20:120] = 1.0
    segmented = Result(
        Boxes([[20, 10, 120, 60]], [0], [0.9]),
        masks=type("Masks", (), {"xy": [np.array([[20, 10], [120, 10], [120, 60]])], "data": mask})(),
    )
    polygons = hooks.ultralytics_post()([segmented], label_config=POLYGONS)
    check(polygons, POLYGONS, 1)
    assert polygons[0]["result"][0]["value"]["points"][1] == [60.0, 10.0]
    brushes = hooks.ultralytics_post()([segmented], label_config=BRUSHES)
    check(brushes, BRUSHES, 1)

    posed = Result(
        Boxes([[20, 10, 120, 60]], [0], [0.9]), keypoints=type("K", (), {"xy": np.array([[[50, 25], [0, 0]]])})()
    )
    points = hooks.ultralytics_post(keypoint_names=["nose", "tail"])([posed], label_config=KEYPOINTS)
    check(points, KEYPOINTS, 1)
    assert [(p["value"]["x"], p["value"]["y"], p["value"]["keypointlabels"]) for p in points[0]["result"]] == [
        (25.0, 25.0, ["nose"])
    ]

    classified = Result(probs=type("P", (), {"data": np.array([0.2, 0.8])})())
    choices = hooks.ultralytics_post()([classified], label_config=CLASSES)
    check(choices, CLASSES, 1)
    assert choices[0]["result"][0]["value"]["choices"] == ["dog"]


def test_torchvision_detections_with_sizes_from_the_files(pictures):
    output = [
        {"boxes": np.array([[20, 10, 120, 60]]), "labels": np.array([2]), "scores": np.array([0.95])},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "scores": np.zeros(0)},
    ]
    post = hooks.torchvision_detection_post(class_names={1: "cat", 2: "dog"})
    predictions = post(output, label_config=DETECTION, inputs=pictures)
    check(predictions, DETECTION, 2)
    assert pixels(predictions[0]["result"][0]["value"]) == pytest.approx((20, 10, 100, 50))
    assert predictions[1]["result"] == []


def brushed_box(result):
    """(x0, y0, x1, y1) in pixels of a brush result's painted area, decoded as Label Studio does."""
    from label_studio_sdk.converter.brush import decode_rle

    value = result["value"]
    painted = decode_rle(value["rle"]).reshape(result["original_height"], result["original_width"], 4)[..., 3] > 0
    rows, columns = np.nonzero(painted)
    return columns.min(), rows.min(), columns.max() + 1, rows.max() + 1


def test_mask_rcnn_masks_become_polygons_along_their_outline_or_brushes(pictures):
    masks = np.zeros((1, 1, H, W), dtype=np.float32)
    masks[0, 0, 10:60, 20:120] = 0.9  # Mask R-CNN: a probability per pixel, at the image's size
    output = [{"boxes": np.array([[20, 10, 120, 60]]), "labels": np.array([1]), "scores": np.array([0.9]),
               "masks": masks}] * 2
    post = hooks.torchvision_detection_post(class_names={1: "cat", 2: "dog"})
    polygons = post(output, label_config=POLYGONS, inputs=pictures)
    check(polygons, POLYGONS, 2)
    points = polygons[0]["result"][0]["value"]["points"]
    assert sorted((x * W / 100, y * H / 100) for x, y in points) == [(20, 10), (20, 60), (120, 10), (120, 60)]
    brushes = post(output, label_config=BRUSHES, inputs=pictures)
    check(brushes, BRUSHES, 2)
    assert brushed_box(brushes[0]["result"][0]) == (20, 10, 120, 60)


def test_ultralytics_masks_at_the_letterboxed_input_size_land_on_the_image():
    """Without retina_masks, YOLO's masks are at its input's size: the image scaled and padded to a
    multiple of 32 (200 x 100 -> 224 x 128 at scale 1.12, 8 rows of padding above and below...)."""
    scale = 224 / W
    rows = 128
    pad = (rows - H * scale) / 2
    mask = np.zeros((1, rows, 224), dtype=np.float32)
    mask[0, round(pad + 10 * scale) : round(pad + 60 * scale), round(20 * scale) : round(120 * scale)] = 1.0
    segmented = Result(Boxes([[20, 10, 120, 60]], [0], [0.9]), masks=type("Masks", (), {"xy": None, "data": mask})())
    brushes = hooks.ultralytics_post()([segmented], label_config=BRUSHES)
    check(brushes, BRUSHES, 1)
    x0, y0, x1, y1 = brushed_box(brushes[0]["result"][0])
    assert abs(x0 - 20) <= 1 and abs(y0 - 10) <= 1 and abs(x1 - 120) <= 1 and abs(y1 - 60) <= 1, (x0, y0, x1, y1)


@pytest.mark.parametrize(
    ("painted", "outline"),
    [
        ((slice(2, 5), slice(3, 9)), [(9, 2), (9, 5), (3, 5), (3, 2)]),  # a rectangle: its four corners
        ((slice(0, 3), slice(0, 3)), [(3, 0), (3, 3), (0, 3), (0, 0)]),  # touching the edges
    ],
)
def test_a_masks_outline_runs_along_its_pixels_edges(painted, outline):
    mask = np.zeros((10, 12), dtype=bool)
    mask[painted] = True
    assert hooks.mask_outline(mask) == outline


def test_outlines_of_concave_round_and_empty_masks():
    notched = np.zeros((10, 10), dtype=np.uint8)
    notched[2:8, 2:8], notched[4:8, 4:6] = 1, 0
    assert hooks.mask_outline(notched) == [(8, 2), (8, 8), (6, 8), (6, 4), (4, 4), (4, 8), (2, 8), (2, 2)]
    yy, xx = np.mgrid[:60, :60]
    disc = (yy - 30) ** 2 + (xx - 30) ** 2 < 400
    ring = hooks.mask_outline(disc)
    assert 8 <= len(ring) <= 40  # a staircase of ~160 corners, simplified
    assert all(abs(((x - 30) ** 2 + (y - 30) ** 2) ** 0.5 - 20) <= 1.5 for x, y in ring)
    assert hooks.mask_outline(np.zeros((4, 4))) == []


def test_images_to_tensors_keeps_each_image_at_its_size(pictures, tmp_path):
    torch = pytest.importorskip("torch")
    other = tmp_path / "tall.png"
    Image.new("RGB", (30, 50), (255, 0, 0)).save(other)
    first, second = hooks.images_to_tensors()([pictures[0], str(other)])
    assert isinstance(first, torch.Tensor) and first.shape == (3, H, W) and second.shape == (3, 50, 30)
    assert float(second[0].min()) == 1.0 and float(second[1].max()) == 0.0


def test_letterboxed_coordinates_are_mapped_back(pictures):
    pre = hooks.images_to_numpy(size=64, letterboxed=True)
    batch = pre(pictures)
    assert batch.shape == (2, 64, 64, 3)
    scale, pad_x, pad_y = hooks.letterbox_geometry((W, H), 64)
    in_model = [20 * scale + pad_x, 10 * scale + pad_y, 120 * scale + pad_x, 60 * scale + pad_y]
    post = hooks.torchvision_detection_post(class_names=["cat", "dog"], letterbox=64)
    output = [{"boxes": np.array([in_model]), "labels": np.array([0]), "scores": np.array([0.9])}] * 2
    predictions = post(output, label_config=DETECTION, inputs=pictures)
    assert pixels(predictions[0]["result"][0]["value"]) == pytest.approx((20, 10, 100, 50), abs=1e-6)


def test_sklearn_predict_and_predict_proba():
    labels = hooks.sklearn_post()(np.array(["dog", "cat"]), label_config=CLASSES)
    check(labels, CLASSES, 2)
    assert [p["result"][0]["value"]["choices"] for p in labels] == [["dog"], ["cat"]]
    probabilities = hooks.sklearn_post(classes=["cat", "dog"])(np.array([[0.3, 0.7], [0.9, 0.1]]), label_config=CLASSES)
    check(probabilities, CLASSES, 2)
    assert probabilities[0]["result"][0]["score"] == pytest.approx(0.7)
    with pytest.raises(hooks.HookConfigError, match="'bird'"):
        hooks.sklearn_post()(np.array(["bird"]), label_config=CLASSES)


def test_certainty_scores_put_the_tasks_the_model_doubts_first():
    assert hooks.certainty([0.5, 0.5], "margin") == 0.0 and hooks.certainty([0.9, 0.1], "margin") == pytest.approx(0.8)
    assert hooks.certainty([0.25] * 4, "entropy") == pytest.approx(0.0) and hooks.certainty([1.0, 0.0], "entropy") == 1.0
    assert hooks.certainty([0.2, 0.5, 0.3], "max") == 0.5
    assert hooks.certainty([0.7], "margin") == pytest.approx(0.4)  # only the winner's: the rest is one class more
    assert hooks.certainty([0.6, 0.6], "max") == pytest.approx(0.5)  # independent sigmoids: scaled to sum to 1
    with pytest.raises(ValueError, match="softmax the logits"):
        hooks.certainty([2.3, -1.0])
    with pytest.raises(ValueError, match="pass probabilities="):
        hooks.prediction([], score="entropy")

    # Three tasks, the model sure of the first, torn on the second, leaning on the third: each way of
    # scoring ranks them the same, and Label Studio, sorting by score, shows the torn one first.
    rows = np.array([[0.02, 0.98], [0.49, 0.51], [0.3, 0.7]])
    for method in ("max", "margin", "entropy"):
        scored = hooks.sklearn_post(classes=["cat", "dog"], score=method)(rows, label_config=CLASSES)
        check(scored, CLASSES, 3)
        assert [p["result"][0]["value"]["choices"] for p in scored] == [["dog"]] * 3
        by_doubt = sorted(range(3), key=lambda i: scored[i]["score"])
        assert by_doubt == [1, 2, 0], (method, [p["score"] for p in scored])
    ranked = [[{"label": "CAT", "score": 0.5}, {"label": "DOG", "score": 0.5}], [{"label": "DOG", "score": 0.9},
                                                                              {"label": "CAT", "score": 0.1}]]
    margins = hooks.transformers_post(score="margin", label_map={"CAT": "cat", "DOG": "dog"})(ranked, label_config=CLASSES)
    assert [p["score"] for p in margins] == [0.0, pytest.approx(0.8)]


def test_transformers_classification_token_classification_and_speech(tmp_path):
    ranked = [[{"label": "CAT", "score": 0.6}, {"label": "DOG", "score": 0.4}], [{"label": "DOG", "score": 0.99}]]
    choices = hooks.transformers_post()(ranked, label_config=CLASSES)
    check(choices, CLASSES, 2)
    assert [p["result"][0]["value"]["choices"] for p in choices] == [["cat"], ["dog"]]

    text = "Ada Lovelace was born in London."
    entities = [
        [
            {"entity_group": "PER", "start": 0, "end": 12, "score": 0.99, "word": "Ada Lovelace"},
            {"entity_group": "LOC", "start": 25, "end": 31, "score": 0.97, "word": "London"},
            {"entity_group": "MISC", "start": 0, "end": 3, "score": 0.5, "word": "Ada"},
        ]
    ]
    spans = hooks.transformers_post()(entities, label_config=NER, inputs=[text])
    check(spans, NER, 1)
    assert [(s["value"]["text"], s["value"]["labels"]) for s in spans[0]["result"]] == [
        ("Ada Lovelace", ["PER"]),
        ("London", ["LOC"]),
    ]

    # Per token, as a pipeline loaded from MLflow answers (no aggregation): one span per entity all the same.
    tokens = [[
        {"entity": "B-PER", "start": 0, "end": 3, "score": 0.9, "word": "ada"},
        {"entity": "I-PER", "start": 4, "end": 12, "score": 0.7, "word": "lovelace"},
        {"entity": "LOC", "start": 25, "end": 31, "score": 0.8, "word": "london"},
        {"entity": "B-PER", "start": 31, "end": 32, "score": 0.6, "word": "."},  # B- starts another, never glued
    ]]
    merged = hooks.transformers_post()(tokens, label_config=NER, inputs=[text])
    assert [(s["value"]["text"], s["value"]["labels"], round(s["score"], 2)) for s in merged[0]["result"]] == [
        ("Ada Lovelace", ["PER"], 0.8),
        ("London", ["LOC"], 0.8),
        (".", ["PER"], 0.6),
    ]

    speech = hooks.transformers_post()([{"text": " hello world "}], label_config=ASR)
    check(speech, ASR, 1)
    assert speech[0]["result"][0]["value"]["text"] == ["hello world"]


def test_easyocr_regions_with_their_text(pictures):
    detections = [[([[20, 10], [120, 10], [120, 60], [20, 60]], "HELLO", 0.93)], []]
    predictions = hooks.easyocr_post()(detections, label_config=OCR, inputs=pictures)
    check(predictions, OCR, 2)
    box, words = predictions[0]["result"]
    assert pixels(box["value"]) == pytest.approx((20, 10, 100, 50)) and box["value"]["rectanglelabels"] == ["Text"]
    assert words["id"] == box["id"] and words["value"]["text"] == ["HELLO"]


def test_a_wrong_config_fails_validation_loudly():
    predictions = hooks.ultralytics_post(from_name="boxes", to_name="img")([Result(Boxes([[1, 1, 9, 9]], [0], [0.9]))])
    with pytest.raises(PredictionsInvalid):
        validate_predictions(predictions, [{"id": 1}], DETECTION)


# --- pre hooks -----------------------------------------------------------------------------------


def test_pre_hooks(pictures, tmp_path):
    assert hooks.images_to_numpy(size=(32, 16), channels_first=True)(pictures).shape == (2, 3, 16, 32)
    frame = hooks.image_features_frame(["brightness", "width", "height"])(pictures)
    assert list(frame.columns) == ["brightness", "width", "height"] and frame["width"].tolist() == [W, W]
    assert frame["brightness"].tolist() == pytest.approx([40 / 255, 140 / 255])
    note = tmp_path / "note.txt"
    note.write_text("from a file")
    assert hooks.read_texts([str(note), "inline text"]) == ["from a file", "inline text"]
    assert hooks.texts_frame()(["a", "b"])["text"].tolist() == ["a", "b"]


# --- pickling and the checker --------------------------------------------------------------------


def test_ready_hooks_pickle_by_value_and_run_where_hooks_is_not_installed(tmp_path):
    import cloudpickle

    post = hooks.ultralytics_post(threshold=0.5, label_map={"cat": "dog"})
    payload = base64.b64encode(cloudpickle.dumps(post)).decode()
    script = (
        "import base64, sys, cloudpickle, numpy as np\n"
        "assert 'hooks' not in sys.modules\n"
        "sys.modules['hooks'] = None  # not installed here (the checkout's venv has it, editable)\n"
        "try:\n    import hooks\n    raise SystemExit('hooks should not be importable here')\nexcept ImportError:\n    pass\n"
        "post = cloudpickle.loads(base64.b64decode(sys.argv[1]))\n"
        "class B:\n    xyxy = np.array([[20., 10., 120., 60.]]); cls = np.array([0.]); conf = np.array([0.9])\n"
        "    def __len__(self): return 1\n"
        "class R:\n    boxes = B(); masks = keypoints = probs = None; names = {0: 'cat'}; orig_shape = (100, 200)\n"
        f"print(__import__('json').dumps(post([R()], label_config={DETECTION!r})))\n"
    )
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, payload], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    [prediction] = json.loads(done.stdout)
    assert prediction["result"][0]["value"]["rectanglelabels"] == ["dog"]


def test_checker_runs_the_pipeline_and_fails_with_the_reason(registry, images, tmp_path, capsys):
    from hooks.check import main
    from tests.support.hooks import IMAGE_CONFIG

    base = ["check", "--label-config", IMAGE_CONFIG, "--model", "models:/brightness/1", "--tracking-uri", registry,
            "--pre-hook", "examples.hooks:brightness_pre"]

    def check(*args: str) -> subprocess.CompletedProcess:
        """In this process (a new Python each would spend its seconds importing MLflow again); the first runs
        as a user runs it, ``python -m hooks``."""
        code = main([*base, *args])
        said = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, said.out, said.err)

    # Two images, and two tasks without data: [] at their place and the reason, as the backend answers.
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"data": {"image": "/no/such.png"}}, {"data": {"image": 5}}]))
    partly = subprocess.run(
        [sys.executable, "-m", "hooks", *base, "--post-hook", "examples.hooks:choices_post", str(images["white"]),
         str(images["black"]), str(tasks)],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=180, check=False,
    )
    assert partly.returncode == 1, partly.stderr
    shown = json.loads(partly.stdout)
    assert [p["result"][0]["value"]["choices"] for p in shown["results"][:2]] == [["light"], ["dark"]]
    assert shown["results"][2:] == [[], []] and [e["task"] for e in shown["errors"]] == [3, 4]
    assert "no such local file: '/no/such.png'" in shown["errors"][0]["error"]
    assert "task 4: no prediction: task data 'image' is int '5'" in partly.stderr
    assert "PARTLY: 2 predictions" in partly.stderr

    bad = check("--post-hook", "tests.support.hooks:wrong_label_post", str(images["white"]))
    assert bad.returncode == 1
    assert "FAILED: 1 prediction region(s) do not fit the labeling config" in bad.stderr and "purple" in bad.stderr

    plain = check("--post-hook", "tests.support.hooks:numpy_post", str(images["white"]))
    assert plain.returncode == 0 and "OK: 1 predictions" in plain.stderr, plain.stderr
    assert json.loads(plain.stdout)["results"][0]["meta"] == {"logits": [0.25, 0.75]}  # as the backend sends it

    from PIL import Image

    from tests.support.drawn_hooks import CAPTION_CONFIG

    boxed = check("--label-config", CAPTION_CONFIG, "--post-hook", "tests.support.drawn_hooks:caption_post",
                  "--draw", str(tmp_path / "drawn"), str(images["white"]))
    assert boxed.returncode == 0, boxed.stderr
    assert f"drawn: {tmp_path / 'drawn' / 'task-1.png'}" in boxed.stderr
    drawn = Image.open(tmp_path / "drawn" / "task-1.png").convert("RGB")
    assert drawn.size == (32, 24) and drawn.getpixel((16, 12)) != drawn.getpixel((1, 22))  # the box over the middle

    unsendable = check("--post-hook", "tests.support.hooks:set_post", str(images["white"]))
    assert unsendable.returncode == 1
    assert "FAILED: the prediction for task 1 (#0) cannot be sent as JSON" in unsendable.stderr


def test_the_checker_leaves_mlflows_process_wide_uris_as_it_found_them(tmp_path, monkeypatch):
    """hooks check loads in its caller's process: afterwards a client given only a tracking URI must still read
    its registry there (a registry URI put back by value pinned every later client to the old one)."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    from backend.config.spec import parse_model_spec
    from backend.model.loading import mlflow_scope

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking_state, "_tracking_uri", None)
    monkeypatch.setattr(registry_state, "_registry_uri", None)
    spec = parse_model_spec({"model_uri": "models:/m/1", "tracking_uri": f"sqlite:///{tmp_path / 'a.db'}"})
    with mlflow_scope(spec):
        assert registry_state._registry_uri == spec.tracking_uri
    assert (tracking_state._tracking_uri, registry_state._registry_uri) == (None, None)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    other = f"sqlite:///{tmp_path / 'b.db'}"
    assert MlflowClient(tracking_uri=other)._registry_uri == other


def test_draw_to_an_unwritable_folder_fails_before_any_model_loads(tmp_path, images, capsys):
    from hooks.check import main
    from tests.support.hooks import IMAGE_CONFIG

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    code = main(["check", "--label-config", IMAGE_CONFIG, "--model", "models:/not-loaded/1", "--post-hook", "x:y",
                 "--draw", str(blocked / "drawn"), str(images["white"])])
    assert code == 1
    said = capsys.readouterr().err
    assert f"FAILED: --draw cannot write to {blocked / 'drawn'}: Not a directory" in said and "fix:" in said


def test_predictions_are_drawn_where_label_studio_puts_them(tmp_path):
    """hooks.draw reads percent coordinates as Label Studio does: each shape tints the pixels it covers."""
    import numpy as np
    from PIL import Image

    from hooks.draw import draw_prediction

    width, height = 200, 100
    photo = tmp_path / "grey.png"
    Image.new("RGB", (width, height), (128, 128, 128)).save(photo)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[60:90, 150:190] = 1
    box = hooks.rectangle((20, 10, 60, 40), "cat", width=width, height=height, from_name="b", to_name="i", score=0.9)
    prediction = hooks.prediction([
        box,
        hooks.textarea("a cat", from_name="t", to_name="i", region=box),
        hooks.polygon([(100, 10), (140, 10), (120, 40)], "dog", width=width, height=height, from_name="p", to_name="i"),
        hooks.brush(mask, "grass", from_name="m", to_name="i"),
        hooks.keypoint(30, 80, "eye", width=width, height=height, from_name="k", to_name="i", size=3),
        hooks.choices("outdoor", from_name="c", to_name="i"),
    ])
    drawn = np.asarray(Image.open(draw_prediction(photo, prediction, tmp_path / "out" / "task-1.png")).convert("RGB"))
    assert drawn.shape == (height, width, 3)

    def tinted(x: int, y: int) -> bool:
        return tuple(drawn[y, x]) != (128, 128, 128)

    assert tinted(40, 25) and tinted(120, 20) and tinted(170, 75) and tinted(30, 80)  # inside each shape
    assert not tinted(80, 60) and not tinted(190, 20) and not tinted(100, 95)  # between them: the photo as it was
