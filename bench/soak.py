"""``python -m bench soak``: Label Studio-shaped rounds against the orchestrator while a chaos thread kills
its parts, and the registry's ``mlflow server`` goes away for a while. Bounded: ``SOAK_S`` seconds
(600 by default); ``tests/test_soak.py`` runs a short one in CI.

- Eight clients, each labeling projects of text tasks as Label Studio does: ``/health``, ``/setup``,
  then one ``/predict`` with every task that has no prediction yet; answered tasks are kept, pending
  ones are sent again next round, and a round that fails (a part was just killed) is pressed again.
- Every 20-40 s (scaled with the duration) one of: a backend's worker, a model process, the models'
  template, the backends' template, a backend's master, or the orchestrator itself (started again at
  once), killed outright.
- Once, the registry's ``mlflow server`` is stopped for 30 s (scaled) and started again on its port;
  one backend follows ``models:/<name>/latest``, so its follower polls the registry all the while.
- ``/health`` of the orchestrator is sampled twice a second.
- ``SOAK_CHAOS=off``: the same load with nothing killed, so that memory growth is a leak alone;
  ``SOAK_KILL=worker,template,...``: only those parts killed, in turn (by default every one of KILLABLE).

At the end: every task predicted exactly once with the right label, no wrong answer, the processes and
PSS of the start (no orphans, no growth), and the ``/health`` samples.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from backend.core.lifetime import parent_pid, process_identity
from harness.servers import ROOT, MlflowServer, OrchestratorProcess, base_env, wait_until

from . import models
from .common import Row, Table, pss_mib

SOAK_S = 600.0
CLIENTS = 8
TASKS_PER_PROJECT = 120
MODELS = ("models:/per_item_1ms/latest", "models:/free/1")
FINISH_S = 120.0  # after the time is up, how long clients may take to finish their projects
PSS_EVERY_S = 30.0  # scaled with the duration, like the kills
KILLABLE = ("worker", "model process", "models' template", "template", "backend master", "orchestrator")


def say(message: str) -> None:
    print(f"  soak {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


def expected(text: str) -> str:
    return "long" if len(text) > 8 else "short"


@dataclass
class Figures:
    """What the run saw; every count is read at the end."""

    tasks: Counter = field(default_factory=Counter)  # predictions received per task id
    wrong: list = field(default_factory=list)
    rounds: Counter = field(default_factory=Counter)  # by outcome
    kills: Counter = field(default_factory=Counter)
    health: list = field(default_factory=list)  # (seconds or None, during an orchestrator restart)
    pss: list = field(default_factory=list)  # (seconds since the start, MiB of our processes): growth or a plateau
    projects: int = 0
    unfinished: int = 0  # tasks of projects not finished within FINISH_S after the end
    lock: threading.Lock = field(default_factory=threading.Lock)


def our_processes(marker: str) -> dict[int, str]:
    """pid -> name of every process started for this soak (their environment carries ``marker``)."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pid = int(environ.parent.name)
                found[pid] = (environ.parent / "comm").read_text().strip()
        except OSError:
            continue
    found.pop(os.getpid(), None)
    return found


def victims(marker: str, orchestrator_pid: int) -> dict[str, list[int]]:
    """Our processes by the role the chaos thread knows them by."""
    procs = our_processes(marker)
    roles: dict[str, list[int]] = {role: [] for role in KILLABLE}
    for pid, name in procs.items():
        if pid == orchestrator_pid:
            roles["orchestrator"].append(pid)
        elif name == "lsb-backend":
            roles["worker" if procs.get(parent_pid(pid)) == "lsb-backend" else "backend master"].append(pid)
        elif name == "lsb-model":
            roles["model process"].append(pid)
        elif name == "lsb-model-tmpl":
            roles["models' template"].append(pid)
        elif name == "lsb-template":
            roles["template"].append(pid)
    return roles


class Soak:
    def __init__(self, workdir: Path, seconds: float, clients: int = CLIENTS, chaos: bool = True) -> None:
        self.workdir, self.seconds, self.clients, self.chaos_on = workdir, seconds, clients, chaos
        self.scale = max(0.1, seconds / SOAK_S)
        self.marker = f"LSB_SOAK={workdir}"
        self.figures = Figures()
        self.project_ids = itertools.count(1)
        self.stop = threading.Event()
        self.orchestrator_down = threading.Event()
        self.mlflow = MlflowServer(workdir / "mlflow")
        self.orchestrator: OrchestratorProcess | None = None

    # -- setting up -------------------------------------------------------------------------------

    def start(self) -> None:
        (self.workdir / "mlflow").mkdir()
        self.mlflow.env = {**self.mlflow.env, "LSB_SOAK": str(self.workdir)}
        self.mlflow.start()
        subprocess.run([sys.executable, "-m", "bench.models", self.mlflow.url], cwd=ROOT, env=base_env(), check=True,
                       capture_output=True)
        env = {"MLFLOW_TRACKING_URI": self.mlflow.url, "LSB_SOAK": str(self.workdir), "ALIAS_POLL_S": "2",
               "PREDICT_TIMEOUT_S": "20", "SUPERVISE_EVERY_S": "0.5", "WARM_SPARES": "0"}
        self.orchestrator = OrchestratorProcess(self.workdir / "state", env).start()
        for uri in MODELS:
            body = {"model_uri": uri, "pre_hook": _hook(models.pre_hook), "post_hook": _hook(models.post_hook)}
            answer = requests.post(self.orchestrator.url + "/configure", json=body, timeout=180)
            assert answer.status_code == 200, answer.text

    def close(self) -> None:
        if self.orchestrator is not None:
            self.orchestrator.remove_all()
            self.orchestrator.stop()
            self.orchestrator.kill_leftovers()
        self.mlflow.stop()

    # -- the clients ------------------------------------------------------------------------------

    def client(self, number: int, until: float) -> None:
        """Projects, one after another, each labeled to the end (its last one finished after ``until``,
        within ``FINISH_S``)."""
        assert self.orchestrator is not None
        session = requests.Session()
        give_up = until + FINISH_S
        for project in itertools.count(1):
            if time.monotonic() > until:
                return
            model = number % len(MODELS)
            base = next(self.project_ids) * 10_000  # task ids unique across clients and projects
            tasks = [{"id": base + i, "data": {"text": f"p{base} t{i} " + "x" * (i % 7)}} for i in range(TASKS_PER_PROJECT)]
            predicted: set[int] = set()
            while len(predicted) < len(tasks) and time.monotonic() < give_up:
                remaining = [t for t in tasks if t["id"] not in predicted]
                outcome = self.round(session, model, remaining, predicted)
                with self.figures.lock:
                    self.figures.rounds[outcome] += 1
                if outcome != "complete" and outcome != "partial":
                    say(f"client {number}: round {outcome}; pressing again")
                    self.stop.wait(0.5)  # Label Studio's user presses again after a moment
            with self.figures.lock:
                self.figures.projects += 1 if len(predicted) == len(tasks) else 0
                self.figures.unfinished += len(tasks) - len(predicted)

    def round(self, session: requests.Session, model: int, tasks: list[dict], predicted: set[int]) -> str:
        assert self.orchestrator is not None
        base = f"{self.orchestrator.url}/models/{self.backend_ids[model]}"
        try:
            session.get(base + "/health", timeout=1)
            session.post(base + "/setup", json={"project": "1.1", "schema": models.TEXT_CONFIG}, timeout=3)
            answer = session.post(base + "/predict", json={"tasks": tasks, "label_config": models.TEXT_CONFIG,
                                                           "project": "1.1", "params": {}}, timeout=100)
        except requests.RequestException as exc:
            return type(exc).__name__
        if not answer.ok:
            return str(answer.status_code)
        results = answer.json()["results"]
        if len(results) != len(tasks):
            return "misaligned"
        for task, prediction in zip(tasks, results):
            if not prediction:
                continue  # pending: next round
            label = prediction["result"][0]["value"]["choices"][0]
            with self.figures.lock:
                self.figures.tasks[task["id"]] += 1
                if label != expected(task["data"]["text"]):
                    self.figures.wrong.append((task["id"], label))
            predicted.add(task["id"])
        return "complete" if len(predicted) and all(results) else "partial"

    # -- chaos and samples ------------------------------------------------------------------------

    def chaos(self, until: float) -> None:
        assert self.orchestrator is not None
        rng = random.Random(7)
        roles = kill_roles()
        registry_down_at = time.monotonic() + self.seconds * 0.4
        registry_done = False
        turn = 0
        while not self.stop.wait(rng.uniform(20, 40) * self.scale) and time.monotonic() < until:
            # The registry goes away once every part was killed once (a short run kills each still).
            if not registry_done and time.monotonic() >= registry_down_at and turn >= len(roles):
                registry_done = True
                say("stopping the registry's mlflow server")
                self.mlflow.stop(signal.SIGKILL)
                with self.figures.lock:
                    self.figures.kills["mlflow server (stopped a while)"] += 1
                self.stop.wait(30 * self.scale)
                self.mlflow.start()
                say("the registry's mlflow server is back")
                continue
            role, turn = roles[turn % len(roles)], turn + 1
            say(f"killing the {role}")
            if role == "orchestrator":
                self.orchestrator_down.set()
                self.orchestrator.stop(signal.SIGKILL)
                self.orchestrator.start()
                self.orchestrator_down.clear()
            else:
                pids = victims(self.marker, self.orchestrator.proc.pid if self.orchestrator.proc else 0)[role]
                if not pids:
                    continue
                os.kill(rng.choice(pids), signal.SIGKILL)
            with self.figures.lock:
                self.figures.kills[role] += 1

    def sample_health(self) -> None:
        assert self.orchestrator is not None
        began, next_pss = time.monotonic(), 0.0
        while not self.stop.wait(0.5):
            if time.monotonic() - began >= next_pss:
                next_pss += PSS_EVERY_S * self.scale
                self.figures.pss.append((round(time.monotonic() - began), round(pss_mib(list(our_processes(self.marker))))))
            down = self.orchestrator_down.is_set()
            started = time.perf_counter()
            try:
                ok = requests.get(self.orchestrator.url + "/health", timeout=1).ok
            except requests.RequestException:
                ok = False
            seconds = time.perf_counter() - started
            self.figures.health.append((seconds if ok else None, down or self.orchestrator_down.is_set()))

    # -- the whole run ----------------------------------------------------------------------------

    def settle(self) -> dict[str, tuple[str, float]]:
        """Once every backend answers: each of our processes (``pid:starttime``), its name and its PSS."""
        assert self.orchestrator is not None
        orchestrator = self.orchestrator

        def ready() -> bool:
            listed = requests.get(orchestrator.url + "/backends", timeout=5).json()["backends"]
            if len(listed) != len(MODELS) or any(b["state"] != "ready" for b in listed):
                return False
            # and renewed: each backend's master a child of the backends' template, each model process of the
            # models' (a killed one's are forked again)
            procs = our_processes(self.marker)
            masters = [pid for pid, name in procs.items() if name == "lsb-backend" and procs.get(parent_pid(pid)) != "lsb-backend"]
            modelled = [pid for pid, name in procs.items() if name == "lsb-model"]
            return all(procs.get(parent_pid(pid)) == "lsb-template" for pid in masters) and \
                all(procs.get(parent_pid(pid)) == "lsb-model-tmpl" for pid in modelled)

        wait_until(ready, 180, "every backend ready, and forked from the templates")
        for backend_id in self.backend_ids:  # a round each: the model processes are up
            requests.post(f"{orchestrator.url}/models/{backend_id}/predict", timeout=60, json={
                "tasks": [{"id": 1, "data": {"text": "settle"}}], "label_config": models.TEXT_CONFIG})
        return {process_identity(pid): (name, pss_mib([pid])) for pid, name in our_processes(self.marker).items()}

    def run(self) -> dict:
        self.start()
        assert self.orchestrator is not None
        listed = requests.get(self.orchestrator.url + "/backends", timeout=5).json()["backends"]
        by_uri = {b["model"]["model_uri"]: b["id"] for b in listed}
        self.backend_ids = [by_uri[uri] for uri in MODELS]
        start = self.settle()
        say(f"started: {_names(start)}, {_pss(start):.0f} MiB PSS; {self.clients} clients for {self.seconds:g} s"
            + ("" if self.chaos_on else ", no chaos"))
        until = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.client, args=(n, until), name=f"client-{n}") for n in range(self.clients)]
        chaos = threading.Thread(target=self.chaos if self.chaos_on else self.stop.wait, name="chaos",
                                 args=(until,) if self.chaos_on else (self.seconds,))
        sampler = threading.Thread(target=self.sample_health, name="health")
        for thread in [*threads, chaos, sampler]:
            thread.start()
        chaos.join()
        for thread in threads:
            thread.join(timeout=self.seconds + 300)
        self.stop.set()
        sampler.join()
        say("clients done; settling")
        end = self.settle()
        lived = start.keys() & end.keys()  # the processes no kill touched, start to end: where a leak shows
        f = self.figures
        healthy = [s for s, down in f.health if s is not None]
        return {
            "seconds": self.seconds, "projects": f.projects, "tasks": len(f.tasks),
            "predicted_twice": sum(1 for n in f.tasks.values() if n > 1), "wrong": len(f.wrong),
            "rounds": dict(f.rounds), "kills": dict(f.kills),
            "health_samples": len(f.health), "health_max_s": round(max(healthy, default=0.0), 3),
            "health_over_1s": sum(1 for s in healthy if s > 1.0),
            "health_failed": sum(1 for s, down in f.health if s is None and not down),
            "health_failed_while_orchestrator_restarted": sum(1 for s, down in f.health if s is None and down),
            "processes_before": _names(start), "processes_after": _names(end),
            "pss_mib_before": round(_pss(start), 1), "pss_mib_after": round(_pss(end), 1),
            "pss_mib_by_name_before": _pss_by_name(start), "pss_mib_by_name_after": _pss_by_name(end),
            "pss_mib_series": f.pss, "survivors": len(lived), "survivors_pss_mib_before": round(sum(start[i][1] for i in lived), 1),
            "survivors_pss_mib_after": round(sum(end[i][1] for i in lived), 1),
            "clients_unfinished": sum(1 for t in threads if t.is_alive()), "tasks_unfinished": f.unfinished,
        }


def _names(snapshot: dict[str, tuple[str, float]]) -> dict[str, int]:
    return dict(Counter(name for name, _ in snapshot.values()))


def _pss(snapshot: dict[str, tuple[str, float]]) -> float:
    return sum(pss for _, pss in snapshot.values())


def _pss_by_name(snapshot: dict[str, tuple[str, float]]) -> dict[str, float]:
    totals: Counter = Counter()
    for name, pss in snapshot.values():
        totals[name] += pss
    return {name: round(total, 1) for name, total in sorted(totals.items())}


def _hook(function) -> str:
    from lsmlflow.pickling import encode_hook

    return encode_hook(function)


def soak(workdir: Path, seconds: float, clients: int = CLIENTS, chaos: bool = True) -> dict:
    runner = Soak(workdir, seconds, clients, chaos)
    try:
        return runner.run()
    finally:
        runner.stop.set()
        runner.close()


def kill_roles() -> list[str]:
    """What the chaos thread kills in turn: ``SOAK_KILL``'s parts, or every one of KILLABLE."""
    chosen = [r.strip() for r in os.environ.get("SOAK_KILL", "").split(",") if r.strip()]
    unknown = set(chosen) - set(KILLABLE)
    if unknown:
        raise ValueError(f"SOAK_KILL names {sorted(unknown)}; choose from {list(KILLABLE)}")
    return [r for r in KILLABLE if r in chosen] if chosen else list(KILLABLE)


def run(table: Table, workdir: Path) -> None:
    kill_roles()  # a misspelt SOAK_KILL fails here, not in the chaos thread
    seconds = float(os.environ.get("SOAK_S") or SOAK_S)
    chaos = os.environ.get("SOAK_CHAOS", "on") != "off"  # off: the same load, nothing killed (a leak alone)
    figures = soak(workdir, seconds, chaos=chaos)
    print(figures, flush=True)
    table.add(Row("soak", f"tasks predicted in {seconds:g} s under chaos, each exactly once, the right label",
                  figures["tasks"] - figures["predicted_twice"] - figures["wrong"], figures["tasks"], "tasks",
                  "tasks predicted at all", higher_is_better=True, target="all of them"))
    table.add(Row("soak", "PSS of everything started, after the soak vs before", figures["pss_mib_after"],
                  figures["pss_mib_before"], "MiB", "before", target="no growth"))
    if figures["survivors"]:
        table.add(Row("soak", f"PSS of the {figures['survivors']} processes no kill touched, after vs before",
                      figures["survivors_pss_mib_after"], figures["survivors_pss_mib_before"], "MiB", "before",
                      target="no growth"))
    table.add(Row("soak", "slowest /health of the orchestrator (samples every 0.5 s)", figures["health_max_s"], 1.0, "s",
                  "Label Studio's 1 s limit", target="under 1 s"))
    table.notes.append(f"soak: {figures}")
