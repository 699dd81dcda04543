"""Big projects: what a request could not finish before its deadline goes on in the background.

Label Studio's "Retrieve predictions" sends every selected task in one /predict and waits 100 s. A
project whose work takes longer used to get a 504 and nothing stored, round after round. Now the
request answers at its deadline with what is done (and ``[]``, which stores nothing, for the rest);
the rest goes on here, one queue per configuration, into a ``PredictionCache``; the next round
answers those at once and carries on with whatever is still missing. A task is never predicted
twice: a round that asks for a task still queued here waits for it instead of starting it again.

Entries are keyed by the configuration (model, hooks, resolved version), the labeling config, the
task's id and a digest of its data, so a new model version or changed task data never gets a stale
prediction. The cache is bounded by size and age; a reconfigure drops the queue and the old entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from backend.serving.batching import Chunk, DynamicBatcher

log = logging.getLogger(__name__)

CacheKey = tuple[str, str, Any, str]  # configuration identity, labeling config digest, task id, data digest
MAX_CHUNKS_IN_FLIGHT = 2  # enough to keep the model busy, few enough that requests' chunks go first
MAX_FAILED_IN_A_ROW = 3
CACHE_FILE = "prediction-cache.json"  # under MODEL_DIR: one worker's cache between a stop and the next start


def _digest(value: Any) -> str:
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def task_keys(identity: str, label_config: str, tasks: Sequence[dict[str, Any]]) -> list[CacheKey]:
    """One cache key per task: changed data or another model version is another key."""
    config = hashlib.blake2b(label_config.encode(), digest_size=8).hexdigest()
    return [(identity, config, task.get("id"), _digest(task.get("data"))) for task in tasks]


class PredictionCache:
    """Encoded predictions finished in the background, until a round asks for them; LRU by size and age."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.ttl_s, self.clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[CacheKey, tuple[float, str]] = OrderedDict()
        self._bytes = 0
        self._per_identity: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def holds(self, identity: str) -> bool:
        """Anything for this configuration: only then is it worth computing a request's keys."""
        return self._per_identity.get(identity, 0) > 0

    def get_many(self, keys: Sequence[CacheKey]) -> dict[int, str]:
        """The entries there are, by the keys' places."""
        found = {index: self.get(key) for index, key in enumerate(keys)}
        return {index: encoded for index, encoded in found.items() if encoded is not None}

    def get(self, key: CacheKey) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self.clock() - entry[0] > self.ttl_s:
                self._remove(key)
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: CacheKey, encoded: str) -> None:
        if len(encoded) > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (self.clock(), encoded)
            self._bytes += len(encoded)
            self._per_identity[key[0]] = self._per_identity.get(key[0], 0) + 1
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def settle(self, done: Sequence[tuple[CacheKey, str]], released: Sequence[CacheKey] = ()) -> None:
        """The background finished these (and gave up on ``released``)."""
        for key, encoded in done:
            self.put(key, encoded)

    def save(self, path: Path) -> int:
        """Write what is held, with each entry's age, for the next start of this backend (it is stopped to
        sleep, or restarted): a finished prediction is not computed again. How many were written."""
        with self._lock:
            now = self.clock()
            entries = [[list(key), now - at, encoded] for key, (at, encoded) in self._entries.items()]
        if not entries:
            path.unlink(missing_ok=True)
            return 0
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(entries, separators=(",", ":")))
        partial.chmod(0o600)
        partial.replace(path)
        return len(entries)

    def load(self, path: Path) -> int:
        """What ``save`` wrote, those still young enough; the file is read once. How many were taken."""
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0
        finally:
            path.unlink(missing_ok=True)
        now, taken = self.clock(), 0
        for key, age, encoded in entries if isinstance(entries, list) else []:
            if isinstance(age, (int, float)) and 0 <= age <= self.ttl_s and isinstance(encoded, str):
                restored: CacheKey = tuple(key)  # as task_keys made it
                self.put(restored, encoded)
                with self._lock:
                    if restored in self._entries:  # its age as it was, so the TTL still counts from its making
                        self._entries[restored] = (now - age, encoded)
                        taken += 1
        return taken

    def claim(self, keys: Sequence[CacheKey]) -> set[CacheKey]:
        """Which of these the background may take on: all of them, where there is one worker."""
        return set(keys)

    def watch(self, wanted: dict[int, CacheKey], deadline: float) -> dict[int, Future]:
        """Futures of the tasks another worker predicts: none, where there is one worker."""
        return {}

    def maintain(self) -> None:
        """Nothing to do in memory: ``put`` keeps the bounds (the shared store trims on the ticker)."""

    def keep_only(self, identity: str) -> None:
        """A new configuration serves: drop every other configuration's entries."""
        with self._lock:
            for key in [k for k in self._entries if k[0] != identity]:
                self._remove(key)

    def _remove(self, key: CacheKey) -> None:
        _, encoded = self._entries.pop(key)
        self._bytes -= len(encoded)
        left = self._per_identity[key[0]] - 1
        if left:
            self._per_identity[key[0]] = left
        else:
            del self._per_identity[key[0]]

    def describe(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes, "hits": self.hits}


class Predictions(Protocol):
    """What /predict and the background need of a prediction cache: the one above, or, with several
    workers, the store they share (``shared.SharedPredictions``), where the background also claims its tasks."""

    hits: int

    def holds(self, identity: str) -> bool: ...
    def get_many(self, keys: Sequence[CacheKey]) -> dict[int, str]: ...
    def settle(self, done: Sequence[tuple[CacheKey, str]], released: Sequence[CacheKey] = ()) -> None: ...
    def claim(self, keys: Sequence[CacheKey]) -> set[CacheKey]: ...
    def watch(self, wanted: dict[int, CacheKey], deadline: float) -> dict[int, Future]: ...
    def maintain(self) -> None: ...
    def keep_only(self, identity: str) -> None: ...
    def save(self, path: Path) -> int: ...
    def describe(self) -> dict[str, Any]: ...


Finish = Callable[[list[Any], list[dict[str, Any]], str], list["str | Exception"]]


@dataclass
class Leftover:
    """One task the request did not finish: either its chunk is still running (``running``: the chunk's
    future and the task's place in it) or it was never started (``resolve`` waits for its data)."""

    key: CacheKey
    task: dict[str, Any]
    label_config: str
    running: tuple[Future, int] | None = None
    resolve: Callable[[], Any] | None = None  # -> TaskInput
    done: Future = field(default_factory=Future)  # the encoded prediction, or the reason there is none


@dataclass
class _Progress:
    total: int = 0
    done: int = 0
    failed: int = 0
    started_at: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    last_error: str = ""
    failed_in_a_row: int = 0

    def rate(self) -> float:
        """Tasks per second over the last half minute of finished chunks."""
        now = time.monotonic()
        points = [(t, n) for t, n in self.recent if now - t < 30.0]
        if not points:
            return 0.0
        span = max(now - points[0][0], 0.5)
        return sum(n for _, n in points) / span


class Continuation:
    """The background queue of one configuration, and the thread that works it."""

    def __init__(self, batcher: DynamicBatcher, cache: Predictions, hooks_id: str, batch_size: int,
                 finish: Finish, max_tasks: int, on_progress: Callable[[str, int], None] | None = None,
                 on_adopt: Callable[[list[dict[str, Any]], str], None] | None = None,
                 on_done: Callable[[dict[str, Any], str], None] | None = None,
                 on_failed: Callable[[dict[str, Any], str], None] | None = None) -> None:
        """``on_adopt``: the tasks (and their labeling config) taken on; ``on_done``/``on_failed``: each task as
        it is finished (its encoded prediction) or given up (why)."""
        self.batcher, self.cache, self.hooks_id, self.batch_size = batcher, cache, hooks_id, batch_size
        self.finish, self.max_tasks, self.on_progress = finish, max_tasks, on_progress
        self.on_adopt, self.on_done, self.on_failed = on_adopt, on_done, on_failed
        self._queue: deque[Leftover] = deque()
        self._waiting: dict[CacheKey, Leftover] = {}  # queued or running, by key
        self._running: dict[Future, list[Leftover]] = {}
        self._own: set[Future] = set()  # the running chunks this queue submitted (not adopted ones)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.progress = _Progress()

    @property
    def active(self) -> bool:
        return bool(self._waiting)

    def pending(self, key: CacheKey) -> Future | None:
        """The future of a task this queue holds: a round that wants it waits for it rather than start it again."""
        leftover = self._waiting.get(key)
        return leftover.done if leftover is not None else None

    def adopt(self, leftovers: list[Leftover]) -> int:
        """Take over what a request left; returns how many were taken (the queue is bounded)."""
        with self._cond:
            if self._stopped:
                return 0
            room = self.max_tasks - len(self._waiting)
            taken = [left for left in leftovers if left.key not in self._waiting][: max(room, 0)]
            # Another worker's background may have taken a task since the request looked; what already
            # runs here is finished here anyway.
            ours = self.cache.claim([left.key for left in taken])
            taken = [left for left in taken if left.key in ours or left.running is not None]
            if not self._waiting:
                self.progress = _Progress(started_at=time.monotonic())
            for left in taken:
                self._waiting[left.key] = left
                if left.running is not None:
                    self._running.setdefault(left.running[0], []).append(left)
                else:
                    self._queue.append(left)
            self.progress.total += len(taken)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="background", daemon=True)
                self._thread.start()
            if taken and self.on_adopt is not None:  # under the lock: before any of them can be done
                self.on_adopt([left.task for left in taken], taken[0].label_config)  # one request, one labeling config
            self._cond.notify_all()
        self._report()
        return len(taken)

    def stop(self) -> None:
        """A new configuration serves: drop the queue; what runs finishes but is not kept."""
        with self._cond:
            self._stopped = True
            self.cache.settle([], released=list(self._waiting))
            for left in self._waiting.values():
                left.done.cancel()
            self._waiting.clear()
            self._queue.clear()
            for future in self._own:
                future.cancel()  # not yet started: the batcher drops it
            self._running.clear()
            self._own.clear()
            self._cond.notify_all()
        self._report()

    def describe(self) -> dict[str, Any]:
        p = self.progress
        left = len(self._waiting)
        rate = p.rate()
        shown: dict[str, Any] = {"queued": left, "done": p.done, "failed": p.failed, "total": p.total,
                                 "rate_per_s": round(rate, 2)}
        if left:
            shown["eta_s"] = round(left / rate, 1) if rate else None
        if p.last_error:
            shown["last_error"] = p.last_error
        return shown

    # -- the thread ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._running and not self._queue:
                    self._cond.wait()
                if self._stopped:
                    return
                own = len(self._own)
                batch: list[Leftover] = []
                if own < MAX_CHUNKS_IN_FLIGHT and self._queue:
                    config = self._queue[0].label_config
                    while self._queue and len(batch) < self.batch_size and self._queue[0].label_config == config:
                        batch.append(self._queue.popleft())
                running = list(self._running)
            if batch:
                self._submit(batch)
                continue
            finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                with self._cond:
                    leftovers = self._running.pop(future, [])
                    self._own.discard(future)
                self._collect(future, leftovers)

    def _submit(self, batch: list[Leftover]) -> None:
        ready, values = [], []
        for left in batch:
            task_input = left.resolve() if left.resolve is not None else None
            if task_input is None or task_input.error:
                self._fail([left], task_input.error if task_input is not None else "its data was not fetched",
                           model_failed=False)
                continue
            ready.append(left)
            values.append(task_input.value)
        if not ready:
            return
        chunk = Chunk(self.hooks_id, self.batch_size, values, [left.task for left in ready], ready[0].label_config,
                      background=True)
        for position, left in enumerate(ready):
            left.running = (chunk.future, position)
        with self._cond:
            if self._stopped:
                return
            self._running[chunk.future] = ready
            self._own.add(chunk.future)
        self.batcher.submit(chunk)

    def _collect(self, future: Future, leftovers: list[Leftover]) -> None:
        if not leftovers:
            return
        try:
            outputs = future.result()
        except BaseException as exc:  # noqa: BLE001 - a failed batch fails its tasks, not the queue
            self._fail(leftovers, getattr(exc, "error", None) or f"{type(exc).__name__}: {exc}")
            return
        mine = [left for left in leftovers if left.running is not None]  # one chunk: one labeling config
        outputs = [outputs[left.running[1]] for left in mine]  # type: ignore[index]
        finished = self.finish(outputs, [left.task for left in mine], mine[0].label_config)
        if mine and all(isinstance(result, Exception) for result in finished):
            self._fail(mine, str(finished[0]))  # not one prediction fits: the hook, not the tasks
            return
        self.cache.settle([(left.key, result) for left, result in zip(mine, finished) if isinstance(result, str)])
        for left, result in zip(mine, finished):
            if isinstance(result, Exception):
                self._fail([left], str(result), model_failed=False)
            else:
                self._done(left, result)
        with self._cond:
            self.progress.recent.append((time.monotonic(), len(mine)))
            self.progress.failed_in_a_row = 0
        self._report()

    def _done(self, left: Leftover, encoded: str) -> None:
        with self._cond:
            self._waiting.pop(left.key, None)
            self.progress.done += 1
        if self.on_done is not None and not left.done.done():  # not once a new configuration stopped the queue
            self.on_done(left.task, encoded)
        if not left.done.done():
            left.done.set_result(encoded)

    def _fail(self, leftovers: list[Leftover], reason: str, model_failed: bool = True) -> None:
        """These tasks get no prediction. Model calls that fail MAX_FAILED_IN_A_ROW times in a row (a broken
        hook, a hang) stop the queue; a task whose data failed counts for itself only."""
        self.cache.settle([], released=[left.key for left in leftovers])
        with self._cond:
            for left in leftovers:
                self._waiting.pop(left.key, None)
                if not left.done.done():
                    left.done.set_exception(RuntimeError(reason))
                    if self.on_failed is not None:
                        self.on_failed(left.task, reason)
            self.progress.failed += len(leftovers)
            self.progress.last_error = reason
            if model_failed:
                self.progress.failed_in_a_row += 1
            give_up = self.progress.failed_in_a_row >= MAX_FAILED_IN_A_ROW and bool(self._queue)
            dropped = list(self._queue) if give_up else []
            if give_up:
                self._queue.clear()
        log.warning("background prediction of %d task(s) failed: %s", len(leftovers), reason)
        if dropped:
            log.error("background work stopped after %d failures in a row; %d queued task(s) dropped",
                      MAX_FAILED_IN_A_ROW, len(dropped))
            self._fail(dropped, f"dropped after {MAX_FAILED_IN_A_ROW} failures in a row (last: {reason})",
                       model_failed=False)
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress("queued", len(self._waiting))
