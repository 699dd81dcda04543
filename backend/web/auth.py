"""Who may call what: optional basic auth on Label Studio's routes, and stricter rules for two kinds.

``/configure`` runs code sent over the network. On a loopback bind, from a loopback client, it is
open; anywhere else it needs ``CONFIGURE_TOKEN`` (as a bearer token) or basic auth, and without
either configured it is refused outright.

``/webhook`` and ``/train`` start trainings. Label Studio's "Start Training" sends the backend's
basic auth, but the webhook it creates for an ML backend carries no credentials: an operator adds
one to that webhook's headers in Label Studio, either the same basic auth or
``X-Webhook-Secret: <WEBHOOK_SECRET>``. Once any credential is configured these routes need one;
with none, the loopback rule of ``/configure`` applies.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Protocol

from flask import Request

from backend.core.errors import Forbidden, Unauthorized
from backend.core.settings import is_loopback

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"


class AccessRules(Protocol):
    """The settings auth reads; the backend's and the orchestrator's settings both have them."""

    @property
    def basic_auth_user(self) -> str: ...

    @property
    def basic_auth_pass(self) -> str: ...

    @property
    def configure_token(self) -> str: ...

    @property
    def webhook_secret(self) -> str: ...

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


def require_configure_rights(request: Request, settings: AccessRules, what: str = "configure") -> None:
    """Token or basic auth when any is configured; otherwise loopback bind and loopback client only."""
    if settings.configure_token or settings.basic_auth_enabled:
        if bearer_ok(request, settings.configure_token) or (settings.basic_auth_enabled and basic_auth_ok(request, settings)):
            return
        raise Unauthorized(
            f"{what} needs credentials",
            "Send 'Authorization: Bearer <CONFIGURE_TOKEN>' or the backend's basic auth.",
        )
    _require_loopback(request, settings, what)


def require_training_rights(request: Request, settings: AccessRules, what: str) -> None:
    """``/webhook`` and ``/train``: the basic auth, the webhook secret or the configure token, once any is
    configured; with none, loopback only (as ``/configure``)."""
    secret = request.headers.get(WEBHOOK_SECRET_HEADER, "")
    if settings.configure_token or settings.basic_auth_enabled or settings.webhook_secret:
        if ((settings.basic_auth_enabled and basic_auth_ok(request, settings))
                or (settings.webhook_secret and _equal(secret, settings.webhook_secret))
                or bearer_ok(request, settings.configure_token)):
            return
        raise Unauthorized(
            f"{what} needs credentials: it can start a training",
            "In Label Studio, give the project's webhook to this backend a header: the backend's basic auth "
            f"('Authorization: Basic ...') or '{WEBHOOK_SECRET_HEADER}: <WEBHOOK_SECRET>' (Settings > Webhooks > Headers).",
        )
    _require_loopback(request, settings, what)


def _require_loopback(request: Request, settings: AccessRules, what: str) -> None:
    if settings.open_bind or not is_loopback(request.remote_addr or "") or _served_beyond_loopback(request):
        raise Forbidden(
            f"{what} is disabled: the backend listens beyond loopback without credentials",
            "Set CONFIGURE_TOKEN (or BASIC_AUTH_USER and BASIC_AUTH_PASS, or WEBHOOK_SECRET) for this backend, "
            "or bind it to 127.0.0.1.",
        )
