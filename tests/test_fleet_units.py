"""How the fleet makes room for a start, without processes: a real registry, a driver that only keeps
accounts, and backends whose /health is a dict. What is checked is the arithmetic and the choice, which
the process tests (test_fleet.py) only see through their timing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from backend.core.errors import OverBudget
from backend.core.memory import MemoryReads
from harness.servers import wait_until
from orchestrator.drivers.base import Memory
from orchestrator.fleet import Fleet
from orchestrator.registry import BackendRecord, Registry
from orchestrator.settings import OrchestratorSettings
from orchestrator.turns import WakeTurns

MIB = 1 << 20
TEMPLATE = 500 * MIB
EACH = 100 * MIB


class AccountingDriver:
    """Backends that hold EACH once started; a stop can be held back to look at the accounts meanwhile."""

    def __init__(self) -> None:
        self.shared = 0  # what each backend's own processes share: in the PSS read, in no private figure
        self.stopped: list[str] = []
        self.hold: dict[str, threading.Event] = {}
        self._stopping: dict[str, threading.Event] = {}
        self._stopping_lock = threading.Lock()

    def stopping(self, backend_id: str) -> threading.Event:
        """Set once its stop began. Made under a lock: a defaultdict read by the test while a stop sets it
        can make two events, and the test waits on the one nobody sets."""
        with self._stopping_lock:
            return self._stopping.setdefault(backend_id, threading.Event())

    def overhead(self) -> int:
        return TEMPLATE

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        return {r.id: Memory(EACH, EACH) for r in records if r.handle}

    def measure(self, records: list[BackendRecord]) -> tuple[dict[str, Memory], int]:
        held = self.memory(records)
        return held, TEMPLATE + sum(m.pss + self.shared for m in held.values())

    def stop(self, record: BackendRecord) -> None:
        self.stopping(record.id).set()
        if record.id in self.hold:
            assert self.hold[record.id].wait(10)
        self.stopped.append(record.id)


class Backends:
    """The manager, as the fleet sees it."""

    def __init__(self, tmp_path: Path, budget: int) -> None:
        self.settings = OrchestratorSettings(state_dir=tmp_path / "state", gpus=(), memory_budget=budget)
        self.registry = Registry(tmp_path / "state" / "registry.db")
        self.driver = AccountingDriver()
        self.busy: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)

    def lock_for(self, backend_id: str) -> threading.Lock:
        return self._locks[backend_id]

    def health(self, record: BackendRecord, timeout: float = 1.0) -> dict[str, Any] | None:
        return {"configured": True, "model_version": "m:1", **self.busy.get(record.id, {})}

    def remove(self, record: BackendRecord) -> None:
        self.registry.delete(record.id)

    def start(self, record: BackendRecord) -> None:
        raise AssertionError("not started here")

    def wait_ready(self, record: BackendRecord) -> None:
        return None


def awake(backends: Backends, name: str, used_at: float) -> BackendRecord:
    record = BackendRecord(id=name, model={"model_uri": f"models:/{name}/1"}, driver="process", port=0,
                           model_dir=f"/nowhere/{name}", token="t", handle=f"{name}:1", state="ready",
                           memory_bytes=EACH, last_used_at=used_at, created_at=used_at)
    backends.registry.put(record)
    return record


def asleep(backends: Backends, name: str) -> BackendRecord:
    record = awake(backends, name, 0.0)
    record.handle, record.state = "", "sleeping"
    backends.registry.put(record)
    return record


def state(backends: Backends, name: str) -> str:
    return backends.registry.get(name).state


@pytest.fixture
def three_awake(tmp_path):
    """A budget of the template and three backends, all three awake (a the least recently used)."""
    backends = Backends(tmp_path, TEMPLATE + 3 * EACH)
    for at, name in enumerate("abc", start=1):
        awake(backends, name, float(at))
    fleet = Fleet(backends)
    fleet.measure()  # the supervisor's first read: the template, and each awake backend
    return backends, fleet


def test_a_start_puts_the_least_recently_used_to_sleep_and_counts_it_once_while_it_stops(three_awake):
    backends, fleet = three_awake
    d, e = asleep(backends, "d"), asleep(backends, "e")
    backends.driver.hold["a"] = threading.Event()
    started = threading.Event()

    def start_d() -> None:
        with fleet.room_for(d):  # as the manager starts one: registered awake before the room is let go
            d.handle, d.state, d.last_used_at = "d:1", "ready", 10.0
            backends.registry.put(d)
            started.set()

    thread = threading.Thread(target=start_d)
    thread.start()
    assert backends.driver.stopping("a").wait(10)
    # a is stopping for d: the accounts hold one of the two (d's need, a's pages), not both.
    assert fleet.memory_in_use() == TEMPLATE + 3 * EACH
    backends.driver.hold["a"].set()
    assert started.wait(10)
    thread.join(10)
    assert backends.driver.stopped == ["a"] and state(backends, "a") == "sleeping"

    # With d awake, e needs room of its own: the least recently used of b, c and d.
    with fleet.room_for(e):
        pass
    assert backends.driver.stopped == ["a", "b"]
    assert [state(backends, name) for name in "bc"] == ["sleeping", "ready"]


def test_a_busy_backend_is_passed_over_for_the_next_and_serves_on(three_awake):
    backends, fleet = three_awake
    backends.busy["a"] = {"training": {"state": "running"}}
    with fleet.room_for(asleep(backends, "d")):
        pass
    assert backends.driver.stopped == ["b"]
    assert state(backends, "a") == "ready" and state(backends, "b") == "sleeping"


def test_when_every_awake_backend_is_busy_the_start_is_refused_and_nothing_sleeps(three_awake):
    backends, fleet = three_awake
    for name in "abc":
        backends.busy[name] = {"background": {"queued": 3}}
    with pytest.raises(OverBudget) as refused, fleet.room_for(asleep(backends, "d")):
        pass
    assert "MEMORY_BUDGET" in refused.value.error
    assert backends.driver.stopped == [] and [state(backends, name) for name in "abc"] == ["ready"] * 3
    assert fleet.memory_in_use() == TEMPLATE + 3 * EACH  # nothing left reserved


def test_a_start_that_needs_two_stops_both_side_by_side(tmp_path):
    backends = Backends(tmp_path, TEMPLATE + 3 * EACH)
    for at, name in enumerate("abc", start=1):
        awake(backends, name, float(at))
    big = asleep(backends, "big")
    big.memory_bytes = 2 * EACH
    backends.registry.put(big)
    fleet = Fleet(backends)
    fleet.measure()
    for name in "ab":
        backends.driver.hold[name] = threading.Event()
    def start_big() -> None:
        with fleet.room_for(big):
            pass

    thread = threading.Thread(target=start_big)
    thread.start()
    # Both stops under way at once: neither waits for the other to finish.
    assert backends.driver.stopping("a").wait(10) and backends.driver.stopping("b").wait(10)
    for name in "ab":
        backends.driver.hold[name].set()
    thread.join(10)
    assert sorted(backends.driver.stopped) == ["a", "b"] and state(backends, "c") == "ready"


def test_pages_a_backends_own_processes_share_are_counted_from_the_reads(tmp_path):
    backends = Backends(tmp_path, TEMPLATE + 4 * EACH)
    for at, name in enumerate("abc", start=1):
        awake(backends, name, float(at))
    backends.driver.shared = EACH // 10  # the reads find a tenth more than the private pages
    fleet = Fleet(backends)
    fleet.measure()
    assert fleet.memory_in_use() == TEMPLATE + 3 * fleet.counted(EACH) and fleet.counted(EACH) == EACH * 11 // 10
    # By private memory a fourth fits (500 + 4 x 100 MiB); by what the reads say it does not: a sleeps.
    with fleet.room_for(asleep(backends, "d")):
        pass
    assert backends.driver.stopped == ["a"]


def many_awake(tmp_path: Path, count: int, budget_backends: int) -> tuple[Backends, Fleet]:
    backends = Backends(tmp_path, TEMPLATE + budget_backends * EACH)
    for at in range(count):
        awake(backends, f"b{at:02}", float(at + 1))
    fleet = Fleet(backends)
    fleet.measure()
    return backends, fleet


def test_a_budget_for_many_keeps_room_for_the_next_wakes_by_putting_the_least_recently_used_to_sleep(tmp_path):
    backends, fleet = many_awake(tmp_path, 20, 20)
    assert fleet.headroom() == EACH  # no wake lately: room for the next one
    fleet.keep_headroom()
    assert backends.driver.stopped == ["b00"] and fleet.memory_in_use() == TEMPLATE + 19 * EACH
    fleet.keep_headroom()  # the room is there: nothing more
    assert backends.driver.stopped == ["b00"]
    # Two wakes a second, stops taking half a second: one more for those that come while others stop, twice.
    fleet._recent_wakes.extend(time.monotonic() for _ in range(20))
    fleet._stop_s = 0.5
    assert fleet.headroom() == 3 * EACH
    fleet.keep_headroom()
    assert backends.driver.stopped == ["b00", "b01", "b02"]
    fleet._recent_wakes.extend(time.monotonic() for _ in range(100))  # more: at most WAKE_HEADROOM (4)
    assert fleet.headroom() == 4 * EACH


def test_keepers_side_by_side_count_what_the_others_put_to_sleep_as_gone(tmp_path):
    backends, fleet = many_awake(tmp_path, 20, 20)
    fleet._recent_wakes.extend(time.monotonic() for _ in range(10))
    fleet._stop_s = 0.5  # room for two: one wake a second, stops of half a second
    assert fleet.headroom() == 2 * EACH
    backends.driver.hold["b00"] = threading.Event()
    first = threading.Thread(target=fleet.keep_headroom)
    first.start()
    assert backends.driver.stopping("b00").wait(10)
    fleet.keep_headroom()  # while b00 stops: one more is enough, not two
    assert backends.driver.stopped == ["b01"]
    backends.driver.hold["b00"].set()
    first.join(10)
    assert sorted(backends.driver.stopped) == ["b00", "b01"]
    assert [state(backends, f"b{at:02}") for at in range(4)] == ["sleeping", "sleeping", "ready", "ready"]


def test_a_budget_for_a_few_backends_keeps_them_all_awake(three_awake):
    backends, fleet = three_awake
    assert fleet.headroom() == 0  # one backend is a third of this budget: no room is kept ahead
    fleet.keep_headroom()
    assert backends.driver.stopped == []


def test_a_process_that_has_not_touched_its_memory_is_not_read_again(tmp_path):
    """MemoryReads on a real process: smaps read once while it idles, again once it has allocated."""
    grows = ("import sys\nheld = []\nprint('ready', flush=True)\nfor line in sys.stdin:\n"
             "    held.append(bytearray(4 << 20))\n    print('done', flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", grows], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"  # started: idle from here until told to grow
        reads = MemoryReads()
        before = reads.pss_and_private(child.pid)
        assert reads.pss_and_private(child.pid) == before and (reads.made, reads.reused) == (1, 1)
        child.stdin.write("grow\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        after = reads.pss_and_private(child.pid)
        assert reads.made == 2 and after[1] >= before[1] + (3 << 20)  # 4 MiB of its own, read anew
    finally:
        child.kill()
        child.wait()



# --- wakes in turns (orchestrator/turns.py) -------------------------------------------------------------


def in_line(turns: WakeTurns, count: int) -> None:
    wait_until(lambda: turns.waiting() == count, 10, f"{count} in line")


def taking(turns: WakeTurns, taken: list[str], name: str, hold: threading.Event | None = None) -> threading.Thread:
    """A request that takes a turn, notes it, and gives it back once ``hold`` is set."""

    def run() -> None:
        with turns.turn() as turn:
            turn.take()
            taken.append(name)
            if hold is not None:
                assert hold.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_turns_go_first_come_first_served_and_at_most_the_limit_at_once():
    turns, taken = WakeTurns(2), []
    done = {name: threading.Event() for name in "abcd"}
    threads = [taking(turns, taken, "a", done["a"]), taking(turns, taken, "b", done["b"])]
    wait_until(lambda: len(taken) == 2, 10, "two turns")
    threads.append(taking(turns, taken, "c", done["c"]))
    in_line(turns, 1)
    threads.append(taking(turns, taken, "d", done["d"]))
    in_line(turns, 2)
    assert sorted(taken) == ["a", "b"] and turns.held() == 2  # two at once: c and d wait
    done["b"].set()
    wait_until(lambda: len(taken) == 3, 10, "the next turn")
    assert taken[2] == "c" and turns.waiting() == 1  # the first in line, and d still waits
    for event in done.values():
        event.set()
    for thread in threads:
        thread.join(10)
    assert taken[3] == "d" and turns.waiting() == 0


def test_a_turn_held_past_its_time_stops_counting():
    turns, taken, held = WakeTurns(1, hold_s=0.3), [], threading.Event()
    first = taking(turns, taken, "slow first request", held)
    wait_until(lambda: taken, 10, "the first turn")
    second = taking(turns, taken, "next wake")
    second.join(10)  # not given back: it stopped counting after hold_s
    assert taken == ["slow first request", "next wake"]
    held.set()
    first.join(10)


def test_no_limit_never_waits():
    turns, taken, held = WakeTurns(0), [], threading.Event()
    threads = [taking(turns, taken, str(n), held) for n in range(5)]
    wait_until(lambda: len(taken) == 5, 10, "five turns at once")
    assert turns.waiting() == 0
    held.set()
    for thread in threads:
        thread.join(10)


class WakingBackends(Backends):
    """Starts that wait for ``go``, so that what waits where can be looked at."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, 0)
        self.settings = OrchestratorSettings(state_dir=tmp_path / "state", gpus=(), wake_turns=1)
        self.go = threading.Event()
        self.started: list[str] = []

    def start(self, record: BackendRecord) -> None:
        self.started.append(record.id)
        assert self.go.wait(10)
        record.handle, record.state = f"{record.id}:1", "ready"
        self.registry.put(record)


def test_a_request_for_a_backend_another_is_waking_waits_for_that_wake_not_in_line(tmp_path):
    backends = WakingBackends(tmp_path)
    d, e = asleep(backends, "d"), asleep(backends, "e")
    fleet = Fleet(backends)
    turns_taken: dict[str, bool] = {}

    def request(name: str, record: BackendRecord) -> threading.Thread:
        def run() -> None:
            with fleet.turns.turn() as turn:
                fleet.wake(record, turn=turn)
                turns_taken[name] = turn.taken

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    first = request("first for d", d)
    wait_until(lambda: backends.started == ["d"], 10, "d starting")
    second = request("second for d", d)  # waits on d's wake
    third = request("first for e", e)  # waits in line: the one turn is d's
    in_line(fleet.turns, 1)
    assert backends.started == ["d"]
    backends.go.set()
    for thread in (first, second, third):
        thread.join(10)
    assert backends.started == ["d", "e"] and state(backends, "d") == state(backends, "e") == "ready"
    assert turns_taken == {"first for d": True, "second for d": False, "first for e": True}


class GpuAccountingDriver(AccountingDriver):
    """As above, and each backend on a GPU holds GPU_EACH there."""

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        return {r.id: Memory(EACH, EACH, GPU_EACH if r.gpu else 0) for r in records if r.handle}


GPU_EACH = 1 << 30


def test_a_gpu_budget_puts_to_sleep_the_least_recently_used_on_that_gpu_only_and_refuses_what_cannot_fit(tmp_path):
    """GPU_MEMORY_BUDGET is per GPU: a start on GPU 0 puts to sleep the least recently used idle backend on
    GPU 0, not an older one on GPU 1 nor one on the CPU; one that would not fit with every idle backend there
    asleep is a 503 that names the budget and the GPU, and puts nothing to sleep."""
    backends = Backends(tmp_path, 0)
    backends.settings = OrchestratorSettings(state_dir=tmp_path / "state", gpus=("0", "1"),
                                             gpu_memory_budget=2 * GPU_EACH + GPU_EACH // 2)
    backends.driver = GpuAccountingDriver()
    for at, (name, gpu) in enumerate((("cpu", ""), ("other", "1"), ("a", "0"), ("b", "0")), start=1):
        record = awake(backends, name, float(at))
        record.gpu, record.gpu_memory_bytes = gpu, GPU_EACH if gpu else 0
        backends.registry.put(record)
    fleet = Fleet(backends)
    fleet.measure()
    assert fleet.memory_in_use("0") == 2 * GPU_EACH and fleet.memory_in_use("1") == GPU_EACH

    woken = asleep(backends, "c")
    woken.gpu, woken.gpu_memory_bytes = "0", GPU_EACH
    backends.registry.put(woken)
    with fleet.room_for(woken):
        woken.handle, woken.state, woken.last_used_at = "c:1", "ready", 10.0
        backends.registry.put(woken)
    assert backends.driver.stopped == ["a"]
    assert [state(backends, name) for name in ("cpu", "other", "a", "b", "c")] == ["ready", "ready", "sleeping", "ready", "ready"]

    too_big = asleep(backends, "big")
    too_big.gpu, too_big.gpu_memory_bytes = "0", 3 * GPU_EACH
    backends.registry.put(too_big)
    with pytest.raises(OverBudget) as refused, fleet.room_for(too_big):
        pass
    assert refused.value.status == 503
    assert "GPU_MEMORY_BUDGET" in refused.value.error and "on GPU 0" in refused.value.error
    assert backends.driver.stopped == ["a"] and state(backends, "b") == "ready"
