"""The parts of interactive labeling on their own: the embeddings' cache, clicks in pixels, repeated clicks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend.model.embedding import EmbeddingCache, state_bytes
from backend.serving.repeats import RepeatedClicks, click_key
from hooks import context_boxes, context_label, context_points, sam_post

# As Label Studio 1.23 sends a smart keypoint and a smart rectangle (percent of the image shown).
KEYPOINT = {"original_width": 640, "original_height": 480, "image_rotation": 0, "id": "aB3x", "from_name": "tag",
            "to_name": "image", "type": "keypointlabels", "origin": "manual", "is_positive": True,
            "value": {"x": 25.0, "y": 50.0, "width": 0.5, "keypointlabels": ["Moth"]}}
NEGATIVE = {**KEYPOINT, "id": "q9", "is_positive": False, "value": {"x": 75.0, "y": 10.0, "width": 0.5, "keypointlabels": ["Moth"]}}
RECTANGLE = {"original_width": 640, "original_height": 480, "id": "r1", "from_name": "box", "to_name": "image",
             "type": "rectanglelabels", "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0,
                                                   "rectanglelabels": ["Beetle"]}}


def test_clicks_come_in_pixels_of_the_image_the_model_sees():
    context = {"result": [KEYPOINT, NEGATIVE, RECTANGLE]}
    points = context_points(context)  # the original image's pixels
    assert [(p.x, p.y, p.positive, p.label) for p in points] == [(160.0, 240.0, True, "Moth"), (480.0, 48.0, False, "Moth")]
    small = context_points(context, size=(320, 240))  # the model sees it at half size
    assert (small[0].x, small[0].y) == (80.0, 120.0)
    (box,) = context_boxes(context, size=(320, 240))
    assert (box.x0, box.y0, box.x1, box.y1, box.label) == (32.0, 48.0, 128.0, 144.0, "Beetle")
    assert context_label(context) == "Moth"
    assert context_points(None) == [] and context_boxes({"result": "nonsense"}) == []
    with pytest.raises(ValueError, match="no image size"):
        context_points({"result": [{**KEYPOINT, "original_width": None}]})


def test_sam_outputs_become_the_one_region_of_the_click():
    mask = np.zeros((3, 20, 30), dtype=bool)
    mask[1, 5:10, 10:20] = True  # the best-scoring of three
    context = {"result": [KEYPOINT]}
    brush_answer = sam_post(from_name="tag", to_name="image")([{"masks": mask, "scores": [0.1, 0.9, 0.2]}], context=context)
    (region,) = brush_answer[0]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Moth"]
    assert (region["original_width"], region["original_height"]) == (30, 20)
    polygon_answer = sam_post(from_name="tag", to_name="image", shape="polygon")([(mask, np.array([0.1, 0.9, 0.2]))],
                                                                                 context=context)
    (region,) = polygon_answer[0]["result"]
    xs = [x for x, _ in region["value"]["points"]]
    ys = [y for _, y in region["value"]["points"]]
    assert (min(xs), max(xs), min(ys), max(ys)) == pytest.approx((100 / 3, 200 / 3, 25.0, 50.0))
    empty = sam_post(from_name="tag", to_name="image")([{"masks": np.zeros((0, 4, 4)), "scores": []},
                                                        {"masks": np.zeros((1, 4, 4)), "scores": [0.0]}])
    assert [answer["result"] for answer in empty] == [[], []]


def test_the_cache_computes_only_what_it_lacks_and_stays_in_its_bytes(tmp_path):
    computed: list[list[str]] = []

    def embed(values):
        computed.append(list(values))
        return [np.zeros(1000, dtype=np.uint8) + len(v) for v in values]  # 1000 bytes each

    cache = EmbeddingCache(max_bytes=2500)
    first = cache.states("hooks-a", ["a", "bb"], embed)
    assert [int(s[0]) for s in first] == [1, 2] and computed == [["a", "bb"]]
    cache.states("hooks-a", ["bb", "ccc", "ccc"], embed)  # only ccc is new, and embedded once
    assert computed[-1] == ["ccc"] and cache.hits == 2 and cache.misses == 3
    assert cache.held_bytes <= 2500 and cache.describe()["entries"] == 2  # "a", the least recently used, went
    cache.states("hooks-a", ["a"], embed)
    assert computed[-1] == ["a"]
    cache.states("hooks-b", ["a"], embed)  # another hook set: its own state
    assert computed[-1] == ["a"]
    cache.forget("hooks-a")
    assert all(key[0] == "hooks-b" for key in cache._entries)
    # A file is its path, size and modification time: rewritten, it is embedded again.
    image = tmp_path / "x.png"
    image.write_bytes(b"1")
    cache.states("hooks-b", [str(image)], embed)
    cache.states("hooks-b", [str(image)], embed)
    assert computed.count([str(image)]) == 1
    image.write_bytes(b"22")
    cache.states("hooks-b", [str(image)], embed)
    assert computed.count([str(image)]) == 2
    with pytest.raises(ValueError, match="one state per input"):
        cache.states("hooks-b", ["new"], lambda values: [])
    assert state_bytes({"a": np.zeros(10, dtype=np.float32)}) >= 40


def test_a_click_sent_again_is_answered_once_and_a_failure_is_not_kept():
    clicks = RepeatedClicks(keep_s=60)
    key = click_key("hooks|v1", "<View/>", [{"id": 1, "data": {"image": "a.png"}}], {"result": [KEYPOINT]})
    # The editor gives each region a new id: the same click all the same.
    again = click_key("hooks|v1", "<View/>", [{"id": 1, "data": {"image": "a.png"}}], {"result": [{**KEYPOINT, "id": "zz"}]})
    moved = click_key("hooks|v1", "<View/>", [{"id": 1, "data": {"image": "a.png"}}], {"result": [NEGATIVE]})
    other_version = click_key("hooks|v2", "<View/>", [{"id": 1, "data": {"image": "a.png"}}], {"result": [KEYPOINT]})
    assert key == again and len({key, moved, other_version}) == 3
    calls = []
    assert clicks.once(key, lambda: calls.append(1) or "answer") == ("answer", False)
    assert clicks.once(again, lambda: calls.append(1) or "other") == ("answer", True)
    assert len(calls) == 1 and clicks.repeats == 1

    def fails():
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError):
        clicks.once(moved, fails)
    assert clicks.once(moved, lambda: "computed again") == ("computed again", False)
    # One sent while the first is still computed waits for it.
    started, release = threading.Event(), threading.Event()
    results = []

    def slow():
        started.set()
        release.wait(5)
        return "slow answer"

    first = threading.Thread(target=lambda: results.append(clicks.once(other_version, slow)))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: results.append(clicks.once(other_version, lambda: "not this")))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert sorted(results) == [("slow answer", False), ("slow answer", True)]
    assert RepeatedClicks(keep_s=0).once(key, lambda: "off") == ("off", False)
