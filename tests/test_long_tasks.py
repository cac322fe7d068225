"""Long-running tasks: plans of subtasks, checkpoints per step, pause/restore, gates.

Every test runs the real daemon with the embedded model; checkpoints are read
back from the real git repository and the ledger from the real SQLite file.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from taled.checkpoints.repo import CheckpointKind, CheckpointStore
from tests.harness import Daemon, local_clock, running_daemon

# Three independent deliverables: the plan is a DAG with a parallel layer and a
# step that combines them. The planner builds it from the text (plan_attempts=0),
# so the test does not depend on how well a 135M model writes JSON.
PARALLEL = (
    "Do the following:\n"
    "1. Write one sentence about the sea.\n"
    "2. Write one sentence about the moon.\n"
    "3. Write one sentence about trees."
)

PLANNED = {
    "TALE_PLANNER__DECOMPOSE": "true",
    "TALE_PLANNER__COMPLEX_MIN_SCORE": "0.3",
    "TALE_PLANNER__PLAN_ATTEMPTS": "0",
    "TALE_RUNNER__MAX_TOKENS": "24",
    "TALE_QUEUE__WORKERS": "2",
    # These tests are about planning's mechanics, not whether planning pays on this
    # model: the learning engine must not skip it after the module's first plans
    # (at 24 tokens an answer, a plan costs far more than ten first answers).
    "TALE_LEARNING__TACTIC_MAX_COST_RATIO": "1000000",
}


@pytest.fixture(scope="module")
def planner_daemon() -> Iterator[Daemon]:
    with running_daemon(PLANNED) as d:
        yield d


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _ledger(daemon: Daemon, task_ids: list[str]) -> list[sqlite3.Row]:
    daemon.call("usage")  # waits for ledger rows still in flight
    db = sqlite3.connect(daemon.home.data / "tale.db")
    db.row_factory = sqlite3.Row
    marks = ",".join("?" * len(task_ids))
    rows = db.execute(
        f"SELECT task_id, step, attempt, success, at - total_ms / 1000.0 AS started, at AS ended "
        f"FROM model_calls WHERE task_id IN ({marks}) ORDER BY seq",
        task_ids,
    ).fetchall()
    db.close()
    return rows


def _git(daemon: Daemon, *args: str) -> str:
    repo = daemon.home.data / "checkpoints.git"
    return subprocess.run(
        ["git", "--git-dir", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def test_a_complex_task_runs_as_a_dag_of_subtasks_and_is_aggregated(
    planner_daemon: Daemon,
) -> None:
    """Planned into a DAG of subtasks; ready ones run in parallel; the parent aggregates."""
    task_id = planner_daemon.call("submit_task", text=PARALLEL)["id"]
    task = planner_daemon.wait_for(task_id, timeout=240)
    assert task["state"] == "completed", task
    subtasks = task["subtasks"]
    assert len(subtasks) == 4
    assert all(s["state"] == "completed" and s["result"] for s in subtasks)
    by_step = {s["step"]: s for s in subtasks}
    final = by_step["s4"]
    assert sorted(planner_daemon.call("get_task", id=n)["step"] for n in final["needs"]) == [
        "s1",
        "s2",
        "s3",
    ]
    # The parent waited for its subtasks, then was queued again to aggregate.
    moves = [(t["from"], t["to"]) for t in task["transitions"]]
    assert ("running", "waiting") in moves and ("waiting", "queued") in moves
    # s4 started only after all of s1..s3 completed; two of s1..s3 overlapped (2 workers).
    ended = {
        s["step"]: _at(next(t["at"] for t in s["transitions"] if t["to"] == "completed"))
        for s in subtasks
    }
    started = {
        s["step"]: _at(next(t["at"] for t in s["transitions"] if t["to"] == "running"))
        for s in subtasks
    }
    assert started["s4"] >= max(ended["s1"], ended["s2"], ended["s3"])
    spans = sorted((started[s], ended[s]) for s in ("s1", "s2", "s3"))
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans
    # The ledger names each step; the aggregate ran once, after the subtasks.
    steps = [r["step"] for r in _ledger(planner_daemon, [task_id])]
    assert steps == ["aggregate"]


def test_each_subtask_receives_what_its_dependencies_produced(planner_daemon: Daemon) -> None:
    """Context passing: the last step's prompt carries its dependencies' results."""
    task_id = planner_daemon.call("submit_task", text=PARALLEL)["id"]
    task = planner_daemon.wait_for(task_id, timeout=240)
    assert task["state"] == "completed", task
    # The parent's final checkpoint holds every step's output, as the subtasks produced them.
    state = json.loads(_git(planner_daemon, "show", f"refs/tale/tasks/{task_id}:state.json"))
    assert state["phase"] == "done"
    assert state["outputs"] == {s["step"]: s["result"] for s in task["subtasks"]}
    assert state["result"] == task["result"]


def test_status_shows_the_subtask_tree_and_the_history(planner_daemon: Daemon) -> None:
    """`tale status ID` prints each subtask with its step, state, title and dependencies."""
    task_id = planner_daemon.call("submit_task", text=PARALLEL)["id"]
    planner_daemon.wait_for(task_id, timeout=240)
    proc = planner_daemon.home.tale("status", task_id)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "subtasks" in out and "history" in out
    assert "(after s1, s2, s3)" in out
    for step in ("s1", "s2", "s3", "s4"):
        assert f"\n  {step} " in out


def test_every_step_is_checkpointed_and_tale_checkpoints_lists_them(
    planner_daemon: Daemon,
) -> None:
    """One commit per step on the task's ref; the repository passes `git fsck`."""
    task_id = planner_daemon.call("submit_task", text=PARALLEL)["id"]
    planner_daemon.wait_for(task_id, timeout=240)
    proc = planner_daemon.home.tale("checkpoints", task_id, "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["checkpoints"]
    steps = [c["step"] for c in reversed(listed)]
    assert steps[0] == "start" and steps[1] == "plan" and steps[-1] == "done"
    assert {"s1 done", "s2 done", "s3 done", "s4 done", "aggregate"} <= set(steps)
    commits = _git(planner_daemon, "rev-list", f"refs/tale/tasks/{task_id}").split()
    assert commits == [c["commit"] for c in listed]
    # Written while the daemon runs, the repository is valid git all along.
    _git(planner_daemon, "fsck", "--strict")
    table = planner_daemon.home.tale("checkpoints", task_id)
    header, newest = table.stdout.splitlines()[:2]
    assert header.split() == ["COMMIT", "TIME", "STEP", "KIND", "MESSAGE"]
    shown = local_clock(listed[0]["at"])
    assert newest.startswith(f"{listed[0]['commit'][:12]}  {shown}  "), newest
    kinds = [c["kind"] for c in reversed(listed)]
    assert kinds[0] == "start" and kinds[1] == "plan" and kinds[-1] == "done"
    assert "step-done" in kinds


def test_a_simple_task_is_answered_in_one_step(planner_daemon: Daemon) -> None:
    """A short request is not planned: one answer call, checkpointed."""
    task_id = planner_daemon.call("submit_task", text="Say hello")["id"]
    task = planner_daemon.wait_for(task_id)
    assert task["state"] == "completed"
    assert task["subtasks"] == []
    assert [r["step"] for r in _ledger(planner_daemon, [task_id])] == ["answer"]


def test_submit_wait_follows_progress_and_ends_with_the_result(planner_daemon: Daemon) -> None:
    """`tale submit --wait` reports progress while the task runs and prints the result."""
    proc = planner_daemon.home.tale("submit", "--wait", PARALLEL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    # Not a terminal: progress comes as one line per state on stderr.
    assert "running · step" in proc.stderr and "waiting" in proc.stderr


LONG = "Write a very long story about a dragon, at least 2000 words."


@pytest.fixture(scope="module")
def one_step_daemon() -> Iterator[Daemon]:
    """Tasks answered in one step of up to 160 tokens, so one can be caught mid-answer."""
    with running_daemon({"TALE_RUNNER__MAX_TOKENS": "160", "TALE_QUEUE__WORKERS": "1"}) as d:
        yield d


def _wait_for_tokens(daemon: Daemon, task_id: str, at_least: int) -> None:
    for _ in range(600):
        task = daemon.call("get_task", id=task_id)
        progress = task["progress"]
        if task["state"] == "running" and progress and progress["tokens"] >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} produced no tokens: {task}")


def test_pause_mid_answer_checkpoints_the_partial_answer_and_resume_continues_it(
    one_step_daemon: Daemon,
) -> None:
    """Paused mid-generation, the partial answer is saved; the resumed answer starts with it."""
    d = one_step_daemon
    task_id = d.call("submit_task", text=LONG)["id"]
    _wait_for_tokens(d, task_id, 10)
    assert d.call("pause_task", id=task_id)["state"] == "paused"
    listed = d.call("list_checkpoints", id=task_id)["checkpoints"]
    assert listed[0]["step"] == "pause"
    saved = json.loads(_git(d, "show", f"{listed[0]['commit']}:state.json"))
    partial = saved["partial"]["text"]
    assert partial and saved["partial"]["key"] == "answer"
    assert d.call("resume_task", id=task_id)["state"] == "queued"
    task = d.wait_for(task_id)
    assert task["state"] == "completed"
    assert task["result"].startswith(partial)
    calls = _ledger(d, [task_id])
    assert [r["step"] for r in calls] == ["answer", "answer"]
    assert [r["success"] for r in calls] == [0, 1]  # the paused call, then the continuation


def test_restore_rewinds_a_paused_task_to_a_checkpoint_and_requeues_it(
    one_step_daemon: Daemon,
) -> None:
    """`tale restore ID COMMIT` queues the task from that checkpoint; the rest runs again."""
    d = one_step_daemon
    task_id = d.call("submit_task", text=LONG)["id"]
    _wait_for_tokens(d, task_id, 5)
    d.call("pause_task", id=task_id)
    start = next(
        c for c in d.call("list_checkpoints", id=task_id)["checkpoints"] if c["step"] == "start"
    )
    proc = d.home.tale("restore", task_id, start["commit"][:10])
    assert proc.returncode == 0, proc.stderr
    assert f"task {task_id} queued: restored to {start['commit'][:12]}" in proc.stdout
    task = d.wait_for(task_id)
    assert task["state"] == "completed"
    assert "restored to checkpoint" in task["transitions"][-3]["reason"]
    newest = d.call("list_checkpoints", id=task_id)["checkpoints"]
    assert [c["step"] for c in newest[:3]] == ["done", "answer", "restore"]
    assert proc.stdout.rstrip().endswith(f"; saved as {newest[2]['commit'][:12]}")
    # Restored to before the pause: the answer started over, without the partial text.
    state = json.loads(_git(d, "show", f"{newest[2]['commit']}:state.json"))
    assert state["partial"] is None and state["phase"] == "answer"


def test_restore_refuses_a_task_that_is_not_paused_or_failed(one_step_daemon: Daemon) -> None:
    """Restoring a completed task is refused with a message that says what to do."""
    d = one_step_daemon
    task_id = d.call("submit_task", text="Say hi")["id"]
    d.wait_for(task_id)
    proc = d.home.tale("restore", task_id)
    assert proc.returncode == 1
    assert f"task {task_id} is completed; only a paused or failed task can be restored" in (
        proc.stderr
    )
    bad = d.home.tale("restore", task_id, "nothex!")
    assert bad.returncode == 2 and "commit" in bad.stderr


def test_restore_by_default_skips_failed_attempts_by_their_kind() -> None:
    """Without a commit, restore goes to the newest checkpoint that is not a failed
    attempt, judged by its kind: a ``decompose`` checkpoint (whose message says answers
    "failed") is a valid target."""
    with running_daemon({"TALE_RUNNER__MAX_TOKENS": "16"}) as d:
        task_id = d.call("submit_task", text="Say hi", criteria=["contains:NEVER-THERE"])["id"]
        assert d.wait_for(task_id)["state"] == "failed"
        d.stop()  # the daemon holds the repository; seed its history while it is down

        async def seed() -> str:
            store = CheckpointStore(d.home.data / "checkpoints.git")
            await store.open()
            try:
                state = await store.load(task_id)
                decompose = await store.commit(
                    task_id,
                    state,
                    "decompose",
                    "direct answers failed: decomposing",
                    kind=CheckpointKind.DECOMPOSE,
                )
                await store.commit(
                    task_id, state, "answer#3", "attempt failed", CheckpointKind.ATTEMPT_FAILED
                )
                return decompose.commit
            finally:
                await store.close()

        decompose = asyncio.run(seed())
        d.start()
        proc = d.home.tale("restore", task_id)
        assert proc.returncode == 0, proc.stderr
        assert f"restored to {decompose[:12]}" in proc.stdout


GATED = {
    "TALE_GATES__PYTHON_CODE": "true",
    "TALE_PLANNER__DECOMPOSE": "false",
    "TALE_RUNNER__MAX_TOKENS": "16",
    "TALE_MODELS__FALLBACK": "llamacpp:smollm2-135m",
}


def test_a_retried_answer_is_one_step_in_the_ledger_with_numbered_attempts() -> None:
    """Each attempt at a retried answer is a ledger row of step ``answer`` with its own
    attempt number; its checkpoints still name it ``answer``, ``answer#2``."""
    settings = {
        "TALE_PLANNER__DECOMPOSE": "false",
        "TALE_RUNNER__MAX_TOKENS": "8",
        "TALE_GATES__ATTEMPTS": "2",
    }
    with running_daemon(settings) as d:
        task_id = d.call("submit_task", text="Say hello", criteria=["contains:xyzzy-never-said"])[
            "id"
        ]
        assert d.wait_for(task_id, timeout=240)["state"] == "failed"
        calls = _ledger(d, [task_id])
        assert [(r["step"], r["attempt"]) for r in calls] == [("answer", 1), ("answer", 2)]
        listed = d.call("list_checkpoints", id=task_id)["checkpoints"]
        assert [c["step"] for c in listed[:2]] == ["answer#2", "answer"]


def test_a_failing_gate_is_fed_back_and_recovered_in_order_then_fails_saying_what_was_tried() -> (
    None
):
    """Criteria that never pass: more tokens, then the fallback model, then a clear failure."""
    with running_daemon(GATED) as d:
        task_id = d.call("submit_task", text="Say hello", criteria=["contains:xyzzy-never-said"])[
            "id"
        ]
        task = d.wait_for(task_id, timeout=240)
        assert task["state"] == "failed"
        error = task["error"]
        assert error.startswith("every recovery step failed. Tried: answer (first, 16 tokens)")
        assert "answer#2 (more tokens, 32 tokens)" in error
        assert "(fallback model, 32 tokens, llamacpp:smollm2-135m)" in error
        assert "xyzzy-never-said" in error
        calls = _ledger(d, [task_id])
        assert [(r["step"], r["attempt"]) for r in calls] == [("answer", n) for n in (1, 2, 3, 4)]
        # The gate's complaint went back to the model with the retry.
        listed = d.call("list_checkpoints", id=task_id)["checkpoints"]
        assert all("failed" in c["message"] for c in listed[:4])
        # A failed task can be restored: by default to its newest checkpoint that is not
        # a failed attempt, here the one before any answer; it is queued and runs again.
        proc = d.home.tale("restore", task_id, "--json")
        assert proc.returncode == 0, proc.stderr
        restored = json.loads(proc.stdout)
        assert restored["task"]["state"] == "queued"
        assert "(start:" in restored["checkpoint"]["message"]
        again = d.wait_for(task_id, timeout=240)
        assert again["state"] == "failed"
        assert len(_ledger(d, [task_id])) == 8


def test_bad_criteria_are_refused_at_submit() -> None:
    """An unknown criterion form is an input error naming the accepted forms; nothing is queued."""
    with running_daemon() as d:
        proc = d.home.tale("submit", "Say hi", "--done", "smells-good")
        assert proc.returncode == 2
        assert "smells-good" in proc.stderr
        assert d.call("list_tasks")["tasks"] == []


def test_pausing_a_planned_task_pauses_its_subtasks_and_resume_finishes_it(
    planner_daemon: Daemon,
) -> None:
    """Pause and resume reach the whole tree; the task then completes from where it was."""
    d = planner_daemon
    task_id = d.call("submit_task", text=PARALLEL)["id"]
    d.wait_for(task_id, ("waiting",), timeout=60)
    paused = d.call("pause_task", id=task_id)
    assert paused["state"] == "paused"
    tree = d.call("get_task", id=task_id)
    assert all(s["state"] in ("paused", "completed") for s in tree["subtasks"]), tree["subtasks"]
    done_before = {s["step"] for s in tree["subtasks"] if s["state"] == "completed"}
    time.sleep(1.0)  # nothing moves while paused
    still = d.call("get_task", id=task_id)
    assert [s["state"] for s in still["subtasks"]] == [s["state"] for s in tree["subtasks"]]
    d.call("resume_task", id=task_id)
    task = d.wait_for(task_id, timeout=240)
    assert task["state"] == "completed"
    # Steps finished before the pause were not run again.
    calls = _ledger(d, [s["id"] for s in task["subtasks"]])
    steps = [r["step"] for r in calls if r["success"]]
    assert all(steps.count(s) == 1 for s in done_before), steps


def test_priority_and_cancel_of_a_planned_task_reach_every_subtask(
    planner_daemon: Daemon,
) -> None:
    """Priority and cancel reach the whole tree: no subtask is left to run."""
    d = planner_daemon
    task_id = d.call("submit_task", text=PARALLEL)["id"]
    d.wait_for(task_id, ("waiting",), timeout=60)
    # A new priority reaches the unfinished subtasks too.
    raised = d.call("set_priority", id=task_id, priority=90)
    assert raised["priority"] == 90
    tree = d.call("get_task", id=task_id)
    assert {s["priority"] for s in tree["subtasks"] if s["state"] != "completed"} == {90}
    assert d.home.tale("cancel", task_id).returncode == 0
    tree = d.call("get_task", id=task_id)
    assert tree["state"] == "cancelled"
    assert {s["state"] for s in tree["subtasks"]} <= {"cancelled", "completed"}
    assert "cancelled" in {s["state"] for s in tree["subtasks"]}


def test_old_checkpoints_of_finished_tasks_are_compacted_and_the_repo_stays_valid() -> None:
    """Retention keeps keep_finished checkpoints of a finished task; `git fsck` passes."""
    settings = {
        **PLANNED,
        "TALE_CHECKPOINTS__COMPACT_AFTER_SECONDS": "0",
        "TALE_CHECKPOINTS__MAINTENANCE_INTERVAL_SECONDS": "0.5",
        "TALE_CHECKPOINTS__KEEP_FINISHED": "2",
        "TALE_CHECKPOINTS__GC_EVERY": "1",
    }
    with running_daemon(settings) as d:
        task_id = d.call("submit_task", text=PARALLEL)["id"]
        final = d.wait_for(task_id, timeout=240)
        assert final["state"] == "completed"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = d.call("list_checkpoints", id=task_id)["checkpoints"]
            if len(listed) == 2:
                break
            time.sleep(0.2)
        assert [c["step"] for c in listed] == ["done", "aggregate"]
        state = json.loads(_git(d, "show", f"refs/tale/tasks/{task_id}:state.json"))
        assert state["result"] == final["result"]
        _git(d, "fsck", "--strict")


def test_a_long_answer_is_checkpointed_as_it_grows_and_continued_after_kill_9() -> None:
    """Partial answers are saved every partial_checkpoint_seconds; a crash keeps them."""
    settings = {
        "TALE_RUNNER__MAX_TOKENS": "300",
        "TALE_RUNNER__PARTIAL_CHECKPOINT_SECONDS": "0.5",
        "TALE_QUEUE__WORKERS": "1",
    }
    with running_daemon(settings) as d:
        task_id = d.call("submit_task", text=LONG)["id"]
        deadline = time.monotonic() + 60
        partial = None
        while partial is None and time.monotonic() < deadline:
            listed = d.call("list_checkpoints", id=task_id)["checkpoints"]
            if listed and listed[0]["step"] == "partial":
                partial = listed[0]
            time.sleep(0.1)
        assert partial is not None, "no partial checkpoint while the answer grew"
        d.kill9()
        d.start()
        saved = json.loads(_git(d, "show", "refs/tale/tasks/" + task_id + ":state.json"))
        kept = saved["partial"]["text"]
        assert kept and saved["partial"]["key"] == "answer"
        task = d.wait_for(task_id, timeout=180)
        assert task["state"] == "completed"
        assert task["result"].startswith(kept)
        assert "daemon restarted" in " ".join(t["reason"] for t in task["transitions"])


def test_the_default_gate_runs_the_results_code_in_the_sandbox() -> None:
    """With the default gate on, a result's code is run: `output:` passes only if it printed."""
    with running_daemon({"TALE_GATES__PYTHON_CODE": "true"}) as d:
        proc = d.home.tale(
            "submit", "--wait", "--json", "--done", "output:Hello", "Write hello world in Python"
        )
        assert proc.returncode == 0, proc.stderr
        task = json.loads(proc.stdout)
        assert task["state"] == "completed" and "print" in task["result"]
        state = json.loads(_git(d, "show", f"refs/tale/tasks/{task['id']}:state.json"))
        assert [a["passed"] for a in state["attempts"]["answer"]] == [True]
        # The same code does not print "Goodbye": the gate fails it, attempt after attempt.
        proc = d.home.tale(
            "submit", "--wait", "--json", "--done", "output:Goodbye", "Write hello world in Python"
        )
        assert proc.returncode == 1
        assert "Goodbye" in json.loads(proc.stdout)["error"]
