"""Settings come from the environment, validated once at start."""

from __future__ import annotations

import pytest

from backend.core.settings import Settings, is_loopback


def test_defaults_bind_loopback():
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.open_bind) == ("127.0.0.1", 9090, False)


@pytest.mark.parametrize("env, message", [
    ({"PORT": "x"}, "PORT must be an integer, got 'x'"),
    ({"PORT": "0"}, "PORT must be at least 1"),
    ({"PREDICT_TIMEOUT_S": "soon"}, "must be a number"),
    ({"BASIC_AUTH_USER": "u"}, "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
])
def test_bad_values_fail_at_start(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("10.0.0.5", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
