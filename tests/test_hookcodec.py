"""Hooks decode from base64 cloudpickle or 'module:function', and foreign pickles are refused with versions named."""

from __future__ import annotations

import platform
from pathlib import Path

import cloudpickle
import pytest

from backend.core.errors import BadRequest, HookUnusable
from backend.model.hookcodec import decode_hook
from lsmlflow.pickling import encode_hook
from tests.support.hooks import choices_post

FIXTURES = Path(__file__).parent / "fixtures"


def test_empty_hook_is_identity():
    hook = decode_hook("", "pre_hook")
    assert hook.source == "identity"
    assert hook([1, 2]) == [1, 2]


def test_pickled_hook_round_trips_and_gets_only_what_it_accepts():
    def post(outputs, tasks):
        return [(o, t["id"]) for o, t in zip(outputs, tasks)]

    hook = decode_hook(encode_hook(post), "post_hook")
    assert hook.source.startswith("pickle:")
    assert hook.accepts == {"tasks"}
    assert hook(["a"], tasks=[{"id": 7}], context={"x": 1}) == [("a", 7)]


def test_one_argument_hook_gets_no_keywords():
    hook = decode_hook(encode_hook(lambda xs: [x * 2 for x in xs]), "pre_hook")
    assert hook([1, 2], tasks=[{}], context=None) == [2, 4]


def test_import_reference():
    hook = decode_hook("tests.support.hooks:choices_post", "post_hook")
    assert hook.fn is choices_post


@pytest.mark.parametrize(
    "reference, message",
    [("no_such_module_xyz:fn", "cannot be imported"), ("tests.support.hooks:nope", "has no attribute 'nope'")],
)
def test_bad_import_reference(reference, message):
    with pytest.raises(HookUnusable, match=message):
        decode_hook(reference, "post_hook")


def test_bad_base64_is_a_bad_request():
    with pytest.raises(BadRequest, match="post_hook is not valid base64"):
        decode_hook("this is not base64!", "post_hook")


def test_base64_of_garbage_is_unusable():
    import base64

    with pytest.raises(HookUnusable, match="cannot be unpickled") as info:
        decode_hook(base64.b64encode(b"not a pickle").decode(), "pre_hook")
    assert platform.python_version() in info.value.detail


def test_non_callable_pickle_is_refused():
    import base64

    with pytest.raises(HookUnusable, match="not a function"):
        decode_hook(base64.b64encode(cloudpickle.dumps([1, 2])).decode(), "post_hook")


def test_hook_from_python_310_names_both_versions():
    with pytest.raises(HookUnusable) as info:
        decode_hook((FIXTURES / "hook_py310_cloudpickle312.b64").read_text(), "post_hook")
    detail = info.value.detail
    assert "Python 3.8-3.10" in detail
    assert f"Python {platform.python_version()} with cloudpickle {cloudpickle.__version__}" in detail
    assert "module:function" in detail


@pytest.mark.parametrize("fixture", ["hook_py312_cloudpickle312.b64", "hook_py313_cloudpickle312.b64"])
def test_hook_from_newer_python_is_refused_before_it_can_crash(fixture):
    # These unpickle on 3.11 and segfault the interpreter when called: they must never be accepted.
    with pytest.raises(HookUnusable, match="compiled by another Python") as info:
        decode_hook((FIXTURES / fixture).read_text(), "post_hook")
    assert "cloudpickle 3.x" in info.value.detail


def test_hook_from_cloudpickle_2_on_same_python_works():
    hook = decode_hook((FIXTURES / "hook_py311_cloudpickle210.b64").read_text(), "post_hook")
    assert hook([1, 2]) == [{"result": [], "score": 0.0}] * 2
