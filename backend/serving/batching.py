"""Dynamic batching across requests: concurrent /predict calls share one model call.

Label Studio's interactive labeling sends one task per request, from many annotators at once; a
model called once per request wastes most of each call's fixed cost. Requests hand their chunks to
one batching thread per model process, which gathers chunks with the same hooks and labeling config
up to the model's ``batch_size`` items, waiting at most ``max_latency_ms`` for more, but only for
requests that are still submitting: a lone request never waits, nor does a batch for requests that
only wait for their answers. One model call serves the batch, and its output is split back per
request. If a gathered batch fails, each request's chunk is run again on its own, so one request's
bad input fails that request only.

Requests come before background work (what a big project's request left for later, see
``continuation``): a background chunk runs only when no request's chunk waits. An interactive
chunk (one with a ``context``) is never merged with others; one whose images the model process has
embedded already (a click that only decodes) goes to the process's interactive lane, on a thread of
its own here, so that it never waits behind another annotator's first click on a new image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.core.errors import BackendError, DeadlineExceeded, NotConfigured
from backend.isolation.modelprocess import Retired

log = logging.getLogger(__name__)

StageTimer = Callable[[str, float], None]


class Runner(Protocol):
    """What runs a batch: a ModelProcess (or a stand-in in tests)."""

    def call(self, hooks_id: str, values: list[Any], tasks: list[dict[str, Any]], context: Any,
             label_config: str) -> tuple[list[Any], dict[str, float]]: ...


@dataclass
class Chunk:
    """One request's share of a model call: its items, and where its outputs go."""

    hooks_id: str
    batch_size: int
    values: list[Any]
    tasks: list[dict[str, Any]]
    label_config: str
    context: Any = None
    timer: StageTimer | None = None
    request: object = None  # the token of the request it came from (DynamicBatcher.request)
    background: bool = False
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[str, str, int | None]:
        return self.hooks_id, self.label_config, None if self.context is None else id(self.context)



class DynamicBatcher:
    """One thread that runs every model call of one model process, gathering requests' chunks."""

    def __init__(self, runner: Runner, max_latency_ms: float = 10.0, enabled: bool = True) -> None:
        self.runner = runner
        self.max_latency_s = max_latency_ms / 1000.0
        self.enabled = enabled
        self._queue: deque[Chunk] = deque()
        self._cond = threading.Condition()
        self._submitting: set[object] = set()  # requests that may still submit a chunk
        self._thread: threading.Thread | None = None
        self._retired: Callable[[], None] | None = None
        self._finished = False  # retired, drained, and its process stopped: nothing runs here any more
        self._calling = False
        # The interactive lane: where the runner has one (a ModelProcess; not the tests' stand-ins).
        self._lane_runner: Any = runner if hasattr(runner, "call_interactive") else None
        self._lane: deque[Chunk] = deque()
        self._lane_thread: threading.Thread | None = None
        self._lane_calling = False
        self.batches = 0  # model calls made, for /health and the benchmarks
        self.items = 0
        self.interactive_calls = 0  # of them, on the interactive lane

    def idle(self) -> bool:
        """No call running and none waiting: a part-filled chunk may as well go now."""
        return not self._calling and not self._queue

    def describe(self, max_batch_size: int | None = None) -> dict[str, Any]:
        shown: dict[str, Any] = {"enabled": self.enabled, "max_latency_ms": self.max_latency_s * 1000.0}
        if max_batch_size is not None:
            shown["max_batch_size"] = max_batch_size
        shown["model_calls"], shown["items"] = self.batches, self.items
        if self.interactive_calls:
            shown["interactive_lane_calls"] = self.interactive_calls
        shown["queued"] = len(self._queue)
        return shown

    @contextmanager
    def request(self) -> Iterator[object]:
        """Around the part of one /predict that submits chunks (pass the token to its Chunks): while it
        lasts, a batch may wait for this request's chunk; once it only waits for answers, none does."""
        token = object()
        with self._cond:
            if self._finished:
                raise Retired()
            self._submitting.add(token)
        try:
            yield token
        finally:
            with self._cond:
                self._submitting.discard(token)
                self._cond.notify_all()

    def submit(self, chunk: Chunk) -> Future:
        lane = chunk.context is not None and self._lane_runner is not None and self._lane_runner.interactive(
            chunk.hooks_id, chunk.values)
        with self._cond:
            if self._finished:  # a background chunk after the end: nobody would run it
                chunk.future.set_exception(Retired())
                return chunk.future
            self._start_loop(lane)
            (self._lane if lane else self._queue).append(chunk)
            self._cond.notify_all()
        return chunk.future

    def retire(self, then: Callable[[], None]) -> None:
        """Finish what is queued and what requests still submit, then call ``then`` (stop the process)."""
        with self._cond:
            self._retired = then
            self._start_loop(lane=False)
            self._cond.notify_all()

    def _start_loop(self, lane: bool) -> None:
        """The main loop's thread (or the interactive lane's), at its first use; the caller holds the lock."""
        if lane and self._lane_thread is None:
            self._lane_thread = threading.Thread(target=self._lane_loop, name="interactive-lane", daemon=True)
            self._lane_thread.start()
        elif not lane and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
            self._thread.start()

    def _others_may_come(self) -> bool:
        """Some request is still submitting and has no chunk queued yet."""
        return bool(self._submitting.difference(c.request for c in self._queue))

    def _gather(self) -> list[Chunk] | None:
        """Wait for work; then take chunks of the first one's kind, up to its batch size. None: retired and done."""
        with self._cond:
            while not self._queue:
                if self._retired is not None and not self._submitting and not self._lane and not self._lane_calling:
                    return None
                self._cond.wait()
            foreground = [c for c in self._queue if not c.background]
            first = foreground[0] if foreground else self._queue[0]
            limit = first.batch_size if self.enabled and first.context is None else len(first.values)
            deadline = time.monotonic() + self.max_latency_s
            while self.enabled and not first.background:
                same = sum(len(c.values) for c in self._queue if c.key == first.key)
                remaining = deadline - time.monotonic()
                if same >= limit or not self._others_may_come() or remaining <= 0:
                    break
                self._cond.wait(remaining)
            ordered = [first] + [c for c in self._queue if c is not first and not c.background] + [
                c for c in self._queue if c is not first and c.background
            ]
            taken: list[Chunk] = []
            size = 0
            for chunk in ordered:
                if chunk.key != first.key or (taken and size + len(chunk.values) > limit):
                    continue
                self._queue.remove(chunk)
                if chunk.future.set_running_or_notify_cancel():  # a request past its deadline cancelled it
                    taken.append(chunk)
                    size += len(chunk.values)
            return taken

    def _loop(self) -> None:
        while True:
            chunks = self._gather()
            if chunks is None:
                break
            if chunks:
                self._run(chunks)
        with self._cond:
            self._finished = True
            self._cond.notify_all()  # the interactive lane's thread ends too
        then = self._retired
        if then is not None:
            then()

    def _lane_loop(self) -> None:
        """The interactive lane's clicks, one at a time, beside whatever the main loop runs."""
        while True:
            with self._cond:
                while not self._lane and not self._finished:
                    self._cond.wait()
                if not self._lane:
                    return
                chunk = self._lane.popleft()
                if not chunk.future.set_running_or_notify_cancel():  # past its deadline already
                    continue
                self._lane_calling = True
            try:
                chunk.future.set_result(self._call([chunk], lane=True))
            except BaseException as exc:  # noqa: BLE001 - the request's to answer, as on the main loop
                chunk.future.set_exception(exc)
            finally:
                with self._cond:
                    self._lane_calling = False
                    self._cond.notify_all()

    def _call(self, chunks: list[Chunk], lane: bool = False) -> list[Any]:
        first = chunks[0]
        values = [v for c in chunks for v in c.values]
        tasks = [t for c in chunks for t in c.tasks]
        call = self._lane_runner.call_interactive if lane else self.runner.call
        outputs, timings = call(first.hooks_id, values, tasks, first.context, first.label_config)
        for chunk in chunks:
            if chunk.timer is not None:
                for stage, seconds in timings.items():
                    chunk.timer(stage, seconds)
        self.batches += 1
        self.items += len(values)
        self.interactive_calls += lane
        return outputs

    def _run(self, chunks: list[Chunk]) -> None:
        self._calling = True
        try:
            self._run_calls(chunks)
        finally:
            self._calling = False

    def _run_calls(self, chunks: list[Chunk]) -> None:
        try:
            outputs = self._call(chunks)
        except (DeadlineExceeded, NotConfigured) as exc:  # a hang or a retirement: running each again would too
            for chunk in chunks:
                chunk.future.set_exception(exc)
            return
        except BackendError as exc:
            if len(chunks) == 1:
                chunks[0].future.set_exception(exc)
                return
            log.info("a batch of %d requests failed (%s); running each on its own", len(chunks), exc.error)
            for chunk in chunks:
                self._run_alone(chunk)
            return
        except BaseException as exc:
            log.exception("a model call failed unexpectedly")
            for chunk in chunks:
                chunk.future.set_exception(exc)
            return
        start = 0
        for chunk in chunks:
            chunk.future.set_result(outputs[start : start + len(chunk.values)])
            start += len(chunk.values)

    def _run_alone(self, chunk: Chunk) -> None:
        try:
            chunk.future.set_result(self._call([chunk]))
        except BaseException as exc:  # noqa: BLE001
            chunk.future.set_exception(exc)
