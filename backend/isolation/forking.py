"""What the two fork servers share: the backends' template (``template``) and a worker's zygote (``zygote``).

Both are single-threaded processes that imported something slow once and fork on request, so a fork
starts in milliseconds with those imports in pages it shares. Both speak the same protocol, one pickled
message per packet on a SOCK_SEQPACKET socket, with the descriptors a fork needs passed alongside::

    client -> server   (kind, n, ...) + fds        a numbered request for a fork
    server -> client   ("forked", n, pid) | ("fork-failed", n, reason)
                       ("exited", pid, wait status)    when a fork it asked for has ended

``ForkClient`` is the client's side; the rest are the servers' common steps.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import importlib
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

PACKET = 1 << 16
MAX_FDS = 8  # descriptors passed with one request
ENVIRONMENT_LIMIT = 1 << 22


class ForkUnavailable(Exception):
    """A fork server could not be started, did not answer, or could not fork."""


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket, as the kernel says (SO_PEERCRED)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", credentials)[0])


def hung_up(sock: socket.socket) -> bool:
    """Whether the process at the other end has closed the connection (what it sent may still be waiting
    to be read): a poll, which reads nothing, so another thread may be reading it meanwhile."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))


def describe_exit(status: int | None) -> str:
    """A wait status as words: 'exit code 3', 'killed by SIGKILL'."""
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {os.WEXITSTATUS(status)}"


PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def prctl(option: int, value: int | bytes) -> None:
    """Linux's prctl, where there is one (elsewhere, nothing: these are conveniences and safety nets)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):
        pass


def name_process(name: str) -> None:
    """The name ``ps -o comm`` and ``top`` show: every fork of one Python otherwise shows the same command line."""
    prctl(PR_SET_NAME, name.encode()[:15])


def wait_status(returncode: int) -> int:
    """A Popen return code (negative: the signal) as the wait status ``describe_exit`` reads."""
    return (-returncode) & 0x7F if returncode < 0 else returncode << 8


ANSWERS = ("forked", "fork-failed", "owned")  # the answers to requests, by their number


class ForkClient:
    """One connection to a fork server: numbered fork requests, their answers, and the ends of the forks.

    ``on_message`` gets what is not an answer or an exit (the zygote's "warmed"). ``forks_die_with_server``:
    when the connection ends, the listeners of forks still running hear SIGKILL (a zygote takes its forks
    with it; the templates' forks outlive them).
    """

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        on_message: Callable[[tuple], None] | None = None,
        forks_die_with_server: bool = True,
    ) -> None:
        self.sock = sock
        self.ended = threading.Event()
        self._on_message = on_message
        self._forks_die = forks_die_with_server
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._replies: dict[int, tuple] = {}
        self._exits: dict[int, int] = {}
        self._listeners: dict[int, Callable[[int], None]] = {}
        self._counter = 0
        threading.Thread(target=self._read, name=name, daemon=True).start()

    def send(self, message: tuple, fds: Iterable[int] = ()) -> None:
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [pickle.dumps(message)], list(fds))
        except OSError as exc:
            raise ForkUnavailable(f"not answering: {exc}") from exc

    def request(self, kind: str, arguments: tuple, fds: Iterable[int], timeout: float) -> tuple:
        """Send ``(kind, n, *arguments)`` with ``fds``; the server's answer to it (a server answers once its
        imports are done)."""
        with self._state:
            self._counter += 1
            number = self._counter
        self.send((kind, number, *arguments), fds)
        with self._state:
            if not self._state.wait_for(lambda: number in self._replies or self.ended.is_set(), timeout):
                raise ForkUnavailable(f"no answer within {timeout:g} s")
            if number not in self._replies:
                raise ForkUnavailable("the fork server ended")
            return self._replies.pop(number)

    def fork(self, kind: str, arguments: tuple, fds: Iterable[int], timeout: float) -> int:
        """Ask for a fork (``(kind, n, *arguments)`` with ``fds``); its pid once the server has forked."""
        reply = self.request(kind, arguments, fds, timeout)
        if reply[0] != "forked":
            raise ForkUnavailable(f"could not fork: {reply[2]}")
        return int(reply[2])

    def on_exit(self, pid: int, listener: Callable[[int], None]) -> None:
        """Call ``listener(wait status)`` once the forked ``pid`` has ended (at once if it already has)."""
        with self._state:
            status = self._exits.pop(pid, None)
            if status is None:
                self._listeners[pid] = listener
                return
        listener(status)

    def live(self) -> bool:
        """Whether the server is there: not ``ended``, and its end of the connection not closed. A server
        killed a moment ago has closed it before the reader thread has run to notice (on a busy machine,
        long enough for a backend to be forked and sent to a socket nobody listens at)."""
        if self.ended.is_set():
            return False
        try:
            return not hung_up(self.sock)
        except (ValueError, OSError):  # closed by the reader meanwhile (its descriptor -1)
            return False

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; it closes the socket
        except OSError:
            pass

    def _read(self) -> None:
        while True:
            try:
                data, _, _, _ = socket.recv_fds(self.sock, PACKET, 0)
            except OSError:
                data = b""
            if not data:
                break
            message = pickle.loads(data)
            listener = None
            with self._state:
                if message[0] in ANSWERS:
                    self._replies[message[1]] = message
                elif message[0] == "exited":
                    listener = self._listeners.pop(message[1], None)
                    if listener is None:
                        self._exits[message[1]] = message[2]
                self._state.notify_all()
            if listener is not None:
                listener(message[2])
            elif message[0] not in (*ANSWERS, "exited") and self._on_message is not None:
                self._on_message(message)
        self.sock.close()
        with self._state:
            self.ended.set()
            self._state.notify_all()
            listeners, self._listeners = self._listeners, {}
        if self._forks_die:
            for listener in listeners.values():
                listener(signal.SIGKILL)


# -- the servers' side ------------------------------------------------------------------------------


def import_all(modules: Iterable[str]) -> dict[str, str | None]:
    """Import each module; what failed, and why (a missing optional flavor is reported, not fatal)."""
    outcome: dict[str, str | None] = {}
    for name in modules:
        try:
            importlib.import_module(name)
            outcome[name] = None
        except Exception as exc:  # noqa: BLE001
            outcome[name] = f"{type(exc).__name__}: {exc}"
    return outcome


def freeze_imports() -> None:
    """What is imported now is shared with every fork made later: keep it out of the collector, so a
    collection in a fork does not write to (and so copy) every page of it."""
    gc.collect()
    gc.freeze()


MADV_COLLAPSE = 25  # Linux 6.1: make these pages a transparent huge page now
HUGE_PAGE = 2 << 20
DENSE_ENOUGH = 0.9  # of a huge page's small pages resident, or it is left as it is


def share_as_huge_pages() -> int:
    """Put this process's anonymous memory (its heap, Python's arenas) in transparent huge pages where it is
    dense, once its imports are done and frozen: a fork then copies one page-table entry per 2 MiB instead
    of 512, its exit unmaps as few, and a read of its smaps (the orchestrator reads every process's every
    few seconds) walks as few. On the models' template: a fork 13 -> 5 ms of the template's CPU, its child's
    life and exit 36 -> 26 ms, a read of the child's smaps 9 -> 5 ms. A fork that writes to such a page
    splits it for itself alone. Only 2 MiB that are nine tenths resident: a sparse one would be filled in
    and grow the template. Best effort: where the kernel has no MADV_COLLAPSE (before 6.1), or does not
    make huge pages, nothing changes. Returns the bytes now in huge pages."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore = libc.madvise, libc.mincore
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        regions = _anonymous_regions()
    except (OSError, AttributeError):
        return 0
    resident = ctypes.create_string_buffer(HUGE_PAGE // os.sysconf("SC_PAGE_SIZE"))
    collapsed = 0
    for start, end in regions:
        for chunk in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end - HUGE_PAGE + 1, HUGE_PAGE):
            if mincore(chunk, HUGE_PAGE, resident) != 0:
                continue
            if sum(flag & 1 for flag in resident.raw) < DENSE_ENOUGH * len(resident.raw):
                continue
            if madvise(chunk, HUGE_PAGE, MADV_COLLAPSE) == 0:
                collapsed += HUGE_PAGE
            elif ctypes.get_errno() == errno.EINVAL and not collapsed:
                return 0  # this kernel has no MADV_COLLAPSE
    return collapsed


def _anonymous_regions() -> list[tuple[int, int]]:
    """This process's private, writable, anonymous mappings (and its heap): (start, end)."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if fields[1] == "rw-p" and fields[4] == "0" and path in ("", "[heap]"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                regions.append((start, end))
    return regions


def reap(report: Callable[[int, int], None]) -> None:
    """Collect every fork that has ended, passing each pid and wait status to ``report``."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        report(pid, status)


def environment_fd(env: Mapping[str, str]) -> int:
    """An environment in a memfd, for a fork to read: it never passes through the fork server's memory."""
    fd = os.memfd_create("lsbackend-environment")
    os.write(fd, json.dumps(dict(env)).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def adopt_environment(fd: int) -> None:
    """In a fork: replace this process's environment (os.environ and the C one) with the one in ``fd``."""
    with os.fdopen(fd, "rb") as handle:
        env = json.loads(handle.read(ENVIRONMENT_LIMIT))
    os.environ.clear()
    os.environ.update(env)


def leave_server(drop: Iterable[socket.socket | int], wakeup: tuple[int, int], new_session: bool) -> None:
    """In a fork: let go of the server's descriptors (``drop``) and signal handling; in a session of its
    own with ``new_session`` (a backend, a zygote), else in the server's group (which it ends with)."""
    for item in drop:
        if isinstance(item, socket.socket):
            item.close()
        else:
            os.close(item)
    for fd in wakeup:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    if new_session:
        os.setsid()


class ForkServer:
    """The servers' loop: read requests from its connections, fork, and report how the forks ended.

    ``handle(connection, message, fds)`` answers each request, usually with ``fork``; ``closed(connection)``
    says whether the server should stop now that a connection has closed. A listener (the template's)
    adds a connection per client; without one (the zygote) the server has the connections it was given.
    """

    def __init__(self, connections: Iterable[socket.socket], listener: socket.socket | None = None) -> None:
        self.connections = list(connections)
        self.listener = listener
        self.wake = os.pipe()
        os.set_blocking(self.wake[1], False)
        signal.set_wakeup_fd(self.wake[1])
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._asked_by: dict[int, socket.socket] = {}
        self.children: set[int] = set()  # forks not yet reaped

    @staticmethod
    def send(connection: socket.socket, message: tuple) -> None:
        try:
            connection.send(pickle.dumps(message))
        except OSError:
            pass  # the client is gone; nothing to tell

    def fork(self, connection: socket.socket, number: int, fds: list[int], child: Callable[[], int]) -> int:
        """Fork; the child runs ``child`` and exits with what it returns; the server closes ``fds`` and answers."""
        try:
            pid = os.fork()
        except OSError as exc:
            self.send(connection, ("fork-failed", number, str(exc)))
            pid = -1
        if pid == 0:
            code = 1
            try:
                code = child()
            except BaseException:
                log.exception("a fork failed before it could run")
            finally:
                os._exit(code)
        for received in fds:
            os.close(received)
        if pid > 0:
            self._asked_by[pid] = connection
            self.children.add(pid)
            self.send(connection, ("forked", number, pid))
        return pid

    def descriptors(self) -> list[socket.socket | int]:
        """Everything a fork should let go of (``leave_server``), but for the wakeup pipe."""
        return [*self.connections, *([self.listener] if self.listener is not None else [])]

    def run(
        self,
        handle: Callable[[socket.socket, tuple, list[int]], None],
        closed: Callable[[socket.socket], bool],
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """Serve until ``closed`` says so, or ``still_wanted`` (asked each second) does not."""
        while True:
            watched: list[socket.socket | int] = [*self.connections, self.wake[0]]
            if self.listener is not None:
                watched.append(self.listener)
            ready, _, _ = select.select(watched, [], [], 1.0)
            if self.listener not in ready and not still_wanted():  # a connection waiting is asked first
                return
            if self.wake[0] in ready:
                os.read(self.wake[0], 4096)
            reap(self._report)
            for item in ready:
                if item is self.listener:
                    self.connections.append(self.listener.accept()[0])
                elif isinstance(item, socket.socket) and not self._serve(item, handle) and closed(item):
                    return

    def _serve(self, connection: socket.socket, handle: Callable[[socket.socket, tuple, list[int]], None]) -> bool:
        """One request from ``connection``; False when it has closed."""
        try:
            data, fds, _, _ = socket.recv_fds(connection, PACKET, MAX_FDS)
        except InterruptedError:
            return True
        except OSError:
            data, fds = b"", []
        if not data:
            self.connections.remove(connection)
            connection.close()
            for pid, asker in list(self._asked_by.items()):
                if asker is connection:
                    del self._asked_by[pid]
            return False
        try:
            handle(connection, pickle.loads(data), fds)
        except Exception:  # a malformed request must not end the server every backend forks from
            log.exception("a fork server could not read a request")  # its descriptors may be gone: left alone
        return True

    def _report(self, pid: int, status: int) -> None:
        self.children.discard(pid)
        connection = self._asked_by.pop(pid, None)
        if connection is not None:
            self.send(connection, ("exited", pid, status))
