"""A fork server for model processes: MLflow imported once, a model process forked from it in milliseconds.

Hooks and the model run in a model process, not in the gunicorn worker (see ``modelprocess``). One
is started for every new model and after every crash, and starting Python plus importing MLflow
takes seconds; forking a process that has already done so takes milliseconds, and the forks share
the imported modules' memory. The zygote imports MLflow (and ``WARM_IMPORTS``, such as a flavor's
modules, for faster starts at the price of their memory in the zygote); it never initialises CUDA
(importing torch does not), so its forks may.

Where the orchestrator's process driver started the backend, there is no zygote: the worker asks the
models' template (``template``), which imported all of this before, for its model processes, which
share those pages with every other backend's; each leads a process group of its own, and ends with
the worker (the template kills it when the worker's connection closes; one whose template has gone
watches the worker itself), not with the template. A backend run on its own starts its zygote as a
new Python. The zygote lives in its own process group with its forks. It ends, taking them with it,
when the worker that started it goes away (its socket closes, or its parent changes).

Protocol (``forking``), on a SOCK_SEQPACKET socket pair::

    worker -> zygote   ("fork", n) + fds [model process socket, stage page]
    zygote -> worker   ("warmed", {module: error or None})     once, when the initial imports are done
                       ("forked", n, pid) | ("fork-failed", n, reason)
                       ("exited", pid, wait status)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from backend.core.lifetime import alive, note_adopted, process_identity
from backend.core.settings import log_level_from
from backend.isolation.forking import (
    PR_SET_PDEATHSIG,
    ForkClient,
    ForkServer,
    ForkUnavailable,
    describe_exit,
    environment_fd,
    freeze_imports,
    import_all,
    leave_server,
    name_process,
    prctl,
    wait_status,
)
from backend.isolation.priming import prime_model_processes

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What every model process needs: our side of it, MLflow's loader, and the store the default tracking URI names
# (importing MLflow's SQLAlchemy store alone takes seconds; a fork should not pay it each time).
BASE_IMPORTS = ("backend.isolation.modelhost", "backend.model.pipeline", "backend.model.loading", "mlflow.pyfunc")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQL_STORES = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")


def default_imports(env: Mapping[str, str]) -> tuple[str, ...]:
    """BASE_IMPORTS, and MLflow's database stores when the default tracking URI is a database."""
    scheme = (env.get("MLFLOW_TRACKING_URI") or "").split(":", 1)[0].split("+", 1)[0]
    return BASE_IMPORTS + (SQL_STORES if scheme in DATABASE_SCHEMES else ())


# The worker's own credentials: hooks run in the zygote's forks and have no use for them.
NOT_FOR_HOOKS = frozenset({"CONFIGURE_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"})


def connect_template(path: str) -> ForkClient:
    """A connection to the models' template at ``path``, for asking it for model processes. Those outlive
    it: where it ends, they serve on, and end with this worker."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise ForkUnavailable(f"cannot connect: {exc}") from exc
    return ForkClient(sock, "template-client", forks_die_with_server=False)


class ZygoteUnavailable(ForkUnavailable):
    """The zygote could not be started or did not answer."""


class Zygote:
    """The worker's handle on where its model processes come from: the models' template where the
    orchestrator runs one, else a zygote of its own; forks model processes and learns how they ended."""

    def __init__(
        self, warm_imports: tuple[str, ...] = (), env: dict[str, str] | None = None, template: str = "",
        model_dir: Path | None = None,
    ) -> None:
        """``env``: the model processes' environment, by default this process's. ``template``: the socket of
        the models' template (``backend.isolation.template``) to fork them from; else, or where it does not
        answer, from a zygote started as a new Python."""
        self.initial_imports = tuple(dict.fromkeys(default_imports(os.environ if env is None else env) + warm_imports))
        self.env = env
        self.template = template
        self.model_dir = model_dir  # where a model process forked from the template is noted (lifetime.note_adopted)
        self.forked_from_template = False  # the model processes come from the template, with no zygote
        self.warm_errors: dict[str, str] = {}
        self.warmed = threading.Event()  # the initial imports are done (spares report it on /health)
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._client: ForkClient | None = None
        self._start_lock = threading.Lock()
        self._forks: dict[int, tuple[str, Path | None]] = {}  # from the template: identity and note, by pid
        self._forks_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Zygote:
        with self._start_lock:
            if self.alive:
                return self
            if self.template and self._connect_template():
                return self
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = self._hooks_environment()
            try:
                self._proc = self._new_python(env, theirs)
                self._pid = self._proc.pid
            except OSError as exc:
                mine.close()
                raise ZygoteUnavailable(f"could not start the model zygote: {exc}") from exc
            finally:
                theirs.close()
            self.forked_from_template = False
            self.warmed.clear()
            self._client = ForkClient(mine, "zygote-reader", on_message=self._on_message)
            return self

    def _hooks_environment(self) -> dict[str, str]:
        return {k: v for k, v in (os.environ if self.env is None else self.env).items() if k not in NOT_FOR_HOOKS}

    def _connect_template(self) -> bool:
        """Fork model processes from the models' template, which imported all this before: warm at once, its
        pages shared with every other backend's, and no zygote in between. False where it does not answer."""
        try:
            self._client = connect_template(self.template)
        except ForkUnavailable as exc:
            log.warning("the models' template (%s) does not answer: %s; starting a zygote as a new Python",
                        self.template, exc)
            return False
        self._proc, self._pid = None, None
        self.forked_from_template = True
        self.warmed.set()
        return True

    def _new_python(self, env: dict[str, str], theirs: socket.socket) -> subprocess.Popen:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
        return subprocess.Popen(
            [sys.executable, "-m", "backend.isolation.zygote", str(theirs.fileno()), ",".join(self.initial_imports)],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: it and its forks end together
        )

    @property
    def alive(self) -> bool:
        client = self._client
        return client is not None and not client.ended.is_set() and (self._proc is None or self._proc.poll() is None)

    def close(self) -> None:
        """Stop the zygote and every model process it forked (or the template forked for this worker)."""
        client, proc, pid = self._client, self._proc, self._pid
        running = self.alive
        self._client = None
        if client is not None:
            client.close()
        self._kill_forks()
        if running and pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait(5)

    def _kill_forks(self) -> None:
        """The model processes the template forked for this worker, ended, and their notes removed once /proc
        says they are gone."""
        with self._forks_lock:
            forks, self._forks = self._forks, {}
        for pid, (identity, _) in forks.items():
            if alive(identity):
                try:
                    os.killpg(pid, signal.SIGKILL)  # it leads its own group: what its hooks started goes too
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 5.0
        for identity, note in forks.values():
            while alive(identity) and time.monotonic() < deadline:
                time.sleep(0.01)
            if note is not None:  # only now: until it has ended, its memory is this backend's
                note.unlink(missing_ok=True)

    # -- requests ------------------------------------------------------------------------------

    def fork(self, conn_fd: int, stage_fd: int, lane_fd: int | None = None, timeout: float = 30.0) -> int:
        """A new model process serving ``conn_fd`` (and its interactive lane on ``lane_fd``); returns its pid.
        Waits for the zygote's imports."""
        if not self.alive:
            self.start()
        client = self._client
        lane = [] if lane_fd is None else [lane_fd]
        try:
            if client is None:
                raise ForkUnavailable("it is not running")
            if not self.forked_from_template:
                return client.fork("fork", (), [conn_fd, stage_fd, *lane], timeout)
            env_fd = environment_fd(self._hooks_environment())
            try:
                pid = client.fork("model", (self.initial_imports,), [env_fd, 2, conn_fd, stage_fd, *lane], timeout)
            finally:
                os.close(env_fd)
        except ForkUnavailable as exc:
            ended = f" ({describe_exit(self._proc_status())})" if client is not None and client.ended.is_set() else ""
            where = "the models' template" if self.forked_from_template else "the model zygote"
            raise ZygoteUnavailable(f"{where}: {exc}{ended}") from exc
        # Not in the backend's tree: say whose it is, so that its memory is counted as this backend's.
        note = note_adopted(self.model_dir, f"model{pid}", pid) if self.model_dir is not None else None
        with self._forks_lock:
            self._forks[pid] = (process_identity(pid), note)
        return pid

    def on_exit(self, pid: int, listener: Callable[[int], None]) -> None:
        """Call ``listener(wait status)`` once the forked ``pid`` has ended (at once if it already has)."""
        client = self._client
        if client is None:
            listener(signal.SIGKILL)
            return

        def ended(status: int) -> None:
            with self._forks_lock:
                _, note = self._forks.pop(pid, ("", None))
            if note is not None:
                note.unlink(missing_ok=True)
            listener(status)

        client.on_exit(pid, ended)

    def _on_message(self, message: tuple) -> None:
        if message[0] == "warmed":
            self.warm_errors.update({m: e for m, e in message[1].items() if e})
            self.warmed.set()

    def _proc_status(self) -> int | None:
        code = self._proc.poll() if self._proc is not None else None
        return None if code is None else wait_status(code)


# -- the zygote process ----------------------------------------------------------------------------


def _model_process(server: ForkServer, fds: list[int]) -> int:
    """In a fork: let go of the zygote's ends and serve as a model process."""
    leave_server(server.descriptors(), server.wake, new_session=False)
    name_process("lsb-model")
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the zygote, even one killed outright
    from backend.isolation.modelhost import serve

    try:
        return serve(fds[0], fds[1], fds[2] if len(fds) > 2 else None)
    except BaseException:
        logging.getLogger("backend.isolation.modelhost").exception("model process failed")
        return 1


def zygote_main(fd: int, modules: list[str], parent: int | None = None) -> None:
    """Import ``modules``, then fork a model process for each request until the worker's socket closes, or
    (``parent``) that process is no longer this one's parent. Ending, it ends every model process it forked."""
    logging.basicConfig(level=log_level_from(os.environ), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=fd)
    name_process("lsb-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for gunicorn; it ends us
    server = ForkServer([sock])
    warmed = import_all(modules)
    prime_model_processes()
    freeze_imports()
    server.send(sock, ("warmed", warmed))

    def handle(connection: socket.socket, message: tuple, fds: list[int]) -> None:
        if message[0] == "fork":
            server.fork(connection, message[1], fds, partial(_model_process, server, fds))
        else:
            for received in fds:
                os.close(received)

    try:
        server.run(handle, closed=lambda _: True, still_wanted=lambda: parent is None or os.getppid() == parent)
    finally:
        os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), [m for m in sys.argv[2].split(",") if m], parent=os.getppid())
