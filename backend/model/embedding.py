"""The per-image state of a promptable model (SAM-style: encode the image once, decode each click).

An ``embed_hook(inputs, **extras) -> one state per input`` turns a task's data (the local file the
worker fetched, or its text) into what the model needs again at every click, typically the image
encoder's output. The model process keeps these states here, least recently used first out, bounded
in bytes (EMBED_CACHE_MB), so a second click on an image runs only the cheap part; a state belongs
to its hook set, and goes when that hook set is replaced (a new configuration).

Two threads use it: the model process's main lane (which embeds new images) and its interactive lane
(clicks on images embedded already, see ``isolation/modelprocess.py``), so lookups and stores hold a
lock, and the embedding itself runs outside it.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

Compute = Callable[[list[Any]], list[Any]]


def state_bytes(state: Any) -> int:
    """What a state holds in memory: arrays and tensors by their buffers, anything else by its pickle."""
    nbytes = getattr(state, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(state, "element_size") and hasattr(state, "nelement"):  # a torch tensor
        return int(state.element_size() * state.nelement())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(part) for part in state) + 56
    if isinstance(state, dict):
        return sum(state_bytes(part) for part in state.values()) + 232
    try:
        return len(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - an unpicklable state still counts
        return 1 << 20


def input_key(value: Any) -> Hashable:
    """The identity of one input: a file by path, size and modification time (the fetch cache rewrites a
    changed file), a text by itself."""
    if isinstance(value, str) and os.path.isabs(value):
        try:
            info = os.stat(value)
        except OSError:
            return ("text", value)
        return ("file", value, info.st_size, info.st_mtime_ns)
    try:
        hash(value)
    except TypeError:
        return ("pickle", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return ("value", value)


@dataclass
class EmbeddingCache:
    """States by (hook set, input), least recently used out first once ``max_bytes`` is passed."""

    max_bytes: int
    _entries: OrderedDict[tuple[str, Hashable], tuple[Any, int]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    held_bytes: int = 0
    hits: int = 0
    misses: int = 0

    def states(self, hooks_id: str, values: list[Any], compute: Compute) -> list[Any]:
        """One state per value: the cached ones, and ``compute`` (called once, on the missing values
        only) for the rest."""
        keys = [(hooks_id, input_key(value)) for value in values]
        found: dict[int, Any] = {}
        with self._lock:
            for index, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[index] = entry[0]
            firsts: dict[tuple[str, Hashable], int] = {}  # a batch holding one image twice embeds it once
            for index in range(len(values)):
                if index not in found:
                    firsts.setdefault(keys[index], index)
            missing = list(firsts.values())
            self.hits += len(values) - len(missing)
            self.misses += len(missing)
        if missing:
            computed = compute([values[index] for index in missing])
            if not isinstance(computed, (list, tuple)) or len(computed) != len(missing):
                got = len(computed) if isinstance(computed, (list, tuple)) else f"a {type(computed).__name__}"
                raise ValueError(f"embed_hook returned {got} states for {len(missing)} inputs; return a list, one state per input")
            fresh = {keys[index]: state for index, state in zip(missing, computed)}
            with self._lock:
                for key, state in fresh.items():
                    self._put(key, state)
            for index in range(len(values)):
                if index not in found:
                    found[index] = fresh[keys[index]]
        return [found[index] for index in range(len(values))]

    def _put(self, key: tuple[str, Hashable], state: Any) -> None:
        size = state_bytes(state)
        if size > self.max_bytes:
            return  # larger than the whole cache: used for this call, kept for none
        old = self._entries.pop(key, None)
        if old is not None:
            self.held_bytes -= old[1]
        self._entries[key] = (state, size)
        self.held_bytes += size
        while self.held_bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.held_bytes -= dropped

    def forget(self, hooks_id: str) -> None:
        """Drop a replaced hook set's states."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == hooks_id]:
                self.held_bytes -= self._entries.pop(key)[1]

    def describe(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.held_bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}
