"""A fork server for model processes: MLflow imported once, a model process forked from it in milliseconds.

Hooks and the model run in a model process, not in the gunicorn worker (see ``modelprocess``). One
is started for every new model and after every crash, and starting Python plus importing MLflow
takes seconds; forking a process that has already done so takes milliseconds, and the forks share
the imported modules' memory. The zygote imports MLflow (and ``WARM_IMPORTS``, such as a flavor's
modules, for faster starts at the price of their memory in the zygote); it never initialises CUDA
(importing torch does not), so its forks may.

Where the orchestrator's process driver started the backend, the zygote is itself forked from the
backends' template (``template``), which imported all of this before: it is warm at once and shares
those pages with every other backend. Otherwise it is a new Python, started by the worker.

The zygote lives in its own process group with its forks. It ends, taking them with it, when the
worker that started it goes away (its socket closes, or, started by the worker, its parent changes).

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
from collections.abc import Callable, Iterable, Mapping
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
    prime_mlflow,
    wait_status,
)

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


ZYGOTE_WAIT_S = 30.0


def request_zygote(path: str, env: Mapping[str, str], zygote_fd: int, modules: Iterable[str], log_fd: int = 2) -> int:
    """Ask the template at ``path`` for a zygote serving ``zygote_fd``, with ``env``, writing to ``log_fd``
    (the worker's own log); its pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise ForkUnavailable(f"cannot connect: {exc}") from exc
    client = ForkClient(sock, "template-client", forks_die_with_server=False)
    env_fd = environment_fd(env)
    try:
        return client.fork("zygote", (tuple(modules),), [env_fd, zygote_fd, log_fd], ZYGOTE_WAIT_S)
    finally:
        os.close(env_fd)
        client.close()


class ZygoteUnavailable(ForkUnavailable):
    """The zygote could not be started or did not answer."""


class Zygote:
    """The worker's handle on its zygote: start it, fork model processes, learn how they ended."""

    def __init__(
        self, warm_imports: tuple[str, ...] = (), env: dict[str, str] | None = None, template: str = "",
        model_dir: Path | None = None,
    ) -> None:
        """``env``: the zygote's environment (and its forks'), by default this process's. ``template``: the
        socket of the backends' template (``backend.isolation.template``) to fork the zygote from; else, or where it
        does not answer, the zygote is a new Python."""
        self.initial_imports = tuple(dict.fromkeys(default_imports(os.environ if env is None else env) + warm_imports))
        self.env = env
        self.template = template
        self.model_dir = model_dir  # where a zygote forked from the template is noted (lifetime.note_adopted)
        self._note: Path | None = None
        self.forked_from_template = False
        self.warm_errors: dict[str, str] = {}
        self.warmed = threading.Event()  # the initial imports are done (spares report it on /health)
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._client: ForkClient | None = None
        self._start_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Zygote:
        with self._start_lock:
            if self.alive:
                return self
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = {k: v for k, v in (os.environ if self.env is None else self.env).items() if k not in NOT_FOR_HOOKS}
            try:
                pid = self._from_template(env, theirs) if self.template else None
                self.forked_from_template = pid is not None
                if pid is not None and self.model_dir is not None:  # not in the backend's tree: say whose it is
                    self._note = note_adopted(self.model_dir, "zygote", pid)
                self._proc = None if pid is not None else self._new_python(env, theirs)
                self._pid = pid if pid is not None else self._proc.pid  # type: ignore[union-attr]
            except OSError as exc:
                mine.close()
                raise ZygoteUnavailable(f"could not start the model zygote: {exc}") from exc
            finally:
                theirs.close()
            self.warmed.clear()
            self._client = ForkClient(mine, "zygote-reader", on_message=self._on_message)
            return self

    def _from_template(self, env: dict[str, str], theirs: socket.socket) -> int | None:

        try:
            return request_zygote(self.template, env, theirs.fileno(), self.initial_imports)
        except ForkUnavailable as exc:
            log.warning(
                "the backends' template (%s) did not fork a zygote: %s; starting one as a new Python",
                self.template,
                exc,
            )
            return None

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
        """Stop the zygote and every model process it forked."""
        client, proc, pid = self._client, self._proc, self._pid
        running = self.alive
        self._client = None
        if client is not None:
            client.close()
        if running and pid is not None:
            identity = process_identity(pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc is None:  # the template's child, not ours to wait for: gone once /proc says so
                deadline = time.monotonic() + 5.0
                while alive(identity) and time.monotonic() < deadline:
                    time.sleep(0.01)
        if proc is not None:
            proc.wait(5)
        if self._note is not None:  # only now: until it has ended, its memory is this backend's
            self._note.unlink(missing_ok=True)

    # -- requests ------------------------------------------------------------------------------

    def fork(self, conn_fd: int, stage_fd: int, lane_fd: int | None = None, timeout: float = 30.0) -> int:
        """A new model process serving ``conn_fd`` (and its interactive lane on ``lane_fd``); returns its pid.
        Waits for the zygote's imports."""
        if not self.alive:
            self.start()
        client = self._client
        try:
            if client is None:
                raise ForkUnavailable("it is not running")
            return client.fork("fork", (), [conn_fd, stage_fd] + ([] if lane_fd is None else [lane_fd]), timeout)
        except ForkUnavailable as exc:
            ended = f" ({describe_exit(self._proc_status())})" if client is not None and client.ended.is_set() else ""
            raise ZygoteUnavailable(f"the model zygote: {exc}{ended}") from exc

    def on_exit(self, pid: int, listener: Callable[[int], None]) -> None:
        """Call ``listener(wait status)`` once the forked ``pid`` has ended (at once if it already has)."""
        client = self._client
        if client is None:
            listener(signal.SIGKILL)
            return
        client.on_exit(pid, listener)

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
    prime_mlflow()
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
