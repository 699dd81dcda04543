"""The templates: processes that imported what backends import once, from which backends' processes fork.

A backend is a gunicorn master, its worker and a model process. Each started as a new
Python imports Flask, label-studio-sdk, MLflow and the model's flavor on its own: seconds per backend,
and several hundred MiB of private memory each. Forked from a process which imported them once and
froze them out of the collector, a backend starts in milliseconds and shares those pages with every
other one; what it holds of its own is what it did since. A template never initialises CUDA, so its
forks may (each sets its own CUDA_VISIBLE_DEVICES before anything uses CUDA).

The orchestrator's process driver runs two (``python -m backend.isolation.template PATH MODULES NAME``):
the backends' template, with the server's imports, forks gunicorn masters (which fork their workers);
the models' template, with MLflow's and the flavors', forks each worker's model processes
(``BACKEND_TEMPLATE``: its socket's path; a backend run on its own starts a zygote instead). Two,
because a fork, an exit and a read of a process's smaps all cost in proportion to the memory it maps:
scikit-learn's estimator discovery alone (which loading a model saved with skops runs) brings about
150 MiB, and a master and worker that never load a model paid for all of it at every start and stop.
A backend forked runs in a session of its own and outlives its template, exactly like one started as a
new Python; a model process ends with the worker that asked for it (the template kills it when the
worker's connection closes; where the template has gone, it watches the worker itself). Where a
template does not answer, the driver and the worker start new Pythons instead. A template lives while
an owner is connected or one of its forks lives, so an orchestrator restarted while its backends run
(``ORCHESTRATOR_ON_EXIT=keep``, or a crash) finds it again, and so do the backends' workers.

Protocol (``forking``), at PATH (a SOCK_SEQPACKET socket, mode 0600)::

    driver -> template   ("owner", n)                                   the template lives while an owner is connected
                                                                        (or a fork of its lives); answered once the
                                                                        imports are done
                         ("backend", n, argv, cwd, deadline) + fds [environment, log file]   (deadline: time.time())
    worker -> template   ("model", n, modules)     + fds [environment, log file, the model process's socket,
                                                         its stage page, its interactive lane's socket (optional)]
    template -> client   ("owned", n, pid) | ("forked", n, pid) | ("fork-failed", n, reason),
                         ("exited", pid, wait status)

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

from backend.core.lifetime import end_with, process_identity
from backend.core.settings import log_level_from
from backend.isolation.forking import (
    ForkServer,
    adopt_environment,
    freeze_imports,
    hung_up,
    import_all,
    leave_server,
    name_process,
    peer_pid,
    share_as_huge_pages,
)
from backend.isolation.priming import prime_model_processes

PROTOCOL = 2  # in the socket's name (orchestrator/drivers/template.py); 2: "owner" is answered

log = logging.getLogger(__name__)

# What a backend's gunicorn master and worker import (never wsgi or backend.web.gunicorn_conf: importing them reads
# the environment, which is each backend's own): the backends' template's. The models' template imports what
# a model process needs and the flavors'.
SERVER_IMPORTS = ("gunicorn.app.wsgiapp", "gunicorn.arbiter", "gunicorn.glogging", "backend.isolation.arbiter", "backend.web.worker", "backend.app")
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
    from backend.isolation.arbiter import BackendApplication

    try:
        BackendApplication().run()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def _model(server: ForkServer, fds: list[int], modules: list[str], worker: str) -> int:
    """In a fork: a worker's model process, warm at once (``modules``: the worker's WARM_IMPORTS, most of them
    imported here already), which ends with ``worker`` (its identity) even where the template has gone
    first and a hook is stuck in a call."""
    env_fd, log_fd, *serving = fds
    _settle(server, env_fd, log_fd)  # its own session: killing its group ends what its hooks started too
    name_process("lsb-model")
    end_with(worker)
    logging.basicConfig(level=log_level_from(os.environ), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import_all(modules)  # one that fails is imported again where a hook needs it, and fails there by name
    from backend.isolation.modelhost import serve

    try:
        return serve(serving[0], serving[1], serving[2] if len(serving) > 2 else None)
    except BaseException:
        logging.getLogger("backend.isolation.modelhost").exception("model process failed")
        return 1


def prepare_forks(modules: list[str]) -> None:
    """Make here, once, what each fork would make at every start: what a model process's load and first
    prediction fill (the models' template: ``priming``), and what each of this project's ``modules`` makes
    ready for the forks of a template that imported it, where it has a ``prepare_for_forks`` (the backends'
    template: gunicorn's settings, the app's routes)."""
    prime_model_processes()
    for name in modules:
        prepare = getattr(sys.modules.get(name), "prepare_for_forks", None) if name.startswith("backend.") else None
        if callable(prepare):
            prepare()


def template_main(path: str, modules: list[str], name: str = "lsb-template") -> None:
    """Listen at ``path`` first (requests wait while the imports run), import, then fork on request until the
    last owner has gone, or, if none ever came, until the process that started this one has. ``name``: what
    ps shows."""
    name_process(name)
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
    failed = {module: error for module, error in import_all(modules).items() if error}
    for module, error in failed.items():
        log.warning("template: could not import %s (%s); backends that need it import it themselves", module, error)
    prepare_forks(modules)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # asking does not initialise it
        log.error("template: an import initialised CUDA, which a fork cannot use: backends forked from here will "
                  "fail on the GPU. Leave that module out of SPARE_WARM_IMPORTS (or set FORK_BACKENDS=off).")
    freeze_imports()
    huge = share_as_huge_pages()
    server = ForkServer([], listener)
    owners: set[socket.socket] = set()
    models: dict[socket.socket, set[int]] = {}  # by the worker that asked: its model processes
    ever_owned = False

    def handle(connection: socket.socket, message: tuple, fds: list[int]) -> None:
        nonlocal ever_owned
        kind, number = message[0], message[1]
        for pids in models.values():  # forget the reaped before a fork can reuse a pid: never kill another's
            pids &= server.children
        if kind == "owner":
            owners.add(connection)
            ever_owned = True
            server.send(connection, ("owned", number, os.getpid()))  # only now: the imports are done
        elif kind == "backend" and len(fds) == 2 and (time.time() > message[4] or hung_up(connection)):
            # Its driver gave up on it and started the backend itself, or died while the imports ran (an
            # orchestrator killed mid-renewal): a backend forked now would be nobody's, and run for ever.
            for received in fds:
                os.close(received)
            server.send(connection, ("fork-failed", number, "asked for too long ago, or by a process since gone"))
        elif kind == "backend" and len(fds) == 2:
            server.fork(connection, number, fds, partial(_backend, server, fds, message[2], message[3]))
        elif kind == "model" and len(fds) in (4, 5) and hung_up(connection):
            for received in fds:  # its worker died while the imports ran: nobody would ever use it
                os.close(received)
            server.send(connection, ("fork-failed", number, "asked for by a process since gone"))
        elif kind == "model" and len(fds) in (4, 5):
            worker = process_identity(peer_pid(connection))
            pid = server.fork(connection, number, fds, partial(_model, server, fds, list(message[2]), worker))
            if pid > 0:
                models.setdefault(connection, set()).add(pid)
        else:
            for received in fds:
                os.close(received)
            server.send(connection, ("fork-failed", number, f"not a request: {kind!r} with {len(fds)} descriptors"))

    def wanted() -> bool:
        """While an owner is connected, or a process it forked lives: an orchestrator that restarts
        (or was killed) finds it again at the same socket, and what it restarts forks from here, sharing
        these pages, rather than as a new Python with copies of its own."""
        return bool(owners or server.connections or server.children)

    def closed(connection: socket.socket) -> bool:
        """A worker gone (exited, or killed outright) takes its model processes with it, as a zygote of its
        own would; a hook stuck in a call would not notice. Stop once unwanted, unless somebody is
        connecting (another process of the orchestrator may not have said yet that it owns this one)."""
        owners.discard(connection)
        for pid in models.pop(connection, set()) & server.children:  # not reaped yet: the pid is still its
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return not wanted() and not select.select([listener], [], [], 0)[0]

    log.info("template %s: ready at %s (%d modules imported, %d MiB of its memory in huge pages)", name, path,
             len(modules) - len(failed), huge >> 20)
    try:
        server.run(handle, closed, still_wanted=lambda: wanted() or (not ever_owned and os.getppid() == parent))
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    template_main(sys.argv[1], [m for m in sys.argv[2].split(",") if m], *sys.argv[3:4])
