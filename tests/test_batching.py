"""Dynamic batching: concurrent requests share model calls, a lone request never waits, and one
request's bad input fails that request only."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from backend.batching import Chunk, DynamicBatcher
from backend.errors import HookFailed
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG, encode


class CountingModel:
    """Stands in for a ConfiguredModel: records each call; a value of 'bad' makes its batch fail."""

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self.calls: list[list] = []
        self.release = threading.Event()
        self.release.set()

    def run_batch(self, values, tasks, context, label_config, timer):
        self.release.wait(10)
        self.calls.append(list(values))
        if "bad" in values:
            raise HookFailed("pre_hook raised ValueError: bad input", "Fix the pre_hook.")
        return [f"prediction of {v}" for v in values]


def submit(batcher, model, *values):
    return batcher.submit(Chunk(model, list(values), [{"id": v} for v in values], "<View/>", None))


def test_a_lone_request_does_not_wait_for_company():
    batcher, model = DynamicBatcher(max_latency_ms=60_000), CountingModel()
    with batcher.request():
        assert submit(batcher, model, "a").result(timeout=5) == ["prediction of a"]  # not 60 s


def test_concurrent_requests_share_one_model_call_and_get_their_own_answers():
    batcher, model = DynamicBatcher(max_latency_ms=5_000), CountingModel(batch_size=8)
    gate = threading.Barrier(4)

    def one_request(value):
        with batcher.request():
            gate.wait(5)
            return submit(batcher, model, value).result(timeout=10)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one_request, ["a", "b", "c", "d"]))
    assert answers == [["prediction of a"], ["prediction of b"], ["prediction of c"], ["prediction of d"]]
    assert len(model.calls) == 1 and sorted(model.calls[0]) == ["a", "b", "c", "d"]
    assert batcher.describe(8) == {
        "enabled": True,
        "max_latency_ms": 5000.0,
        "max_batch_size": 8,
        "model_calls": 1,
        "items": 4,
    }


def test_batches_stop_at_the_models_batch_size():
    batcher, model = DynamicBatcher(max_latency_ms=5_000), CountingModel(batch_size=2)
    model.release.clear()  # hold the first call so the rest queue up
    with batcher.request(), batcher.request(), batcher.request():
        futures = [submit(batcher, model, v) for v in "abc"]
        model.release.set()
        assert [f.result(timeout=10) for f in futures] == [
            ["prediction of a"],
            ["prediction of b"],
            ["prediction of c"],
        ]
    assert all(len(call) <= 2 for call in model.calls)


def test_one_requests_failure_does_not_fail_the_others_in_its_batch():
    batcher, model = DynamicBatcher(max_latency_ms=5_000), CountingModel()
    with batcher.request(), batcher.request(), batcher.request():
        good, bad, other = submit(batcher, model, "a"), submit(batcher, model, "bad"), submit(batcher, model, "b")
        assert good.result(timeout=10) == ["prediction of a"] and other.result(timeout=10) == ["prediction of b"]
        with pytest.raises(HookFailed, match="bad input"):
            bad.result(timeout=10)
    assert model.calls == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # together first, then each alone


def test_a_real_backend_batches_concurrent_single_task_requests(start_backend, images):
    backend = start_backend(MAX_LATENCY_MS="50")
    configured = requests.post(
        backend.url + "/configure",
        timeout=60,
        json={
            "model_uri": "models:/brightness/1",
            "pre_hook": encode(hooks.brightness_pre),
            "post_hook": encode(hooks.choices_post),
        },
    )
    assert configured.status_code == 200

    def one(name):
        task = [{"id": 1, "data": {"image": str(images[name])}}]
        answer = requests.post(backend.url + "/predict", json={"tasks": task, "label_config": IMAGE_CONFIG}, timeout=30)
        return answer.json()["results"][0]["result"][0]["value"]["choices"][0]

    names = ["white", "black"] * 8
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, names)) == ["light", "dark"] * 8
    batching = requests.get(backend.url + "/health", timeout=5).json()["batching"]
    assert batching["enabled"] and batching["items"] == 16
    assert batching["model_calls"] < 16  # some requests shared a model call
