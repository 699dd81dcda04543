"""The backend's gunicorn worker: gthread, but a request is read whole before it takes a thread, and
Label Studio's quick calls have threads of their own.

gunicorn's gthread worker hands a connection to a pool thread as soon as it is readable, and the
thread then reads headers and body with blocking reads: a client that sends part of a request and
stalls holds that thread for as long as it likes. Eight of them hold all eight, and ``/health``
(Label Studio allows it 1 s, then marks the backend as errored) waits behind them. Here the main
loop reads every request, headers and body, without blocking, beside everything else it does; only
a complete request goes to a thread, and a client that has not sent one within
``REQUEST_READ_TIMEOUT_S`` gets a 408. A body over ``MAX_REQUEST_MB`` is not read at all: the main
loop answers 413 from its headers, closes its side and drains what the client already sent for a
moment (a lingering close, so the client reads the 413 rather than a reset), then hangs up.
The buffered request reaches gunicorn's parser through ``BufferedUnreader``, in socket-sized pieces
from memory: handing it the whole buffer at once would make its unreader copy the rest of the buffer
on every read, quadratic in the body's size (11 MB took 10 s). ``/health``, ``/livez``, ``/readyz``, ``/info``, ``/metrics``, ``/setup``,
``/versions`` and ``/webhook`` then run on a small pool of their own (``QUICK_THREADS``), so they
answer at once however many predictions are in flight.

Used by ``gunicorn.conf.py``; TLS and HTTP/2 connections (not used by this backend) fall back to
gthread's own handling.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import selectors
import socket
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from backend.core.lifetime import OWNER_ENV
from backend.core.settings import ServerSettings

QUICK_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/info", "/metrics", "/setup", "/versions", "/webhook"})
MAX_HEADER_BYTES = 64 << 10
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,20})", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r]*chunked", re.IGNORECASE)
PIECE = 8192  # what the parser gets per read from the buffer: the socket unreader's own chunk size
LINGER_S = 1.0  # after a 413: how long what the client still sends is read and dropped before hanging up
LINGER_MAX_BYTES = 16 << 20


class PromptConn(TConn):
    """gunicorn's connection, whose graceful close does not wait on the client.

    gunicorn half-closes a connection it will not keep and then reads until the client closes its end, up to
    2 s, on the worker's main loop. A pooled client (the orchestrator's proxy, Label Studio's session) keeps
    its end open, so a worker stopping just after a request (a backend put to sleep right after the /health
    that found it idle) stalled 2 s: one stop in four took 2.2 s instead of 0.2 s. What the client has sent
    already is read (unread data would make the kernel answer with a reset that can cut the response
    short), and the socket is closed."""

    def close(self, graceful: bool = False) -> None:
        if not graceful:
            return super().close()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.setblocking(False)
            for _ in range(LINGER_MAX_BYTES // PIECE):
                if not self.sock.recv(PIECE):
                    break
        except OSError:
            pass  # nothing more to read (EAGAIN), or the client has gone
        finally:
            util.close(self.sock)
        return None


class BufferedUnreader(SocketUnreader):
    """gunicorn's socket unreader, reading first from what the main loop buffered, piece by piece.

    The parser reads a body 1 KiB at a time and gives back what it did not use; an unreader holding
    the whole body would copy all of it for each of those reads. Pieces of a memoryview cost one copy
    of each byte, and no system call."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, PIECE)
        self.buf: io.BytesIO = io.BytesIO()
        self.pending = memoryview(b"")

    def feed(self, data: bytes) -> None:
        """The next request's bytes, read by the main loop (what is still pending comes first)."""
        self.pending = memoryview(bytes(self.pending) + data) if self.pending else memoryview(data)

    def chunk(self) -> bytes:
        if self.pending:
            piece, self.pending = self.pending[:PIECE], self.pending[PIECE:]
            return bytes(piece)
        return super().chunk()

    def take(self, length: int) -> memoryview | None:
        """The next ``length`` bytes when all of them are held already (a whole body), else None."""
        held = self.buf.getbuffer().nbytes
        if held + len(self.pending) < length:
            return None
        head = self.buf.getvalue()
        self.buf = io.BytesIO()
        if not head:
            body, self.pending = self.pending[:length], self.pending[length:]
            return body
        whole = memoryview(head + bytes(self.pending))
        body, self.pending = whole[:length], whole[length:]
        return body


class MemoryBody:
    """A request body already in memory, with the file-like face of gunicorn's ``Body`` (``wsgi.input``).

    gunicorn's own reads its source 1 KiB at a time through the unreader; this one slices."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def read(self, size: int | None = None) -> bytes:
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self.pos + size)
        piece, self.pos = bytes(self.data[self.pos:end]), end
        return piece

    def readline(self, size: int | None = None) -> bytes:
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self.pos + size)
        newline = bytes(self.data[self.pos:end]).find(b"\n")
        return self.read((newline + 1) if newline >= 0 else end - self.pos)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def oversized(buffer: bytes | bytearray, max_body: int) -> int | None:
    """The body size a request's headers announce when it is over ``max_body`` (chunked: what came so far)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[: end + 2])
    if _CHUNKED.search(head):
        body = len(buffer) - end - 4
        return body if body > max_body else None
    length = _CONTENT_LENGTH.search(head)
    wanted = int(length.group(1)) if length else 0
    return wanted if wanted > max_body else None


def _receive(sock: socket.socket) -> bytes | None:
    """What a readable socket has (b"" when the client went away; None when nothing after all)."""
    try:
        return sock.recv(1 << 18)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def error_response(status: str, error: str, detail: str, kind: str) -> bytes:
    """A whole HTTP answer, JSON as the app's own errors, that closes the connection."""
    body = json.dumps({"error": error, "detail": detail, "type": kind}).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


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
        self.lingering: deque[TConn] = deque()
        self.buffers_requests = not self.cfg.is_ssl

    def init_process(self) -> None:
        os.environ[OWNER_ENV] = str(os.getppid())  # the master: what a training must not outlive (lifetime.py)
        self.quick_pool = futures.ThreadPoolExecutor(max_workers=self.quick_threads, thread_name_prefix="quick")
        super().init_process()

    def run(self) -> None:
        try:
            super().run()
        finally:
            from backend.web.api import close_services  # the app's, imported by now; not the master's to import

            close_services(self.wsgi)  # before this process ends, however it ends (see Services.close)

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
        self._start_reading(PromptConn(self.cfg, client_sock, client_addr, listener.getsockname()))

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
        data = _receive(sock)
        if data is None:
            return
        if not data:  # the client went away
            self._stop_reading(conn)
            self._close(conn)
            return
        conn.prebuffer += data
        complete, conn.quick = request_state(conn.prebuffer, self.max_body)
        if complete and (size := oversized(conn.prebuffer, self.max_body)) is not None:
            self._refuse_too_large(conn, size)
        elif complete:
            self._stop_reading(conn)
            conn.data_ready = True
            pool = self.quick_pool if conn.quick and self.quick_pool is not None else self.tpool
            fs = pool.submit(self.handle, conn)
            fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _stop_reading(self, conn: TConn) -> None:
        self._unwatch(conn, self.reading)

    def _unwatch(self, conn: TConn, held: deque[TConn]) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            held.remove(conn)
        except ValueError:
            pass

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def _refuse_too_large(self, conn: TConn, size: int) -> None:
        """413 from the headers; then our side closes, and what the client already sent is drained."""
        self._stop_reading(conn)
        conn.prebuffer = None
        answer = error_response(
            "413 Request Entity Too Large", "the request body is too large",
            f"It has {size / 1e6:.1f} MB; this backend takes at most {self.max_body / 1e6:g} MB (MAX_REQUEST_MB).",
            "PayloadTooLarge")
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(1.0)
            conn.sock.sendall(answer)
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        conn.linger_until = time.monotonic() + LINGER_S
        conn.lingered = 0
        self.lingering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering, conn))

    def _on_lingering(self, conn: TConn, sock: Any) -> None:
        data = _receive(sock)
        if data is None:
            return
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_MAX_BYTES:
            self._end_lingering(conn)

    def _end_lingering(self, conn: TConn) -> None:
        self._unwatch(conn, self.lingering)
        self._close(conn)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:  # the graceful stop begins: before it waits, the idle go
            self.murder_keepalived()

    def murder_keepalived(self) -> None:
        """gthread's, and at shutdown every idle connection at once: a graceful stop finishes the requests in
        flight, not the grace period on a pooled connection nobody uses (an orchestrator's proxy keeps
        some; it puts an idle backend to sleep, and a wake can wait for that)."""
        if self.alive:
            return super().murder_keepalived()
        while self.keepalived_conns:
            self._unwatch_and_close(self.keepalived_conns[0], self.keepalived_conns)
        for conn in [c for c in self.reading if not getattr(c, "prebuffer", b"")]:  # connected, nothing sent
            self._unwatch_and_close(conn, self.reading)
        return None

    def _unwatch_and_close(self, conn: TConn, held: deque[TConn]) -> None:
        self._unwatch(conn, held)
        self._close(conn)

    def murder_pending(self) -> None:
        """gthread's timeouts, and ours: a request not read whole in time gets a 408 and the door."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.lingering if c.linger_until <= now]:
            self._end_lingering(conn)
        for conn in [c for c in self.reading if c.read_deadline <= now]:
            self._stop_reading(conn)
            answer = error_response(
                "408 Request Timeout", "the request was not sent in time",
                f"The backend waits {self.read_timeout_s:g} s for a whole request (REQUEST_READ_TIMEOUT_S).",
                "RequestTimeout")
            try:
                conn.sock.send(answer)
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
            if not isinstance(conn.parser.unreader, BufferedUnreader):
                conn.parser.unreader = BufferedUnreader(conn.sock)
            conn.parser.unreader.feed(bytes(buffered))
        return super().handle(conn)

    def handle_request(self, req: Any, conn: TConn) -> Any:
        """A body the main loop read whole is handed to the app from memory."""
        unreader = getattr(conn.parser, "unreader", None)
        reader = getattr(req.body, "reader", None)
        if isinstance(unreader, BufferedUnreader) and isinstance(reader, LengthReader):
            body = unreader.take(reader.length)
            if body is not None:
                req.body = MemoryBody(body)
        return super().handle_request(req, conn)
