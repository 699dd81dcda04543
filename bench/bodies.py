"""Big request bodies: the backend's worker (backend/web/worker.py) against gunicorn's stock gthread, side by side.

Each size is a ``/predict`` body of Label Studio-shaped tasks (~550 bytes each, as "Retrieve predictions"
sends them) to an unconfigured backend: the body is read and parsed whole, then the answer is the 503
for "no model", so what is timed is reading and parsing, the same JSON work on both sides. The two
backends are asked in turn, one sample each, so drift on a busy machine falls on both. Then the 413:
headers of a body over MAX_REQUEST_MB, and the time until the answer is read while the client sends.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import requests

from harness.servers import Backend

from .common import Row, Table, median

SIZES_MB = (1, 5, 11, 50)
REPEATS = 15
MAX_REQUEST_MB = 100


def label_studio_body(megabytes: float) -> bytes:
    """A /predict body of about ``megabytes``, its tasks shaped like Label Studio's."""
    task = {
        "id": 0, "data": {"image": "/data/upload/1/0a1b2c3d-photo_000000.jpg"}, "meta": {}, "annotations": [],
        "predictions": [], "created_at": "2026-12-01T10:00:00.000000Z", "updated_at": "2026-12-01T10:00:00.000000Z",
        "inner_id": 0, "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0,
        "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
        "updated_by": None, "file_upload": "0a1b2c3d-photo_000000.jpg", "comment_authors": [],
        "is_labeled": False, "overlap": 1, "annotators": [], "draft_exists": False,
    }
    size = len(json.dumps(task))
    tasks = [dict(task, id=i, inner_id=i) for i in range(int(megabytes * 1e6 / size))]
    return json.dumps({"tasks": tasks, "project": "1.1795381956", "label_config": '<View><Image name="image" '
                       'value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>',
                       "params": {"login": None, "password": None, "context": None}}).encode()


def _post_seconds(url: str, body: bytes) -> float:
    started = time.perf_counter()
    answer = requests.post(url + "/predict", data=body, headers={"Content-Type": "application/json"}, timeout=300)
    seconds = time.perf_counter() - started
    assert answer.status_code == 503, answer.text[:300]  # read and parsed whole; no model behind it
    return seconds


def seconds_to_413(url: str, megabytes: int) -> float:
    """Headers of an oversized body, then its bytes as fast as the socket takes them, until the 413 is read."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {megabytes << 20}\r\n\r\n".encode())
        sock.setblocking(False)
        answer, piece = b"", b"x" * (1 << 16)
        while b"\r\n\r\n" not in answer and time.perf_counter() - started < 60:
            try:
                sock.send(piece)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                pass
        seconds = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    return seconds


def run(table: Table, workdir: Path) -> None:
    env = {"MAX_REQUEST_MB": str(MAX_REQUEST_MB), "PREDICT_TIMEOUT_S": "300"}
    for name in ("ours", "stock"):
        (workdir / name).mkdir()
    ours = Backend(workdir / "ours", env).start()
    stock = Backend(workdir / "stock", {**env, "GUNICORN_CMD_ARGS": "--worker-class gthread"}).start()
    try:
        for megabytes in SIZES_MB:
            body = label_studio_body(megabytes)
            for _ in range(3):  # warm-up: the allocator settles on a size once it has seen it
                _post_seconds(ours.url, body), _post_seconds(stock.url, body)
            mine, theirs = [], []
            for _ in range(REPEATS if megabytes < 50 else 5):
                mine.append(_post_seconds(ours.url, body))
                theirs.append(_post_seconds(stock.url, body))
            table.add(Row("bodies", f"/predict with a {len(body) / 1e6:.1f} MB body, read and parsed (median)",
                          median(mine), median(theirs), "s", "gunicorn's stock gthread", target=">= 0.9x"))
        refused = [seconds_to_413(ours.url, 2 * MAX_REQUEST_MB) for _ in range(5)]
        table.add(Row("bodies", f"a {2 * MAX_REQUEST_MB} MB body over MAX_REQUEST_MB: 413 read (median of 5)",
                      median(refused), 1.0, "s", "Label Studio's 1 s health budget", target="well under 1 s"))
    finally:
        ours.stop()
        stock.stop()
