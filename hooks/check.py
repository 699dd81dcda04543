"""``python -m hooks check``: run the whole pipeline locally, the way a backend would, and say whether
Label Studio would render the predictions. No Label Studio and no server are needed.

Tasks are given as media files (each becomes a task whose data key is the config's first object's)
or JSON files holding one task or a list of tasks. The model is loaded, the task data fetched, the
hooks run, the predictions completed and validated by the very code the backend uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _label_config(value: str) -> str:
    path = Path(value)
    return path.read_text() if not value.lstrip().startswith("<") and path.is_file() else value


def _tasks(items: Sequence[str], key: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() == ".json":
            loaded = json.loads(path.read_text())
            tasks.extend(loaded if isinstance(loaded, list) else [loaded])
        else:
            tasks.append({"id": len(tasks) + 1, "data": {key: str(path.resolve())}})
    for index, task in enumerate(tasks):
        task.setdefault("id", index + 1)
    return tasks


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m hooks", description=__doc__.split("\n\n")[0])
    commands = cli.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run pre_hook -> model -> post_hook on files or tasks and validate")
    check.add_argument("--label-config", required=True, help="the labeling config: a file, or the XML itself")
    check.add_argument("--model", required=True, help="an MLflow model URI (models:/name/version, runs:/..., a path)")
    check.add_argument("--post-hook", required=True, help="module:function")
    check.add_argument("--pre-hook", default="", help="module:function (default: identity)")
    check.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI")
    check.add_argument("--loader", choices=("pyfunc", "native"), default="pyfunc")
    check.add_argument("--batch-size", type=int, default=None)
    check.add_argument("items", nargs="+", metavar="FILE_OR_TASK_JSON")
    return cli


def run_check(args: argparse.Namespace) -> int:
    from backend.answers import plain_value, prediction_json
    from backend.errors import BackendError
    from backend.hookcodec import decode_hook
    from backend.labelstudio import LabelStudioAccess
    from backend.loading import load_model
    from backend.outbound import AddressPolicy
    from backend.spec import parse_model_spec
    from backend.taskdata import FetchLimits, LocalFiles, TaskDataFetcher
    from backend.validation import PredictionCompleter, data_objects, validate_predictions
    from model import Pipeline

    config = _label_config(args.label_config)
    try:
        objects = data_objects(config)
        if not objects:
            raise SystemExit('the labeling config reads no task data (its object tags need value="$key")')
        tasks = _tasks(args.items, objects[0].key)
        body = {"model_uri": args.model, "pre_hook": args.pre_hook, "post_hook": args.post_hook, "loader": args.loader}
        if args.tracking_uri:
            body["tracking_uri"] = args.tracking_uri
        if args.batch_size:
            body["batch_size"] = args.batch_size
        spec = parse_model_spec(body)
        with tempfile.TemporaryDirectory(prefix="hooks-check-") as scratch:
            started = time.perf_counter()
            loaded = load_model(spec, Path(scratch) / "artifacts")
            pipeline = Pipeline(loaded, decode_hook(spec.pre_hook, "pre_hook"), decode_hook(spec.post_hook, "post_hook"))
            model_version = spec.model_version or loaded.resolved.label
            # Your own files and your own network: anything but the never-readable folders and metadata addresses.
            limits = FetchLimits(local=LocalFiles(("/",)), addresses=AddressPolicy(("0.0.0.0/0", "::/0")))
            fetcher = TaskDataFetcher(Path(scratch) / "cache", limits=limits)
            try:
                inputs = fetcher.fetch_tasks(tasks, objects, LabelStudioAccess())
            finally:
                fetcher.close()
            failed = {i: item.error for i, item in enumerate(inputs) if item.error}
            ready = [i for i in range(len(tasks)) if i not in failed]
            predictions: list = [None] * len(tasks)
            complete = PredictionCompleter(model_version)
            size = spec.batch_size or 32
            for start in range(0, len(ready), size):
                chunk = ready[start : start + size]
                outputs = pipeline.run_batch([inputs[i].value for i in chunk], [tasks[i] for i in chunk], None, config)
                for i, output in zip(chunk, outputs):
                    predictions[i] = complete(output, tasks[i], i)
            for i in ready:
                prediction_json(predictions[i], tasks[i], i)  # what the backend would refuse to send
            answer = {"model_version": model_version, "results": [p if p is not None else [] for p in predictions]}
            if failed:  # as the backend answers: [] (nothing stored) and the reason
                answer["errors"] = [{"task": tasks[i].get("id"), "error": error} for i, error in failed.items()]
            print(json.dumps(answer, indent=2, default=plain_value))
            validate_predictions([predictions[i] for i in ready], [tasks[i] for i in ready], config)
    except BackendError as exc:
        print(f"\nFAILED: {exc.error}\n  fix: {exc.detail}", file=sys.stderr)
        return 1
    for i, error in failed.items():
        print(f"task {tasks[i].get('id')}: no prediction: {error}", file=sys.stderr)
    regions = sum(len(predictions[i]["result"]) for i in ready)
    print(
        f"\n{'OK' if not failed else 'PARTLY'}: {len(ready)} predictions, {regions} regions, all fit the labeling config"
        f"{f'; {len(failed)} task(s) without data' if failed else ''} ({time.perf_counter() - started:.1f} s with the model load).",
        file=sys.stderr,
    )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_check(args)
