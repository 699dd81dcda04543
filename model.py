"""The configured model: a loaded MLflow model and its two hooks, and the pipeline that runs them.

``pre_hook(inputs) -> model.predict -> post_hook(outputs)`` runs in batches of ``batch_size``; each
batch's post hook must give back one prediction per task. Hooks that take ``tasks``, ``context``,
``device``, ``label_config`` or ``inputs`` (what the pre hook got) as keywords get them; one-argument
hooks (the DagsHub form) work as is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from backend.batching import Chunk, DynamicBatcher, StageTimer
from backend.errors import DeadlineExceeded, HookFailed, PredictionsInvalid
from backend.hookcodec import Hook
from backend.loading import LoadedModel
from backend.spec import ModelSpec
from backend.taskdata import TaskInput
from backend.validation import PredictionCompleter


@dataclass
class ConfiguredModel:
    """Everything one configure produced; immutable once serving, swapped whole on reconfigure."""

    spec: ModelSpec
    loaded: LoadedModel
    pre_hook: Hook
    post_hook: Hook
    batch_size: int
    configured_at: float = field(default_factory=time.time)

    @property
    def model_version(self) -> str:
        """Stable for a configuration: Label Studio skips tasks already predicted with this version."""
        return self.spec.model_version or self.loaded.resolved.label

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "model_uri": self.loaded.resolved.uri,
            "flavor": self.loaded.flavor,
            "device": self.loaded.device,
            "batch_size": self.batch_size,
            "pre_hook": self.pre_hook.source,
            "post_hook": self.post_hook.source,
            "load_seconds": round(self.loaded.load_seconds, 3),
            "configured_at": self.configured_at,
        }

    def predict_tasks(
        self,
        tasks: list[dict[str, Any]],
        inputs: Sequence[TaskInput],
        context: Any = None,
        label_config: str = "",
        deadline: float | None = None,
        timer: StageTimer | None = None,
        batcher: DynamicBatcher | None = None,
    ) -> list[dict[str, Any]]:
        """One completed prediction per task, in task order; tasks without data get an empty prediction.

        Tasks go in chunks of ``batch_size``, each sent as soon as its own data is in (``inputs`` may
        still be downloading the rest), to the batcher where there is one: it may join the chunk with
        other requests' in one model call. Interactive calls (with a ``context``) run on their own.
        """
        predictions: list[dict[str, Any] | None] = [None] * len(tasks)
        batched = batcher is not None and batcher.enabled and context is None
        sent: list[tuple[list[int], Any]] = []
        complete = PredictionCompleter(self.model_version)
        try:
            with batcher.request() if batched else nullcontext() as request:
                for start in range(0, len(tasks), self.batch_size):
                    self._check_deadline(deadline, start, len(tasks))
                    chunk, values = [], []
                    for i in range(start, min(len(tasks), start + self.batch_size)):
                        task_input = inputs[i]  # waits for this task's files only
                        if task_input.error:
                            predictions[i] = {"result": [], "score": 0.0, "model_version": self.model_version}
                        else:
                            chunk.append(i)
                            values.append(task_input.value)
                    if not chunk:
                        continue
                    chunk_tasks = [tasks[i] for i in chunk]
                    if batched:
                        submitted = batcher.submit(Chunk(self, values, chunk_tasks, label_config, timer, request))
                        sent.append((chunk, submitted))
                    else:
                        sent.append((chunk, self.run_batch(values, chunk_tasks, context, label_config, timer)))
            for chunk, outcome in sent:
                outputs = self._wait(outcome, deadline, len(tasks)) if isinstance(outcome, Future) else outcome
                for i, prediction in zip(chunk, outputs):
                    predictions[i] = complete(prediction, tasks[i], i)
        except BaseException:
            for _, outcome in sent:
                if isinstance(outcome, Future):
                    outcome.cancel()  # chunks not yet started are dropped by the batcher
            raise
        return [p for p in predictions if p is not None]

    @staticmethod
    def _check_deadline(deadline: float | None, done: int, total: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"prediction stopped after {done} of {total} tasks: the deadline passed",
                "Send fewer tasks per request, raise batch_size, or raise PREDICT_TIMEOUT_S (Label Studio waits 100 s).",
            )

    def _wait(self, outcome: Future, deadline: float | None, total: int) -> list[Any]:
        try:
            return outcome.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise DeadlineExceeded(
                f"prediction of {total} tasks did not finish before the deadline",
                "Send fewer tasks per request, raise batch_size, or raise PREDICT_TIMEOUT_S (Label Studio waits 100 s).",
            ) from None

    def run_batch(
        self,
        values: list[Any],
        tasks: list[dict[str, Any]],
        context: Any = None,
        label_config: str = "",
        timer: StageTimer | None = None,
    ) -> list[Any]:
        """pre_hook -> predict -> post_hook on one batch; any exception becomes a HookFailed naming the stage."""
        extras = {"tasks": tasks, "context": context, "device": self.loaded.device, "label_config": label_config, "inputs": values}
        model_input = self._stage("pre_hook", lambda: self.pre_hook(values, **extras), timer)
        model_output = self._stage("predict", lambda: self.loaded.predict(model_input), timer)
        outputs = self._stage("post_hook", lambda: self.post_hook(model_output, **extras), timer)
        if hasattr(outputs, "tolist") and not isinstance(outputs, (list, dict)):
            outputs = outputs.tolist()
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(tasks):
            got = len(outputs) if isinstance(outputs, (list, tuple)) else f"a {type(outputs).__name__}"
            raise PredictionsInvalid(
                f"post_hook returned {got} predictions for {len(tasks)} tasks",
                "Return a list with exactly one prediction per task, in task order "
                "(an empty {'result': []} for a task with nothing found).",
            )
        return list(outputs)

    @staticmethod
    def _stage(name: str, call: Callable[[], Any], timer: StageTimer | None) -> Any:
        started = time.perf_counter()
        try:
            return call()
        except Exception as exc:
            stage = "model.predict" if name == "predict" else name
            raise HookFailed(
                f"{stage} raised {type(exc).__name__}: {exc}",
                f"The error is in the {stage} step; the backend's log has the traceback. "
                + ("Check what pre_hook returns matches the model's input." if name == "predict" else f"Fix the {name}."),
            ) from exc
        finally:
            if timer is not None:
                timer(name, time.perf_counter() - started)
