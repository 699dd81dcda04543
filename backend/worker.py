"""The backend's gunicorn worker: gthread, but a request is read whole before it takes a thread, and
Label Studio's quick calls have threads of their own.

gunicorn's gthread worker hands a connection to a pool thread as soon as it is readable, and the
thread then reads headers and body with blocking reads: a client that sends part of a request and
stalls holds that thread for as long as it likes. Eight of them hold all eight, and ``/health``
(Label Studio allows it 1 s, then marks the backend as errored) waits behind them. Here the main
loop reads every request, headers and body, without blocking, beside everything else it does; only
a complete request goes to a thread, and a client that has not sent one within
``REQUEST_READ_TIMEOUT_S`` gets a 408. A body over ``MAX_REQUEST_MB`` is not read at all: the app
answers 413 from its headers. ``/health``, ``/livez``, ``/readyz``, ``/info``, ``/metrics``, ``/setup``,
``/versions`` and ``/webhook`` then run on a small pool of their own (``QUICK_THREADS``), so they
answer at once however many predictions are in flight.

Used by ``gunicorn.conf.py``; TLS and HTTP/2 connections (not used by this backend) fall back to
gthread's own handling.
"""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import time
from collections import deque
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from .settings import ServerSettings

QUICK_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/info", "/metrics", "/setup", "/versions", "/webhook"})
MAX_HEADER_BYTES = 64 << 10
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,20})", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r]*chunked", re.IGNORECASE)


def request_state(buffer: bytes | bytearray, max_body: int) -> tuple[bool, bool | None]:
    """Whether ``buffer`` holds a whole request (or enough to answer it: headers of an oversized body),
    and whether that request is one of the quick ones (None while its first line is not in)."""
    line_end = buffer.find(b"\r\n")
    quick = None
    if line_end >= 0:
        parts = bytes(buffer[:line_end]).split(b" ")
        quick = len(parts) >= 2 and parts[1].split(b"?")[0].decode("latin-1") in QUICK_PATHS
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return len(buffer) > MAX_HEADER_BYTES, quick  # far too long: the parser will refuse it
    head = bytes(buffer[: end + 2])
    body = len(buffer) - end - 4
    if _CHUNKED.search(head):
        return buffer.endswith(b"0\r\n\r\n") or body > max_body, quick
    length = _CONTENT_LENGTH.search(head)
    if length is None:
        return True, quick
    wanted = int(length.group(1))
    return wanted > max_body or body >= wanted, quick


class GuardedThreadWorker(ThreadWorker):
    """gthread with whole requests read by the main loop, and a separate pool for quick routes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        server = ServerSettings.from_env()
        self.read_timeout_s = server.request_read_timeout_s
        self.max_body = server.max_request_bytes
        self.quick_threads = server.quick_threads
        self.quick_pool: futures.ThreadPoolExecutor | None = None
        self.reading: deque[TConn] = deque()
        self.buffers_requests = not self.cfg.is_ssl

    def init_process(self) -> None:
        self.quick_pool = futures.ThreadPoolExecutor(max_workers=self.quick_threads, thread_name_prefix="quick")
        super().init_process()

    def handle_quit(self, sig: int, frame: Any) -> None:
        if self.quick_pool is not None:
            self.quick_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    # -- reading requests in the main loop ---------------------------------------------------------

    def accept(self, listener: Any) -> None:
        if not self.buffers_requests:
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._start_reading(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has a next request coming: read it here too."""
        if not self.buffers_requests:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)

    def _start_reading(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        conn.prebuffer = bytearray()
        conn.quick = None
        conn.read_deadline = time.monotonic() + self.read_timeout_s
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, sock: Any) -> None:
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._stop_reading(conn)
            self._close(conn)
            return
        conn.prebuffer += data
        complete, conn.quick = request_state(conn.prebuffer, self.max_body)
        if complete:
            self._stop_reading(conn)
            conn.data_ready = True
            pool = self.quick_pool if conn.quick and self.quick_pool is not None else self.tpool
            fs = pool.submit(self.handle, conn)
            fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _stop_reading(self, conn: TConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.reading.remove(conn)
        except ValueError:
            pass

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gthread's timeouts, and ours: a request not read whole in time gets a 408 and the door."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.reading if c.read_deadline <= now]:
            self._stop_reading(conn)
            body = json.dumps({
                "error": "the request was not sent in time",
                "detail": f"The backend waits {self.read_timeout_s:g} s for a whole request (REQUEST_READ_TIMEOUT_S).",
                "type": "RequestTimeout",
            }).encode()
            head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            try:
                conn.sock.send(head + body)
            except OSError:
                pass
            self._close(conn)

    def handle(self, conn: TConn) -> Any:
        """In a pool thread: the parser reads what the main loop read first, then the socket."""
        buffered = getattr(conn, "prebuffer", None)
        if buffered:
            conn.prebuffer = None
            conn.sock.setblocking(True)
            conn.init()
            unreader = conn.parser.unreader
            unreader.buf.seek(0, os.SEEK_END)
            unreader.buf.write(bytes(buffered))
        return super().handle(conn)
