"""What the client raises. Every error says what happened and what to do about it::

    ClientError                 any failure of the client; .error (what) and .detail (the fix)
    ├── Unreachable             nothing answered at the URL (wrong address, server not started)
    ├── HookNotPortable         a hook cannot run on the server: Python/cloudpickle differ, or it cannot be pickled
    ├── ServerError             the server answered with an error; .status and .body hold its answer
    │   └── ConfigureFailed     the model or its hooks did not load (the server's own error and fix)
    ├── WaitTimeout             still not ready when the wait ended
    └── LabelStudioError        Label Studio refused or could not reach the backend
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of the client's errors: ``error`` says what happened, ``detail`` what to do."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error = error
        self.detail = detail


class Unreachable(ClientError):
    """Nothing answered at the URL."""


class HookNotPortable(ClientError):
    """The hook would not run on the server; found before anything was sent."""


class ServerError(ClientError):
    """The server answered with an error; its ``error``/``detail`` are carried as they were. ``status`` is
    the HTTP status, or 0 where a load failed after the server had answered 202 (``body`` is then the
    load's status, with the error's ``type``)."""

    def __init__(self, error: str, detail: str = "", status: int = 0, body: dict[str, Any] | None = None) -> None:
        super().__init__(error, detail)
        self.status = status
        self.body = body or {}

    @classmethod
    def from_answer(cls, status: int, body: Any, what: str) -> ServerError:
        """An error answer as the backend and the orchestrator write it: ``{"error": ..., "detail": ...}``."""
        if not isinstance(body, dict):
            body = {"answer": body}
        error = body.get("error") or f"{what} answered {status}"
        detail = body.get("detail") or ""
        if isinstance(detail, (dict, list)):
            detail = str(detail)
        return cls(str(error), str(detail), status, body)


class ConfigureFailed(ServerError):
    """The configure was refused, or its load failed."""


class WaitTimeout(ClientError):
    """Waited for the model to be ready, and it was not."""


class LabelStudioError(ClientError):
    """Label Studio refused a call, or could not connect to the backend."""
