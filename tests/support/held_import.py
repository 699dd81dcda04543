"""Hooks in a module whose import waits until the file named by ``$HOLD_IMPORT_UNTIL`` exists (60 s at
most): a model process that loads them by reference (``tests.support.held_import:brightness_pre``), at
a configure or a restore, is held there until the test lets it go."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.hooks import brightness_pre, choices_post

_release = os.environ.get("HOLD_IMPORT_UNTIL")
if _release:
    _deadline = time.monotonic() + 60
    while not Path(_release).exists() and time.monotonic() < _deadline:
        time.sleep(0.02)

__all__ = ["brightness_pre", "choices_post"]
