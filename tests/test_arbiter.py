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
from harness.servers import ROOT, free_port, wait_until

SERVE = r"""
import sys
from backend.isolation.arbiter import BackendApplication
sys.argv = ["gunicorn", "-w", "1", "--graceful-timeout", "1", "-b", f"127.0.0.1:{sys.argv[1]}", sys.argv[2]]
BackendApplication("%(prog)s [OPTIONS] [APP_MODULE]").run()
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
