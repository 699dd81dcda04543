"""The default driver: each backend is a gunicorn process on its own loopback port.

Backends run in their own session, so they outlive an orchestrator restart and are re-adopted by
their handle ("pid:starttime", which a recycled pid cannot match). Their output goes to a log file
beside their MODEL_DIR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..registry import BackendRecord
from ..settings import OrchestratorSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages once installed
GUNICORN_CONFIG = "python:backend.gunicorn_conf"
# The orchestrator's own settings are not the backend's: each backend gets its own below.
NOT_INHERITED = ("HOST", "PORT", "MODEL_DIR", "CONFIGURE_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WORKERS")
LOG_ROTATE_BYTES = 5 << 20


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), or '' where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields_after_name = stat.rpartition(")")[2].split()
    return fields_after_name[19] if fields_after_name[0] != "Z" else ""


def backend_environment(settings: OrchestratorSettings, record: BackendRecord) -> dict[str, str]:
    """A gunicorn backend's environment, but for where it listens and its GPUs (which the driver sets)."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        MODEL_DIR=record.model_dir,
        CONFIGURE_TOKEN=record.token,
        THREADS=str(settings.backend_threads),
        GRACEFUL_TIMEOUT=env.get("GRACEFUL_TIMEOUT", "3"),
        PYTHONUNBUFFERED="1",
    )
    if record.spare:
        env["WARM_IMPORTS"] = settings.spare_warm_imports
    return env


def log_path(record: BackendRecord) -> Path:
    return Path(record.model_dir).parent / "backend.log"


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file, reading only its end."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * max(lines, 1)))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class ProcessDriver:
    """gunicorn children on free loopback ports, one per backend."""

    name = "process"

    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self._children: dict[int, subprocess.Popen] = {}

    def environment(self, record: BackendRecord) -> dict[str, str]:
        env = backend_environment(self.settings, record)
        env.update(HOST="127.0.0.1", PORT=str(record.port))
        if record.gpu:
            env["CUDA_VISIBLE_DEVICES"] = record.gpu
        return env

    def start(self, record: BackendRecord) -> str:
        log = log_path(record)
        log.parent.mkdir(parents=True, exist_ok=True)
        if log.exists() and log.stat().st_size > LOG_ROTATE_BYTES:
            log.replace(log.with_suffix(".log.1"))
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            GUNICORN_CONFIG,
            "--chdir",
            str(PROJECT_ROOT),
            "wsgi:app",
        ]
        with log.open("ab") as output:
            child = subprocess.Popen(
                command,
                env=self.environment(record),
                cwd=PROJECT_ROOT,  # where python -m finds backend.gunicorn_conf and wsgi
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the orchestrator; killed as a group
            )
        self._children[child.pid] = child
        return f"{child.pid}:{_start_time(child.pid)}"

    def _pid(self, record: BackendRecord) -> int:
        pid, _, _ = record.handle.partition(":")
        return int(pid) if pid.isdigit() else 0

    def is_running(self, record: BackendRecord) -> bool:
        pid = self._pid(record)
        if not pid:
            return False
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        started = record.handle.partition(":")[2]
        now = _start_time(pid)
        return bool(now) and (not started or now == started)

    def exit_reason(self, record: BackendRecord) -> str:
        child = self._children.get(self._pid(record))
        if child is None or child.returncode is None:
            return "the process is gone"
        code = child.returncode
        return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    def stop(self, record: BackendRecord) -> None:
        pid = self._pid(record)
        if not pid or not self.is_running(record):
            self._children.pop(pid, None)
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while self.is_running(record) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.is_running(record):
                break
        self._children.pop(pid, None)

    def forget(self, record: BackendRecord) -> None:
        """Nothing outlives a stopped process but its folder, which the manager removes."""

    def pending_reason(self, record: BackendRecord) -> str:
        return ""  # started is placed

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        return tail(log_path(record), lines)
