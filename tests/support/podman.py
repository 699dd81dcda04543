"""A real container engine for the docker driver's tests: podman serving the Docker API on a socket.

No image can be pulled here, so the backend image is made with ``podman import`` from an almost
empty root folder; the host's Python, its libraries and this checkout (with its virtual environment)
are bind-mounted read-only into each container through the driver's DOCKER_MOUNTS setting.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from harness.servers import ROOT, Process, ThreadedServer, wait_until

IMAGE = "localhost/lsbackend-test:latest"
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n'


class EngineUnavailable(Exception):
    """No container engine can be started on this machine; the message says why."""


def host_mounts() -> list[str]:
    """What a host-built Python needs inside a bare container, read-only, at the same paths."""
    python_home = Path(os.path.realpath(sys.executable)).parents[1]  # e.g. /root/.pyenv/versions/3.11.7
    paths = [
        p for p in ("/lib", "/lib64", "/usr/lib", "/usr/local/lib", str(python_home), str(ROOT)) if os.path.isdir(p)
    ]
    return [f"{p}:{p}:ro" for p in dict.fromkeys(paths)]


def podman_command(folder: Path) -> tuple[list[str], dict[str, str]]:
    """podman's command line and environment as this machine needs them (rootful, runc, cgroupfs, no
    default ulimits: CONTAINERS_CONF written under ``folder``)."""
    podman = shutil.which("podman")
    if podman is None:
        raise EngineUnavailable("podman is not installed (.ci/run installs it: apt-get install podman runc)")
    if os.geteuid() != 0:
        raise EngineUnavailable("the podman recipe here needs root (rootful podman with runc and cgroupfs)")
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    command = [podman, "--cgroup-manager=cgroupfs"]
    runc = shutil.which("runc")
    if runc:  # crun fails here ("cgroups in hybrid mode not supported")
        command += ["--runtime", runc]
    return command, {**os.environ, "CONTAINERS_CONF": str(conf)}


class Podman(Process):
    """``podman system service`` on a unix socket under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.global_args, env = podman_command(folder)
        self.socket = folder / "podman.sock"
        self.base_url = f"unix://{self.socket}"
        super().__init__(
            [*self.global_args, "system", "service", "--time=0", self.base_url], env, folder / "podman.log"
        )

    def start(self) -> Podman:
        import docker

        def answers() -> bool:
            try:
                return docker.DockerClient(base_url=self.base_url).ping()
            except docker.errors.DockerException:
                return False

        super().start()
        try:
            wait_until(answers, 60, "podman", self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise EngineUnavailable(f"podman did not start: {exc}; its log: {self.output()[-2000:]}") from exc
        return self

    def podman_cli(self, *args: str, data: bytes | None = None) -> str:
        done = subprocess.run([*self.global_args, *args], input=data, env=self.env, capture_output=True, timeout=300, check=False)
        if done.returncode != 0:
            raise EngineUnavailable(f"podman {args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout.decode()

    def import_backend_image(self, python: str) -> str:
        """An image whose command runs this checkout's backend with the host's Python (mounted at run time)."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in ("tmp", "data", "etc", "root", "proc", "sys", "dev"):
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
                tar.addfile(info)
            passwd = b"root:x:0:0:root:/root:/bin/sh\n"
            info = tarfile.TarInfo("etc/passwd")
            info.size = len(passwd)
            tar.addfile(info, io.BytesIO(passwd))
        command = f'["{python}", "-m", "gunicorn", "wsgi:app"]'
        self.podman_cli(
            "import",
            "--change",
            f"WORKDIR {ROOT}",
            "--change",
            f"CMD {command}",
            "--change",
            "ENV HOME=/root",
            "-",
            IMAGE,
            data=buffer.getvalue(),
        )
        return IMAGE


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def recording_proxy(socket_path: Path, seen: list[tuple[str, str, Any]]) -> ThreadedServer:
    """The engine's Docker API on a loopback TCP port (DOCKER_HOST=tcp://...), each request's method, path and
    JSON body appended to ``seen``: what a driver asked the engine for, as the engine got it."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body
            seen.append((self.command, self.path, parsed))
            upstream = _UnixConnection(str(socket_path), timeout=300)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            content = answer.read()  # de-chunked: answered with a length
            upstream.close()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    return ThreadedServer(Handler)
