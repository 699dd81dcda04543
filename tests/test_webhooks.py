"""Label Studio's webhook events: every kind recorded, per project, within bounds, in one worker's
memory or in the file several workers share."""

from __future__ import annotations

import pytest

from backend.quality import webhooks
from backend.quality.webhooks import WebhookLog
from backend.serving import shared
from backend.serving.shared import SharedWebhookLog
from backend.state.sqlitedb import SharedDb


@pytest.mark.parametrize("make_log", [WebhookLog, "shared"])
def test_every_webhook_event_is_recorded_per_project_and_bounded(make_log, tmp_path, monkeypatch):
    monkeypatch.setattr(webhooks, "EVENTS_PER_PROJECT", 3)
    monkeypatch.setattr(webhooks, "MAX_PROJECTS", 2)
    log = SharedWebhookLog(SharedDb(tmp_path / shared.FILE_NAME, shared.SCHEMA)) if make_log == "shared" else make_log()
    for n in range(5):
        log.record({"action": "ANNOTATION_UPDATED", "project": {"id": 1}, "task": {"id": 7}, "annotation": {"id": n}})
    noted = log.record({})  # not even an action: still answered, still counted
    assert noted["action"] == "UNKNOWN" and noted["project"] is None
    assert [e["annotation"] for e in log.events(1)] == [2, 3, 4]  # the newest kept
    assert log.events(1)[0]["task"] == 7
    assert log.describe()["projects"]["1"]["events"] == {"ANNOTATION_UPDATED": 5}  # counts stay whole
    log.record({"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"id": 70}, {"id": 71}]})
    assert log.events(1) == [] and set(log.describe()["projects"]) == {"None", "3"}  # the least recent project went
    assert log.events(3)[0]["annotations"] == [70, 71]
