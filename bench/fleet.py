"""``python -m bench fleet``: a hundred models on one machine, most of them idle.

A hundred registered models (small scikit-learn ones, and a few torch ones), each its own backend on
one orchestrator; eight clients pick models by a Zipf law (a few are busy, most rarely asked) for a
bounded time. Run side by side: every model awake (no budget, nothing sleeps), then with IDLE_STOP_S
and a MEMORY_BUDGET of each share in FLEET_BUDGET_SHARES of what the awake run held. What it reports:

- PSS of everything the orchestrator started, sampled each second: the peak against the budget;
- the first prediction of a sleeping model (the request that woke it): p50 and p95, small and torch apart;
- predictions of awake models: p95 against the all-awake run's;
- wakes and sleeps (idle, budget), and every answer checked: the right label from the right model.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from backend.core.memory import pss_bytes, tree_pids
from examples.hooks import brightness_pre, choices_post
from harness.servers import ROOT, OrchestratorProcess, base_env, register_models
from lsmlflow.pickling import encode_hook

from .common import Row, Table, percentile

SKLEARN_MODELS = int(os.environ.get("FLEET_SKLEARN", "95"))
TORCH_MODELS = int(os.environ.get("FLEET_TORCH", "5"))
CLIENTS = 8
SECONDS = float(os.environ.get("FLEET_SECONDS", "120"))
ZIPF_S = 1.1
IDLE_STOP_S = 20.0
# The budgets: the template and each share of what every model awake added. 0.3 thrashes on purpose (the
# Zipf tail keeps asking for the three quarters that do not fit); 0.5 holds about half the fleet.


def budget_shares(raw: str) -> tuple[float, ...]:
    """FLEET_BUDGET_SHARES: comma-separated fractions between 0 and 1, each a budget run."""
    try:
        shares = tuple(float(share) for share in raw.split(","))
    except ValueError:
        shares = ()
    if not shares or not all(0 < share < 1 for share in shares):
        raise SystemExit(f"FLEET_BUDGET_SHARES must be fractions between 0 and 1, like 0.3,0.5; got {raw!r}")
    return shares


BUDGET_SHARES = budget_shares(os.environ.get("FLEET_BUDGET_SHARES", "0.3,0.5"))

ALIASES = """
import mlflow, sys
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
for i in range(int(sys.argv[2])):
    client.set_registered_model_alias("brightness", f"m{i}", "1")
for i in range(int(sys.argv[3])):
    client.set_registered_model_alias("tiny_torch", f"t{i}", "1")
"""


def torch_pre(paths):
    import numpy as np
    import torch
    from PIL import Image

    values = [[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths]
    return torch.tensor(values, dtype=torch.float32)


def torch_post(logits):
    names = ["dark", "light"]
    return [{"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                         "value": {"choices": [names[int(row.argmax())]]}}]} for row in logits]


CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="brightness" toName="image"><Choice value="dark"/><Choice value="light"/></Choices></View>"""


@dataclass
class Model:
    uri: str
    body: dict
    kind: str = "small"  # "small" (scikit-learn) or "torch": the wake target is for the small ones
    backend: str = ""
    expected: dict = field(default_factory=dict)  # image name -> label


def models() -> list[Model]:
    sklearn = {"pre_hook": encode_hook(brightness_pre), "post_hook": encode_hook(choices_post)}
    torch = {"pre_hook": encode_hook(torch_pre), "post_hook": encode_hook(torch_post), "loader": "native"}
    found = [Model(f"models:/brightness@m{i}", {"model_uri": f"models:/brightness@m{i}", **sklearn})
             for i in range(SKLEARN_MODELS)]
    found += [Model(f"models:/tiny_torch@t{i}", {"model_uri": f"models:/tiny_torch@t{i}", **torch}, kind="torch")
              for i in range(TORCH_MODELS)]
    random.Random(7).shuffle(found)  # the torch ones anywhere in the popularity ranking
    for model in found:
        model.expected = {"white": "light", "black": "dark"}
    return found


@dataclass
class Figures:
    awake_s: list[float] = field(default_factory=list)  # predictions that found their backend awake
    woke_s: list[float] = field(default_factory=list)  # predictions that woke their backend
    woke_by_kind: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    answered: set[str] = field(default_factory=set)
    pss: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # the machine's, over the clients' time (``machine_cpu``)


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far, by kind (/proc/stat: user nice system idle iowait irq softirq steal)."""
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:9]]


def machine_cpu(before: list[int], after: list[int], seconds: float) -> dict[str, float]:
    """Cores busy, and the share the hypervisor took (steal): on a shared virtual machine the same code runs
    slower in one run than the next, and this says whether the machine was the difference."""
    spent = [b - a for a, b in zip(before, after)]
    total = sum(spent) or 1
    busy = total - spent[3] - spent[4] - spent[7]
    return {"busy_cores": round(busy / total * (os.cpu_count() or 1), 2), "steal": round(spent[7] / total, 3),
            "seconds": round(seconds, 1)}


def started_pss(orchestrator: OrchestratorProcess) -> int:
    """PSS of everything the orchestrator started: its process tree less itself."""
    pids = [pid for pid in tree_pids(orchestrator.proc.pid) if pid != orchestrator.proc.pid]
    return pss_bytes(pids)


def predict(session: requests.Session, orchestrator: OrchestratorProcess, model: Model, images: dict[str, Path],
            figures: Figures, lock: threading.Lock) -> None:
    name = random.choice(("white", "black"))
    tasks = [{"id": 1, "data": {"image": str(images[name])}}]
    began = time.perf_counter()
    try:
        answer = session.post(f"{orchestrator.url}/models/{model.backend}/predict",
                              json={"tasks": tasks, "label_config": CONFIG}, timeout=100)
    except requests.RequestException as exc:
        with lock:
            figures.errors[type(exc).__name__] += 1
        return
    seconds = time.perf_counter() - began
    with lock:
        if answer.status_code != 200:
            figures.errors[f"{answer.status_code} {answer.text[:120]}"] += 1
            return
        got = answer.json()["results"][0]["result"][0]["value"]["choices"][0]
        if got != model.expected[name]:
            figures.errors[f"wrong label from {model.uri}"] += 1
            return
        figures.answered.add(model.uri)
        if "X-Backend-Woke-S" in answer.headers:
            figures.woke_s.append(seconds)
            figures.woke_by_kind.setdefault(model.kind, []).append(seconds)
        else:
            figures.awake_s.append(seconds)


def one_run(workdir: Path, registry: str, images: dict[str, Path], budget: int) -> tuple[Figures, dict]:
    """The whole fleet configured, one prediction each, then the clients for SECONDS."""
    env = {"MLFLOW_TRACKING_URI": registry, "MAX_BACKENDS": str(SKLEARN_MODELS + TORCH_MODELS + 2),
           "WARM_SPARES": "0", "FETCH_ALLOW_PRIVATE": "127.0.0.1", "SUPERVISE_EVERY_S": "1",
           "LOCAL_FILES_ROOTS": str(next(iter(images.values())).parent)}
    if budget:
        env.update(MEMORY_BUDGET=str(budget), IDLE_STOP_S=str(IDLE_STOP_S))
    orchestrator = OrchestratorProcess(workdir / f"state-{'budget' if budget else 'awake'}", env).start()
    fleet, figures, lock = models(), Figures(), threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        # Reading every process's smaps costs CPU (the kernel walks their page tables): at the lowest
        # priority, so the sampler takes what the machine leaves rather than from what it measures.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not stop.wait(1.0):
            figures.pss.append(started_pss(orchestrator))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with requests.Session() as session:
            for model in fleet:
                answer = session.post(orchestrator.url + "/configure", json=model.body, timeout=300)
                assert answer.status_code == 200, answer.text
                model.backend = answer.json()["id"]
                predict(session, orchestrator, model, images, figures, lock)
        weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(fleet))]
        deadline = time.monotonic() + SECONDS

        def client(seed: int) -> None:
            chooser = random.Random(seed)
            with requests.Session() as session:
                while time.monotonic() < deadline:
                    model = chooser.choices(fleet, weights)[0]
                    predict(session, orchestrator, model, images, figures, lock)

        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
        ticks, began = cpu_ticks(), time.monotonic()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        figures.cpu = machine_cpu(ticks, cpu_ticks(), time.monotonic() - began)
        listed = requests.get(orchestrator.url + "/backends", timeout=30).json()
        return figures, listed
    finally:
        stop.set()
        sampler.join()
        orchestrator.stop()
        orchestrator.kill_leftovers()


def run(table: Table, workdir: Path) -> None:
    from PIL import Image

    registry = f"sqlite:///{workdir / 'mlflow.db'}"
    register_models(registry, with_torch=TORCH_MODELS > 0)
    subprocess.run([sys.executable, "-c", ALIASES, registry, str(SKLEARN_MODELS), str(TORCH_MODELS)], cwd=ROOT,
                   env=base_env(), check=True)
    images = {}
    for name, grey in (("white", 240), ("black", 10)):
        images[name] = workdir / f"{name}.png"
        Image.new("RGB", (32, 24), (grey, grey, grey)).save(images[name])

    awake, awake_listed = one_run(workdir, registry, images, budget=0)
    held = max(awake.pss)
    template = awake_listed["memory"]["template_rss_bytes"]
    for share in BUDGET_SHARES:
        budget = int(template + (held - template) * share)  # the template, and a share of what the models add
        slept, listed = one_run(workdir, registry, images, budget=budget)
        report(table, share, budget, held, template, awake, slept, listed["memory"]["events"])


def report(table: Table, share: float, budget: int, held: int, template: int, awake: Figures, slept: Figures,
           events: dict[str, int]) -> None:
    count = SKLEARN_MODELS + TORCH_MODELS
    section = (f"fleet: {count} models ({TORCH_MODELS} torch), {CLIENTS} Zipf clients, {SECONDS:.0f} s, "
               f"budget {share:.0%} of all awake")
    table.add(Row(section, "peak PSS of everything started, with the budget vs every model awake", max(slept.pss) / (1 << 30),
                  held / (1 << 30), "GiB", "all awake, same run", target=f"<= the budget ({budget / (1 << 30):.2f} GiB)"))
    small = slept.woke_by_kind.get("small", [])  # the target is for the small models; the torch ones are noted
    table.add(Row(section, "first prediction of a sleeping small model (it wakes it): p50", statistics.median(small),
                  statistics.median(awake.awake_s), "s", "awake model, all-awake run"))
    table.add(Row(section, "first prediction of a sleeping small model (it wakes it): p95", percentile(small, 95),
                  percentile(awake.awake_s, 95), "s", "awake model, all-awake run", target="<= 1.5 s"))
    table.add(Row(section, "predictions of awake models: p95", percentile(slept.awake_s, 95),
                  percentile(awake.awake_s, 95), "s", "all-awake run", target="<= 1.1x"))
    over = sum(1 for sample in slept.pss if sample > budget)
    table.notes.append(
        f"fleet, budget {share:.0%}: {budget / (1 << 20):.0f} MiB (the template's {template / (1 << 20):.0f} MiB and {share:.0%} of "
        f"what the models added to it, all awake: {held / (1 << 20):.0f} MiB in all), IDLE_STOP_S={IDLE_STOP_S:g}; PSS sampled each second: {len(slept.pss)} samples, {over} over "
        f"the budget, peak {max(slept.pss) / (1 << 20):.0f} MiB; {events.get('wake', 0)} wakes, "
        f"{events.get('sleep_budget', 0)} sleeps for the budget, {events.get('sleep_headroom', 0)} to keep room for a wake, "
        f"{events.get('sleep_idle', 0)} for idleness; "
        f"predictions: {len(slept.awake_s) + len(slept.woke_s)} with the budget ({len(slept.woke_s)} woke their model), "
        f"{len(awake.awake_s)} all awake; models answering correctly: {len(slept.answered)} and "
        f"{len(awake.answered)} of {count}; errors: {dict(slept.errors) or 0} and {dict(awake.errors) or 0}; "
        f"the machine while the clients ran: {slept.cpu} with the budget, {awake.cpu} all awake"
    )
    for kind, woke in sorted(slept.woke_by_kind.items()):
        table.notes.append(f"fleet, budget {share:.0%}, wakes of {kind} models: {len(woke)}, p50 {statistics.median(woke):.3f} s, "
                           f"p95 {percentile(woke, 95):.3f} s, slowest {max(woke):.3f} s")
