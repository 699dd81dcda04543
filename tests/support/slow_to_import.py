"""Hooks in a module that takes IMPORT_S to import: a model process that loads them by reference
(``tests.support.slow_to_import:brightness_pre``), at a configure or a restore, takes that much longer."""

from __future__ import annotations

import time

from tests.support.hooks import brightness_pre, choices_post

IMPORT_S = 2.0
time.sleep(IMPORT_S)

__all__ = ["brightness_pre", "choices_post"]
