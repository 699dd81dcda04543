"""Interactive clicks sent again: answered once.

Label Studio sends an interactive request again when the annotator submits (and a double click sends
it twice): the same task, the same click. Computing it again costs a model call and, worse, can give a
region that differs by a pixel, which the editor then shows twice. Within INTERACTIVE_REPEAT_S the same
click on the same task, under the same configuration and labeling config, gets the first answer; one
that arrives while the first is still computed waits for it. Failures are not kept: the next try
computes again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
MAX_CLICKS = 1024


def click_key(identity: str, label_config: str, tasks: list[dict[str, Any]], context: Any) -> str:
    """What makes two interactive requests the same click: the configuration serving, the labeling config,
    the tasks (id and data) and the click's regions, less the ids the editor gives each region anew."""
    regions = context.get("result") if isinstance(context, dict) else None
    click = [{k: v for k, v in r.items() if k != "id"} if isinstance(r, dict) else r for r in regions] if isinstance(regions, list) else context
    what = [identity, label_config, [(t.get("id"), t.get("data")) for t in tasks], click]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class RepeatedClicks:
    """Answers of recent clicks, by ``click_key``, for ``keep_s`` seconds (0: none kept)."""

    def __init__(self, keep_s: float, max_clicks: int = MAX_CLICKS) -> None:
        self.keep_s = keep_s
        self.max_clicks = max_clicks
        self._lock = threading.Lock()
        self._clicks: OrderedDict[str, tuple[float, Future]] = OrderedDict()
        self.repeats = 0

    def once(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """``compute()``'s result, or that of the same click within ``keep_s``; True where it was a repeat."""
        if self.keep_s <= 0:
            return compute(), False
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            held = self._clicks.get(key)
            if held is None:
                mine: Future = Future()
                self._clicks[key] = (now, mine)
                while len(self._clicks) > self.max_clicks:
                    self._clicks.popitem(last=False)
            else:
                self.repeats += 1
        if held is not None:
            return held[1].result(), True
        try:
            result = compute()
        except BaseException as exc:
            with self._lock:
                if self._clicks.get(key, (0, None))[1] is mine:
                    del self._clicks[key]
            mine.set_exception(exc)
            raise
        mine.set_result(result)
        return result, False

    def _expire(self, now: float) -> None:
        while self._clicks:
            key, (at, future) = next(iter(self._clicks.items()))
            if now - at < self.keep_s or not future.done():
                break
            del self._clicks[key]
