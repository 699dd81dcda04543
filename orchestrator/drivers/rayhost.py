"""The Ray actor that hosts one backend on whichever node Ray placed it: the unchanged gunicorn backend
as its child, listening on the node's address.

This module needs only the standard library and Ray: the driver sends it to the nodes by value, so a
node needs the project checkout (for gunicorn to serve) but not this package on its Python path.

The child runs in its own session (its process group is its own to stop), started through a small
launcher that asks the kernel to SIGTERM it when the actor's process dies: a crashed actor, an OOM
kill or a node shutting down never leave a backend behind. The launcher avoids ``preexec_fn``, which
is unsafe in Ray's multi-threaded workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any

# Exec'd by a fresh Python: SIGTERM with the parent (PR_SET_PDEATHSIG = 1), and give up if the parent is
# already gone (the race between fork and prctl), then become the backend.
LAUNCHER = (
    "import ctypes,os,signal,sys;ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGTERM);"
    "os.getppid()==int(os.environ['LSB_PARENT']) or sys.exit(3);os.execv(sys.argv[1],sys.argv[1:])"
)


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def _check_paths(python: str, root: str, model_dir: str) -> None:
    """What this node must have, checked before anything starts: a clear error beats a restart loop."""
    if not os.access(python, os.X_OK):
        raise RuntimeError(f"{python} is not on this node: set RAY_BACKEND_PYTHON to the project's Python on every node")
    if not os.path.isfile(os.path.join(root, "wsgi.py")):
        raise RuntimeError(f"the project is not at {root} on this node: check it out there, or set RAY_PROJECT_ROOT")
    folder = os.path.dirname(os.path.dirname(model_dir))
    if not os.path.isdir(folder):
        raise RuntimeError(
            f"{folder} is not on this node: ORCHESTRATOR_DIR must be on storage every node mounts at the same path "
            "(a backend that moves restores its configuration from there)"
        )


class BackendHost:
    """One backend's gunicorn, on this actor's node; its address, state and log for the orchestrator."""

    def __init__(self, python: str, root: str, env: dict[str, str], log_path: str) -> None:
        """Quick (no child yet): once Ray has placed the actor, ``info`` answers within milliseconds, so a
        call that does not answer means "not placed"."""
        import ray

        self.python, self.root, self.env, self.log_path = python, root, env, log_path
        self.ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.port = _free_port(self.ip)
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a GPU-less actor: blank it, or it would see every GPU.
        self.cuda_visible_devices = ",".join(str(g) for g in ray.get_gpu_ids())
        self.child: subprocess.Popen | None = None

    def launch(self) -> int:
        """Start the backend (the driver calls this right after creating the actor; it runs once placed)."""
        _check_paths(self.python, self.root, self.env.get("MODEL_DIR", ""))
        env = {**self.env, "HOST": self.ip, "PORT": str(self.port), "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices,
               "LSB_PARENT": str(os.getpid())}
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        command = [self.python, "-c", LAUNCHER, self.python, "-m", "gunicorn", "--config",
                   "python:backend.web.gunicorn_conf", "--chdir", self.root, "wsgi:app"]
        with open(self.log_path, "ab") as log:
            self.child = subprocess.Popen(command, env=env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self.child.pid

    def info(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port, "pid": self.child.pid if self.child else None, "actor_pid": os.getpid(),
                "node_id": self.node_id, "cuda_visible_devices": self.cuda_visible_devices}

    def poll(self) -> tuple[int | None, str, int]:
        """The child's exit status (None while it runs), and where it listens."""
        return (self.child.poll() if self.child else None), self.ip, self.port

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the backend's process group, then SIGKILL what is left after ``grace_s``."""
        if self.child is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self.child.poll() is not None:
                break
            try:
                os.killpg(self.child.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while self.child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.child.poll()

    def tail(self, lines: int) -> list[str]:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 256 * max(lines, 1)))
                return handle.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def __ray_shutdown__(self) -> None:
        self.stop(grace_s=5.0)
