"""The backends' template: one process that imported what a backend imports, from which backends fork.

A backend is a gunicorn master, its worker, a zygote and a model process. Each started as a new
Python imports Flask, label-studio-sdk, MLflow and the model's flavor on its own: seconds per backend,
and several hundred MiB of private memory each. Forked from this process, which imported them once
and froze them out of the collector, a backend starts in milliseconds and shares those pages with
every other one; what it holds of its own is what it did since. The template never initialises CUDA,
so its forks may (each sets its own CUDA_VISIBLE_DEVICES before anything uses CUDA).

The orchestrator's process driver starts it (``python -m backend.isolation.template PATH MODULES``) and asks it
for backends; each backend's worker asks it for its zygote (``BACKEND_TEMPLATE``: the socket's path).
A backend it forked runs in a session of its own and outlives it, exactly like one started as a new
Python; where the template is gone, the driver and the worker start new Pythons instead. It lives while
an owner is connected or one of its forks lives, so an orchestrator restarted while its backends run
(``ORCHESTRATOR_ON_EXIT=keep``, or a crash) finds it again, and so do the backends' workers.

Protocol (``forking``), at PATH (a SOCK_SEQPACKET socket, mode 0600)::

    driver -> template   ("owner", 0)                                   the template lives while an owner is connected
                                                                        (or a fork of its lives)
                         ("backend", n, argv, cwd, deadline) + fds [environment, log file]   (deadline: time.time())
    worker -> template   ("zygote", n, modules)    + fds [environment, the worker's zygote socket, log file]
    template -> client   ("forked", n, pid) | ("fork-failed", n, reason), ("exited", pid, wait status)

Environments travel as a memfd that only the fork reads: credentials never pass through the template,
whose memory every later fork would share.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path

from backend.isolation.forking import (
    ForkServer,
    adopt_environment,
    freeze_imports,
    import_all,
    leave_server,
    name_process,
    prime_mlflow,
)

log = logging.getLogger(__name__)

# What a backend's gunicorn master and worker import (never wsgi or backend.web.gunicorn_conf: importing them reads
# the environment, which is each backend's own). The zygote's modules and the flavors' come on top.
SERVER_IMPORTS = ("gunicorn.app.wsgiapp", "gunicorn.arbiter", "backend.web.worker", "backend.app")
PER_BACKEND_MODULES = ("wsgi", "backend.web.gunicorn_conf")
# -- the template process ----------------------------------------------------------------------------


def _settle(server: ForkServer, env_fd: int, log_fd: int) -> None:
    """In a fork: a session of its own, its own environment, no input, its output to ``log_fd``."""
    leave_server(server.descriptors(), server.wake, new_session=True)
    adopt_environment(env_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def _backend(server: ForkServer, fds: list[int], argv: list[str], cwd: str) -> int:
    """In a fork: a gunicorn master, as ``python -m gunicorn`` with ``argv`` would be."""
    env_fd, log_fd = fds
    _settle(server, env_fd, log_fd)
    name_process("lsb-backend")
    os.chdir(cwd)
    for name in PER_BACKEND_MODULES:
        sys.modules.pop(name, None)
    sys.argv = list(argv)
    from gunicorn.app.wsgiapp import WSGIApplication

    try:
        WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]").run()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def _zygote(server: ForkServer, fds: list[int], modules: list[str]) -> int:
    """In a fork: a worker's zygote, warm at once."""
    env_fd, zygote_fd, log_fd = fds
    _settle(server, env_fd, log_fd)
    from backend.isolation.zygote import zygote_main

    zygote_main(zygote_fd, modules)  # ends with the worker's socket: not with the template
    return 0


def template_main(path: str, modules: list[str]) -> None:
    """Listen at ``path`` first (requests wait while the imports run), import, then fork on request until the
    last owner has gone, or, if none ever came, until the process that started this one has."""
    name_process("lsb-template")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)  # not the root logger's: a backend configures that for itself
    log.setLevel(logging.INFO)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the orchestrator
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    Path(path).unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    failed = {name: error for name, error in import_all(modules).items() if error}
    for name, error in failed.items():
        log.warning("template: could not import %s (%s); backends that need it import it themselves", name, error)
    prime_mlflow()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # asking does not initialise it
        log.error("template: an import initialised CUDA, which a fork cannot use: backends forked from here will "
                  "fail on the GPU. Leave that module out of SPARE_WARM_IMPORTS (or set FORK_BACKENDS=off).")
    freeze_imports()
    server = ForkServer([], listener)
    owners: set[socket.socket] = set()
    ever_owned = False

    def handle(connection: socket.socket, message: tuple, fds: list[int]) -> None:
        nonlocal ever_owned
        kind, number = message[0], message[1]
        if kind == "owner":
            owners.add(connection)
            ever_owned = True
        elif kind == "backend" and len(fds) == 2 and (time.time() > message[4] or _hung_up(connection)):
            # Its driver gave up on it and started the backend itself, or died while the imports ran (an
            # orchestrator killed mid-renewal): a backend forked now would be nobody's, and run for ever.
            for received in fds:
                os.close(received)
            server.send(connection, ("fork-failed", number, "asked for too long ago, or by a process since gone"))
        elif kind == "backend" and len(fds) == 2:
            server.fork(connection, number, fds, partial(_backend, server, fds, message[2], message[3]))
        elif kind == "zygote" and len(fds) == 3:
            server.fork(connection, number, fds, partial(_zygote, server, fds, list(message[2])))
        else:
            for received in fds:
                os.close(received)
            server.send(connection, ("fork-failed", number, f"not a request: {kind!r} with {len(fds)} descriptors"))

    def wanted() -> bool:
        """While an owner is connected, or a backend or zygote it forked lives: an orchestrator that restarts
        (or was killed) finds it again at the same socket, and what it restarts forks from here, sharing
        these pages, rather than as a new Python with copies of its own."""
        return bool(owners or server.connections or server.children)

    def closed(connection: socket.socket) -> bool:
        """Stop once unwanted, unless somebody is connecting (another process of the orchestrator may not
        have said yet that it owns this one; a worker may be asking for a zygote)."""
        owners.discard(connection)
        return not wanted() and not select.select([listener], [], [], 0)[0]

    log.info("template: ready at %s (%d modules imported)", path, len(modules) - len(failed))
    try:
        server.run(handle, closed, still_wanted=lambda: wanted() or (not ever_owned and os.getppid() == parent))
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def _hung_up(connection: socket.socket) -> bool:
    """Whether the process at the other end has closed it (its requests may still be waiting to be read)."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLRDHUP | select.POLLHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


if __name__ == "__main__":
    template_main(sys.argv[1], [m for m in sys.argv[2].split(",") if m])
