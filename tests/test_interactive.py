"""Interactive labeling on a real backend with a promptable model (examples/promptseg.py, registered in the
test's registry): each image is embedded once, every click after runs only the decoder, a click sent
again is answered without a model call, a new configuration embeds anew, and a failing embed_hook is
named."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from examples import promptseg
from harness.calls import configure, predict
from harness.servers import ROOT, base_env, wait_until
from lsmlflow.pickling import encode_hook

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="tag" toName="image" smart="true"><Label value="Moth"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="Moth"/></BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def promptseg_registry(registry):
    subprocess.run([sys.executable, "-m", "examples.promptseg", registry], cwd=ROOT, env=base_env(), check=True,
                   capture_output=True)
    return registry


@pytest.fixture
def scenes(tmp_path):
    """Two photos of a dark trap: a red moth at (80..160, 60..120) in one, at (160..240, 120..180) in the other."""
    paths = []
    for n, (x, y) in enumerate([(80, 60), (160, 120)]):
        picture = np.full((240, 320, 3), 12, dtype=np.uint8)
        picture[y:y + 60, x:x + 80] = (230, 20, 20)
        path = tmp_path / f"scene{n}.png"
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def click(x_percent: float, y_percent: float, positive: bool = True, region_id: str = "k1") -> dict:
    """A smart keypoint as Label Studio sends it."""
    return {"result": [{"original_width": 320, "original_height": 240, "image_rotation": 0, "id": region_id,
                        "from_name": "tag", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                        "is_positive": positive, "value": {"x": x_percent, "y": y_percent, "width": 0.6,
                                                           "keypointlabels": ["Moth"]}}]}


def counted(log: Path, role: str, hook):
    """``hook``, writing a line to ``log`` per input it gets: what the model process really computed."""
    def wrapper(values, **kwargs):
        with open(log, "a") as handle:
            handle.writelines(f"{role} {Path(v).name}\n" for v in values)
        return hook(values, **kwargs)

    wrapper.__signature__ = __import__("inspect").signature(hook)  # the backend passes what the hook asks for
    return wrapper


def calls(log: Path, role: str) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith(role)] if log.exists() else []


def mask_box(answer: dict) -> tuple[int, int, int, int]:
    (prediction,) = answer["results"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "mask"
    mask = decode_rle(region["value"]["rle"]).reshape(region["original_height"], region["original_width"], 4)[..., 3]
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def test_an_image_is_embedded_once_and_each_click_decodes_only(start_backend, promptseg_registry, scenes, tmp_path):
    log = tmp_path / "calls.log"
    backend = start_backend(MLFLOW_TRACKING_URI=promptseg_registry, LOCAL_FILES_ROOTS=str(scenes[0].parent))
    from hooks import sam_post

    body = {"model_uri": "models:/promptseg/1", "embed_hook": encode_hook(counted(log, "embed", promptseg.embed_hook)),
            "pre_hook": encode_hook(counted(log, "pre", promptseg.click_pre)),
            "post_hook": encode_hook(sam_post(from_name="mask", to_name="image"))}
    assert configure(backend, **body).status_code == 200
    health = requests.get(backend.url + "/health", timeout=5).json()
    assert health["embed_hook"].startswith(("pickle:", "tests."))

    task = [{"id": 1, "data": {"image": str(scenes[0])}}]
    first = predict(backend, task, CONFIG, params={"context": click(37.5, 37.5)})
    assert first.status_code == 200, first.text
    assert mask_box(first.json()) == (80, 159, 60, 119)  # the moth, and nothing around it
    assert calls(log, "embed") == ["scene0.png"]

    # Another click on the same image: decoded from the kept embedding.
    second = predict(backend, task, CONFIG, params={"context": click(45.0, 45.0, region_id="k2")})
    assert mask_box(second.json()) == (80, 159, 60, 119)
    assert calls(log, "embed") == ["scene0.png"] and len(calls(log, "pre")) == 2

    # The same click again (Label Studio re-sends it on Submit; the editor gave the region a new id):
    # the first answer, and no model call.
    again = predict(backend, task, CONFIG, params={"context": click(45.0, 45.0, region_id="k3")})
    assert again.json() == second.json() and len(calls(log, "pre")) == 2
    metrics = requests.get(backend.url + "/metrics", timeout=5).text
    assert "lsbackend_interactive_repeats_total 1.0" in metrics

    # The other image: embedded once too; a click off the moth finds the background, not the moth.
    other = [{"id": 2, "data": {"image": str(scenes[1])}}]
    assert mask_box(predict(backend, other, CONFIG, params={"context": click(62.5, 62.5)}).json()) == (160, 239, 120, 179)
    assert calls(log, "embed") == ["scene0.png", "scene1.png"]
    background = mask_box(predict(backend, other, CONFIG, params={"context": click(5.0, 5.0)}).json())
    assert background == (0, 319, 0, 239)
    assert calls(log, "embed") == ["scene0.png", "scene1.png"]

    # A new configuration (another post hook) embeds anew: its states are its own.
    relabelled = {**body, "post_hook": encode_hook(sam_post(from_name="mask", to_name="image", label="Moth"))}
    assert configure(backend, **relabelled).status_code == 200
    predict(backend, task, CONFIG, params={"context": click(37.5, 37.5)})
    assert calls(log, "embed") == ["scene0.png", "scene1.png", "scene0.png"]


def test_an_embed_hook_that_fails_is_named_and_the_next_click_still_works(start_backend, promptseg_registry, scenes):
    backend = start_backend(MLFLOW_TRACKING_URI=promptseg_registry, LOCAL_FILES_ROOTS=str(scenes[0].parent))
    from hooks import sam_post

    def embed_hook(paths, model):
        if any("scene1" in p for p in paths):
            raise OSError("cannot read the camera's raw format")
        return promptseg.embed_hook(paths, model)

    body = {"model_uri": "models:/promptseg/1", "embed_hook": encode_hook(embed_hook),
            "pre_hook": encode_hook(promptseg.click_pre), "post_hook": encode_hook(sam_post(from_name="mask", to_name="image"))}
    assert configure(backend, **body).status_code == 200
    failed = predict(backend, [{"id": 2, "data": {"image": str(scenes[1])}}], CONFIG, params={"context": click(62.5, 62.5)})
    assert failed.status_code == 500
    assert "embed_hook raised OSError: cannot read the camera's raw format" in failed.json()["error"]
    fine = predict(backend, [{"id": 1, "data": {"image": str(scenes[0])}}], CONFIG, params={"context": click(37.5, 37.5)})
    assert fine.status_code == 200 and mask_box(fine.json()) == (80, 159, 60, 119)

    # An embed_hook that cannot be decoded, or is no string at all: named, and what served serves on.
    for bad, status in (("bm90IGEgcGlja2xl!!", 400), ("bm90IGEgcGlja2xl", 422), (42, 400)):
        refused = configure(backend, **{**body, "embed_hook": bad, "post_hook": encode_hook(sam_post(from_name="mask", to_name="image", label="Moth"))})
        assert refused.status_code == status and "embed_hook" in refused.json()["error"], refused.text
    again = predict(backend, [{"id": 1, "data": {"image": str(scenes[0])}}], CONFIG, params={"context": click(40.0, 40.0)})
    assert again.status_code == 200 and mask_box(again.json()) == (80, 159, 60, 119)


def test_a_click_on_an_embedded_image_is_answered_while_another_image_is_embedded(start_backend, promptseg_registry,
                                                                                   scenes, tmp_path):
    """Two annotators: one clicks a new image (its embedding held here until the test says so), the other
    clicks an image embedded already: that click goes by the model process's interactive lane and is
    answered at once, not after the other's embedding."""
    log, gate = tmp_path / "calls.log", tmp_path / "open-the-gate"
    backend = start_backend(MLFLOW_TRACKING_URI=promptseg_registry, LOCAL_FILES_ROOTS=str(scenes[0].parent))
    from hooks import sam_post

    def gated_embed(paths, model):
        if any("scene1" in p for p in paths):  # the new image: embedded only once the gate is open
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return promptseg.embed_hook(paths, model)

    body = {"model_uri": "models:/promptseg/1", "embed_hook": encode_hook(counted(log, "embed", gated_embed)),
            "pre_hook": encode_hook(promptseg.click_pre), "post_hook": encode_hook(sam_post(from_name="mask", to_name="image"))}
    assert configure(backend, **body).status_code == 200
    embedded = [{"id": 1, "data": {"image": str(scenes[0])}}]
    assert mask_box(predict(backend, embedded, CONFIG, params={"context": click(37.5, 37.5)}).json()) == (80, 159, 60, 119)

    new_image: dict = {}
    first_click = threading.Thread(target=lambda: new_image.update(answer=predict(
        backend, [{"id": 2, "data": {"image": str(scenes[1])}}], CONFIG, params={"context": click(62.5, 62.5)})))
    first_click.start()
    wait_until(lambda: calls(log, "embed") == ["scene0.png", "scene1.png"], 30, "the new image's embedding to begin")

    meanwhile = predict(backend, embedded, CONFIG, params={"context": click(45.0, 45.0, region_id="k2")}, timeout=30)
    assert meanwhile.status_code == 200 and mask_box(meanwhile.json()) == (80, 159, 60, 119)
    assert first_click.is_alive()  # answered while the other image was still being embedded
    gate.touch()
    first_click.join(60)
    assert mask_box(new_image["answer"].json()) == (160, 239, 120, 179)
    batching = requests.get(backend.url + "/health", timeout=5).json()["batching"]
    assert batching["interactive_lane_calls"] >= 1, batching
