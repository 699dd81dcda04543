"""The ``ray`` driver: each backend is a detached, named Ray actor (``lsbackend-<id>``) that runs the
unchanged gunicorn backend on the node Ray placed it on (``rayhost``).

Ray does what would otherwise be written here: placement by resources (``BACKEND_GPUS`` or a
configure's ``gpus``, one ``RAY_BACKEND_RESOURCE`` slot per backend, spread or node labels), node
failure detection, and actors that outlive the orchestrator (re-adopted by name after a restart).
Restarts stay the supervisor's (``max_restarts=0``): one policy, with its backoff and ``last_error``,
whatever the driver. A backend Ray cannot place yet is *pending*, with the missing resource named.

Ray is imported only here, and connected lazily with a deadline: ``ray.init`` to an address where no
cluster answers retries for minutes, and in the main thread it would take over SIGTERM.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from backend.core.errors import UpstreamUnavailable

from ..registry import BackendRecord
from ..settings import OrchestratorSettings
from . import rayhost
from .base import Memory
from .process import PROJECT_ROOT, backend_environment, log_path, tail

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 2.0  # one actor call from the supervisor's pass; a slower answer counts as busy, not dead
PLACE_WAIT_S = 10.0  # how long start waits for Ray to place the actor when the resources are free
STOP_TIMEOUT_S = 30.0
PLACED_PROBE_S = 1.0  # an actor that does not answer info() within this is not placed


def actor_name(record: BackendRecord) -> str:
    return f"lsbackend-{record.id}"


def wanted_gpus(settings: OrchestratorSettings, record: BackendRecord) -> int:
    """The configure's ``gpus``, else BACKEND_GPUS; a spare takes none."""
    if record.spare:
        return 0
    gpus = record.model.get("gpus")
    return settings.backend_gpus if gpus is None else int(gpus)


def actor_options(settings: OrchestratorSettings, record: BackendRecord) -> dict[str, Any]:
    """The actor's Ray options: detached and named, so it outlives the orchestrator and is found again."""
    options: dict[str, Any] = {
        "name": actor_name(record),
        "namespace": settings.ray_namespace,
        "lifetime": "detached",
        "max_restarts": 0,
        "num_cpus": 0,  # Ray does not meter the gunicorn child: capacity is the backend resource below
        "num_gpus": wanted_gpus(settings, record),
    }
    if settings.ray_backend_resource:
        options["resources"] = {settings.ray_backend_resource: 1}
    if settings.ray_node_labels:
        options["label_selector"] = dict(settings.ray_node_labels)
    elif settings.ray_spread:
        options["scheduling_strategy"] = "SPREAD"
    return options


def connect(settings: OrchestratorSettings) -> Any:
    """``ray`` attached to RAY_ADDRESS, or an UpstreamUnavailable that says what is wrong and what to do."""
    import ray

    address = settings.ray_address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UpstreamUnavailable(f"RAY_ADDRESS {address!r} is not host:port",
                                  "Set it to the head node's GCS address, e.g. 10.0.0.5:6379 (`ray status` shows it).")
    try:
        socket.create_connection((host, int(port)), timeout=settings.ray_connect_timeout_s).close()
    except OSError as exc:
        raise UpstreamUnavailable(f"no Ray cluster answers at {address}: {exc}",
                                  "Start the head node (`ray start --head`) or fix RAY_ADDRESS.") from None
    outcome: dict[str, Any] = {}

    def attach() -> None:  # in a thread: ray.init has no deadline of its own, and must not own SIGTERM
        try:
            ray.init(address=address, namespace=settings.ray_namespace, log_to_driver=False,
                     ignore_reinit_error=True, configure_logging=False)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - named below
            outcome["error"] = exc

    thread = threading.Thread(target=attach, name="ray-connect", daemon=True)
    thread.start()
    thread.join(settings.ray_connect_timeout_s)
    if "error" in outcome:
        error = outcome["error"]
        fix = (f"Run the orchestrator with the cluster's Ray and Python (here: Ray {ray.__version__}, Python "
               f"{sys.version.split()[0]}): pin the same `ray==` on every node." if "ersion mismatch" in str(error)
               else "Check RAY_ADDRESS and the cluster's health (`ray status`).")
        raise UpstreamUnavailable(f"could not attach to the Ray cluster at {address}: {error}", fix)
    if not outcome.get("ok"):
        raise UpstreamUnavailable(f"attaching to the Ray cluster at {address} took over {settings.ray_connect_timeout_s:g} s",
                                  "Check that the address is the head's GCS port and that the cluster is healthy.")
    return ray


class RayDriver:
    """Backends as detached actors on a Ray cluster."""

    name = "ray"

    def __init__(self, settings: OrchestratorSettings) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ValueError("ORCHESTRATOR_DRIVER=ray needs the ray package: pip install 'ray==<your cluster's version>'")
        if not settings.ray_address:
            raise ValueError("ORCHESTRATOR_DRIVER=ray needs RAY_ADDRESS, the head node's host:port")
        # Imported now, before the orchestrator registers its exit handler: Ray's own (which disconnects)
        # then runs after it, and the backends can still be stopped or listed at exit.
        importlib.import_module("ray")
        self.settings = settings
        self._ray: Any = None
        self._host_class: Any = None
        self._lock = threading.Lock()
        self._actors: dict[str, Any] = {}
        self._placed: set[str] = set()
        self._ended: dict[str, str] = {}  # actor name -> why it is no longer running

    def ray(self) -> Any:
        with self._lock:
            if self._ray is None:
                self._ray = connect(self.settings)
                self._ray.cloudpickle.register_pickle_by_value(rayhost)  # nodes need not import this package
                self._host_class = self._ray.remote(rayhost.BackendHost)
            return self._ray

    def _actor(self, name: str) -> Any:
        actor = self._actors.get(name)
        if actor is None:
            try:
                actor = self.ray().get_actor(name, namespace=self.settings.ray_namespace)
            except ValueError:
                return None
            self._actors[name] = actor
        return actor

    def _kill(self, name: str) -> None:
        actor = self._actor(name)
        self._actors.pop(name, None)
        self._placed.discard(name)
        if actor is not None:
            try:
                self.ray().kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already gone
                log.debug("killing actor %s: %s", name, exc)

    def _note_placed(self, record: BackendRecord, info: dict[str, Any]) -> None:
        record.host, record.port, record.gpu = info["ip"], int(info["port"]), info["cuda_visible_devices"]
        self._placed.add(actor_name(record))

    def start(self, record: BackendRecord) -> str:
        ray = self.ray()
        name = actor_name(record)
        self._kill(name)  # a leftover of an earlier start
        self._ended.pop(name, None)
        env = {k: v for k, v in backend_environment(self.settings, record).items() if k != "CUDA_VISIBLE_DEVICES"}
        python = self.settings.ray_backend_python or sys.executable
        root = self.settings.ray_project_root or str(PROJECT_ROOT)
        missing = self.missing_resources(record)  # before the actor claims anything: its own claim is not a lack
        actor = self._host_class.options(**actor_options(self.settings, record)).remote(
            python, root, env, str(log_path(record)))
        self._actors[name] = actor
        launched = actor.launch.remote()  # runs once Ray has placed the actor
        record.port = 0  # where it listens is known once Ray placed it
        try:
            ray.get(launched, timeout=1.0 if missing else PLACE_WAIT_S)
            self._note_placed(record, ray.get(actor.info.remote(), timeout=CALL_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            log.info("backend %s: waiting for Ray to place it: %s", record.id, self.missing_resources(record) or "scheduling")
        except ray.exceptions.RayTaskError as exc:  # the node lacks the shared folder, the checkout or the Python
            self._kill(name)
            self._ended[name] = _cause(exc)
        except ray.exceptions.RayActorError as exc:
            self._ended[name] = _first_line(exc)
        return name

    def is_running(self, record: BackendRecord) -> bool:
        ray = self.ray()
        name = record.handle or actor_name(record)
        actor = self._actor(name)
        if actor is None:
            self._ended.setdefault(name, "its Ray actor is gone (deleted, or its node died)")
            return False
        try:
            code, ip, port = ray.get(actor.poll.remote(), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            return True  # not placed yet, or busy: alive as far as Ray knows
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as exc:
            self._ended[name] = _first_line(exc)
            self._actors.pop(name, None)
            self._placed.discard(name)
            return False
        if code is not None:
            self._ended[name] = f"the backend exited with code {code}" if code >= 0 else f"the backend was killed by signal {-code}"
            return False
        if name not in self._placed or (record.host, record.port) != (ip, port):
            record.host, record.port = ip, int(port)
            self._placed.add(name)
        return True

    def missing_resources(self, record: BackendRecord) -> str:
        """Which resource the cluster lacks for this backend now, in words; "" when it has them all."""
        ray = self.ray()
        wanted = {"GPU": float(wanted_gpus(self.settings, record))}
        if self.settings.ray_backend_resource:
            wanted[self.settings.ray_backend_resource] = 1.0
        total, free = ray.cluster_resources(), ray.available_resources()
        for resource, amount in wanted.items():
            if amount and total.get(resource, 0.0) < amount:
                hint = (f" (start worker nodes with --resources='{{\"{resource}\": 4}}')"
                        if resource == self.settings.ray_backend_resource else "")
                return f"no node of the cluster has {amount:g} {resource}{hint}"
            if amount and free.get(resource, 0.0) < amount:
                return f"no {resource} is free: {amount:g} wanted, {free.get(resource, 0.0):g} of {total[resource]:g} free"
        return ""

    def renewal_reason(self, record: BackendRecord) -> str:
        return ""  # an actor on its node shares nothing with the others that a restart would give back

    def pending_reason(self, record: BackendRecord) -> str:
        """Why Ray has not placed the backend, or "" once it has (or when it is gone: is_running says so)."""
        name = record.handle or actor_name(record)
        if name in self._placed or name in self._ended:
            return ""
        actor = self._actor(name)
        if actor is None:
            return ""
        ray = self.ray()
        try:  # a placed actor answers in milliseconds (its __init__ starts nothing)
            self._note_placed(record, ray.get(actor.info.remote(), timeout=PLACED_PROBE_S))
            return ""
        except ray.exceptions.GetTimeoutError:
            return self.missing_resources(record) or "waiting for Ray to place it"
        except ray.exceptions.RayActorError as exc:
            self._ended[name] = _first_line(exc)
            return ""

    def exit_reason(self, record: BackendRecord) -> str:
        return self._ended.get(record.handle or actor_name(record), "its Ray actor is gone (deleted, or its node died)")

    def stop(self, record: BackendRecord) -> None:
        name = record.handle or actor_name(record)
        actor = self._actor(name)
        if actor is not None and (name in self._placed or not self.pending_reason(record)):  # else nothing runs yet
            ray = self.ray()
            try:
                ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - dead or unreachable: killing the actor ends the child (PDEATHSIG)
                log.info("backend %s: its actor did not stop the backend (%s); killing the actor", record.id, _first_line(exc))
        self._kill(name)

    def forget(self, record: BackendRecord) -> None:
        """Nothing outlives a killed actor but the backend's folder, which the manager removes."""

    def memory(self, records: list[BackendRecord]) -> dict[str, Memory]:
        return {}  # on the cluster's nodes: Ray's own scheduling keeps what fits there

    def overhead(self) -> int:
        return 0

    def measure(self, records: list[BackendRecord]) -> tuple[dict[str, Memory], int]:
        return {}, 0

    def logs(self, record: BackendRecord, lines: int = 50) -> list[str]:
        """From the actor, on its node; else from the log file (on the shared ORCHESTRATOR_DIR)."""
        actor = self._actor(record.handle or actor_name(record))
        if actor is not None:
            try:
                return self.ray().get(actor.tail.remote(lines), timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - fall back to the file
                log.debug("logs of %s from its actor: %s", record.id, exc)
        return tail(Path(log_path(record)), lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    """What a method raised on the node, without Ray's wrapping."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else _first_line(exc)
