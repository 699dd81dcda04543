"""The model zoo's own virtual environment: torchvision and ultralytics on the CUDA torch they need
(which runs on CPU here), with requirements.txt, made once per machine (``environments``) and keyed by
``requirements-zoo.txt``, so a change of pins makes a new one."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from harness.environments import CACHE, cached_environment
from harness.servers import ROOT, base_env

REQUIREMENTS = ROOT / "requirements-zoo.txt"


class ZooUnavailable(Exception):
    """The zoo's environment could not be made here; the message says why."""


def zoo_python() -> Path:
    """The python of the cached zoo environment, installing it the first time (a few minutes, ~5.5 GB)."""
    pins = REQUIREMENTS.read_bytes() + (ROOT / "requirements.txt").read_bytes()
    try:
        venv = cached_environment(f"zoo-{hashlib.sha256(pins).hexdigest()[:12]}", ["-r", str(REQUIREMENTS)], ROOT, 1800)
    except RuntimeError as exc:
        raise ZooUnavailable(str(exc)) from exc
    return venv / "bin" / "python"


# What the zoo's processes run with: offline, and ultralytics' settings file under the test cache.
ZOO_ENV = {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(CACHE / "ultralytics-settings")}


def register_zoo(python: Path, tracking_uri: str) -> None:
    """The zoo's models registered in ``tracking_uri``, by ``python -m examples.zoo`` run in their environment."""
    result = subprocess.run([str(python), "-m", "examples.zoo", tracking_uri], capture_output=True, text=True,
                            timeout=600, check=False, cwd=ROOT, env=base_env(**ZOO_ENV))
    if result.returncode != 0:
        raise ZooUnavailable(f"registering the zoo failed: {result.stderr[-3000:]}")
