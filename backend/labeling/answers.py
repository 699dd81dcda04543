"""Predictions as JSON: what hooks leave in them is sent as plain values, each distinct one encoded once.

Post hooks often return numpy or torch values (an ``np.float32`` score, a tensor of points); they go
out as the numbers and lists they hold. Anything else JSON cannot carry (a set, a NaN) is the post
hook's error, named as such, not an internal one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Response, current_app
from flask.json.provider import DefaultJSONProvider

from backend.core.errors import PredictionsInvalid
from backend.labeling.validation import task_ref


def plain_value(o: Any) -> Any:
    """JSON's fallback: numpy arrays and scalars and torch tensors (anything with ``tolist``), then Flask's."""
    if callable(getattr(o, "tolist", None)):
        return o.tolist()
    return DefaultJSONProvider.default(o)


class PlainValuesJSONProvider(DefaultJSONProvider):
    """Flask's provider, with ``plain_value`` as its fallback and keys in the order hooks wrote them."""

    sort_keys = False
    default = staticmethod(plain_value)


# NaN and Infinity are not JSON: Label Studio could not store them. Keeps no state between calls.
_ENCODER = json.JSONEncoder(default=plain_value, separators=(",", ":"), allow_nan=False)


def prediction_json(prediction: dict[str, Any], task: Any, index: int) -> str:
    """One prediction, compact; a value JSON cannot carry is the post hook's error."""
    try:
        return _ENCODER.encode(prediction)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PredictionsInvalid(
            f"the prediction for {task_ref(task, index)} cannot be sent as JSON: {exc}",
            "Return plain, finite numbers, strings, lists and dicts from the post_hook "
            "(numpy and torch values are converted; convert other types yourself).",
        ) from exc


def answer_json(
    items: list[dict[str, Any] | str | None], tasks: list[dict[str, Any]], model_version: str, extra: dict[str, Any],
    on_encoded: Callable[[list[str | None]], None] | None = None,
) -> str:
    """The /predict answer: per task a prediction, an already encoded one (from the background's cache),
    or ``[]`` where there is none (which Label Studio stores nothing for, so it asks again next round).
    Tasks sharing a completed prediction (see PredictionCompleter) share its JSON too. ``on_encoded`` gets
    each task's prediction as encoded here (None where there is none), for whoever keeps them."""
    encoded: dict[int, str] = {}
    parts = []
    for index, (item, task) in enumerate(zip(items, tasks)):
        if item is None:
            parts.append("[]")
        elif isinstance(item, str):
            parts.append(item)
        else:
            if id(item) not in encoded:
                encoded[id(item)] = prediction_json(item, task, index)
            parts.append(encoded[id(item)])
    if on_encoded is not None:
        on_encoded([None if item is None else part for item, part in zip(items, parts)])
    head = ['{"results":[', ",".join(parts), '],"model_version":', _ENCODER.encode(model_version)]
    for key, value in extra.items():
        head += [",", _ENCODER.encode(key), ":", _ENCODER.encode(value)]
    head.append("}")
    return "".join(head)


def predictions_answer(
    items: list[dict[str, Any] | str | None], tasks: list[dict[str, Any]], model_version: str, extra: dict[str, Any],
    on_encoded: Callable[[list[str | None]], None] | None = None,
) -> Response:
    return current_app.response_class(answer_json(items, tasks, model_version, extra, on_encoded), mimetype="application/json")
