"""``python -m bench interactive``: annotators clicking with a promptable model, embedded once per image
against the same model recomputing everything at each click, in one run.

Eight annotators share 20 images (each image its annotator's alone), ten clicks each, all at once
(each pausing 0.3-1.2 s between clicks, as a person looking at the mask does), on
one backend serving ``examples/promptseg.py`` (its encoder costs about 20x its decoder). Run twice:
with an ``embed_hook`` (the image is encoded at its first click, kept in the model process, and every
later click only decodes) and with a pre hook that encodes the image at every click. Every answer is
checked: a click on the moth gives the moth's box. Reported: p50 and p95 of a click on an image already
embedded against a click that recomputes, the first click on an image, the model process's memory
(the embeddings it keeps) and the slowest click against Label Studio's 100 s.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from examples import promptseg
from harness.servers import ROOT, Backend, base_env
from hooks import sam_post
from lsmlflow.pickling import encode_hook

from .common import Row, Table, percentile, rss_mib

ANNOTATORS = 8
IMAGES = 20
CLICKS = 10
SIZE = (320, 240)
MOTH = (80, 60)  # width, height
LABEL_STUDIO_WAIT_S = 100.0
THINK_S = (0.3, 1.2)  # between an annotator's clicks: looking at the mask, moving the mouse
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="tag" toName="image" smart="true"><Label value="Moth"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="Moth"/></BrushLabels>
</View>"""


def scenes(folder: Path) -> list[tuple[Path, tuple[int, int, int, int]]]:
    """The images, each a red moth on a dark trap somewhere else, and the moth's box (x0, x1, y0, y1)."""
    rng = random.Random(3)
    made = []
    for n in range(IMAGES):
        x, y = rng.randrange(0, SIZE[0] - MOTH[0]), rng.randrange(0, SIZE[1] - MOTH[1])
        picture = np.full((SIZE[1], SIZE[0], 3), 12, dtype=np.uint8)
        picture[y:y + MOTH[1], x:x + MOTH[0]] = (230, 20, 20)
        path = folder / f"trap{n:02d}.png"
        Image.fromarray(picture).save(path)
        made.append((path, (x, x + MOTH[0] - 1, y, y + MOTH[1] - 1)))
    return made


def _click(x: float, y: float, n: int) -> dict:
    return {"result": [{"original_width": SIZE[0], "original_height": SIZE[1], "id": f"k{n}", "from_name": "tag",
                        "to_name": "image", "type": "keypointlabels", "is_positive": True,
                        "value": {"x": 100 * x / SIZE[0], "y": 100 * y / SIZE[1], "width": 0.6, "keypointlabels": ["Moth"]}}]}


def _box(answer: dict) -> tuple[int, int, int, int]:
    region = answer["results"][0]["result"][0]
    mask = decode_rle(region["value"]["rle"]).reshape(region["original_height"], region["original_width"], 4)[..., 3]
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def annotate(backend: Backend, images: list[tuple[Path, tuple[int, int, int, int]]]) -> dict:
    """Every annotator's clicks at once; (seconds, was it the image's first click) per click, and the errors."""
    clicks: list[tuple[float, bool]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def annotator(number: int) -> None:
        rng = random.Random(number)
        with requests.Session() as session:
            for index in range(number, len(images), ANNOTATORS):
                path, (x0, x1, y0, y1) = images[index]
                for n in range(CLICKS):
                    x, y = rng.uniform(x0 + 5, x1 - 5), rng.uniform(y0 + 5, y1 - 5)
                    body = {"tasks": [{"id": index + 1, "data": {"image": str(path)}}], "label_config": CONFIG,
                            "params": {"context": _click(x, y, n)}}
                    began = time.perf_counter()
                    answer = session.post(backend.url + "/predict", json=body, timeout=LABEL_STUDIO_WAIT_S)
                    seconds = time.perf_counter() - began
                    problem = "" if answer.ok else f"{answer.status_code} {answer.text[:200]}"
                    if not problem and _box(answer.json()) != (x0, x1, y0, y1):
                        problem = f"wrong region on {path.name}: {_box(answer.json())}"
                    with lock:
                        clicks.append((seconds, n == 0))
                        if problem:
                            errors.append(problem)
                    time.sleep(rng.uniform(*THINK_S))  # the annotator's own pace, not synchronisation

    threads = [threading.Thread(target=annotator, args=(n,)) for n in range(ANNOTATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"clicks": clicks, "errors": errors}


def _model_process_rss(backend: Backend) -> float:
    pid = requests.get(backend.url + "/health", timeout=5).json()["model_process"]["pid"]
    return rss_mib([pid])


def run(table: Table, workdir: Path) -> None:
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "examples.promptseg", registry], cwd=ROOT, env=base_env(), check=True,
                   capture_output=True)
    (workdir / "images").mkdir()
    images = scenes(workdir / "images")
    post = encode_hook(sam_post(from_name="mask", to_name="image"))
    configurations = {
        "embedded": {"embed_hook": encode_hook(promptseg.embed_hook), "pre_hook": encode_hook(promptseg.click_pre)},
        "recomputed": {"pre_hook": encode_hook(promptseg.recompute_pre)},
    }
    runs: dict[str, dict] = {}
    for name, hooks in configurations.items():
        (workdir / name).mkdir()
        backend = Backend(workdir / name, {"MLFLOW_TRACKING_URI": registry, "LOCAL_FILES_ROOTS": str(workdir / "images"),
                                           "THREADS": str(ANNOTATORS)}).start()
        try:
            body = {"model_uri": "models:/promptseg/1", "post_hook": post, **hooks}
            configured = requests.post(backend.url + "/configure", json=body, timeout=120)
            configured.raise_for_status()
            before = _model_process_rss(backend)
            runs[name] = annotate(backend, images)
            runs[name]["rss_mib"] = (before, _model_process_rss(backend))
        finally:
            backend.stop()
    ours, baseline = runs["embedded"], runs["recomputed"]
    later = [s for s, first in ours["clicks"] if not first]
    firsts = [s for s, first in ours["clicks"] if first]
    every = [s for s, _ in baseline["clicks"]]
    section = f"interactive ({ANNOTATORS} annotators, {IMAGES} images, {CLICKS} clicks each)"
    table.add(Row(section, "a click on an image already embedded: p50", percentile(later, 50), percentile(every, 50), "s",
                  "every click recomputes"))
    table.add(Row(section, "a click on an image already embedded: p95", percentile(later, 95), percentile(every, 95), "s",
                  "every click recomputes", target=">= 10x"))
    table.add(Row(section, "the first click on an image (it embeds it): p50", percentile(firsts, 50), percentile(every, 50),
                  "s", "every click recomputes"))
    table.add(Row(section, "model process memory after the run (the kept embeddings)", ours["rss_mib"][1],
                  baseline["rss_mib"][1], "MiB", "every click recomputes, after its run"))
    slowest = max(s for s, _ in ours["clicks"] + baseline["clicks"])
    table.add(Row(section, "slowest click of both runs", slowest, LABEL_STUDIO_WAIT_S, "s", "Label Studio's wait",
                  target="inside it"))
    table.notes.append(
        f"interactive: clicks {len(ours['clicks'])} embedded, {len(baseline['clicks'])} recomputed; errors "
        f"{len(ours['errors'])} and {len(baseline['errors'])} (each answer checked: the clicked moth's box){'; ' if ours['errors'] or baseline['errors'] else ''}"
        f"{'; '.join((ours['errors'] + baseline['errors'])[:3])}; model process RSS before/after: embedded "
        f"{ours['rss_mib'][0]:.0f} -> {ours['rss_mib'][1]:.0f} MiB, recomputed {baseline['rss_mib'][0]:.0f} -> "
        f"{baseline['rss_mib'][1]:.0f} MiB; an embedding is {SIZE[0]}x{SIZE[1]}x{3 + promptseg.CHANNELS} float32 "
        f"({SIZE[0] * SIZE[1] * (3 + promptseg.CHANNELS) * 4 / 2**20:.1f} MiB)"
    )
