"""The few ways a request can fail, and their one mapping to JSON responses.

Every failure a client can cause or should know about is one of these::

    BackendError                    500  something on our side; the log has the traceback
    ├── BadRequest                  400  malformed JSON, missing or mistyped fields, bad base64
    ├── Unauthorized                401  missing or wrong credentials
    ├── Forbidden                   403  an action refused by policy (configure on an open bind)
    ├── NotFound                    404  unknown model, version, run, path or route
    ├── Conflict                    409  a limit reached, or a newer request won
    ├── PayloadTooLarge             413  a request body over MAX_REQUEST_MB
    ├── NotConfigured               503  predict before any model was configured (or while it loads)
    ├── Unprocessable               422  valid JSON that does not fit the API (Antenna's pipeline request)
    ├── HookUnusable                422  a hook that cannot be decoded or would not run here
    ├── PredictionsInvalid          422  predictions that do not fit the task count or labeling config
    ├── HookFailed                  500  a user hook (or the model) raised while predicting
    ├── UpstreamUnavailable         502  the MLflow tracking server (or another upstream) is unreachable
    │   └── RegistryUnreachable     502  no answer at all (a model downloaded before still loads from disk)
    └── DeadlineExceeded            504  a prediction could not finish within the deadline

Responses are ``{"error": <summary>, "detail": <cause and fix>, "type": <class name>}``, with any
credential they would quote masked (``redact``). On Antenna's routes, which show only ``detail``,
``detail`` holds the summary too. Tracebacks go to the log, never to the client.
Errors raised in the model process travel to the worker as ``to_dict()`` and come back to life with
``error_from_dict``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.core.redact import redact, redact_value

log = logging.getLogger(__name__)

# Antenna's routes: its platform shows a failed call's "detail" alone (FastAPI's error shape).
ANTENNA_PATHS = frozenset({"/info", "/readyz", "/livez", "/process"})


class BackendError(Exception):
    """Base of every error answered as JSON; 500 unless a subclass says otherwise."""

    status = 500

    def __init__(self, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The JSON body: every string in it redacted."""
        body: dict[str, Any] = {"error": self.error, "detail": self.detail, "type": type(self).__name__}
        body.update(self.extra)
        return redact_value(body)


class BadRequest(BackendError):
    """400: the request itself is malformed."""

    status = 400


class Unauthorized(BackendError):
    """401: credentials are missing or wrong."""

    status = 401


class Forbidden(BackendError):
    """403: refused by policy, whatever the credentials."""

    status = 403


class NotFound(BackendError):
    """404: the named model, version, run, path or route does not exist."""

    status = 404


class Conflict(BackendError):
    """409: the request clashes with the current state (a limit reached, a newer request won)."""

    status = 409


class PayloadTooLarge(BackendError):
    """413: the request body is larger than MAX_REQUEST_MB."""

    status = 413


class NotConfigured(BackendError):
    """503: no model is configured yet (or the first one is still loading)."""

    status = 503


class OverBudget(BackendError):
    """503: starting what was asked would take more memory than the budget allows, even with every idle
    backend asleep (the orchestrator's MEMORY_BUDGET, GPU_MEMORY_BUDGET)."""

    status = 503


class Unprocessable(BackendError):
    """422: valid JSON that does not fit the API's schema (FastAPI's status, which Antenna expects)."""

    status = 422


class HookUnusable(BackendError):
    """422: a hook that cannot be decoded, or was made by another Python and would crash here."""

    status = 422


class PredictionsInvalid(BackendError):
    """422: predictions that do not match the task count or the project's labeling config."""

    status = 422


class HookFailed(BackendError):
    """500: a user hook or the model raised while predicting."""

    status = 500


class UpstreamUnavailable(BackendError):
    """502: the tracking server or another upstream could not be reached."""

    status = 502


class RegistryUnreachable(UpstreamUnavailable):
    """502: no answer from the tracking server (not a refusal): a model downloaded before may still load."""


class DeadlineExceeded(BackendError):
    """504: the work could not finish in time; the backend cut it off itself."""

    status = 504


def error_from_dict(body: dict[str, Any]) -> BackendError:
    """Rebuild an error that ``to_dict`` sent from another process; unknown types become a BackendError."""
    kinds = {cls.__name__: cls for cls in _subclasses(BackendError)}
    kind = kinds.get(str(body.get("type")), BackendError)
    extra = {k: v for k, v in body.items() if k not in ("error", "detail", "type")}
    return kind(str(body.get("error", "")), str(body.get("detail", "")), **extra)


def _subclasses(cls: type) -> list[type]:
    found: list[type] = [cls]
    sub: type
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def _shaped(body: dict[str, Any]) -> dict[str, Any]:
    """On Antenna's routes, ``detail`` says what went wrong and what to do, in one string."""
    if has_request_context() and request.path in ANTENNA_PATHS:
        body["detail"] = f"{body['error']}: {body['detail']}" if body.get("detail") else body["error"]
    return body


def error_response(exc: BackendError):
    """The JSON response for one of our errors."""
    response = jsonify(_shaped(exc.to_dict()))
    response.status_code = exc.status
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Basic realm="label-studio-ml-backend"'
    return response


def register_error_handlers(app: Flask, on_error=None) -> None:
    """Map our errors, Werkzeug's HTTP errors and anything unexpected to JSON, in one place.

    ``on_error(exc)`` is called for every error answered, to count it.
    """

    def note(exc: Exception) -> None:
        if on_error is not None:
            on_error(exc)

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        note(exc)
        level = logging.ERROR if exc.status >= 500 else logging.WARNING
        log.log(level, "%s %s: %s", exc.status, exc.error, exc.detail)
        return error_response(exc)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        limit = app.config.get("MAX_CONTENT_LENGTH") or 0
        return _backend_error(
            PayloadTooLarge(
                f"the request body is larger than the {limit / (1 << 20):g} MB limit",
                "Send fewer tasks per request, or raise MAX_REQUEST_MB for this backend.",
            )
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        note(exc)
        response = jsonify(
            _shaped({"error": exc.name, "detail": redact(exc.description or ""), "type": type(exc).__name__})
        )
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        note(exc)
        log.exception("unexpected error")
        response = jsonify(
            _shaped({
                "error": f"internal error: {type(exc).__name__}",
                "detail": "The backend hit an unexpected error; its log has the traceback.",
                "type": "BackendError",
            })
        )
        response.status_code = 500
        return response
