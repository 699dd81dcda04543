"""Label Studio's webhook events: every kind recorded, per project, within bounds."""

from __future__ import annotations

from backend import webhooks
from backend.webhooks import WebhookLog


def test_every_event_is_recorded_per_project_and_counted():
    log = WebhookLog()
    log.record({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 7}, "annotation": {"id": 70}})
    log.record({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 70}, {"id": 71}]})
    log.record({"action": "START_TRAINING", "project": {"id": 2}})
    noted = log.record({})  # not even an action: still answered, still counted
    assert noted["action"] == "UNKNOWN" and noted["project"] is None
    assert [e["action"] for e in log.events(1)] == ["ANNOTATION_CREATED", "ANNOTATIONS_DELETED"]
    assert log.events(1)[0]["task"] == 7 and log.events(1)[1]["annotations"] == [70, 71]
    shown = log.describe()
    assert shown["events"] == 4
    assert shown["projects"]["1"]["events"] == {"ANNOTATION_CREATED": 1, "ANNOTATIONS_DELETED": 1}


def test_the_log_is_bounded(monkeypatch):
    monkeypatch.setattr(webhooks, "EVENTS_PER_PROJECT", 3)
    monkeypatch.setattr(webhooks, "MAX_PROJECTS", 2)
    log = WebhookLog()
    for n in range(5):
        log.record({"action": "ANNOTATION_UPDATED", "project": {"id": 1}, "annotation": {"id": n}})
    assert [e["annotation"] for e in log.events(1)] == [2, 3, 4]  # the newest kept
    assert log.describe()["projects"]["1"]["events"] == {"ANNOTATION_UPDATED": 5}  # counts stay whole
    log.record({"action": "START_TRAINING", "project": {"id": 2}})
    log.record({"action": "START_TRAINING", "project": {"id": 3}})
    assert log.events(1) == [] and set(log.describe()["projects"]) == {"2", "3"}  # the least recent project went
