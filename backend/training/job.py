"""One training, in a process of its own: ``python -m backend.training.job`` reads its job on stdin.

Started by ``trainer`` with ``exec`` (a fresh interpreter: no CUDA state or locks inherited from a
worker), in its own session, holding the training lock for its whole life. The steps:

1. the annotated tasks: Label Studio's export (or the tasks ``POST /train`` carried), each task's latest
   annotation that was not skipped;
2. their data, fetched exactly as for predictions (same fetcher, same safety rules), so ``train_hook``
   gets what ``pre_hook`` would: local file paths or texts;
3. an MLflow run with the lineage (Label Studio project and annotation count, the serving version,
   the hook's digest, the export as the run's dataset) in which ``train_hook`` runs and its model is
   logged and registered as a new version with the same tags;
4. the gate: the new version and the serving one, loaded as the backend loads models, predict the
   annotated tasks through the configured hooks; the figures go to the run;
5. promotion: ``candidate`` always, the serving alias when the gate passed and promotion is automatic.

It reports as it goes in ``jobs/<id>.result.json`` (its stage, its run, then its outcome); anything it
raises, ``SystemExit`` from a hook included, becomes a failed outcome with the cause, and nothing is
registered or promoted after a failure before step 3 ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from backend.config.spec import ModelSpec, hook_fingerprint
from backend.config.training_policy import TrainingPolicy
from backend.core.errors import BackendError, HookFailed
from backend.core.lifetime import end_with
from backend.core.redact import SECRETS, install_log_redaction
from backend.core.settings import Settings, log_level_from
from backend.labeling.validation import data_objects
from backend.model.hookcodec import TRAIN_ARGUMENTS, decode_hook
from backend.model.loading import choose_device, load_model, mlflow_scope
from backend.state.store import JsonFile
from backend.state.training_records import TrainingRecords
from backend.tasks.fetcher import TaskDataFetcher, dagshub_access, fetch_limits
from backend.tasks.labelstudio import LabelStudioAccess
from backend.training.export import ExportFailed, annotated_examples, export_annotated_tasks, export_url
from backend.training.promotion import Evaluation, TrainingFailed, decide, evaluate, promote, register

log = logging.getLogger("backend.training")

GATE_BATCH = 32


class Progress:
    """The result file: written at each stage so /train/status shows where a training is."""

    def __init__(self, file: JsonFile) -> None:
        self.file = file
        self.document: dict[str, Any] = {"state": "running"}

    def update(self, **fields: Any) -> None:
        self.document.update(fields)
        self.file.save(self.document)

    def stage(self, name: str) -> None:
        log.info("stage: %s", name)
        self.update(stage=name)


def _hook_call(name: str, call: Any) -> Any:
    try:
        return call()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from a hook are the hook's failure too
        raise HookFailed(f"{name} raised {type(exc).__name__}: {exc}",
                         f"The error is in the {name}; the training's log (GET /train/status) has the traceback.") from exc


def _tags(payload: dict[str, Any], spec: ModelSpec, access: LabelStudioAccess, examples: int, tasks: int) -> dict[str, str]:
    return {
        "ls.host": access.url or "",
        "ls.project_id": str(payload["project"]["id"]),
        "ls.annotation_count": str(examples),
        "ls.task_count": str(tasks),
        "ls.trigger": payload["trigger"],
        "lsbackend.job": payload["job"],
        "lsbackend.parent_version": payload["serving"].get("model_version") or "",
        "lsbackend.parent_uri": payload["serving"].get("uri") or "",
        "lsbackend.train_hook": hook_fingerprint(spec.train_hook),
    }


def train(payload: dict[str, Any], progress: Progress) -> dict[str, Any]:
    spec = ModelSpec.from_dict(payload["spec"])
    SECRETS.add(*spec.secrets(), payload["label_studio"].get("token") or "")
    policy = TrainingPolicy(**payload["policy"])
    target = spec.registry_target
    assert target is not None, "spec.py lets no trainable spec through without an alias"
    name = target[0]
    access = LabelStudioAccess(**payload["label_studio"])
    project_id = payload["project"]["id"]
    label_config = payload["project"].get("label_config") or ""
    fetch = payload["fetch"]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fetch.items()}
    settings = Settings(model_dir=Path(payload["training_dir"]).parent, **fields)
    artifacts_dir = Path(payload["artifacts_dir"])

    progress.stage("reading annotations")
    try:
        exported = payload.get("tasks") or export_annotated_tasks(access, project_id)
    except ExportFailed as exc:
        raise TrainingFailed(f"could not read project {project_id}'s annotations: {exc}", "") from None
    tasks, annotations = annotated_examples(exported)
    if not tasks:
        raise TrainingFailed(f"project {project_id} has no annotated tasks to train on",
                             "Annotate some tasks first (skipped tasks and empty annotations do not count).")
    if not label_config:
        raise TrainingFailed("the project's labeling config is unknown",
                             "Press Start Training in Label Studio (its request carries the config), or send label_config to POST /train.")

    progress.stage("fetching task data")
    fetcher = TaskDataFetcher(Path(payload["training_dir"]).parent / "cache", settings.fetch_concurrency,
                              fetch_limits(settings), cache_max_bytes=settings.cache_max_bytes)
    inputs = fetcher.fetch_tasks(tasks, data_objects(label_config), access, dagshub_access(spec))
    fetcher.close()
    failed = [(t.get("id"), i.error) for t, i in zip(tasks, inputs) if i.error]
    for task_id, error in failed[:20]:
        log.warning("task %s left out: %s", task_id, error)
    keep = [n for n, i in enumerate(inputs) if not i.error]
    if not keep:
        raise TrainingFailed(f"the data of none of the {len(tasks)} annotated tasks could be read: {failed[0][1]}", "")
    values = [inputs[n].value for n in keep]
    tasks = [tasks[n] for n in keep]
    annotations = [annotations[n] for n in keep]

    train_hook = decode_hook(spec.train_hook, "train_hook", TRAIN_ARGUMENTS)
    pre_hook, post_hook = decode_hook(spec.pre_hook, "pre_hook"), decode_hook(spec.post_hook, "post_hook")
    extras: dict[str, Any] = {"tasks": tasks, "label_config": label_config, "params": dict(policy.params)}
    if "device" in train_hook.accepts:
        extras["device"] = choose_device("mlflow.pytorch")
    parent_uri = payload["serving"].get("uri") or spec.model_uri
    if "current_model" in train_hook.accepts:
        progress.stage("loading the serving model")
        extras["current_model"] = load_model(ModelSpec.from_dict({**spec.to_dict(), "model_uri": parent_uri, "loader": "native"}),
                                             artifacts_dir).native
    tags = _tags(payload, spec, access, len(tasks), len(exported))

    with mlflow_scope(spec) as client:
        import mlflow

        _close_stale_runs(client, payload.get("stale_runs") or [])
        _log_quality(client, name, payload.get("quality") or {})
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"{name} (Label Studio training)")
        with mlflow.start_run(run_name=f"label-studio-{project_id}-{payload['job']}", tags=tags) as run:
            progress.update(run_id=run.info.run_id, experiment_id=run.info.experiment_id)
            mlflow.log_params({"annotated_tasks": len(tasks), "left_out_tasks": len(failed),
                               **{f"param.{k}": str(v)[:500] for k, v in policy.params.items()}})
            if access.url:
                _log_dataset(access, project_id, tasks, annotations)
            progress.stage("training")
            started = time.perf_counter()
            model = _hook_call("train_hook", lambda: train_hook(values, annotations, **extras))
            mlflow.log_metric("train_seconds", time.perf_counter() - started)
            progress.stage("registering")
            version = register(model, name, tags, policy)
            progress.update(version=version)
        run_id = run.info.run_id

    progress.stage("gate")
    gate = slice(0, policy.gate_tasks)
    args = (artifacts_dir, pre_hook, post_hook, values[gate], tasks[gate], annotations[gate], label_config, GATE_BATCH)
    candidate = evaluate(spec.pinned_to(version), *args)
    serving: Evaluation | None = evaluate(ModelSpec.from_dict({**spec.to_dict(), "model_uri": parent_uri}), *args)
    if serving is not None and serving.error:
        log.warning("the serving version could not be evaluated: %s", serving.error)
        serving = None
    refusal = decide(candidate, serving, policy)

    progress.stage("promoting")
    with mlflow_scope(spec) as client:
        for prefix, evaluation in (("gate.new", candidate), ("gate.serving", serving)):
            if evaluation is not None:
                for key, value in evaluation.agreement.summary().items():
                    if isinstance(value, (int, float)):
                        client.log_metric(run_id, f"{prefix}.{key}", value)
        client.set_tag(run_id, "lsbackend.gate", ("failed: " + refusal)[:5000] if refusal else "passed")
        outcome = promote(client, name, version, policy, refusal)
        client.set_tag(run_id, "lsbackend.outcome", outcome)
    gate_summary = {"passed": not refusal, "reason": refusal or None, "new": candidate.summary(),
                    "serving": serving.summary() if serving else None}
    return {"outcome": outcome, "version": version, "registered_model": name, "run_id": run_id,
            "promoted": outcome == "promoted", "gate": gate_summary, "annotated_tasks": len(tasks)}


def _log_dataset(access: LabelStudioAccess, project_id: Any, tasks: list[dict[str, Any]], annotations: list[Any]) -> None:
    """The export as the run's input: which annotations, by a digest of their tasks and results."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    digest = hashlib.sha256(json.dumps([[t.get("id"), a] for t, a in zip(tasks, annotations)], sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    dataset = MetaDataset(  # type: ignore[abstract]  # MLflow's own way to log a source without its data
HTTPDatasetSource(export_url(access, project_id)), name=f"label-studio-project-{project_id}", digest=digest)
    mlflow.log_input(dataset, context="training")


def _close_stale_runs(client: Any, run_ids: list[str]) -> None:
    """Runs of trainings that were killed (timeout, out of memory) end as KILLED, not RUNNING for ever."""
    for run_id in run_ids:
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - a run deleted meanwhile is no reason to stop
            log.warning("could not mark run %s KILLED: %s", run_id, exc)


def _log_quality(client: Any, name: str, quality: dict[str, Any]) -> None:
    """How much annotators kept of each version's predictions, on that version's run (step: tasks compared)."""
    for label, figures in quality.items():
        model, _, version = label.rpartition(":")
        if model != name or not version.isdigit():
            continue
        try:
            run_id = client.get_model_version(name, version).run_id
            if not run_id:
                continue
            for key, value in figures.items():
                if isinstance(value, (int, float)) and key != "tasks":
                    client.log_metric(run_id, f"annotators.{key}", value, step=int(figures.get("tasks") or 0))
        except Exception as exc:  # noqa: BLE001 - figures are worth a warning, not a failed training
            log.warning("could not log annotator agreement for %s: %s", label, exc)


def main() -> int:
    logging.basicConfig(level=log_level_from(os.environ), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    payload = json.loads(sys.stdin.read())
    if payload.get("owner"):
        end_with(payload["owner"])
    records = TrainingRecords(Path(payload["training_dir"]).parent)
    progress = Progress(records.result_file(payload["job"]))
    progress.update(stage="starting", pid=os.getpid())
    try:
        outcome = train(payload, progress)
    except BackendError as exc:
        if exc.__cause__ is not None:
            log.error("%s", exc.error, exc_info=exc.__cause__)
        log.error("training failed: %s %s", exc.error, exc.detail)
        progress.update(state="failed", error=exc.error, detail=exc.detail)
        return 1
    except BaseException as exc:  # noqa: BLE001 - whatever it is, it is this training's outcome
        traceback.print_exc()
        progress.update(state="failed", error=f"{type(exc).__name__}: {exc}", detail="The training's log has the traceback.")
        return 1
    progress.update(state="succeeded", **outcome)
    log.info("training finished: %s", {k: outcome[k] for k in ("outcome", "version", "run_id")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
