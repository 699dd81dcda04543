"""What an annotator clicked, as a promptable model wants it, and its masks back as Label Studio regions.

Label Studio sends an interactive request's prompt in ``context["result"]``: the regions the annotator
just drew with a smart tool, in percent of the image as shown (keypoints with ``is_positive``,
rectangles, brush strokes), each with ``original_width`` and ``original_height``. ``context_points`` and
``context_boxes`` give them in pixels of the image the model sees; ``sam_post`` turns the masks, scores
(and, unused, logits) of a SAM-style predictor into the one region Label Studio draws for the click.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .outline import mask_outline
from .results import brush, polygon, prediction


@dataclass(frozen=True)
class Point:
    """A clicked point in pixels; ``positive`` False for a click that says "not this"."""

    x: float
    y: float
    positive: bool
    label: str


@dataclass(frozen=True)
class PromptBox:
    """A dragged box in pixels (corners), and its label."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str


def _regions(context: Any, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    results = context.get("result") if isinstance(context, dict) else None
    return [r for r in results or [] if isinstance(r, dict) and r.get("type") in kinds and isinstance(r.get("value"), dict)]


def _scale(region: dict[str, Any], size: Sequence[int] | None) -> tuple[float, float]:
    """Percent -> pixels of ``size`` (width, height) where given, else of the original image."""
    width, height = size if size else (region.get("original_width") or 0, region.get("original_height") or 0)
    if not width or not height:
        raise ValueError("the click has no image size: pass size=(width, height) of the image the model sees")
    return float(width) / 100.0, float(height) / 100.0


def _label(value: dict[str, Any]) -> str:
    for key, labels in value.items():
        if key.endswith("labels") and isinstance(labels, list) and labels:
            return str(labels[0])
    return ""


def context_points(context: Any, size: Sequence[int] | None = None) -> list[Point]:
    """The keypoints of the click (``KeyPointLabels`` with the smart tool), in pixels of ``size``."""
    points = []
    for region in _regions(context, ("keypointlabels", "keypoint")):
        sx, sy = _scale(region, size)
        value = region["value"]
        points.append(Point(float(value["x"]) * sx, float(value["y"]) * sy, region.get("is_positive", True) is not False,
                            _label(value)))
    return points


def context_boxes(context: Any, size: Sequence[int] | None = None) -> list[PromptBox]:
    """The rectangles of the click (``RectangleLabels`` with the smart tool), in pixels of ``size``."""
    boxes = []
    for region in _regions(context, ("rectanglelabels", "rectangle")):
        sx, sy = _scale(region, size)
        value = region["value"]
        x0, y0 = float(value["x"]) * sx, float(value["y"]) * sy
        boxes.append(PromptBox(x0, y0, x0 + float(value.get("width", 0)) * sx, y0 + float(value.get("height", 0)) * sy,
                               _label(value)))
    return boxes


def context_label(context: Any, default: str = "") -> str:
    """The label the annotator chose with the smart tool: the one the answer's region should carry."""
    for region in _regions(context, ("keypointlabels", "rectanglelabels", "brushlabels", "keypoint", "rectangle")):
        label = _label(region["value"])
        if label:
            return label
    return default


def sam_post(*, from_name: str, to_name: str, shape: str = "brush", label: str = ""):
    """A post hook for SAM-style outputs: per task ``{"masks": (n, h, w), "scores": (n,)}`` (``logits``
    ignored), or the (masks, scores[, logits]) tuple ``SamPredictor.predict`` returns. The best-scoring
    mask becomes one region for the click: a BrushLabels (``shape="brush"``) or PolygonLabels
    (``shape="polygon"``) result, labelled as the annotator's click (or ``label``)."""
    if shape not in ("brush", "polygon"):
        raise ValueError(f"shape must be 'brush' or 'polygon', got {shape!r}")

    def post(outputs: Any, context: Any = None) -> list[dict[str, Any]]:
        import numpy as np

        answers = []
        for output in outputs:
            masks, scores = (output["masks"], output["scores"]) if isinstance(output, dict) else (output[0], output[1])
            masks, scores = np.asarray(masks), np.asarray(scores, dtype=float).reshape(-1)
            if masks.ndim == 2:
                masks = masks[None]
            if masks.size == 0 or scores.size == 0:
                answers.append(prediction([]))
                continue
            best = int(np.argmax(scores))
            mask, score = masks[best] > (0.5 if masks.dtype.kind == "f" else 0), float(scores[best])
            if not mask.any():  # nothing found (or no click yet: the task just opened)
                answers.append(prediction([]))
                continue
            name = context_label(context, label)
            height, width = mask.shape
            region: dict[str, Any] | None
            if shape == "brush":
                region = brush(mask, name, from_name=from_name, to_name=to_name, score=score)
            else:
                outline = mask_outline(mask)
                region = polygon(outline, name, width=width, height=height, from_name=from_name, to_name=to_name,
                                 score=score) if len(outline) >= 3 else None
            answers.append(prediction([region] if region else [], score=score))
        return answers

    return post
