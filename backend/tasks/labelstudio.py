"""Label Studio's address and credentials, in every token mode it has, and what to say when it refuses.

Label Studio 1.23 has three kinds of token:

- a legacy token (40 hex characters): ``Authorization: Token <it>``. ``/setup`` sends the project
  creator's; legacy tokens are *disabled by default*, and then Label Studio answers 401;
- a Personal Access Token (what Account & Settings hands out now): a JWT *refresh* token. It is not
  sent as is: it is exchanged at ``/api/token/refresh/`` for an access token that lives 300 s.
  label-studio-sdk's client does that exchange and caches the access token until it expires; here
  one client per (address, token) does it, and a 401 makes it exchange again once;
- a JWT access token: ``Bearer <it>``, as it is.

Which token goes where: a key from the environment (``LABEL_STUDIO_API_KEY``) only ever goes to
``LABEL_STUDIO_URL``; an address that ``/setup`` names (anyone who can reach ``/setup`` can name one)
only ever gets the token that came with it.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PAT_HELP = (
    "set LABEL_STUDIO_API_KEY to a Personal Access Token (in Label Studio: Account & Settings > Personal Access Token) "
    "and LABEL_STUDIO_URL to Label Studio's address, in the backend's environment"
)


class LabelStudioRefused(Exception):
    """Label Studio refused the credentials; the message says what to set."""


def jwt_claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload, unverified (only Label Studio verifies it); None for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def token_kind(token: str) -> str:
    """'personal access token', 'access token', 'legacy token' or 'none'."""
    if not token:
        return "none"
    claims = jwt_claims(token)
    if claims is None:
        return "legacy token"
    return "personal access token" if claims.get("token_type") == "refresh" else "access token"


def _origin(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.scheme, parsed.netloc.lower()


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the token to fetch its files with, and where both came from."""

    url: str = ""
    token: str = field(default="", repr=False)
    source: str = ""  # "environment" or "setup": says which setting to fix when Label Studio refuses
    withheld_env_key: bool = False  # LABEL_STUDIO_API_KEY is set, but without LABEL_STUDIO_URL it goes nowhere

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on this Label Studio (same scheme, host and port)."""
        return bool(self.url) and _origin(url) == _origin(self.url)

    @property
    def host(self) -> str:
        return (urlparse(self.url).hostname or "") if self.url else ""

    def describe(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"url": self.url or None, "token": token_kind(self.token), "from": self.source or None}
        if self.withheld_env_key:
            shown["warning"] = "LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL, so it is not used"
        return shown

    def refused(self, status: int, body: str) -> str:
        """Why Label Studio said 401/403 to this token, and what to set."""
        kind = token_kind(self.token)
        if status == 403:
            return f"Label Studio refused access (403) with the {kind} from {self._where()}: its user may not read this file"
        if "legacy token" in body.lower() or (kind == "legacy token" and self.source == "setup"):
            why = f"Label Studio refused the legacy token {self._where()} sent (legacy tokens are disabled, its default)"
        elif kind == "none":
            why = "Label Studio needs a token for its files and the backend has none"
        else:
            why = f"Label Studio refused the {kind} from {self._where()} (401)"
        hint = PAT_HELP
        if self.withheld_env_key:
            hint = "LABEL_STUDIO_API_KEY is set but only ever sent to LABEL_STUDIO_URL: set LABEL_STUDIO_URL too"
        return f"{why}: {hint}"

    def _where(self) -> str:
        return "LABEL_STUDIO_API_KEY" if self.source == "environment" else "/setup"


def access_for(env_url: str, env_key: str, setup_url: str, setup_token: str) -> LabelStudioAccess:
    """The one rule for which token goes to which address (see the module docstring)."""
    if env_url:
        if env_key:
            return LabelStudioAccess(env_url, env_key, "environment")
        return LabelStudioAccess(env_url, setup_token, "setup" if setup_token else "")
    return LabelStudioAccess(setup_url, setup_token, "setup" if setup_token else "", withheld_env_key=bool(env_key))


class LabelStudioAuth:
    """Authorization headers for Label Studio, a PAT exchanged (and re-exchanged) through label-studio-sdk."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def headers(self, access: LabelStudioAccess, fresh: bool = False) -> dict[str, str]:
        """The header for ``access``; ``fresh`` forgets a cached access token first (after a 401)."""
        kind = token_kind(access.token)
        if kind == "none":
            return {}
        if kind == "legacy token":
            return {"Authorization": f"Token {access.token}"}
        if kind == "access token":
            return {"Authorization": f"Bearer {access.token}"}
        return {"Authorization": self._exchanged(access, fresh)}

    def client(self, access: LabelStudioAccess) -> Any:
        """label-studio-sdk's client for ``access`` (one per address and token), for Label Studio's API."""
        from label_studio_sdk.client import LabelStudio

        if not access.url or token_kind(access.token) == "none":
            raise LabelStudioRefused(f"no Label Studio address and token: {PAT_HELP}")
        key = (access.url, access.token)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = LabelStudio(base_url=access.url.rstrip("/") + "/", api_key=access.token, timeout=self.timeout_s)
                self._clients[key] = client
            return client

    def _exchanged(self, access: LabelStudioAccess, fresh: bool) -> str:
        from label_studio_sdk.core.api_error import ApiError

        key = (access.url, access.token)
        if fresh:
            with self._lock:
                self._clients.pop(key, None)
        client = self.client(access)
        with self._lock:
            try:
                # The SDK's own wrapper exchanges the PAT on first use and again once the access token expired.
                return client._client_wrapper.get_headers()["Authorization"]
            except ApiError as exc:
                self._clients.pop(key, None)
                detail = exc.body.get("detail") if isinstance(exc.body, dict) else exc.body
                raise LabelStudioRefused(
                    f"Label Studio did not exchange the Personal Access Token ({exc.status_code}: {detail}): "
                    "create a new one (Account & Settings > Personal Access Token) and set it as LABEL_STUDIO_API_KEY"
                ) from None
            except Exception as exc:  # noqa: BLE001 - the network, an address that is not Label Studio
                self._clients.pop(key, None)
                raise LabelStudioRefused(
                    f"could not exchange the Personal Access Token at {access.url}: {type(exc).__name__}; "
                    "check LABEL_STUDIO_URL"
                ) from None
