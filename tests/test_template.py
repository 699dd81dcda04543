"""A template on its own: a real template process (with nothing to import, so it is quick), asked for
model processes as a worker asks, and refusing what is not a request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.isolation.forking import ForkClient, ForkUnavailable, environment_fd, hung_up
from backend.isolation.modelprocess import _stage_page
from backend.isolation.zygote import Zygote, connect_template
from harness.servers import ROOT, wait_until
from orchestrator.drivers.template import SOCKET_PATH_MAX, BackendTemplate, socket_path


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "t.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.isolation.template", str(path), ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_until(path.exists, 30, "the template's socket", proc)
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    owner.connect(str(path))
    client = ForkClient(owner, "test-owner", forks_die_with_server=False)
    assert client.request("owner", (), (), 30) == ("owned", 1, proc.pid)  # answered once imported
    yield path, client, proc
    client.close()
    proc.kill()
    proc.wait()


def _ask_for_model_process(client: ForkClient, env: dict[str, str]) -> tuple[int, socket.socket]:
    """A model process forked for ``client`` as a worker asks for one; its pid and the worker's end of its socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stage_fd, stage = _stage_page()
    env_fd = environment_fd(env)
    try:
        pid = client.fork("model", ((),), [env_fd, 2, theirs.fileno(), stage_fd], 10)
    finally:
        for fd in (env_fd, stage_fd):
            os.close(fd)
        theirs.close()
        stage.close()
    return pid, mine


def _gone(pid: int) -> bool:
    """Ended and reaped (not a zombie)."""
    return not Path(f"/proc/{pid}").exists()


def test_it_forks_model_processes_that_end_with_the_worker_that_asked_and_ends_with_its_last_owner_and_fork(template):
    path, owner, proc = template
    assert path.stat().st_mode & 0o777 == 0o600  # only this user may ask it for anything
    env = {"PATH": os.environ["PATH"], "MODEL_TEST": "1"}

    # A worker's model process: in a session of its own (its group ends what its hooks start), named for ps,
    # in the environment it was sent, which never passed through the template's own.
    worker = connect_template(str(path))
    pid, socket_to_it = _ask_for_model_process(worker, env)
    wait_until(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "lsb-model", 10, "the model process")
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    assert b"MODEL_TEST=1" not in Path(f"/proc/{pid}/environ").read_bytes()  # its start's, not the one it adopted

    # The worker killed outright (its connection to the template closes, but not the model process's socket,
    # as for a hook stuck in a call): the template kills its model process.
    worker.close()
    wait_until(lambda: _gone(pid), 10, "the model process of a worker gone")
    socket_to_it.close()

    # A worker's own Zygote in the same way, closing: its model process ends with it.
    zygote = Zygote(env=env, template=str(path)).start()
    assert zygote.forked_from_template and zygote.warmed.is_set()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stage_fd, stage = _stage_page()
    second = zygote.fork(theirs.fileno(), stage_fd, timeout=10)
    theirs.close()
    os.close(stage_fd)
    assert _parent(second) == proc.pid

    # Not a request: refused by name, the template serves on. A backend asked for after its driver gave up
    # (and started it itself) is not started a second time.
    with pytest.raises(ForkUnavailable, match="not a request: 'backend' with 0 descriptors"):
        owner.fork("backend", (["gunicorn"], "/", time.time() + 5), [], 5)
    env_fd, log_fd = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
    with pytest.raises(ForkUnavailable, match="asked for too long ago"):
        owner.fork("backend", (["gunicorn"], "/", time.time() - 1), [env_fd, log_fd], 5)
    os.close(env_fd)
    os.close(log_fd)

    owner.close()  # the last owner gone, but a model process it forked lives: it stays for whoever restarts
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(1.5)  # it would have gone at once on the close, or at its once-a-second look since
    assert path.exists()
    zygote.close()  # the worker gone, its model process ends, and with its last fork the template
    assert proc.wait(10) == 0 and not path.exists()
    assert _gone(second)
    mine.close()
    stage.close()


WORKER = """
import os, socket, sys
from backend.isolation.modelprocess import _stage_page
from backend.isolation.zygote import Zygote
zygote = Zygote(env={"PATH": os.environ["PATH"]}, template=sys.argv[1]).start()
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
stage_fd, stage = _stage_page()
print(zygote.fork(theirs.fileno(), stage_fd, timeout=10), flush=True)
sys.stdin.read()  # until killed; the model process's socket stays open, as a stuck hook's would
"""


def test_a_model_process_outlives_its_template_and_ends_with_its_worker(template):
    path, _, proc = template
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pid = int(worker.stdout.readline())
        proc.kill()  # the template gone: its model process serves on, as a backend it forked does
        proc.wait()
        wait_until(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "lsb-model", 10, "the model process")
        with pytest.raises(TimeoutError):
            wait_until(lambda: _gone_or_zombie(pid), 1.5, "the model process to end")
        worker.kill()  # the worker killed outright, with nobody to tell its model process: it sees for itself
        worker.wait()
        wait_until(lambda: _gone_or_zombie(pid), 10, "the model process of a worker gone")
    finally:
        worker.kill()
        worker.wait()


def _gone_or_zombie(pid: int) -> bool:
    """Ended: gone, or a zombie nobody has reaped yet (its template, its parent, was killed first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_a_worker_without_a_template_starts_its_zygote_as_a_new_python(tmp_path):
    zygote = Zygote(template=str(tmp_path / "nobody-listens.sock")).start()
    try:
        assert zygote.alive and not zygote.forked_from_template
    finally:
        zygote.close()
    with pytest.raises(ForkUnavailable, match="cannot connect"):
        connect_template(str(tmp_path / "nobody-listens.sock"))


def test_a_state_folder_too_deep_for_a_socket_gets_a_private_short_one(tmp_path):
    short = socket_path(tmp_path)
    assert short == tmp_path.resolve() / "template.v2.sock"  # named by its protocol: an older one is left alone
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = socket_path(deep)
    assert len(os.fsencode(path)) <= SOCKET_PATH_MAX and path != socket_path(tmp_path / "other")
    assert path.parent.stat().st_mode & 0o777 == 0o700 and path == socket_path(deep)


def test_processes_of_one_orchestrator_share_one_template_which_ends_with_the_last(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first, second = (BackendTemplate(tmp_path, env, (), ROOT, 30) for _ in range(2))
    one, other = first.connect(), second.connect()  # as two gunicorn workers of one orchestrator do
    running = _templates_at(first.path)
    assert len(running) == 1  # the second found the first's
    one.close()
    wait_until(one.ended.is_set, 5, "the first owner's connection to close")
    with pytest.raises(ForkUnavailable, match="not a request"):  # still serving the second
        other.fork("backend", ([], "/"), [], 5)
    assert _templates_at(first.path) == running
    other.close()
    wait_until(lambda: not _templates_at(first.path), 10, "the template to end with its last owner")
    assert not first.path.exists()


def test_a_driver_connects_only_once_the_template_has_imported_what_it_imports(tmp_path):
    # A backend forked before would spend its configure's CONFIGURE_WAIT_S waiting for the models' imports.
    release = tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOLD_IMPORT_UNTIL": str(release)}
    modules = ("tests.support.held_import",)
    impatient = BackendTemplate(tmp_path, env, modules, ROOT, 1)
    with pytest.raises(ForkUnavailable, match=r"did not import its modules \(no answer within 1 s\); .*template.log says"):
        impatient.connect()
    with pytest.raises(ForkUnavailable, match="failed less than 60 s ago"):  # not waited for again meanwhile
        impatient.connect()
    patient = BackendTemplate(tmp_path, env, modules, ROOT, 60)
    patient.connect_soon()  # as the supervisor's pass asks: it does not wait
    patient.connect_soon()  # nor start a second connection
    running = _templates_at(patient.path)
    assert len(running) == 1  # the impatient one's, still importing
    assert patient.running_pid() == 0  # nor do the memory reads
    release.touch()
    wait_until(lambda: patient.running_pid() == running[0], 60, "the connection once the imports are done")
    patient.connect().close()


def _templates_at(path: Path) -> list[int]:
    """Live template processes serving ``path``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline, stat = (entry / "cmdline").read_bytes(), (entry / "stat").read_text()
        except OSError:
            continue
        if b"backend.isolation.template\0" + os.fsencode(path) in cmdline and stat.rpartition(")")[2].split()[0] != "Z":
            found.append(int(entry.name))
    return found


def test_a_request_whose_asker_has_gone_is_seen_as_such_though_still_unread():
    # The template reads queued requests only once its imports are done: a backend asked for by an orchestrator
    # killed meanwhile must not be forked (it would be nobody's backend), though its request is still there.
    asker, template_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    asker.send(b"a request")
    assert not hung_up(template_side)
    asker.close()
    assert hung_up(template_side) and template_side.recv(64) == b"a request"
    template_side.close()


def test_a_client_whose_server_has_gone_is_not_live_before_its_reader_notices(monkeypatch):
    # A template killed a moment ago: its connection is closed before the client's reader thread has run to
    # notice. The driver asked ``ended`` only, forked a backend, and its worker met a socket nobody listened
    # at (CI: a model process not forked from the new models' template).
    import threading

    held, read = threading.Event(), ForkClient._read
    monkeypatch.setattr(ForkClient, "_read", lambda self: (held.wait(10), read(self)))
    mine, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = ForkClient(mine, "held-reader", forks_die_with_server=False)
    assert client.live()
    server.close()
    assert not client.live() and not client.ended.is_set()  # the reader has not run yet
    held.set()
    assert client.ended.wait(10) and not client.live()


PRIMED_FORK = r"""
import os, sys
import mlflow.store.model_registry.sqlalchemy_store as registry_store
import mlflow.store.tracking.sqlalchemy_store as tracking_store
from mlflow.tracking import MlflowClient
from backend.isolation.priming import prime_sqlite_store

uri = sys.argv[1]
prime_sqlite_store(uri)
database = uri.removeprefix("sqlite:///")
held = [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}").startswith(database)]
made = []  # stores made from here on: none, where the fork finds the primed ones
for kind in (registry_store.SqlAlchemyStore, tracking_store.SqlAlchemyStore):
    kind.__init__ = lambda self, *args, made=made, **kwargs: made.append(type(self).__module__)
pid = os.fork()
if pid == 0:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    print("fork", client.get_model_version_by_alias("brightness", "champion").version, made, held, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_fork_of_a_primed_template_finds_the_default_registrys_store_made(registry, tmp_path):
    """The template makes MLflow's store for the default SQLite registry before it forks: a fork's first
    alias lookup (the registry follower's, in each woken backend) reuses it, on a connection of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PRIMED_FORK, registry], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fork 1 [] []" in done.stdout, done.stdout + done.stderr
    missing = tmp_path / "none.db"
    prime_only = "import sys; from backend.isolation.priming import prime_sqlite_store; prime_sqlite_store(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", prime_only, f"sqlite:///{missing}"], check=False, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0 and not missing.exists()  # a registry nobody made is not made here



FIRST_PREDICTION = r"""
import importlib.metadata, pickle, sys
import PIL.Image, sklearn.linear_model
from backend.isolation.priming import prime_first_predictions

model_file, image_file, primed = sys.argv[1], sys.argv[2], sys.argv[3] == "primed"
if primed:
    prime_first_predictions()
read = []  # entry-point scans from here on: none, where the prediction's caches were filled before the fork
importlib.metadata.entry_points = lambda *args, **kwargs: read.append(kwargs) or ()
plugin_there = "PIL.PngImagePlugin" in sys.modules
with open(model_file, "rb") as saved:
    model = pickle.load(saved)
with PIL.Image.open(image_file) as image:
    brightness = sum(image.convert("L").getdata()) / (image.width * image.height) / 255
print("predicted", model.predict([[brightness]]).tolist(), "scans", len(read), "png plugin", plugin_there)
"""


def test_a_primed_template_leaves_a_forks_first_prediction_nothing_to_fill(tmp_path):
    """A fork's first prediction of a scikit-learn model on an image reads no package's entry points and
    imports no image plugin: the template filled those caches (~13 ms of every woken model's first answer).
    The same script unprimed does both, which is what keeps this test honest."""
    model_file, image_file = tmp_path / "model.pkl", tmp_path / "white.png"
    build = ("import pickle, sys; from sklearn.linear_model import LogisticRegression; "
             "pickle.dump(LogisticRegression().fit([[0.1], [0.9]], [0, 1]), open(sys.argv[1], 'wb')); "
             "from PIL import Image; Image.new('RGB', (8, 6), (250, 250, 250)).save(sys.argv[2])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", build, str(model_file), str(image_file)], check=True, cwd=ROOT, env=env,
                   timeout=120)
    said = {}
    for primed in ("primed", "unprimed"):
        done = subprocess.run([sys.executable, "-c", FIRST_PREDICTION, str(model_file), str(image_file), primed],
                              check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        said[primed] = done.stdout.strip()
    assert said["primed"] == "predicted [1] scans 0 png plugin True"
    assert said["unprimed"].startswith("predicted [1] scans ") and said["unprimed"].endswith("png plugin False")
    assert said["unprimed"] != "predicted [1] scans 0 png plugin False", "scikit-learn no longer scans entry points"

HUGE_PAGES = r"""
import json, mmap, os
from backend.isolation.forking import share_as_huge_pages

def rollup_kib(field):
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith(field + ":"))

dense = [bytearray(range(256)) * 4 for _ in range(48 * 1024)]  # ~50 MiB of Python objects, as imports leave
sparse = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, 64 << 20, 10 * mmap.PAGESIZE):
    sparse[offset] = 1  # one page in ten: a huge page here would fill in the other nine
rss = rollup_kib("Rss")
huge = share_as_huge_pages()
after = {"huge": huge, "anon_huge_kib": rollup_kib("AnonHugePages"), "rss_grew_kib": rollup_kib("Rss") - rss}
pid = os.fork()
if pid == 0:
    dense[0][0], dense[-1][0] = 7, 7  # a fork's writes are its own
    os._exit(0 if dense[0][0] == 7 and dense[1][1] == 1 else 1)
after["child_status"] = os.waitpid(pid, 0)[1]
after["parent_unchanged"] = dense[0][0] == 0 and dense[-1][0] == 0 and sparse[10] == 0
print(json.dumps(after))
"""


def _kernel_makes_huge_pages_on_request() -> bool:
    release = tuple(int(part) for part in os.uname().release.split(".")[:2] if part.isdigit())
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return release >= (6, 1) and enabled.exists() and "[never]" not in enabled.read_text()


@pytest.mark.skipif(not _kernel_makes_huge_pages_on_request(), reason="no MADV_COLLAPSE (Linux 6.1) or huge pages off")
def test_a_template_shares_its_dense_memory_as_huge_pages_and_leaves_sparse_memory_alone():
    """What a template imported, in huge pages: forks copy and unmap fewer page-table entries (and reading their
    smaps walks fewer); a fork's writes stay its own; memory mostly untouched is not filled in."""
    answer = subprocess.run([sys.executable, "-c", HUGE_PAGES], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert answer.returncode == 0, answer.stderr
    after = json.loads(answer.stdout)
    assert after["huge"] >= 32 << 20 and after["anon_huge_kib"] >= 32 << 10
    assert after["rss_grew_kib"] < 8 << 10  # the sparse 64 MiB stayed as they were (filled in: +58 MiB)
    assert after["child_status"] == 0 and after["parent_unchanged"]


def test_a_template_prepares_what_its_own_modules_offer_for_its_forks_and_nothing_of_anyone_elses(monkeypatch):
    """The backends' template imports the server's modules; those of this project that have a
    ``prepare_for_forks`` (gunicorn's settings, the app's routes) make it once there, for every fork."""
    import types

    from backend.app import PreparedRoutes
    from backend.isolation import template
    from backend.isolation.arbiter import BackendApplication

    monkeypatch.setattr(template, "prime_model_processes", lambda: None)
    called = []
    monkeypatch.setitem(sys.modules, "someones.plugin", types.SimpleNamespace(prepare_for_forks=lambda: called.append(1)))
    monkeypatch.setattr(BackendApplication, "prepared", None)
    try:
        template.prepare_forks([*template.SERVER_IMPORTS, "someones.plugin", "not.imported"])
        assert BackendApplication.prepared is not None and PreparedRoutes.app is not None and not called
    finally:
        PreparedRoutes.take()
