"""Configure churn: configures (hook swaps and model reloads) racing predictions, against the same
predictions with no configure in flight, in one run.

A configure must never stop the old configuration serving until the new one is ready, and configures
sent faster than models load coalesce (the newest wins) rather than fail. Four clients predict in a
loop; a fifth configures without pause, alternating the post hook (a swap inside the model process)
and, every third call, the model itself (a load in a new process).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import requests

from harness.servers import Backend, OrchestratorProcess
from lsmlflow.pickling import encode_hook

from . import models
from .common import Row, Table
from .serving import _registry

SECONDS = 20.0
PREDICTORS = 4
CONFIGURERS = 2
TASKS = [{"id": i, "data": {"text": "x" * (i * 3)}} for i in range(1, 9)]
EXPECTED = ["long" if len(t["data"]["text"]) > 8 else "short" for t in TASKS]


def _configure_body(call: int) -> dict:
    model = "fixed_20ms" if (call // 3) % 2 == 0 else "busy_20ms"
    post = models.post_hook if call % 2 == 0 else models.numpy_post_hook
    return {"model_uri": f"models:/{model}/1", "pre_hook": encode_hook(models.pre_hook), "post_hook": encode_hook(post)}


def race(backend: Backend | OrchestratorProcess, seconds: float, configuring: bool) -> dict[str, Counter]:
    """Predictions (and, with ``configuring``, configures) for ``seconds``; counts by outcome."""
    until = time.monotonic() + seconds
    counts: dict[str, Counter] = {"predict": Counter(), "configure": Counter()}
    lock = threading.Lock()
    body = {"tasks": TASKS, "label_config": models.TEXT_CONFIG}

    def predictor() -> None:
        with requests.Session() as session:
            while time.monotonic() < until:
                answer = session.post(backend.url + "/predict", json=body, timeout=120)
                outcome = str(answer.status_code)
                if answer.ok:
                    got = [p["result"][0]["value"]["choices"][0] for p in answer.json()["results"]]
                    outcome = "ok" if got == EXPECTED else "wrong"
                with lock:
                    counts["predict"][outcome] += 1

    def configurer(first: int) -> None:
        call = first
        with requests.Session() as session:
            while time.monotonic() < until:
                answer = session.post(backend.url + "/configure", json=_configure_body(call), timeout=120)
                call += 1
                with lock:
                    counts["configure"][str(answer.status_code)] += 1

    threads = [threading.Thread(target=predictor) for _ in range(PREDICTORS)]
    if configuring:
        threads += [threading.Thread(target=configurer, args=(first,)) for first in range(CONFIGURERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


def run(table: Table, workdir: Path, seconds: float = SECONDS) -> None:
    (workdir / "backend").mkdir()
    backend = Backend(workdir / "backend", {"MLFLOW_TRACKING_URI": _registry(workdir), "THREADS": "8"}).start()
    try:
        answer = requests.post(backend.url + "/configure", json=_configure_body(0), timeout=120)
        assert answer.status_code == 200, answer.text
        quiet = race(backend, seconds, configuring=False)["predict"]
        churned = race(backend, seconds, configuring=True)
    finally:
        backend.stop()
    served, configures = churned["predict"], churned["configure"]
    table.add(Row("churn", f"predictions served in {seconds:g} s while configures race them ({PREDICTORS} clients)",
                  served["ok"], quiet["ok"], "answers", "the same clients with no configure", higher_is_better=True,
                  target="most of the baseline; 0 failed"))
    table.notes.append(
        f"churn: predictions under configure churn {dict(served)}, without {dict(quiet)}; "
        f"configures {dict(configures)} (200: ready or swapped, 202: still loading, 409: superseded by a newer one)."
    )
