"""Predictions checked against the project's labeling config before they leave, with label-studio-sdk.

Label Studio drops or mis-renders predictions that do not fit the config, silently. Here each one
is completed with what users forget (``model_version``, region ``id``s, a ``score``) and validated;
a mismatch names the task, the region and the fix.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import pickle
import secrets
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from backend.core.errors import BadRequest, PredictionsInvalid

# Object tags whose data Label Studio shows inline (passed to hooks as it is), and what that data is.
INLINE_TYPES: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "hypertext": (str,),
    "paragraphs": (list,),
    "table": (dict, list),
    "list": (list,),
    "ranker": (list,),
}
TEXT_OBJECTS = frozenset(INLINE_TYPES)
# Media objects read a URL or path; these may also hold their data inline.
MEDIA_INLINE_TYPES: dict[str, tuple[type, ...]] = {"timeseries": (dict,)}
_TYPE_NAMES: dict[type, str] = {str: "text", list: "a list", dict: "an object"}


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

    def wrong_type(self, raw: Any) -> str | None:
        """Why ``raw`` cannot be this object's data (a number where a URL belongs), or None when it can."""
        tag = self.tag.lower()
        if self.is_text:
            accepted = INLINE_TYPES[tag]
            if isinstance(raw, accepted):
                return None
            expected = " or ".join(_TYPE_NAMES[t] for t in accepted)
        else:
            if (isinstance(raw, str) and raw.strip()) or isinstance(raw, MEDIA_INLINE_TYPES.get(tag, ())):
                return None
            expected = "a URL or file path"
        got = "null" if raw is None else ("empty text" if raw == "" else f"{type(raw).__name__} {str(raw)[:40]!r}")
        return f"task data {self.key!r} is {got}, not {expected} (the config's {self.tag} {self.name!r} reads ${self.key})"


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
    """Accept a dict with ``result`` or a bare list of results; fill version, ids and score (the mean of
    the regions' scores; none at all when no region has one).
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
        scores = [r["score"] for r in completed if isinstance(r, dict) and _is_number(r.get("score"))]
        prediction["score"] = float(sum(scores) / len(scores)) if scores else None
    score = prediction["score"]
    if score is None or (_is_number(score) and not math.isfinite(score)):
        # Unknown: Label Studio sorts and filters tasks by score, so never a made-up 0.
        del prediction["score"]
    return prediction


class PredictionCompleter:
    """One request's predictions completed, each distinct one once. A post hook that gives 64 tasks the
    same "cat" gets one completed dict shared by them (region ids need only be unique within a task),
    which validation, going by identity first, also checks once."""

    def __init__(self, model_version: str) -> None:
        self.model_version = model_version
        self._completed: dict[bytes, dict[str, Any]] = {}

    def __call__(self, prediction: Any, task: Any = None, index: int = 0) -> dict[str, Any]:
        key = _pickled(prediction)
        completed = self._completed.get(key) if key is not None else None
        if completed is None:
            completed = complete_prediction(prediction, self.model_version, task, index)
            if key is not None:
                self._completed[key] = completed
        return completed


def _pickled(value: Any) -> bytes | None:
    """Equal bytes mean equal content, whatever the types (1 and 1.0 differ, as they do in JSON), at a
    third of JSON's cost; only ever dumped, never loaded. None for what cannot be pickled."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - anything unpicklable is simply handled on its own
        return None


def _is_number(value: Any) -> bool:
    """Python's and numpy's (which registers its scalars as numbers.Real); not a bool."""
    return isinstance(value, (int, float, numbers.Real)) and not isinstance(value, bool)


def task_ref(task: Any, index: int) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return f"task {task_id} (#{index})" if task_id is not None else f"task #{index}"


def validation_key(prediction: dict[str, Any]) -> bytes | None:
    """What label-studio-sdk's verdict on a prediction depends on: all of it but ``model_version``, with
    region ids numbered by first appearance. Equal keys validate alike, so 64 "cat"s with ids of their
    own are checked once. None when it cannot be pickled; the prediction is then checked alone."""
    numbers: dict[Any, int] = {}
    parts: list[Any] = [{k: v for k, v in prediction.items() if k not in ("result", "model_version")}]
    for region in prediction.get("result") or ():
        if isinstance(region, dict):
            region = {
                k: numbers.setdefault(v, len(numbers)) if k in _ID_FIELDS and isinstance(v, (str, int)) else v
                for k, v in region.items()
            }
        parts.append(region)
    return _pickled(parts)


def _verdict(interface: LabelInterface, prediction: dict[str, Any]) -> list[str]:
    """label-studio-sdk's list of problems, then the rendering rules it lacks; a prediction it cannot even
    read is one problem, not a crash."""
    try:
        problems = interface.validate_prediction(prediction, return_errors=True) or []
    except Exception as exc:  # noqa: BLE001 - whatever the hook returned, it is the hook's error
        return [f"the prediction cannot be read as Label Studio results ({type(exc).__name__}: {exc})"]
    return problems + _rendering_problems(interface, prediction.get("result") or [])


def _rendering_problems(interface: LabelInterface, results: list[Any]) -> list[str]:
    """What the labeling UI, seen in a browser (tests/e2e/test_browser.py), does not draw although the SDK
    accepts it: a region with a negative size (listed, never drawn), and a per-region TextArea whose id is
    no labelled region's (drawn as a second, unlabelled region; its text shows on neither)."""
    per_region = {c.name for c in interface.controls
                  if c.tag.lower() == "textarea" and str(getattr(c, "attr", {}).get("perRegion", "")).lower() == "true"}
    labelled = {r.get("id") for r in results if isinstance(r, dict) and str(r.get("type", "")).endswith("labels")}
    problems = []
    for index, region in enumerate(results):
        if not isinstance(region, dict):
            continue
        raw = region.get("value")
        value: dict[str, Any] = raw if isinstance(raw, dict) else {}
        negative = [k for k in ("width", "height") if _is_number(value.get(k)) and value[k] < 0]
        if negative:
            problems.append(f"Region {index}: negative {' and '.join(negative)} ({', '.join(str(value[k]) for k in negative)}): "
                            "Label Studio lists the region but draws nothing; give x, y at the top-left corner "
                            "and a positive width and height")
        if region.get("from_name") in per_region and region.get("id") not in labelled:
            problems.append(f"Region {index}: the per-region TextArea '{region.get('from_name')}' has id "
                            f"{region.get('id')!r}, which no labelled region has: Label Studio draws it as a second, "
                            "unlabelled region and shows its text on neither; give it the id of its region "
                            "(hooks.textarea(..., region=box) does)")
    return problems


def validate_predictions(predictions: list[dict[str, Any]], tasks: list[Any], config: str) -> None:
    """Raise PredictionsInvalid listing every region that would not render, with the config's options."""
    interface = parse_label_config(config)
    problems: list[str] = []
    verdicts: dict[bytes, list[str]] = {}
    by_object: dict[int, list[str]] = {}  # a completed prediction shared by several tasks
    for index, (prediction, task) in enumerate(zip(predictions, tasks)):
        messages = by_object.get(id(prediction))
        if messages is None:
            key = validation_key(prediction)
            messages = verdicts.get(key) if key is not None else None
            if messages is None:
                messages = _verdict(interface, prediction)
                if key is not None:
                    verdicts[key] = messages
            by_object[id(prediction)] = messages
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
