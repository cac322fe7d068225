"""The queue and runner: priority, the worker bound, cancel, crash and shutdown."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.harness import Daemon, Home, running_daemon

# At temperature 0 SmolLM2 writes until max_tokens on this prompt: a task that
# stays running long enough to be interrupted.
LONG = "Write a very long story about a dragon, at least 2000 words."
LONG_ENV = {"TALE_RUNNER__MAX_TOKENS": "1500"}


def _running_since(daemon: Daemon, task_id: str, timeout: float = 60) -> dict[str, Any]:
    return daemon.wait_for(task_id, ("running",), timeout)


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _ledger(home: Home, task_id: str) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{home.data / 'tale.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM model_calls WHERE task_id = ?", (task_id,)).fetchall()


@pytest.fixture
def long_daemon() -> Iterator[Daemon]:
    """A daemon whose task answers may run to 1,500 tokens, with one worker."""
    with running_daemon({**LONG_ENV, "TALE_QUEUE__WORKERS": "1"}) as d:
        yield d


def test_higher_priority_runs_first(long_daemon: Daemon) -> None:
    """Queued tasks start in priority order, highest first, whatever the submit order."""
    blocker = long_daemon.call("submit_task", text=LONG)["id"]
    _running_since(long_daemon, blocker)
    ids = {
        p: long_daemon.call("submit_task", text=f"Say the number {p}", priority=p)["id"]
        for p in (10, 90, 50)
    }
    long_daemon.call("cancel_task", id=blocker)
    done = {p: long_daemon.wait_for(i) for p, i in ids.items()}
    started = {
        p: next(_ts(t["at"]) for t in task["transitions"] if t["to"] == "running")
        for p, task in done.items()
    }
    assert sorted(started, key=started.__getitem__) == [90, 50, 10]


def test_worker_pool_never_runs_more_than_its_bound(home: Home) -> None:
    """With workers = 2, no more than two tasks are ever running at once, and two do."""
    home.env["TALE_QUEUE__WORKERS"] = "2"
    home.env["TALE_RUNNER__MAX_TOKENS"] = "24"
    daemon = Daemon(home).start()
    ids = [daemon.call("submit_task", text=f"Name a fruit, number {i}")["id"] for i in range(6)]
    tasks = [daemon.wait_for(i) for i in ids]
    events = []
    for task in tasks:
        for t in task["transitions"]:
            if t["to"] == "running":
                events.append((_ts(t["at"]), 1))
            elif t["from"] == "running":
                events.append((_ts(t["at"]), -1))
    level = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        peak = max(peak, level)
    assert peak == 2
    daemon.stop()


def test_cancel_stops_the_running_model_call(long_daemon: Daemon) -> None:
    """Cancelling a running task stops its model call at the next token and frees the worker."""
    task_id = long_daemon.call("submit_task", text=LONG)["id"]
    _running_since(long_daemon, task_id)
    # Cancelled once the model has written something (on a loaded machine the prompt
    # alone can take longer than any fixed sleep).
    deadline = time.monotonic() + 60
    while (long_daemon.call("get_task", id=task_id)["progress"] or {}).get("tokens", 0) < 2:
        assert time.monotonic() < deadline, "the model never wrote a token"
        time.sleep(0.05)
    proc = long_daemon.home.tale("cancel", task_id)
    assert proc.returncode == 0, proc.stderr
    assert "cancelled" in proc.stdout
    # The one worker is free again: a new task runs to completion.
    follow = long_daemon.call("submit_task", text="Say yes", priority=100)["id"]
    assert long_daemon.wait_for(follow)["state"] == "completed"
    task = long_daemon.call("get_task", id=task_id)
    assert task["state"] == "cancelled"
    assert task["result"] is None
    [call] = _ledger(long_daemon.home, task_id)
    assert not call["success"]
    assert call["error"] == "cancelled"
    assert 0 < call["completion_tokens"] < 1500


def test_kill_9_mid_task_loses_nothing(long_daemon: Daemon) -> None:
    """After kill -9 with a task running and others queued, a restart runs every one of them."""
    home = long_daemon.home
    running = long_daemon.call("submit_task", text="Write a short poem about rain")["id"]
    queued = [
        long_daemon.call("submit_task", text=f"Say the word {w}")["id"] for w in ("sun", "sea")
    ]
    _running_since(long_daemon, running)
    long_daemon.kill9()
    assert home.socket.exists(), "kill -9 leaves the socket behind"

    restarted = Daemon(home).start()
    try:
        for task_id in [running, *queued]:
            assert restarted.wait_for(task_id, timeout=180)["state"] == "completed"
        history = restarted.call("get_task", id=running)["transitions"]
        assert [(t["from"], t["to"]) for t in history] == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "queued"),
            ("queued", "running"),
            ("running", "completed"),
        ]
        assert "restarted" in history[2]["reason"]
    finally:
        restarted.stop()
        home.cleanup()


def test_a_submit_is_on_disk_before_its_id_is_returned(daemon: Daemon) -> None:
    """A task acknowledged just before kill -9 is there after the restart."""
    task_id = daemon.call("submit_task", text="Remember this one")["id"]
    daemon.kill9()
    restarted = Daemon(daemon.home).start()
    try:
        assert restarted.call("get_task", id=task_id)["text"] == "Remember this one"
    finally:
        restarted.stop()


def test_sigterm_requeues_a_running_task_and_exits_cleanly() -> None:
    """SIGTERM stops the running call after the grace, requeues the task, removes the socket."""
    home = Home({**LONG_ENV, "TALE_DAEMON__SHUTDOWN_GRACE_SECONDS": "0.5"})
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text=LONG)["id"]
        _running_since(daemon, task_id)
        assert daemon.stop() == 0
        assert not home.socket.exists()
        with sqlite3.connect(f"file:{home.data / 'tale.db'}?mode=ro", uri=True) as db:
            (state,) = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        assert state == "queued"
        restarted = Daemon(home).start()
        assert restarted.wait_for(task_id, ("running",))["attempts"] == 2
        restarted.call("cancel_task", id=task_id)
        restarted.stop()
    finally:
        home.cleanup()
