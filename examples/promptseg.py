"""A promptable segmenter that needs no weights: the shape of Segment Anything, small enough for a test.

One MLflow pyfunc with two stages, chosen by ``params={"stage": ...}``:

- ``"embed"``: images (H x W x 3 uint8 arrays) -> one embedding each: the image smoothed by a stack of
  fixed 3 x 3 convolutions (the costly part, like SAM's image encoder) with its colour kept;
- ``"decode"`` (the default): ``{"embedding", "points": [(x, y, positive)], "boxes": [(x0, y0, x1, y1)]}``
  -> ``{"masks": (1, H, W), "scores": (1,)}``: the region around the positive clicks whose colour is close
  to theirs, grown from them, less what the negative clicks' colour is closer to (cheap, like SAM's
  mask decoder).

``python -m examples.promptseg <tracking_uri>`` registers it as ``promptseg``; ``hooks`` below are the
hooks that serve it (an embed_hook, a pre hook that reads the click, and ``hooks.sam_post``).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

MODEL_NAME = "promptseg"
ENCODER_LAYERS = 20
CHANNELS = 16
COLOUR_DISTANCE = 60.0  # a pixel within this distance (0..441) of the clicked colour belongs to the region


def _conv3x3(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(H, W, C_in) * (3, 3, C_in, C_out) -> (H, W, C_out), zero-padded."""
    height, width, _ = features.shape
    padded = np.pad(features, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((height, width, weights.shape[3]), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy:dy + height, dx:dx + width] @ weights[dy, dx]
    return out


def encode(image: np.ndarray) -> np.ndarray:
    """The embedding: the colour, beside the features of a stack of fixed convolutions (their cost is the point)."""
    rng = np.random.default_rng(0)
    colour = np.asarray(image, dtype=np.float32)[..., :3]
    features = colour / 255.0
    for _ in range(ENCODER_LAYERS):
        weights = rng.normal(0, 0.3, (3, 3, features.shape[2], CHANNELS)).astype(np.float32)
        features = np.maximum(_conv3x3(features, weights), 0)
    return np.concatenate([colour, features], axis=2)


def decode(embedding: np.ndarray, points: list, boxes: list) -> dict[str, Any]:
    """The region of the clicked colour that holds the positive clicks (inside the box, where one is given)."""
    from scipy import ndimage

    colour = embedding[..., :3]
    height, width = colour.shape[:2]
    positives = [(int(x), int(y)) for x, y, positive in points if positive]
    negatives = [(int(x), int(y)) for x, y, positive in points if not positive]
    if not positives and boxes:
        x0, y0, x1, y1 = boxes[0]
        positives = [(int((x0 + x1) / 2), int((y0 + y1) / 2))]
    mask = np.zeros((height, width), dtype=bool)
    score = 0.0
    for x, y in positives:
        x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
        near = np.linalg.norm(colour - colour[y, x], axis=2) < COLOUR_DISTANCE
        for nx, ny in negatives:
            nx, ny = min(max(nx, 0), width - 1), min(max(ny, 0), height - 1)
            near &= np.linalg.norm(colour - colour[y, x], axis=2) < np.linalg.norm(colour - colour[ny, nx], axis=2)
        labelled, _ = ndimage.label(near)
        if labelled[y, x]:
            mask |= labelled == labelled[y, x]
    if boxes:
        x0, y0, x1, y1 = (round(float(v)) for v in boxes[0])
        inside = np.zeros_like(mask)
        inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
        mask &= inside
    if mask.any():
        score = float(min(1.0, 0.5 + mask.mean()))
    return {"masks": mask[None], "scores": np.array([score])}


class PromptSegmenter:
    """The pyfunc: ``predict(inputs, params={"stage": "embed" | "decode"})``."""

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a signature
        stage = (params or {}).get("stage", "decode")
        if stage == "embed":
            return [encode(image) for image in model_input]
        return [decode(item["embedding"], item.get("points", []), item.get("boxes", [])) for item in model_input]


def python_model():
    """The segmenter as an ``mlflow.pyfunc.PythonModel`` (made here, so importing this module needs no MLflow)."""
    import mlflow.pyfunc

    return type("PromptSegmenterModel", (PromptSegmenter, mlflow.pyfunc.PythonModel), {})()


def register(tracking_uri: str) -> None:
    import cloudpickle
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the model needs no copy of this module
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fixtures")
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("stage", "string", "decode")]))
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="promptseg", python_model=python_model(), registered_model_name=MODEL_NAME,
                                signature=signature, pip_requirements=["numpy", "scipy"])


# -- the hooks that serve it ---------------------------------------------------------------------------


def embed_hook(paths: list[str], model: Any) -> list:
    """Each image's embedding, from the model's own encoder (its "embed" stage)."""
    from PIL import Image

    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    return model.predict(images, params={"stage": "embed"})


def click_pre(paths: list[str], state: list, context: Any = None) -> list[dict[str, Any]]:
    """The click, in pixels of the embedded image, beside the embedding."""
    from hooks import context_boxes, context_points

    inputs = []
    for embedding in state:
        size = (embedding.shape[1], embedding.shape[0])
        points = [(p.x, p.y, p.positive) for p in context_points(context, size)]
        boxes = [(b.x0, b.y0, b.x1, b.y1) for b in context_boxes(context, size)]
        inputs.append({"embedding": embedding, "points": points, "boxes": boxes})
    return inputs


def recompute_pre(paths: list[str], context: Any = None) -> list[dict[str, Any]]:
    """The same input without the embed_hook: the image encoded again at every click (the baseline)."""
    from PIL import Image

    state = [encode(np.asarray(Image.open(path).convert("RGB"))) for path in paths]
    return click_pre(paths, state, context)


if __name__ == "__main__":
    register(sys.argv[1])
