"""Virtual environments the tests need beside the main one (Label Studio's, the model zoo's), made once
per machine under ``~/.cache/lsbackend-e2e`` (``LSBACKEND_E2E_CACHE``) and kept; a lock makes test
processes running side by side wait for one install rather than make two."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("LSBACKEND_E2E_CACHE") or Path.home() / ".cache" / "lsbackend-e2e")


def cached_environment(name: str, pip_args: list[str], cwd: Path, timeout_s: float) -> Path:
    """The folder of the environment ``name``, made with ``pip install *pip_args`` the first time.
    Raises RuntimeError saying what failed."""
    venv = CACHE / name
    done = venv / ".installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        for step in ([sys.executable, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "-q", *pip_args]):
            try:
                result = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=cwd)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"making {venv} failed: {exc}") from exc
            if result.returncode != 0:
                raise RuntimeError(f"making {venv} failed: {result.stderr[-1500:]}")
        done.touch()
        return venv
