"""Dependencies down, on a real gunicorn backend: the registry's ``mlflow server`` gone (the loaded model
serves on, the follower backs off and says so, a restart loads what was downloaded before); a full disk
under MODEL_DIR stops the task data cache, not the serving, and /health says why; task data that cannot
be fetched fails those tasks alone, and the next round predicts them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from harness.calls import configure, labels
from harness.servers import MlflowServer, file_server, register_trainable, wait_until
from lsmlflow.pickling import encode_hook
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG, sentiment_post


def test_the_registry_down_stops_nothing_that_was_loaded(start_backend, tmp_path):
    (tmp_path / "mlflow").mkdir()
    registry = MlflowServer(tmp_path / "mlflow").start()
    try:
        register_trainable(registry.url, "followed")
        backend = start_backend(ALIAS_POLL_S="1")
        body = {"model_uri": "models:/followed@champion", "tracking_uri": registry.url,
                "post_hook": encode_hook(sentiment_post)}
        assert requests.post(backend.url + "/configure", json=body, timeout=120).status_code == 200

        def sentiment() -> tuple[str, str]:
            answer = requests.post(backend.url + "/predict", timeout=30, json={
                "tasks": [{"id": 1, "data": {"text": "great good"}}], "label_config": TEXT_CONFIG}).json()
            return answer["results"][0]["result"][0]["value"]["choices"][0], answer["model_version"]

        served = sentiment()
        registry.stop(signal.SIGKILL)
        assert sentiment() == served  # the loaded model serves on
        wait_until(lambda: "cannot be checked" in requests.get(backend.url + "/health", timeout=1).json()
                   ["registry"].get("problem", ""), 60, "the follower to say the registry is down")
        problem = requests.get(backend.url + "/health", timeout=1).json()["registry"]["problem"]
        assert "unreachable" in problem and "asking again in" in problem
        backend.stop()
        backend.start()  # with the registry still down: what was downloaded before serves
        wait_until(lambda: requests.get(backend.url + "/health", timeout=1).json()["configured"], 60, "restored")
        assert sentiment() == served
    finally:
        registry.stop()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m"):
    """A tmpfs of ``size`` at ``path``: a disk that can really fill up."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill ``path``'s disk to the last page: big writes, then small files until not even one more fits."""
    filler = path / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    with contextlib.suppress(OSError):
        for n in range(1024):
            (filler.parent / f"filler-{n}").write_bytes(b"\0" * 512)
    return filler


def predict(backend, urls):
    tasks = [{"id": n, "data": {"image": url}} for n, url in enumerate(urls, 1)]
    return requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=60)


def test_a_full_model_dir_stops_the_cache_not_the_serving(start_backend, images, tmp_path):
    files = file_server(images["white"].parent)
    with small_disk(tmp_path / "model_dir") as disk:  # where start_backend puts MODEL_DIR
        backend = start_backend(FETCH_ALLOW_PRIVATE="127.0.0.1")
        assert backend.model_dir == disk
        try:
            assert configure(backend).status_code == 200
            first = predict(backend, [f"{files.url}/white.png?n=1"])
            assert labels(first) == ["light"]
            filler = fill(disk)
            served = predict(backend, [f"{files.url}/white.png?n=2", f"{files.url}/black.png?n=2"])
            assert labels(served) == ["light", "dark"], served.text  # served, with the disk full
            cache = requests.get(backend.url + "/health", timeout=1).json()["task_data_cache"]
            assert cache["writing"] is False and "No space left on device" in cache["problem"]["error"], cache
            # Both went to the spill folder, or one did and the other took the room the first's partial file left
            # when its write failed and it was removed: either way nothing failed and the cache said why.
            assert cache["spilled"]["files"] in (1, 2), cache
            os.unlink(filler)  # room again: the next file is cached under MODEL_DIR
            assert labels(predict(backend, [f"{files.url}/black.png?n=3"])) == ["dark"]
            cache = requests.get(backend.url + "/health", timeout=1).json()["task_data_cache"]
            assert cache["writing"] is True and "problem" not in cache
        finally:
            backend.stop()
            files.close()


def test_task_data_that_cannot_be_fetched_fails_those_tasks_alone_and_the_next_round_predicts_them(start_backend, images):
    files = file_server(images["white"].parent)
    backend = start_backend(FETCH_ALLOW_PRIVATE="127.0.0.1", FETCH_TIMEOUT_S="2")
    assert configure(backend).status_code == 200
    down = file_server(images["white"].parent)
    down_url = down.url
    down.close()  # Label Studio's file server, gone
    urls = [f"{files.url}/white.png?r=1", f"{down_url}/black.png?r=1"]
    first = predict(backend, urls)
    assert first.status_code == 200 and labels(first) == ["light", None]
    assert [e["task"] for e in first.json()["errors"]] == [2]
    again = file_server(images["white"].parent, port=int(down_url.rsplit(":", 1)[1]))  # back on the same address
    try:
        assert labels(predict(backend, urls)) == ["light", "dark"]  # the failed task is predicted this round
    finally:
        again.close()
        files.close()
