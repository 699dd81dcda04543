"""Label Studio's webhook events, recorded and counted, never worked on inside the request.

Label Studio sends annotation events to ``/webhook`` and drops them after about a second, and
"start training on annotation submission" sends ``START_TRAINING`` inside the annotator's own save:
a slow webhook slows every save. So ``/webhook`` only notes the event here (a bounded log per
project, shown on /health) and answers at once; training (``training.trainer``) and prediction
quality (``quality``) note what they need from the same body, in a few file writes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_PROJECTS = 100
EVENTS_PER_PROJECT = 1000


@dataclass
class _Project:
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_PER_PROJECT))
    counts: Counter[str] = field(default_factory=Counter)
    last_at: float = 0.0


class WebhookRecorder(Protocol):
    """What /webhook and /health need of a log: ``WebhookLog``, or the workers' ``shared.SharedWebhookLog``."""

    def record(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def events(self, project_id: Any) -> list[dict[str, Any]]: ...
    def describe(self) -> dict[str, Any]: ...


def annotations_in(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotation(s) an event carries: one for ANNOTATION_CREATED/UPDATED, a list for ANNOTATIONS_CREATED."""
    found = body.get("annotation")
    return [a for a in (found if isinstance(found, list) else [found]) if isinstance(a, dict)]


def _id_of(body: dict[str, Any], key: str) -> Any:
    value = body.get(key)
    return value.get("id") if isinstance(value, dict) else None


def event_of(body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The project an event is about, and what is kept of it: the action, when, and the ids it names."""
    event: dict[str, Any] = {"action": str(body.get("action") or "UNKNOWN")[:64], "at": time.time()}
    for key in ("task", "annotation"):
        if _id_of(body, key) is not None:
            event[key] = _id_of(body, key)
    annotations = body.get("annotations")
    if isinstance(annotations, list):  # ANNOTATIONS_DELETED names several
        event["annotations"] = [a.get("id") for a in annotations[:100] if isinstance(a, dict)]
    return _id_of(body, "project"), event


class WebhookLog:
    """The events of the projects most recently heard from, each project's last EVENTS_PER_PROJECT, in
    this process (with several workers, ``shared.SharedWebhookLog`` keeps them for all)."""

    def __init__(self) -> None:
        self._projects: OrderedDict[Any, _Project] = OrderedDict()
        self._lock = threading.Lock()
        self.total = 0

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        """Note one event; returns what was noted (what the answer echoes)."""
        project_id, event = event_of(body)
        action = event["action"]
        with self._lock:
            project = self._projects.get(project_id)
            if project is None:
                project = self._projects[project_id] = _Project()
                while len(self._projects) > MAX_PROJECTS:
                    self._projects.popitem(last=False)
            self._projects.move_to_end(project_id)
            project.events.append(event)
            project.counts[action] += 1
            project.last_at = event["at"]
            self.total += 1
        return {"project": project_id, **event}

    def events(self, project_id: Any) -> list[dict[str, Any]]:
        """A project's recorded events, oldest first: what training reads to know what changed."""
        with self._lock:
            project = self._projects.get(project_id)
            return list(project.events) if project else []

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "events": self.total,
                "projects": {
                    str(pid): {"events": dict(p.counts), "last_at": p.last_at} for pid, p in self._projects.items()
                },
            }
