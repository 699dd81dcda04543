"""Task data to what the pre hook gets: local files for media, the text itself for text.

Sources: http(s) URLs (Label Studio's own ``/data/...`` URLs with its token), cloud URIs (s3://,
gs://, azure-blob://) through Label Studio's presign endpoint, local paths and ``file://``,
``data:`` URIs, DagsHub URLs with the DagsHub token, and DagsHub datapoints by ``meta.datapoint_id``
when the task's own reference fails (see ``datapoints``). Downloads share one HTTP session, run
concurrently with a bound, and are cached on disk by URL; one failing download fails its task only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import mimetypes
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import requests
from requests.adapters import HTTPAdapter

from .datapoints import DatapointDirectory, DatapointNotFound, DatasourceRef
from .validation import DataObject

log = logging.getLogger(__name__)

LABEL_STUDIO_PATHS = ("/data/upload/", "/data/local-files/", "/storage-data/", "/tasks/", "/data/")
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")


def _datapoint_id(task: dict[str, Any]) -> Any:
    meta = task.get("meta")
    return meta.get("datapoint_id") if isinstance(meta, dict) else None


def _same_host(url: str, base: str) -> bool:
    return bool(base) and urlparse(url).netloc == urlparse(base).netloc


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the token to fetch its files with (from /setup or the environment)."""

    url: str = ""
    token: str = field(default="", repr=False)

    def headers_for(self, url: str) -> dict[str, str]:
        if not self.token or not _same_host(url, self.url):
            return {}
        scheme = "Bearer" if self.token.count(".") == 2 else "Token"  # JWTs are Bearer, legacy tokens Token
        return {"Authorization": f"{scheme} {self.token}"}


@dataclass(frozen=True)
class DagshubAccess:
    """DagsHub's host and token: its file URLs need the token as a bearer."""

    host: str = ""
    token: str = field(default="", repr=False)
    datasource: DatasourceRef | None = None  # where tasks' meta.datapoint_id can be looked up

    def headers_for(self, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token and _same_host(url, self.host) else {}


class FetchError(Exception):
    """One item could not be fetched; fails its task only."""


@dataclass
class TaskInput:
    """What the pre hook gets for one task, or why it cannot get anything."""

    value: Any = None
    error: str = ""


def _input_value(values: dict[str, Any], objects: tuple[DataObject, ...]) -> Any:
    """One object's value as is; several as a dict by task data key, in config order."""
    return values[objects[0].key] if len(objects) == 1 else {obj.key: values[obj.key] for obj in objects}


class PendingInputs(Sequence[TaskInput]):
    """Tasks' inputs whose downloads may still run: indexing one waits for that task's files only."""

    def __init__(
        self, inputs: list[TaskInput], downloads: dict[int, dict[str, Any]], objects: tuple[DataObject, ...]
    ) -> None:
        """``downloads``: for each task still downloading, its values by key, a Future where one is pending."""
        self._inputs, self._downloads, self._objects = inputs, downloads, objects
        self.started = self.last_ready = time.perf_counter()

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index in self._downloads:
            self._resolve(index)
        return self._inputs[index]

    def _resolve(self, index: int) -> None:
        task_input, values = self._inputs[index], self._downloads.pop(index)
        try:
            for key, value in values.items():
                if isinstance(value, Future):
                    values[key] = value.result()
        except FetchError as exc:
            task_input.error = str(exc)
        else:
            task_input.value = _input_value(values, self._objects)
        self.last_ready = time.perf_counter()

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


class TaskDataFetcher:
    """Fetches many tasks' data at once through one pooled session and an on-disk cache."""

    def __init__(
        self,
        cache_dir: Path,
        concurrency: int = 16,
        timeout: float = 30.0,
        datapoints: DatapointDirectory | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.datapoints = datapoints or DatapointDirectory()
        self.timeout = timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=concurrency, pool_maxsize=concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "label-studio-mlflow-backend"
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")
        self._url_locks = KeyedLocks()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()

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
    ) -> PendingInputs:
        """Start every task's downloads at once; each task's input is ready as soon as its own files are,
        so the model can work on the first chunk while the rest still download."""
        downloads: dict[int, dict[str, Any]] = {}
        inputs = [TaskInput() for _ in tasks]
        for index, task in enumerate(tasks):
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
                if obj.is_text or (raw is not None and not isinstance(raw, str)):
                    values[obj.key] = raw
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
            return self._local(unquote(urlparse(raw).path))
        if raw.startswith(LABEL_STUDIO_PATHS) and not Path(raw).exists():
            if not label_studio.url:
                raise FetchError(
                    f"{raw!r} is a Label Studio path and Label Studio's address is unknown: "
                    "connect the backend from Label Studio or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
                )
            return self._download(label_studio.url + raw, label_studio, dagshub)
        return self._local(raw)

    def _local(self, path: str) -> str:
        if not os.path.isfile(path):
            raise FetchError(f"no such local file: {path!r}")
        return path

    def _cache_path(self, key: str, suffix: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.cache_dir / digest[:2] / f"{digest}{suffix}"

    def _write(self, target: Path, chunks: Any) -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)

    def _from_data_uri(self, raw: str) -> str:
        header, sep, payload = raw.partition(",")
        if not sep:
            raise FetchError("data: URI has no ',' before its payload")
        mime = header[5:].split(";")[0] or "application/octet-stream"
        try:
            content = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote(payload).encode()
        except (binascii.Error, ValueError) as exc:
            raise FetchError(f"data: URI has bad base64: {exc}") from exc
        target = self._cache_path(raw, mimetypes.guess_extension(mime) or "")
        return str(target) if target.exists() else self._write(target, [content])

    def _download(self, url: str, label_studio: LabelStudioAccess, dagshub: DagshubAccess | None) -> str:
        suffix = Path(urlparse(url).path).suffix[:10]
        target = self._cache_path(url, suffix)
        if target.exists():
            return str(target)
        with self._url_locks.hold(url):  # two tasks with one URL download it once
            if target.exists():
                return str(target)
            headers = {**label_studio.headers_for(url), **(dagshub.headers_for(url) if dagshub else {})}
            try:
                with self.session.get(url, headers=headers, timeout=self.timeout, stream=True) as response:
                    if response.status_code != 200:
                        hint = " (check Label Studio's token)" if response.status_code in (401, 403) else ""
                        raise FetchError(f"GET {url} answered {response.status_code}{hint}")
                    return self._write(target, response.iter_content(chunk_size=1 << 16))
            except requests.RequestException as exc:
                raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
