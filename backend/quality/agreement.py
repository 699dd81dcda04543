"""How much of a prediction an annotator kept: the number that says whether a model version saves work.

Per control (``from_name``) of one task:

- choices and taxonomies: kept when the annotator chose the same set of labels (1 or 0);
- regions (rectangles, polygons, ellipses, key points, text and time spans): a predicted region is kept
  when an annotated one with the same label overlaps it at IoU >= ``IOU_MATCH`` (polygons and key
  points by their bounding boxes, spans by their offsets), matched greedily, best overlap first; this
  gives the precision (kept / predicted) and recall (kept / annotated) of the regions;
- anything else (text areas, numbers, ratings): kept when the values are equal.

A task's score is the mean over its controls (regions scored by F1, and 1 when neither side has any),
and a version's agreement is the mean over the tasks compared. Pure Python, no Label Studio needed:
the gate of a training (``training.job``) and ``/webhook`` (``quality``) both use it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

IOU_MATCH = 0.5
CHOICE_TYPES = frozenset({"choices", "taxonomy"})
REGION_TYPES = frozenset({
    "rectanglelabels", "rectangle", "polygonlabels", "polygon", "ellipselabels", "ellipse",
    "keypointlabels", "keypoint", "labels", "hypertextlabels", "paragraphlabels", "timeserieslabels",
})
IGNORED_TYPES = frozenset({"relation"})


@dataclass
class Agreement:
    """Counts for one task or summed over many; ``add`` sums them."""

    tasks: int = 0
    score_sum: float = 0.0
    choices: int = 0
    choices_kept: int = 0
    regions_predicted: int = 0
    regions_annotated: int = 0
    regions_kept: int = 0
    values: int = 0
    values_kept: int = 0

    def add(self, other: Agreement) -> Agreement:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    @property
    def score(self) -> float | None:
        return self.score_sum / self.tasks if self.tasks else None

    def summary(self) -> dict[str, Any]:
        """The figures shown on /health and logged to MLflow (None where nothing was compared)."""

        def rate(kept: int, of: int) -> float | None:
            return round(kept / of, 4) if of else None

        return {
            "tasks": self.tasks,
            "agreement": round(self.score, 4) if self.score is not None else None,
            "choices_kept": rate(self.choices_kept, self.choices),
            "region_precision": rate(self.regions_kept, self.regions_predicted),
            "region_recall": rate(self.regions_kept, self.regions_annotated),
            "values_kept": rate(self.values_kept, self.values),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Agreement:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def compare(predicted: Iterable[Any], annotated: Iterable[Any]) -> Agreement:
    """One task: a prediction's ``result`` list against an annotation's ``result`` list."""
    mine, theirs = _by_control(predicted), _by_control(annotated)
    found = Agreement(tasks=1)
    scores: list[float] = []
    for control in sorted(set(mine) | set(theirs)):
        kind = (mine.get(control) or theirs.get(control) or [{}])[0].get("type", "").lower()
        p, a = mine.get(control, []), theirs.get(control, [])
        if kind in CHOICE_TYPES:
            kept = _choice_set(p) == _choice_set(a)
            found.choices += 1
            found.choices_kept += kept
            scores.append(float(kept))
        elif kind in REGION_TYPES:
            kept_regions = _matched_regions(p, a)
            found.regions_predicted += len(p)
            found.regions_annotated += len(a)
            found.regions_kept += kept_regions
            scores.append(1.0 if not p and not a else 2 * kept_regions / (len(p) + len(a)))
        else:
            kept = [r.get("value") for r in p] == [r.get("value") for r in a]
            found.values += 1
            found.values_kept += kept
            scores.append(float(kept))
    found.score_sum = sum(scores) / len(scores) if scores else 1.0
    return found


def _by_control(results: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for region in results or ():
        if isinstance(region, dict) and str(region.get("type", "")).lower() not in IGNORED_TYPES:
            grouped[str(region.get("from_name", ""))].append(region)
    return grouped


def _value(region: dict[str, Any]) -> dict[str, Any]:
    value = region.get("value")
    return value if isinstance(value, dict) else {}


def _choice_set(regions: list[dict[str, Any]]) -> frozenset[str]:
    chosen: set[str] = set()
    for region in regions:
        value = _value(region)
        for item in value.get("choices") or value.get("taxonomy") or ():
            chosen.add("/".join(map(str, item)) if isinstance(item, list) else str(item))
    return frozenset(chosen)


def region_label(region: dict[str, Any]) -> str:
    """The region's label (first of its labels), whichever key its type keeps it under."""
    value = _value(region)
    for key, labels in value.items():
        if key.endswith("labels") and isinstance(labels, list) and labels:
            return str(labels[0])
    return ""


def _extent(region: dict[str, Any]) -> tuple[float, ...] | None:
    """A box (x0, y0, x1, y1) in percent, or a span (start, end); None when the region has neither."""
    value = _value(region)
    try:
        if "points" in value:
            xs = [float(p[0]) for p in value["points"]]
            ys = [float(p[1]) for p in value["points"]]
            return (min(xs), min(ys), max(xs), max(ys))
        if "radiusX" in value:
            x, y, rx, ry = (float(value[k]) for k in ("x", "y", "radiusX", "radiusY"))
            return (x - rx, y - ry, x + rx, y + ry)
        if "x" in value and "y" in value:
            x, y = float(value["x"]), float(value["y"])
            w, h = float(value.get("width", 0) or 0), float(value.get("height", 0) or 0)
            if not w and not h:  # a key point: a small box around it
                return (x - 1, y - 1, x + 1, y + 1)
            return (x, y, x + w, y + h)
        if "start" in value and "end" in value:
            start, end = value["start"], value["end"]
            if isinstance(start, (int, float)) and isinstance(end, (int, float)):
                return (float(start), float(end))
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    return None


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two boxes (4 numbers) or two spans (2 numbers)."""
    if len(a) != len(b):
        return 0.0
    if len(a) == 2:
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    else:
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _matched_regions(predicted: list[dict[str, Any]], annotated: list[dict[str, Any]]) -> int:
    """How many predicted regions an annotated one of the same label overlaps at IoU >= IOU_MATCH, each used once."""
    pairs = []
    for i, p in enumerate(predicted):
        pe = _extent(p)
        for j, a in enumerate(annotated):
            ae = _extent(a)
            if pe is None or ae is None or region_label(p) != region_label(a):
                continue
            overlap = iou(pe, ae)
            if overlap >= IOU_MATCH:
                pairs.append((overlap, i, j))
    used_p: set[int] = set()
    used_a: set[int] = set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_a:
            used_p.add(i)
            used_a.add(j)
    return len(used_p)
