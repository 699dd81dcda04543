"""Task data to what the pre hook gets: local files for media, the text itself for text.

Sources: http(s) URLs (Label Studio's own ``/data/...`` URLs with its token, see ``labelstudio``),
cloud URIs (s3://, gs://, azure-blob://) through Label Studio's presign endpoint, ``data:`` URIs,
DagsHub URLs with the DagsHub token, DagsHub datapoints by ``meta.datapoint_id`` when the task's own
reference fails (see ``datapoints``), and local files under the folders the operator allows.
Downloads share one pooled session, run concurrently with a bound, and are cached on disk by URL;
one failing download fails its task only, and a task whose data is of the wrong type fails alone.

Tasks are written by whoever can add one to a connected project, so what they may reach is bounded
(``outbound`` for addresses; here: which local folders, how large a file, how long a download) and
what a failure says stays at "could not fetch" plus, for a refusal, the setting that allows it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import mimetypes
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import requests

from backend.config.spec import ModelSpec
from backend.core.redact import redact
from backend.core.settings import Settings
from backend.labeling.validation import DataObject
from backend.tasks.datapoints import DatapointDirectory, DatapointNotFound, DatasourceRef
from backend.tasks.diskcache import DiskCache, TooLarge
from backend.tasks.labelstudio import LabelStudioAccess, LabelStudioAuth, LabelStudioRefused, token_kind
from backend.tasks.outbound import AddressPolicy, AddressRefused, GuardedSession

log = logging.getLogger(__name__)

LABEL_STUDIO_PATHS = ("/data/upload/", "/data/local-files/", "/storage-data/", "/tasks/", "/data/")
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
CONNECT_TIMEOUT_S = 5.0
QUIET_S = 0.05  # no download ended for this long: the rest are slow, send what is in
READY_POLL_S = 0.001  # how often a part-filled batch looks whether the model became idle
NEVER_READ = ("/proc", "/sys", "/dev")  # whatever LOCAL_FILES_ROOTS says


def _datapoint_id(task: dict[str, Any]) -> Any:
    meta = task.get("meta")
    return meta.get("datapoint_id") if isinstance(meta, dict) else None


@dataclass(frozen=True)
class DagshubAccess:
    """DagsHub's host and token: its file URLs need the token as a bearer."""

    host: str = ""
    token: str = field(default="", repr=False)
    datasource: DatasourceRef | None = None  # where tasks' meta.datapoint_id can be looked up

    def owns(self, url: str) -> bool:
        return bool(self.host) and urlparse(url).netloc == urlparse(self.host).netloc

    def headers_for(self, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token and self.owns(url) else {}


def dagshub_access(spec: ModelSpec) -> DagshubAccess | None:
    """DagsHub's host and token for a dagshub-form configure, with its datasource for datapoint lookups."""
    source = spec.dagshub
    if source is None:
        return None
    datasource = None
    if source.datasource_repo and source.datasource_name:
        datasource = DatasourceRef(source.host, source.datasource_repo, source.datasource_name, spec.tracking_password)
    return DagshubAccess(source.host, spec.tracking_password, datasource)


class FetchError(Exception):
    """One item could not be fetched; fails its task only."""


@dataclass(frozen=True)
class LocalFiles:
    """Which local files task data may name: only under ``roots``, never under ``never``, symlinks followed."""

    roots: tuple[str, ...] = ()
    never: tuple[str, ...] = NEVER_READ

    def __post_init__(self) -> None:
        object.__setattr__(self, "_roots", tuple(os.path.realpath(r) for r in self.roots))
        object.__setattr__(self, "_never", tuple(os.path.realpath(n) for n in self.never))

    def allows(self, path: str) -> bool:
        real = os.path.realpath(path)
        return not _under(real, self._never) and _under(real, self._roots)  # type: ignore[attr-defined]

    def check(self, path: str) -> str:
        """``path`` when task data may read it; otherwise a FetchError naming the setting that allows it."""
        real = os.path.realpath(path)
        if _under(real, self._never):  # type: ignore[attr-defined]
            raise FetchError(f"local file {path!r} is in a folder task data may never read")
        if not _under(real, self._roots):  # type: ignore[attr-defined]
            allowed = f" (allowed now: {', '.join(self.roots)})" if self.roots else ""
            raise FetchError(
                f"local file {path!r} is outside the folders task data may read{allowed}: "
                f"set LOCAL_FILES_ROOTS to a folder that holds it, e.g. LOCAL_FILES_ROOTS={os.path.dirname(real)}"
            )
        if not os.path.isfile(real):
            raise FetchError(f"no such local file: {path!r}")
        return path


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


@dataclass
class TaskInput:
    """What the pre hook gets for one task, or why it cannot get anything."""

    value: Any = None
    error: str = ""


def _input_value(values: dict[str, Any], objects: tuple[DataObject, ...]) -> Any:
    """One object's value as is; several as a dict by task data key, in config order."""
    return values[objects[0].key] if len(objects) == 1 else {obj.key: values[obj.key] for obj in objects}


class PendingInputs(Sequence[TaskInput]):
    """Tasks' inputs whose downloads may still run: getting one waits for that task's files only."""

    def __init__(
        self, inputs: list[TaskInput], downloads: dict[int, dict[str, Any]], objects: tuple[DataObject, ...]
    ) -> None:
        """``downloads``: for each task still downloading, its values by key, a Future where one is pending."""
        self._inputs, self._downloads, self._objects = inputs, downloads, objects
        self._lock = threading.Lock()
        self._finished: queue.SimpleQueue[int] = queue.SimpleQueue()  # tasks whose downloads all ended
        self.started = self.last_ready = time.perf_counter()
        for index, values in downloads.items():
            futures = [v for v in values.values() if isinstance(v, Future)]
            left = [len(futures)]
            for future in futures:
                future.add_done_callback(partial(self._one_ended, index, left))

    def _one_ended(self, index: int, left: list[int], _: Future) -> None:
        with self._lock:
            left[0] -= 1
            ended = left[0] == 0
        if ended:
            self._finished.put(index)

    def ready_batches(
        self, indices: Sequence[int], size: int, deadline: float, model_idle: Callable[[], bool] = lambda: True
    ) -> Iterator[list[int]]:
        """``indices`` in batches of at most ``size`` whose data is in: those with nothing to download first,
        in order, then the others as their downloads end. A full batch goes out at once; a part-filled one
        when no download has ended for QUIET_S and the model is idle. So a slow or hung download never
        holds up the tasks that are in, and downloads that keep ending fill a batch instead of becoming
        many small calls (each costs a hop, and on a small machine the CPU the downloads need). Stops at
        ``deadline``."""
        waiting = {i for i in indices if i in self._downloads}
        batch = [i for i in indices if i not in waiting]
        while len(batch) >= size:
            yield batch[:size]
            batch = batch[size:]
        flush_at = time.monotonic()  # the instantly ready ones go as soon as the model is idle
        while waiting:
            now = time.monotonic()
            until = min(flush_at, deadline) if batch else deadline
            try:
                index = self._finished.get(timeout=max(0.0, until - now))
            except queue.Empty:
                if not batch:
                    return  # the deadline
                if time.monotonic() >= deadline or model_idle():
                    yield batch
                    batch = []
                else:
                    flush_at = time.monotonic() + READY_POLL_S  # look again once the model may be idle
                continue
            flush_at = time.monotonic() + QUIET_S
            if index in waiting:
                waiting.discard(index)
                batch.append(index)
                if len(batch) == size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index):  # Sequence's overloads, without the ceremony
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.result(index)

    def result(self, index: int) -> TaskInput:
        """Task ``index``'s input, waiting as long as its downloads take (they have their own timeouts)."""
        found = self.wait(index, None)
        assert found is not None  # without a deadline, wait returns only with the input
        return found

    def wait(self, index: int, deadline: float | None) -> TaskInput | None:
        """Task ``index``'s input once its files are in; None if ``deadline`` (monotonic) passes first."""
        with self._lock:
            values = self._downloads.get(index)
        if values is None:
            return self._inputs[index]
        task_input = self._inputs[index]
        try:
            for key, value in list(values.items()):
                if isinstance(value, Future):
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    values[key] = value.result(timeout=timeout)
        except FutureTimeout:
            return None
        except FetchError as exc:
            task_input.error = str(exc)
        except Exception as exc:
            log.exception("fetching task data failed")
            task_input.error = f"could not fetch its data ({type(exc).__name__})"
        else:
            task_input.value = _input_value(values, self._objects)
        with self._lock:
            self._downloads.pop(index, None)
        self.last_ready = time.perf_counter()
        return task_input

    @property
    def fetch_seconds(self) -> float:
        """From the start of the downloads until the last input needed so far was in."""
        return self.last_ready - self.started


class KeyedLocks:
    """A lock per key, kept only while someone holds or waits for it. Striped locks would bound memory
    too, but make different URLs wait for each other on a hash collision: with 16 downloads in flight
    over 64 stripes, most batches have one."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [users])

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(frozen=True)
class FetchLimits:
    """How far task data may reach: local folders, private addresses, file size, time per download."""

    local: LocalFiles = field(default_factory=LocalFiles)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    max_file_bytes: int = 100 << 20
    timeout_s: float = 30.0


def fetch_limits(settings: Settings) -> FetchLimits:
    """What task data may reach under these settings (the serving worker's and a training's alike)."""
    return FetchLimits(
        local=LocalFiles(settings.local_files_roots, NEVER_READ + (str(settings.model_dir),)),
        addresses=AddressPolicy(settings.fetch_allow_private),
        max_file_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )


class TaskDataFetcher:
    """Fetches many tasks' data at once through one pooled session and an on-disk cache."""

    def __init__(
        self,
        cache_dir: Path,
        concurrency: int = 16,
        limits: FetchLimits | None = None,
        datapoints: DatapointDirectory | None = None,
        cache_max_bytes: int = 2 << 30,
        label_studio_auth: LabelStudioAuth | None = None,
    ) -> None:
        self.limits = limits or FetchLimits()
        self.cache = DiskCache(cache_dir, cache_max_bytes)
        self.datapoints = datapoints or DatapointDirectory()
        self.auth = label_studio_auth or LabelStudioAuth()
        self.http = GuardedSession(self.limits.addresses, concurrency)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")
        self._url_locks = KeyedLocks()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
        self.cache.close()

    def fetch_tasks(
        self,
        tasks: list[dict[str, Any]],
        objects: tuple[DataObject, ...],
        label_studio: LabelStudioAccess,
        dagshub: DagshubAccess | None = None,
    ) -> list[TaskInput]:
        """One TaskInput per task, in order, once every download has finished."""
        return list(self.start_tasks(tasks, objects, label_studio, dagshub))

    def start_tasks(
        self,
        tasks: list[dict[str, Any]],
        objects: tuple[DataObject, ...],
        label_studio: LabelStudioAccess,
        dagshub: DagshubAccess | None = None,
        skip: set[int] | frozenset[int] = frozenset(),
    ) -> PendingInputs:
        """Start every task's downloads at once; each task's input is ready as soon as its own files are,
        so the model can work on the first chunk while the rest still download. Tasks in ``skip`` (already
        answered or being predicted) are left alone."""
        downloads: dict[int, dict[str, Any]] = {}
        inputs = [TaskInput() for _ in tasks]
        for index, task in enumerate(tasks):
            if index in skip:
                continue
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                inputs[index].error = "task has no 'data' object"
                continue
            by_datapoint = dagshub is not None and dagshub.datasource is not None and _datapoint_id(task) is not None
            values: dict[str, Any] = {}
            pending = False
            for obj in objects:
                if obj.key not in data and (obj.is_text or not by_datapoint):
                    inputs[index].error = obj.missing_message
                    break
                raw = data.get(obj.key)
                problem = None if (raw is None and by_datapoint) else obj.wrong_type(raw)
                if problem:
                    inputs[index].error = problem
                    break
                if obj.is_text or not isinstance(raw, (str, type(None))):
                    values[obj.key] = raw
                elif isinstance(raw, str) and not by_datapoint and self._is_local(raw):
                    try:  # a local file: checked here and now, no download to wait for
                        values[obj.key] = self.fetch_one(raw, task.get("id"), label_studio, dagshub)
                    except FetchError as exc:
                        inputs[index].error = str(exc)
                        break
                else:
                    values[obj.key] = self.pool.submit(
                        self._fetch_task_object, raw, obj.missing_message, task, label_studio, dagshub
                    )
                    pending = True
            else:
                if pending:
                    downloads[index] = values
                else:
                    inputs[index].value = _input_value(values, objects)
        return PendingInputs(inputs, downloads, objects)

    def _is_local(self, raw: str) -> bool:
        """A plain path or file:// (not a URL, a data: URI, a cloud URI or a path Label Studio serves)."""
        if raw.startswith(("data:", "http://", "https://") + CLOUD_SCHEMES):
            return False
        return not raw.startswith(LABEL_STUDIO_PATHS) or self.limits.local.allows(raw)

    def _fetch_task_object(
        self,
        raw: str | None,
        missing: str,
        task: dict[str, Any],
        label_studio: LabelStudioAccess,
        dagshub: DagshubAccess | None,
    ) -> str:
        """The task's own reference; failing that (or without one), its DagsHub datapoint."""
        try:
            if raw is None:
                raise FetchError(missing)
            return self.fetch_one(raw, task.get("id"), label_studio, dagshub)
        except FetchError as first:
            datapoint_id = _datapoint_id(task)
            if datapoint_id is None or dagshub is None or dagshub.datasource is None:
                raise
            try:
                url = self.datapoints.url_for(dagshub.datasource, datapoint_id)
            except DatapointNotFound as exc:
                raise FetchError(f"{first}; {exc}") from exc
            return self._download(url, label_studio, dagshub)

    def fetch_one(
        self, raw: str, task_id: Any, label_studio: LabelStudioAccess, dagshub: DagshubAccess | None = None
    ) -> str:
        """One reference to a local path."""
        if raw.startswith("data:"):
            return self._from_data_uri(raw)
        if raw.startswith(CLOUD_SCHEMES):
            if not label_studio.url or not label_studio.token:
                raise FetchError(
                    f"{raw!r} is a cloud storage URI and Label Studio's address or token is unknown: "
                    "connect the backend from Label Studio (its /setup sends both) or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
                )
            if task_id is None:
                raise FetchError(f"{raw!r} is a cloud storage URI but the task has no id to presign it with")
            encoded = base64.urlsafe_b64encode(raw.encode()).decode()
            return self._download(f"{label_studio.url}/tasks/{task_id}/presign/?fileuri={encoded}", label_studio, dagshub)
        if raw.startswith(("http://", "https://")):
            return self._download(raw, label_studio, dagshub)
        if raw.startswith("file://"):
            return self.limits.local.check(unquote(urlparse(raw).path))
        if raw.startswith(LABEL_STUDIO_PATHS) and not self.limits.local.allows(raw):
            if not label_studio.url:
                raise FetchError(
                    f"{raw!r} is a Label Studio path and Label Studio's address is unknown: "
                    "connect the backend from Label Studio or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
                )
            return self._download(label_studio.url + raw, label_studio, dagshub)
        return self.limits.local.check(raw)

    def _from_data_uri(self, raw: str) -> str:
        header, sep, payload = raw.partition(",")
        if not sep:
            raise FetchError("data: URI has no ',' before its payload")
        limit = self.limits.max_file_bytes
        if len(payload) * 3 // 4 > limit:
            raise FetchError(f"data: URI is larger than {limit / (1 << 20):g} MB: raise FETCH_MAX_MB to allow it")
        mime = header[5:].split(";")[0] or "application/octet-stream"
        try:
            content = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote(payload).encode()
        except (binascii.Error, ValueError) as exc:
            raise FetchError(f"data: URI has bad base64: {exc}") from exc
        suffix = mimetypes.guess_extension(mime) or ""
        cached = self.cache.lookup(raw, suffix)
        return cached or self.cache.store(raw, suffix, [content], limit, "FETCH_MAX_MB")

    def _download(self, url: str, label_studio: LabelStudioAccess, dagshub: DagshubAccess | None) -> str:
        suffix = Path(urlparse(url).path).suffix[:10]
        cached = self.cache.lookup(url, suffix)
        if cached:
            return cached
        with self._url_locks.hold(url):  # two tasks with one URL download it once
            return self.cache.lookup(url, suffix) or self._get(url, suffix, label_studio, dagshub)

    def _get(self, url: str, suffix: str, label_studio: LabelStudioAccess, dagshub: DagshubAccess | None) -> str:
        trusted = frozenset(h for h in (label_studio.host, urlparse(dagshub.host).hostname if dagshub else "") if h)
        for_label_studio = label_studio.owns(url)
        for attempt in (1, 2):
            try:
                headers = self.auth.headers(label_studio, fresh=attempt > 1) if for_label_studio else {}
            except LabelStudioRefused as exc:
                raise FetchError(f"could not fetch {url}: {exc}") from None
            if dagshub is not None:
                headers.update(dagshub.headers_for(url))
            with self.http.guarded(url, trusted, self.limits.timeout_s) as download:
                try:
                    return self._read(url, suffix, headers, download, label_studio if for_label_studio else None,
                                      retry_on_401=attempt == 1 and token_kind(label_studio.token) == "personal access token")
                except _Retry:
                    continue
                except (requests.RequestException, OSError) as exc:
                    log.info("GET %s failed: %s: %s", redact(url), type(exc).__name__, redact(str(exc)))
                    if download.refused:
                        raise FetchError(f"could not fetch {url}: {download.refused}") from None
                    raise FetchError(f"could not fetch {url}") from None
                except AddressRefused as exc:
                    raise FetchError(f"could not fetch {url}: {exc}") from None
                except TooLarge as exc:
                    raise FetchError(f"could not fetch {url}: {exc}") from None
        raise FetchError(f"could not fetch {url}")

    def _read(self, url: str, suffix: str, headers: dict[str, str], download: Any,
              label_studio: LabelStudioAccess | None, retry_on_401: bool) -> str:
        timeout = (min(CONNECT_TIMEOUT_S, self.limits.timeout_s), self.limits.timeout_s)
        with self.http.session.get(url, headers=headers, timeout=timeout, stream=True) as response:
            status = response.status_code
            if status == 401 and retry_on_401:
                raise _Retry
            if status != 200:
                detail = ""
                if label_studio is not None and status in (401, 403):
                    detail = ": " + label_studio.refused(status, response.text[:500])
                raise FetchError(f"could not fetch {url}: it answered {status}{detail}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.limits.max_file_bytes:
                raise TooLarge(
                    f"it is larger than {self.limits.max_file_bytes / (1 << 20):g} MB: raise FETCH_MAX_MB to allow it"
                )
            path = self.cache.store(url, suffix, _body(response, download), self.limits.max_file_bytes, "FETCH_MAX_MB")
            download.finish()
            return path


def _body(response: requests.Response, download: Any) -> Iterator[bytes]:
    """The body's chunks; a download the watchdog cut short fails here (a shut socket reads as the end)."""
    yield from response.iter_content(chunk_size=1 << 16)
    if download.expired:
        raise TimeoutError("the download passed FETCH_TIMEOUT_S")


class _Retry(Exception):
    """Label Studio said 401 to an exchanged token: exchange the PAT again and retry once."""
