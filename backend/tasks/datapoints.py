"""DagsHub datapoints: tasks that DagsHub creates carry ``meta.datapoint_id``; find their files.

DagsHub's tasks usually hold a file URL on the DagsHub host, which the fetcher downloads with the
token. When that URL is missing or does not answer, the datapoint id is looked up in the datasource
the configure named, through the ``dagshub`` client (imported only when such a task arrives). The
client has no lookup by id, so a datasource is listed once and the id-to-URL table is kept for a
while; an id it does not hold triggers one fresh listing before it is reported missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


class DatapointLike(Protocol):
    """The two attributes of ``dagshub.data_engine.model.datapoint.Datapoint`` used here."""

    datapoint_id: int
    download_url: str


@dataclass(frozen=True)
class DatasourceRef:
    """Which DagsHub datasource a configure named, and how to reach it."""

    host: str
    repo: str
    name: str
    token: str = field(default="", repr=False)


class DatapointNotFound(Exception):
    """The datasource does not hold the id, or cannot be listed."""


ListDatapoints = Callable[[DatasourceRef], Iterable[DatapointLike]]

_client_lock = threading.Lock()  # the dagshub client keeps its host and token in module globals


def list_with_dagshub_client(source: DatasourceRef) -> list[DatapointLike]:
    """Every datapoint of the datasource, via the real client (documents and annotations not loaded)."""
    from dagshub.common import config
    from dagshub.data_engine import datasources

    with _client_lock:
        config.set_host(source.host)
        config.token = source.token or None
        datasource = datasources.get_datasource(source.repo, name=source.name)
        return list(datasource.all(load_documents=False, load_annotations=False))


class DatapointDirectory:
    """Datapoint id to download URL, one table per datasource, refreshed after ``ttl_s`` or on a miss."""

    def __init__(self, list_datapoints: ListDatapoints = list_with_dagshub_client, ttl_s: float = 300.0) -> None:
        self._list = list_datapoints
        self._ttl_s = ttl_s
        self._tables: dict[DatasourceRef, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def url_for(self, source: DatasourceRef, datapoint_id: Any) -> str:
        key = str(datapoint_id)
        table = self._table(source, refresh=False)
        if key not in table:
            table = self._table(source, refresh=True)
        if key not in table:
            raise DatapointNotFound(
                f"datapoint {datapoint_id} is not in DagsHub datasource {source.repo}/{source.name}"
            )
        return table[key]

    def _table(self, source: DatasourceRef, refresh: bool) -> dict[str, str]:
        with self._lock:  # one listing at a time per backend: a batch of tasks shares it
            loaded_at, table = self._tables.get(source, (0.0, {}))
            if refresh or time.monotonic() - loaded_at > self._ttl_s:
                try:
                    points = self._list(source)
                except Exception as exc:
                    raise DatapointNotFound(
                        f"could not list DagsHub datasource {source.repo}/{source.name}: {type(exc).__name__}: {exc}"
                    ) from exc
                table = {str(point.datapoint_id): point.download_url for point in points}
                self._tables[source] = (time.monotonic(), table)
            return table
