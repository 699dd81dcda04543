"""Loading a model into a backend's model process: what concerns the copy of its artifacts on disk."""

from __future__ import annotations

import threading

from backend.model.loading import artifacts_lock
from harness.servers import wait_until


def test_a_download_waits_for_the_loads_under_way_and_loads_wait_for_it(tmp_path):
    # Two configures racing each other: one model process reads the copy while the other would rewrite it.
    entered: list[str] = []

    def download() -> None:
        with artifacts_lock(tmp_path, exclusive=True):
            entered.append("download")

    with artifacts_lock(tmp_path, exclusive=False), artifacts_lock(tmp_path, exclusive=False):  # loads share it
        waiting = threading.Thread(target=download)
        waiting.start()
        wait_until(lambda: (tmp_path / ".lock").exists() and waiting.is_alive(), 5, "the download to start")
        waiting.join(0.3)
        assert entered == [] and waiting.is_alive()  # it waits while a load reads the copy
    waiting.join(10)
    assert entered == ["download"]
