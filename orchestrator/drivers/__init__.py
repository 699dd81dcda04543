"""Ways to run a backend; the settings pick one."""

from __future__ import annotations

from ..settings import OrchestratorSettings
from .base import BackendDriver, free_port, port_is_free
from .docker import DockerDriver
from .process import ProcessDriver

__all__ = ["BackendDriver", "DockerDriver", "ProcessDriver", "free_port", "make_driver", "port_is_free"]


def make_driver(settings: OrchestratorSettings) -> BackendDriver:
    if settings.driver == "ray":
        from .raydriver import RayDriver  # Ray is imported by this driver only

        return RayDriver(settings)
    return DockerDriver(settings) if settings.driver == "docker" else ProcessDriver(settings)
