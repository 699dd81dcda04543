"""What a task may make the backend read or reach: local folders, network addresses, sizes, time.

A task is written by whoever can add one to a connected project; these are the hostile ones.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from backend.labeling.validation import data_objects
from backend.tasks.diskcache import DiskCache
from backend.tasks.fetcher import NEVER_READ, FetchLimits, LocalFiles, TaskDataFetcher
from backend.tasks.labelstudio import LabelStudioAccess
from backend.tasks.outbound import AddressPolicy
from harness.servers import RawServer, trickling
from tests.support.hooks import IMAGE_CONFIG

IMAGES = data_objects(IMAGE_CONFIG)
NO_LS = LabelStudioAccess()


def fetch(fetcher, *references, label_studio=NO_LS):
    tasks = [{"id": i, "data": {"image": ref}} for i, ref in enumerate(references)]
    return fetcher.fetch_tasks(tasks, IMAGES, label_studio)


@pytest.fixture
def make_fetcher(tmp_path):
    made = []

    def make(**limits):
        fetcher = TaskDataFetcher(tmp_path / f"cache-{len(made)}", concurrency=4,
                                  limits=FetchLimits(**{"timeout_s": 5.0, **limits}))
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


# -- local files ----------------------------------------------------------------------------------

def test_no_local_file_is_read_unless_its_folder_is_allowed(make_fetcher, images):
    refused = fetch(make_fetcher(), str(images["white"]), "/etc/passwd")
    assert all("outside the folders task data may read: set LOCAL_FILES_ROOTS" in r.error for r in refused)
    allowed = fetch(make_fetcher(local=LocalFiles((str(images["white"].parent),))), str(images["white"]))
    assert allowed[0].value == str(images["white"]) and not allowed[0].error


def test_escapes_from_an_allowed_folder_are_refused(make_fetcher, tmp_path, images):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "ok.png").write_bytes(images["white"].read_bytes())
    (root / "link.png").symlink_to("/etc/passwd")
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir()
    (model_dir / "label_studio.json").write_text('{"access_token": "secret"}')
    (root / "model").symlink_to(model_dir)
    fetcher = make_fetcher(local=LocalFiles((str(root), str(model_dir), "/proc"), NEVER_READ + (str(model_dir),)))
    results = fetch(
        fetcher,
        str(root / "ok.png"),
        str(root / "link.png"),  # a symlink out of the folder
        f"{root}/../../../../etc/passwd",  # .. out of the folder
        "file:///etc/shadow",
        str(root / "model" / "label_studio.json"),  # MODEL_DIR, even when a root leads there
        "/proc/self/environ",  # never, even when allowed
        "file:///proc/self/environ",
    )
    assert results[0].value == str(root / "ok.png")
    assert all("outside the folders" in r.error for r in results[1:4])
    assert all("task data may never read" in r.error for r in results[4:])


# -- addresses ------------------------------------------------------------------------------------

def test_private_addresses_need_allowing_and_metadata_never_gets_any(make_fetcher, served):
    server, seen = served
    port = server.url.rsplit(":", 1)[1]
    default = fetch(make_fetcher(), f"{server.url}/white.png", f"http://localhost:{port}/white.png")
    assert all("private or loopback address" in r.error and "FETCH_ALLOW_PRIVATE" in r.error for r in default)
    assert seen == []  # refused before any connection
    allowed = make_fetcher(addresses=AddressPolicy(("127.0.0.0/8",)))
    assert not fetch(allowed, f"{server.url}/white.png")[0].error
    metadata = fetch(
        make_fetcher(addresses=AddressPolicy(("169.254.0.0/16", "0.0.0.0/0"))),
        "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://100.100.100.200/latest/",
    )
    assert all("link-local or cloud metadata address, which task data may never reach" in r.error for r in metadata)


def test_label_studio_on_this_host_is_always_reachable(make_fetcher, served):
    server, seen = served
    (result,) = fetch(make_fetcher(), "/data/upload/1/white.png", label_studio=LabelStudioAccess(server.url, "tok", "setup"))
    assert "it answered 404" in result.error  # reached (the file server has no /data/upload), not refused
    assert seen[-1][0] == "/data/upload/1/white.png"


def test_a_redirect_to_a_forbidden_address_is_refused(make_fetcher, served):
    server, _ = served

    def redirect(connection):
        connection.sendall(f"HTTP/1.1 302 Found\r\nLocation: {server.url}/white.png\r\nContent-Length: 0\r\n\r\n".encode())

    public = RawServer(redirect)
    try:
        # The redirecting server is allowed by name; where it points (loopback) is not.
        fetcher = make_fetcher(addresses=AddressPolicy(("127.0.0.1",)))
        (followed,) = fetch(fetcher, public.url + "/start.png")
        assert not followed.error  # allowed target: followed
        fetcher = make_fetcher(addresses=AddressPolicy(("localhost",)))
        port = public.url.rsplit(":", 1)[1]
        (refused,) = fetch(fetcher, f"http://localhost:{port}/start.png")
        assert "127.0.0.1 resolves to a private or loopback address" in refused.error
    finally:
        public.close()


def test_errors_do_not_tell_an_open_port_from_a_closed_one(make_fetcher):
    silent = RawServer(lambda connection: connection.close())  # open, answers nothing useful
    try:
        fetcher = make_fetcher(addresses=AddressPolicy(("127.0.0.1",)))
        closed_port = "9"
        open_result, closed_result = fetch(fetcher, f"{silent.url}/x.png", f"http://127.0.0.1:{closed_port}/x.png")
    finally:
        silent.close()
    assert open_result.error == f"could not fetch {silent.url}/x.png"
    assert closed_result.error == f"could not fetch http://127.0.0.1:{closed_port}/x.png"


# -- time and size --------------------------------------------------------------------------------

@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Slow: "])
def test_a_trickling_server_is_cut_off_at_the_fetch_timeout(make_fetcher, head):
    server = RawServer(trickling(head, 0.2))
    try:
        fetcher = make_fetcher(addresses=AddressPolicy(("127.0.0.1",)), timeout_s=1.5)
        started = time.monotonic()
        (result,) = fetch(fetcher, server.url + "/slow.png")
        took = time.monotonic() - started
    finally:
        server.close()
    assert result.error == f"could not fetch {server.url}/slow.png"
    assert took < 1.5 + 3  # bounded by the limit, not by the 120 s the server would take


def test_size_limits_name_their_setting(make_fetcher, served, images, tmp_path):
    server, _ = served
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))
    (images["white"].parent / "big.bin").write_bytes(big.read_bytes())
    small = make_fetcher(addresses=AddressPolicy(("127.0.0.1",)), max_file_bytes=100_000)
    uri = "data:application/octet-stream;base64," + base64.b64encode(big.read_bytes()).decode()
    too_big, too_big_inline, fine = fetch(small, f"{server.url}/big.bin", uri, f"{server.url}/white.png")
    assert "larger than 0.0953674 MB: raise FETCH_MAX_MB" in too_big.error
    assert "data: URI is larger than" in too_big_inline.error and "FETCH_MAX_MB" in too_big_inline.error
    assert not fine.error
    assert not list((small.cache.root).glob("*/.part-*"))  # nothing half-written left behind


def test_the_task_data_cache_stays_under_its_cap(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=2500, protect_s=0)
    for n in range(6):
        cache.store(f"http://files/{n}", ".bin", [b"x" * 1000], 10_000, "FETCH_MAX_MB")
    assert cache.describe()["bytes"] <= 2500
    assert cache.lookup("http://files/5", ".bin") and not cache.lookup("http://files/0", ".bin")  # oldest went first
    on_disk = sum(p.stat().st_size for p in Path(tmp_path / "cache").glob("*/*"))
    assert on_disk == cache.describe()["bytes"]
    assert DiskCache(tmp_path / "cache", 2500).describe()["bytes"] == on_disk  # a restart finds the same
