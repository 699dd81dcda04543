"""What a configure call asks for, parsed from either of its two forms into one ``ModelSpec``.

Form (a) is byte-for-byte what ``dagshub``'s ``Datasource.add_annotation_model`` sends: a JSON
*string* whose content is JSON again, with ``host, username, repo, model, version, authtoken,
datasource_repo, datasource_name, pre_hook, post_hook``. Form (b) is a plain JSON object with
``model_uri`` and friends, for everyone else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from backend.config.uris import MODELS_URI
from backend.core.errors import BadRequest
from backend.core.redact import redact_value, uri_credentials

if TYPE_CHECKING:
    from backend.config.training_policy import TrainingPolicy

LOADERS = ("pyfunc", "native")
DAGSHUB_KEYS = ("host", "repo", "model")
PLAIN_KEYS = frozenset(
    {
        "model_uri",
        "tracking_uri",
        "registry_uri",
        "tracking_username",
        "tracking_password",
        "tracking_token",
        "pre_hook",
        "post_hook",
        "embed_hook",
        "loader",
        "batch_size",
        "model_version",
        "train_hook",
        "training",
        "label_config",
        "pipeline",
        "gpus",
        "idle_stop_s",
        "always_on",
    }
)
SECRET_FIELDS = ("tracking_username", "tracking_password", "tracking_token")


@dataclass(frozen=True)
class DagshubSource:
    """Where a DagsHub configure came from; lets task data be fetched from DagsHub with its token."""

    host: str
    username: str
    repo: str
    datasource_repo: str = ""
    datasource_name: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One configuration: which model, from where, with which hooks."""

    model_uri: str
    tracking_uri: str = ""
    registry_uri: str = ""
    tracking_username: str = field(default="", repr=False)
    tracking_password: str = field(default="", repr=False)
    tracking_token: str = field(default="", repr=False)
    pre_hook: str = field(default="", repr=False)
    post_hook: str = field(default="", repr=False)
    embed_hook: str = field(default="", repr=False)  # promptable models: the per-image state (model.embedding)
    loader: str = "pyfunc"
    batch_size: int | None = None
    model_version: str = ""
    dagshub: DagshubSource | None = None
    train_hook: str = field(default="", repr=False)
    training: dict[str, Any] = field(default_factory=dict)  # the policy, checked by training.policy
    label_config: str = field(default="", repr=False)  # a Label Studio labeling config: Antenna's pipeline
    pipeline: dict[str, Any] = field(default_factory=dict)  # its slug, name, description, version (antenna.pipeline)
    gpus: int | None = None  # GPUs the orchestrator's ray driver gives this model's backend (BACKEND_GPUS if None)
    # The orchestrator's, for this model's backend (orchestrator/fleet.py); a backend alone ignores them.
    idle_stop_s: float | None = None  # asleep after this long without a request (IDLE_STOP_S if None; 0: never)
    always_on: bool = False  # never put to sleep, never evicted for the memory budget

    @property
    def model_key(self) -> str:
        """The model's identity: same key, same loaded model (hooks may differ)."""
        parts = [self.tracking_uri, self.registry_uri, self.model_uri, self.loader, self.tracking_username]
        return "|".join(parts)

    @property
    def registry_target(self) -> tuple[str, str] | None:
        """(name, alias) for ``models:/name@alias``, (name, "") for ``models:/name/latest``: the specs whose
        served version can move in the registry (and that the backend follows); None for the others."""
        match = MODELS_URI.match(self.model_uri)
        if not match or not (match["alias"] or (match["version"] or "").lower() == "latest"):
            return None
        return match["name"], match["alias"] or ""

    @property
    def training_policy(self) -> TrainingPolicy | None:
        """The training policy of a trainable spec (checked at parse time), None for the others."""
        from backend.config.training_policy import TrainingPolicy

        if not self.train_hook or self.registry_target is None:
            return None
        return TrainingPolicy.parse(self.training, default_alias=self.registry_target[1])

    @property
    def digest(self) -> str:
        """A fingerprint of the whole configuration, hooks included: equal digests mean an idempotent repeat."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Everything, secrets included: what the store persists."""
        return asdict(self)

    def secrets(self) -> tuple[str, ...]:
        """The credentials this spec carries, to be masked wherever they could show (URIs' userinfo too)."""
        in_uris = (*uri_credentials(self.tracking_uri), *uri_credentials(self.registry_uri), *uri_credentials(self.model_uri))
        return tuple(s for s in (self.tracking_password, self.tracking_token, *in_uris) if s)

    def public(self) -> dict[str, Any]:
        """What /configure, /health and the orchestrator may show: no credentials (none in a URI's userinfo
        either), hooks by fingerprint only."""
        data = self.to_dict()
        for name in SECRET_FIELDS:
            data[name] = "***" if data[name] else ""
        for name in ("pre_hook", "post_hook", "train_hook", "embed_hook"):
            raw = data[name]
            data[name] = hook_fingerprint(raw) if raw or name in ("pre_hook", "post_hook") else None
        label_config = data.pop("label_config")
        return {**redact_value(data), "label_config": label_config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild a stored spec."""
        data = dict(data)
        source = data.pop("dagshub", None)
        return cls(**data, dagshub=DagshubSource(**source) if source else None)

    def pinned_to(self, version: str) -> ModelSpec:
        """This spec with its registered model pinned to one version (what a gate loads)."""
        target = self.registry_target
        if target is None:
            return self
        return replace(self, model_uri=f"models:/{target[0]}/{version}")


def hook_fingerprint(raw: str) -> str:
    """How a hook is shown: an import reference as it is, a pickled one by a digest of its bytes."""
    if not raw:
        return "identity"
    if ":" in raw and len(raw) < 200:
        return raw
    return f"pickle:{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def decode_configure_body(body: bytes) -> dict[str, Any]:
    """JSON, or a JSON string of JSON (the dagshub client's double encoding), into an object."""
    try:
        data: Any = json.loads(body)
        if isinstance(data, str):
            data = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(
            "configure body is not valid JSON",
            f"{exc}. Send a JSON object (or, as the dagshub client does, a JSON string holding one).",
        ) from exc
    except RecursionError:
        raise BadRequest("configure body nests too deeply", "Send a flat JSON object.") from None
    if not isinstance(data, dict):
        raise BadRequest("configure body must be a JSON object", f"got {type(data).__name__}")
    return data


def parse_model_spec(data: dict[str, Any]) -> ModelSpec:
    """Either configure form into a ModelSpec, with every field checked."""
    if "model_uri" in data:
        return _parse_plain(data)
    if all(key in data for key in DAGSHUB_KEYS):
        return _parse_dagshub(data)
    raise BadRequest(
        "configure needs a model",
        "Send 'model_uri' (models:/name/version, models:/name@alias, runs:/..., a path), "
        "or the dagshub form with 'host', 'repo' and 'model'.",
    )


def _text(data: dict[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", f"got {type(value).__name__}: {value!r}")
    return value


def _parse_plain(data: dict[str, Any]) -> ModelSpec:
    unknown = sorted(set(data) - PLAIN_KEYS)
    if unknown:
        raise BadRequest(
            f"unknown configure field(s): {', '.join(unknown)}",
            f"Known fields: {', '.join(sorted(PLAIN_KEYS))}.",
        )
    model_uri = _text(data, "model_uri").strip()
    if not model_uri:
        raise BadRequest("'model_uri' is empty", "Name a model: models:/name/version, runs:/id/path or a path.")
    loader = _text(data, "loader", "pyfunc") or "pyfunc"
    if loader not in LOADERS:
        raise BadRequest(f"unknown loader {loader!r}", f"Use one of {', '.join(LOADERS)}.")
    batch_size = data.get("batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise BadRequest("'batch_size' must be a positive integer", f"got {batch_size!r}")
    gpus = data.get("gpus")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise BadRequest("'gpus' must be a whole number of GPUs, 0 or more", f"got {gpus!r}")
    return ModelSpec(
        model_uri=model_uri,
        tracking_uri=_text(data, "tracking_uri").rstrip("/"),
        registry_uri=_text(data, "registry_uri").rstrip("/"),
        tracking_username=_text(data, "tracking_username"),
        tracking_password=_text(data, "tracking_password"),
        tracking_token=_text(data, "tracking_token"),
        pre_hook=_text(data, "pre_hook"),
        post_hook=_text(data, "post_hook"),
        embed_hook=_text(data, "embed_hook"),
        loader=loader,
        batch_size=batch_size,
        model_version=_text(data, "model_version"),
        gpus=gpus,
        **_training_fields(data, model_uri),
        **_antenna_fields(data, model_uri),
        **_fleet_fields(data),
    )


def _parse_dagshub(data: dict[str, Any]) -> ModelSpec:
    host = _text(data, "host").rstrip("/")
    repo = _text(data, "repo").strip("/")
    model = _text(data, "model")
    version = str(data.get("version") or "latest")
    # A version that is neither a number nor "latest" names an alias (what a trainable configure follows).
    model_uri = f"models:/{model}/{version}" if version.isdigit() or version.lower() == "latest" else f"models:/{model}@{version.lstrip('@')}"
    token = _text(data, "authtoken")
    if not host.startswith(("http://", "https://")):
        raise BadRequest(f"'host' must be an http(s) URL, got {host!r}", "The dagshub client sends e.g. https://dagshub.com.")
    if repo.count("/") != 1 or not model:
        raise BadRequest(f"'repo' must be 'owner/name' and 'model' non-empty, got repo={repo!r} model={model!r}", "")
    return ModelSpec(
        model_uri=model_uri,
        tracking_uri=f"{host}/{repo}.mlflow",
        # DagsHub accepts the token as both MLflow username and password.
        tracking_username=token,
        tracking_password=token,
        pre_hook=_text(data, "pre_hook"),
        post_hook=_text(data, "post_hook"),
        embed_hook=_text(data, "embed_hook"),
        loader="native",
        dagshub=DagshubSource(
            host=host,
            username=_text(data, "username"),
            repo=repo,
            datasource_repo=_text(data, "datasource_repo"),
            datasource_name=_text(data, "datasource_name"),
        ),
        **_training_fields(data, model_uri),
        **_antenna_fields(data, model_uri),
        **_fleet_fields(data),
    )


def _fleet_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``idle_stop_s`` and ``always_on``: how the orchestrator treats this model's backend when idle."""
    idle, always_on = data.get("idle_stop_s"), data.get("always_on", False)
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 <= idle < 1e9):
        raise BadRequest("'idle_stop_s' must be a number of seconds, 0 or more (0: never sleeps)", f"got {idle!r}")
    if not isinstance(always_on, bool):
        raise BadRequest("'always_on' must be true or false", f"got {always_on!r}")
    return {"idle_stop_s": None if idle is None else float(idle), "always_on": always_on}


def _training_fields(data: dict[str, Any], model_uri: str) -> dict[str, Any]:
    """``train_hook`` and the ``training`` policy, checked: training needs a model an alias can move."""
    from backend.config.training_policy import TrainingPolicy

    train_hook = _text(data, "train_hook")
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise BadRequest("'training' must be a JSON object", f"got {type(training).__name__}")
    if not train_hook:
        if training:
            raise BadRequest("'training' needs a 'train_hook'", "Send the function that trains a model as 'train_hook'.")
        return {}
    match = MODELS_URI.match(model_uri)
    if not match or not match["alias"]:
        raise BadRequest(
            f"a trainable configuration needs a registered model with an alias, got {model_uri!r}",
            "Configure models:/<name>@<alias> (e.g. models:/my-model@champion): each training registers a new "
            "version of <name> and moves the alias to it when it passes the gate, and the backend follows the alias.",
        )
    TrainingPolicy.parse(training, default_alias=match["alias"])  # a 400 naming the bad field, now rather than later
    return {"train_hook": train_hook, "training": training}


def _antenna_fields(data: dict[str, Any], model_uri: str) -> dict[str, Any]:
    """``label_config`` and ``pipeline``: what Antenna's pipeline is made of, checked now (a 400 naming the
    problem) rather than at Antenna's first /info."""
    label_config = _text(data, "label_config").strip()
    pipeline = data.get("pipeline") or {}
    if not label_config and not pipeline:
        return {}
    from backend.config.antenna_pipeline import check_pipeline_fields  # label-studio-sdk: imported only when needed

    check_pipeline_fields(label_config, pipeline, model_uri)
    return {"label_config": label_config, "pipeline": pipeline} if label_config else {}
