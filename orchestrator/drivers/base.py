"""What the orchestrator needs from whatever runs a backend: start it, check it, stop it, read its log."""

from __future__ import annotations

import socket
from typing import Protocol

from ..registry import BackendRecord

BACKEND_PORT = 9090  # inside a container; a process backend listens on its record's port


class BackendDriver(Protocol):
    """A way to run backends: ``process`` (a gunicorn child per backend) or ``docker``."""

    name: str

    def start(self, record: BackendRecord) -> str:
        """Start the backend described by ``record``; return its handle (stored in the record)."""

    def is_running(self, record: BackendRecord) -> bool:
        """Whether the thing ``record.handle`` names is still running (a restarted orchestrator asks too)."""

    def exit_reason(self, record: BackendRecord) -> str:
        """Why a backend that is no longer running stopped, as far as the driver knows."""

    def stop(self, record: BackendRecord) -> None:
        """Stop it and release what it held (port, container); idempotent."""

    def forget(self, record: BackendRecord) -> None:
        """After ``stop`` on delete: remove what outlives a restart (the container, its volume)."""

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        """Its most recent log lines."""

    def pending_reason(self, record: BackendRecord) -> str:
        """Why it is started but not placed anywhere yet ("" when it is, or when the driver never waits to place)."""

    def renewal_reason(self, record: BackendRecord) -> str:
        """Why a running backend would be better started again ("" when it would not): the supervisor then
        starts its replacement beside it and moves it there once ready (``Supervisor._renew``)."""


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as servers do, connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
