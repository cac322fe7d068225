"""Fault injection: kill -9 a real daemon at random moments while tasks run, then audit.

Shared by tests/test_crash_resume.py (20 kills) and tests/bench/bench_resume.py (more).
The audit reads the checkpoints (real git) and the ledger (real SQLite) after the
daemon stopped: every task completed, its final checkpoint holds its result, and
for every checkpointed step no model call for that step started after the moment
its checkpoint was taken.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from taled.checkpoints.repo import CheckpointStore
from taled.tasks.workstate import AttemptKey
from tests.harness import Daemon, Home

SETTINGS = {
    "TALE_PLANNER__DECOMPOSE": "true",
    "TALE_PLANNER__COMPLEX_MIN_SCORE": "0.3",
    "TALE_PLANNER__PLAN_ATTEMPTS": "1",
    "TALE_PLANNER__PLAN_MAX_TOKENS": "40",
    "TALE_RUNNER__MAX_TOKENS": "24",
    "TALE_QUEUE__WORKERS": "2",
}

TASKS = [
    "Do the following:\n1. Name a color.\n2. Name a fruit.\n3. Name an animal.\n"
    "4. Put the three names in one sentence.",
    "Do the following:\n1. Write a title.\n2. Write a subtitle.\n3. Join them with a dash.",
    "Build a tiny greeting CLI, write tests for it, and document it in a README",
    "Say hello",
    "Name three rivers",
]


@dataclass
class Audit:
    """What a campaign left behind."""

    kills: int = 0
    seconds: float = 0.0
    states: Counter[str] = field(default_factory=Counter)
    steps_checked: int = 0
    reruns: list[str] = field(default_factory=list)
    """Checkpointed steps that ran again (must stay empty)."""
    result_mismatches: list[str] = field(default_factory=list)
    interrupted: int = 0
    """Transitions saying a task was interrupted by a crash and resumed."""
    calls: int = 0
    fsck_ok: bool = False


def run_campaign(kills: int, seed: int, settings: dict[str, str] | None = None) -> Audit:
    """Run TASKS, kill -9 the daemon ``kills`` times at seeded random moments, audit."""
    rng = random.Random(seed)
    home = Home({**SETTINGS, **(settings or {})})
    daemon = Daemon(home).start()
    audit = Audit()
    started = time.monotonic()
    try:
        submitted = [daemon.call("submit_task", text=t)["id"] for t in TASKS]
        while audit.kills < kills:
            time.sleep(rng.uniform(0.2, 2.5))
            daemon.kill9()
            audit.kills += 1
            daemon.start()
            if all(s == "completed" for s in _states(home).values()):
                # Everything finished early: add work so later kills still land mid-task.
                submitted.append(daemon.call("submit_task", text=rng.choice(TASKS))["id"])
        for task_id in submitted:
            daemon.wait_for(task_id, timeout=600)
        daemon.call("usage")  # every ledger row written
        daemon.stop()
        audit.seconds = time.monotonic() - started
        _audit(home, audit)
    finally:
        daemon.kill_if_running()
        home.cleanup()
    return audit


def _states(home: Home) -> dict[str, str]:
    db = sqlite3.connect(home.data / "tale.db")
    rows = dict(db.execute("SELECT id, state FROM tasks").fetchall())
    db.close()
    return rows


def _first_checkpointed(home: Home) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """Per task: when each step was first checkpointed (over its whole history), and
    its latest state. The first time matters: a step run again would be checkpointed
    again, later, and the latest state alone would hide that."""

    async def read() -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
        store = CheckpointStore(home.data / "checkpoints.git")
        await store.open()
        try:
            out = {}
            for task_id in await store.task_ids():
                first: dict[str, float] = {}
                history = await store.list(task_id)
                for checkpoint in reversed(history):  # oldest first
                    state = await store.load(task_id, checkpoint.commit)
                    for step, taken in state["done_at"].items():
                        first.setdefault(step, taken)
                out[task_id] = (first, await store.load(task_id))
            return out
        finally:
            await store.close()

    return asyncio.run(read())


def _audit(home: Home, audit: Audit) -> None:
    states = _states(home)
    audit.states = Counter(states.values())
    db = sqlite3.connect(home.data / "tale.db")
    calls = db.execute(
        "SELECT task_id, step, attempt, at - total_ms / 1000.0 FROM model_calls"
        " WHERE task_id IS NOT NULL"
    ).fetchall()
    # Checkpoints name an attempt by its key's text form ('answer#2').
    calls = [(t, str(AttemptKey(step, n)) if step else None, s) for t, step, n, s in calls]
    results = dict(db.execute("SELECT id, result FROM tasks").fetchall())
    audit.interrupted = db.execute(
        "SELECT COUNT(*) FROM transitions WHERE reason LIKE 'daemon restarted%'"
    ).fetchone()[0]
    db.close()
    audit.calls = len(calls)
    checkpointed = _first_checkpointed(home)
    for task_id in states:
        first, state = checkpointed[task_id]
        if state["phase"] != "done" or state["result"] != results[task_id]:
            audit.result_mismatches.append(task_id)
        for step, taken in first.items():
            audit.steps_checked += 1
            if any(t == task_id and k == step and s > taken for t, k, s in calls):
                audit.reruns.append(f"{task_id}:{step}")
    fsck = subprocess.run(
        ["git", "--git-dir", str(home.data / "checkpoints.git"), "fsck", "--strict"],
        capture_output=True,
    )
    audit.fsck_ok = fsck.returncode == 0
