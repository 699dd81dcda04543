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
from dataclasses import dataclass
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


def add_check_arguments(check: argparse.ArgumentParser) -> None:
    """The check's options; ``ls-mlflow check`` has the same."""
    check.add_argument("--label-config", required=True, help="the labeling config: a file, or the XML itself")
    check.add_argument("--model", required=True, help="an MLflow model URI (models:/name/version, runs:/..., a path)")
    check.add_argument("--post-hook", required=True, help="module:function or path/to/file.py:function")
    check.add_argument("--pre-hook", default="", help="module:function or path/to/file.py:function (default: identity)")
    check.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI")
    check.add_argument("--loader", choices=("pyfunc", "native"), default="pyfunc")
    check.add_argument("--batch-size", type=int, default=None, help="default: the backend's BATCH_SIZE")
    check.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default: %(default)s)")
    check.add_argument("--draw", metavar="DIR", default="",
                       help="also draw each image task's prediction onto its image, as DIR/task-<id>.png")
    check.add_argument("items", nargs="+", metavar="FILE_OR_TASK_JSON")


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m hooks", description=__doc__.split("\n\n")[0])
    commands = cli.add_subparsers(dest="command", required=True)
    add_check_arguments(commands.add_parser("check", help="run pre_hook -> model -> post_hook on files or tasks and validate"))
    return cli


@dataclass(frozen=True)
class _LocalRunner:
    """The batcher's runner for a pipeline in this process (a backend runs it in its model process)."""

    pipeline: Any

    def call(self, hooks_id: str, values: list[Any], tasks: list[dict[str, Any]], context: Any,
             label_config: str) -> tuple[list[Any], dict[str, float]]:
        timings: dict[str, float] = {}
        outputs = self.pipeline.run_batch(values, tasks, context, label_config, timer=timings.__setitem__)
        return outputs, timings


@dataclass(frozen=True)
class _LocalServing:
    """What ``predict_tasks`` needs of a configuration, for a model loaded here; nothing in the background."""

    hooks_id: str
    identity: str
    batch_size: int
    batcher: Any
    model_version: str
    continuation: None = None


def run_check(args: argparse.Namespace) -> int:
    """Load, fetch and predict through the backend's own entry point (``backend.serving.prediction.predict_tasks``)."""
    from backend.config.spec import parse_model_spec
    from backend.core.errors import BackendError
    from backend.core.settings import Settings
    from backend.labeling.answers import answer_json
    from backend.labeling.validation import data_objects
    from backend.model.hookcodec import decode_hook
    from backend.model.loading import load_model
    from backend.model.pipeline import Pipeline
    from backend.serving.batching import DynamicBatcher
    from backend.serving.prediction import predict_tasks
    from backend.tasks.fetcher import FetchLimits, LocalFiles, TaskDataFetcher
    from backend.tasks.labelstudio import LabelStudioAccess
    from backend.tasks.outbound import AddressPolicy
    from lsmlflow.errors import ClientError
    from lsmlflow.pickling import encode_hook, load_reference

    if args.draw and (problem := _unwritable(Path(args.draw))):  # before the model loads, not after
        print(f"\nFAILED: --draw cannot write to {args.draw}: {problem}\n  fix: name a folder you can write to "
              "(it is made if it does not exist).", file=sys.stderr)
        return 1
    config = _label_config(args.label_config)
    failed: dict[int, str] = {}
    try:
        objects = data_objects(config)
        if not objects:
            raise SystemExit('the labeling config reads no task data (its object tags need value="$key")')
        tasks = _tasks(args.items, objects[0].key)
        # Your hooks as a client sends them (module:function or file.py:function, from here, pickled by value).
        hooks = {role: encode_hook(load_reference(ref, role)) if ref else "" for role, ref in
                 (("pre_hook", args.pre_hook), ("post_hook", args.post_hook))}
        body = {"model_uri": args.model, **hooks, "loader": args.loader}
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
            serving = _LocalServing(spec.digest, spec.digest, spec.batch_size or Settings.from_env().default_batch_size,
                                    DynamicBatcher(_LocalRunner(pipeline), enabled=False), model_version)
            # Your own files and your own network: anything but the never-readable folders and metadata addresses.
            limits = FetchLimits(local=LocalFiles(("/",)), addresses=AddressPolicy(("0.0.0.0/0", "::/0")))
            fetcher = TaskDataFetcher(Path(scratch) / "cache", limits=limits)
            try:
                inputs = fetcher.start_tasks(tasks, objects, LabelStudioAccess())
                outcome = predict_tasks(serving, tasks, inputs, label_config=config,
                                        deadline=time.monotonic() + args.timeout, background=False)
                failed = outcome.errors
                extra = {"errors": [{"task": tasks[i].get("id"), "error": e} for i, e in sorted(failed.items())]} if failed else {}
                answer = json.loads(answer_json(outcome.items, tasks, model_version, extra))  # what the backend sends
                drawn = _draw(Path(args.draw), tasks, answer["results"], inputs, objects) if args.draw else []
            finally:
                fetcher.close()
            print(json.dumps(answer, indent=2))
    except (BackendError, ClientError) as exc:
        print(f"\nFAILED: {exc.error}\n  fix: {exc.detail}", file=sys.stderr)
        return 1
    for i, error in sorted(failed.items()):
        print(f"task {tasks[i].get('id')}: no prediction: {error}", file=sys.stderr)
    for path in drawn:
        print(f"drawn: {path}", file=sys.stderr)
    ready = [p for p in answer["results"] if p != []]
    regions = sum(len(p["result"]) for p in ready)
    print(
        f"\n{'OK' if not failed else 'PARTLY'}: {len(ready)} predictions, {regions} regions, all fit the labeling config"
        f"{f'; {len(failed)} task(s) without data' if failed else ''} ({time.perf_counter() - started:.1f} s with the model load).",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _unwritable(folder: Path) -> str:
    """Why the drawings cannot go to ``folder`` ("" where they can); the folder is made if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hooks-check-"):
            return ""
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _draw(folder: Path, tasks: list[dict[str, Any]], results: list[Any], inputs: Any, objects: Any) -> list[Path]:
    """Each image task's prediction on its image (hooks.draw); text tasks have nothing to draw."""
    from .draw import draw_prediction

    if not any(o.tag.lower() == "image" for o in objects):
        print("--draw: the labeling config has no Image tag; nothing to draw", file=sys.stderr)
        return []
    drawn = []
    for index, (task, prediction) in enumerate(zip(tasks, results)):
        task_input = inputs.result(index)
        if not prediction or task_input.error or not Path(str(task_input.value)).is_file():
            continue
        drawn.append(draw_prediction(task_input.value, prediction, folder / f"task-{task.get('id')}.png"))
    return drawn


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_check(args)
