"""Predictions as JSON: what hooks leave in them is sent as plain values, each distinct one encoded once.

Post hooks often return numpy or torch values (an ``np.float32`` score, a tensor of points); they go
out as the numbers and lists they hold. Anything else JSON cannot carry (a set, a NaN) is the post
hook's error, named as such, not an internal one.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app
from flask.json.provider import DefaultJSONProvider

from .errors import PredictionsInvalid
from .validation import task_ref


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
    except (TypeError, ValueError) as exc:
        raise PredictionsInvalid(
            f"the prediction for {task_ref(task, index)} cannot be sent as JSON: {exc}",
            "Return plain, finite numbers, strings, lists and dicts from the post_hook "
            "(numpy and torch values are converted; convert other types yourself).",
        ) from exc


def predictions_answer(
    predictions: list[dict[str, Any]], tasks: list[dict[str, Any]], model_version: str, errors: list[dict[str, Any]]
) -> Response:
    """The /predict answer. Tasks sharing a completed prediction (see PredictionCompleter) share its
    JSON too, which is most of the answer."""
    encoded: dict[int, str] = {}
    for index, (prediction, task) in enumerate(zip(predictions, tasks)):
        if id(prediction) not in encoded:
            encoded[id(prediction)] = prediction_json(prediction, task, index)
    parts = ['{"results":[', ",".join([encoded[id(p)] for p in predictions]), '],"model_version":', _ENCODER.encode(model_version)]
    if errors:
        parts += [',"errors":', _ENCODER.encode(errors)]
    parts.append("}")
    return current_app.response_class("".join(parts), mimetype="application/json")
