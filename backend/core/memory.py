"""What processes hold in memory, read from /proc: a process tree and its proportional set size (PSS).

PSS, not RSS: backends forked from one template share most of their pages, and RSS counts each shared
page once per process, which would make ten forks look ten times their cost.
"""

from __future__ import annotations

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
