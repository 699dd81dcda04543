"""The push's outbox on a real SQLite file: each prediction stored once, whoever stores it, across a sender's death.

Pushing into a real Label Studio is tested end to end in tests/e2e/test_label_studio.py.
"""

from __future__ import annotations

import json

import pytest

from backend.serving.push import SCHEMA, Outbox, Pusher, project_of
from backend.state.sqlitedb import SharedDb
from backend.tasks.labelstudio import LabelStudioAccess, LabelStudioAuth

VERSION = "sentiment:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(tmp_path, clock) -> Outbox:
    return Outbox(SharedDb(tmp_path / "push.sqlite", SCHEMA), clock)


def prediction(label: str) -> str:
    return json.dumps({"result": [{"type": "choices", "value": {"choices": [label]}}], "score": 0.5,
                       "model_version": VERSION})


def test_rows_are_taken_once_stored_or_retried_later(outbox, clock):
    for task in (1, 2, 3):
        outbox.add(7, task, VERSION, prediction("positive"))
    outbox.add(7, 1, VERSION, prediction("negative"))  # offered twice: kept once, as first offered
    taken = outbox.take(VERSION, limit=2)
    assert [row.task for row in taken] == [1, 2] and outbox.take(VERSION, limit=2)[0].task == 3
    assert taken[0].payload() == {"task": 1, "result": [{"type": "choices", "value": {"choices": ["positive"]}}],
                                  "score": 0.5, "model_version": VERSION}
    outbox.settle(taken[:1], "stored")
    outbox.settle(taken[1:], "queued", "Label Studio did not take them (ConnectionError)", retry_in_s=4)
    assert outbox.take(VERSION) == []  # sending, stored, or not due yet
    clock.now += 5
    [again] = outbox.take(VERSION)
    assert (again.task, again.attempts) == (2, 1)
    assert outbox.progress() == {7: {"stored": 1, "left": 2, "failed": 0,
                                     "last_error": "Label Studio did not take them (ConnectionError)"}}


def test_a_round_answers_what_nobody_sent_and_withholds_what_is_sent_or_was_stored_during_it(outbox, clock):
    for task in (1, 2, 3, 4, 5):
        outbox.add(7, task, VERSION, prediction("positive"))
    [first] = outbox.take(VERSION, limit=1)
    outbox.settle([first], "stored")  # task 1: stored before the round began
    began = clock.now + 1
    clock.now += 2
    sent_now, _being_sent = outbox.take(VERSION, limit=2)
    outbox.settle([sent_now], "stored")  # task 2: stored while the round ran; task 3 being sent
    withheld = outbox.reconcile([1, 2, 3, 4, "not-an-id", True], VERSION, since=began)
    assert withheld == {2, 3}
    # Task 1 Label Studio asked for again (it was deleted there), task 4 the round answers: neither is sent.
    assert [row.task for row in outbox.take(VERSION)] == [5]
    assert outbox.reconcile([6], VERSION, since=began) == set()  # nothing known about it: answered


def test_rows_a_dead_sender_left_are_checked_before_they_are_sent_again(outbox, tmp_path, clock):
    outbox.add(7, 1, VERSION, prediction("positive"))
    outbox.db.db().execute("UPDATE outbox SET state = 'sending', owner = '999999999:1'")  # a process that is gone
    [row] = outbox.take(VERSION)
    assert row.verify and row.task == 1
    outbox.settle([row], "stored")
    assert outbox.take(VERSION) == []

    live = Outbox(SharedDb(tmp_path / "push.sqlite", SCHEMA), clock)  # another worker, alive, mid-send
    live.add(7, 2, VERSION, prediction("positive"))
    assert [r.task for r in live.take(VERSION)] == [2]
    assert outbox.take(VERSION) == []  # not taken from a live sender


def test_a_new_version_drops_the_old_ones_unsent_predictions_and_failures_are_counted(outbox):
    outbox.add(7, 1, "sentiment:1", prediction("positive"))
    outbox.add(7, 2, "sentiment:1", prediction("positive"))
    outbox.settle(outbox.take("sentiment:1", limit=1), "stored")
    outbox.add_failed(8, 3, "sentiment:2", "task data 'text' is missing")
    outbox.keep_only("sentiment:2")
    assert outbox.take("sentiment:1") == [] and outbox.take("sentiment:2") == []
    assert outbox.progress() == {7: {"stored": 1, "left": 0, "failed": 0},
                                 8: {"stored": 0, "left": 0, "failed": 1, "last_error": "task data 'text' is missing"}}


def test_unfinished_tasks_are_kept_until_each_is_done_and_a_new_version_drops_them(outbox):
    config = "<View><Text name='text' value='$text'/></View>"
    tasks = [{"id": n, "project": 7, "data": {"text": f"task {n}"}} for n in (1, 2, 3)]
    outbox.wait_for(tasks, config, VERSION)
    outbox.wait_for(tasks[:1], config, VERSION)  # taken on again by a later round: kept once
    outbox.add(7, 1, VERSION, prediction("positive"))  # done: no longer waiting
    outbox.add_failed(7, 2, VERSION, "task data 'text' is missing")
    assert outbox.waiting(VERSION) == [(config, tasks[2:])]  # what a restarted backend resumes
    outbox.keep_only("sentiment:2")
    assert outbox.waiting(VERSION) == [] and outbox.waiting("sentiment:2") == []


def test_done_rows_are_forgotten_after_a_day(outbox, clock):
    outbox.add(7, 1, VERSION, prediction("positive"))
    outbox.add(7, 2, VERSION, prediction("positive"))
    outbox.settle(outbox.take(VERSION, limit=1), "stored")
    clock.now += 86_401
    outbox.prune()
    assert outbox.progress() == {7: {"stored": 0, "left": 1, "failed": 0}}  # the unsent one stays


def test_the_push_says_why_it_is_off(outbox):
    pat_like = "a.b.c"
    off = Pusher(outbox, lambda: LabelStudioAccess("http://ls:8080", pat_like, "environment"), LabelStudioAuth(),
                 enabled=False)
    assert "PUSH_PREDICTIONS=off" in off.why_off() and off.describe()["mode"] == "off"
    no_token = Pusher(outbox, lambda: LabelStudioAccess(), LabelStudioAuth())
    assert "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in no_token.why_off()
    no_token.offer({"id": 1, "project": 7, "data": {}}, prediction("positive"), VERSION)  # off: not kept
    assert outbox.take(VERSION) == []
    assert project_of({"project": 7}) == 7 and project_of({"project": "7"}) is None and project_of({}) is None
