"""Task data becomes local files: concurrently, cached by URL, one failure failing one task."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.labeling.validation import data_objects
from backend.tasks.datapoints import DatapointDirectory, DatapointNotFound, DatasourceRef
from backend.tasks.fetcher import DagshubAccess, FetchLimits, KeyedLocks, LocalFiles, TaskDataFetcher
from backend.tasks.labelstudio import LabelStudioAccess
from backend.tasks.outbound import AddressPolicy
from harness.servers import file_server
from tests.support.hooks import IMAGE_CONFIG, TEXT_CONFIG

IMAGES = data_objects(IMAGE_CONFIG)
NO_LS = LabelStudioAccess()


def loopback_limits(images, **extra):
    """What these tests' servers need: loopback addresses and the fixture images' folder allowed."""
    return FetchLimits(local=LocalFiles((str(images["white"].parent),)), addresses=AddressPolicy(("127.0.0.1",)),
                       **{"timeout_s": 5.0, **extra})


@pytest.fixture
def fetcher(tmp_path, images):
    fetcher = TaskDataFetcher(tmp_path / "cache", concurrency=8, limits=loopback_limits(images))
    yield fetcher
    fetcher.close()


def test_urls_download_once_and_in_order(fetcher, served, images):
    server, seen = served
    tasks = [{"id": i, "data": {"image": f"{server.url}/{name}.png"}} for i, name in enumerate(["white", "black", "white"])]
    inputs = fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert [Path(i.value).read_bytes() for i in inputs] == [images[n].read_bytes() for n in ("white", "black", "white")]
    assert sorted(path for path, _ in seen) == ["/black.png", "/white.png"]  # the repeated URL was fetched once
    fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert len(seen) == 2  # and everything came from the disk cache the second time


def test_a_url_lock_holds_back_that_url_only_and_is_dropped_after_use():
    locks, second_in = KeyedLocks(), threading.Event()

    def others_and_the_same_url():
        for n in range(500):  # striped locks would collide with the held one and deadlock here
            with locks.hold(f"http://files/{n}.png"):
                pass
        with locks.hold("http://files/held.png"):
            second_in.set()

    with locks.hold("http://files/held.png"):
        worker = threading.Thread(target=others_and_the_same_url, daemon=True)
        worker.start()
        assert not second_in.wait(0.3)  # the same URL waits for the download under way
    worker.join(5)
    assert second_in.is_set() and not worker.is_alive()
    assert len(locks) == 0


def test_one_failure_fails_one_task(fetcher, served):
    server, _ = served
    tasks = [{"id": 1, "data": {"image": f"{server.url}/white.png"}}, {"id": 2, "data": {"image": f"{server.url}/missing.png"}},
             {"id": 3, "data": {"image": "http://127.0.0.1:9/unreachable.png"}}, {"id": 4, "data": {"other": 1}}]
    inputs = fetcher.fetch_tasks(tasks, IMAGES, NO_LS)
    assert inputs[0].value and not inputs[0].error
    assert inputs[1].error == f"could not fetch {server.url}/missing.png: it answered 404"
    assert inputs[2].error == "could not fetch http://127.0.0.1:9/unreachable.png"  # and nothing about why
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
    assert Path(ok.value).read_bytes() == images["black"].read_bytes() and ok.value.endswith(".png")
    (bad,) = fetcher.fetch_tasks([{"data": {"image": "data:image/png;base64,@@@"}}], IMAGES, NO_LS)
    assert "bad base64" in bad.error
    (text,) = fetcher.fetch_tasks([{"data": {"text": "http://not-fetched.example/x"}}], data_objects(TEXT_CONFIG), NO_LS)
    assert text.value == "http://not-fetched.example/x"


def test_several_objects_give_a_dict(fetcher, images):
    config = '<View><Image name="a" value="$a"/><Text name="t" value="$t"/><Choices name="c" toName="a"><Choice value="x"/></Choices></View>'
    (item,) = fetcher.fetch_tasks([{"data": {"a": str(images["white"]), "t": "hello"}}], data_objects(config), NO_LS)
    assert item.value == {"a": str(images["white"]), "t": "hello"}


def test_dagshub_datapoints_by_id_when_the_task_reference_fails(tmp_path, served, images):
    """DagsHub tasks carry meta.datapoint_id; the datasource's listing (as the dagshub client returns it:
    objects with datapoint_id and download_url) finds the file, fetched with the DagsHub token."""
    server, seen = served
    listings = []

    def list_datapoints(source):
        listings.append(source)
        return [SimpleNamespace(datapoint_id=41, download_url=f"{server.url}/white.png"),
                SimpleNamespace(datapoint_id=42, download_url=f"{server.url}/black.png")]

    fetcher = TaskDataFetcher(tmp_path / "cache", datapoints=DatapointDirectory(list_datapoints))
    source = DatasourceRef(server.url, "alice/data", "images", token="dh-token")
    access = DagshubAccess(server.url, "dh-token", source)
    tasks = [
        {"id": 1, "data": {"image": "images/black.png"}, "meta": {"datapoint_id": 42}},  # repo path: not fetchable
        {"id": 2, "data": {}, "meta": {"datapoint_id": 41, "datasource_id": 7}},  # no data reference at all
        {"id": 3, "data": {"image": "nowhere.png"}, "meta": {"datapoint_id": 99}},
        {"id": 4, "data": {"image": "nowhere.png"}},
    ]
    try:
        inputs = fetcher.fetch_tasks(tasks, IMAGES, NO_LS, access)
    finally:
        fetcher.close()
    assert Path(inputs[0].value).read_bytes() == images["black"].read_bytes()
    assert Path(inputs[1].value).read_bytes() == images["white"].read_bytes()
    assert "datapoint 99 is not in DagsHub datasource alice/data/images" in inputs[2].error
    assert "outside the folders task data may read" in inputs[2].error and "LOCAL_FILES_ROOTS" in inputs[3].error
    assert all(headers["Authorization"] == "Bearer dh-token" for _, headers in seen)
    assert listings == [source, source]  # one listing for the batch, one fresh listing for the unknown id
    with pytest.raises(DatapointNotFound, match="could not list"):
        DatapointDirectory(lambda source: 1 / 0).url_for(source, 1)


def test_datapoint_listing_uses_the_real_dagshub_client_with_the_configured_host_and_token(tmp_path):
    """No DagsHub API here: a local server answers 404, which shows the real client was driven to the
    configure's host with its token, and that its failure becomes a clean per-task error."""
    seen = []
    server = file_server(tmp_path, seen=seen)
    try:
        with pytest.raises(DatapointNotFound, match="could not list DagsHub datasource alice/data/images"):
            DatapointDirectory().url_for(DatasourceRef(server.url, "alice/data", "images", "tok123"), 5)
    finally:
        server.close()
    assert seen and seen[0][1]["Authorization"] == "Bearer tok123"
