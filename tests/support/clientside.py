"""A user's hook module and its helper, written into a folder only the client's process imports from."""

from __future__ import annotations

from pathlib import Path

# The user's own hooks, in files only the client side has; the post hook swaps the model's labels, so
# a prediction shows that this code, and its helper module's, ran on the server.
HOOKS_MODULE = """
import numpy as np
from clientside_helpers import grey_level, swapped

def pre(paths):
    return np.array([[grey_level(path)] for path in paths])

def post(labels):
    return [{"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                         "value": {"choices": [swapped(label)]}}]} for label in labels]
"""
HELPERS_MODULE = """
import numpy as np
from PIL import Image

SWAP = {"dark": "light", "light": "dark"}

def grey_level(path):
    return float(np.asarray(Image.open(path).convert("L"), dtype=float).mean() / 255.0)

def swapped(label):
    return SWAP[str(label)]
"""


def write_user_modules(folder: Path) -> tuple[str, ...]:
    """Write the user's modules into ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "clientside_hooks.py").write_text(HOOKS_MODULE)
    (folder / "clientside_helpers.py").write_text(HELPERS_MODULE)
    return ("clientside_hooks", "clientside_helpers")
