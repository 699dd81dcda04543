"""Real servers: gunicorn backends, the orchestrator, `mlflow server`, a file server and a path-prefix proxy.

Readiness is always polled with a deadline; nothing waits a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: bound here, never listened on, so no
    other server of the run (under pytest-xdist, another worker's) can take it, as one can a free_port()."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check`` until it is true or the deadline passes (or ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout}s")


def stop_group(pid: int, timeout: float = 15) -> None:
    """Stop the process group that ``pid`` leads though it is not our child (a server another test process
    started): SIGTERM, then SIGKILL if it is still there after ``timeout``."""

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        return state in ("Z", "X")  # its parent is gone too: nobody reaps it but init

    try:
        os.killpg(pid, signal.SIGTERM)
        wait_until(gone, timeout, f"process group {pid} to stop")
    except ProcessLookupError:
        return
    except TimeoutError:
        os.killpg(pid, signal.SIGKILL)


class Process:
    """A child process with its log file, stopped on ``stop()``."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.args, self.env, self.log_path, self.cwd = args, env, log_path, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - the child's output, closed in stop()
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BASIC_AUTH", "CONFIGURE_TOKEN", "LABEL_STUDIO"))}
    env.update(
        PATH=f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        PYTHONUNBUFFERED="1",
        GRACEFUL_TIMEOUT="3",  # tests stop many backends; gthread may wait the whole grace on an idle connection
    )
    env.update(extra)
    return env


class Backend(Process):
    """``gunicorn wsgi:app`` on a free loopback port."""

    def __init__(self, tmp: Path, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = tmp / "model_dir"
        env = base_env(MODEL_DIR=str(self.model_dir), PORT=str(self.port), HOST="127.0.0.1", **env)
        super().__init__([str(PYTHON_BIN / "gunicorn"), "wsgi:app"], env, tmp / f"backend-{self.port}.log")

    def start(self) -> Backend:
        super().start()
        wait_until(lambda: requests.get(self.url + "/health", timeout=1).ok, 30, "backend", self.proc)
        return self

    def wait_configured(self, timeout: float = 60) -> dict:
        wait_until(lambda: requests.get(self.url + "/health", timeout=1).json()["configured"], timeout, "configured", self.proc)
        return requests.get(self.url + "/health", timeout=1).json()


class OrchestratorProcess(Process):
    """``flask --app orchestrator run`` on a free loopback port, its state in ``state_dir``; with ``workers``,
    gunicorn with that many worker processes instead, as in production."""

    def __init__(self, state_dir: Path, env: dict[str, str], port: int | None = None, workers: int = 0,
                 python_bin: Path = PYTHON_BIN) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        env = base_env(**{"ORCHESTRATOR_DIR": str(state_dir), "SUPERVISE_EVERY_S": "0.2", "MAX_BACKOFF_S": "2",
                          "WARM_SPARES": "0", **env})  # spares only where a test asks for them
        env["PATH"] = f"{python_bin}{os.pathsep}{env['PATH']}"  # python_bin: another environment's (the zoo's)
        args = [str(python_bin / "flask"), "--app", "orchestrator", "run", "--port", str(self.port)]
        if workers:
            args = [str(python_bin / "gunicorn"), "-w", str(workers), "--threads", "4", "-b",
                    f"127.0.0.1:{self.port}", "orchestrator:create_app()"]
        super().__init__(args, env, state_dir.parent / f"orchestrator-{self.port}.log")

    def start(self) -> OrchestratorProcess:
        super().start()
        wait_until(lambda: requests.get(self.url + "/health", timeout=1).ok, 30, "orchestrator", self.proc)
        return self

    def backends(self) -> dict[str, dict]:
        listed = requests.get(self.url + "/backends", timeout=5).json()["backends"]
        return {b["id"]: b for b in listed}

    def remove_all(self) -> None:
        """Delete every backend it runs (they outlive the orchestrator process by design)."""
        for backend_id in self.backends():
            requests.delete(f"{self.url}/backends/{backend_id}", timeout=60)

    def kill_leftovers(self) -> None:
        """After ``stop``: kill every process backend its registry still names (spares included)."""
        db = self.state_dir / "registry.db"
        if not db.exists():
            return
        with closing(sqlite3.connect(db)) as connection:
            rows = connection.execute("SELECT record FROM backends").fetchall()
        for (raw,) in rows:
            pid = json.loads(raw)["handle"].partition(":")[0]
            if pid.isdigit():
                try:
                    os.killpg(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


class MlflowServer(Process):
    """The real ``mlflow server`` CLI on loopback, with proxied artifacts."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            str(PYTHON_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "server-artifacts"),
        ]
        super().__init__(args, base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), tmp / "mlflow-server.log")

    def start(self) -> MlflowServer:
        super().start()
        wait_until(lambda: requests.get(self.url + "/health", timeout=1).ok, 60, "mlflow server", self.proc)
        return self


class _Quiet(SimpleHTTPRequestHandler):
    delay = 0.0

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connects from 16 parallel downloads: 1 s SYN retries
    daemon_threads = True


class ThreadedServer:
    """A ThreadingHTTPServer on a free loopback port in a daemon thread."""

    def __init__(self, handler, port: int = 0) -> None:
        self.server = _Server(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawServer:
    """A TCP server on a free loopback port whose ``respond(connection)`` writes whatever bytes it likes,
    as slowly as it likes: for servers that misbehave (trickling, never answering). Each connection
    runs in its own daemon thread."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(32)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.respond = respond
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                self.respond(connection)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def trickling(head: bytes, every_s: float) -> Callable[[socket.socket], None]:
    """A RawServer answer: ``head``, then one byte every ``every_s``, for minutes."""

    def respond(connection: socket.socket) -> None:
        connection.sendall(head)
        for _ in range(600):
            connection.sendall(b"x")
            time.sleep(every_s)  # the server's behaviour under test, not a wait for it

    return respond


def file_server(directory: Path, delay: float = 0.0, seen: list | None = None, port: int = 0) -> ThreadedServer:
    """Serve ``directory`` (on ``port``, or a free one); optionally add ``delay`` per file and record request headers."""

    class Handler(_Quiet):
        protocol_version = "HTTP/1.1"  # keep-alive, as Label Studio's and cloud storage's file servers
        disable_nagle_algorithm = True  # headers and body go in two writes: Nagle would hold the body 40 ms

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            if seen is not None:
                seen.append((self.path, dict(self.headers)))
            if delay:
                time.sleep(delay)
            super().do_GET()

    return ThreadedServer(Handler, port)


def prefix_proxy(prefix: str, upstream: str) -> ThreadedServer:
    """Serve ``upstream`` under ``prefix``, as DagsHub serves a repo's MLflow at /<owner>/<repo>.mlflow."""

    class Handler(_Quiet):
        def _forward(self):
            if not self.path.startswith(prefix):
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            upstream_response = requests.request(self.command, upstream + self.path[len(prefix):], data=body, headers=headers, timeout=60)
            self.send_response(upstream_response.status_code)
            for key, value in upstream_response.headers.items():
                if key.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(upstream_response.content)))
            self.end_headers()
            self.wfile.write(upstream_response.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    return ThreadedServer(Handler)


def register_trainable(tracking_uri: str, *names: str, flavor: str = "sklearn") -> None:
    """Version 1 of a sentiment model that has it backwards, @champion, under each name (in one child process);
    ``flavor``: "sklearn" or "transformers"."""
    args = [sys.executable, "-m", "examples.models", tracking_uri, "--trainable", ",".join(names)]
    args += ["--transformers"] if flavor == "transformers" else []
    subprocess.run(args, cwd=ROOT, env=base_env(), check=True, capture_output=True)


def register_models(tracking_uri: str, with_torch: bool = True) -> None:
    """Train and register the fixture models in a child process (MLflow state stays out of ours)."""
    args = [sys.executable, "-m", "examples.models", tracking_uri] + ([] if with_torch else ["--no-torch"])
    subprocess.run(args, cwd=ROOT, env=base_env(), check=True, capture_output=True)
