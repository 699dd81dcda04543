"""What several workers share (backend/serving/shared.py), with two "workers" in one test: the other one is
named after a real process, so that it can die."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from backend.core.lifetime import process_identity
from backend.serving import shared
from backend.serving.continuation import PredictionCache
from backend.serving.shared import SharedPredictions
from backend.state.sqlitedb import SharedDb
from harness.servers import wait_until

KEYS = [("config", "labels", n, "data") for n in range(3)]


@pytest.fixture
def db(tmp_path):
    return SharedDb(tmp_path / shared.FILE_NAME, shared.SCHEMA)


@pytest.fixture
def other_worker():
    """A live process to name the other worker after; ``kill()`` is its death."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_task_another_worker_took_on_is_waited_for_not_taken_again(db, other_worker):
    them = SharedPredictions(db, 1 << 20, 3600, owner=process_identity(other_worker.pid))
    us = SharedPredictions(db, 1 << 20, 3600)
    assert them.claim(KEYS) == set(KEYS)
    assert us.holds("config") and not us.holds("another config")
    assert us.claim(KEYS) == set()  # a round here must not start them again
    futures = us.watch(dict(enumerate(KEYS)), deadline=time.monotonic() + 30)
    assert set(futures) == {0, 1, 2}
    them.settle([(KEYS[0], '"zero"')], released=[KEYS[1]])  # one done, one given up
    assert futures[0].result(timeout=10) == '"zero"'
    with pytest.raises(RuntimeError, match="predicted again in the next round"):
        futures[1].result(timeout=10)
    assert not futures[2].done()  # still claimed by a live worker: still waited for
    assert us.get_many(KEYS) == {0: '"zero"'}


def test_the_claims_of_a_worker_that_died_count_for_nothing(db, other_worker):
    them = SharedPredictions(db, 1 << 20, 3600, owner=process_identity(other_worker.pid))
    us = SharedPredictions(db, 1 << 20, 3600)
    them.claim(KEYS)
    waiting = us.watch({0: KEYS[0]}, deadline=time.monotonic() + 30)[0]
    other_worker.kill()
    other_worker.wait()
    with pytest.raises(RuntimeError, match="the worker restarted"):
        waiting.result(timeout=10)  # the request answers [] for it at once, not at its deadline
    assert us.watch(dict(enumerate(KEYS)), deadline=time.monotonic() + 30) == {}
    assert us.claim(KEYS) == set(KEYS)  # the next round takes them on here
    us._maintained = float("-inf")
    us.maintain()
    assert us.describe()["claimed"] == 3  # the dead worker's rows went, ours stay


def test_a_waiting_request_stops_at_its_deadline(db, other_worker):
    them = SharedPredictions(db, 1 << 20, 3600, owner=process_identity(other_worker.pid))
    us = SharedPredictions(db, 1 << 20, 3600)
    them.claim(KEYS[:1])
    future = us.watch({0: KEYS[0]}, deadline=time.monotonic() + 0.3)[0]
    wait_until(lambda: not any(t.name == "shared-wait" for t in threading.enumerate()), 10, "the watch to end")
    them.settle([(KEYS[0], '"late"')])
    assert not future.done()  # the request answered [] at its deadline; nothing reads the file for it now
    assert us.get_many(KEYS[:1]) == {0: '"late"'}  # the next round answers it from the file


def test_the_shared_cache_is_bounded_by_size_and_age_and_follows_the_configuration(db):
    cache = SharedPredictions(db, max_bytes=30, ttl_s=3600)
    keys = KEYS + [("config", "labels", 3, "data")]
    for n, key in enumerate(keys):  # written 100 s ago, a second apart: "the oldest" is one entry
        cache.settle([(key, "x" * 10)])
        db.db().execute("UPDATE predictions SET at = ? WHERE key = ?", (time.time() - 100 + n, shared._text(key)))
    cache._maintained = float("-inf")
    cache.maintain()
    assert sorted(cache.get_many(keys)) == [1, 2, 3]  # the oldest made room
    assert cache.describe()["bytes"] == 30 and cache.describe()["entries"] == 3
    assert SharedPredictions(db, max_bytes=30, ttl_s=50).get_many(keys) == {}  # all older than a 50 s TTL
    cache.settle([(("other config", "labels", 1, "data"), "y")])
    cache.keep_only("other config")  # a new configuration serves, in every worker
    assert not cache.holds("config") and cache.holds("other config")


def test_the_memory_and_shared_caches_answer_alike():
    """The one-worker cache takes the same calls, and has no other worker to wait for."""
    cache = PredictionCache(1 << 20, 3600)
    assert cache.claim(KEYS) == set(KEYS) and cache.watch(dict(enumerate(KEYS)), time.monotonic() + 1) == {}
    cache.settle([(KEYS[1], '"one"')], released=[KEYS[0]])
    assert cache.get_many(KEYS) == {1: '"one"'}
