"""Resolve a ModelSpec to concrete MLflow artifacts and load them once, on the right device.

URIs: ``models:/name/<version>``, ``models:/name/latest`` (resolved to the newest version, so the
served version is stable and visible), ``models:/name@alias``, ``runs:/<run>/<path>``, any other
MLflow artifact URI, or a local path. Loaders: ``pyfunc`` (default) or ``native``: the model's own
flavor as named by its ``python_function.loader_module``, as the dagshub client loads it; a torch
model's ``predict`` is then the module's ``__call__``.

MLflow keeps its tracking URI and credentials in process-wide state, so loads are serialised by one
lock and that state is set only for the duration of a load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.config.spec import ModelSpec
from backend.config.uris import MODELS_URI
from backend.core.errors import BackendError, NotFound, RegistryUnreachable, UpstreamUnavailable

log = logging.getLogger(__name__)

_MLFLOW_LOCK = threading.Lock()  # guards MLflow's process-wide URI and credential state
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/(?P<path>.*))?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned down: what to download, and the name/version to show."""

    uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""

    @property
    def label(self) -> str:
        """A stable, readable version string for Label Studio (``name:3``, ``run:abc123``, ``path``)."""
        if self.name:
            return f"{self.name}:{self.version}"
        if self.run_id:
            return f"run:{self.run_id[:12]}"
        return Path(self.uri.rstrip("/")).name or self.uri


@dataclass
class LoadedModel:
    """A loaded model and the one callable the pipeline uses."""

    predict: Callable[[Any], Any]
    native: Any
    flavor: str
    resolved: ResolvedModel
    local_path: str
    device: str
    load_seconds: float
    offline: str = ""  # why it was loaded from the copy downloaded before, without the registry

    def info(self) -> dict[str, Any]:
        """What the worker needs to know of a model loaded in the model process."""
        shown: dict[str, Any] = {
            "label": self.resolved.label,
            "uri": self.resolved.uri,
            "flavor": self.flavor,
            "device": self.device,
            "load_seconds": self.load_seconds,
        }
        if self.offline:
            shown["offline"] = self.offline
        return shown


@contextlib.contextmanager
def mlflow_scope(spec: ModelSpec) -> Iterator[Any]:
    """Point MLflow at the spec's tracking server with its credentials, then put everything back."""
    import mlflow
    from mlflow.tracking import MlflowClient

    env: dict[str, str | None] = {
        "MLFLOW_TRACKING_USERNAME": spec.tracking_username,
        "MLFLOW_TRACKING_PASSWORD": spec.tracking_password,
        "MLFLOW_TRACKING_TOKEN": spec.tracking_token,
        # Fail fast on an unreachable server instead of MLflow's default minutes of retries.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
    }
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    with _MLFLOW_LOCK:
        # As they were, unset included: MLflow's setters also write MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI,
        # and a registry URI put back by value would pin every later client (hooks check runs in its caller).
        saved_env = {key: os.environ.get(key) for key in (*env, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved_tracking, saved_registry = tracking_state._tracking_uri, registry_state._registry_uri
        try:
            for key, value in env.items():
                if value:
                    os.environ[key] = value
                else:
                    os.environ.pop(key, None)
            tracking = spec.tracking_uri or mlflow.get_tracking_uri()
            registry = spec.registry_uri or spec.tracking_uri or mlflow.get_registry_uri()
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(registry)
            yield _LazyClient(lambda: MlflowClient(tracking_uri=tracking, registry_uri=registry))
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]  # None: unset again
            registry_state._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _LazyClient:
    """An MlflowClient made on first use: a local model folder never touches a tracking store."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make, self._client = make, None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)


def resolve_model_uri(client: Any, uri: str) -> ResolvedModel:
    """Check the model exists and pin ``latest``/aliases to a concrete version."""
    models = MODELS_URI.match(uri)
    if models:
        name, version, alias = models["name"], models["version"], models["alias"]
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version and version.lower() == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise NotFound(f"registered model {name!r} has no versions", "Register a version first, or check the name.")
            mv = max(versions, key=lambda v: int(v.version))
        elif version and version.isdigit():
            mv = client.get_model_version(name, version)
        else:
            raise NotFound(
                f"model URI {uri!r} names no version",
                "Use models:/<name>/<number>, models:/<name>/latest or models:/<name>@<alias>.",
            )
        return ResolvedModel(uri=f"models:/{name}/{mv.version}", name=name, version=str(mv.version), run_id=mv.run_id or "")
    runs = _RUNS_URI.match(uri)
    if runs:
        run = client.get_run(runs["run"])
        return ResolvedModel(uri=uri, run_id=run.info.run_id)
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        path = Path(uri.removeprefix("file:")).expanduser()
        if not (path / "MLmodel").is_file():
            raise NotFound(
                f"no MLflow model at path {uri!r}",
                "A local model is a folder containing an MLmodel file (what mlflow.<flavor>.save_model writes).",
            )
        return ResolvedModel(uri=str(path.resolve()))
    return ResolvedModel(uri=uri)


# A 401 or 403 as MLflow's client and requests word it ("error code 401 != 200", "403 Client Error"), not
# any "401" in the message: a tracking server on port 34031 that does not answer is unreachable.
_REFUSED = re.compile(r"(?:code|status)\D{0,3}40[13]\b|\b40[13] (?:Client Error|Unauthorized|Forbidden)", re.IGNORECASE)


def translate_mlflow_error(exc: Exception, spec: ModelSpec) -> BackendError:
    """MLflow's and requests' exceptions into our named errors, keeping MLflow's message."""
    if isinstance(exc, BackendError):
        return exc
    message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    where = spec.tracking_uri or "the default tracking URI"
    code = getattr(exc, "error_code", "")
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in message.lower() or "does not exist" in message.lower():
        return NotFound(f"model {spec.model_uri!r} not found on {where}", f"{message}. Check the name, version or alias.")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or _REFUSED.search(message):
        return UpstreamUnavailable(
            f"tracking server {where} refused the credentials",
            f"{message}. Check the token (DagsHub) or tracking_username/tracking_password.",
        )
    transport = ("Max retries", "Connection", "connect", "timed out", "API request to", "Name or service")
    if any(word in message for word in transport) or type(exc).__module__.startswith(("requests", "urllib3")):
        return RegistryUnreachable(f"tracking server {where} is unreachable", f"{message}. Check tracking_uri and the network.")
    return BackendError(f"loading {spec.model_uri!r} failed: {type(exc).__name__}", message)


def choose_device(flavor: str) -> str:
    """``cuda`` when the model is torch (or torch is already in use) and a CUDA device is visible.

    torch is never imported just to ask: an sklearn backend stays small.
    """
    if flavor != "mlflow.pytorch" and "torch" not in sys.modules:
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_yaml_with_libyaml() -> None:
    """MLflow reads a model's MLmodel with ``yaml.safe_load``, PyYAML's loader written in Python, four times
    per load: ~10 ms, half of a small model's load on every wake. Where PyYAML was built with libyaml, its C
    loader reads the same documents into the same objects (the same safe constructor and resolver) in a
    fraction of that. For the model processes (the models' template and the zygote call this before they
    fork), where loading models is the work."""
    import yaml

    if getattr(yaml, "__with_libyaml__", False):
        yaml.safe_load = _safe_load_with_libyaml


def _safe_load_with_libyaml(stream: Any) -> Any:
    import yaml

    return yaml.load(stream, Loader=yaml.CSafeLoader)


def load_model(spec: ModelSpec, artifacts_dir: Path, prefer_local: bool = False) -> LoadedModel:
    """Resolve, download once into ``artifacts_dir``, load with the chosen loader. With ``prefer_local``
    (a restore, a restarted model process), what an earlier load of this spec downloaded, if any: the
    registry is not asked (the follower checks an alias later), nor are the model's requirements checked
    against the installed packages again (the load that downloaded it logged any mismatch; the check reads
    every installed distribution's metadata, a third of a small model's load on every wake). When the
    registry does not answer, that copy too, and ``offline`` says so."""
    started = time.perf_counter()
    offline = ""
    kept = _remembered(spec, artifacts_dir) if prefer_local else None
    if kept is not None:
        resolved, local_path = kept
    else:
        with artifacts_lock(artifacts_dir, exclusive=True):
            resolved, local_path, offline = _fetch(spec, artifacts_dir)
    try:
        with artifacts_lock(artifacts_dir, exclusive=False):
            flavor, native, predict, device = _load_local(local_path, spec.loader, checked=kept is not None)
    except ImportError as exc:
        raise BackendError(
            f"the model needs a package this backend lacks: {exc.name or exc}",
            "Install the model's requirements in the backend's environment (see the model's requirements.txt).",
        ) from exc
    except Exception as exc:
        raise BackendError(f"loading {resolved.uri!r} failed: {type(exc).__name__}: {exc}", "See the backend's log.") from exc
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.2fs", resolved.uri, flavor, device, seconds)
    return LoadedModel(predict, native, flavor, resolved, local_path, device, seconds, offline)


@contextlib.contextmanager
def artifacts_lock(artifacts_dir: Path, exclusive: bool) -> Iterator[None]:
    """A download (``exclusive``) or a load of a backend's artifacts: a download rewrites the files of the copy
    in place, so it waits for the loads under way, and they for it. Two configures racing each other start
    two model processes of one backend at once: without this one read an ``MLmodel`` the other was still
    writing (empty: "'NoneType' object has no attribute 'copy'")."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    with open(artifacts_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # closing the file lets go


def _fetch(spec: ModelSpec, artifacts_dir: Path) -> tuple[ResolvedModel, str, str]:
    """Resolve through the registry and download (once); the copy of an earlier load if it does not answer."""
    try:
        with mlflow_scope(spec) as client:
            resolved = resolve_model_uri(client, spec.model_uri)
            local_path = _download(resolved, artifacts_dir)
    except Exception as exc:
        error = translate_mlflow_error(exc, spec)
        kept = _remembered(spec, artifacts_dir) if isinstance(error, RegistryUnreachable) else None
        if kept is None:
            raise error from exc
        offline = f"{error.error}: loaded {kept[0].label} from the copy downloaded on an earlier load"
        log.warning("%s", offline)
        return kept[0], kept[1], offline
    _remember(spec, resolved, local_path, artifacts_dir)
    return resolved, local_path, ""


def _record_path(spec: ModelSpec, artifacts_dir: Path) -> Path:
    key = f"{spec.tracking_uri}|{spec.registry_uri}|{spec.model_uri}"
    return artifacts_dir / "resolved" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _remember(spec: ModelSpec, resolved: ResolvedModel, local_path: str, artifacts_dir: Path) -> None:
    """What this spec resolved to and where its download is: a restart with the registry down loads it."""
    record = _record_path(spec, artifacts_dir)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resolved": asdict(resolved), "local_path": local_path}))
    os.replace(tmp, record)


def _remembered(spec: ModelSpec, artifacts_dir: Path) -> tuple[ResolvedModel, str] | None:
    try:
        record = json.loads(_record_path(spec, artifacts_dir).read_text())
        resolved, local_path = ResolvedModel(**record["resolved"]), str(record["local_path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (resolved, local_path) if (Path(local_path) / "MLmodel").is_file() else None


def _download(resolved: ResolvedModel, artifacts_dir: Path) -> str:
    if Path(resolved.uri).is_dir():
        return resolved.uri
    import mlflow

    target = artifacts_dir / hashlib.sha256(resolved.uri.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=resolved.uri, dst_path=str(target))


def _load_local(local_path: str, loader: str, checked: bool = False) -> tuple[str, Any, Callable[[Any], Any], str]:
    """The model at ``local_path`` with the loader its flavor (or ``loader``) names; ``checked``: its requirements
    were checked when it was first loaded (MLflow's pyfunc loader warns of mismatches, and of another Python)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    flavors = Model.load(local_path).flavors
    module_name = flavors.get("python_function", {}).get("loader_module", "mlflow.pyfunc.model")
    module_name = module_name.removesuffix(".model")
    if loader == "pyfunc" or module_name == "mlflow.pyfunc":
        device = choose_device("mlflow.pyfunc")
        model = mlflow.pyfunc.load_model(local_path, suppress_warnings=checked)
        return "mlflow.pyfunc", model, model.predict, device
    module = importlib.import_module(module_name)
    device = choose_device(module_name)
    if module_name == "mlflow.pytorch":
        model = module.load_model(local_path, map_location=device)
        return module_name, model, _torch_call(model, device), device
    model = module.load_model(local_path)
    predict = getattr(model, "predict", None) or model
    return module_name, model, predict, device


def _torch_call(module: Any, device: str) -> Callable[[Any], Any]:
    """A torch module's ``__call__`` in eval mode without autograd, with tensor inputs moved to its device."""
    import torch

    module.eval()

    def predict(inputs: Any) -> Any:
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device)
        elif isinstance(inputs, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in inputs):
            inputs = [item.to(device) for item in inputs]  # torchvision detectors: one tensor per image
        with torch.no_grad():
            return module(inputs)

    return predict
