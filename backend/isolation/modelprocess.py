"""The worker's side of a model process: hooks and the model run in a process of their own.

Why a process and not a thread of the gunicorn worker: a hook is user code, written in a hurry. In
the worker, ``sys.exit()`` in a hook ended the worker and made gunicorn's master exit too;
``os._exit`` or a crash took every request of the worker with it; a hung call held its thread for
good (a thread cannot be stopped) and with it the model; a CPU-bound model held the GIL that
``/health`` needs. In a process of its own, each of these costs at most the batch that was running:

- anything a hook raises, ``SystemExit`` and ``KeyboardInterrupt`` included, comes back as the usual
  500 naming the stage;
- a process that ends is noticed at once (its socket closes); its batch fails naming the stage it was
  in (read from a page the process shares), and a new process is forked from the zygote and given
  the same hooks and model, without a new configure; from the third crash in a row (no good call
  between) restarts back off, up to 30 s;
- a call that runs past ``PREDICT_TIMEOUT_S`` is killed and handled the same way;
- a new model gets a new process (the old one serves until the new one is ready), so a hung call of
  an old configuration never delays the next one.

The price is one hop per model call (the inputs are file paths and texts, the outputs the post hook's
predictions) and a second copy of the hooks' imports; the zygote keeps the start of a process at a fork.

With an ``embed_hook``, a process has a second socket, the interactive lane: a click on an image this
process has embedded already (``interactive``) is sent there and answered in milliseconds while the
main lane embeds another image, instead of waiting for it (a deadline or a crash on either lane ends
the process, as above). Any other call, and every other request, takes the main lane.
"""

from __future__ import annotations

import builtins
import io
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import tempfile
import threading
import time
from collections import OrderedDict, deque
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from backend.config.spec import ModelSpec
from backend.core.errors import (
    BackendError,
    DeadlineExceeded,
    HookFailed,
    NotConfigured,
    PredictionsInvalid,
    error_from_dict,
)
from backend.isolation.forking import describe_exit
from backend.isolation.modelhost import DEFAULT_EMBED_CACHE_BYTES, MAX_HOOK_SETS, STAGE_BYTES, STAGES
from backend.isolation.zygote import Zygote, ZygoteUnavailable
from backend.model.embedding import input_key

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0
MAX_RESTART_DELAY_S = 30.0
EMBEDDED_KEYS = 4096  # inputs this side remembers as embedded there (the process's own cache is bounded in bytes)


class ModelProcessCrashed(HookFailed):
    """500: the model process ended while it ran a batch (a hook called os._exit, or it crashed)."""


class Retired(NotConfigured):
    """The process was stopped (its configuration replaced) before or while a call reached it: the
    caller runs the call again on what serves now (``Runtime.serve``, a hook swap loads a new process)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("this configuration was replaced" + detail, "Send the request again.")


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain data: whatever a post hook returns, it cannot run code in the worker."""

    ALLOWED = frozenset({"set", "frozenset", "list", "dict", "tuple", "int", "float", "bool", "str", "bytes", "complex"})

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in self.ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def loads_plain(data: bytes) -> Any:
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise PredictionsInvalid(
            f"the post_hook returned a {exc} value, which the backend does not accept",
            "Return plain dicts, lists, strings and numbers (numpy and torch values are converted for you).",
        ) from None


def _stage_page() -> tuple[int, mmap.mmap]:
    """A small shared page (a memfd where there is one) the model process writes its stage to."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lsbackend-stage")
    else:  # pragma: no cover - non-Linux
        handle, path = tempfile.mkstemp(prefix="lsbackend-stage-")
        os.unlink(path)
        fd = handle
    os.ftruncate(fd, STAGE_BYTES)
    return fd, mmap.mmap(fd, STAGE_BYTES)


def _poller(conn: Connection) -> Any:
    """A poll object on the connection: an answer (or the end of the process) to read; one per lane, not a
    selector per call."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller


class ModelProcess:
    """One model process: forked from the zygote, given hooks and a model, restarted after a crash."""

    def __init__(self, zygote: Zygote, artifacts_dir: Path, call_timeout_s: float,
                 embed_cache_bytes: int = DEFAULT_EMBED_CACHE_BYTES) -> None:
        self.zygote = zygote
        self.artifacts_dir = artifacts_dir.resolve()
        self.call_timeout_s = call_timeout_s
        self.embed_cache_bytes = embed_cache_bytes
        self.state = "new"  # new | idle | busy | loading | crashed | restarting | stopped
        self.pid: int | None = None
        self.model_spec: ModelSpec | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.last_exit = ""
        self.busy_since: float | None = None
        self._lock = threading.Lock()  # one exchange at a time
        # Guards taking and replacing the connection: stop() runs beside a hung exchange (that is its job), and
        # a connection closed twice would close whatever file reused its descriptor number.
        self._conn_lock = threading.Lock()
        self._conn: Connection | None = None
        self._stage: mmap.mmap | None = None
        self._poller: Any = None
        self._lane_lock = threading.Lock()  # one exchange at a time on the interactive lane
        self._lane: Connection | None = None
        self._lane_poller: Any = None
        self._embedding_sets: set[str] = set()  # hook sets with an embed_hook
        self._embedded: OrderedDict[tuple[str, Any], None] = OrderedDict()  # (hook set, input) embedded there
        self._hook_sets: OrderedDict[str, tuple] = OrderedDict()  # by id: the "hooks" message that set it
        self._wants: dict[str, frozenset[str]] = {}  # by hook set: the keywords its hooks take
        self._crashes: deque[float] = deque(maxlen=16)
        self._exits: dict[int, int] = {}
        self._exited = threading.Condition()
        self._restart_at = 0.0

    # -- what the runtime and the batcher call ---------------------------------------------------

    def set_hooks(self, hooks_id: str, pre_hook: str, post_hook: str, secrets: tuple[str, ...] = (),
                  wait_s: float | None = None, embed_hook: str = "") -> dict[str, str] | None:
        """Decode a hook set in the process; None when it stayed busy for ``wait_s`` (a call is running)."""
        if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return None
        try:
            self._ensure_running()
            message = ("hooks", hooks_id, pre_hook, post_hook, list(secrets), embed_hook, self.embed_cache_bytes)
            sources = self._exchange(message, None)[1]
            self._wants[hooks_id] = frozenset(sources.pop("wants", ()))
            self._embedding_sets = {hooks_id} if embed_hook else set()  # the process forgets the older ones' states
            self._embedded.clear()
            self._hook_sets[hooks_id] = message
            self._hook_sets.move_to_end(hooks_id)
            while len(self._hook_sets) > MAX_HOOK_SETS:
                self._wants.pop(self._hook_sets.popitem(last=False)[0], None)
            return sources
        finally:
            self._lock.release()

    def load(self, spec: ModelSpec, prefer_local: bool = False) -> dict[str, Any]:
        """Load the model in the process (no time limit: a large model may take minutes to download).
        ``prefer_local``: what an earlier load of this spec downloaded, without asking the registry."""
        with self._lock:
            self._ensure_running()
            self.state = "loading"
            try:
                info = self._exchange(("load", spec.to_dict(), str(self.artifacts_dir), prefer_local), None)[1]
            finally:
                if self.state == "loading":
                    self.state = "idle"
            self.model_spec, self.info = spec, info
        return info

    def resolve(self, spec: ModelSpec, wait_s: float) -> dict[str, str] | None:
        """Which version the spec's alias (or "latest") names now, asked in the process (which has MLflow
        imported); None when the process stayed busy for ``wait_s``."""
        if not self._lock.acquire(timeout=wait_s):
            return None
        try:
            self._ensure_running()
            return self._exchange(("resolve", spec.to_dict()), self.call_timeout_s)[1]
        finally:
            self._lock.release()

    def call(self, hooks_id: str, values: list[Any], tasks: list[dict[str, Any]] | None, context: Any,
             label_config: str) -> tuple[list[Any], dict[str, float]]:
        """One batch through the pipeline; the outputs and the seconds of each stage. Tasks and the
        labeling config go only to hooks that take them: tasks are most of what there is to send."""
        tasks, label_config = self._wanted(hooks_id, tasks, label_config)
        with self._lock:
            self._ensure_running()
            if self.model_spec is not None and self.info == {}:
                raise NotConfigured("the model process has no model", "Configure the backend again.")
            self.state, self.busy_since = "busy", time.monotonic()
            try:
                reply = self._exchange(("call", hooks_id, values, tasks, context, label_config), self.call_timeout_s)
                self._crashes.clear()  # back off only for crashes in a row
            finally:
                self.busy_since = None
                if self.state == "busy":
                    self.state = "idle"
        self._remember_embedded(hooks_id, values)
        return reply[1], reply[2]

    def interactive(self, hooks_id: str, values: list[Any]) -> bool:
        """Whether a call on these inputs is a click on images this process has embedded: one for the
        interactive lane."""
        return hooks_id in self._embedding_sets and all((hooks_id, input_key(v)) in self._embedded for v in values)

    def call_interactive(self, hooks_id: str, values: list[Any], tasks: list[dict[str, Any]] | None, context: Any,
                         label_config: str) -> tuple[list[Any], dict[str, float]]:
        """``call`` on the interactive lane, beside whatever the main lane runs (there, when this process
        has no lane now: it is being forked again)."""
        tasks, label_config = self._wanted(hooks_id, tasks, label_config)
        with self._lane_lock:
            lane, poller = self._lane, self._lane_poller
            if lane is not None and self.state in ("idle", "busy"):
                reply = self._exchange(("call", hooks_id, values, tasks, context, label_config), self.call_timeout_s,
                                       lane=(lane, poller))
                self._remember_embedded(hooks_id, values)
                return reply[1], reply[2]
        return self.call(hooks_id, values, tasks, context, label_config)

    def _wanted(self, hooks_id: str, tasks: list[dict[str, Any]] | None,
                label_config: str) -> tuple[list[dict[str, Any]] | None, str]:
        """The tasks and the labeling config, where the hook set's hooks take them: tasks are most of what
        there is to send."""
        wants = self._wants.get(hooks_id, frozenset({"tasks", "label_config"}))
        return (tasks if "tasks" in wants else None), (label_config if "label_config" in wants else "")

    def _remember_embedded(self, hooks_id: str, values: list[Any]) -> None:
        if hooks_id not in self._embedding_sets:
            return
        for value in values:
            key = (hooks_id, input_key(value))
            self._embedded[key] = None
            self._embedded.move_to_end(key)
        while len(self._embedded) > EMBEDDED_KEYS:
            self._embedded.popitem(last=False)

    def stop(self) -> None:
        """End the process at once, whatever it is doing (a retired configuration, a hung call)."""
        with self._conn_lock:
            self.state = "stopped"
            conn, self._conn = self._conn, None
            lane, self._lane = self._lane, None
        self._kill()
        for closing in (conn, lane):
            if closing is not None:
                closing.close()

    def describe(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"pid": self.pid, "state": self.state, "restarts": self.restarts}
        if self.busy_since is not None:
            shown["busy_s"] = round(time.monotonic() - self.busy_since, 1)
        if self.last_exit:
            shown["last_exit"] = self.last_exit
        return shown

    # -- the process itself ------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        """A live process holding this object's hooks and model; a crashed one is forked again (backoff)."""
        if self.state == "stopped":
            raise Retired()
        if self._conn is not None and self.state not in ("crashed", "restarting"):
            return
        wait = self._restart_at - time.monotonic()
        if wait > 0:
            raise NotConfigured(
                f"the model process keeps ending ({len(self._crashes)} times in {CRASH_WINDOW_S:g} s, last: {self.last_exit})",
                f"It is restarted in {wait:.0f} s. Fix the hook named in the backend's log and configure again.",
            )
        first = self.pid is None
        self._fork()
        if first:
            return
        self.restarts += 1
        self.state = "restarting"
        for message in self._hook_sets.values():
            self._exchange(message, None)
        if self.model_spec is not None:
            # The same model again, from disk: a restart does not depend on the registry being up.
            self.info = self._exchange(("load", self.model_spec.to_dict(), str(self.artifacts_dir), True), None)[1]
        self.state = "idle"
        log.info("model process %s restarted with the same configuration (restart %d)", self.pid, self.restarts)

    def _fork(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lane_mine, lane_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stage_fd, stage = _stage_page()
        try:
            pid = self.zygote.fork(theirs.fileno(), stage_fd, lane_theirs.fileno(), timeout=300)
        except ZygoteUnavailable as exc:
            mine.close()
            lane_mine.close()
            stage.close()
            raise BackendError(str(exc), "The backend's log says why; restart the backend if this persists.") from exc
        finally:
            theirs.close()
            lane_theirs.close()
            os.close(stage_fd)
        conn, lane = Connection(mine.detach()), Connection(lane_mine.detach())
        with self._conn_lock:
            stopped = self.state == "stopped"  # stop() came while this fork ran: the new process is not wanted
            if not stopped:
                old, self._conn, self._stage, self.pid = self._conn, conn, stage, pid
                old_lane, self._lane = self._lane, lane
                self._poller, self._lane_poller = _poller(conn), _poller(lane)
                self._embedded.clear()  # a new process has embedded nothing yet
                self.state = "idle"
        self.zygote.on_exit(pid, partial(self._on_exit, pid))
        if stopped:
            os.kill(pid, signal.SIGKILL)
            conn.close()
            lane.close()
            stage.close()
            raise Retired()
        for closing in (old, old_lane):
            if closing is not None:
                closing.close()

    def _on_exit(self, pid: int, status: int) -> None:
        with self._exited:
            self._exits[pid] = status
            self._exited.notify_all()

    def _exit_of(self, pid: int | None, wait_s: float = 1.0) -> str:
        with self._exited:
            self._exited.wait_for(lambda: pid in self._exits, wait_s)
            return describe_exit(self._exits.pop(pid, None) if pid is not None else None)

    def _kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _exchange(self, message: tuple, timeout: float | None, lane: tuple[Connection, Any] | None = None) -> tuple:
        """Send one request and read its answer, on the main lane or ``lane`` (its connection and poller);
        the caller holds that lane's lock."""
        conn, poller = lane or (self._conn, self._poller)
        if conn is None:  # stop() ran since the caller checked the process was running
            raise Retired()
        try:
            conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            if not poller.poll(None if timeout is None else timeout * 1000):  # an answer, or the end of the process
                self._kill()
                self._lost(f"ran past {timeout:g} s (PREDICT_TIMEOUT_S)")
                raise DeadlineExceeded(
                    f"the model call did not finish within {timeout:g} s; the model process was stopped",
                    "A hook or the model hung. It restarts with the same configuration; fix what hangs, "
                    "or raise PREDICT_TIMEOUT_S if the model is that slow.",
                )
            data = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            if self.state == "stopped":
                raise Retired(" while it ran") from exc
            stage = STAGES[self._stage[0]] if self._stage is not None and self._stage[0] < len(STAGES) else "?"
            stage = "an interactive call" if lane is not None else stage
            how = self._exit_of(self.pid)
            self._lost(how)
            raise ModelProcessCrashed(
                f"the model process ended while running {stage} ({how})",
                f"A hook or the model ended its process (os._exit, a crash, running out of memory). The backend "
                f"restarted it with the same configuration; fix the {stage}.",
            ) from exc
        reply = loads_plain(data)
        if reply[0] == "error":
            raise error_from_dict(reply[1])
        return reply

    def _lost(self, how: str) -> None:
        """The process is gone (or killed): the next exchange forks a new one, after a backoff if it keeps happening."""
        now = time.monotonic()
        self.last_exit = how
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > CRASH_WINDOW_S:
            self._crashes.popleft()
        recent = len(self._crashes)
        self._restart_at = now + (0.0 if recent <= 2 else min(MAX_RESTART_DELAY_S, 2.0 ** (recent - 3)))
        with self._conn_lock:
            if self.state != "stopped":
                self.state = "crashed"
            conn, self._conn = self._conn, None
            lane, self._lane = self._lane, None
        for closing in (conn, lane):
            if closing is not None:
                closing.close()
        log.error("model process %s %s", self.pid, how)
        threading.Thread(target=self._restart_soon, name="model-restart", daemon=True).start()

    def _restart_soon(self) -> None:
        """Bring the process back before the next request needs it."""
        delay = self._restart_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with self._lock:
            if self.state == "crashed":
                try:
                    self._ensure_running()
                except BackendError as exc:
                    log.error("restarting the model process failed: %s", exc.error)
