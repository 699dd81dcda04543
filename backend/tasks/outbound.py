"""Outgoing HTTP for task data: which addresses it may reach, and for how long.

Anyone who can add a task to a connected project chooses the URLs this backend fetches, so:

- link-local addresses (169.254.0.0/16, fe80::/10: where cloud metadata services answer) and the
  other known metadata addresses are refused always;
- private, loopback and other non-public addresses are refused unless ``FETCH_ALLOW_PRIVATE`` names
  them (addresses, networks such as ``10.0.0.0/8``, or host names), or they are Label Studio's own
  address or the configured DagsHub host;
- the check is made on the address actually connected to, after DNS, for every connection (redirects
  included), so a name that resolves to a forbidden address, now or later, gets nowhere;
- a download has a wall-clock limit: a server that trickles a byte at a time is cut off when the
  limit passes, however slowly it sends, by a watchdog that shuts the connection's socket.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)


class AddressRefused(Exception):
    """A task URL's address is not one task data may reach; the message says which setting allows it."""


def _entries(allowed: Iterable[str]) -> tuple[tuple[ipaddress._BaseNetwork, ...], frozenset[str]]:
    networks, names = [], set()
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return tuple(networks), frozenset(names)


@dataclass(frozen=True)
class AddressPolicy:
    """FETCH_ALLOW_PRIVATE, and the hosts trusted because someone trusted named them."""

    allowed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parsed", _entries(self.allowed))

    def refusal(self, host: str, address: IPAddress, trusted: frozenset[str]) -> str | None:
        """Why ``host`` (resolved to ``address``) may not be fetched from, or None."""
        if address.is_link_local or address in METADATA_ADDRESSES or (
            isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and address.ipv4_mapped.is_link_local
        ):
            return f"{host} is a link-local or cloud metadata address, which task data may never reach"
        if address.is_global and not address.is_multicast:
            return None
        networks, names = self._parsed  # type: ignore[attr-defined]
        if host.lower().rstrip(".") in names | trusted or any(address in network for network in networks):
            return None
        if address.is_unspecified or address.is_multicast or address.is_reserved:
            return f"{host} resolves to {address}, which task data may not reach"
        return (
            f"{host} resolves to a private or loopback address ({address}); "
            f"to allow it, add it to FETCH_ALLOW_PRIVATE (e.g. FETCH_ALLOW_PRIVATE={host})"
        )

    def resolve(self, host: str, port: int, trusted: frozenset[str]) -> str:
        """The address to connect to; AddressRefused when any address the name has is forbidden."""
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        for raw in addresses:
            reason = self.refusal(host, ipaddress.ip_address(raw.split("%")[0]), trusted)
            if reason:
                raise AddressRefused(reason)
        return addresses[0]


@dataclass
class Download:
    """One guarded download in progress: its policy and trusted hosts, its deadline, its connection."""

    policy: AddressPolicy
    trusted: frozenset[str]
    deadline: float
    connection: Any = None
    refused: str = ""
    expired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self) -> None:
        """The body is read: from here on the connection may go back to the pool, out of the watchdog's reach."""
        with self.lock:
            self.connection = None

    def expire(self) -> None:
        """The deadline passed: shut the socket, which ends whatever read or write is blocked on it."""
        with self.lock:
            if self.connection is None:
                return
            self.expired = True
            sock = getattr(self.connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_current = threading.local()  # the Download of the fetch running on this thread


def _connect(conn: HTTPConnection) -> socket.socket:
    """urllib3's _new_conn, connecting only to an address the current Download's policy allows."""
    download: Download | None = getattr(_current, "download", None)
    if download is None or getattr(conn, "proxy", None) is not None:
        return HTTPConnection._new_conn(conn)
    try:
        address = download.policy.resolve(conn._dns_host, conn.port, download.trusted)
    except AddressRefused as exc:
        download.refused = str(exc)
        raise NewConnectionError(conn, "refused by the address policy") from None
    except socket.gaierror as exc:
        raise NewConnectionError(conn, f"name resolution failed: {exc}") from exc
    try:
        return urllib3_connection.create_connection(
            (address, conn.port), conn.timeout, source_address=conn.source_address, socket_options=conn.socket_options
        )
    except TimeoutError as exc:
        raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"failed to connect: {exc}") from exc


class _CheckedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self)


class _CheckedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self)


class _TrackedPoolMixin:
    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        download: Download | None = getattr(_current, "download", None)
        if download is not None:
            with download.lock:
                download.connection = conn  # the watchdog shuts its socket when the deadline passes
        return conn


class _CheckedHTTPPool(_TrackedPoolMixin, HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(_TrackedPoolMixin, HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}


class Watchdog:
    """One thread that ends downloads past their deadline by shutting their socket."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Download]] = []
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, download: Download) -> None:
        with self._cond:
            heapq.heappush(self._heap, (download.deadline, next(self._counter), download))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][2] is download:  # only an earlier deadline than the one it sleeps for wakes it
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, download = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            download.expire()


@dataclass
class GuardedSession:
    """A pooled requests session whose every connection obeys the address policy and a deadline."""

    policy: AddressPolicy
    pool_size: int = 16
    session: requests.Session = field(init=False)
    watchdog: Watchdog = field(default_factory=Watchdog)

    def __post_init__(self) -> None:
        self.session = requests.Session()
        adapter = _GuardedAdapter(pool_connections=self.pool_size, pool_maxsize=self.pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "label-studio-mlflow-backend"
        self._proxied = bool(urllib.request.getproxies())

    @contextmanager
    def guarded(self, url: str, trusted: frozenset[str], seconds: float) -> Iterator[Download]:
        """Around one download on this thread: every connection it makes is checked, and it ends by ``seconds``."""
        download = Download(self.policy, trusted, time.monotonic() + seconds)
        if self._proxied:  # connections go to the proxy: check the target itself, up front
            parsed = urllib3.util.parse_url(url)
            if parsed.host:
                self.policy.resolve(parsed.host, parsed.port or 443, trusted)
        _current.download = download
        self.watchdog.watch(download)
        try:
            yield download
        finally:
            _current.download = None
            download.finish()

    def close(self) -> None:
        self.session.close()
