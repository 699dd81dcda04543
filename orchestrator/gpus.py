"""Which GPUs the host has, and which one a new backend gets (one each, the least used first)."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable


def _nvidia_smi(*query: str) -> list[str]:
    """The lines nvidia-smi prints for this query (fixed arguments only); none where it is absent or fails."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        listed = subprocess.run([nvidia_smi, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def detect_gpus() -> tuple[str, ...]:
    """GPU indices as nvidia-smi lists them; none when it is absent or fails. Never imports CUDA."""
    return tuple(line for line in _nvidia_smi("--query-gpu=index") if line.isdigit())


def gpu_memory_by_pid() -> dict[int, int]:
    """Bytes of GPU memory each process holds, as nvidia-smi lists its compute processes; {} without one."""
    held: dict[int, int] = {}
    for line in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        pid, _, mib = (part.strip() for part in line.partition(","))
        if pid.isdigit() and mib.isdigit():
            held[int(pid)] = held.get(int(pid), 0) + int(mib) * (1 << 20)
    return held


def assign_gpu(gpus: tuple[str, ...], in_use: Iterable[str]) -> str:
    """Round robin over the host's GPUs: the one with the fewest backends, lowest index on a tie."""
    if not gpus:
        return ""
    load = Counter(gpu for gpu in in_use if gpu)
    return min(gpus, key=lambda gpu: (load[gpu], gpus.index(gpu)))
