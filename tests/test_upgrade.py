"""Upgrades: a data directory written by an earlier tale opens, migrates and resumes.

``tests/data/v8-home.tar.gz`` is a real data directory (``tale.db`` at schema v8 and
``checkpoints.git``) made by tale at commit 176be37, before the layout moved into
service folders and before checkpoints had kinds: one task completed, one failed its
done criterion, one paused mid-answer, and two the daemon was running when it was
killed with SIGKILL.
"""

from __future__ import annotations

import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Daemon, Home

FIXTURE = Path(__file__).parent / "data" / "v8-home.tar.gz"
DONE, FAILED, PAUSED = "88cad94fa3dc", "319d5afe64ef", "01a4bb230e1e"
INTERRUPTED = ("8f8ba385bdca", "a7c1f62ddbef")


@pytest.fixture
def upgraded() -> Iterator[Daemon]:
    """Today's daemon started on the v8 data directory."""
    home = Home()
    home.data.parent.mkdir(parents=True)
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(home.data.parent, filter="data")
    daemon = Daemon(home)
    try:
        yield daemon.start()
    finally:
        daemon.kill_if_running()
        home.cleanup()


def test_a_v8_home_migrates_and_keeps_every_task(upgraded: Daemon) -> None:
    """The store migrates to the current schema and every task is still there, as it was."""
    tasks = {t["id"]: t for t in upgraded.call("list_tasks", limit=100)["tasks"]}
    assert {DONE, FAILED, PAUSED, *INTERRUPTED} <= set(tasks)
    assert tasks[DONE]["state"] == "completed"
    assert tasks[FAILED]["state"] == "failed"
    assert tasks[PAUSED]["state"] == "paused"
    with sqlite3.connect(upgraded.home.data / "tale.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 9


def test_a_v8_ledgers_retry_is_split_into_its_step_and_attempt(upgraded: Daemon) -> None:
    """The failed task's ``answer#2`` ledger row reads step ``answer``, attempt 2."""
    with sqlite3.connect(upgraded.home.data / "tale.db") as db:
        rows = db.execute(
            "SELECT step, attempt FROM model_calls WHERE task_id = ? ORDER BY seq", (FAILED,)
        ).fetchall()
    assert rows == [("answer", 1), ("answer", 2)]


def test_tasks_a_v8_daemon_was_killed_in_resume_and_finish(upgraded: Daemon) -> None:
    """The tasks interrupted by the kill are requeued on start and run to the end."""
    for task_id in INTERRUPTED:
        assert upgraded.wait_for(task_id, timeout=180)["state"] == "completed"


def test_a_v8_checkpoint_history_lists_with_unspecified_kinds(upgraded: Daemon) -> None:
    """Checkpoints written before kinds existed list with kind ``unspecified``."""
    found = upgraded.call("list_checkpoints", id=DONE)["checkpoints"]
    assert found
    assert {c["kind"] for c in found} == {"unspecified"}


def test_a_paused_v8_task_resumes_from_its_partial_answer(upgraded: Daemon) -> None:
    """The task paused by the v8 daemon resumes on today's and completes."""
    upgraded.call("resume_task", id=PAUSED)
    assert upgraded.wait_for(PAUSED, timeout=180)["state"] == "completed"


def test_a_failed_v8_task_restores_to_its_newest_checkpoint(upgraded: Daemon) -> None:
    """Restore without a commit on a history with no kinds goes to its newest checkpoint
    (no kind says it was a failed attempt) and queues the task again."""
    history = upgraded.call("list_checkpoints", id=FAILED)["checkpoints"]
    restored = upgraded.call("restore_checkpoint", id=FAILED)
    assert restored["task"]["state"] == "queued"
    assert restored["checkpoint"]["kind"] == "restore"
    assert restored["checkpoint"]["message"] == f"restored to {history[0]['commit'][:12]} " + (
        f"({history[0]['step']}: {history[0]['message']})"
    )
