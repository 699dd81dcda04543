"""One "Retrieve predictions" press stores a whole project: what the background finishes is written
into Label Studio as it finishes, with the token the backend already holds.

A round that reaches its deadline answers what is done and leaves the rest to the background
(``continuation``). With the push on, each prediction the background finishes goes into an outbox on
disk (``MODEL_DIR/push.sqlite``, shared by the workers, kept across restarts), and a thread writes the
outbox into Label Studio in chunks, through label-studio-sdk's import of predictions, each with its
task's id and the serving ``model_version``. Label Studio then skips those tasks on a later press.

Each prediction is stored once, whoever stores it:

- a row is *queued*, then *sending* while one worker's thread writes it (its owner recorded), then
  *stored*, or back to *queued* with a backoff when Label Studio is down (nothing dropped);
- a round that answers a task reconciles first: a row being sent, or stored since the round began,
  withholds the answer (``[]``: Label Studio has it, or is about to); any other row is taken out and
  the answer stores it (a prediction stored before the press that Label Studio asks for again was
  deleted there since);
- a row left *sending* by a process that died is asked about before it is sent again (Label Studio
  may have stored it before the answer was lost).

The push is off without a token that may write (legacy mode, where Label Studio refuses the token
``/setup`` sends, or a user without rights): the rounds work as before and ``/health`` says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.core.lifetime import alive, process_identity
from backend.state.sqlitedb import SharedDb, in_chunks, placeholders
from backend.tasks.labelstudio import LabelStudioAccess, LabelStudioAuth, LabelStudioRefused, token_kind

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    task INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    project INTEGER NOT NULL,
    prediction TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',   -- queued, sending, stored, failed
    owner TEXT NOT NULL DEFAULT '',         -- pid:starttime of the process sending it
    verify INTEGER NOT NULL DEFAULT 0,      -- its sender died mid-send: ask Label Studio before sending again
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (task, model_version)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE TABLE IF NOT EXISTS waiting (      -- tasks handed to the background, not finished yet: resumed after a restart
    task INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    body TEXT NOT NULL,                  -- the task as Label Studio sent it
    label_config TEXT NOT NULL,          -- a digest into label_configs
    PRIMARY KEY (task, model_version)
);
CREATE TABLE IF NOT EXISTS label_configs (digest TEXT PRIMARY KEY, config TEXT NOT NULL);
"""
CHUNK = 500  # predictions per import call at most: Label Studio creates its batches of 500 at once
MAX_BACKOFF_S = 60.0
REFUSED_RETRY_S = 60.0  # a refused token: tried again this often, in case it was fixed in Label Studio
KEEP_DONE_S = 86_400.0  # stored and failed rows are kept a day: the progress /health shows, and what rounds reconcile


@dataclass
class Row:
    task: int
    model_version: str
    project: int
    prediction: str
    attempts: int
    verify: bool

    def payload(self) -> dict[str, Any]:
        prediction = json.loads(self.prediction)
        return {"task": self.task, "result": prediction.get("result", []), "score": prediction.get("score"),
                "model_version": self.model_version}


class Outbox:
    """The predictions to write into Label Studio, and what became of each."""

    def __init__(self, db: SharedDb, clock: Callable[[], float] = time.time) -> None:
        self.db, self.clock = db, clock
        self.owner = process_identity()

    def exists(self) -> bool:
        """Whether the push was ever used here: until then nothing reads or writes MODEL_DIR for it."""
        return self.db.path.exists()

    def add(self, project: int, task: int, model_version: str, encoded: str) -> None:
        self.add_many([(project, task, encoded)], model_version)

    def add_many(self, rows: Sequence[tuple[int, int, str]], model_version: str) -> None:
        """(project, task, encoded prediction) each; a task already there keeps its first."""
        now = self.clock()
        with self.db.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO outbox (task, model_version, project, prediction, updated) "
                           "VALUES (?, ?, ?, ?, ?)", [(task, model_version, project, encoded, now)
                                                      for project, task, encoded in rows])
            db.executemany("DELETE FROM waiting WHERE task = ? AND model_version = ?",
                           [(task, model_version) for _, task, _ in rows])

    def add_failed(self, project: int, task: int, model_version: str, reason: str) -> None:
        """A task the background could not predict (its data, its prediction): counted, its reason kept."""
        with self.db.transaction() as db:
            db.execute("INSERT OR REPLACE INTO outbox (task, model_version, project, prediction, state, error, updated) "
                       "VALUES (?, ?, ?, '', 'failed', ?, ?)", (task, model_version, project, reason[:500], self.clock()))
            db.execute("DELETE FROM waiting WHERE task = ? AND model_version = ?", (task, model_version))

    def wait_for(self, tasks: Sequence[dict[str, Any]], label_config: str, model_version: str) -> None:
        """Tasks the background took on: kept until each is finished, so that a restart resumes them."""
        digest = hashlib.blake2b(label_config.encode(), digest_size=16).hexdigest()
        with self.db.transaction() as db:
            db.execute("INSERT OR IGNORE INTO label_configs VALUES (?, ?)", (digest, label_config))
            db.executemany("INSERT OR IGNORE INTO waiting VALUES (?, ?, ?, ?)",
                           [(task["id"], model_version, json.dumps(task), digest) for task in tasks])

    def waiting(self, model_version: str) -> list[tuple[str, list[dict[str, Any]]]]:
        """The tasks a stopped backend left unfinished, by labeling config."""
        by_config: dict[str, list[dict[str, Any]]] = {}
        if not self.exists():
            return []
        with self.db.snapshot() as db:
            for config, body in db.execute(
                    "SELECT c.config, w.body FROM waiting w JOIN label_configs c ON c.digest = w.label_config "
                    "WHERE w.model_version = ? ORDER BY w.rowid", (model_version,)):
                by_config.setdefault(config, []).append(json.loads(body))
        return list(by_config.items())

    def take(self, model_version: str, limit: int = CHUNK) -> list[Row]:
        """Due rows of the serving version, marked as this process's to send; rows whose sender died go back first."""
        now = self.clock()
        if not self.db.db().execute("SELECT 1 FROM outbox WHERE state IN ('queued', 'sending') LIMIT 1").fetchone():
            return []  # the usual idle case: a read, no write lock
        with self.db.transaction() as db:
            for owner, in db.execute("SELECT DISTINCT owner FROM outbox WHERE state = 'sending'").fetchall():
                if owner != self.owner and not alive(owner):
                    db.execute("UPDATE outbox SET state = 'queued', verify = 1, owner = '' WHERE state = 'sending' AND owner = ?",
                               (owner,))
            rows = db.execute(
                "SELECT task, model_version, project, prediction, attempts, verify FROM outbox "
                "WHERE state = 'queued' AND model_version = ? AND next_at <= ? ORDER BY project, rowid LIMIT ?",
                (model_version, now, limit)).fetchall()
            db.executemany("UPDATE outbox SET state = 'sending', owner = ?, updated = ? WHERE task = ? AND model_version = ?",
                           [(self.owner, now, task, version) for task, version, *_ in rows])
        return [Row(task, version, project, prediction, attempts, bool(verify))
                for task, version, project, prediction, attempts, verify in rows]

    def settle(self, rows: Sequence[Row], state: str, error: str = "", retry_in_s: float = 0.0,
               verify: bool = False) -> None:
        """``stored``, ``failed`` (for good, with Label Studio's reason), or ``queued`` again after ``retry_in_s``
        (``verify``: Label Studio may have stored them before the answer was lost: ask before sending again)."""
        now = self.clock()
        with self.db.transaction() as db:
            db.executemany(
                "UPDATE outbox SET state = ?, owner = '', verify = ?, error = ?, next_at = ?, updated = ?, "
                "attempts = attempts + ? WHERE task = ? AND model_version = ?",
                [(state, int(verify), error, now + retry_in_s, now, int(state == "queued"), row.task, row.model_version)
                 for row in rows])

    def reconcile(self, tasks: Sequence[Any], model_version: str, since: float) -> set[Any]:
        """For a round that began at ``since`` and is about to answer ``tasks`` (their ids): the ones it must
        answer with ``[]``, because they are being sent or were stored since. The others' rows are taken
        out: the answer stores them."""
        ids = [task for task in tasks if _is_id(task)]
        withheld: set[Any] = set()
        if not ids or not self.exists() or not self._holds_any(ids, model_version):  # usually a read, no write lock
            return withheld
        with self.db.transaction() as db:
            for chunk in in_chunks(ids):
                rows = db.execute(f"SELECT task, state, updated FROM outbox WHERE model_version = ? "
                                  f"AND task IN ({placeholders(chunk)})", (model_version, *chunk)).fetchall()
                held = {task for task, state, updated in rows
                        if state == "sending" or (state == "stored" and updated >= since)}
                withheld |= held
                answered = [task for task, _, _ in rows if task not in held]
                if answered:
                    db.execute(f"DELETE FROM outbox WHERE model_version = ? AND task IN ({placeholders(answered)})",
                               (model_version, *answered))
        return withheld

    def _holds_any(self, ids: list[int], model_version: str) -> bool:
        db = self.db.db()
        return any(db.execute(f"SELECT 1 FROM outbox WHERE model_version = ? AND task IN ({placeholders(chunk)}) LIMIT 1",
                              (model_version, *chunk)).fetchone() for chunk in in_chunks(ids))

    def prune(self, older_than_s: float = KEEP_DONE_S) -> None:
        """Forget stored and failed rows older than ``older_than_s``: the outbox does not grow with every project."""
        self.db.db().execute("DELETE FROM outbox WHERE state IN ('stored', 'failed') AND updated < ?",
                             (self.clock() - older_than_s,))

    def keep_only(self, model_version: str) -> None:
        """A new configuration serves: the old version's unsent predictions and unfinished tasks are dropped
        (its sent ones are history)."""
        with self.db.transaction() as db:
            db.execute("DELETE FROM outbox WHERE model_version != ? AND state != 'stored'", (model_version,))
            db.execute("DELETE FROM waiting WHERE model_version != ?", (model_version,))
            db.execute("DELETE FROM label_configs WHERE digest NOT IN (SELECT label_config FROM waiting)")

    def progress(self) -> dict[int, dict[str, Any]]:
        """Per project: how many are stored, left and failed, and the last failure's reason."""
        shown: dict[int, dict[str, Any]] = {}
        if not self.exists():
            return shown
        with self.db.snapshot() as db:
            for project, state, count in db.execute("SELECT project, state, COUNT(*) FROM outbox GROUP BY project, state"):
                entry = shown.setdefault(project, {"stored": 0, "left": 0, "failed": 0})
                entry["stored" if state == "stored" else "failed" if state == "failed" else "left"] += count
            # SQLite gives the bare column of the row that has the MAX: each project's latest reason
            for project, error, _ in db.execute(
                    "SELECT project, error, MAX(updated) FROM outbox WHERE error != '' GROUP BY project"):
                shown.setdefault(project, {"stored": 0, "left": 0, "failed": 0})["last_error"] = error
        return shown


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def project_of(task: dict[str, Any]) -> int | None:
    """The project Label Studio says a task is in (every task it sends carries it)."""
    project = task.get("project")
    return project if _is_id(project) else None


class Pusher:
    """The thread that writes the outbox into Label Studio, and whether it may."""

    def __init__(self, outbox: Outbox, access: Callable[[], LabelStudioAccess], auth: LabelStudioAuth,
                 enabled: bool = True, on_result: Callable[[str, int], None] | None = None,
                 on_stored: Callable[[list[Row]], None] | None = None) -> None:
        """``on_result``: counts stored and failed; ``on_stored``: the rows Label Studio took (for the quality ledger)."""
        self.outbox, self.access, self.auth, self.enabled = outbox, access, auth, enabled
        self.on_result, self.on_stored = on_result, on_stored
        self.model_version = ""
        self._refused: tuple[str, str, str, float] | None = None  # url, token, why, when: a token Label Studio refused
        self._proven: set[tuple[str, str]] = set()  # (url, token) Label Studio answered: a round may hand over to it
        self._wake = threading.Condition()
        self._stopped = False
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)
        self._thread: threading.Thread | None = None
        self._pruned = 0.0

    # -- whether to push ---------------------------------------------------------------------------

    def why_off(self) -> str:
        """'' where finished predictions are pushed, else why not (and what would turn it on)."""
        if not self.enabled:
            return "PUSH_PREDICTIONS=off: what the background finishes is stored by the next 'Retrieve predictions'"
        access = self.access()
        if not access.url or token_kind(access.token) == "none":
            return ("no Label Studio address and token to write with: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                    "(a Personal Access Token); meanwhile each 'Retrieve predictions' stores what is done")
        refused = self._refused
        if refused is not None and refused[:2] == (access.url, access.token) and time.monotonic() < refused[3]:
            return refused[2]
        return ""

    def describe(self) -> dict[str, Any]:
        why = self.why_off()
        shown: dict[str, Any] = {"mode": "off" if why else "on"}
        if why:
            shown["why"] = why
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 30.0]
        shown["rate_per_s"] = round(sum(n for _, n in recent) / max(now - recent[0][0], 0.5), 2) if recent else 0.0
        shown["projects"] = {str(project): counts for project, counts in self.outbox.progress().items()}
        return shown

    def offer(self, task: dict[str, Any], encoded: str, model_version: str) -> None:
        """A prediction the background finished: into the outbox, where the push is on."""
        project = project_of(task)
        if project is None or not _is_id(task.get("id")) or self.why_off():
            return
        self.outbox.add(project, task["id"], model_version, encoded)
        self._start()
        with self._wake:
            self._wake.notify()

    def remember(self, tasks: Sequence[dict[str, Any]], label_config: str, model_version: str) -> None:
        """Tasks handed to the background: on disk until each is finished, where the push is on."""
        kept = [task for task in tasks if project_of(task) is not None and _is_id(task.get("id"))]
        if kept and not self.why_off():
            self.outbox.wait_for(kept, label_config, model_version)

    def hand_over(self, tasks: Sequence[dict[str, Any]], encoded: dict[int, str], model_version: str) -> set[int]:
        """A round past its deadline: its finished predictions (``encoded``, by task index) go to the outbox too,
        and the places of those it took are returned, to be answered ``[]``. Label Studio then stores
        nothing of the answer itself, which it does one prediction at a time (minutes for thousands, on
        its default SQLite); the push writes them in bulk while the background goes on."""
        taken = {i: text for i, text in encoded.items() if project_of(tasks[i]) is not None and _is_id(tasks[i].get("id"))}
        if not taken or not self._answers(project_of(tasks[next(iter(taken))]) or 0):
            return set()
        if taken:
            self.outbox.add_many([(project_of(tasks[i]) or 0, tasks[i]["id"], text) for i, text in taken.items()],
                                 model_version)
            self._start()
            with self._wake:
                self._wake.notify()
        return set(taken)

    def _answers(self, project: int) -> bool:
        """Whether Label Studio takes this token, asked once per address and token (a project read): a round
        hands its predictions over only then, and answers them itself where it refuses it (legacy mode)."""
        if self.why_off():
            return False
        access = self.access()
        if (access.url, access.token) in self._proven:
            return True
        try:
            self.auth.client(access).projects.get(id=project)
        except Exception as exc:  # noqa: BLE001 - refused, down, or not there: this round answers itself
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                self._refuse(access, access.refused(status, str(getattr(exc, "body", ""))), [])
            return False
        self._proven.add((access.url, access.token))
        return True

    def failed(self, task: dict[str, Any], reason: str, model_version: str) -> None:
        """A task the background gave up on: its reason, kept with its project's progress."""
        project = project_of(task)
        if project is not None and _is_id(task.get("id")) and not self.why_off():
            self.outbox.add_failed(project, task["id"], model_version, reason)
            self._report("failed", 1)

    def serve(self, model_version: str) -> None:
        """The version being served: only its predictions are pushed."""
        self.model_version = model_version
        if self.outbox.exists():
            self.outbox.keep_only(model_version)
            self._start()  # rows a restart left: sent on

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()

    # -- the thread --------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._run, name="push", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._pass()
            except Exception:  # the thread must outlive a bad pass (a locked database, say)
                log.exception("pushing predictions failed; trying again in a second")
                with self._wake:
                    self._wake.wait(1.0)

    def _pass(self) -> None:
        """Send what is due; wait a second (or until woken) when nothing is."""
        while not self._stopped:
            rows = self.outbox.take(self.model_version) if self.model_version and not self.why_off() else []
            if not rows:
                if time.monotonic() - self._pruned > 60.0:
                    self.outbox.prune()
                    self._pruned = time.monotonic()
                with self._wake:
                    if not self._stopped:
                        self._wake.wait(1.0)
                continue
            by_project: dict[int, list[Row]] = {}
            for row in rows:
                by_project.setdefault(row.project, []).append(row)
            for project, chunk in by_project.items():
                self._send(project, chunk)

    def _send(self, project: int, rows: list[Row]) -> None:
        access = self.access()
        try:
            client = self.auth.client(access)
            rows = self._unsent(client, rows)
            if not rows:
                return  # Label Studio had them all: their sender died after it stored them
            client.projects.import_predictions(id=project, request=[row.payload() for row in rows])
        except LabelStudioRefused as exc:
            self._refuse(access, str(exc), rows)
            return
        except Exception as exc:  # noqa: BLE001 - sorted by what Label Studio (or the network) said
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                self._refuse(access, access.refused(status, str(getattr(exc, "body", ""))), rows)
            elif status == 400 and len(rows) > 1:
                for row in rows:  # one bad task (deleted since, say) must not hold back the others
                    self._send(project, [row])
            elif status == 400 or status == 404:
                self.outbox.settle(rows, "failed", f"Label Studio refused the prediction for task {rows[0].task}: "
                                                   f"{str(getattr(exc, 'body', exc))[:300]}")
                self._report("failed", len(rows))
            else:  # down, overloaded, or the answer lost on the way: sent again later, after asking
                backoff = min(MAX_BACKOFF_S, 2.0 ** min(rows[0].attempts, 6))
                self.outbox.settle(rows, "queued", f"Label Studio did not take them ({type(exc).__name__}: "
                                                   f"{str(exc)[:200]}); retrying in {backoff:g} s", backoff, verify=True)
            return
        self.outbox.settle(rows, "stored")
        self._recent.append((time.monotonic(), len(rows)))
        self._report("stored", len(rows))
        if self.on_stored is not None:
            self.on_stored(rows)

    def _unsent(self, client: Any, rows: list[Row]) -> list[Row]:
        """Rows whose earlier sender died mid-send: those Label Studio already holds are marked stored."""
        held = []
        for row in rows:
            if row.verify and any(p.model_version == row.model_version for p in client.predictions.list(task=row.task)):
                held.append(row)
        if held:
            self.outbox.settle(held, "stored")
        return [row for row in rows if row not in held]

    def _refuse(self, access: LabelStudioAccess, why: str, rows: list[Row]) -> None:
        """Off for REFUSED_RETRY_S (then tried again: the token may have been given rights); rows kept."""
        reason = f"Label Studio refused to store predictions: {why}"
        self._refused = (access.url, access.token, reason, time.monotonic() + REFUSED_RETRY_S)
        self.outbox.settle(rows, "queued", reason, REFUSED_RETRY_S)
        log.warning("pushing predictions is off: %s", reason)

    def _report(self, result: str, count: int) -> None:
        if self.on_result is not None:
            self.on_result(result, count)
