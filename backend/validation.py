"""Predictions checked against the project's labeling config before they leave, with label-studio-sdk.

Label Studio drops or mis-renders predictions that do not fit the config, silently. Here each one
is completed with what users forget (``model_version``, region ``id``s, a ``score``) and validated;
a mismatch names the task, the region and the fix.
"""

from __future__ import annotations

import functools
import itertools
import math
import pickle
import secrets
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from .errors import BadRequest, PredictionsInvalid

# Object tags whose data Label Studio shows inline: their task value is passed to hooks as text.
TEXT_OBJECTS = frozenset({"text", "hypertext", "paragraphs", "table", "list", "ranker"})


# Region ids only need to be unique within a task's result: a random prefix per process and a counter
# cost a fraction of a uuid4 per region, and two workers or restarts do not share a prefix.
_ID_PREFIX = secrets.token_hex(3)[:5]
_ID_COUNTER = itertools.count()

# Fields holding region ids; validation only compares them for equality (relations, split regions).
_ID_FIELDS = frozenset({"id", "from_id", "to_id", "parentID"})


def new_region_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):05x}"


@dataclass(frozen=True)
class DataObject:
    """One object tag of the config: which task data key it reads, and whether that is text or a file."""

    name: str
    key: str
    tag: str

    @property
    def is_text(self) -> bool:
        return self.tag.lower() in TEXT_OBJECTS

    @property
    def missing_message(self) -> str:
        return f"task data has no {self.key!r} (the config's {self.tag} {self.name!r} reads ${self.key})"


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


def complete_prediction(prediction: Any, model_version: str, task: Any = None, index: int = 0) -> dict[str, Any]:
    """Accept a dict with ``result`` or a bare list of results; fill version, ids and score.
    ``task`` and ``index`` only name the task in an error."""
    if isinstance(prediction, list):
        prediction = {"result": prediction}
    if not isinstance(prediction, dict):
        raise PredictionsInvalid(
            f"post_hook returned a {type(prediction).__name__} for {task_ref(task, index)}",
            "Return one dict per task, {'result': [...], 'score': ...}, or a list of result dicts.",
        )
    prediction = dict(prediction)
    results = prediction.get("result")
    if not isinstance(results, list):
        raise PredictionsInvalid(
            f"prediction for {task_ref(task, index)} has no 'result' list",
            f"Got keys {sorted(prediction)}; put the regions under 'result'.",
        )
    completed = []
    for region in results:
        if isinstance(region, dict):
            region = dict(region)
            if "id" not in region:
                region["id"] = new_region_id()
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


def task_ref(task: Any, index: int) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return f"task {task_id} (#{index})" if task_id is not None else f"task #{index}"


def validation_key(prediction: dict[str, Any]) -> bytes | None:
    """What label-studio-sdk's verdict on a prediction depends on: all of it but ``model_version``, with
    region ids numbered by first appearance. Equal keys validate alike, so 64 "cat"s are checked once.
    Pickled (only dumped, never loaded): equal bytes mean equal content, whatever the values' types,
    at a third of JSON's cost. None when it cannot be pickled; the prediction is then checked alone."""
    numbers: dict[Any, int] = {}
    parts: list[Any] = [{k: v for k, v in prediction.items() if k not in ("result", "model_version")}]
    for region in prediction.get("result") or ():
        if isinstance(region, dict):
            region = {
                k: numbers.setdefault(v, len(numbers)) if k in _ID_FIELDS and isinstance(v, (str, int)) else v
                for k, v in region.items()
            }
        parts.append(region)
    try:
        return pickle.dumps(parts, protocol=5)
    except Exception:  # noqa: BLE001 - anything unpicklable is simply validated on its own
        return None


def validate_predictions(predictions: list[dict[str, Any]], tasks: list[Any], config: str) -> None:
    """Raise PredictionsInvalid listing every region that would not render, with the config's options."""
    interface = parse_label_config(config)
    problems: list[str] = []
    verdicts: dict[bytes, list[str]] = {}
    for index, (prediction, task) in enumerate(zip(predictions, tasks)):
        key = validation_key(prediction)
        messages = verdicts.get(key) if key is not None else None
        if messages is None:
            messages = interface.validate_prediction(prediction, return_errors=True)
            if key is not None:
                verdicts[key] = messages
        problems.extend(f"{task_ref(task, index)}: {message}" for message in messages)
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
