"""Label Studio result dicts, built right: percent coordinates of the real image, unique ids, scores.

Every builder takes the control's names (``from_name``, ``to_name``) and returns one result dict
(``rectangle`` and friends take the image's real ``width`` and ``height`` in pixels). ``prediction``
wraps one task's results with a score and, optionally, a model version.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base(
    from_name: str, to_name: str, kind: str, value: dict[str, Any], score: float | None, rid: str | None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": rid or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "value": value,
    }
    if score is not None:
        result["score"] = float(score)
    return result


def _image_sized(result: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    result["original_width"], result["original_height"], result["image_rotation"] = int(width), int(height), 0
    return result


def _scale(width: int, height: int, normalized: bool) -> tuple[float, float]:
    """Multipliers from pixel (or 0..1) coordinates to Label Studio's percentages."""
    return (100.0, 100.0) if normalized else (100.0 / width, 100.0 / height)


def _clip(value: float) -> float:
    return min(100.0, max(0.0, float(value)))


def choices(
    labels: str | Sequence[str], *, from_name: str, to_name: str, score: float | None = None, rid: str | None = None
) -> dict[str, Any]:
    """A Choices result: one label, or several for a multi-choice control."""
    chosen = [labels] if isinstance(labels, str) else [str(label) for label in labels]
    return _base(from_name, to_name, "choices", {"choices": chosen}, score, rid)


def rectangle(
    box: Sequence[float],
    label: str,
    *,
    width: int,
    height: int,
    from_name: str,
    to_name: str,
    box_format: str = "xyxy",
    normalized: bool = False,
    rotation: float = 0.0,
    score: float | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    """A RectangleLabels result from a pixel (or, with ``normalized``, 0..1) box in xyxy, xywh or cxcywh."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    a, b, c, d = (float(v) for v in box)
    if box_format == "xyxy":
        x, y, w, h = a, b, c - a, d - b
    elif box_format == "xywh":
        x, y, w, h = a, b, c, d
    else:
        x, y, w, h = a - c / 2, b - d / 2, c, d
    sx, sy = _scale(width, height, normalized)
    value = {
        "x": _clip(x * sx),
        "y": _clip(y * sy),
        "width": _clip(w * sx),
        "height": _clip(h * sy),
        "rotation": float(rotation),
        "rectanglelabels": [label],
    }
    return _image_sized(_base(from_name, to_name, "rectanglelabels", value, score, rid), width, height)


def polygon(
    points: Iterable[Sequence[float]],
    label: str,
    *,
    width: int,
    height: int,
    from_name: str,
    to_name: str,
    normalized: bool = False,
    score: float | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    """A PolygonLabels result from pixel (or 0..1) points."""
    sx, sy = _scale(width, height, normalized)
    value = {"points": [[_clip(float(x) * sx), _clip(float(y) * sy)] for x, y in points], "polygonlabels": [label]}
    return _image_sized(_base(from_name, to_name, "polygonlabels", value, score, rid), width, height)


def brush(
    mask: Any, label: str, *, from_name: str, to_name: str, score: float | None = None, rid: str | None = None
) -> dict[str, Any]:
    """A BrushLabels result from a binary mask (height x width), RLE-encoded by label-studio-sdk's converter."""
    import numpy as np
    from label_studio_sdk.converter.brush import mask2rle

    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D (height, width), got shape {array.shape}")
    binary = (array > 0.5 if array.dtype.kind == "f" else array > 0).astype(np.uint8) * 255
    height, width = binary.shape
    value = {"format": "rle", "rle": mask2rle(binary), "brushlabels": [label]}
    return _image_sized(_base(from_name, to_name, "brushlabels", value, score, rid), width, height)


def keypoint(
    x: float,
    y: float,
    label: str,
    *,
    width: int,
    height: int,
    from_name: str,
    to_name: str,
    normalized: bool = False,
    size: float = 0.5,
    score: float | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    """A KeyPointLabels result at a pixel (or 0..1) point; ``size`` is the drawn point's width in percent."""
    sx, sy = _scale(width, height, normalized)
    value = {"x": _clip(x * sx), "y": _clip(y * sy), "width": float(size), "keypointlabels": [label]}
    return _image_sized(_base(from_name, to_name, "keypointlabels", value, score, rid), width, height)


def span(
    start: int,
    end: int,
    label: str,
    *,
    text: str,
    from_name: str,
    to_name: str,
    score: float | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    """A Labels result on text: characters ``start`` to ``end`` (exclusive) of ``text``."""
    value = {"start": int(start), "end": int(end), "text": text[start:end], "labels": [label]}
    return _base(from_name, to_name, "labels", value, score, rid)


def textarea(
    text: str | Sequence[str],
    *,
    from_name: str,
    to_name: str,
    score: float | None = None,
    rid: str | None = None,
    region: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A TextArea result: for the whole item (speech), or for a ``region`` (OCR), sharing its id and geometry."""
    lines = [text] if isinstance(text, str) else [str(t) for t in text]
    value: dict[str, Any] = {"text": lines}
    if region is not None:
        geometry = {k: v for k, v in region["value"].items() if not k.endswith("labels")}
        value = {**geometry, **value}
        result = _base(from_name, to_name, "textarea", value, score, region["id"])
        for key in ("original_width", "original_height", "image_rotation"):
            if key in region:
                result[key] = region[key]
        return result
    return _base(from_name, to_name, "textarea", value, score, rid)


def number(value: float, *, from_name: str, to_name: str, score: float | None = None) -> dict[str, Any]:
    return _base(from_name, to_name, "number", {"number": value}, score, None)


def rating(value: int, *, from_name: str, to_name: str, score: float | None = None) -> dict[str, Any]:
    return _base(from_name, to_name, "rating", {"rating": int(value)}, score, None)


CERTAINTY = ("max", "margin", "entropy")


def certainty(probabilities: Iterable[float], method: str = "margin") -> float:
    """How sure the model is of a task, from its class probabilities, in [0, 1] (low: label this first).

    ``"max"``: the top probability. ``"margin"``: the top one minus the second. ``"entropy"``: one minus
    the distribution's entropy over its largest, log(number of classes). Probabilities that sum to less
    than 1 (the top few of many, or only the winner's) leave the rest to one class more; ones that sum to
    more (independent sigmoids) are scaled to 1."""
    if method not in CERTAINTY:
        raise ValueError(f"certainty is one of {', '.join(CERTAINTY)}, not {method!r}")
    values = [float(p) for p in probabilities]
    if not values or not all(0.0 <= p <= 1.0 for p in values):  # also refuses NaN
        raise ValueError(f"class probabilities must be numbers in [0, 1] (softmax the logits first); got {values[:8]}")
    total = sum(values)
    if total < 1.0 - 1e-6:
        values.append(1.0 - total)
    elif total > 1.0 + 1e-6:
        values = [p / total for p in values]
    ranked = sorted(values, reverse=True)
    if method == "max":
        return ranked[0]
    if method == "margin":
        return ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)
    if len(ranked) < 2:
        return 1.0
    entropy = -sum(p * math.log(p) for p in ranked if p > 0)
    return max(0.0, 1.0 - entropy / math.log(len(ranked)))


def prediction(
    results: list[dict[str, Any]],
    *,
    score: str | float = "mean",
    model_version: str | None = None,
    probabilities: Iterable[float] | None = None,
) -> dict[str, Any]:
    """One task's prediction: its results, a score and, optionally, a version.

    The score Label Studio sorts tasks by: with the model's class ``probabilities``, how sure it is
    (``"max"``, ``"margin"`` or ``"entropy"``: ``certainty``); without, the ``"mean"``, ``"min"`` or
    ``"max"`` of the results' own scores (a detector's regions); or a number."""
    if probabilities is not None and score in CERTAINTY:
        combined: float | None = certainty(probabilities, str(score))
    elif isinstance(score, str):
        if score in CERTAINTY and score != "max":
            raise ValueError(f"score={score!r} is computed from the class probabilities: pass probabilities=..., "
                             "this task's row of the model's output")
        if score not in ("mean", "min", "max"):
            raise ValueError(f"score is 'mean', 'min', 'max' (of the results' scores), 'margin' or 'entropy' (with "
                             f"probabilities=...), or a number; got {score!r}")
        scores = [r["score"] for r in results if isinstance(r.get("score"), (int, float))]
        combine: dict[str, Callable[[list[float]], float]] = {"mean": lambda s: sum(s) / len(s), "min": min, "max": max}
        combined = combine[score](scores) if scores else None
    else:
        combined = float(score)
    out: dict[str, Any] = {"result": results}
    if combined is not None and math.isfinite(combined):  # unknown stays unknown: Label Studio sorts by it
        out["score"] = float(combined)
    if model_version:
        out["model_version"] = model_version
    return out
