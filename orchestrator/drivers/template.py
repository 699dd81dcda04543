"""The process driver's side of the templates (``backend.isolation.template``): start each once, ask for forks.

Several processes of one orchestrator (gunicorn workers) share each template: its socket sits in the
state folder, and whoever finds none answering starts it, under a lock. Each stays connected as an
owner; the template ends when the last one has gone and none of its forks lives. An orchestrator
restarted while its backends run connects to it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from backend.isolation.forking import ForkClient, ForkUnavailable, describe_exit, environment_fd, peer_pid
from backend.isolation.template import PROTOCOL

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
RETRY_START_S = 60.0  # a template that did not start is not started again before this


def socket_path(state_dir: Path, stem: str = "template") -> Path:
    """A template's socket (``stem``.v``PROTOCOL``.sock): in the state folder, or where that path is too long
    for a socket, in a folder of this user's alone under the temporary folder, named by the state folder. An
    upgraded orchestrator starts templates of its own beside those an older one left serving its backends
    (which are then renewed), rather than asking them what they never answer."""
    wanted = state_dir.resolve() / f"{stem}.v{PROTOCOL}.sock"
    if len(os.fsencode(wanted)) <= SOCKET_PATH_MAX:
        return wanted
    private = Path(tempfile.gettempdir()) / f"lsbackend-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ForkUnavailable(f"{private} is not this user's alone, so the template's socket cannot live there")
    return private / f"{hashlib.sha256(os.fsencode(wanted)).hexdigest()[:16]}.sock"


class BackendTemplate:
    """A connection to a template of the orchestrator whose state is in ``state_dir`` (its files named by
    ``stem``, its process by ``name``); where none answers, this starts it with ``env`` (no credentials:
    every fork shares its memory) and ``modules``."""

    def __init__(
        self, state_dir: Path, env: Mapping[str, str], modules: tuple[str, ...], cwd: Path, wait_s: float,
        stem: str = "template", name: str = "lsb-template",
    ) -> None:
        self.state_dir = state_dir
        self.stem, self.name = stem, name
        self.path = socket_path(state_dir, stem)
        self.env = dict(env)
        self.modules = modules
        self.cwd = cwd
        self.wait_s = wait_s
        self._client: ForkClient | None = None
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self._proc: subprocess.Popen | None = None
        self._failed_at = float("-inf")  # when a start last failed: not tried again for RETRY_START_S
        self._connecting = threading.Lock()  # held by the one ``connect_soon`` thread under way

    def spawn(self, env: Mapping[str, str], log_fd: int, argv: list[str], cwd: Path) -> int:
        """A backend forked from the template: ``argv`` as gunicorn's command line, ``env`` its environment,
        its output to ``log_fd``; its pid. The template waits for its imports before it forks."""
        client = self.connect()
        env_fd = environment_fd(env)
        try:
            # The deadline: where the answer comes too late, the driver starts the backend itself, and the
            # template must not start a second one when it gets to the request.
            pid = client.fork("backend", (argv, str(cwd), time.time() + self.wait_s), [env_fd, log_fd], self.wait_s)
        finally:
            os.close(env_fd)
        client.on_exit(pid, partial(self._exits.__setitem__, pid))
        return pid

    def exit_reason(self, pid: int) -> str:
        """How a backend it forked ended, where the template told ("" where it did not)."""
        status = self._exits.get(pid)
        return "" if status is None else describe_exit(status)

    def running_pid(self) -> int:
        """The template's pid where this process is connected to it now, else 0; never starts one, nor waits
        behind a start (the memory reads ask)."""
        client = self._client
        if client is None or not client.live():
            return 0
        try:
            return peer_pid(client.sock)
        except OSError:  # closed by its reader meanwhile
            return 0

    def connect_soon(self) -> None:
        """``connect`` in a thread of its own, where not connected yet: for a caller that must not wait for
        the imports (the supervisor's pass), which asks ``running_pid`` again on its next pass."""
        if self.running_pid() or not self._connecting.acquire(blocking=False):
            return

        def connect() -> None:
            try:
                self.connect()
            except ForkUnavailable as exc:
                log.warning("template %s: %s", self.name, exc)
            finally:
                self._connecting.release()

        threading.Thread(target=connect, name=f"{self.name}-connect", daemon=True).start()

    def connect(self) -> ForkClient:
        """The connection to the template, as one of its owners, once it has imported what it imports: a
        backend forked before then would spend its configure's CONFIGURE_WAIT_S waiting for them (MLflow's
        and scikit-learn's, on a cold disk, take 20 s). Started here where none answers (but not again within
        RETRY_START_S of one that failed, or whose imports did not end within ``wait_s``: meanwhile backends
        start as new Pythons at once, rather than each waiting for it again)."""
        with self._lock:
            if self._client is not None:
                if self._client.live():
                    return self._client
                self._client.close()  # gone, whether or not its reader has noticed yet
            if time.monotonic() - self._failed_at < RETRY_START_S:
                raise ForkUnavailable(f"the template {self.name} failed less than {RETRY_START_S:g} s ago (it did not "
                                      f"start, or not import its modules); {self.state_dir / f'{self.stem}.log'} says why")
            sock = self._connect()
            if sock is None:
                with open(self.state_dir / f"{self.stem}.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # one of this orchestrator's processes starts it
                    try:
                        sock = self._connect() or self._start()
                    except ForkUnavailable:
                        self._failed_at = time.monotonic()
                        raise
            client = ForkClient(sock, "template-reader", forks_die_with_server=False)
            try:
                client.request("owner", (), (), self.wait_s)
            except ForkUnavailable as exc:
                client.close()
                self._failed_at = time.monotonic()
                raise ForkUnavailable(f"the template {self.name} did not import its modules ({exc}); "
                                      f"{self.state_dir / f'{self.stem}.log'} says why") from exc
            self._client = client
            return client

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(self.path))
            return sock
        except OSError:
            sock.close()
            return None

    def _start(self) -> socket.socket:
        """Start the template and connect as soon as it listens (it binds before it imports)."""
        log_file = self.state_dir / f"{self.stem}.log"
        with open(log_file, "ab") as output:
            self._proc = proc = subprocess.Popen(
                [sys.executable, "-m", "backend.isolation.template", str(self.path), ",".join(self.modules), self.name],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the terminal's group: Ctrl-C is the orchestrator's to handle
            )
        log.info("template %s: started (pid %s), importing %s", self.name, proc.pid, ", ".join(self.modules))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and proc.poll() is None:
            sock = self._connect()
            if sock is not None:
                return sock
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise ForkUnavailable(f"the template {self.name} did not listen at {self.path} ({log_file} says why)")

