"""Training targets from Label Studio annotations: what a ``train_hook`` fits its model to.

A train hook gets, for each annotated task, that task's latest annotation as a list of Label Studio
results. These turn them into what models train on::

    from hooks import choice_labels

    def train_hook(texts, annotations, params=None):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, choice_labels(annotations))

Rectangles and polygons come back in pixels of the image (Label Studio stores percent), text spans as
character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

Results = Sequence[dict[str, Any]]


class Box(NamedTuple):
    """A rectangle in pixels, corners (x0, y0) top left and (x1, y1) bottom right."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str


class Polygon(NamedTuple):
    points: list[tuple[float, float]]  # in pixels
    label: str


class Span(NamedTuple):
    start: int
    end: int
    label: str
    text: str


def _of_type(results: Results, types: tuple[str, ...], from_name: str | None) -> list[dict[str, Any]]:
    return [
        r for r in results or ()
        if isinstance(r, dict) and r.get("type") in types and (from_name is None or r.get("from_name") == from_name)
    ]


def _label(value: dict[str, Any]) -> str:
    for key, labels in value.items():
        if key.endswith("labels") and isinstance(labels, list) and labels:
            return str(labels[0])
    return ""


def choice_labels(annotations: Sequence[Results], from_name: str | None = None, default: Any = None) -> list[Any]:
    """Each example's first chosen label (``default`` where it chose none): targets for a classifier."""
    labels = []
    for results in annotations:
        chosen = [c for r in _of_type(results, ("choices",), from_name) for c in (r.get("value") or {}).get("choices", ())]
        labels.append(chosen[0] if chosen else default)
    return labels


def multi_choice_labels(annotations: Sequence[Results], from_name: str | None = None) -> list[list[str]]:
    """Each example's chosen labels, all of them: targets for a multi-label classifier."""
    return [
        [c for r in _of_type(results, ("choices",), from_name) for c in (r.get("value") or {}).get("choices", ())]
        for results in annotations
    ]


def _size(result: dict[str, Any], size: tuple[int, int] | None) -> tuple[float, float]:
    """The image's size: given, or as Label Studio wrote it on the result."""
    if size is not None:
        return float(size[0]), float(size[1])
    width, height = result.get("original_width"), result.get("original_height")
    if not width or not height:
        raise ValueError("the result has no original_width/original_height: pass the image's size (hooks.image_size(path))")
    return float(width), float(height)


def boxes(results: Results, size: tuple[int, int] | None = None, from_name: str | None = None) -> list[Box]:
    """One example's rectangles in pixels of its image (``size``: (width, height), by default what the result says)."""
    found = []
    for r in _of_type(results, ("rectanglelabels", "rectangle"), from_name):
        value = r.get("value") or {}
        width, height = _size(r, size)
        x0, y0 = value["x"] * width / 100, value["y"] * height / 100
        found.append(Box(x0, y0, x0 + value["width"] * width / 100, y0 + value["height"] * height / 100, _label(value)))
    return found


def polygons(results: Results, size: tuple[int, int] | None = None, from_name: str | None = None) -> list[Polygon]:
    """One example's polygons, their points in pixels of its image."""
    found = []
    for r in _of_type(results, ("polygonlabels", "polygon"), from_name):
        value = r.get("value") or {}
        width, height = _size(r, size)
        found.append(Polygon([(x * width / 100, y * height / 100) for x, y in value.get("points", ())], _label(value)))
    return found


def spans(results: Results, from_name: str | None = None) -> list[Span]:
    """One example's labelled text spans (named entities), as character offsets."""
    return [
        Span(int(v["start"]), int(v["end"]), _label(v), str(v.get("text", "")))
        for v in ((r.get("value") or {}) for r in _of_type(results, ("labels",), from_name))
        if "start" in v and "end" in v
    ]
