"""Wakes in turns: at most WAKE_TURNS sleeping backends woken at once, the other requests waiting in line.

A wake is mostly CPU: forks, gunicorn's start, the model's load and its first prediction. Side by side on
a busy machine, n wakes share the cores and each ends about n times later than it would alone, and
together they take the CPU that the awake backends' predictions need. In turns (by default one fewer than
the machine's cores, at least one) the first to ask is the first answered, and the awake backends keep
their share.
Measured with ``python -m bench fleet`` on 2 cores: see bench/RESULTS.md.

A request takes a turn only where it starts a sleeping backend itself (one that finds another request
waking it waits for that wake instead), and gives it back once it has its answer: the model's load and
the first prediction are part of the wake's work. A turn held longer than HOLD_S (a first request that
predicts a whole project, a model that takes long to load) stops counting, so it holds nobody up for
longer than that.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

HOLD_S = 5.0  # a turn counts this long at most; a wake under load takes about a second


def default_turns(driver: str) -> int:
    """One fewer than the cores this process may use (at least one), where the backends run on this machine:
    a core is left to the awake backends and the proxy; none (0: no limit) on Ray, whose backends start on
    the cluster's nodes. On 2 cores at the fleet bench's 50% budget, one turn against two: wakes p95 1.39
    against 1.51 s, awake predictions p95 0.036 against 0.103 s (60 s probes)."""
    if driver == "ray":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class Turn:
    """One request's place: taken (``take``) only where it starts a backend, given back when it is answered."""

    def __init__(self, turns: WakeTurns) -> None:
        self._turns = turns
        self.taken = False
        self.waited_s = 0.0  # in line for it

    def take(self) -> None:
        if not self.taken:
            began = time.monotonic()
            self._turns.take(self)
            self.taken = True
            self.waited_s = time.monotonic() - began

    def give_back(self) -> None:
        if self.taken:
            self.taken = False
            self._turns.give_back(self)


class WakeTurns:
    """First come, first served, ``limit`` at a time (0: no limit)."""

    def __init__(self, limit: int, hold_s: float = HOLD_S) -> None:
        self.limit = limit
        self.hold_s = hold_s
        self._changed = threading.Condition()
        self._line: deque[Turn] = deque()  # waiting, in the order they came
        self._held: dict[Turn, float] = {}  # taken, and when

    @contextmanager
    def turn(self) -> Iterator[Turn]:
        """A request's place, given back when the block ends (its answer has come, or it failed)."""
        turn = Turn(self)
        try:
            yield turn
        finally:
            turn.give_back()

    def take(self, turn: Turn) -> None:
        if not self.limit:
            return
        with self._changed:
            self._line.append(turn)
            try:
                while True:
                    now = time.monotonic()
                    counting = sorted(taken for taken in self._held.values() if now - taken < self.hold_s)
                    if len(counting) < self.limit:
                        if self._line[0] is turn:
                            break
                        self._changed.wait()  # those ahead take theirs first
                    else:  # until one is given back, or the oldest stops counting
                        self._changed.wait(counting[0] + self.hold_s - now)
            finally:
                self._line.remove(turn)
                self._changed.notify_all()  # the next in line may go too
            self._held[turn] = time.monotonic()

    def give_back(self, turn: Turn) -> None:
        if not self.limit:
            return
        with self._changed:
            self._held.pop(turn, None)
            self._changed.notify_all()

    def waiting(self) -> int:
        """Requests in line for a turn now (for /backends and the metrics)."""
        with self._changed:
            return len(self._line)

    def held(self) -> int:
        """Turns taken and still counting (for /backends)."""
        now = time.monotonic()
        with self._changed:
            return sum(1 for taken in self._held.values() if now - taken < self.hold_s)
