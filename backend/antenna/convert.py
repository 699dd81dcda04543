"""A post hook's answer for one image (or crop) as Antenna's detections, each with its classifications.

Label Studio's regions (percent of the image) become boxes in pixels of the real image: a rotated
rectangle, a polygon or an ellipse by the box that encloses it. Each region's labels become a
classification by the control's classifier, with a ``scores`` vector over the whole category map:
the hook's own distribution where a result carries one (``"scores": {"Moth": 0.8, ...}`` or a list in
the control's order), else the result's score at the label's place and 0 elsewhere. Choices that
are not tied to a region classify the whole image (or the crop Antenna sent). A hook may instead
return Antenna's shape, ``{"detections": [...]}``; it is checked against the declared algorithms.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backend.antenna.wire import BoundingBox, ExistingDetection, SourceImage, parse_bbox
from backend.config.antenna_pipeline import Algorithm, PipelineDefinition
from backend.core.errors import PredictionsInvalid

MIN_SCORE = 1e-9  # a chosen label scored 0 must still be the argmax Antenna takes as the label


@dataclass(frozen=True)
class Unit:
    """One task the hooks see: a whole image, or the crop of a detection Antenna sent."""

    image: SourceImage
    path: str
    size: tuple[int, int]  # (width, height) in pixels of what the hooks saw
    detection: ExistingDetection | None = None
    crop_box: BoundingBox | None = None  # where the crop lies in the source image


@dataclass(frozen=True)
class Stamp:
    """What every detection and classification of one answer carries."""

    timestamp: str
    inference_time: float | None


def _invalid(unit: Unit, problem: str, fix: str) -> PredictionsInvalid:
    return PredictionsInvalid(f"the post_hook's answer for image {unit.image.id!r} {problem}", fix)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def scores_vector(classifier: Algorithm, label: str, given: Any, score: Any, unit: Unit) -> list[float]:
    """The classifier's scores in category-map order: the hook's distribution, or ``score`` at ``label``."""
    labels = classifier.labels
    if given is not None:
        if isinstance(given, dict):
            unknown = sorted(str(k) for k in given if k not in labels)
            if unknown:
                raise _invalid(unit, f"scores labels {unknown} that {classifier.control!r} does not have",
                               f"Score only its labels: {', '.join(labels)}.")
            vector = [given.get(name, 0.0) for name in labels]
        elif isinstance(given, (list, tuple)) and len(given) == len(labels):
            vector = list(given)
        else:
            raise _invalid(unit, f"has 'scores' that are not {len(labels)} numbers in {classifier.control!r}'s label order",
                           "Give 'scores' as {label: probability} or as a list aligned with the control's labels.")
        if not all(_number(v) for v in vector):
            raise _invalid(unit, "has a score that is not a finite number", "Return finite probabilities.")
        vector = [float(v) for v in vector]
        if vector[labels.index(label)] < max(vector):
            best = labels[vector.index(max(vector))]
            raise _invalid(unit, f"chooses {label!r} while its scores rank {best!r} first",
                           "Choose the label the scores rank highest: Antenna takes that one's place in the map.")
        return vector
    value = float(score) if _number(score) else 1.0
    vector = [0.0] * len(labels)
    vector[labels.index(label)] = max(value, MIN_SCORE)
    return vector


def classification(classifier: Algorithm, label: str, vector: list[float], stamp: Stamp, terminal: bool = True,
                   logits: Sequence[float] = ()) -> dict[str, Any]:
    """``ClassificationResponse``."""
    return {
        "classification": label,
        "labels": list(classifier.labels),
        "scores": vector,
        "logits": [float(v) for v in logits],
        "inference_time": stamp.inference_time,
        "algorithm": classifier.ref,
        "terminal": terminal,
        "timestamp": stamp.timestamp,
    }


def detection(unit: Unit, box: BoundingBox, algorithm: dict[str, str], stamp: Stamp,
              crop_image_url: str | None = None) -> dict[str, Any]:
    """``DetectionResponse``, its classifications still to come."""
    return {
        "source_image_id": unit.image.id,
        "bbox": box.as_dict(),
        "inference_time": stamp.inference_time,
        "algorithm": algorithm,
        "timestamp": stamp.timestamp,
        "crop_image_url": crop_image_url,
        "classifications": [],
    }


def whole(unit: Unit, pipeline: PipelineDefinition, stamp: Stamp) -> dict[str, Any]:
    """The detection whole-image classifications attach to: the crop Antenna sent, or the image's frame."""
    if unit.detection is not None and unit.crop_box is not None:
        return detection(unit, unit.crop_box, unit.detection.algorithm, stamp, unit.detection.crop_image_url)
    width, height = unit.size
    return detection(unit, BoundingBox(0.0, 0.0, float(width), float(height)), pipeline.detector.ref, stamp)


# -- Label Studio's results -----------------------------------------------------------------------


def region_box(result: dict[str, Any], size: tuple[int, int]) -> BoundingBox:
    """The pixel box enclosing a rectangle, polygon or ellipse result (percent of the image)."""
    width, height = size
    value = result.get("value") or {}
    kind = str(result.get("type", "")).lower()
    sx, sy = width / 100.0, height / 100.0
    angle = math.radians(float(value.get("rotation") or 0.0))
    cos, sin = math.cos(angle), math.sin(angle)
    if kind.startswith("polygon"):
        points = [(float(x) * sx, float(y) * sy) for x, y in value.get("points") or ()]
        xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
        return BoundingBox(min(xs), min(ys), max(xs), max(ys)).clipped(width, height)
    if kind.startswith("ellipse"):
        cx, cy = float(value["x"]) * sx, float(value["y"]) * sy
        rx, ry = float(value["radiusX"]) * sx, float(value["radiusY"]) * sy
        half_w, half_h = math.hypot(rx * cos, ry * sin), math.hypot(rx * sin, ry * cos)
        return BoundingBox(cx - half_w, cy - half_h, cx + half_w, cy + half_h).clipped(width, height)
    x, y = float(value["x"]) * sx, float(value["y"]) * sy  # a rectangle turns about its top left corner
    w, h = float(value["width"]) * sx, float(value["height"]) * sy
    corners = [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return BoundingBox(min(xs), min(ys), max(xs), max(ys)).clipped(width, height)


def _chosen(result: dict[str, Any]) -> list[str]:
    value = result.get("value") or {}
    for key in (str(result.get("type", "")).lower(), "choices"):
        chosen = value.get(key)
        if isinstance(chosen, list):
            return [str(c) for c in chosen]
    return []


def from_label_studio(prediction: dict[str, Any], unit: Unit, pipeline: PipelineDefinition, stamp: Stamp) -> list[dict[str, Any]]:
    """A completed, validated Label Studio prediction as detections."""
    results = [r for r in prediction.get("result") or () if isinstance(r, dict)]
    default_score = prediction.get("score")
    regions: dict[Any, dict[str, Any]] = {}
    for result in results:
        if result.get("from_name") not in pipeline.region_controls or unit.detection is not None:
            continue
        region = regions.get(result.get("id"))
        if region is None:
            region = regions[result.get("id") or len(regions)] = detection(
                unit, region_box(result, unit.size), pipeline.detector.ref, stamp)
        _classify(region, result, pipeline, unit, stamp, default_score)
    frame = None
    for result in results:
        if str(result.get("type", "")).lower() != "choices" or pipeline.classifier_for(result.get("from_name", "")) is None:
            continue
        target = regions.get(result.get("id"))
        if target is None:
            frame = frame or whole(unit, pipeline, stamp)
            target = frame
        _classify(target, result, pipeline, unit, stamp, default_score)
    return list(regions.values()) + ([frame] if frame else [])


def _classify(target: dict[str, Any], result: dict[str, Any], pipeline: PipelineDefinition, unit: Unit, stamp: Stamp,
              default_score: Any) -> None:
    classifier = pipeline.classifier_for(result.get("from_name", ""))
    if classifier is None:
        return
    score = result.get("score", default_score)
    for label in _chosen(result):
        vector = scores_vector(classifier, label, result.get("scores"), score, unit)
        target["classifications"].append(classification(classifier, label, vector, stamp))


# -- Antenna's own shape -------------------------------------------------------------------------


def from_antenna(output: dict[str, Any], unit: Unit, pipeline: PipelineDefinition, stamp: Stamp) -> list[dict[str, Any]]:
    """``{"detections": [{"bbox", "classifications": [{"classification", "scores"}...]}...]}`` checked and
    completed: ids, timestamps, algorithms (the pipeline's where one is unambiguous), full score vectors."""
    items = output.get("detections")
    if not isinstance(items, list):
        raise _invalid(unit, "has 'detections' that are not a list", "Return {'detections': [...]} per image.")
    declared = {a.key: a for a in pipeline.algorithms}
    found = []
    for item in items:
        if not isinstance(item, dict):
            raise _invalid(unit, f"has a detection that is a {type(item).__name__}", "Each detection is an object.")
        if unit.detection is not None and item.get("bbox") is None:
            target = whole(unit, pipeline, stamp)
        else:
            box = item.get("bbox")
            if isinstance(box, (list, tuple)) and len(box) == 4:
                box = dict(zip(("x1", "y1", "x2", "y2"), box))
            target = detection(unit, parse_bbox(box, f"image {unit.image.id!r}: bbox"), pipeline.detector.ref, stamp,
                               item.get("crop_image_url") if isinstance(item.get("crop_image_url"), str) else None)
            if item.get("algorithm") is not None:
                target["algorithm"] = _declared(item["algorithm"], declared, unit, detection=True).ref
        for entry in item.get("classifications") or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("classification"), str):
                raise _invalid(unit, "has a classification without a 'classification' label", "Name the label.")
            if entry.get("algorithm") is not None:
                classifier = _declared(entry["algorithm"], declared, unit, detection=False)
            elif len(pipeline.classifiers) == 1:
                classifier = pipeline.classifiers[0]
            else:
                raise _invalid(unit, "has a classification without an 'algorithm'",
                               f"Name one of {', '.join(a.key for a in pipeline.classifiers)}.")
            label = entry["classification"]
            if label not in classifier.labels:
                raise _invalid(unit, f"classifies as {label!r}, which {classifier.key!r} does not have",
                               f"Use one of its labels: {', '.join(classifier.labels)}.")
            vector = scores_vector(classifier, label, entry.get("scores"), entry.get("score"), unit)
            logits = entry.get("logits") or ()
            if not isinstance(logits, (list, tuple)) or not all(_number(v) for v in logits):
                raise _invalid(unit, "has 'logits' that are not a list of finite numbers", "Return them as a list, or leave them out.")
            target["classifications"].append(
                classification(classifier, label, vector, stamp, bool(entry.get("terminal", True)), logits))
        found.append(target)
    return found


def _declared(reference: Any, declared: dict[str, Algorithm], unit: Unit, detection: bool) -> Algorithm:
    key = reference.get("key") if isinstance(reference, dict) else reference
    algorithm = declared.get(key) if isinstance(key, str) else None
    wanted = "detection" if detection else "classification"
    if algorithm is None or (algorithm.task_type == "detection") != detection:
        keys = [k for k, a in declared.items() if (a.task_type == "detection") == detection]
        raise _invalid(unit, f"names {wanted} algorithm {key!r}, which /info does not declare",
                       f"Antenna refuses results by undeclared algorithms: use one of {', '.join(keys)}.")
    return algorithm
