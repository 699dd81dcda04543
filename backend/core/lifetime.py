"""Who outlives whom: a process named so that a recycled pid cannot pass for it, and a watchdog that
ends a child (a training) once the process that owns it is gone, however that process died."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_ENV = "LSBACKEND_OWNER_PID"  # set by the backend's gunicorn worker: its master, the backend itself


def start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), or '' where /proc has none (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields_after_name = stat.rpartition(")")[2].split()
    return fields_after_name[19] if fields_after_name[0] != "Z" else ""


def wait_for_exit(pid: int, timeout: float) -> None:
    """Return once ``pid`` has ended (a zombie has) or ``timeout`` has passed, woken by the kernel through a
    pidfd rather than by polling: a stop is seen the moment it happens. Where pidfds are missing (Linux
    before 5.3), after a short sleep, for the caller to look again."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        time.sleep(min(max(timeout, 0.0), 0.05))
        return
    try:
        select.select([fd], [], [], max(timeout, 0.0))
    finally:
        os.close(fd)


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` as /proc says (0 where it has none to say): who forked it, or who adopted it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def owner_identity() -> str:
    """``pid:starttime`` of the backend this process serves: the gunicorn master where there is one."""
    return process_identity(int(os.environ.get(OWNER_ENV) or os.getpid()))


def process_identity(pid: int | None = None) -> str:
    """``pid:starttime`` of a process (this one by default): what ``alive`` checks."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def alive(identity: str) -> bool:
    pid, _, started = identity.partition(":")
    return pid.isdigit() and bool(started) and start_time(int(pid)) == started


ADOPTED_DIR = "processes"  # under MODEL_DIR: what the backend runs outside its own process tree


def note_adopted(model_dir: Path, name: str, pid: int) -> Path | None:
    """Say that ``pid`` works for this backend though it is not its descendant (a model process forked
    from the models' template): the orchestrator counts its tree in the backend's memory. The note, or
    None where the folder cannot be written (it is only a measurement)."""
    folder = model_dir / ADOPTED_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():  # notes of processes gone since (a worker that was killed)
            if not alive(old.read_text().strip()):
                old.unlink(missing_ok=True)
        owner = int(os.environ.get(OWNER_ENV) or os.getpid())  # the backend's master: a renewal's twin shares MODEL_DIR
        note = folder / f"{name}-{owner}-{os.getpid()}"
        note.write_text(process_identity(pid))
        return note
    except OSError:
        return None


def adopted_pids(model_dir: Path, owner: int) -> list[int]:
    """The live processes ``note_adopted`` named for the backend whose master is ``owner``."""
    try:
        notes = [note.read_text().strip() for note in (model_dir / ADOPTED_DIR).glob(f"*-{owner}-*")]
    except OSError:
        return []
    return [int(identity.partition(":")[0]) for identity in notes if alive(identity)]


def end_with(identity: str, every_s: float = 0.5) -> threading.Thread:
    """Watch ``identity`` from a daemon thread; when it is gone, kill this process's whole group (the
    caller leads its own session, so that is this process and whatever it started)."""

    def watch() -> None:
        stop = threading.Event()
        while alive(identity):
            stop.wait(every_s)
        log.error("the backend that started this process (%s) is gone: stopping", identity)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="owner-watch", daemon=True)
    thread.start()
    return thread


def listening_pid(port: int) -> int | None:
    """The process that listens on loopback TCP ``port`` and whose parent does not (a gunicorn master, not its
    workers, which share the socket); None when there is none we can see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
        except OSError:
            continue
    for pid in holders:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent not in holders:
            return pid
    return None
