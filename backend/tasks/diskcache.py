"""Task files on disk, bounded in size: a repeated URL is fetched once, and the folder never grows past
``CACHE_MAX_MB``. The least recently used files go first, but never one used in the last few
minutes (a request in flight may be about to read it), so a burst may pass the cap for a while.

A full disk under MODEL_DIR stops the caching, not the serving: the file goes to a small spill cache
in the system's temporary folder instead, ``/health`` says why, and writing under MODEL_DIR is tried
again with the next file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class TooLarge(Exception):
    """A file over the per-file limit; the message names the setting."""


FULL = (errno.ENOSPC, errno.EDQUOT)
SPILL_MAX_BYTES = 256 << 20


class DiskFull(OSError):
    """The disk filled while a file was written; holds what was written of it."""

    def __init__(self, cause: OSError, written: bytes) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.written = written


class DiskCache:
    """Files by key under ``root``, with their sizes and last use kept in memory (one scan at start)."""

    def __init__(self, root: Path, max_bytes: int, protect_s: float = 300.0, spill: bool = True) -> None:
        self.root, self.max_bytes, self.protect_s = root, max_bytes, protect_s
        self._files: OrderedDict[Path, tuple[int, float]] = OrderedDict()  # path -> (bytes, last use), oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self._spill: DiskCache | None = None
        self._spills = spill
        self.full: dict[str, object] | None = None  # why the last file could not be written under root
        self._scan()

    def _spill_cache(self) -> DiskCache:
        if self._spill is None:
            folder = Path(tempfile.mkdtemp(prefix="lsbackend-spill-"))
            self._spill = DiskCache(folder, min(self.max_bytes, SPILL_MAX_BYTES), self.protect_s, spill=False)
        return self._spill

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
        found = self._lookup(key, suffix)
        if found is None and self._spill is not None:
            return self._spill.lookup(key, suffix)
        return found

    def _lookup(self, key: str, suffix: str) -> str | None:
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
        """Write ``chunks`` as the file for ``key``; TooLarge past ``max_file_bytes`` (named by ``setting``).
        On a full disk, into the spill cache (see the module's docstring)."""
        chunks = iter(chunks)
        try:
            path = self._write(self.path_for(key, suffix), b"", chunks, max_file_bytes, setting)
        except DiskFull as exc:
            if not self._spills:
                raise
            if self.full is None:
                log.error("task data cache: %s is full (%s); files go to a spill folder in %s until it has room",
                          self.root, exc.strerror, tempfile.gettempdir())
            self.full = {"error": f"{self.root}: {exc.strerror}", "since": time.time(),
                         "detail": "Task data is not cached under MODEL_DIR until its disk has room; serving goes on."}
            spill = self._spill_cache()
            return spill._write(spill.path_for(key, suffix), exc.written, chunks, max_file_bytes, setting)
        if self.full is not None:
            log.info("task data cache: %s has room again", self.root)
            self.full = None
        return path

    def _write(self, target: Path, head: bytes, chunks: Iterator[bytes], max_file_bytes: int, setting: str) -> str:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        except OSError as exc:
            if exc.errno in FULL:
                raise DiskFull(exc, head) from exc
            raise
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:  # unbuffered: on a full disk, the file holds what was written
                for chunk in _chained(head, chunks):
                    size += len(chunk)
                    if size > max_file_bytes:
                        raise TooLarge(f"it is larger than {max_file_bytes / (1 << 20):g} MB: raise {setting} to allow it")
                    left = memoryview(chunk)
                    while left:
                        try:
                            left = left[handle.write(left) or 0:]
                        except OSError as exc:
                            if exc.errno in FULL:
                                raise DiskFull(exc, _read_back(tmp) + bytes(left)) from exc
                            raise
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

    def close(self) -> None:
        """Remove the spill folder, if a full disk made one."""
        if self._spill is not None:
            shutil.rmtree(self._spill.root, ignore_errors=True)

    def describe(self) -> dict[str, object]:
        shown: dict[str, object] = {"files": len(self._files), "bytes": self._bytes, "max_bytes": self.max_bytes,
                                    "writing": self.full is None}
        if self.full is not None:
            shown["problem"] = self.full
        if self._spill is not None:
            shown["spilled"] = {"folder": str(self._spill.root), **self._spill.describe()}
        return shown


def _chained(head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from chunks


def _read_back(path: str) -> bytes:
    """What was written of a file before the disk filled."""
    with open(path, "rb") as handle:
        return handle.read()
