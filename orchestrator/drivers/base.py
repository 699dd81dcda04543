"""What the orchestrator needs from whatever runs a backend: start it, check it, stop it, read its log."""

from __future__ import annotations

import socket
from dataclasses import dataclass
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

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        """What each of these running backends holds, by id, for the memory budgets (those the driver
        cannot measure are left out)."""

    def overhead(self) -> int:
        """Bytes the driver holds for the backends whatever runs (the process driver's template, at its RSS:
        every page it maps, as if no fork shared them)."""

    def measure(self, records: list[BackendRecord]) -> tuple[dict[str, Memory], int]:
        """``memory`` of these backends and, from the same reads, the PSS of everything the driver runs for
        them, each process once, the process driver's template included (what /backends shows, and what
        the supervisor checks MEMORY_BUDGET against)."""


@dataclass(frozen=True)
class Memory:
    """A backend's memory: PSS of its processes (a page shared by n processes counts 1/n to each); the
    private part of it (pages no other process maps: what stopping it frees, and what starting it again
    adds); and, where it has a GPU, what its processes hold there."""

    pss: int
    private: int = 0
    gpu: int = 0


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
