"""Which token goes to which Label Studio address, and what the backend says when it is refused.

The exchange of a Personal Access Token runs against the real Label Studio in tests/e2e; these are
the rules around it."""

from __future__ import annotations

import base64
import json

from backend.tasks.labelstudio import LabelStudioAccess, LabelStudioAuth, access_for, token_kind

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def jwt(token_type: str) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return ".".join([part({"alg": "HS256"}), part({"token_type": token_type, "exp": 4102444800}), "signature"])


def test_token_kinds():
    assert token_kind(LEGACY) == "legacy token"
    assert token_kind(jwt("refresh")) == "personal access token"
    assert token_kind(jwt("access")) == "access token"
    assert token_kind("") == "none" and token_kind("a.b.c") == "legacy token"


def test_a_key_from_the_environment_only_goes_to_the_address_from_the_environment():
    env = access_for("http://ls:8080", "env-key", "http://elsewhere", "setup-token")
    assert (env.url, env.token, env.source) == ("http://ls:8080", "env-key", "environment")
    # No LABEL_STUDIO_URL: whatever /setup names gets the token /setup sent, never the environment's key.
    setup = access_for("", "env-key", "http://elsewhere", "setup-token")
    assert (setup.url, setup.token, setup.source, setup.withheld_env_key) == ("http://elsewhere", "setup-token", "setup", True)
    # LABEL_STUDIO_URL alone: Label Studio's own /setup token, at the address the operator named.
    assert access_for("http://ls:8080", "", "http://localhost:8080", "setup-token").token == "setup-token"
    assert access_for("", "", "", "").describe() == {"url": None, "token": "none", "from": None}


def test_refusals_say_what_to_set():
    legacy = LabelStudioAccess("http://ls", LEGACY, "setup")
    said = legacy.refused(401, '{"detail": "legacy token authentication has been disabled for this organization"}')
    assert "refused the legacy token /setup sent (legacy tokens are disabled, its default)" in said
    assert "LABEL_STUDIO_API_KEY to a Personal Access Token" in said and "Account & Settings" in said
    withheld = LabelStudioAccess("http://ls", LEGACY, "setup", withheld_env_key=True)
    assert "set LABEL_STUDIO_URL too" in withheld.refused(401, "")
    pat = LabelStudioAccess("http://ls", jwt("refresh"), "environment")
    assert "refused the personal access token from LABEL_STUDIO_API_KEY" in pat.refused(401, "")
    assert "may not read this file" in pat.refused(403, "")


def test_headers_by_kind_and_owned_addresses():
    auth = LabelStudioAuth()
    assert auth.headers(LabelStudioAccess("http://ls", LEGACY)) == {"Authorization": f"Token {LEGACY}"}
    access = jwt("access")
    assert auth.headers(LabelStudioAccess("http://ls", access)) == {"Authorization": f"Bearer {access}"}
    assert auth.headers(LabelStudioAccess("http://ls", "")) == {}
    owner = LabelStudioAccess("http://ls:8080", LEGACY)
    assert owner.owns("http://ls:8080/data/upload/1/a.png") and not owner.owns("http://ls:8081/data/upload/1/a.png")
    assert not owner.owns("https://ls:8080/x")
