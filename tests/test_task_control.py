"""Pause, resume and reprioritise tasks at any moment, through the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.harness import Daemon, running_daemon

LONG = "Write a very long story about a dragon, at least 2000 words."


@pytest.fixture(scope="module")
def one_worker() -> Iterator[Daemon]:
    """One worker; answers up to 200 tokens (a few seconds) so a task can be caught running."""
    with running_daemon({"TALE_QUEUE__WORKERS": "1", "TALE_RUNNER__MAX_TOKENS": "200"}) as d:
        yield d


def _started(task: dict[str, object]) -> float:
    transitions = task["transitions"]
    assert isinstance(transitions, list)
    stamp = next(t["at"] for t in reversed(transitions) if t["to"] == "running")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_paused_queued_task_is_not_run_until_resumed(one_worker: Daemon) -> None:
    """`tale pause` keeps a queued task out of the workers' hands; `tale resume` returns it."""
    blocker = one_worker.call("submit_task", text=LONG)["id"]
    one_worker.wait_for(blocker, ("running",))
    held = one_worker.call("submit_task", text="Say yes")["id"]
    proc = one_worker.home.tale("pause", held)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"task {held} paused"
    one_worker.call("cancel_task", id=blocker)
    other = one_worker.call("submit_task", text="Say no")["id"]
    assert one_worker.wait_for(other)["state"] == "completed"
    assert one_worker.call("get_task", id=held)["state"] == "paused"
    assert one_worker.home.tale("resume", held).returncode == 0
    assert one_worker.wait_for(held)["state"] == "completed"


def test_pausing_a_running_task_stops_its_model_call_and_resume_runs_it_again(
    one_worker: Daemon,
) -> None:
    """A running task paused mid-answer stops generating; resumed, it answers from the start."""
    # One task done first: the model's speed is known, so a running task has an ETA.
    one_worker.wait_for(one_worker.call("submit_task", text="Say yes")["id"])
    task_id = one_worker.call("submit_task", text=LONG)["id"]
    one_worker.wait_for(task_id, ("running",))
    time.sleep(0.3)
    paused = json.loads(one_worker.home.tale("pause", task_id, "--json").stdout)
    assert paused["state"] == "paused"
    assert "continued on resume" in paused["transitions"][-1]["reason"]
    # Where it got to is shown, but no ETA: a paused task is not counting down.
    shown = one_worker.home.tale("status", task_id).stdout
    assert "progress  step 1/1 · answering" in shown and "ETA" not in shown, shown
    # The worker is free at once: another task runs while this one is paused.
    other = one_worker.call("submit_task", text="Say yes", priority=100)["id"]
    assert one_worker.wait_for(other, timeout=60)["state"] == "completed"
    one_worker.home.tale("resume", task_id)
    done = one_worker.wait_for(task_id, timeout=120)
    assert done["state"] == "completed"
    path = [t["to"] for t in done["transitions"]]
    assert path == ["queued", "running", "paused", "queued", "running", "completed"]


def test_a_pause_right_after_submit_pauses_the_task_a_worker_just_claimed(
    one_worker: Daemon,
) -> None:
    """Submit, then pause at once: the idle worker claims the task between the pause's
    read (queued) and its write, and the pause follows it to running instead of
    refusing with "no longer queued"."""
    for _ in range(5):
        task_id = one_worker.call("submit_task", text="Say hi")["id"]
        assert one_worker.call("pause_task", id=task_id)["state"] == "paused"
        one_worker.call("cancel_task", id=task_id)


def test_raising_a_queued_tasks_priority_moves_it_ahead(one_worker: Daemon) -> None:
    """`tale priority ID 90` makes a low-priority queued task run before a higher one."""
    blocker = one_worker.call("submit_task", text=LONG)["id"]
    one_worker.wait_for(blocker, ("running",))
    low = one_worker.call("submit_task", text="Say one", priority=10)["id"]
    mid = one_worker.call("submit_task", text="Say two", priority=20)["id"]
    proc = one_worker.home.tale("priority", low, "90")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"task {low} queued, priority 90"
    one_worker.call("cancel_task", id=blocker)
    assert _started(one_worker.wait_for(low)) < _started(one_worker.wait_for(mid))


def test_control_commands_refuse_what_the_state_does_not_allow(one_worker: Daemon) -> None:
    """Resuming a finished task, pausing it, or a priority out of range: clear errors."""
    done = one_worker.call("submit_task", text="Say yes")["id"]
    one_worker.wait_for(done)
    resume = one_worker.home.tale("resume", done)
    assert resume.returncode == 1
    assert "only a paused task can be resumed" in resume.stderr
    pause = one_worker.home.tale("pause", done)
    assert pause.returncode == 1
    assert "only queued, running or waiting tasks can be paused" in pause.stderr
    priority = one_worker.home.tale("priority", done, "101")
    assert priority.returncode == 2
    assert "between 0 and 100" in priority.stderr
    late = one_worker.home.tale("priority", done, "5")
    assert late.returncode == 1
    assert "no longer matters" in late.stderr
    bad = one_worker.home.tale("pause", "nope")
    assert bad.returncode == 2
    assert "is not a task id" in bad.stderr
