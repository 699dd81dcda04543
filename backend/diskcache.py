"""Task files on disk, bounded in size: a repeated URL is fetched once, and the folder never grows past
``CACHE_MAX_MB``. The least recently used files go first, but never one used in the last few
minutes (a request in flight may be about to read it), so a burst may pass the cap for a while.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class TooLarge(Exception):
    """A file over the per-file limit; the message names the setting."""


class DiskCache:
    """Files by key under ``root``, with their sizes and last use kept in memory (one scan at start)."""

    def __init__(self, root: Path, max_bytes: int, protect_s: float = 300.0) -> None:
        self.root, self.max_bytes, self.protect_s = root, max_bytes, protect_s
        self._files: OrderedDict[Path, tuple[int, float]] = OrderedDict()  # path -> (bytes, last use), oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self._scan()

    def _scan(self) -> None:
        if not self.root.is_dir():
            return
        found = []
        for path in self.root.glob("*/*"):
            if path.name.startswith(".part-"):
                path.unlink(missing_ok=True)  # a download a crash interrupted
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((st.st_mtime, path, st.st_size))
        now = time.monotonic()
        for mtime, path, size in sorted(found):
            self._files[path] = (size, now - (time.time() - mtime))
            self._bytes += size

    def path_for(self, key: str, suffix: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}{suffix}"

    def lookup(self, key: str, suffix: str) -> str | None:
        """The cached file for ``key``, marked as just used; None when there is none."""
        path = self.path_for(key, suffix)
        with self._lock:
            entry = self._files.get(path)
            if entry is not None:
                self._files[path] = (entry[0], time.monotonic())
                self._files.move_to_end(path)
        if entry is None:
            return None
        if not path.exists():  # removed behind our back
            self._forget(path)
            return None
        return str(path)

    def store(self, key: str, suffix: str, chunks: Iterable[bytes], max_file_bytes: int, setting: str) -> str:
        """Write ``chunks`` as the file for ``key``; TooLarge past ``max_file_bytes`` (named by ``setting``)."""
        target = self.path_for(key, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_file_bytes:
                        raise TooLarge(f"it is larger than {max_file_bytes / (1 << 20):g} MB: raise {setting} to allow it")
                    handle.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            old = self._files.pop(target, None)
            self._bytes += size - (old[0] if old else 0)
            self._files[target] = (size, time.monotonic())
        self._evict()
        return str(target)

    def _forget(self, path: Path) -> None:
        with self._lock:
            entry = self._files.pop(path, None)
            if entry is not None:
                self._bytes -= entry[0]

    def _evict(self) -> None:
        """Remove the least recently used files until under the cap, sparing those used lately."""
        if self._bytes <= self.max_bytes:
            return
        removed = []
        with self._lock:
            now, freed = time.monotonic(), 0
            for path, (size, used) in self._files.items():  # oldest first
                if self._bytes - freed <= self.max_bytes or now - used < self.protect_s:
                    break
                removed.append(path)
                freed += size
            for path in removed:
                del self._files[path]
            self._bytes -= freed
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("task data cache: removed %d least recently used file(s) to stay under %d MB",
                     len(removed), self.max_bytes >> 20)

    def describe(self) -> dict[str, int]:
        return {"files": len(self._files), "bytes": self._bytes, "max_bytes": self.max_bytes}
