"""Dynamic batching: concurrent requests share model calls, a lone request never waits, and one
request's bad input fails that request only."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from backend.core.errors import HookFailed
from backend.serving.batching import Chunk, DynamicBatcher, Retired
from harness.servers import wait_until
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG


class CountingModel:
    """Stands in for a model process: records each call; a value of 'bad' makes its batch fail."""

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self.calls: list[list] = []
        self.release = threading.Event()
        self.release.set()

    def call(self, hooks_id, values, tasks, context, label_config):
        self.release.wait(10)
        self.calls.append(list(values))
        if "bad" in values:
            raise HookFailed("pre_hook raised ValueError: bad input", "Fix the pre_hook.")
        return [f"prediction of {v}" for v in values], {}


def submit(batcher, model, *values, request=None, background=False):
    chunk = Chunk("hooks", model.batch_size, list(values), [{"id": v} for v in values], "<View/>", request=request,
                  background=background)
    return batcher.submit(chunk)


def test_a_lone_request_does_not_wait_for_company():
    model = CountingModel()
    batcher = DynamicBatcher(model, max_latency_ms=60_000)
    with batcher.request() as request:
        assert submit(batcher, model, "a", request=request).result(timeout=5) == ["prediction of a"]  # not 60 s


def test_concurrent_requests_share_one_model_call_and_get_their_own_answers():
    model = CountingModel(batch_size=8)
    batcher = DynamicBatcher(model, max_latency_ms=5_000)
    gate = threading.Barrier(4)

    def one_request(value):
        with batcher.request() as request:
            gate.wait(5)
            return submit(batcher, model, value, request=request).result(timeout=10)

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
        "queued": 0,
    }


def test_batches_stop_at_the_models_batch_size():
    model = CountingModel(batch_size=2)
    batcher = DynamicBatcher(model, max_latency_ms=5_000)
    model.release.clear()  # hold the first call so the rest queue up
    with batcher.request() as a, batcher.request() as b, batcher.request() as c:
        futures = [submit(batcher, model, v, request=r) for v, r in zip("abc", (a, b, c))]
        model.release.set()
        assert [f.result(timeout=10) for f in futures] == [
            ["prediction of a"],
            ["prediction of b"],
            ["prediction of c"],
        ]
    assert all(len(call) <= 2 for call in model.calls)


def _hold_the_model_with_a_running_batch(batcher, model):
    """A first request's chunk, running and held; that request now only awaits its answer."""
    model.release.clear()
    with batcher.request() as first:
        running = submit(batcher, model, "a", request=first)
    wait_until(running.running, 5, "the first batch to start")
    return running


def test_a_batch_waits_for_a_request_still_submitting():
    model = CountingModel()
    batcher = DynamicBatcher(model, max_latency_ms=60_000)
    running = _hold_the_model_with_a_running_batch(batcher, model)
    with batcher.request() as second, batcher.request() as late:
        queued = submit(batcher, model, "b", request=second)
        model.release.set()
        assert running.result(timeout=5) == ["prediction of a"]
        joined = submit(batcher, model, "c", request=late)  # the batch after "a" waited for it
        assert queued.result(timeout=5) == ["prediction of b"] and joined.result(timeout=5) == ["prediction of c"]
    assert model.calls == [["a"], ["b", "c"]]


def test_a_batch_does_not_wait_for_requests_that_only_await_answers():
    """Under steady load, requests finishing their predictions are always about; waiting for them
    would add max_latency_ms to every batch."""
    model = CountingModel()
    batcher = DynamicBatcher(model, max_latency_ms=60_000)
    running = _hold_the_model_with_a_running_batch(batcher, model)
    with batcher.request() as second:
        queued = submit(batcher, model, "b", request=second)
    model.release.set()
    assert running.result(timeout=5) == ["prediction of a"]
    assert queued.result(timeout=5) == ["prediction of b"]  # not after 60 s
    assert model.calls == [["a"], ["b"]]


def test_a_requests_chunk_goes_before_background_work_queued_earlier():
    model = CountingModel(batch_size=1)
    batcher = DynamicBatcher(model, max_latency_ms=0)
    running = _hold_the_model_with_a_running_batch(batcher, model)
    later = [submit(batcher, model, f"background {n}", background=True) for n in range(3)]
    with batcher.request() as request:
        urgent = submit(batcher, model, "request", request=request)
    model.release.set()
    assert urgent.result(timeout=5) == ["prediction of request"]
    assert [f.result(timeout=5) for f in later] and running.result(timeout=5)
    assert model.calls[:2] == [["a"], ["request"]]  # the request overtook the queued background chunks


def test_one_requests_failure_does_not_fail_the_others_in_its_batch():
    model = CountingModel()
    batcher = DynamicBatcher(model, max_latency_ms=5_000)
    with batcher.request() as a, batcher.request() as b, batcher.request() as c:
        good, bad, other = (submit(batcher, model, v, request=r) for v, r in (("a", a), ("bad", b), ("b", c)))
        assert good.result(timeout=10) == ["prediction of a"] and other.result(timeout=10) == ["prediction of b"]
        with pytest.raises(HookFailed, match="bad input"):
            bad.result(timeout=10)
    assert model.calls == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # together first, then each alone


def test_a_retired_batcher_finishes_what_it_has_then_tells_late_requests_to_go_elsewhere():
    """A request that took the serving configuration just before a configure retired it must not wait
    for a model process that is gone: it hears Retired at once, and runs again on the new one."""
    model = CountingModel()
    batcher = DynamicBatcher(model, max_latency_ms=1)
    stopped = threading.Event()
    with batcher.request() as request:
        batcher.retire(then=stopped.set)
        assert not stopped.wait(0.2)  # a request still submitting holds the process
        assert submit(batcher, model, "a", request=request).result(timeout=5) == ["prediction of a"]
    assert stopped.wait(5)
    with pytest.raises(Retired), batcher.request():
        pass
    late = submit(batcher, model, "b")  # a background chunk after the end
    with pytest.raises(Retired):
        late.result(timeout=5)


def test_a_real_backend_batches_concurrent_single_task_requests(start_backend, images):
    backend = start_backend(MAX_LATENCY_MS="50")
    configured = requests.post(
        backend.url + "/configure",
        timeout=60,
        json={
            "model_uri": "models:/brightness/1",
            "pre_hook": encode_hook(hooks.brightness_pre),
            "post_hook": encode_hook(hooks.choices_post),
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


class TwoLaneModel(CountingModel):
    """A model process with an interactive lane: clicks on images it has embedded go there."""

    def __init__(self) -> None:
        super().__init__()
        self.lane_calls: list[list] = []

    def interactive(self, hooks_id, values):
        return all(v.startswith("embedded") for v in values)

    def call_interactive(self, hooks_id, values, tasks, context, label_config):
        self.lane_calls.append(list(values))
        return [f"decoded {v}" for v in values], {}


def test_a_click_on_an_embedded_image_takes_the_interactive_lane_beside_a_running_call():
    model = TwoLaneModel()
    model.release.clear()  # the main lane is busy: another annotator's new image being embedded
    batcher = DynamicBatcher(model)
    click = {"result": [{"type": "keypointlabels"}]}
    new_image = batcher.submit(Chunk("hooks", 8, ["new.png"], [{"id": 1}], "<View/>", context=click))
    wait_until(lambda: not batcher._queue, 5, "the new image's call to start")
    embedded = batcher.submit(Chunk("hooks", 8, ["embedded.png"], [{"id": 2}], "<View/>", context=click))
    assert embedded.result(5) == ["decoded embedded.png"] and not new_image.done()
    not_a_click = submit(batcher, model, "embedded-too.png")  # no context: a prediction, on the main lane
    stopped = threading.Event()
    batcher.retire(then=stopped.set)
    model.release.set()
    assert new_image.result(5) == ["prediction of new.png"] and not_a_click.result(5) == ["prediction of embedded-too.png"]
    assert stopped.wait(5) and model.lane_calls == [["embedded.png"]] and batcher.describe()["interactive_lane_calls"] == 1
