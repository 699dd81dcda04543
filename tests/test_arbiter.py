"""The backends' gunicorn master (backend/isolation/arbiter.py), a real one: a stop ends the master once its worker
has ended, and a worker that ignores the stop is still killed once the grace period is over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from backend.core.lifetime import start_time
from backend.isolation.arbiter import BackendApplication
from harness.servers import ROOT, free_port, wait_until

SERVE = r"""
import sys
from backend.isolation.arbiter import BackendApplication
sys.argv = ["gunicorn", "-w", "1", "--graceful-timeout", "1", "-b", f"127.0.0.1:{sys.argv[1]}", sys.argv[2]]
BackendApplication().run()
"""

APP = r"""
import signal
import sys

if "stubborn" in __name__:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # loaded after gunicorn's handlers: the worker ignores a stop


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(__import__("os").getpid()).encode()]
"""


@pytest.mark.parametrize("module", ["polite", "stubborn"])
def test_a_stopped_master_ends_after_its_worker(tmp_path: Path, module: str):
    (tmp_path / f"{module}.py").write_text(APP)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    master = subprocess.Popen([sys.executable, "-c", SERVE, str(port), f"{module}:app"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: requests.get(url, timeout=1).ok, 30, "the backend", master)
        worker = int(requests.get(url, timeout=5).text)
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0, master.stdout.read() if master.stdout else ""
        assert start_time(worker) == ""  # ended (the stubborn one killed past the grace period)
    finally:
        master.kill()
        master.wait()


def test_a_master_starts_from_the_templates_settings_read_with_its_own_environment(tmp_path: Path, monkeypatch):
    """The template makes gunicorn's settings once; the master forked next takes them, with its own command line
    and environment (a fork adopts its environment after the template made them), and a later one (gunicorn's
    reload) makes new ones."""
    monkeypatch.chdir(tmp_path)  # no gunicorn.conf.py here
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    BackendApplication.prepare()
    try:
        prepared, _ = BackendApplication.prepared or (None, None)
        monkeypatch.setenv("GUNICORN_CMD_ARGS", "--threads 7")
        monkeypatch.setattr(sys, "argv", ["gunicorn", "-b", "127.0.0.1:9", "app:app"])
        first = BackendApplication()
        assert first.cfg is prepared
        assert (first.cfg.threads, first.cfg.bind) == (7, ["127.0.0.1:9"])
        assert BackendApplication.prepared is None
        second = BackendApplication()
        assert second.cfg is not prepared
        assert (second.cfg.threads, second.cfg.bind) == (7, ["127.0.0.1:9"])
    finally:
        BackendApplication.prepared = None
