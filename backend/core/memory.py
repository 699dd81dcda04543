"""What processes hold in memory, read from /proc: a process tree and its proportional set size (PSS).

PSS, not RSS: backends forked from one template share most of their pages, and RSS counts each shared
page once per process, which would make ten forks look ten times their cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(parent, []).append(int(stat.parent.name))
    return tree


def tree_pids(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """A process and all its descendants (``tree``: a ``children_by_parent`` to reuse for several)."""
    tree = children_by_parent() if tree is None else tree
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def status_field_kib(pids: list[int], filename: str, field: str) -> int:
    """The sum of one ``kB`` field of /proc/<pid>/<filename> over ``pids`` (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{filename}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            pass
    return total


def pss_and_private_bytes(pids: list[int]) -> tuple[int, int]:
    """PSS and private memory (pages no other process maps: what stopping them frees) of these processes."""
    pss = private = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    private += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return pss * 1024, private * 1024


def pss_bytes(pids: list[int]) -> int:
    """Proportional memory of these processes: each shared page split between all that share it."""
    return status_field_kib(pids, "smaps_rollup", "Pss:") * 1024


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes; pages they share count once per process."""
    return status_field_kib(pids, "status", "VmRSS:") * 1024


def activity(pid: int) -> tuple[int, int, int] | None:
    """What moves when a process touches memory of its own: its start time (a reused pid is another
    process), its page faults and its resident pages, from /proc/<pid>/stat (microseconds to read); None
    where it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19]), int(fields[7]) + int(fields[9]), int(fields[21])
    except (OSError, ValueError, IndexError):
        return None


def moved(before: tuple[int, int, int], now: tuple[int, int, int], pages: int) -> bool:
    """Whether the process is another, or has faulted or changed its resident size by ``pages`` or more."""
    return before[0] != now[0] or now[1] - before[1] >= pages or abs(now[2] - before[2]) >= pages


class MemoryReads:
    """PSS and private memory by process, read from smaps_rollup again only where the process has faulted
    or changed its resident size by ``pages`` (64: 256 KiB) since its last read, or that read is
    ``max_age_s`` old. A read walks the process's page tables: about 8 ms for a fork of the backends'
    template, and a supervisor reading a hundred mostly idle processes spent about a quarter of its time
    on it (an idle gunicorn process still faults a page or two a second). The shares of pages that others map move
    as processes start and end; ``max_age_s`` bounds how stale they get."""

    def __init__(self, max_age_s: float = 10.0, pages: int = 64) -> None:
        self.max_age_s, self.pages = max_age_s, pages
        self._reads: dict[int, tuple[tuple[int, int, int], float, int, int]] = {}
        self._lock = threading.Lock()
        self.made = self.reused = 0  # what the reads cost: smaps_rollup read, and answered from before

    def pss_and_private(self, pid: int) -> tuple[int, int]:
        key, now = activity(pid), time.monotonic()
        with self._lock:
            last = self._reads.get(pid)
            if key is not None and last is not None and not moved(last[0], key, self.pages) \
                    and now - last[1] < self.max_age_s:
                self.reused += 1
                return last[2], last[3]
        pss, private = pss_and_private_bytes([pid])
        with self._lock:
            self.made += 1
            if key is None:
                self._reads.pop(pid, None)
            else:
                self._reads[pid] = (key, now, pss, private)
        return pss, private

    def keep_only(self, pids: Iterable[int]) -> None:
        """Forget the processes not among ``pids`` (ended, or no longer measured)."""
        wanted = set(pids)
        with self._lock:
            for pid in set(self._reads) - wanted:
                del self._reads[pid]
