"""What every benchmark shares: a results table, a scratch folder, process memory, percentiles."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.memory import children_by_parent, pss_bytes, rss_bytes


@dataclass
class Row:
    """One comparison: ours against a baseline measured side by side in the same run."""

    section: str
    what: str
    ours: float
    baseline: float
    unit: str
    baseline_name: str
    higher_is_better: bool = False
    target: str = ""

    @property
    def ratio(self) -> float:
        """How many times better ours is (above 1 is better, whichever way the unit points)."""
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else float("inf")
        return self.baseline / self.ours if self.ours else float("inf")


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(
            f"  {row.section}: {row.what}: {row.ours:.4g} {row.unit} vs {row.baseline:.4g} ({row.ratio:.2f}x)",
            flush=True,
        )

    def markdown(self) -> str:
        lines = [
            "| section | measure | this project | baseline | baseline is | ratio (x better) | target |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.section} | {r.what} | {r.ours:.4g} {r.unit} | {r.baseline:.4g} {r.unit} | {r.baseline_name} "
                f"| {r.ratio:.2f} | {r.target} |"
            )
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes, in MiB; pages they share count once per process."""
    return rss_bytes(pids) / (1 << 20)


def pss_mib(pids: list[int]) -> float:
    """Proportional memory of these processes, in MiB: each shared page split between all that share it."""
    return pss_bytes(pids) / (1 << 20)


def tree_cpu_seconds(pid: int) -> dict[int, tuple[int, float]]:
    """CPU time (user + system) so far of a process and each descendant, with its depth below ``pid``:
    taken before and after a load, it says where that load's CPU went."""
    ticks = os.sysconf("SC_CLK_TCK")
    children = children_by_parent()
    found: dict[int, tuple[int, float]] = {}
    todo = [(pid, 0)]
    while todo:
        current, depth = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        found[current] = (depth, (int(fields[11]) + int(fields[12])) / ticks)
        todo.extend((child, depth + 1) for child in children.get(current, []))
    return found


def cpu_used(before: dict[int, tuple[int, float]], after: dict[int, tuple[int, float]], roles: tuple[str, ...]) -> dict[str, float]:
    """Seconds of CPU used between two ``tree_cpu_seconds``, summed by depth and named by ``roles``."""
    used = dict.fromkeys(roles, 0.0)
    for pid, (depth, seconds) in after.items():
        role = roles[min(depth, len(roles) - 1)]
        used[role] += seconds - before.get(pid, (depth, 0.0))[1]
    return used
