"""Prediction quality per model version: how much of each prediction annotators kept.

``/predict`` notes what it answered for each task (in memory; the ticker writes it to
MODEL_DIR/quality.sqlite, shared by the workers). When Label Studio reports an annotation of a task
this backend predicted, the two are compared (``agreement``) and the figures are kept per annotation,
so an updated annotation replaces its earlier figures instead of counting twice. ``/health`` shows the
sums per model version, and each training logs them on the version's MLflow run, so whether version 4
saved annotators more work than version 3 is a number in MLflow.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from backend.quality.agreement import Agreement, compare
from backend.quality.webhooks import annotations_in
from backend.state.sqlitedb import SharedDb

log = logging.getLogger(__name__)

MAX_PREDICTIONS = 200_000  # tasks remembered; the oldest go first
SUMMARY_EVERY_S = 5.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (task_id INTEGER PRIMARY KEY, model_version TEXT, prediction TEXT, at REAL);
CREATE TABLE IF NOT EXISTS comparisons (annotation_id INTEGER PRIMARY KEY, task_id INTEGER, model_version TEXT,
                                        figures TEXT, at REAL);
"""


class QualityLedger:
    """What this backend predicted per task, and what annotators kept of it, per model version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        self._shared = SharedDb(path, SCHEMA)
        self._db = self._shared.db
        self._summary: tuple[float, dict[str, Any]] = (float("-inf"), {})

    def note_predictions(self, tasks: list[dict[str, Any]], encoded: list[str | None], model_version: str) -> None:
        """Called by /predict with what it answered, as it encoded it; costs an append (the ticker writes them)."""
        noted = [(t["id"], model_version, item) for t, item in zip(tasks, encoded)
                 if item is not None and isinstance(t.get("id"), int)]
        with self._lock:
            self._pending.extend(noted)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        now = time.time()
        rows = [(task_id, version, item, now) for task_id, version, item in pending]
        db = self._db()
        db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)", rows)
        count = db.execute("SELECT count(*) FROM predictions").fetchone()[0]
        if count > MAX_PREDICTIONS:
            db.execute("DELETE FROM predictions WHERE task_id IN (SELECT task_id FROM predictions ORDER BY at LIMIT ?)",
                       (count - MAX_PREDICTIONS,))

    def on_annotation(self, body: dict[str, Any]) -> int:
        """Compare the annotation(s) of a webhook with what was predicted for their tasks; how many were compared."""
        action = body.get("action")
        if action == "ANNOTATIONS_DELETED":
            ids = [a.get("id") for a in body.get("annotations") or () if isinstance(a, dict)]
            self.flush()
            self._db().executemany("DELETE FROM comparisons WHERE annotation_id = ?", [(i,) for i in ids])
            return 0
        if action not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            return 0
        compared = 0
        self.flush()
        db = self._db()
        for annotation in annotations_in(body):
            if not isinstance(annotation.get("id"), int):
                continue
            task_id = annotation.get("task")
            task_id = task_id.get("id") if isinstance(task_id, dict) else task_id
            if annotation.get("was_cancelled") or annotation.get("ground_truth") or not isinstance(task_id, int):
                continue
            row = db.execute("SELECT model_version, prediction FROM predictions WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                continue
            try:
                predicted = json.loads(row[1]).get("result") or []
            except (ValueError, AttributeError):
                continue
            figures = compare(predicted, annotation.get("result") or [])
            db.execute("INSERT OR REPLACE INTO comparisons VALUES (?, ?, ?, ?, ?)",
                       (annotation["id"], task_id, row[0], json.dumps(figures.to_dict()), time.time()))
            compared += 1
        if compared:
            self._summary = (float("-inf"), {})
        return compared

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model version: tasks compared, agreement, choices kept, region precision and recall."""
        checked, shown = self._summary
        if time.monotonic() - checked < SUMMARY_EVERY_S:
            return shown
        totals: dict[str, Agreement] = {}
        try:
            for version, figures in self._db().execute("SELECT model_version, figures FROM comparisons"):
                totals.setdefault(version, Agreement()).add(Agreement.from_dict(json.loads(figures)))
        except sqlite3.Error as exc:
            log.warning("reading %s failed: %s", self.path, exc)
        shown = {version: agreement.summary() for version, agreement in totals.items()}
        self._summary = (time.monotonic(), shown)
        return shown
