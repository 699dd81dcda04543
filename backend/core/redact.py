"""Secrets never leave in an answer, on ``/health`` or in a log line.

Two nets: patterns that look like credentials wherever they come from (the userinfo of URIs,
token-like query parameters, ``Authorization`` values), and the exact values the process knows to be
secret (tokens from the environment, a configure's tracking password, Label Studio's token from
``/setup``). MLflow, requests and urllib3 put URIs with credentials into their own messages and log
records, so the log side is a filter on every handler, not a rule for our own code only.

The known values live in one process-wide set: logging is process-wide too, and a filter must see
every secret whichever app or thread registered it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

MASK = "***"

# The whole userinfo of a URI goes: a user name alone is often the token (``https://<token>@host``).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@'\"?#]+)@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&;][^=&\s'\"]*(?:token|key|secret|signature|password|passwd|sig|credential|auth)[^=&\s'\"]*=)"
    r"(?P<value>[^&\s#'\"]+)"
)
# A credential after an auth scheme: long and with a digit, so "token authentication" stays readable.
_AUTH_VALUE = re.compile(r"(?i)(?P<scheme>\b(?:bearer|token|basic)\s+)(?P<value>(?=[A-Za-z._~+/=-]*\d)[A-Za-z0-9._~+/=-]{16,})")
_SHORTEST_KNOWN = 4  # shorter "secrets" (a one-letter password) would mask ordinary text


class KnownSecrets:
    """The exact secret values of this process, longest first so one never leaves part of another."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._ordered: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, *values: str | None) -> None:
        fresh = {v for v in values if isinstance(v, str) and len(v) >= _SHORTEST_KNOWN} - self._values
        if fresh:
            with self._lock:
                self._values |= fresh
                self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def mask(self, text: str) -> str:
        for value in self._ordered:
            if value in text:
                text = text.replace(value, MASK)
        return text


SECRETS = KnownSecrets()


def redact(text: str) -> str:
    """``text`` with every credential it holds masked."""
    if not text:
        return text
    text = SECRETS.mask(text)
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
    return _AUTH_VALUE.sub(lambda m: f"{m['scheme']}{MASK}", text)


def uri_credentials(uri: str) -> tuple[str, ...]:
    """The secret parts of a URI's userinfo (``user:password@`` or ``token@``), to add to the known secrets."""
    match = _USERINFO.search(uri or "")
    if match is None:
        return ()
    user, _, password = match["userinfo"].partition(":")
    return tuple(part for part in (password or user,) if part)


def redact_value(value: Any) -> Any:
    """Strings anywhere in a JSON-like value, redacted; everything else as it is."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Formats each record's message once, redacted, so no handler can print the raw one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's problem, not ours
            return True
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Put the filter on every handler of the root logger (and on gunicorn's), once each."""
    targets = list(handlers) if handlers is not None else _all_handlers()
    for handler in targets:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), logging.getLogger("gunicorn.error"), logging.getLogger("gunicorn.access")]
    return [handler for logger in loggers for handler in logger.handlers]
