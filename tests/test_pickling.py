"""How the client pickles hooks: the user's modules by value, the server's own by reference, the
server's Python and cloudpickle checked before anything is sent. No server needed."""

from __future__ import annotations

import base64
import sys

import cloudpickle
import pytest

from lsmlflow import HookNotPortable
from lsmlflow.pickling import check_portable, encode_hook, load_reference, runtime_versions


def test_hooks_are_checked_against_the_servers_runtime_before_they_are_sent():
    here = runtime_versions()
    check_portable(here, "the backend")  # the same runtime
    check_portable(None, "an older backend")  # it does not say: its own check decides
    major, minor, _ = here["python"].split(".")
    other = {**here, "python": f"{major}.{int(minor) + 1}.0"}
    with pytest.raises(HookNotPortable) as python:
        check_portable(other, "the backend")
    assert f"Python {major}.{int(minor) + 1}.0" in python.value.error and "'module:function'" in python.value.detail
    with pytest.raises(HookNotPortable, match="cloudpickle 2.2.1"):
        check_portable({**here, "cloudpickle": "2.2.1"}, "the backend")


def test_hooks_of_the_servers_own_package_go_by_reference_and_the_users_by_value(client_side):
    from backend.model.hookcodec import decode_hook
    from hooks.pre import read_texts

    assert encode_hook(read_texts) == "hooks.pre:read_texts"  # readable on /health, imported by the server
    assert encode_hook("mypackage.hooks:post") == "mypackage.hooks:post"
    assert encode_hook(None) == ""

    payload = base64.b64decode(encode_hook(client_side.post))
    assert b"clientside_helpers" in payload and b"SWAP" in payload  # the helper module's code travels too
    assert "clientside_hooks" not in cloudpickle.list_registry_pickle_by_value()  # registered only while pickling
    hook = decode_hook(encode_hook(client_side.post), "post_hook")  # as the backend decodes it
    assert hook(["dark"]) == [{"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                                           "value": {"choices": ["light"]}}]}]


def test_the_cli_loads_hooks_from_files_and_modules_and_says_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "myhooks.py").write_text("from helper import twice\n\ndef post(xs):\n    return twice(xs)\n\nVALUE = 3\n")
    (tmp_path / "helper.py").write_text("def twice(xs):\n    return [x * 2 for x in xs]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader puts the file's folder on it
    try:
        by_path = load_reference("myhooks.py:post", "--post-hook")
        assert by_path([1, 2]) == [2, 4]
        assert load_reference("myhooks:post", "--post-hook")([3]) == [6]
        payload = encode_hook(by_path)
        assert b"twice" in base64.b64decode(payload)  # its neighbour module travels with it
        import hooks

        (tmp_path / "hooks.py").write_text("def post(xs):\n    return ['mine' for _ in xs]\n")
        own = load_reference("hooks.py:post", "--post-hook")  # a user's hooks.py beside ours
        assert own([1]) == ["mine"] and sys.modules["hooks"] is hooks  # ours is not replaced
        assert not encode_hook(own).startswith("hooks")  # and the user's goes by value, not as a reference
        for reference, message in [
            ("myhooks", "is not 'module:function'"),
            ("nothere.py:post", "no file 'nothere.py'"),
            ("myhooks:nothing", "'myhooks' has no 'nothing'"),
            ("myhooks:VALUE", "is not a function"),
            ("no_such_module:post", "cannot import 'no_such_module'"),
        ]:
            with pytest.raises(HookNotPortable, match=message):
                load_reference(reference, "--post-hook")
    finally:
        for name in ("myhooks", "helper", "lsmlflow_user_hooks"):
            sys.modules.pop(name, None)


def test_a_configure_body_carries_every_hook_encoded(client_side):
    from backend.model.hookcodec import TRAIN_ARGUMENTS, decode_hook
    from lsmlflow.client import configure_body

    def train(inputs, annotations):
        return client_side.swapped(annotations[0])

    body = configure_body("models:/m/1", post_hook=client_side.post, train_hook=train, label_config="<View/>",
                          training={"trigger": "manual"})
    assert body["pre_hook"] == "" and body["label_config"] == "<View/>" and body["training"] == {"trigger": "manual"}
    assert decode_hook(body["train_hook"], "train_hook", TRAIN_ARGUMENTS)([], ["dark"]) == "light"
