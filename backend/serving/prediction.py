"""One /predict: tasks in, one answer item per task out, by the deadline.

Tasks go in chunks of ``batch_size``, each sent as soon as its own data is in, to the serving model's
batcher. What earlier rounds left to the background is answered from the prediction cache, or waited
for where it still runs. At the deadline the request answers with what is done; what is not goes on
in the background (``continuation``), except for an interactive request, which is a 504: one task,
and nobody will ask for it again.

An answer item is a completed prediction (a dict), an encoded one from the cache (a str), or None:
nothing to store for that task (its data failed, or it is not finished yet); the answer carries ``[]``
there, which Label Studio stores nothing for, so the task is predicted again in the next round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.core.errors import BackendError, DeadlineExceeded
from backend.labeling.answers import prediction_json
from backend.labeling.validation import PredictionCompleter, validate_predictions
from backend.serving.batching import Chunk, DynamicBatcher
from backend.serving.continuation import CacheKey, Continuation, Leftover, Predictions, task_keys
from backend.tasks.fetcher import PendingInputs

Item = dict[str, Any] | str | None  # or, with ``raw``, whatever the post hook gave
StageTimer = Callable[[str, float], None]


class Serving(Protocol):
    """What a prediction needs of the serving configuration (runtime.Serving; hooks check's own). Without
    a ``continuation`` nothing goes to the background: pass ``background=False``."""

    @property
    def hooks_id(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def batcher(self) -> DynamicBatcher: ...
    @property
    def continuation(self) -> Continuation | None: ...
    @property
    def model_version(self) -> str: ...


@dataclass
class Outcome:
    items: list[Item]
    errors: dict[int, str] = field(default_factory=dict)  # task index -> why it has no prediction
    left: int = 0  # tasks handed to the background
    from_cache: int = 0


def finish_outputs(model_version: str) -> Callable[[list[Any], list[dict[str, Any]], str], list[str | Exception]]:
    """For the background: post hook outputs to encoded, validated predictions, one by one (a bad one
    fails its task only: there is no request left to fail)."""

    def finish(outputs: list[Any], tasks: list[dict[str, Any]], label_config: str) -> list[str | Exception]:
        complete = PredictionCompleter(model_version)
        finished: list[str | Exception] = []
        for index, (output, task) in enumerate(zip(outputs, tasks)):
            try:
                prediction = complete(output, task, index)
                validate_predictions([prediction], [task], label_config)
                finished.append(prediction_json(prediction, task, index))
            except BackendError as exc:
                finished.append(RuntimeError(exc.error))
        return finished

    return finish


@dataclass
class Recalled:
    """What earlier rounds did or are doing for a request's tasks: answers to give and work to wait for."""

    keys: list[Any]
    answers: dict[int, str] = field(default_factory=dict)  # task index -> encoded prediction
    waiting: dict[int, Future] = field(default_factory=dict)  # task index -> the background's future

    @property
    def known(self) -> set[int]:
        """The tasks this request need not fetch data for."""
        return set(self.answers) | set(self.waiting)


def recall(serving: Serving, cache: Predictions, tasks: list[dict[str, Any]], label_config: str,
           deadline: float, context: Any = None) -> Recalled | None:
    """Look up the tasks in the cache, this worker's background queue and (with several workers) what the
    others' backgrounds work on; None, at little cost, when there is nothing anywhere."""
    continuation = serving.continuation
    if context is not None or continuation is None or not (continuation.active or cache.holds(serving.identity)):
        return None
    recalled = Recalled(task_keys(serving.identity, label_config, tasks))
    recalled.answers = cache.get_many(recalled.keys)
    elsewhere: dict[int, CacheKey] = {}
    for index, key in enumerate(recalled.keys):
        if index in recalled.answers:
            continue
        future = continuation.pending(key)
        if future is not None:
            recalled.waiting[index] = future
        else:
            elsewhere[index] = key
    if elsewhere:
        recalled.waiting.update(cache.watch(elsewhere, deadline))
    return recalled


def predict_tasks(
    serving: Serving,
    tasks: list[dict[str, Any]],
    inputs: PendingInputs,
    *,
    label_config: str,
    deadline: float,
    recalled: Recalled | None = None,
    context: Any = None,
    timer: StageTimer | None = None,
    background: bool = True,
    raw: bool = False,
    deadline_setting: str = "PREDICT_TIMEOUT_S",
) -> Outcome:
    """Everything one request can answer by its deadline; see the module docstring. ``recalled``: what
    ``recall`` found (its tasks' data need not have been fetched). ``raw``: items are the post hook's
    outputs as they are, for a caller that makes its own answer of them (Antenna's /process); they
    are neither completed nor validated, and nothing goes to the background."""
    outcome = Outcome([None] * len(tasks))
    keys = recalled.keys if recalled else None
    waiting_for = list(recalled.waiting.items()) if recalled else []  # tasks the background already works on
    if recalled:
        for index, encoded in recalled.answers.items():
            outcome.items[index] = encoded
        outcome.from_cache += len(recalled.answers)
    known = recalled.known if recalled else set()
    todo = [i for i in range(len(tasks)) if i not in known]

    sent, not_started = _submit(serving, tasks, inputs, todo, label_config, deadline, context, timer, outcome)
    complete = PredictionCompleter(serving.model_version)
    running: list[tuple[list[int], Future]] = []
    try:
        for indices, future in sent:
            try:
                outputs = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                running.append((indices, future))
                continue
            for index, output in zip(indices, outputs):
                outcome.items[index] = output if raw else complete(output, tasks[index], index)
    except BaseException:
        for _, future in sent:
            future.cancel()  # chunks not yet started are dropped by the batcher
        raise
    still_waiting = []
    for index, future in waiting_for:
        try:
            outcome.items[index] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            outcome.from_cache += 1
        except FutureTimeout:
            still_waiting.append(index)
        except Exception as exc:  # noqa: BLE001 - the background's failure is this task's error
            outcome.errors[index] = f"predicted in the background, and that failed: {exc}"

    if running or not_started:
        unfinished = [i for indices, _ in running for i in indices] + not_started
        if context is not None or not background or raw:
            for _, future in running:
                future.cancel()
            if context is not None:
                raise DeadlineExceeded(
                    "the interactive prediction did not finish before the deadline",
                    "Make the hooks or the model faster, or raise PREDICT_TIMEOUT_S (Label Studio waits 100 s).",
                )
            why = f"not finished before the deadline ({deadline_setting})" + ("" if raw else ", and BACKGROUND is off")
            for index in unfinished:
                outcome.errors[index] = why
        else:
            continuation = serving.continuation
            assert continuation is not None, "background=True needs a serving configuration with a continuation"
            keys = keys or task_keys(serving.identity, label_config, tasks)
            leftovers = [
                Leftover(keys[i], tasks[i], label_config, running=(future, position))
                for indices, future in running
                for position, i in enumerate(indices)
            ] + [Leftover(keys[i], tasks[i], label_config, resolve=_resolver(inputs, i)) for i in not_started]
            outcome.left = continuation.adopt(leftovers)
            if outcome.left < len(leftovers):
                for index in unfinished:
                    if continuation.pending(keys[index]) is None:
                        outcome.errors[index] = (
                            "not finished before the deadline, and the background queue is full "
                            "(BACKGROUND_MAX_TASKS), was replaced by a new configuration, or another worker "
                            "took the task: retrieve predictions again"
                        )
    outcome.left += len(still_waiting)

    if raw:
        return outcome
    started = time.perf_counter()
    finished = {i: item for i, item in enumerate(outcome.items) if isinstance(item, dict)}
    validate_predictions(list(finished.values()), [tasks[i] for i in finished], label_config)
    if timer is not None:
        timer("validate", time.perf_counter() - started)
    return outcome


def _resolver(inputs: PendingInputs, index: int) -> Callable[[], Any]:
    return lambda: inputs.result(index)


def resume(serving: Serving, tasks: list[dict[str, Any]], inputs: PendingInputs, label_config: str) -> int:
    """Hand tasks a stopped backend left unfinished (their data being fetched as ``inputs``) to this
    configuration's background; how many it took."""
    if serving.continuation is None or not tasks:
        return 0
    keys = task_keys(serving.identity, label_config, tasks)
    return serving.continuation.adopt(
        [Leftover(keys[i], tasks[i], label_config, resolve=_resolver(inputs, i)) for i in range(len(tasks))])


def _submit(
    serving: Serving,
    tasks: list[dict[str, Any]],
    inputs: PendingInputs,
    todo: list[int],
    label_config: str,
    deadline: float,
    context: Any,
    timer: StageTimer | None,
    outcome: Outcome,
) -> tuple[list[tuple[list[int], Future]], list[int]]:
    """Send chunks as their data comes in; stop at the deadline. Returns what was sent and what was not."""
    batcher = serving.batcher
    sent: list[tuple[list[int], Future]] = []
    handled: set[int] = set()
    with batcher.request() as token:
        for batch in inputs.ready_batches(todo, serving.batch_size, deadline, batcher.idle):
            chunk, values = [], []
            for index in batch:
                handled.add(index)
                task_input = inputs.result(index)  # its downloads have ended: no wait
                if task_input.error:
                    outcome.errors[index] = task_input.error
                else:
                    chunk.append(index)
                    values.append(task_input.value)
            if chunk:
                submitted = batcher.submit(
                    Chunk(serving.hooks_id, serving.batch_size, values, [tasks[i] for i in chunk], label_config,
                          context, timer, token)
                )
                sent.append((chunk, submitted))
    return sent, [i for i in todo if i not in handled]
