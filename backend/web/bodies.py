"""Request bodies read as JSON objects, with a 400 that says what is wrong with one that is not."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from backend.core.errors import BadRequest


def json_body(*, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what was wrong with it."""
    raw = request.get_data()
    if not raw:
        if required:
            raise BadRequest("the request has no body", "Send a JSON object.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the request body is not valid JSON", str(exc)) from exc
    except RecursionError:
        raise BadRequest("the request body nests too deeply", "Send JSON nested a few hundred levels at most.") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", f"got {type(body).__name__}")
    return body
