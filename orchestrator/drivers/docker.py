"""Backends as containers of the project's image, through the docker SDK (Docker or podman's API).

Each container is named ``lsbackend-<id>``, labelled, publishes the backend's port on loopback only
(or, on the host's network, listens on its own loopback port), keeps MODEL_DIR on a named volume (so a
restarted container restores its configuration), and gets a GPU device request when it was assigned one.
The spec is a plain dict, testable without an engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from backend.core.errors import UpstreamUnavailable
from backend.core.settings import BACKEND_ENVIRONMENT

from ..registry import BackendRecord
from ..settings import OrchestratorSettings
from .base import BACKEND_PORT, Memory

LABEL = "io.lsbackend"
# Passed on from the orchestrator's environment when set (a process backend inherits them anyway).
PASSED_ON = BACKEND_ENVIRONMENT
CONTAINER_MODEL_DIR = "/data/model_dir"


def container_name(record: BackendRecord) -> str:
    return f"lsbackend-{record.id}"


def volume_name(record: BackendRecord) -> str:
    return f"lsbackend-{record.id}-data"


def _mount(spec: str) -> tuple[str, dict[str, str]]:
    host, _, rest = spec.partition(":")
    target, _, mode = rest.partition(":")
    if not host or not target:
        raise ValueError(f"DOCKER_MOUNTS entries are host:container[:ro], got {spec!r}")
    return host, {"bind": target, "mode": mode or "rw"}


class DockerDriver:
    """One container per backend, driven through the docker SDK."""

    name = "docker"

    def __init__(self, settings: OrchestratorSettings, client_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self._client_factory = client_factory or self._default_client
        self._client: Any = None

    def _default_client(self) -> Any:
        import docker  # imported only when the docker driver is used

        if self.settings.docker_base_url:
            return docker.DockerClient(base_url=self.settings.docker_base_url)
        return docker.from_env()

    @property
    def client(self) -> Any:
        if self._client is None:
            from docker.errors import DockerException

            try:
                self._client = self._client_factory()
            except DockerException as exc:
                raise self._engine_failed(exc) from exc
        return self._client

    def _engine_failed(self, exc: Exception) -> UpstreamUnavailable:
        where = self.settings.docker_base_url or "the default Docker socket"
        return UpstreamUnavailable(
            f"the container engine at {where} failed: {exc}",
            "Check DOCKER_HOST, that the engine runs, that the orchestrator's user may use its socket (the docker "
            f"group, or the socket's group with --group-add in a container) and that {self.settings.docker_image} "
            "is one of its images.",
        )

    def container_spec(self, record: BackendRecord) -> dict[str, Any]:
        """Keyword arguments for ``client.containers.run``: everything about the container, in one place."""
        from docker.types import DeviceRequest

        volumes = {volume_name(record): {"bind": "/data", "mode": "rw"}}
        volumes.update(_mount(m) for m in self.settings.docker_mounts)
        spec: dict[str, Any] = {
            "image": self.settings.docker_image,
            "name": container_name(record),
            "detach": True,
            "labels": {LABEL: "backend", f"{LABEL}.id": record.id, f"{LABEL}.model": record.model.get("model_uri", "")},
            "environment": {
                **{name: os.environ[name] for name in PASSED_ON if os.environ.get(name)},
                "HOST": "0.0.0.0",  # inside the container; the port is published on the host's loopback only
                "PORT": str(BACKEND_PORT),
                "MODEL_DIR": CONTAINER_MODEL_DIR,
                "CONFIGURE_TOKEN": record.token,  # required: the container listens beyond its own loopback
                "THREADS": str(self.settings.backend_threads),
                "PYTHONUNBUFFERED": "1",
            },
            "ports": {f"{BACKEND_PORT}/tcp": ("127.0.0.1", record.port)},
            "volumes": volumes,
        }
        network = self.settings.docker_network
        if network == "host":  # the host's loopback (an orchestrator in a container on it too): nothing to publish
            spec["network_mode"] = "host"
            spec["environment"].update(HOST="127.0.0.1", PORT=str(record.port))
            del spec["ports"]
        elif network:
            spec["network"] = network
        if record.spare:
            spec["environment"]["WARM_IMPORTS"] = self.settings.spare_warm_imports
        if record.gpu:
            spec["environment"]["NVIDIA_VISIBLE_DEVICES"] = record.gpu
            spec["device_requests"] = [DeviceRequest(device_ids=[record.gpu], capabilities=[["gpu"]])]
        return spec

    def _container(self, record: BackendRecord) -> Any | None:
        from docker.errors import NotFound

        try:
            return self.client.containers.get(record.handle or container_name(record))
        except NotFound:
            return None

    def start(self, record: BackendRecord) -> str:
        from docker.errors import DockerException

        try:
            old = self._container(record)
            if old is not None:  # a dead container of this backend: replace it, keeping the volume
                old.remove(force=True)
            return self.client.containers.run(**self.container_spec(record)).id
        except DockerException as exc:  # no engine, no image, a refused request: a 502 that says which
            raise self._engine_failed(exc) from exc

    def is_running(self, record: BackendRecord) -> bool:
        container = self._container(record)
        return container is not None and container.status == "running"

    def exit_reason(self, record: BackendRecord) -> str:
        container = self._container(record)
        if container is None:
            return "the container is gone"
        state = container.attrs.get("State", {})
        return f"container {state.get('Status', container.status)}, exit code {state.get('ExitCode')}"

    def stop(self, record: BackendRecord) -> None:
        container = self._container(record)
        if container is not None and container.status == "running":
            container.stop(timeout=10)

    def forget(self, record: BackendRecord) -> None:
        from docker.errors import NotFound

        container = self._container(record)
        if container is not None:
            container.remove(force=True)
        try:
            self.client.volumes.get(volume_name(record)).remove(force=True)
        except NotFound:
            pass

    def pending_reason(self, record: BackendRecord) -> str:
        return ""  # started is placed

    def renewal_reason(self, record: BackendRecord) -> str:
        return ""  # a container shares nothing with the others that a restart would give back

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        """Each container's memory as its cgroup counts it, less the page cache it could drop: containers
        share no pages with each other, so this is what PSS would be."""
        measured = {}
        for record in records:
            container = self._container(record)
            if container is None or container.status != "running":
                continue
            try:
                stats = container.stats(stream=False, one_shot=True).get("memory_stats") or {}
            except Exception:  # noqa: BLE001, S112 - an engine without stats: the budget cannot see this one
                continue
            usage = int(stats.get("usage") or 0)
            cache = int((stats.get("stats") or {}).get("inactive_file") or 0)
            if usage:
                held = max(usage - cache, 0)
                measured[record.id] = Memory(pss=held, private=held)
        return measured

    def overhead(self) -> int:
        return 0  # the engine's own memory is not the orchestrator's to budget

    def measure(self, records: list[BackendRecord]) -> tuple[dict[str, Memory], int]:
        measured = self.memory(records)
        return measured, sum(memory.pss for memory in measured.values())  # containers share no pages

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        from docker.errors import DockerException

        try:
            container = self._container(record)
            return [] if container is None else container.logs(tail=lines).decode(errors="replace").splitlines()
        except (DockerException, UpstreamUnavailable) as exc:  # asked while saying why it stopped: never worse
            return [f"(no log: {exc})"]
