"""Many models on one machine: backends that sleep when idle, wake on demand, and fit the memory budgets.

- **Sleep.** A backend with no request routed to it for its ``idle_stop_s`` (the configure's, else
  IDLE_STOP_S) is stopped, its configuration kept in its MODEL_DIR and its record (state ``sleeping``).
  Never an ``always_on`` one; never one that trains, works through a background queue, has predictions
  waiting to be pushed, or has a request on its way.
- **Wake.** A request for a sleeping backend starts it again (forked from the templates) and is held until
  it answers. Label Studio's ``/health`` and ``/setup`` are answered from the record meanwhile
  (``api.py``): opening a project wakes nothing.
- **Budgets.** MEMORY_BUDGET (PSS of everything the orchestrator started: templates, spares, backends) and
  GPU_MEMORY_BUDGET (per GPU) hold before every start: the least recently used idle backends go to sleep
  to make room, and a start that cannot fit even then is an ``OverBudget`` (503) naming the budget and
  what holds it. Each supervisor pass measures, and puts idle backends to sleep where one grew past it.

How a start is decided, so that the PSS of everything started stays under the budget: the templates at
their RSS (every page they map, as if no fork shared them), plus for each awake backend the larger of its
private memory now and at its peak when last loaded (``memory_bytes``, never lowered: what waking it
adds); a model never measured is expected to add what the median measured one did. Reading the PSS of
everything at the moment of a start is not enough by itself: a process forked a moment ago, or ending,
shifts the shares of the template's pages while the reads are under way, and the sum comes out low;
and the reads cost milliseconds per process, too slow for every start. The supervisor reads it every
few seconds, and where it is over the budget puts the least recently used idle backend to sleep. A
backend's pages shared between its own processes are in the PSS but in no process's private memory:
what a read holds beyond the template and the private pages, as a share of the private pages, is added
to every backend's figure (``counted``), so that the next starts leave room for it.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from backend.core.errors import OverBudget

from .drivers.base import BackendDriver, Memory
from .registry import BackendRecord, Registry
from .settings import OrchestratorSettings
from .turns import Turn, WakeTurns

log = logging.getLogger(__name__)

TOUCH_EVERY_S = 2.0  # how stale the registry's last_used_at may be (this process knows it exactly)
MAX_SHARED_SURCHARGE = 0.5  # at most: a read taken while backends start and stop can say too much
MEASURE_EVERY_S = 10.0  # without a budget the measurements only feed /backends and the metrics
BUDGET_MEASURE_EVERY_S = 2.0  # with one (reading every process's smaps costs milliseconds each; never per start)
MEASURE_NICE = 10  # the measuring thread's priority: its reads take the CPU the backends leave
AWAKE = ("starting", "pending", "ready")
ROOM_FOR_A_START = "room for another backend within MEMORY_BUDGET"
WAKE_RATE_WINDOW_S = 10.0  # the wakes the headroom is sized by: those of the last this many seconds


class Backends(Protocol):
    """What the fleet needs of the manager (``manager.BackendManager``)."""

    settings: OrchestratorSettings
    registry: Registry
    driver: BackendDriver

    def lock_for(self, backend_id: str) -> threading.Lock: ...
    def health(self, record: BackendRecord, timeout: float = 1.0) -> dict[str, Any] | None: ...
    def remove(self, record: BackendRecord) -> None: ...
    def start(self, record: BackendRecord) -> None: ...
    def wait_ready(self, record: BackendRecord) -> None: ...


def busy(health: dict[str, Any]) -> str:
    """Work a stop would cut short, in words ("" for none): a training, tasks waiting in the background,
    predictions waiting to be pushed to Label Studio."""
    training = (health.get("training") or {}).get("state")
    if training in ("running", "queued"):
        return f"its training is {training}"
    if (health.get("background") or {}).get("queued"):
        return "its background queue has tasks"
    push = health.get("push") or {}
    if push.get("mode") == "on" and any((p or {}).get("left") for p in (push.get("projects") or {}).values()):
        return "it has predictions waiting to be pushed to Label Studio"
    return ""


def mib(size: float) -> str:
    return f"{size / (1 << 20):.0f} MiB"


class Fleet:
    """Activity, sleep, wake and the budgets of one orchestrator process's view of its backends."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.settings = backends.settings
        self._lock = threading.Lock()  # guards the activity dicts and the measurements
        self._inflight: Counter[str] = Counter()
        self._used: dict[str, float] = {}  # the last request this process routed, by backend
        self._written: dict[str, float] = {}  # when that was last written to the registry
        self._room = threading.Lock()  # one start at a time decides what must sleep for it
        self._leaving: set[str] = set()  # going to sleep to keep the headroom, until stopped
        self._recent_wakes: deque[float] = deque()  # when each wake of the last WAKE_RATE_WINDOW_S began
        self._stop_s = 0.0  # how long a stop has been taking (a moving average)
        self.measured: dict[str, Memory] = {}
        self.total = 0  # PSS of everything started, read at once (driver.total): what /backends shows
        self.overhead = 0  # the templates' RSS (driver.overhead)
        self._measured_at = float("-inf")
        self._measuring = threading.Lock()  # one read of every process at a time
        self._measured_in_background = False  # by ``measure_in_background``: the supervisor's pass need not
        self._read_acted_on = float("-inf")  # the read of the total the budget check last looked at
        self._reserved: dict[str, Memory] = {}  # starts decided and not registered awake yet: their need
        self._claims: dict[str, set[str]] = {}  # by start: the backends going to sleep for it, until stopped
        self._peaks: dict[str, Memory] = {}  # the most each awake backend has held since it started
        self._surcharge = 0.0  # the share of private memory added for pages a backend's own processes share
        self._loaded: set[str] = set()  # measured with their model loaded since they last started
        self.events: Counter[str] = Counter()  # wakes, sleeps by reason, refusals: the metrics count them
        self.turns = WakeTurns(self.settings.wake_turns)  # a request that wakes a backend takes one (api.send)
        self._this_thread = threading.local()  # what making room for this thread's start took, for its wake's log

    @property
    def budgeted(self) -> bool:
        return bool(self.settings.memory_budget or self.settings.gpu_memory_budget)

    # --- activity --------------------------------------------------------------------------------

    def begin(self, backend_id: str) -> None:
        """A request is on its way to the backend: it is not idle until ``end``."""
        with self._lock:
            self._inflight[backend_id] += 1
        self._note_use(backend_id)

    def end(self, backend_id: str) -> None:
        with self._lock:
            self._inflight[backend_id] -= 1
            if self._inflight[backend_id] <= 0:
                del self._inflight[backend_id]
        self._note_use(backend_id)

    def _note_use(self, backend_id: str) -> None:
        now = time.time()
        with self._lock:
            self._used[backend_id] = now
            write = now - self._written.get(backend_id, 0.0) >= TOUCH_EVERY_S
            if write:
                self._written[backend_id] = now
        if write:
            self.backends.registry.touch(backend_id, now)

    def in_flight(self, backend_id: str) -> int:
        with self._lock:
            return self._inflight.get(backend_id, 0)

    def last_used(self, record: BackendRecord) -> float:
        with self._lock:
            mine = self._used.get(record.id, 0.0)
        return max(record.last_used_at, record.started_at, record.configured_at, mine)

    def idle_limit(self, record: BackendRecord) -> float:
        return record.idle_stop_s if record.idle_stop_s is not None else self.settings.idle_stop_s

    def describe(self, record: BackendRecord) -> dict[str, Any]:
        """For /backends: when it sleeps, how long it has been idle, what it holds now."""
        limit = 0.0 if record.always_on else self.idle_limit(record)
        with self._lock:
            held = self.measured.get(record.id)
        shown: dict[str, Any] = {"sleeps_after_idle_s": limit or None, "in_flight": self.in_flight(record.id)}
        if record.state in AWAKE:
            shown["idle_s"] = round(max(time.time() - self.last_used(record), 0.0), 1)
        if held is not None and record.state in AWAKE:
            shown["memory_now_bytes"], shown["private_memory_now_bytes"] = held.pss, held.private
            if record.gpu:
                shown["gpu_memory_now_bytes"] = held.gpu
        return shown

    def summary(self) -> dict[str, Any]:
        """For /backends: the budgets and what is held against them."""
        shown: dict[str, Any] = {"budget_bytes": self.settings.memory_budget or None, "in_use_bytes": self.memory_in_use(),
                                 "pss_bytes": self.total, "template_rss_bytes": self.overhead,
                                 "idle_stop_s": self.settings.idle_stop_s or None}
        if self.settings.gpu_memory_budget:
            gpus = sorted({r.gpu for r in self.backends.registry.all() if r.gpu})
            shown["gpu_budget_bytes"] = self.settings.gpu_memory_budget
            shown["gpu_in_use_bytes"] = {gpu: self.memory_in_use(gpu) for gpu in gpus}
        shown["events"] = dict(self.events)
        shown["wake_turns"] = {"limit": self.turns.limit or None, "held": self.turns.held(), "waiting": self.turns.waiting()}
        return shown

    # --- the supervisor's pass -------------------------------------------------------------------

    def tick(self) -> None:
        """Measure, put idle backends to sleep, and keep the memory budget where a backend grew past it."""
        if not self._measured_in_background:
            self.measure()
        now = time.time()
        for record in self.backends.registry.backends():
            limit = self.idle_limit(record)
            if record.state == "ready" and not record.always_on and limit > 0 and not self.in_flight(record.id) \
                    and now - self.last_used(record) >= limit:
                self._sleep_locked(record.id, f"no request for {limit:g} s", "idle")
        budget = self.settings.memory_budget
        if budget:
            # A read over the budget puts one backend to sleep, and is not acted on again: the next read says more.
            read_over = self.total > budget and self._measured_at > self._read_acted_on
            self._read_acted_on = self._measured_at
            while self.memory_in_use() > budget or read_over:
                read_over = False
                if not self._sleep_one(exclude="", gpu="", reason="to keep the memory budget", kind="budget"):
                    log.warning("memory: %s in use (%s read) is over MEMORY_BUDGET (%s), and no idle backend is left "
                                "to sleep", mib(self.memory_in_use()), mib(self.total), mib(budget))
                    break
        self.keep_headroom_soon()

    def headroom(self) -> int:
        """The room kept free under MEMORY_BUDGET, in typical backends (the median measured one, as counted):
        one for the next wake, and two for each wake that comes while backends are stopping (wakes a second
        over the last WAKE_RATE_WINDOW_S, times the seconds a stop has been taking: those stopping count as
        in use until they are gone, and wakes come in bursts); at most WAKE_HEADROOM, and a fifth of what
        the budget holds beyond the template. None where one typical backend is more than a tenth of that:
        a budget for a few backends keeps them all awake."""
        budget, most_backends = self.settings.memory_budget, self.settings.wake_headroom
        sizes = [r.memory_bytes for r in self.backends.registry.backends() if r.memory_bytes and not r.spare]
        if not budget or most_backends <= 0 or not sizes:
            return 0
        with self._lock:
            since = time.monotonic() - WAKE_RATE_WINDOW_S
            while self._recent_wakes and self._recent_wakes[0] < since:
                self._recent_wakes.popleft()
            stopping = 2 * len(self._recent_wakes) / WAKE_RATE_WINDOW_S * self._stop_s  # twice: wakes come in bursts
        typical, beyond = self.counted(int(statistics.median(sizes))), budget - self.overhead
        if typical * 10 > beyond:
            return 0
        return min(int(typical * min(1.0 + stopping, most_backends)), beyond // 5)

    def keep_headroom_soon(self) -> None:
        """``keep_headroom`` in a thread of its own: neither a request nor the supervisor's pass waits for stops."""
        if self.settings.memory_budget and self.settings.wake_headroom > 0:
            threading.Thread(target=self.keep_headroom, name="headroom", daemon=True).start()

    def keep_headroom(self) -> None:
        """Put the least recently used idle backends to sleep until ``headroom`` is free, so that the next wake
        finds room without waiting for a stop (under load a stop is a third of a wake). Run by the supervisor's
        pass and in the background after each start, several at once: each counts what the others are
        already putting to sleep as gone, and chooses under the lock the starts choose under."""
        room, budget = self.headroom(), self.settings.memory_budget
        refused: set[str] = set()
        while room:
            with self._room:
                with self._lock:
                    leaving = set(self._leaving)
                if self.memory_in_use(leaving=leaving) + room <= budget:
                    return
                chosen = self._choose_sleeper("", "", refused)
                if chosen is None:
                    return
                if chosen.record is not None:
                    with self._lock:
                        self._leaving.add(chosen.record.id)
            try:
                if self._confirm(chosen, refused):
                    self._finish_choice(chosen, "room kept for the next wake (WAKE_HEADROOM)", "headroom")
            finally:
                if chosen.record is not None:
                    with self._lock:
                        self._leaving.discard(chosen.record.id)

    def measure_in_background(self, stop: threading.Event) -> None:
        """``measure`` on this thread until ``stop``, at a lower priority (MEASURE_NICE): each read walks a
        process's page tables in the kernel, under a budget every process's every BUDGET_MEASURE_EVERY_S,
        and when the machine is busy that CPU is better spent on the backends answering and waking. The
        budget does not wait for it: a start counts each backend at its known peak."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MEASURE_NICE)
        except OSError:
            pass
        self._measured_in_background = True
        try:
            while not stop.wait(0.5):
                try:
                    self.measure()
                except Exception:
                    log.exception("measuring the backends' memory failed")
        finally:
            self._measured_in_background = False

    def measure(self) -> None:
        """What each awake backend and the driver hold now; each backend's peak is what waking it will take."""
        if not self._measuring.acquire(blocking=False):
            return  # a read is under way (at the measuring thread's low priority): the last one stands
        try:
            if time.monotonic() - self._measured_at < (BUDGET_MEASURE_EVERY_S if self.budgeted else MEASURE_EVERY_S):
                return
            self._measure()
        finally:
            self._measuring.release()

    def _measure(self) -> None:
        now = time.monotonic()
        running = [r for r in self.backends.registry.all() if r.handle]  # starting and stopping ones too
        awake = [r for r in running if r.state in AWAKE]
        measured, total = self.backends.driver.measure(running)
        overhead = self.backends.driver.overhead()
        grown = []
        with self._lock:
            self.measured, self.total, self.overhead, self._measured_at = measured, total, overhead, now
            private = sum(memory.private for memory in measured.values())
            if private and total and overhead:  # beyond the template (once connected to it) and every private page
                gap = min(max((total - overhead - private) / private, 0.0), MAX_SHARED_SURCHARGE)
                self._surcharge = max(gap, self._surcharge * 0.9)  # up at once, down slowly: reads in churn vary
            for record in awake:
                memory = measured.get(record.id)
                if memory is None:
                    continue
                peak = _larger(memory, self._peaks.get(record.id))
                self._peaks[record.id] = peak
                known = record.id in self._loaded or record.memory_bytes  # a peak while it loads says too little
                if known and not record.spare and (peak.private > record.memory_bytes * 1.1
                                                   or peak.gpu > record.gpu_memory_bytes * 1.1):
                    grown.append((record.id, peak))
            for gone in set(self._peaks) - {r.id for r in awake}:
                del self._peaks[gone]
                self._loaded.discard(gone)
        for backend_id, peak in grown:  # remembered across orchestrator restarts, and for waking it
            self.backends.registry.update(backend_id, memory_bytes=peak.private, gpu_memory_bytes=peak.gpu)

    def note_loaded(self, record: BackendRecord) -> None:
        """The backend has loaded its model (a configure answered, a wake restored it): what it holds now is
        what it adds, and what waking it will take next time."""
        memory = self.backends.driver.memory([record]).get(record.id)
        if memory is None:
            return
        with self._lock:
            peak = self._peaks[record.id] = _larger(memory, self._peaks.get(record.id))
            self._loaded.add(record.id)
        if peak.private > record.memory_bytes or peak.gpu > record.gpu_memory_bytes:  # a peak: never lowered
            record.memory_bytes = max(record.memory_bytes, peak.private)
            record.gpu_memory_bytes = max(record.gpu_memory_bytes, peak.gpu)
            self.backends.registry.update(record.id, memory_bytes=record.memory_bytes,
                                          gpu_memory_bytes=record.gpu_memory_bytes)

    def expected(self, record: BackendRecord, records: list[BackendRecord] | None = None) -> Memory:
        """What the backend adds once it has loaded its model (private memory, GPU memory): its own figure
        once known, else at least what the median measured backend added (``records``: the registry's, read
        once by a caller that asks for many)."""
        with self._lock:
            peak = _larger(Memory(0, record.memory_bytes, record.gpu_memory_bytes), self._peaks.get(record.id))
            known = record.id in self._loaded or record.memory_bytes > 0
        if known:
            return peak
        records = self.backends.registry.backends() if records is None else records
        others = [r.memory_bytes for r in records if r.memory_bytes and r.id != record.id and not r.spare]
        median = int(statistics.median(others)) if others else 0
        return Memory(0, max(peak.private, median), peak.gpu)

    def counted(self, private: int) -> int:
        """A backend's private memory as the budget counts it: with the share the supervisor's last reads
        found beyond everyone's private pages (those a backend's own processes share: its worker and its
        model process both map what their parent wrote before forking them, which is no one's private
        memory but is in the PSS the budget bounds)."""
        return int(private * (1.0 + self._surcharge))

    def memory_in_use(self, gpu: str = "", leaving: set[str] | frozenset[str] = frozenset()) -> int:
        """What the budget counts (above): the template's RSS and what each running backend adds (one on its
        way to sleep too, until stopped, unless it is ``leaving`` for the start asking), at the larger of now
        and its known peak, and for each start not registered yet the larger of its need and what the
        backends going to sleep for it still hold (it forks once they are stopped: one or the other is in
        memory, never both); on ``gpu``: each backend there at its GPU memory, the same way."""
        total = 0 if gpu else self.overhead
        with self._lock:
            reserved = dict(self._reserved)
            claimed = {sleeper: start for start, sleepers in self._claims.items() for sleeper in sleepers}
        held_for: Counter[str] = Counter()  # by start: what its sleepers hold until they are stopped
        records = self.backends.registry.all()
        for record in records:
            running = record.handle and (record.state in AWAKE or record.state == "sleeping")
            if not running or record.id in leaving or record.id in reserved or (gpu and record.gpu != gpu):
                continue
            with self._lock:
                now = self.measured.get(record.id, Memory(0))
            later = Memory(0) if record.spare else self.expected(record, records)
            held = max(now.gpu, later.gpu) if gpu else self.counted(max(now.private, later.private))
            if record.id in claimed:
                held_for[claimed[record.id]] += held
            else:
                total += held
        for start, need in reserved.items():
            total += max(need.gpu if gpu else self.counted(need.private), held_for.pop(start, 0))
        return total + sum(held_for.values())

    # --- sleep -----------------------------------------------------------------------------------

    def _sleep_locked(self, backend_id: str, reason: str, kind: str) -> bool:
        """``sleep`` under the backend's lock; False where a configure, wake or delete holds it."""
        lock = self.backends.lock_for(backend_id)
        if not lock.acquire(blocking=False):
            return False
        try:
            record = self.backends.registry.get(backend_id)
            return record is not None and record.state == "ready" and self.sleep(record, reason, kind)
        finally:
            lock.release()

    def sleep(self, record: BackendRecord, reason: str, kind: str) -> bool:
        """Stop the backend, keeping its configuration; the caller holds its lock. False where it is busy."""
        if not self._begin_sleep(record):
            return False
        self._finish_sleep(record, reason, kind)
        return True

    def _begin_sleep(self, record: BackendRecord) -> bool:
        """Its state ``sleeping`` (requests now wait to wake it), where it is idle; it is stopped by ``_finish_sleep``."""
        backends = self.backends
        health = backends.health(record, timeout=1.0)
        if health is None or busy(health) or self.in_flight(record.id):
            return False  # not answering is the supervisor's to handle; busy work is finished first
        record.model_version = str(health.get("model_version") or record.model_version)
        with self._lock:  # what waking it will add, at the least: the supervisor reads it every few seconds
            peak = self._peaks.get(record.id)
        if peak is None and not record.memory_bytes:  # never measured: read now (milliseconds per process)
            peak = backends.driver.memory([record]).get(record.id)
        if peak is not None:  # never less than what a loaded measurement said: this one may be of a partial load
            record.memory_bytes = max(record.memory_bytes, peak.private)
            record.gpu_memory_bytes = max(record.gpu_memory_bytes, peak.gpu)
        record.state = "sleeping"
        backends.registry.put(record)
        if self.in_flight(record.id):  # one slipped in before the state changed: it stays awake
            record.state = "ready"
            backends.registry.put(record)
            return False
        return True

    def _finish_sleep(self, record: BackendRecord, reason: str, kind: str) -> None:
        began = time.monotonic()
        self.backends.driver.stop(record)  # SIGTERM: what it was answering it finishes, its caches go to disk
        took = time.monotonic() - began
        with self._lock:  # what ``headroom`` sizes the room by
            self._stop_s = 0.8 * self._stop_s + 0.2 * took if self._stop_s else took
        record.handle, record.slept_at, record.sleeps = "", time.time(), record.sleeps + 1
        self.backends.registry.put(record)
        self.events[f"sleep_{kind}"] += 1
        log.info("backend %s: asleep (%s); %s freed, stopped in %.2f s", record.id, reason, mib(record.memory_bytes), took)

    def _sleep_one(self, exclude: str, gpu: str, reason: str, kind: str) -> bool:
        """Put the least recently used idle backend (on ``gpu`` where one is named) to sleep; spares go first."""
        refused: set[str] = set()
        while (chosen := self._choose_sleeper(exclude, gpu, refused)) is not None:
            if self._confirm(chosen, refused):
                self._finish_choice(chosen, reason, kind)
                return True
        return False

    def _choose_sleeper(self, exclude: str, gpu: str, refused: set[str]) -> _Choice | None:
        """The next to go for room: a spare (removed at once), else the least recently used backend that looks
        idle here (ready, no request on its way, none of ``refused``), its lock held: ``_confirm`` asks it."""
        registry = self.backends.registry
        for spare in registry.spares():
            lock = self.backends.lock_for(spare.id)
            if (not gpu or spare.gpu == gpu) and lock.acquire(blocking=False):
                try:
                    self.backends.remove(spare)  # a spare holds nothing worth keeping
                finally:
                    lock.release()
                return _Choice(None, None)
        candidates = [r for r in registry.backends() if r.state == "ready" and r.handle and not r.always_on
                      and r.id != exclude and r.id not in refused and (not gpu or r.gpu == gpu)
                      and not self.in_flight(r.id)]
        for candidate in sorted(candidates, key=self.last_used):
            lock = self.backends.lock_for(candidate.id)
            if not lock.acquire(blocking=False):
                continue
            record = registry.get(candidate.id)
            if record is not None and record.state == "ready":
                return _Choice(record, lock)
            lock.release()
        return None

    def _confirm(self, chosen: _Choice, refused: set[str]) -> bool:
        """Whether the chosen backend is idle by its own word (its /health: no training, no background work),
        and now ``sleeping``; one that is not is let go and ``refused``. Asked outside the room lock: a
        loaded backend takes a while to answer, and other starts need not wait for it."""
        if chosen.record is None or chosen.lock is None:
            return True
        if self._begin_sleep(chosen.record):
            chosen.begun = True
            return True
        refused.add(chosen.record.id)
        chosen.lock.release()
        return False

    def _finish_choice(self, chosen: _Choice, reason: str, kind: str = "budget") -> None:
        if chosen.record is None or chosen.lock is None:
            return
        try:
            self._finish_sleep(chosen.record, reason, kind)
        finally:
            chosen.lock.release()

    def _undo_choice(self, chosen: _Choice) -> None:
        """A start that could not fit after all: what was chosen to make room for it serves on."""
        if chosen.record is None or chosen.lock is None:
            return
        if chosen.begun:
            chosen.record.state = "ready"
            self.backends.registry.put(chosen.record)
        chosen.lock.release()

    # --- wake ------------------------------------------------------------------------------------

    @contextmanager
    def room_for(self, record: BackendRecord) -> Iterator[None]:
        """Held around a backend's start: makes room for what it will hold, or raises OverBudget. A spare
        only starts where it fits as things are: nothing is put to sleep for one. Until it is registered
        awake, its need is reserved; what sleeps for it is stopped before it forks."""
        if not self.budgeted:
            yield
            return
        need = Memory(0) if record.spare else self.expected(record)
        began = time.monotonic()
        try:
            chosen, waited = self._make_room(record, need)
            chose = time.monotonic()
            if len(chosen) > 1:  # side by side: each stop is mostly waiting for a process to finish
                with ThreadPoolExecutor(len(chosen), thread_name_prefix="sleep") as pool:
                    list(pool.map(partial(self._finish_choice, reason=ROOM_FOR_A_START), chosen))
            elif chosen:
                self._finish_choice(chosen[0], ROOM_FOR_A_START)
            self._this_thread.room_took = (f"room {chose - began:.2f} s ({len(chosen)} chosen, {waited:.2f} s waiting for "
                                           f"the lock), stops {time.monotonic() - chose:.2f} s")
            yield
        finally:
            with self._lock:
                self._reserved.pop(record.id, None)
                self._claims.pop(record.id, None)
        if not record.spare:  # the room it took, freed again for the next
            self.keep_headroom_soon()

    def _make_room(self, record: BackendRecord, need: Memory) -> tuple[list[_Choice], float]:
        """What must sleep for ``need`` to fit, each now ``sleeping`` with its lock held (``_finish_choice``
        stops it), and how long this start waited for the room lock. Chosen under one lock from what this process knows (so no two starts count on the same
        room, and the lock is held for milliseconds), then each asked whether it is idle outside it; one
        that is busy is replaced by the next."""
        confirmed: list[_Choice] = []
        refused: set[str] = set()
        waited = 0.0
        while True:
            asked = time.monotonic()
            with self._room:
                waited += time.monotonic() - asked
                with self._lock:
                    self._reserved.pop(record.id, None)  # counted once: as ``need`` below
                claimed: list[_Choice] = []
                try:
                    claimed += self._choose_room("MEMORY_BUDGET", self.settings.memory_budget, need.private, record, "",
                                                 confirmed + claimed, refused)
                    if record.gpu:
                        claimed += self._choose_room("GPU_MEMORY_BUDGET", self.settings.gpu_memory_budget, need.gpu,
                                                     record, record.gpu, confirmed + claimed, refused)
                except OverBudget:
                    for choice in confirmed + claimed:
                        self._undo_choice(choice)
                    raise
                with self._lock:
                    self._reserved[record.id] = need
                    self._claims[record.id] = {c.record.id for c in confirmed + claimed if c.record is not None}
            if not claimed:
                return confirmed, waited
            confirmed += [choice for choice in claimed if self._confirm(choice, refused)]
            with self._lock:  # the refused serve on, and count as awake again
                self._claims[record.id] = {c.record.id for c in confirmed if c.record is not None}

    def spare_fits(self) -> bool:
        """Whether a warm spare (about the smallest measured backend, at most) fits the budget as things are."""
        if not self.settings.memory_budget:
            return True
        with self._lock:
            sizes = [m.private for m in self.measured.values() if m.private]
        return self.memory_in_use() + (min(sizes) if sizes else 0) <= self.settings.memory_budget

    def _choose_room(self, name: str, budget: int, need: int, record: BackendRecord, gpu: str,
                     chosen: list[_Choice], refused: set[str]) -> list[_Choice]:
        """What must sleep for ``need`` to fit ``budget`` besides ``chosen``, claimed (not asked, not stopped
        yet); OverBudget where even every idle backend would not make room."""
        more: list[_Choice] = []
        if not budget:
            return more
        leaving = {c.record.id for c in chosen + more if c.record is not None}
        need = need if gpu else self.counted(need)
        while self.memory_in_use(gpu, leaving) + need > budget:
            choice = None if record.spare else self._choose_sleeper(record.id, gpu, refused)
            if choice is None:
                self.events["over_budget"] += 1
                for undone in more:
                    self._undo_choice(undone)
                raise self._over_budget(name, budget, need, record, gpu)
            more.append(choice)
            if choice.record is not None:
                leaving.add(choice.record.id)
        return more

    def _over_budget(self, name: str, budget: int, need: int, record: BackendRecord, gpu: str) -> OverBudget:
        holders = []
        for other in self.backends.registry.all():
            if other.handle and other.state in AWAKE and other.id != record.id and (not gpu or other.gpu == gpu):
                with self._lock:
                    held = self.measured.get(other.id, Memory(0))
                why = ("always on" if other.always_on else "a request is on its way" if self.in_flight(other.id)
                       else "starting" if other.state != "ready" else "busy")
                holders.append({"id": other.id, "model_uri": other.model.get("model_uri"),
                                "bytes": held.gpu if gpu else held.pss, "why_awake": why})
        where = f" on GPU {gpu}" if gpu else ""
        in_use = self.memory_in_use(gpu)
        return OverBudget(
            f"backend {record.id} needs about {mib(need)}{where}, and {name} ({mib(budget)}) has "
            f"{mib(max(budget - in_use, 0))} left with every idle backend asleep",
            f"Raise {name}, mark fewer models always_on, or DELETE /backends/<id> one you no longer need.",
            budget=budget, needed=need, in_use=in_use, held_by=holders,
        )

    def wake(self, record: BackendRecord, until_restored: bool = True, turn: Turn | None = None) -> BackendRecord:
        """Start a sleeping backend and wait until it answers (``until_restored``: and serves its configuration
        again; a /predict need not wait here, as the backend holds it until its model is loaded); a request
        that finds another waking it waits too. ``turn``: taken before the start (WAKE_TURNS), and given back by
        the caller once its request is answered."""
        with self.backends.lock_for(record.id):
            current = self.backends.registry.get(record.id) or record
            if current.state == "sleeping" and turn is not None and not turn.taken:
                turn.take()  # those asking for this backend meanwhile wait on its lock, not in line
                current = self.backends.registry.get(record.id) or current
            if current.state == "sleeping":
                began = time.monotonic()
                with self._lock:
                    self._recent_wakes.append(began)
                current.wakes += 1
                self._this_thread.room_took = "no room made"
                self.backends.start(current)
                started = time.monotonic()
                self.events["wake"] += 1
                self.backends.wait_ready(current)
                answering = time.monotonic()
                if until_restored:
                    self._wait_restored(current)
                restored = time.monotonic()
                with self._lock:  # its peak is known from before; the supervisor's next read updates it
                    self._loaded.add(current.id)
                log.info("backend %s: awake in %.2f s (asleep %.0f s, %.2f s in line for a turn): %s; forked after %.2f s, "
                         "answering after %.2f s more, %s", current.id, restored - began, time.time() - current.slept_at,
                         turn.waited_s if turn is not None else 0.0, self._this_thread.room_took, started - began,
                         answering - started,
                         f"restored {restored - answering:.2f} s later" if until_restored else "its request waits for the load")
            else:
                self.backends.wait_ready(current)
        return current

    def _wait_restored(self, record: BackendRecord) -> None:
        """Until the woken backend serves its configuration again (its /health answers before it has restored
        it, and a /setup then would name no model version); one it cannot restore says why itself."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            health = self.backends.health(record, timeout=1.0) or {}
            if (health.get("configured") and not health.get("loading")) or health.get("stored_configuration_error") \
                    or health.get("last_error"):
                return
            time.sleep(0.02)


def _larger(memory: Memory, other: Memory | None) -> Memory:
    """Each figure at the larger of the two."""
    if other is None:
        return memory
    return Memory(max(memory.pss, other.pss), max(memory.private, other.private), max(memory.gpu, other.gpu))


@dataclass
class _Choice:
    """One made room for a start: a backend on its way to sleep (its lock held until it is stopped), or a
    spare already removed (nothing left to do)."""

    record: BackendRecord | None
    lock: threading.Lock | None
    begun: bool = False  # asked, and ``sleeping``: undone by setting it ``ready`` again
