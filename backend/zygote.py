"""A fork server for model processes: MLflow imported once, a model process forked from it in milliseconds.

Hooks and the model run in a model process, not in the gunicorn worker (see ``modelprocess``). One
is started for every new model and after every crash, and starting Python plus importing MLflow
takes seconds; forking a process that has already done so takes milliseconds, and the forks share
the imported modules' memory. The zygote imports MLflow (and ``WARM_IMPORTS``, such as a flavor's
modules, for faster starts at the price of their memory in the zygote); it never initialises CUDA
(importing torch does not), so its forks may.

The zygote lives in its own process group with its forks. It ends, taking them with it, when the
worker that started it goes away (its socket closes, or its parent changes).

Protocol: one pickled message per packet on a SOCK_SEQPACKET socket pair::

    worker -> zygote   ("fork", n) + fds [model process socket, stage page]
    zygote -> worker   ("warmed", {module: error or None})     once, when the initial imports are done
                       ("forked", n, pid) | ("fork-failed", n, reason)
                       ("exited", pid, wait status)
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .settings import log_level_from

log = logging.getLogger(__name__)

PACKET = 1 << 16
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What every model process needs: our side of it, MLflow's loader, and the store the default tracking URI names
# (importing MLflow's SQLAlchemy store alone takes seconds; a fork should not pay it each time).
BASE_IMPORTS = ("backend.modelhost", "backend.pipeline", "backend.loading", "mlflow.pyfunc")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQL_STORES = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")


def default_imports(env: Mapping[str, str]) -> tuple[str, ...]:
    """BASE_IMPORTS, and MLflow's database stores when the default tracking URI is a database."""
    scheme = (env.get("MLFLOW_TRACKING_URI") or "").split(":", 1)[0].split("+", 1)[0]
    return BASE_IMPORTS + (SQL_STORES if scheme in DATABASE_SCHEMES else ())
# The worker's own credentials: hooks run in the zygote's forks and have no use for them.
NOT_FOR_HOOKS = frozenset({"CONFIGURE_TOKEN", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"})


class ZygoteUnavailable(Exception):
    """The zygote could not be started or did not answer."""


def describe_exit(status: int | None) -> str:
    """A wait status as words: 'exit code 3', 'killed by SIGKILL'."""
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {os.WEXITSTATUS(status)}"


class Zygote:
    """The worker's handle on its zygote: start it, fork model processes, learn how they ended."""

    def __init__(self, warm_imports: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        """``env``: the zygote's environment (and its forks'), by default this process's."""
        self.initial_imports = tuple(dict.fromkeys(default_imports(os.environ if env is None else env) + warm_imports))
        self.env = env
        self.warm_errors: dict[str, str] = {}
        self.warmed = threading.Event()  # the initial imports are done (spares report it on /health)
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._replies: dict[int, tuple] = {}
        self._reply_ready = threading.Condition()
        self._exits: dict[int, int] = {}
        self._exit_listeners: dict[int, Callable[[int], None]] = {}
        self._counter = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Zygote:
        with self._start_lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = {k: v for k, v in (os.environ if self.env is None else self.env).items() if k not in NOT_FOR_HOOKS}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "backend.zygote", str(theirs.fileno()), ",".join(self.initial_imports)],
                    pass_fds=[theirs.fileno()],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own group: it and its forks end together
                )
            except OSError as exc:
                mine.close()
                raise ZygoteUnavailable(f"could not start the model zygote: {exc}") from exc
            finally:
                theirs.close()
            self._sock = mine
            self.warmed.clear()
            threading.Thread(target=self._read, args=(mine,), name="zygote-reader", daemon=True).start()
            return self

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the zygote and every model process it forked."""
        sock, proc = self._sock, self._proc
        self._sock = None
        if sock is not None:
            sock.close()
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    # -- requests ------------------------------------------------------------------------------

    def fork(self, conn_fd: int, stage_fd: int, timeout: float = 30.0) -> int:
        """A new model process serving ``conn_fd``; returns its pid. Waits for the zygote's imports."""
        if not self.alive:
            self.start()
        with self._reply_ready:
            self._counter += 1
            number = self._counter
        self._send(("fork", number), [conn_fd, stage_fd])
        reply = self._wait_reply(number, timeout)
        if reply[0] != "forked":
            raise ZygoteUnavailable(f"the model zygote could not fork: {reply[2]}")
        return int(reply[2])

    def on_exit(self, pid: int, listener: Callable[[int], None]) -> None:
        """Call ``listener(wait status)`` once the forked ``pid`` has ended (at once if it already has)."""
        with self._reply_ready:
            status = self._exits.pop(pid, None)
            if status is None:
                self._exit_listeners[pid] = listener
                return
        listener(status)

    def _send(self, message: tuple, fds: list[int]) -> None:
        sock = self._sock
        if sock is None:
            raise ZygoteUnavailable("the model zygote is not running")
        try:
            with self._send_lock:
                socket.send_fds(sock, [pickle.dumps(message)], fds)
        except OSError as exc:
            raise ZygoteUnavailable(f"the model zygote is not answering: {exc}") from exc

    def _wait_reply(self, number: int, timeout: float) -> tuple:
        with self._reply_ready:
            if not self._reply_ready.wait_for(lambda: number in self._replies or not self.alive, timeout):
                raise ZygoteUnavailable(f"the model zygote did not fork within {timeout:g} s")
            if number not in self._replies:
                raise ZygoteUnavailable(f"the model zygote ended ({describe_exit(self._proc_status())})")
            return self._replies.pop(number)

    def _proc_status(self) -> int | None:
        code = self._proc.poll() if self._proc is not None else None
        if code is None:
            return None
        return (-code) & 0x7F if code < 0 else code << 8

    def _read(self, sock: socket.socket) -> None:
        """The zygote's messages: replies to forks, warm results, and exits of its forks."""
        while True:
            try:
                data, _, _, _ = socket.recv_fds(sock, PACKET, 0)
            except OSError:
                data = b""
            if not data:
                break
            message = pickle.loads(data)
            kind = message[0]
            listener = None
            with self._reply_ready:
                if kind in ("forked", "fork-failed"):
                    self._replies[message[1]] = message
                elif kind == "warmed":
                    self.warm_errors.update({m: e for m, e in message[1].items() if e})
                    self.warmed.set()
                elif kind == "exited":
                    listener = self._exit_listeners.pop(message[1], None)
                    if listener is None:
                        self._exits[message[1]] = message[2]
                self._reply_ready.notify_all()
            if listener is not None:
                listener(message[2])
        with self._reply_ready:
            self._reply_ready.notify_all()
            listeners, self._exit_listeners = self._exit_listeners, {}
        for listener in listeners.values():  # the zygote took its forks with it
            listener(signal.SIGKILL)


# -- the zygote process ----------------------------------------------------------------------------


def _import_all(modules: list[str]) -> dict[str, str | None]:
    outcome: dict[str, str | None] = {}
    for name in modules:
        try:
            importlib.import_module(name)
            outcome[name] = None
        except Exception as exc:  # noqa: BLE001 - a missing optional flavor is reported, not fatal
            outcome[name] = f"{type(exc).__name__}: {exc}"
    return outcome


def _prime_mlflow() -> None:
    """Build MLflow's map of installed packages once here instead of in every fork: each model load checks
    the model's requirements against it, and building it scans every installed distribution (~1 s)."""
    try:
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()
    except Exception as exc:  # noqa: BLE001 - a private helper of MLflow's: without it, loads are only slower
        log.debug("could not prime MLflow's package map: %s", exc)


def _set_parent_death_signal() -> None:
    """Linux: die with the parent (the zygote) even if it is killed outright."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_fork(sock: socket.socket, wake: tuple[int, int], fds: list[int]) -> None:
    """In the forked child: drop the zygote's ends and serve as a model process; never returns."""
    code = 1
    try:
        sock.close()
        for fd in wake:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _set_parent_death_signal()
        from backend.modelhost import serve

        code = serve(fds[0], fds[1])
    except BaseException:
        logging.getLogger("backend.modelhost").exception("model process failed")
    finally:
        os._exit(code)


def zygote_main(fd: int, modules: list[str]) -> None:
    logging.basicConfig(level=log_level_from(os.environ), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=fd)
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for gunicorn; it ends us
    wake = os.pipe()
    os.set_blocking(wake[1], False)
    signal.set_wakeup_fd(wake[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(message: tuple) -> None:
        try:
            sock.send(pickle.dumps(message))
        except OSError:
            pass

    warmed = _import_all(modules)
    _prime_mlflow()
    # What is imported now is shared with every model process forked later: kept out of the collector, so
    # a collection in a model process does not write to (and copy) every page of it.
    gc.collect()
    gc.freeze()
    send(("warmed", warmed))
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), wake[0]], [], [], 1.0)  # descriptors: one type for select
            if os.getppid() != parent:
                break
            if wake[0] in ready:
                os.read(wake[0], 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if not pid:
                    break
                send(("exited", pid, status))
            if sock.fileno() not in ready:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, PACKET, 4)
            except InterruptedError:
                continue
            if not data:
                break  # the worker is gone
            message = pickle.loads(data)
            if message[0] == "fork":
                try:
                    pid = os.fork()
                except OSError as exc:
                    send(("fork-failed", message[1], str(exc)))
                    pid = -1
                if pid == 0:
                    _run_fork(sock, wake, fds)
                for received in fds:
                    os.close(received)
                if pid > 0:
                    send(("forked", message[1], pid))
    finally:
        os.killpg(os.getpgrp(), signal.SIGKILL)


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), [m for m in sys.argv[2].split(",") if m])
