"""The default driver: each backend is a gunicorn process on its own loopback port.

Backends are forked from the backends' template, and their workers' model processes from the models'
template (``backend.isolation.template``; ``FORK_BACKENDS=off`` starts each as a new Python, as does a
template that does not answer). Either way they run in their own session, so they outlive an
orchestrator restart and are re-adopted by their handle
("pid:starttime", which a recycled pid cannot match). Their output goes to a log file beside their
MODEL_DIR.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from backend.core.lifetime import adopted_pids, parent_pid, start_time, wait_for_exit
from backend.core.memory import MemoryReads, children_by_parent, rss_bytes, tree_pids
from backend.core.settings import comma_list
from backend.isolation.forking import ForkUnavailable, describe_exit, wait_status
from backend.isolation.template import SERVER_IMPORTS
from backend.isolation.zygote import NOT_FOR_HOOKS, default_imports

from ..gpus import gpu_memory_by_pid
from ..registry import BackendRecord
from ..settings import OrchestratorSettings
from .base import Memory
from .template import BackendTemplate

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages once installed
GUNICORN_CONFIG = "python:backend.web.gunicorn_conf"
# The orchestrator's own settings are not the backend's: each backend gets its own below.
NOT_INHERITED = ("HOST", "PORT", "MODEL_DIR", "CONFIGURE_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WORKERS")
LOG_ROTATE_BYTES = 5 << 20
GUNICORN_ARGS = ("--config", GUNICORN_CONFIG, "--chdir", str(PROJECT_ROOT), "wsgi:app")


def backend_environment(settings: OrchestratorSettings, record: BackendRecord) -> dict[str, str]:
    """A gunicorn backend's environment, but for where it listens and its GPUs (which the driver sets)."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        MODEL_DIR=record.model_dir,
        CONFIGURE_TOKEN=record.token,
        THREADS=str(settings.backend_threads),
        GRACEFUL_TIMEOUT=env.get("GRACEFUL_TIMEOUT", "3"),
        PYTHONUNBUFFERED="1",
    )
    if record.spare:
        env["WARM_IMPORTS"] = settings.spare_warm_imports
    return env


def log_path(record: BackendRecord) -> Path:
    return Path(record.model_dir).parent / "backend.log"


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file, reading only its end."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * max(lines, 1)))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def template_environment() -> dict[str, str]:
    """The template's environment: what every backend shares, without anybody's credentials."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED and k not in NOT_FOR_HOOKS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def model_modules(settings: OrchestratorSettings, env: Mapping[str, str]) -> tuple[str, ...]:
    """What the models' template imports: MLflow and the store ``env``'s tracking URI names, and
    SPARE_WARM_IMPORTS (the flavors most models need). The backends' template imports SERVER_IMPORTS."""
    return tuple(dict.fromkeys(default_imports(env) + comma_list(settings.spare_warm_imports)))


class ProcessDriver:
    """gunicorn processes on free loopback ports, one per backend, forked from the template where it answers."""

    name = "process"

    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self._children: dict[int, subprocess.Popen] = {}
        self._reads = MemoryReads()  # each process's smaps read again only once it has touched its memory
        self.template: BackendTemplate | None = None  # forks gunicorn masters
        self.models: BackendTemplate | None = None  # forks the workers' model processes
        if settings.fork_backends:
            env = template_environment()
            try:
                self.template = BackendTemplate(settings.state_dir, env, SERVER_IMPORTS, PROJECT_ROOT,
                                                settings.start_timeout_s)
                self.models = BackendTemplate(settings.state_dir, env, model_modules(settings, env), PROJECT_ROOT,
                                              settings.start_timeout_s, stem="models-template", name="lsb-model-tmpl")
            except ForkUnavailable as exc:
                self.template = self.models = None
                log.warning("no templates (%s): each backend starts as a new Python", exc)

    def templates(self) -> list[BackendTemplate]:
        return [t for t in (self.template, self.models) if t is not None]

    def environment(self, record: BackendRecord) -> dict[str, str]:
        env = backend_environment(self.settings, record)
        env.update(HOST="127.0.0.1", PORT=str(record.port))
        if record.gpu:
            env["CUDA_VISIBLE_DEVICES"] = record.gpu
        if self.models is not None:
            env["BACKEND_TEMPLATE"] = str(self.models.path)
        return env

    def start(self, record: BackendRecord) -> str:
        log_file = log_path(record)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if log_file.exists() and log_file.stat().st_size > LOG_ROTATE_BYTES:
            log_file.replace(log_file.with_suffix(".log.1"))
        env = self.environment(record)
        with log_file.open("ab") as output:
            pid = self._fork(record, env, output.fileno())
            if pid is None:
                child = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS],
                    env=env,
                    cwd=PROJECT_ROOT,  # where python -m finds backend.web.gunicorn_conf and wsgi
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives the orchestrator; killed as a group
                )
                pid = child.pid
                self._children[pid] = child
        return f"{pid}:{start_time(pid)}"

    def _fork(self, record: BackendRecord, env: dict[str, str], log_fd: int) -> int | None:
        """The backend forked from the template; None where there is no template or it did not fork."""
        if self.template is None:
            return None
        self._connect_models()  # where the worker will ask for its model processes
        try:
            return self.template.spawn(env, log_fd, ["gunicorn", *GUNICORN_ARGS], PROJECT_ROOT)
        except ForkUnavailable as exc:
            log.warning("backend %s: the template did not fork it (%s); starting it as a new Python", record.id, exc)
            return None

    def _connect_models(self) -> None:
        """Connected to the models' template (started where none answers), as one of its owners: the workers
        ask it for their model processes, and its memory is counted from now."""
        if self.models is None:
            return
        try:
            self.models.connect()
        except ForkUnavailable as exc:
            log.warning("no models' template (%s): the backends' workers start zygotes as new Pythons", exc)

    def _pid(self, record: BackendRecord) -> int:
        pid, _, _ = record.handle.partition(":")
        return int(pid) if pid.isdigit() else 0

    def is_running(self, record: BackendRecord) -> bool:
        pid = self._pid(record)
        if not pid:
            return False
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        started = record.handle.partition(":")[2]
        now = start_time(pid)
        return bool(now) and (not started or now == started)

    def exit_reason(self, record: BackendRecord) -> str:
        pid = self._pid(record)
        child = self._children.get(pid)
        if child is not None and child.returncode is not None:
            return describe_exit(wait_status(child.returncode))
        told = self.template.exit_reason(pid) if self.template is not None else ""
        return told or "the process is gone"

    def stop(self, record: BackendRecord) -> None:
        pid = self._pid(record)
        if not pid or not self.is_running(record):
            self._children.pop(pid, None)
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while self.is_running(record) and (left := deadline - time.monotonic()) > 0:
                wait_for_exit(pid, min(left, 1.0))  # a pid since recycled is waited on for a second at most
            if not self.is_running(record):
                break
        self._children.pop(pid, None)
        self._end_adopted(record)

    def _end_adopted(self, record: BackendRecord) -> None:
        """Its model processes (forked from the models' template, so not in its process group): each worker
        ends its own as it exits, and one whose worker was killed goes here; stopped means every process of
        it is gone."""
        deadline = time.monotonic() + 5.0
        while (left := adopted_pids(Path(record.model_dir), self._pid(record))) and time.monotonic() < deadline:
            for adopted in left:
                try:
                    os.killpg(adopted, signal.SIGKILL)  # it leads its group: it and what its hooks started
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.02)

    def forget(self, record: BackendRecord) -> None:
        """Nothing outlives a stopped process but its folder, which the manager removes."""

    def pending_reason(self, record: BackendRecord) -> str:
        return ""  # started is placed

    def renewal_reason(self, record: BackendRecord) -> str:
        """A running backend that is not the backends' template's child, or whose model process is not the
        models' template's: forked from a template since gone (killed, say) or started as a new Python while
        none answered. It holds imports of its own (or the old template's pages, kept alive by it alone);
        forked again, it shares them with the others."""
        pid = self._pid(record)
        if self.template is None or not pid or not self.is_running(record):
            return ""
        # Started where the last was killed (or this orchestrator is new), without holding up the supervisor's
        # pass for their imports: decided on a later pass.
        for started in self.templates():
            started.connect_soon()
        template = self.template.running_pid()
        if not template:
            return ""  # nothing to move it to yet
        parent = parent_pid(pid)
        if parent not in (0, template):
            return f"its process {pid} was not forked from the backends' template (pid {template}), so shares none of its memory"
        models = self.models.running_pid() if self.models is not None else 0
        for adopted in adopted_pids(Path(record.model_dir), pid) if models else ():
            if parent_pid(adopted) not in (0, models):
                return (f"its model process {adopted} was not forked from the models' template (pid {models}), so "
                        "shares none of its memory")
        return ""

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        return self.measure(records, with_total=False)[0]

    def measure(self, records: list[BackendRecord], with_total: bool = True) -> tuple[dict[str, Memory], int]:
        """Each backend's processes (gunicorn, its workers, and their model processes, forked from the models'
        template or a zygote of theirs): their PSS, private memory and, on its GPU, what nvidia-smi says they
        hold; and the PSS of the templates with every process forked from them and of those trees. One pass
        over /proc, one read of each process's smaps_rollup (which costs milliseconds for a big process)."""
        tree = children_by_parent()
        on_gpus = gpu_memory_by_pid() if any(r.gpu for r in records) else {}
        read: dict[int, tuple[int, int]] = {}

        def pss_private(pids: list[int]) -> tuple[int, int]:
            for pid in pids:
                if pid not in read:
                    read[pid] = self._reads.pss_and_private(pid)
            return sum(read[pid][0] for pid in pids), sum(read[pid][1] for pid in pids)

        measured = {}
        for record in records:
            if not self.is_running(record):
                continue
            pids = tree_pids(self._pid(record), tree)
            for adopted in adopted_pids(Path(record.model_dir), self._pid(record)):
                pids += tree_pids(adopted, tree)
            pss, private = pss_private(pids)
            gpu = sum(on_gpus.get(pid, 0) for pid in pids) if record.gpu else 0
            measured[record.id] = Memory(pss=pss, private=private, gpu=gpu)
        if not with_total:
            return measured, 0
        everything = set(read)
        for template in self.templates():
            if pid := template.running_pid():
                everything.update(tree_pids(pid, tree))
        total = pss_private(sorted(everything))[0]
        self._reads.keep_only(everything)
        return measured, total

    def overhead(self) -> int:
        return rss_bytes([pid for template in self.templates() if (pid := template.running_pid())])

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        return tail(log_path(record), lines)
