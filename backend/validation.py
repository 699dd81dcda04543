"""Predictions checked against the project's labeling config before they leave, with label-studio-sdk.

Label Studio drops or mis-renders predictions that do not fit the config, silently. Here each one
is completed with what users forget (``model_version``, region ``id``s, a ``score``) and validated;
a mismatch names the task, the region and the fix.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from .errors import BadRequest, PredictionsInvalid

# Object tags whose data Label Studio shows inline: their task value is passed to hooks as text.
TEXT_OBJECTS = frozenset({"text", "hypertext", "paragraphs", "table", "list", "ranker"})


@dataclass(frozen=True)
class DataObject:
    """One object tag of the config: which task data key it reads, and whether that is text or a file."""

    name: str
    key: str
    tag: str

    @property
    def is_text(self) -> bool:
        return self.tag.lower() in TEXT_OBJECTS


@functools.lru_cache(maxsize=64)
def parse_label_config(config: str) -> LabelInterface:
    """Parsed once per distinct config: Label Studio sends the same config with every request."""
    try:
        return LabelInterface(config)
    except Exception as exc:
        raise BadRequest("the labeling config cannot be parsed", f"{type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=64)
def data_objects(config: str) -> tuple[DataObject, ...]:
    """The config's object tags that read task data (``value="$image"``), in config order."""
    interface = parse_label_config(config)
    found = []
    for obj in interface.objects:
        value = getattr(obj, "value", "") or ""
        if value.startswith("$"):
            found.append(DataObject(name=obj.name, key=value[1:], tag=obj.tag))
    return tuple(found)


def complete_prediction(prediction: Any, model_version: str, task_ref: str) -> dict[str, Any]:
    """Accept a dict with ``result`` or a bare list of results; fill version, ids and score."""
    if isinstance(prediction, list):
        prediction = {"result": prediction}
    if not isinstance(prediction, dict):
        raise PredictionsInvalid(
            f"post_hook returned a {type(prediction).__name__} for {task_ref}",
            "Return one dict per task, {'result': [...], 'score': ...}, or a list of result dicts.",
        )
    prediction = dict(prediction)
    results = prediction.get("result")
    if not isinstance(results, list):
        raise PredictionsInvalid(
            f"prediction for {task_ref} has no 'result' list",
            f"Got keys {sorted(prediction)}; put the regions under 'result'.",
        )
    completed = []
    for region in results:
        if isinstance(region, dict):
            region = dict(region)
            region.setdefault("id", uuid.uuid4().hex[:10])
        completed.append(region)
    prediction["result"] = completed
    prediction["model_version"] = model_version
    if prediction.get("score") is None:
        scores = [r["score"] for r in completed if isinstance(r, dict) and isinstance(r.get("score"), (int, float))]
        prediction["score"] = float(sum(scores) / len(scores)) if scores else 0.0
    score = prediction["score"]
    if isinstance(score, (int, float)) and not isinstance(score, bool) and not math.isfinite(score):
        prediction["score"] = 0.0
    return prediction


def task_ref(task: dict[str, Any], index: int) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return f"task {task_id} (#{index})" if task_id is not None else f"task #{index}"


def validate_predictions(predictions: list[dict[str, Any]], tasks: list[Any], config: str) -> None:
    """Raise PredictionsInvalid listing every region that would not render, with the config's options."""
    interface = parse_label_config(config)
    problems: list[str] = []
    for index, (prediction, task) in enumerate(zip(predictions, tasks)):
        for message in interface.validate_prediction(prediction, return_errors=True):
            problems.append(f"{task_ref(task, index)}: {message}")
    if problems:
        controls = ", ".join(
            f"{c.name} ({c.tag}{': ' + ', '.join(c.labels) if getattr(c, 'labels', None) else ''})"
            for c in interface.controls
        )
        shown = problems[:20]
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise PredictionsInvalid(
            f"{len(problems)} prediction region(s) do not fit the labeling config: " + "; ".join(shown) + more,
            f"Fix the post_hook so each result's from_name/to_name/type/value match the config. Its controls: {controls}.",
            problems=problems,
        )
