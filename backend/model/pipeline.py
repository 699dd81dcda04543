"""The pipeline of a configured model: a loaded MLflow model and its two hooks.

``pre_hook(inputs) -> model.predict -> post_hook(outputs)`` on one batch; the post hook must give back
one prediction per task. Hooks that take ``tasks``, ``context``, ``device``, ``label_config``,
``inputs`` (what the pre hook got) or ``state`` as keywords get them; one-argument hooks (the DagsHub
form) work as they are. With an ``embed_hook`` (promptable models), ``state`` is its output for each
input, computed once per image and kept by the model process (``embedding``): a click runs only the
pre hook, the model and the post hook on it.

This runs in the backend's model process (``backend/isolation/modelhost.py``), where nothing a hook does can
end the server, and in-process for ``python -m hooks check``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.core.errors import HookFailed, PredictionsInvalid
from backend.model.hookcodec import Hook
from backend.model.loading import LoadedModel

StageTimer = Callable[[str, float], None]
# (inputs, the extras the hooks get) -> one state per input: the embed_hook behind the model process's cache.
Embedder = Callable[[list[Any], dict[str, Any]], list[Any]]


@dataclass
class Pipeline:
    """A loaded model and the hooks around it."""

    loaded: LoadedModel
    pre_hook: Hook
    post_hook: Hook
    embed: Embedder | None = None

    def run_batch(
        self,
        values: list[Any],
        tasks: list[dict[str, Any]] | None,
        context: Any = None,
        label_config: str = "",
        timer: StageTimer | None = None,
        mark: Callable[[str], None] | None = None,
    ) -> list[Any]:
        """pre_hook -> predict -> post_hook on one batch. Whatever a stage raises, ``SystemExit`` and
        ``KeyboardInterrupt`` included, becomes a HookFailed naming the stage. ``tasks`` may be None
        when no hook asks for them (they are the bulk of what a model process would be sent)."""
        extras: dict[str, Any] = {"tasks": tasks, "context": context, "device": self.loaded.device,
                                  "label_config": label_config, "inputs": values}
        if self.embed is not None:
            embed = self.embed
            extras["state"] = _stage("embed_hook", lambda: embed(values, extras), timer, mark)
        model_input = _stage("pre_hook", lambda: self.pre_hook(values, **extras), timer, mark)
        model_output = _stage("model.predict", lambda: self.loaded.predict(model_input), timer, mark)
        outputs = _stage("post_hook", lambda: self.post_hook(model_output, **extras), timer, mark)
        if hasattr(outputs, "tolist") and not isinstance(outputs, (list, dict)):
            outputs = outputs.tolist()
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(values):
            got = len(outputs) if isinstance(outputs, (list, tuple)) else f"a {type(outputs).__name__}"
            raise PredictionsInvalid(
                f"post_hook returned {got} predictions for {len(values)} tasks",
                "Return a list with exactly one prediction per task, in task order "
                "(an empty {'result': []} for a task with nothing found).",
            )
        return list(outputs)


def _stage(name: str, call: Callable[[], Any], timer: StageTimer | None, mark: Callable[[str], None] | None) -> Any:
    if mark is not None:
        mark(name)
    started = time.perf_counter()
    try:
        return call()
    except BaseException as exc:
        hint = "Check that what pre_hook returns matches the model's input." if name == "model.predict" else f"Fix the {name}."
        raise HookFailed(
            f"{name} raised {type(exc).__name__}: {exc}",
            f"The error is in the {name} step; the backend's log has the traceback. {hint}",
        ) from exc
    finally:
        if timer is not None:
            timer(name.removeprefix("model."), time.perf_counter() - started)
