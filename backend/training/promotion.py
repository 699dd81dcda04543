"""From what a train_hook returns to a registered, gated and (maybe) promoted model version.

- ``register``: log what the hook returned with its MLflow flavor (chosen by its type, or
  ``training.flavor``) and register it as a new version of the configured model, in the active run,
  with the lineage tags on both; a URI or ModelInfo the hook logged itself is registered as it is;
- ``evaluate``: load a version exactly as the backend serves it (``loading.load_model``) and run the
  configured hooks on annotated tasks: every prediction must fit the labeling config, and its agreement
  with the annotations (``agreement``) is measured;
- ``decide``: the gate: predictions valid, agreement at least ``training.min_agreement`` and no lower
  than the serving version's by more than ``training.max_regression``;
- ``promote``: ``candidate`` always; the serving alias too when the gate passed and ``promote`` is auto.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.config.spec import ModelSpec
from backend.config.training_policy import TrainingPolicy
from backend.core.errors import BackendError
from backend.labeling.validation import complete_prediction, validate_predictions
from backend.model.hookcodec import Hook
from backend.model.loading import load_model
from backend.quality.agreement import Agreement, compare

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model"
FLAVOR_PACKAGES = {
    "sklearn": ("scikit-learn", "numpy", "scipy", "cloudpickle"),
    "pytorch": ("torch", "numpy", "cloudpickle"),
    "transformers": ("transformers", "torch", "tokenizers"),
    "pyfunc": ("cloudpickle", "numpy"),
}


class TrainingFailed(BackendError):
    """A training that cannot go on: what failed and what to do about it."""


def flavor_of(model: Any, requested: str = "") -> str:
    """The MLflow flavor to log ``model`` with."""
    if requested:
        return requested
    kinds = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(model).__mro__}
    if any(k.startswith("sklearn.") and k.endswith("BaseEstimator") for k in kinds):
        return "sklearn"
    if "torch.nn.modules.module.Module" in kinds:
        return "pytorch"
    if any(k.startswith("transformers.pipelines") for k in kinds):
        return "transformers"
    if "mlflow.pyfunc.model.PythonModel" in kinds:
        return "pyfunc"
    raise TrainingFailed(
        f"train_hook returned a {type(model).__module__}.{type(model).__qualname__}, which MLflow cannot log by itself",
        "Return a scikit-learn estimator, a torch.nn.Module, a transformers pipeline or an mlflow.pyfunc.PythonModel, "
        "log the model yourself and return its URI (or ModelInfo), or set training.flavor.",
    )


def pip_requirements(flavor: str) -> list[str]:
    """This environment's versions of what the flavor needs (MLflow's own inference runs a subprocess for it)."""
    import mlflow

    found = [f"mlflow=={mlflow.__version__}"]
    for distribution in FLAVOR_PACKAGES.get(flavor, ()):
        try:
            found.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def register(model: Any, name: str, tags: dict[str, str], policy: TrainingPolicy) -> str:
    """Log and register (in the active run); the new version's number."""
    import mlflow
    from mlflow.models.model import ModelInfo

    if isinstance(model, ModelInfo):
        model = model.model_uri
    if isinstance(model, str):
        if not model.startswith(("models:/", "runs:/")):
            raise TrainingFailed(f"train_hook returned the string {model[:200]!r}, which is no model URI",
                                 "Return a model, or the models:/ or runs:/ URI of one you logged.")
        return str(mlflow.register_model(model, name, tags=tags).version)
    flavor = flavor_of(model, policy.flavor)
    module = importlib.import_module(f"mlflow.{flavor}")
    keyword = {"pyfunc": "python_model", "transformers": "transformers_model"}.get(flavor)
    arguments: dict[str, Any] = {keyword: model} if keyword else {}
    if flavor == "pytorch":  # MLflow's default, "pt2", traces forward() and needs an input example; any module pickles
        arguments["serialization_format"] = "pickle"
    positional = () if keyword else (model,)
    try:
        info = module.log_model(*positional, name=ARTIFACT_NAME, registered_model_name=name,
                                pip_requirements=pip_requirements(flavor), tags=tags, **arguments)
    except Exception as exc:
        raise TrainingFailed(f"logging the trained model with mlflow.{flavor} failed: {type(exc).__name__}: {exc}",
                             "Check what train_hook returns, or set training.flavor.") from exc
    return str(info.registered_model_version)


@dataclass
class Evaluation:
    """One version's predictions on the gate's tasks."""

    model_version: str
    agreement: Agreement = field(default_factory=Agreement)
    invalid: list[str] = field(default_factory=list)
    error: str = ""

    def summary(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"model_version": self.model_version, **self.agreement.summary()}
        if self.invalid:
            shown["invalid"] = len(self.invalid)
            shown["problems"] = self.invalid[:5]
        if self.error:
            shown["error"] = self.error
        return shown


def evaluate(spec: ModelSpec, artifacts_dir: Path, pre_hook: Hook, post_hook: Hook, values: list[Any],
             tasks: list[dict[str, Any]], annotations: list[list[dict[str, Any]]], label_config: str,
             batch_size: int) -> Evaluation:
    """Load ``spec``'s model as the backend does and predict the tasks through the hooks."""
    from backend.model.pipeline import Pipeline

    try:
        loaded = load_model(spec, artifacts_dir)
    except BackendError as exc:
        return Evaluation(spec.model_uri, error=f"it does not load: {exc.error}")
    version = loaded.resolved.label
    evaluation = Evaluation(version)
    pipeline = Pipeline(loaded, pre_hook, post_hook)
    for start in range(0, len(values), batch_size):
        chunk = slice(start, start + batch_size)
        try:
            outputs = pipeline.run_batch(values[chunk], tasks[chunk], None, label_config)
            predictions = [complete_prediction(o, version, t, i) for i, (o, t) in enumerate(zip(outputs, tasks[chunk]), start)]
        except BackendError as exc:
            evaluation.error = f"{exc.error}"
            return evaluation
        for prediction, task, annotated in zip(predictions, tasks[chunk], annotations[chunk]):
            try:
                validate_predictions([prediction], [task], label_config)
            except BackendError as exc:
                evaluation.invalid.append(exc.error)
                continue
            evaluation.agreement.add(compare(prediction["result"], annotated))
    return evaluation


def decide(candidate: Evaluation, serving: Evaluation | None, policy: TrainingPolicy) -> str:
    """Empty when the candidate passes the gate, else why not."""
    if candidate.error:
        return f"the new version failed on annotated tasks: {candidate.error}"
    if candidate.invalid:
        return f"{len(candidate.invalid)} of its predictions do not fit the labeling config: {candidate.invalid[0]}"
    score = candidate.agreement.score
    if score is None:
        return "no annotated task could be predicted"
    if score < policy.min_agreement:
        return f"its agreement with the annotations, {score:.3f}, is below training.min_agreement ({policy.min_agreement:g})"
    if serving is not None and serving.agreement.score is not None and score < serving.agreement.score - policy.max_regression - 1e-9:
        return (f"its agreement with the annotations, {score:.3f}, is below the serving version's "
                f"{serving.agreement.score:.3f} (training.max_regression is {policy.max_regression:g})")
    return ""


def promote(client: Any, name: str, version: str, policy: TrainingPolicy, refusal: str) -> str:
    """Set the aliases and tag the gate's verdict; the outcome: promoted, candidate or rejected."""
    client.set_registered_model_alias(name, policy.candidate_alias, version)
    client.set_model_version_tag(name, version, "lsbackend.gate", ("failed: " + refusal)[:5000] if refusal else "passed")
    if refusal:
        return "rejected"
    if policy.promote == "auto":
        client.set_registered_model_alias(name, policy.alias, version)
        client.set_model_version_tag(name, version, "lsbackend.promoted_to", policy.alias)
        return "promoted"
    return "candidate"
