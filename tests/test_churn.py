"""Configures racing predictions on a real gunicorn backend: the old configuration serves every request
until the new one is ready, a request whose configuration is retired under it runs on the new one, and
configures faster than loads coalesce (200 or 409 superseded, never a 503)."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from backend.config.spec import ModelSpec
from backend.core.settings import Settings
from backend.isolation.modelprocess import ModelProcess, Retired
from backend.serving.runtime import Runtime
from backend.state.store import ConfigurationStore
from harness.calls import configure
from harness.servers import file_server, wait_until
from lsmlflow.pickling import encode_hook
from tests.support import hooks
from tests.support.hooks import IMAGE_CONFIG

EXPECTED = {"brightness:1": ["light", "dark"], "brightness:2": ["dark", "light"]}  # v2 reads the other way


def test_configures_never_fail_the_predictions_they_race(start_backend, images):
    # Task data from a server that takes 30 ms a file: requests spend time between taking the serving
    # configuration and reaching its model process, which is where a configure used to strand them.
    files = file_server(images["white"].parent, delay=0.03)
    backend = start_backend(FETCH_ALLOW_PRIVATE="127.0.0.1", THREADS="8")
    assert configure(backend).status_code == 200
    fresh = itertools.count()
    done = threading.Event()
    predictions: Counter = Counter()
    configures: Counter = Counter()
    lock = threading.Lock()

    def predictor() -> None:
        with requests.Session() as session:
            while not done.is_set():
                n = next(fresh)  # never seen: no cache answers for the model
                tasks = [{"id": n, "data": {"image": f"{files.url}/white.png?n={n}"}},
                         {"id": -n - 1, "data": {"image": f"{files.url}/black.png?n={n}"}}]
                answer = session.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG},
                                      timeout=60)
                outcome = f"{answer.status_code} {answer.text[:200]}"
                if answer.ok:
                    got = [p["result"][0]["value"]["choices"][0] for p in answer.json()["results"]]
                    version = answer.json()["results"][0]["model_version"]
                    outcome = "ok" if got == EXPECTED.get(version) else f"wrong {got} from {version}"
                with lock:
                    predictions[outcome] += 1

    def configurer(models: list[str]) -> None:
        for index, model in enumerate(models):  # reloads (another version: a new process) and hook swaps
            post = hooks.choices_post if index % 2 else hooks.scored_choices_post
            answer = configure(backend, model_uri=model, post_hook=encode_hook(post), timeout=60)
            outcome = answer.status_code if answer.status_code in (200, 202, 409) else f"{answer.status_code} {answer.text[:300]}"
            with lock:
                configures[outcome] += 1

    try:
        threads = [threading.Thread(target=predictor) for _ in range(4)]
        versions = ["models:/brightness/2", "models:/brightness/1"] * 4
        configurers = [threading.Thread(target=configurer, args=(versions,)),
                       threading.Thread(target=configurer, args=(versions[1:],))]
        for thread in threads + configurers:
            thread.start()
        for thread in configurers:
            thread.join()
        done.set()
        for thread in threads:
            thread.join()
    finally:
        done.set()
        files.close()
    assert set(predictions) == {"ok"}, predictions
    assert predictions["ok"] >= 20
    assert set(configures) <= {200, 202, 409} and configures[200] >= 1, configures  # 202: still loading
    health = requests.get(backend.url + "/health", timeout=1).json()
    assert health["configured"] and "last_error" not in health


def test_a_configure_replaced_while_it_loads_is_superseded_not_failed(start_backend):
    backend = start_backend()
    assert configure(backend).status_code == 200
    first: dict = {}
    loading = threading.Thread(target=lambda: first.update(answer=configure(backend, model_uri="models:/brightness/2")))
    loading.start()
    wait_until(lambda: requests.get(backend.url + "/configure/status", timeout=1).json().get("model_uri")
               == "models:/brightness/2", 30, "the first load")
    second = configure(backend, model_uri="models:/brightness@champion")  # another model key: another load
    loading.join()
    assert second.status_code == 200, second.text
    answer = first["answer"]
    if answer.status_code == 200:  # it was ready before the second came: nothing to supersede
        return
    assert answer.status_code == 409 and answer.json()["status"] == "superseded", answer.text
    assert answer.json()["serving"]["model_version"] == "brightness:1"  # the old one, until the newest is ready
    assert "last_error" not in requests.get(backend.url + "/health", timeout=1).json()  # no failure happened


def test_a_hook_swap_whose_process_is_retired_under_it_loads_the_hooks_anew(tmp_path: Path):
    # A load that finishes retires the serving process while another configure swaps hooks in it: the
    # swap must fall back to a load in a new process (it once surfaced as a 500 from an assertion).
    retired = ModelProcess(zygote=None, artifacts_dir=tmp_path, call_timeout_s=1)  # type: ignore[arg-type]
    retired.stop()
    with pytest.raises(Retired):
        retired.set_hooks("hooks", "", "")
    runtime = Runtime(Settings(), ConfigurationStore(tmp_path), zygote=None, make_continuation=None)  # type: ignore[arg-type]
    assert runtime._swap_hooks(SimpleNamespace(process=retired), ModelSpec(model_uri="models:/m/1")) is False  # type: ignore[arg-type]


class _HeldLoads:
    """Model processes whose load of ``held`` waits for ``go``; any other loads at once."""

    def __init__(self, held: str) -> None:
        self.held, self.go = held, threading.Event()

    def __call__(self) -> SimpleNamespace:
        def load(spec: ModelSpec, prefer_local: bool = False) -> dict[str, str]:
            if spec.model_uri == self.held:
                assert self.go.wait(10)
            return {"uri": spec.model_uri}

        return SimpleNamespace(set_hooks=lambda *args, **kwargs: {}, load=load, stop=lambda: None)


def _worker(tmp_path: Path, loads: _HeldLoads) -> Runtime:
    """One gunicorn worker's runtime over the backend's MODEL_DIR (shared by its siblings)."""
    runtime = Runtime(Settings(), ConfigurationStore(tmp_path), zygote=None,  # type: ignore[arg-type]
                      make_continuation=lambda **_: SimpleNamespace(stop=lambda: None))  # type: ignore[arg-type]
    runtime._new_process = loads  # type: ignore[method-assign]
    return runtime


def test_a_restore_that_ends_after_a_sibling_saved_a_newer_configuration_does_not_write_the_old_one_back(tmp_path):
    # Two workers: one restores v1 from the store while the other is configured with v2. The restore ended
    # last and saved v1 over v2, and every worker followed it back to v1 (CI: "both workers on v2").
    first, second = ModelSpec(model_uri="models:/m/1"), ModelSpec(model_uri="models:/m/2")
    loads = _HeldLoads(held=first.model_uri)
    restoring, configured = _worker(tmp_path, loads), _worker(tmp_path, loads)
    ConfigurationStore(tmp_path).configuration.save({"spec": first.to_dict()})
    job = restoring.restore()  # its load of v1 is held
    assert job is not None and restoring.restoring
    assert configured.configure(second) is not None
    wait_until(lambda: configured.active is not None, 10, "v2 served by the other worker")
    loads.go.set()
    assert job.settled.wait(10)
    assert restoring.active is not None and restoring.active.spec.model_uri == first.model_uri  # what it restored
    assert ConfigurationStore(tmp_path).configuration.load()["spec"]["model_uri"] == second.model_uri  # not overwritten
    restoring.follow_store(force=True)  # the next request's look at the store: v2, newer than what it restored
    wait_until(lambda: restoring.active.spec.model_uri == second.model_uri, 10, "v2 followed")
