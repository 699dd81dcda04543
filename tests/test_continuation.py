"""What a big request leaves for later: the prediction cache and the background queue, in isolation."""

from __future__ import annotations

import threading

from backend.core.errors import HookFailed
from backend.serving.batching import DynamicBatcher
from backend.serving.continuation import Continuation, Leftover, PredictionCache, task_keys
from backend.tasks.fetcher import TaskInput
from harness.servers import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_is_bounded_by_size_and_age_and_follows_the_configuration():
    clock = Clock()
    cache = PredictionCache(max_bytes=30, ttl_s=60, clock=clock)
    keys = [("config-a", "labels", i, "data") for i in range(4)]
    for key in keys:
        cache.put(key, "x" * 10)
    assert [cache.get(k) for k in keys] == [None, "x" * 10, "x" * 10, "x" * 10]  # the oldest made room
    clock.now = 61
    assert cache.get(keys[3]) is None  # too old
    cache.put(("config-a", "labels", 9, "data"), "a")
    cache.put(("config-b", "labels", 9, "data"), "b")
    assert cache.holds("config-a") and cache.holds("config-b")
    cache.keep_only("config-b")  # a new configuration serves
    assert not cache.holds("config-a") and cache.get(("config-b", "labels", 9, "data")) == "b"


def test_a_key_changes_with_the_data_the_labels_and_the_configuration():
    tasks = [{"id": 1, "data": {"image": "a.png", "meta": {"x": 1, "y": 2}}}]
    same = [{"id": 1, "data": {"meta": {"y": 2, "x": 1}, "image": "a.png"}}]
    (key,) = task_keys("v1", "<View/>", tasks)
    assert task_keys("v1", "<View/>", same) == [key]  # key order in the data does not matter
    assert task_keys("v1", "<View/>", [{"id": 1, "data": {"image": "b.png"}}]) != [key]
    assert task_keys("v2", "<View/>", tasks) != [key] and task_keys("v1", "<View x='1'/>", tasks) != [key]


class Runner:
    """Stands in for a model process; a task whose value is 'bad' fails its batch."""

    def __init__(self) -> None:
        self.items = 0

    def call(self, hooks_id, values, tasks, context, label_config):
        if "bad" in values:
            raise HookFailed("post_hook raised ValueError: bad", "Fix the post_hook.")
        self.items += len(values)
        return [f"prediction of {v}" for v in values], {}


class HeldRunner(Runner):
    """A runner whose batches wait for ``release``: what the test does first happens while all is queued."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def call(self, *args):
        self.release.wait(10)
        return super().call(*args)


def make_queue(cache, runner, max_tasks=100):
    finish = lambda outputs, tasks, config: [f'"{o}"' for o in outputs]
    return Continuation(DynamicBatcher(runner, 0), cache, "hooks", 2, finish, max_tasks)


def leftover(n, value):
    return Leftover(("config", "labels", n, "data"), {"id": n}, "<View/>", resolve=lambda: TaskInput(value=value))


def test_the_background_fills_the_cache_and_a_round_can_wait_for_what_is_queued():
    cache, runner = PredictionCache(1 << 20, 3600), HeldRunner()  # nothing finishes before the second adopt
    queue = make_queue(cache, runner)
    leftovers = [leftover(n, f"task {n}") for n in range(5)]
    assert queue.adopt(leftovers) == 5
    assert queue.adopt([leftover(0, "again")]) == 0  # already queued: not taken twice
    runner.release.set()
    assert queue.pending(leftovers[4].key).result(timeout=10) == '"prediction of task 4"'
    wait_until(lambda: not queue.active, 10, "the queue to empty")
    assert [cache.get(left.key) for left in leftovers] == [f'"prediction of task {n}"' for n in range(5)]
    assert runner.items == 5 and queue.describe()["done"] == 5


def test_failures_fail_their_tasks_and_a_run_of_them_stops_the_queue():
    cache, runner = PredictionCache(1 << 20, 3600), Runner()
    queue = make_queue(cache, runner)
    bad = [leftover(n, "bad") for n in range(8)]
    queue.adopt(bad + [leftover(99, "good")])
    wait_until(lambda: not queue.active, 10, "the queue to give up")
    progress = queue.describe()
    assert progress["failed"] == 9 and "post_hook raised ValueError" in progress["last_error"]
    assert cache.get(("config", "labels", 99, "data")) is None  # dropped after three failed batches in a row


def test_a_new_configuration_drops_the_queue():
    cache, runner = PredictionCache(1 << 20, 3600), HeldRunner()
    queue = make_queue(cache, runner)
    leftovers = [leftover(n, f"task {n}") for n in range(6)]
    queue.adopt(leftovers)
    queue.stop()
    runner.release.set()
    assert all(left.done.cancelled() for left in leftovers) and not queue.active
    assert queue.adopt([leftover(7, "late")]) == 0


def test_tasks_whose_data_failed_fail_alone_and_do_not_stop_the_queue():
    cache, runner = PredictionCache(1 << 20, 3600), Runner()
    queue = make_queue(cache, runner)
    missing = [Leftover(("config", "labels", n, "data"), {"id": n}, "<View/>",
                        resolve=lambda: TaskInput(error="could not fetch it")) for n in range(5)]
    good = leftover(9, "task 9")
    queue.adopt(missing + [good])
    assert good.done.result(timeout=10) == '"prediction of task 9"'
    assert queue.describe()["failed"] == 5 and cache.get(good.key)


def test_the_cache_is_kept_across_a_stop_with_each_entry_s_age(tmp_path):
    clock = Clock()
    cache = PredictionCache(1 << 20, ttl_s=60, clock=clock)
    cache.put(("config", "labels", 1, "data"), '"one"')
    clock.now = 50
    cache.put(("config", "labels", "task-2", "data"), '"two"')
    assert cache.save(tmp_path / "cache.json") == 2  # the backend stops (to sleep, say)

    later = Clock()
    later.now = 1000.0  # another process: its own monotonic clock
    restored = PredictionCache(1 << 20, ttl_s=60, clock=later)
    assert restored.load(tmp_path / "cache.json") == 2 and not (tmp_path / "cache.json").exists()
    assert restored.get(("config", "labels", "task-2", "data")) == '"two"'
    later.now += 20  # the first was made 70 s ago now: too old, though it was kept
    assert restored.get(("config", "labels", 1, "data")) is None
    assert restored.get(("config", "labels", "task-2", "data")) == '"two"'
    assert restored.load(tmp_path / "cache.json") == 0  # read once; a missing or broken file is nothing
    (tmp_path / "cache.json").write_text("{not json")
    assert restored.load(tmp_path / "cache.json") == 0
    assert PredictionCache(1 << 20, 60).save(tmp_path / "cache.json") == 0 and not (tmp_path / "cache.json").exists()
