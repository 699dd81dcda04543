"""Who may call what: optional basic auth on Label Studio's routes, and a stricter rule for /configure.

``/configure`` runs code sent over the network. On a loopback bind, from a loopback client, it is
open; anywhere else it needs ``CONFIGURE_TOKEN`` (as a bearer token) or basic auth, and without
either configured it is refused outright.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Protocol

from flask import Request

from .errors import Forbidden, Unauthorized
from .settings import is_loopback


class AccessRules(Protocol):
    """The settings auth reads; the backend's and the orchestrator's settings both have them."""

    @property
    def basic_auth_user(self) -> str: ...

    @property
    def basic_auth_pass(self) -> str: ...

    @property
    def configure_token(self) -> str: ...

    @property
    def basic_auth_enabled(self) -> bool: ...

    @property
    def open_bind(self) -> bool: ...


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return user, password


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def basic_auth_ok(request: Request, settings: AccessRules) -> bool:
    credentials = _basic_credentials(request)
    return credentials is not None and _equal(credentials[0], settings.basic_auth_user) and _equal(
        credentials[1], settings.basic_auth_pass
    )


def bearer_ok(request: Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    return bool(token) and header.lower().startswith("bearer ") and _equal(header[7:].strip(), token)


def _served_beyond_loopback(request: Request) -> bool:
    """The dev server (``flask run --host 0.0.0.0``) names its bind in SERVER_NAME; HOST may not say so."""
    server = request.environ.get("SERVER_NAME", "")
    return server in ("0.0.0.0", "::") or (server.replace(".", "").isdigit() and not is_loopback(server))


def require_basic_auth(request: Request, settings: AccessRules) -> None:
    """Label Studio's 'basic auth' option for ML backends; a no-op when it is not configured."""
    if settings.basic_auth_enabled and not basic_auth_ok(request, settings):
        raise Unauthorized("basic auth required", "Set the backend's user and password in Label Studio's model settings.")


def require_configure_rights(request: Request, settings: AccessRules) -> None:
    """Token or basic auth when any is configured; otherwise loopback bind and loopback client only."""
    if settings.configure_token or settings.basic_auth_enabled:
        if bearer_ok(request, settings.configure_token) or (settings.basic_auth_enabled and basic_auth_ok(request, settings)):
            return
        raise Unauthorized(
            "configure needs credentials",
            "Send 'Authorization: Bearer <CONFIGURE_TOKEN>' or the backend's basic auth.",
        )
    if settings.open_bind or not is_loopback(request.remote_addr or "") or _served_beyond_loopback(request):
        raise Forbidden(
            "configure is disabled: the backend listens beyond loopback without credentials",
            "Set CONFIGURE_TOKEN (or BASIC_AUTH_USER and BASIC_AUTH_PASS) for this backend, or bind it to 127.0.0.1.",
        )
