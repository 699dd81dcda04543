"""The backend under load, each figure against a baseline run side by side in the same process.

- overhead: /predict over HTTP vs the same pre_hook -> predict -> post_hook called in-process;
- hand-off: one batch through the model process (the hop alone, no HTTP) vs the same calls in-process,
  with numpy values in the post hook's answer;
- mlflow serve: the same pyfunc model behind ``mlflow models serve`` (/invocations) vs /predict;
- task data: 64 image tasks from a server adding 20 ms per file, the backend vs one-by-one fetching;
- batching: 16 concurrent single-task clients, model 20 ms + 1 ms per item, batching on vs off; with a
  model that sleeps holding a device lock (like a GPU) and with one that computes holding the GIL;
- mlflow serve under load: 16 concurrent single-row clients, the GIL-holding model, ours vs /invocations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from harness.servers import PYTHON_BIN, ROOT, Backend, Process, base_env, file_server, free_port, wait_until
from lsmlflow.pickling import encode_hook

from . import models
from .common import Row, Table, cpu_used, median, percentile, tree_cpu_seconds

REPEATS = 15
CPU_ROLES = ("gunicorn master", "worker (HTTP, fetch, validation)", "zygote", "model process (hooks and model)")


def _configure(backend: Backend, model: str, post_hook=models.post_hook) -> None:
    answer = requests.post(
        backend.url + "/configure",
        timeout=120,
        json={
            "model_uri": f"models:/{model}/1",
            "pre_hook": encode_hook(models.pre_hook),
            "post_hook": encode_hook(post_hook),
            "batch_size": 64,
        },
    )
    assert answer.status_code == 200, answer.text


def _text_tasks(count: int, salt: str = "") -> list[dict]:
    return [{"id": i, "data": {"text": f"task {salt}{i} " + "x" * (i % 12)}} for i in range(count)]


def _timed(call, repeats: int = REPEATS) -> float:
    """Median seconds of ``call`` after one warm-up call."""
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return median(samples)


def _poster(session: requests.Session, url: str, body: dict):
    """A call that POSTs ``body``, encoded once: the client's own JSON encoding is not what is measured."""
    data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    return lambda: session.post(url, data=data, headers=headers, timeout=60).raise_for_status()


def _interleaved(ours, theirs, repeats: int = REPEATS) -> tuple[list[float], list[float]]:
    """Seconds of each call, round by round, the calls interleaved (ABBA order) so drift on a noisy
    machine lands on both alike."""
    for _ in range(3):  # warm both: first calls import, connect and fill caches
        ours(), theirs()
    samples: dict[object, list[float]] = {ours: [], theirs: []}
    for round_ in range(repeats):
        for call in (ours, theirs) if round_ % 2 == 0 else (theirs, ours):
            started = time.perf_counter()
            call()
            samples[call].append(time.perf_counter() - started)
    return samples[ours], samples[theirs]


def _side_by_side(ours, theirs, repeats: int = REPEATS) -> tuple[float, float]:
    """Median seconds of each, measured interleaved."""
    ours_samples, theirs_samples = _interleaved(ours, theirs, repeats)
    return median(ours_samples), median(theirs_samples)


def _paired_note(what: str, ours: list[float], theirs: list[float]) -> str:
    """The per-round difference of an interleaved pair: whether a gap stands out from the noise."""
    gaps = sorted((a - b) * 1000 for a, b in zip(ours, theirs))
    faster = sum(gap < 0 for gap in gaps)
    return (
        f"{what}: ours minus theirs, round by round: median {median(gaps):+.2f} ms, middle half "
        f"{percentile(gaps, 25):+.2f} to {percentile(gaps, 75):+.2f} ms; ours faster in {faster} of {len(gaps)} rounds"
    )


def overhead(table: Table, registry: str, backend: Backend) -> None:
    import mlflow.pyfunc

    mlflow.set_tracking_uri(registry)
    model = mlflow.pyfunc.load_model("models:/per_item_1ms/1")
    session = requests.Session()
    for count in (1, 64):
        tasks = _text_tasks(count)
        texts = [t["data"]["text"] for t in tasks]
        over_http, in_process = _side_by_side(
            _poster(session, backend.url + "/predict", {"tasks": tasks, "label_config": models.TEXT_CONFIG}),
            lambda texts=texts: models.post_hook(model.predict(models.pre_hook(texts))),
        )
        table.add(
            Row(
                "overhead",
                f"/predict over HTTP, {count} task(s), ~1 ms/task model",
                over_http * 1000,
                in_process * 1000,
                "ms",
                "hooks + model in-process",
                target="within 10% at 64 tasks" if count == 64 else "",
            )
        )


def against_mlflow_serve(table: Table, registry: str, backend: Backend, workdir: Path) -> None:
    port = free_port()
    server = Process(
        [
            str(PYTHON_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/per_item_1ms/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        base_env(MLFLOW_TRACKING_URI=registry),
        workdir / "mlflow-serve.log",
    )
    server.start()
    try:
        wait_until(
            lambda: requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok, 120, "mlflow models serve", server.proc
        )
        session = requests.Session()
        tasks = _text_tasks(64)
        frame = {"dataframe_split": {"columns": ["n"], "data": [[len(t["data"]["text"])] for t in tasks]}}
        ours, theirs = _interleaved(
            _poster(session, backend.url + "/predict", {"tasks": tasks, "label_config": models.TEXT_CONFIG}),
            _poster(session, f"http://127.0.0.1:{port}/invocations", frame),
            repeats=25,
        )
        table.add(
            Row(
                "vs mlflow serve",
                "64 rows: /predict (with hooks and validation) vs /invocations",
                median(ours) * 1000,
                median(theirs) * 1000,
                "ms",
                "mlflow models serve",
                target="not slower",
            )
        )
        table.notes.append(_paired_note("vs mlflow serve", ours, theirs))
    finally:
        server.stop()


def task_data(table: Table, backend: Backend, workdir: Path) -> None:
    folder = workdir / "served-images"
    folder.mkdir()
    for i in range(64):
        Image.new("RGB", (64, 48), (i * 3, i * 3, i * 3)).save(folder / f"{i}.png")
    server = file_server(folder, delay=0.02)
    try:
        session = requests.Session()
        runs = iter(range(1000))

        def urls() -> list[str]:
            run = next(runs)  # a fresh query string each time: nothing comes from the backend's disk cache
            return [f"{server.url}/{i}.png?run={run}" for i in range(64)]

        def ours() -> None:
            tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls())]
            answer = session.post(
                backend.url + "/predict", json={"tasks": tasks, "label_config": models.IMAGE_CONFIG}, timeout=60
            )
            assert answer.ok and "errors" not in answer.json(), answer.text[:500]

        def one_by_one() -> None:
            for url in urls():
                session.get(url, timeout=10).raise_for_status()

        def retrieve_500() -> None:
            run = next(runs)
            tasks = [{"id": i, "data": {"image": f"{server.url}/{i % 64}.png?big={run}-{i}"}} for i in range(500)]
            answer = session.post(
                backend.url + "/predict", json={"tasks": tasks, "label_config": models.IMAGE_CONFIG}, timeout=120
            )
            assert answer.ok and len(answer.json()["results"]) == 500, answer.text[:500]

        table.add(
            Row(
                "task data",
                "500 image tasks in one /predict (Label Studio's 'retrieve predictions'), 20 ms per file",
                _timed(retrieve_500, 1),
                100.0,
                "s",
                "Label Studio's /predict timeout",
                target="well inside it",
            )
        )
        table.add(
            Row(
                "task data",
                "64 image tasks, server adds 20 ms per file",
                *_side_by_side(ours, one_by_one, 3),
                "s",
                "fetching them one by one",
                target=">= 8x",
            )
        )
    finally:
        server.close()


def _concurrent(post: Callable[[requests.Session, int, int], None], clients: int = 16, each: int = 12) -> tuple[float, float, float]:
    """``clients`` threads, each making ``each`` requests one after another; throughput (req/s), p50 and p95 (s)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        session = requests.Session()
        for n in range(each):
            started = time.perf_counter()
            post(session, index, n)
            with lock:
                latencies.append(time.perf_counter() - started)

    client(-1)  # warm
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 95)


def _one_task_poster(url: str) -> Callable[[requests.Session, int, int], None]:
    def post(session: requests.Session, index: int, n: int) -> None:
        task = [{"id": n, "data": {"text": f"client {index} task {n}"}}]
        session.post(url + "/predict", json={"tasks": task, "label_config": models.TEXT_CONFIG}, timeout=60).raise_for_status()

    return post


def batching(table: Table, backends: dict[str, Backend], model: str = "model 20 ms + 1 ms/item") -> None:
    session = requests.Session()
    body = {"tasks": [{"id": 1, "data": {"text": "alone"}}], "label_config": models.TEXT_CONFIG}
    alone_on, alone_off = _side_by_side(  # a single client: batching must not make it wait
        _poster(session, backends["on"].url + "/predict", body), _poster(session, backends["off"].url + "/predict", body)
    )
    table.add(Row("batching", f"{model}, one client alone, 1 task: latency", alone_on * 1000, alone_off * 1000, "ms",
                  "batching off", target="no worse"))
    results = {}
    for mode, backend in backends.items():
        assert backend.proc is not None
        before = tree_cpu_seconds(backend.proc.pid)
        results[mode] = _concurrent(_one_task_poster(backend.url))
        used = cpu_used(before, tree_cpu_seconds(backend.proc.pid), CPU_ROLES)
        requests_made = 16 * 12 + 12
        table.notes.append(f"batching {mode}, {model}: CPU per request " + ", ".join(
            f"{role} {seconds / requests_made * 1000:.1f} ms" for role, seconds in used.items()))
    (on_rps, on_p50, on_p95), (off_rps, off_p50, off_p95) = results["on"], results["off"]
    table.add(Row("batching", f"16 concurrent 1-task clients, {model}: throughput", on_rps, off_rps, "req/s",
                  "batching off", higher_is_better=True, target=">= 5x"))
    table.add(Row("batching", "same: p50 latency", on_p50 * 1000, off_p50 * 1000, "ms", "batching off"))
    table.add(Row("batching", "same: p95 latency", on_p95 * 1000, off_p95 * 1000, "ms", "batching off"))


def concurrent_against_mlflow_serve(table: Table, registry: str, backend: Backend, workdir: Path, model: str) -> None:
    """16 single-row clients: our /predict (batching on) against ``mlflow models serve`` on the same model."""
    port = free_port()
    server = Process(
        [str(PYTHON_BIN / "mlflow"), "models", "serve", "-m", f"models:/{model}/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        base_env(MLFLOW_TRACKING_URI=registry), workdir / f"mlflow-serve-{model}.log",
    )
    server.start()
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok, 120, "mlflow models serve", server.proc)

        def theirs(session: requests.Session, index: int, n: int) -> None:
            frame = {"dataframe_split": {"columns": ["n"], "data": [[len(f"client {index} task {n}")]]}}
            session.post(f"http://127.0.0.1:{port}/invocations", json=frame, timeout=60).raise_for_status()

        their_rps, _, their_p95 = _concurrent(theirs)
        our_rps, _, our_p95 = _concurrent(_one_task_poster(backend.url))
    finally:
        server.stop()
    what = f"16 concurrent 1-row clients, {model} (GIL-holding CPU model)"
    table.add(Row("vs mlflow serve", f"{what}: throughput", our_rps, their_rps, "req/s", "mlflow models serve",
                  higher_is_better=True, target=">= 3x"))
    table.add(Row("vs mlflow serve", "same: p95 latency", our_p95 * 1000, their_p95 * 1000, "ms", "mlflow models serve",
                  target="no worse"))


def hand_off(table: Table, registry: str, workdir: Path) -> None:
    """The hop to the model process alone: ``ModelProcess.call`` (pickled values out, the pipeline in the model
    process, its answer with numpy turned into plain values and pickled back) against the same hooks and model
    called in this process. Label Studio's tasks reach the model process as file paths and texts; what
    pre_hook builds from them (a DataFrame here, tensors for a vision model) never crosses."""
    import os

    import mlflow.pyfunc

    from backend.config.spec import ModelSpec
    from backend.isolation.modelprocess import ModelProcess
    from backend.isolation.zygote import Zygote

    mlflow.set_tracking_uri(registry)
    model = mlflow.pyfunc.load_model("models:/free/1")
    spec = ModelSpec(model_uri="models:/free/1", pre_hook=encode_hook(models.pre_hook),
                     post_hook=encode_hook(models.numpy_post_hook))
    zygote = Zygote(env={**os.environ, "MLFLOW_TRACKING_URI": registry}).start()
    process = ModelProcess(zygote, workdir / "hand-off", 60)
    try:
        process.set_hooks(spec.digest, spec.pre_hook, spec.post_hook)
        process.load(spec)
        for count in (1, 64):
            texts = [t["data"]["text"] for t in _text_tasks(count)]
            ours, theirs = _interleaved(
                lambda texts=texts: process.call(spec.digest, texts, None, None, ""),
                lambda texts=texts: models.numpy_post_hook(model.predict(models.pre_hook(texts))),
                repeats=25,
            )
            table.add(Row("hand-off", f"one batch through the model process, {count} task(s), numpy in the answer",
                          median(ours) * 1000, median(theirs) * 1000, "ms", "the same calls in-process"))
            table.notes.append(_paired_note(f"hand-off, {count} task(s)", ours, theirs))
    finally:
        process.stop()
        zygote.close()


def _registry(workdir: Path) -> str:
    """A registry in ``workdir`` with the benchmark's models (bench/models.py) registered."""
    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-m", "bench.models", registry], cwd=ROOT, env=base_env(), check=True, capture_output=True
    )
    return registry


def run_hand_off(table: Table, workdir: Path) -> None:
    """``python -m bench handoff``: the hand-off rows alone (the serving section runs them too)."""
    hand_off(table, _registry(workdir), workdir)


def run(table: Table, workdir: Path) -> None:
    registry = _registry(workdir)
    started: list[Backend] = []

    def backend(name: str, **env: str) -> Backend:
        folder = workdir / name
        folder.mkdir()
        started.append(Backend(folder, {"MLFLOW_TRACKING_URI": registry, **env}).start())
        return started[-1]

    try:
        plain = backend("plain")
        _configure(plain, "per_item_1ms")
        overhead(table, registry, plain)
        hand_off(table, registry, workdir)
        against_mlflow_serve(table, registry, plain, workdir)
        images = backend("images", FETCH_ALLOW_PRIVATE="127.0.0.1")  # the image server is on loopback
        _configure(images, "free", models.image_post_hook)  # the fetching is what is measured
        task_data(table, images, workdir)
        modes = {
            "on": backend("batching-on", BATCHING="on", THREADS="32"),
            "off": backend("batching-off", BATCHING="off", THREADS="32"),
        }
        for each in modes.values():
            _configure(each, "fixed_20ms")
        batching(table, modes)
        for each in modes.values():
            _configure(each, "busy_20ms")
        batching(table, modes, "GIL-holding CPU model 20 ms + 1 ms/item")
        concurrent_against_mlflow_serve(table, registry, modes["on"], workdir, "busy_20ms")
    finally:
        for each in started:
            each.stop()
