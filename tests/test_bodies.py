"""Request bodies through the backend's worker (backend/web/worker.py): big ones whole and in linear time,
kept-alive connections that carry several, and the 413 from the headers that closes the connection."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest
import requests
from gunicorn.config import Config

from backend.web.worker import BufferedUnreader, MemoryBody, PromptConn, oversized
from bench.bodies import label_studio_body


class _Sock:
    """What the unreader reads after its buffer: a socket with more bytes on it."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self.stream.read(size)


def test_the_unreader_hands_out_the_buffer_then_the_socket_and_a_whole_body_in_one_piece():
    unreader = BufferedUnreader(_Sock(b"tail"))  # type: ignore[arg-type]
    unreader.feed(b"x" * 20_000)
    assert len(unreader.chunk()) == 8192  # socket-sized pieces, never the whole rest at once
    assert unreader.take(20_000) is None  # 11,808 held: not a whole body of that size
    body = unreader.take(11_000)
    assert body is not None and bytes(body) == b"x" * 11_000
    unreader.unread(b"ab")  # the parser gives back what it read too far: it comes first
    rest = unreader.take(810)
    assert rest is not None and bytes(rest) == b"ab" + b"x" * 808
    assert unreader.chunk() == b"tail"


def test_a_memory_body_reads_as_gunicorns_does():
    body = MemoryBody(memoryview(b"one\ntwo\nthree"))
    assert body.readline() == b"one\n" and body.read(2) == b"tw" and body.readline(1) == b"o"
    assert list(body) == [b"\n", b"three"] and body.read() == b"" and body.read(8192) == b""


def test_oversized_is_read_from_the_headers():
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    assert oversized(head % 101, 100) == 101 and oversized(head % 100, 100) is None
    assert oversized(b"POST / HTTP/1.1\r\nContent-Len", 100) is None  # headers not in yet
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert oversized(chunked + b"a" * 101, 100) == 101 and oversized(chunked + b"5\r\n", 100) is None


def test_a_graceful_close_reads_what_the_client_sent_and_does_not_wait_for_it_to_hang_up():
    """gunicorn's waits up to 2 s for the client to close its end; a pooled client never does, and a worker
    stopping after its last request stalled that long (a backend put to sleep took 2.2 s, not 0.2 s)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        served, address = listener.accept()
        client.sendall(b"x" * 1000)  # left unread by the request: the close reads it rather than reset over it
        readable = served.recv(1, socket.MSG_PEEK)  # it has arrived
        assert readable == b"x"
        served.sendall(b"the answer")
        connection = PromptConn(Config(), served, address, listener.getsockname())
        closing = threading.Thread(target=connection.close, kwargs={"graceful": True})
        closing.start()
        closing.join(timeout=1.0)
        assert not closing.is_alive()  # the client still holds its end open
        client.settimeout(5)
        assert client.recv(100) == b"the answer" and client.recv(100) == b""  # the answer whole, then the end


@pytest.fixture
def backend(start_backend):
    return start_backend(MAX_REQUEST_MB="60")


def test_a_50_mb_body_is_read_and_parsed_whole(backend):
    """The worker used to copy the rest of the buffer on every 1 KiB read: 50 MB took minutes."""
    body = label_studio_body(50)
    answer = requests.post(backend.url + "/predict", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    # Read and parsed to the end (a cut body would be a 400 "not valid JSON"): then the 503 for no model.
    assert answer.status_code == 503 and answer.json()["error"] == "no model is configured", answer.text[:300]


def test_kept_alive_connections_carry_bodies_one_after_another(backend):
    with requests.Session() as session:
        for size in (3_000_000, 10, 200_000, 1):
            body = json.dumps({"tasks": [{"id": 1, "data": {"text": "x" * size}}], "label_config": "<View/>"})
            answer = session.post(backend.url + "/predict", data=body, headers={"Content-Type": "application/json"},
                                  timeout=30)
            assert answer.status_code == 400 and "reads no task data" in answer.json()["error"], answer.text


def test_a_body_over_the_limit_gets_413_from_its_headers_and_the_connection_closes(backend):
    with socket.create_connection(("127.0.0.1", backend.port), timeout=10) as sock:
        sock.sendall(b"POST /configure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (500 << 20))
        answer = b""
        while b"}" not in answer:  # not one byte of the body sent: the headers were enough
            answer += sock.recv(4096)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
        error = json.loads(body)
        assert error["type"] == "PayloadTooLarge" and "524.3 MB" in error["detail"] and "MAX_REQUEST_MB" in error["detail"]
        # The backend closes its side: what the client still sends is drained a moment, then the door shuts.
        deadline = time.monotonic() + 10
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"x" * 65536)
            except OSError:
                closed = True
    assert closed
    # A client that sends its whole body first (requests does) still reads the 413.
    big = requests.post(backend.url + "/predict", data=b"{" + b" " * (61 << 20) + b"}",
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert big.status_code == 413 and "MAX_REQUEST_MB" in big.json()["detail"]
    assert requests.get(backend.url + "/health", timeout=1).json()["status"] == "UP"
