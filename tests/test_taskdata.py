"""Task data becomes local files: concurrently, cached by URL, one failure failing one task."""

from __future__ import annotations

import base64

import pytest

from backend.taskdata import LabelStudioAccess, TaskDataFetcher
from backend.validation import data_objects
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG
from tests.support.servers import file_server

IMAGES = data_objects(IMAGE_CONFIG)
NO_LS = LabelStudioAccess()


@pytest.fixture
def fetcher(tmp_path):
    fetcher = TaskDataFetcher(tmp_path / "cache", concurrency=8, timeout=5)
    yield fetcher
    fetcher.close()


@pytest.fixture
def served(images):
    seen = []
    server = file_server(images["white"].parent, seen=seen)
    yield server, seen
    server.close()


def test_urls_download_once_and_in_order(fetcher, served, images):
    server, seen = served
    tasks = [{"id": i, "data": {"image": f"{server.url}/{name}.png"}} for i, name in enumerate(["white", "black", "white"])]
    inputs = fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert [open(i.value, "rb").read() for i in inputs] == [images[n].read_bytes() for n in ("white", "black", "white")]
    assert sorted(path for path, _ in seen) == ["/black.png", "/white.png"]  # the repeated URL was fetched once
    fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert len(seen) == 2  # and everything came from the disk cache the second time


def test_one_failure_fails_one_task(fetcher, served):
    server, _ = served
    tasks = [{"id": 1, "data": {"image": f"{server.url}/white.png"}}, {"id": 2, "data": {"image": f"{server.url}/missing.png"}},
             {"id": 3, "data": {"image": "http://127.0.0.1:9/unreachable.png"}}, {"id": 4, "data": {"other": 1}}]
    inputs = fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert inputs[0].value and not inputs[0].error
    assert "answered 404" in inputs[1].error
    assert "ConnectionError" in inputs[2].error
    assert "task data has no 'image'" in inputs[3].error


def test_label_studio_paths_need_its_address(fetcher, served):
    server, seen = served
    task = [{"id": 5, "data": {"image": "/data/upload/3/white.png"}}]
    assert "Label Studio's address is unknown" in fetcher.fetch_tasks(task, IMAGES, NO_LS)[0].error
    fetcher.fetch_tasks(task, IMAGES, LabelStudioAccess(server.url, "tok"))
    assert seen[-1] == ("/data/upload/3/white.png", seen[-1][1]) and seen[-1][1]["Authorization"] == "Token tok"


def test_cloud_uris_go_through_label_studio_presign(fetcher, served):
    server, seen = served
    task = [{"id": 7, "data": {"image": "s3://bucket/a.png"}}]
    assert "cloud storage URI" in fetcher.fetch_tasks(task, IMAGES, NO_LS)[0].error
    fetcher.fetch_tasks(task, IMAGES, LabelStudioAccess(server.url, "tok"))
    encoded = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    assert seen[-1][0] == f"/tasks/7/presign/?fileuri={encoded}"


def test_data_uris_and_text(fetcher, images):
    uri = "data:image/png;base64," + base64.b64encode(images["black"].read_bytes()).decode()
    (ok,) = fetcher.fetch_tasks([{"data": {"image": uri}}], IMAGES, NO_LS)
    assert open(ok.value, "rb").read() == images["black"].read_bytes() and ok.value.endswith(".png")
    (bad,) = fetcher.fetch_tasks([{"data": {"image": "data:image/png;base64,@@@"}}], IMAGES, NO_LS)
    assert "bad base64" in bad.error
    (text,) = fetcher.fetch_tasks([{"data": {"text": "http://not-fetched.example/x"}}], data_objects(TEXT_CONFIG), NO_LS)
    assert text.value == "http://not-fetched.example/x"


def test_several_objects_give_a_dict(fetcher, images):
    config = '<View><Image name="a" value="$a"/><Text name="t" value="$t"/><Choices name="c" toName="a"><Choice value="x"/></Choices></View>'
    (item,) = fetcher.fetch_tasks([{"data": {"a": str(images["white"]), "t": "hello"}}], data_objects(config), NO_LS)
    assert item.value == {"a": str(images["white"]), "t": "hello"}
