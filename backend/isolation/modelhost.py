"""The model process's side: hooks are decoded, the model loaded and the pipeline run here, never in
the gunicorn worker (``modelprocess`` is the worker's side and says why).

One request at a time on a stream socket, each a pickled tuple, each answered::

    ("hooks", hooks_id, pre_hook, post_hook, secrets, embed_hook, embed_cache_bytes)
                                                         -> ("ok", {"pre_hook": source, "post_hook": source,
                                                                "embed_hook": source or None,
                                                                "wants": the keywords the hooks take})
    ("load", spec, artifacts_dir, prefer_local)          -> ("ok", model info); prefer_local: the copy on disk
                                                            if this spec was loaded before (restores, restarts)
    ("call", hooks_id, values, tasks, context, label_config)
                                                         -> ("ok", outputs, {stage: seconds})
                                                            (tasks and label_config only if a hook wants them)
    ("forget", hooks_id)                                 -> ("ok",)
    ("resolve", spec)                                    -> ("ok", {"uri", "label"}): the version the spec's
                                                            alias or "latest" names in the registry now
    anything that fails                                  -> ("error", BackendError.to_dict())

Before each stage the process writes the stage's number to a shared page, so that if a hook ends
the process outright (``os._exit``, a crash) the worker can still say which stage did it.

A second socket, the interactive lane, takes only "call" requests, in a thread of its own: a click on
an image embedded already (a decode of milliseconds) runs there while the main lane embeds another
annotator's new image, instead of waiting behind it. It marks no stage (the page is the main lane's).
Outputs go back as plain values: numpy and torch values become the numbers and lists they hold
here, so the worker never needs those libraries and never unpickles anything but plain data.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.core.errors import BackendError, HookUnusable, NotConfigured, PredictionsInvalid
from backend.core.redact import SECRETS, install_log_redaction
from backend.model.embedding import EmbeddingCache

if TYPE_CHECKING:
    from backend.model.pipeline import Embedder

log = logging.getLogger(__name__)

STAGES = ("idle", "decoding hooks", "loading the model", "pre_hook", "model.predict", "post_hook", "embed_hook")
STAGE_BYTES = 8
MAX_HOOK_SETS = 4  # the serving hooks and a few predecessors still finishing queued work
DEFAULT_EMBED_CACHE_BYTES = 256 << 20  # EMBED_CACHE_MB's default


class _PlainPickler(pickle.Pickler):
    """Pickles numpy and torch values (anything with ``tolist``) as the plain values they hold."""

    def reducer_override(self, obj: Any) -> Any:
        tolist = getattr(obj, "tolist", None)
        if callable(tolist) and not isinstance(obj, type):
            value = tolist()
            if type(value) in (list, int, float, bool, str, bytes, complex):
                return type(value), (value,)
        return NotImplemented


def dumps_plain(value: Any) -> bytes:
    buffer = io.BytesIO()
    _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


class ModelHost:
    """What one model process holds: the loaded model and the hook sets by id."""

    def __init__(self, stage: mmap.mmap | None = None) -> None:
        self.stage = stage
        self.loaded: Any = None
        self.hooks: OrderedDict[str, tuple[Any, Any, Any]] = OrderedDict()  # pre, post, embed (or None)
        self.embeddings = EmbeddingCache(DEFAULT_EMBED_CACHE_BYTES)

    def mark(self, name: str) -> None:
        if self.stage is not None:
            self.stage[0] = STAGES.index(name)

    def handle(self, message: tuple) -> tuple:
        try:
            return self._guarded(message)
        finally:
            self.mark("idle")

    def handle_interactive(self, message: tuple) -> tuple:
        """A request on the interactive lane: a call, with no stage marked."""
        if message[0] != "call":
            return ("error", BackendError(f"{message[0]!r} on the interactive lane", "This is a bug in the backend.").to_dict())
        return self._guarded(message, mark=_unmarked)

    def _guarded(self, message: tuple, mark: Callable[[str], None] | None = None) -> tuple:
        kind = message[0]
        try:
            if kind == "call":
                hooks_id, values, tasks, context, label_config = message[1:]
                return self._call(hooks_id, values, tasks, context, label_config, mark or self.mark)
            if kind == "hooks":
                return ("ok", self._hooks(*message[1:]))
            if kind == "load":
                return ("ok", self._load(*message[1:]))
            if kind == "resolve":
                return ("ok", self._resolve(*message[1:]))
            if kind == "forget":
                self.hooks.pop(message[1], None)
                self.embeddings.forget(message[1])
                return ("ok",)
            raise BackendError(f"unknown request {kind!r} to the model process", "This is a bug in the backend.")
        except BackendError as exc:
            if exc.__cause__ is not None:  # a hook's or MLflow's own exception: its traceback is for the log
                log.error("%s", exc.error, exc_info=exc.__cause__)
            return ("error", exc.to_dict())
        except BaseException as exc:
            log.exception("%s failed in the model process", kind)
            return ("error", BackendError(f"{kind} failed in the model process: {type(exc).__name__}: {exc}",
                                          "The backend's log has the traceback.").to_dict())

    def _hooks(self, hooks_id: str, pre_raw: str, post_raw: str, secrets: list[str], embed_raw: str = "",
               embed_cache_bytes: int = DEFAULT_EMBED_CACHE_BYTES) -> dict[str, Any]:
        from backend.model.hookcodec import EMBED_ARGUMENTS, decode_hook

        SECRETS.add(*secrets)
        self.mark("decoding hooks")
        pre, post = decode_hook(pre_raw, "pre_hook"), decode_hook(post_raw, "post_hook")
        embed = decode_hook(embed_raw, "embed_hook", EMBED_ARGUMENTS) if embed_raw else None
        self.hooks[hooks_id] = (pre, post, embed)
        self.hooks.move_to_end(hooks_id)
        if embed is not None:
            share_cores_between_lanes()
        while len(self.hooks) > MAX_HOOK_SETS:
            self.hooks.popitem(last=False)
        for older in [key for key in self.hooks if key != hooks_id]:  # a new configuration: its states are new too
            self.embeddings.forget(older)
        self.embeddings.max_bytes = embed_cache_bytes
        # What the worker need send with each call: the keywords these hooks take.
        wants = pre.accepts | post.accepts | (embed.accepts if embed else frozenset())
        return {"pre_hook": pre.source, "post_hook": post.source, "embed_hook": embed.source if embed else None,
                "wants": sorted(wants)}

    def _load(self, spec_dict: dict[str, Any], artifacts_dir: str, prefer_local: bool = False) -> dict[str, Any]:
        from backend.config.spec import ModelSpec
        from backend.model.loading import load_model

        spec = ModelSpec.from_dict(spec_dict)
        SECRETS.add(spec.tracking_password, spec.tracking_token, spec.tracking_username)
        self.mark("loading the model")
        self.loaded = load_model(spec, Path(artifacts_dir), prefer_local)
        return self.loaded.info()

    def _resolve(self, spec_dict: dict[str, Any]) -> dict[str, str]:
        """Ask the registry which version the spec names now; MLflow is imported here already, never in the worker."""
        from backend.config.spec import ModelSpec
        from backend.model.loading import mlflow_scope, resolve_model_uri, translate_mlflow_error

        spec = ModelSpec.from_dict(spec_dict)
        try:
            with mlflow_scope(spec) as client:
                resolved = resolve_model_uri(client, spec.model_uri)
        except Exception as exc:  # noqa: BLE001 - MLflow's and the network's, named by translate_mlflow_error
            raise translate_mlflow_error(exc, spec) from None
        return {"uri": resolved.uri, "label": resolved.label}

    def _call(self, hooks_id: str, values: list, tasks: list | None, context: Any, label_config: str,
              mark: Callable[[str], None]) -> tuple:
        from backend.model.pipeline import Pipeline

        loaded = self.loaded  # the main lane may load another meanwhile: this call keeps the one it began with
        if loaded is None:
            raise NotConfigured("the model process has no model loaded", "Configure the backend again.")
        hooks = self.hooks.get(hooks_id)
        if hooks is None:
            raise HookUnusable("these hooks were replaced while the prediction waited", "Send the request again.")
        timings: dict[str, float] = {}
        pipeline = Pipeline(loaded, hooks[0], hooks[1], self._embedder(hooks_id, hooks[2], loaded))
        outputs = pipeline.run_batch(values, tasks, context, label_config, timer=timings.__setitem__, mark=mark)
        return ("ok", outputs, timings)


    def _embedder(self, hooks_id: str, embed: Any, loaded: Any) -> Embedder | None:
        """The hook set's embed_hook behind the cache: only the inputs not embedded yet reach it."""
        if embed is None:
            return None

        def states(values: list[Any], extras: dict[str, Any]) -> list[Any]:
            def compute(missing: list[Any]) -> list[Any]:
                tasks = extras.get("tasks")
                if tasks is not None:  # the tasks of the missing inputs, in their order
                    by_input = {id(value): task for value, task in zip(values, tasks)}
                    tasks = [by_input.get(id(value)) for value in missing]
                return embed(missing, tasks=tasks, device=loaded.device, label_config=extras.get("label_config", ""),
                             model=loaded.native)

            return self.embeddings.states(hooks_id, values, compute)

        return states


def _reply(conn: Connection, reply: tuple) -> None:
    try:
        conn.send_bytes(dumps_plain(reply))
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError, ValueError) as exc:
        error = PredictionsInvalid(
            f"the post_hook's output cannot leave the model process: {type(exc).__name__}: {exc}",
            "Return plain dicts, lists, strings and numbers (numpy and torch values are converted for you).",
        )
        conn.send_bytes(dumps_plain(("error", error.to_dict())))


def _unmarked(stage: str) -> None:
    pass


THREAD_SETTINGS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores_between_lanes() -> None:
    """With two lanes a decode runs beside an embedding: each may use half the cores for its math libraries
    (BLAS, OpenMP, torch), or both spin for all of them (measured: the first click on an image 0.80 s
    against 0.32 s on 2 cores). Left alone where the user set the threads themselves."""
    if any(os.environ.get(name) for name in THREAD_SETTINGS):
        return
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=half)  # global and lasting: the process's BLAS and OpenMP pools
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(half)
    for name in THREAD_SETTINGS:  # for libraries the hooks load later
        os.environ[name] = str(half)


def _answer(conn: Connection, handle: Callable[[tuple], tuple]) -> None:
    """One lane's loop: each request answered in turn, until the worker closes its end."""
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        started = time.perf_counter()
        _reply(conn, handle(message))
        log.debug("%s answered in %.1f ms", message[0], (time.perf_counter() - started) * 1000)


def serve(conn_fd: int, stage_fd: int, interactive_fd: int | None = None) -> int:
    """The model process: its interactive lane in a thread, its main lane here, until the worker closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the worker decides when this process ends
    install_log_redaction()
    stage = mmap.mmap(stage_fd, STAGE_BYTES)
    os.close(stage_fd)
    host = ModelHost(stage)
    if interactive_fd is not None:
        threading.Thread(target=_answer, args=(Connection(interactive_fd), host.handle_interactive),
                         name="interactive-lane", daemon=True).start()
    log.info("model process %d ready", os.getpid())
    _answer(Connection(conn_fd), host.handle)
    return 0
