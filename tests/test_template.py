"""The backends' template on its own: a real template process (with nothing to import, so it is quick),
asked for zygotes as a worker asks, and refusing what is not a request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backend.forking import ForkClient, ForkUnavailable
from backend.template import request_zygote
from backend.zygote import Zygote
from harness.servers import ROOT, wait_until
from orchestrator.drivers.template import SOCKET_PATH_MAX, socket_path


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "t.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.template", str(path), ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_until(path.exists, 30, "the template's socket", proc)
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    owner.connect(str(path))
    client = ForkClient(owner, "test-owner", forks_die_with_server=False)
    client.send(("owner", 0))
    yield path, client, proc
    client.close()
    proc.kill()
    proc.wait()


def test_it_forks_warm_zygotes_in_their_own_session_and_ends_with_its_last_owner(template):
    path, owner, proc = template
    assert path.stat().st_mode & 0o777 == 0o600  # only this user may ask it for anything
    warmed = threading.Event()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_side = ForkClient(mine, "test-zygote", on_message=lambda m: m[0] == "warmed" and warmed.set())
    pid = request_zygote(str(path), {"PATH": os.environ["PATH"], "ZYGOTE_TEST": "1"}, theirs.fileno(), ())
    theirs.close()
    assert warmed.wait(10)
    assert os.getsid(pid) == pid and Path(f"/proc/{pid}/comm").read_text().strip() == "lsb-zygote"
    assert b"ZYGOTE_TEST=1" not in Path(f"/proc/{pid}/environ").read_bytes()  # its start's, not the one it adopted

    # Not a request: refused by name, the template serves on.
    with pytest.raises(ForkUnavailable, match="not a request: 'backend' with 0 descriptors"):
        owner.fork("backend", (["gunicorn"], "/"), [], 5)

    worker_side.close()  # the worker gone, its zygote ends
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the zygote to end")
    owner.close()  # the last owner gone, the template ends and removes its socket
    assert proc.wait(10) == 0 and not path.exists()


def test_a_worker_without_a_template_starts_its_zygote_as_a_new_python(tmp_path):
    zygote = Zygote(template=str(tmp_path / "nobody-listens.sock")).start()
    try:
        assert zygote.alive and not zygote.forked_from_template
    finally:
        zygote.close()
    with pytest.raises(ForkUnavailable, match="cannot connect"):
        request_zygote(str(tmp_path / "nobody-listens.sock"), {}, 0, ())


def test_a_state_folder_too_deep_for_a_socket_gets_a_private_short_one(tmp_path):
    short = socket_path(tmp_path)
    assert short == tmp_path.resolve() / "template.sock"
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = socket_path(deep)
    assert len(os.fsencode(path)) <= SOCKET_PATH_MAX and path != socket_path(tmp_path / "other")
    assert path.parent.stat().st_mode & 0o777 == 0o700 and path == socket_path(deep)
