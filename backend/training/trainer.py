"""The worker's side of training: note what Label Studio says, start trainings, watch them, report.

Nothing here trains. ``/webhook`` calls ``on_webhook``, which only writes a few numbers (Label
Studio drops annotation events after ~1 s and sends ``START_TRAINING`` inside an annotator's save).
A training runs in a process of its own, started with ``exec`` (never a fork of a worker, which may
hold CUDA or locks), in its own session so that a timeout kills it and all it started. It holds the
training lock (``records``) for its whole life, so across workers there is one at a time, and any
worker's ticker can finish the records of one whose worker died.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.config.training_policy import TrainingPolicy
from backend.core.errors import Conflict, NotConfigured
from backend.core.lifetime import owner_identity
from backend.core.metrics import BackendMetrics
from backend.core.settings import Settings
from backend.quality.webhooks import annotations_in
from backend.state.training_records import TrainingRecords
from backend.tasks.labelstudio import LabelStudioAccess

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where ``backend`` and ``model`` import from
# What the training process must not inherit: the backend's own credentials (it gets Label Studio's token
# through its stdin, and MLflow's through the spec).
WITHHELD_ENV = ("CONFIGURE_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY")
DESCRIBE_EVERY_S = 1.0


class Trainer:
    """One per app. ``current`` gives the serving configuration (with its spec, info and model version)."""

    def __init__(
        self,
        settings: Settings,
        records: TrainingRecords,
        metrics: BackendMetrics,
        current: Callable[[], Any],
        label_studio: Callable[[], LabelStudioAccess],
        quality: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.settings = settings
        self.records = records
        self.metrics = metrics
        self.current = current
        self.label_studio = label_studio
        self.quality = quality
        self._mine: dict[str, subprocess.Popen] = {}  # trainings this worker started, by job id
        self._described: tuple[float, int | None, dict[str, Any]] = (float("-inf"), None, {})

    # -- what the routes call --------------------------------------------------------------------

    def on_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """Note an event; start or queue a training on START_TRAINING. Fast: a few file writes at most."""
        serving = self.current()
        if serving is None or not serving.spec.train_hook:
            return {}
        action = str(body.get("action") or "")
        raw_project = body.get("project")
        project: dict[str, Any] = raw_project if isinstance(raw_project, dict) else {}
        project_id = project.get("id")
        if project_id is None:
            return {}
        if action in ANNOTATION_EVENTS:
            self._note_annotations(action, body, project)
            return {"training": "noted"}
        if action == "START_TRAINING":
            # With "start training on annotation submission" Label Studio sends this on every N-th save:
            # those wait for training.min_interval_s; the button (the setting off) trains now.
            explicit = not project.get("min_annotations_to_start_training")
            return self.request("START_TRAINING", project_id, project.get("label_config") or "", explicit=explicit)
        return {}

    def request(self, trigger: str, project_id: Any, label_config: str, tasks: list[dict[str, Any]] | None = None,
                explicit: bool = True) -> dict[str, Any]:
        """Start a training now, or note it to start when the running one ends (one follow-up at most)."""
        serving, policy = self._trainable()
        self.reconcile()  # a training that ended but is not recorded yet must not count as running
        now = time.time()
        with self.records.state() as state:
            project = state["projects"].setdefault(str(project_id), {})
            if label_config:
                project["label_config"] = label_config
            label_config = project.get("label_config", "")
            if state.get("current") and self.records.training_runs():
                if tasks is not None:
                    raise Conflict("a training is running", f"Wait for job {state['current']} (GET /train/status).")
                state["request"] = {"trigger": trigger, "project": project_id, "at": now, "explicit": explicit}
                return {"training": "coalesced", "job": state["current"],
                        "detail": "a training is running; one more starts when it ends"}
            wait = self._wait_s(state, policy, now) if not explicit else 0.0
            if wait > 0:
                state["request"] = {"trigger": trigger, "project": project_id, "at": now, "explicit": False,
                                    "not_before": now + wait}
                return {"training": "deferred", "detail": f"starts in {wait:.0f} s (training.min_interval_s or backoff)"}
            job_id = self._start(state, serving, policy, trigger, project_id, label_config, tasks)
        if job_id is None:
            return {"training": "coalesced", "detail": "another worker's training is running; one more starts when it ends"}
        return {"training": "started", "job": job_id}

    def tick(self) -> None:
        """Finish what ended, start what is due; the app's ticker calls this every second or so."""
        self.reconcile()
        current = self.current()
        policy = current.spec.training_policy if current is not None else None
        if policy is None:
            return
        now = time.time()
        start: tuple[str, Any, bool] | None = None
        state = self.records.read_state()
        if state.get("current"):
            return
        request = state.get("request")
        if request and request.get("not_before", 0) <= now:
            start = (request["trigger"], request["project"], bool(request.get("explicit")))
        else:
            for project_id, project in state["projects"].items():
                reason = policy.automatic_due(**self._figures(state, project), now=now)
                if reason:
                    start = ("annotations", project_id, False)
                    break
        if start is not None:
            with self.records.state() as state:
                if state.get("current") or self.records.training_runs():
                    return
                if state.get("request") and state["request"].get("not_before", 0) > now:
                    return
                project = state["projects"].setdefault(str(start[1]), {})
                self._start(state, current, policy, start[0], start[1], project.get("label_config", ""), None)

    def reconcile(self, exit_status: int | None = None) -> None:
        """Close the record of a training that ended (whichever worker started it), or kill one past its time."""
        state = self.records.read_state()
        job_id = state.get("current")
        if not job_id:
            self.metrics.training_in_progress.set(0)
            return
        job = self.records.job(job_id) or {"id": job_id, "started_at": time.time()}
        if self.records.training_runs():
            self.metrics.training_in_progress.set(1)
            if time.time() > job["started_at"] + self.settings.train_timeout_s + 10 and job.get("pid"):
                self._kill(job)  # its own worker is gone, or did not manage
            return
        with self.records.state() as state:
            if state.get("current") != job_id:
                return
            job = self.records.job(job_id) or job
            self._finish(state, job, exit_status)
        self.metrics.training_in_progress.set(0)

    def describe(self) -> dict[str, Any] | None:
        """For /health: the state and the last outcome (re-read at most every second)."""
        serving = self.current()
        policy = serving.spec.training_policy if serving is not None else None
        if policy is None:
            return None
        checked, stamp, shown = self._described
        now_stamp = self.records.state_file.stamp()  # a changed state shows at once: /train/status reads it too
        if time.monotonic() - checked < DESCRIBE_EVERY_S and stamp == now_stamp:
            return shown
        state = self.records.read_state()
        current = state.get("current")
        shown = {"state": "running" if current else ("queued" if state.get("request") else "idle"),
                 "trigger": policy.trigger, "promote": policy.promote, "alias": policy.alias}
        if current:
            job = self.records.job(current) or {}
            shown["job"] = current
            shown["since"] = job.get("started_at")
            shown["stage"] = self.records.result(current).get("stage")
        if state.get("last"):
            shown["last"] = state["last"]
        if state.get("failures"):
            shown["failures_in_a_row"] = state["failures"]
        now = time.time()
        waiting = {pid: policy.waits_for(**self._figures(state, p), now=now) for pid, p in state["projects"].items()}
        if waiting:
            shown["projects"] = {pid: {"annotations": p.get("annotations", 0), "changed_since_training": p.get("changed", 0),
                                       "waits_for": waiting[pid]} for pid, p in state["projects"].items()}
        self._described = (time.monotonic(), now_stamp, shown)
        return shown

    def status(self) -> dict[str, Any]:
        """For GET /train/status: the current and recent jobs, each with its run, version, gate and log tail."""
        state = self.records.read_state()
        jobs = []
        for job_id in state["jobs"]:
            job = self.records.job(job_id)
            if job is None:
                continue
            result = self.records.result(job_id)
            jobs.append({**job, **{k: v for k, v in result.items() if k not in job or job.get("state") == "running"},
                         "log_tail": self.records.log_tail(job_id)})
        return {"current": state.get("current"), "request": state.get("request"), "failures_in_a_row": state.get("failures", 0),
                "jobs": jobs, "training": self.describe()}

    def close(self) -> None:
        """Stop the trainings this worker started (the backend is shutting down)."""
        for job_id, process in list(self._mine.items()):
            if process.poll() is None:
                log.warning("stopping training %s: the backend is shutting down", job_id)
                _killpg(process.pid)

    # -- starting and finishing ------------------------------------------------------------------

    def _trainable(self) -> tuple[Any, TrainingPolicy]:
        serving = self.current()
        if serving is None:
            raise NotConfigured("no model is configured", "Configure the backend with a train_hook first.")
        policy = serving.spec.training_policy
        if policy is None:
            raise NotConfigured("this configuration has no train_hook",
                                "Configure again with 'train_hook' (and models:/<name>@<alias>) to train on annotations.")
        return serving, policy

    @staticmethod
    def _figures(state: dict[str, Any], project: dict[str, Any]) -> dict[str, Any]:
        return {"annotations": project.get("annotations", 0), "changed": project.get("changed", 0),
                "last_event_at": project.get("last_event_at", 0.0), "last_started_at": state.get("last_started_at", 0.0),
                "failures": state.get("failures", 0), "last_failed_at": state.get("last_failed_at", 0.0)}

    @staticmethod
    def _wait_s(state: dict[str, Any], policy: TrainingPolicy, now: float) -> float:
        interval = state.get("last_started_at", 0.0) + policy.min_interval_s - now
        backoff = state.get("last_failed_at", 0.0) + policy.backoff(state.get("failures", 0)) - now
        return max(0.0, interval, backoff)

    def _note_annotations(self, action: str, body: dict[str, Any], project: dict[str, Any]) -> None:
        changed = len(body.get("annotations") or []) if action == "ANNOTATIONS_DELETED" else sum(
            1 for a in annotations_in(body) if not a.get("was_cancelled") and not a.get("ground_truth")
        )
        with self.records.state() as state:
            noted = state["projects"].setdefault(str(project["id"]), {})
            count = project.get("useful_annotation_number", project.get("total_annotations_number"))
            if isinstance(count, int):
                noted["annotations"] = count
            noted["changed"] = noted.get("changed", 0) + changed
            noted["last_event_at"] = time.time()
            if isinstance(project.get("label_config"), str):
                noted["label_config"] = project["label_config"]

    def _start(self, state: dict[str, Any], serving: Any, policy: TrainingPolicy, trigger: str, project_id: Any,
               label_config: str, tasks: list[dict[str, Any]] | None) -> str | None:
        """Spawn the training process holding the training lock; None when another one holds it. Holds the state lock."""
        fd = self.records.take_training_lock()
        if fd is None:
            state["request"] = {"trigger": trigger, "project": project_id, "at": time.time(), "explicit": True}
            return None
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        access = self.label_studio()
        payload = {
            "job": job_id,
            "owner": owner_identity(),  # the training ends when this process does, however it ends
            "training_dir": str(self.records.dir),
            "artifacts_dir": str(self.settings.model_dir / "artifacts"),
            "spec": serving.spec.to_dict(),
            "policy": policy.to_dict(),
            "trigger": trigger,
            "project": {"id": project_id, "label_config": label_config},
            "tasks": tasks,
            "serving": {"uri": serving.info.get("uri"), "model_version": serving.model_version},
            "label_studio": {"url": access.url, "token": access.token, "source": access.source},
            "quality": self.quality(),
            "fetch": {  # the training fetches task data under the worker's rules, whatever its environment says
                "local_files_roots": list(self.settings.local_files_roots),
                "fetch_allow_private": list(self.settings.fetch_allow_private),
                "fetch_max_bytes": self.settings.fetch_max_bytes,
                "fetch_timeout_s": self.settings.fetch_timeout_s,
                "fetch_concurrency": self.settings.fetch_concurrency,
                "cache_max_bytes": self.settings.cache_max_bytes,
            },
            "stale_runs": [run for run in state.get("stale_runs", [])],
        }
        record = {"id": job_id, "state": "running", "trigger": trigger, "project": project_id, "started_at": time.time(),
                  "parent_version": serving.model_version, "timeout_s": self.settings.train_timeout_s}
        try:
            process = self._spawn(job_id, fd, payload)
        finally:
            os.close(fd)  # the training process holds the lock now
        record["pid"] = process.pid
        self.records.add_job(state, record)
        state["last_started_at"] = record["started_at"]
        state["request"] = None
        state["stale_runs"] = []
        project = state["projects"].setdefault(str(project_id), {})
        project["changed"] = 0
        self._mine[job_id] = process
        self.metrics.training_in_progress.set(1)
        threading.Thread(target=self._watch, args=(job_id, process), name=f"training-{job_id}", daemon=True).start()
        log.info("training %s started (%s, project %s, pid %d)", job_id, trigger, project_id, process.pid)
        return job_id

    def _spawn(self, job_id: str, lock_fd: int, payload: dict[str, Any]) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in WITHHELD_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        env["LSBACKEND_TRAINING_LOCK_FD"] = str(lock_fd)
        if self.settings.train_cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.train_cuda_visible_devices
        self.records.jobs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.records.log_path(job_id), "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "backend.training.job"],
                stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=PACKAGE_ROOT,
                pass_fds=(lock_fd,), start_new_session=True,
            )
        try:
            assert process.stdin is not None
            process.stdin.write(json.dumps(payload).encode())
            process.stdin.close()
        except OSError:  # it ended at once; its log says why, and reconcile records it
            pass
        return process

    def _watch(self, job_id: str, process: subprocess.Popen) -> None:
        try:
            status = process.wait(timeout=self.settings.train_timeout_s)
        except subprocess.TimeoutExpired:
            log.error("training %s ran past TRAIN_TIMEOUT_S=%g s: stopping it", job_id, self.settings.train_timeout_s)
            with self.records.state():
                job = self.records.job(job_id) or {"id": job_id}
                job["timed_out"] = True
                self.records.job_file(job_id).save(job)
            _killpg(process.pid)
            status = process.wait()
        self._mine.pop(job_id, None)
        self.reconcile(exit_status=status)

    def _kill(self, job: dict[str, Any]) -> None:
        log.error("training %s ran past its time: stopping process group %s", job["id"], job["pid"])
        job["timed_out"] = True
        self.records.job_file(job["id"]).save(job)
        _killpg(int(job["pid"]))

    def _finish(self, state: dict[str, Any], job: dict[str, Any], exit_status: int | None) -> None:
        """Write the outcome of an ended training into its record and the state. Holds the state lock."""
        result = self.records.result(job["id"])
        job.update({k: v for k, v in result.items() if k != "stage"})
        job["finished_at"] = time.time()
        if result.get("state") not in ("succeeded", "failed") or job.get("timed_out"):
            job["state"] = "failed"
            if job.get("timed_out"):
                job["error"] = f"the training ran past TRAIN_TIMEOUT_S ({self.settings.train_timeout_s:g} s) and was stopped"
                job["detail"] = "Raise TRAIN_TIMEOUT_S, or make the train_hook faster (fewer epochs, a smaller model)."
            else:
                how = _describe_status(exit_status)
                job["error"] = f"the training process ended without an outcome ({how}) in stage {result.get('stage') or 'start'}"
                job["detail"] = "Its log tail (GET /train/status) says why: often it ran out of memory."
            if result.get("run_id"):
                state.setdefault("stale_runs", []).append(result["run_id"])  # the next training marks it KILLED
        else:
            job["state"] = result["state"]
        self.records.job_file(job["id"]).save(job)
        state["current"] = None
        self._described = (float("-inf"), None, {})
        outcome = job.get("outcome") or job["state"]
        if job["state"] == "failed":
            state["failures"] = state.get("failures", 0) + 1
            state["last_failed_at"] = job["finished_at"]
            log.error("training %s failed: %s", job["id"], job.get("error"))
        else:
            state["failures"] = 0
            log.info("training %s: %s (version %s)", job["id"], outcome, job.get("version"))
        state["last"] = {k: job.get(k) for k in ("id", "state", "outcome", "version", "run_id", "finished_at", "error", "gate")
                         if job.get(k) is not None}
        self.metrics.training_runs.labels("failed" if job["state"] == "failed" else outcome).inc()
        self.metrics.training_seconds.observe(job["finished_at"] - job.get("started_at", job["finished_at"]))
        if job.get("promoted"):
            self.records.note_promotion()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_status(status: int | None) -> str:
    if status is None:
        return "its worker was gone"
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else str(-status)
        return f"killed by {name}" + (" (out of memory?)" if -status == signal.SIGKILL else "")
    return f"exit status {status}"
