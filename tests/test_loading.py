"""Loading a model into a backend's model process: what concerns the copy of its artifacts on disk."""

from __future__ import annotations

import fcntl

import pytest

from backend.model.loading import artifacts_lock


def _could_take(path, kind: int) -> bool:
    """Whether another process (another open file) could take the lock ``kind`` now, without waiting."""
    with open(path, "a") as other:
        try:
            fcntl.flock(other, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@pytest.mark.parametrize("loads", [1, 2])
def test_a_download_waits_for_the_loads_under_way_and_loads_wait_for_it(tmp_path, loads):
    # Two configures racing each other: one model process reads the copy while the other would rewrite it.
    lock = tmp_path / ".lock"
    with artifacts_lock(tmp_path, exclusive=False):
        if loads == 2:
            with artifacts_lock(tmp_path, exclusive=False):  # loads share it
                assert not _could_take(lock, fcntl.LOCK_EX)
        assert _could_take(lock, fcntl.LOCK_SH) and not _could_take(lock, fcntl.LOCK_EX)  # a download waits
    with artifacts_lock(tmp_path, exclusive=True):
        assert not _could_take(lock, fcntl.LOCK_SH)  # a load waits for the download
    assert _could_take(lock, fcntl.LOCK_EX)  # let go once done
