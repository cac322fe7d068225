"""Tasks that run after other tasks (`tale submit --after`), end to end: the real daemon on
its socket, a real SQLite file; the task model is the scripted OpenAI-compatible stand-in
(tests/standins/openai_scripted.py), whose ``requests`` show exactly what each task sent.

A second stand-in answers slowly (a word every half second): a task run on it (a per-task
model) is still running, or can be paused before it answers, while a test acts. A few
tasks are written into the database before the daemon starts, with ids chosen to make an
ambiguous prefix and a subtask.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tale_client.rpc import RpcError
from taled.db.store import Store
from taled.settings import StoreSettings
from tests.harness import Daemon, Home
from tests.standins.openai_scripted import ScriptedServer, scripted_server

ALPHA = "ALPHA-RESULT the diff adds a retry loop to fetch"
SCRIPT: dict[str, Any] = {
    "alpha": ALPHA,
    "beta": "BETA-RESULT release notes",
    "gamma": "GAMMA-RESULT",
    "long": " ".join(f"word{i:04d}" for i in range(600)),
    "nope": "no",
    "act-beta": [{"tool_calls": [{"name": "finish", "arguments": {"result": "acted"}}]}],
}
CONTEXT_CHARS = 600
# Tasks written before the daemon starts: two sharing a prefix, a planned task and its
# step, and a failed task.
SEEDED = (
    ("abcd00000001", "completed", None, "a seeded task", "seeded one"),
    ("abcd00000002", "completed", None, "another seeded task", "seeded two"),
    ("feed00000001", "completed", None, "a planned task", "planned"),
    ("feed00000002", "completed", "feed00000001", "a step of it", "a step"),
    ("dead00000001", "failed", None, "a task that failed", None),
)


@dataclass
class After:
    daemon: Daemon
    fast: ScriptedServer
    slow: ScriptedServer
    home: Home


def _seed(home: Home) -> None:
    """Create the database (the store's migrations) and write SEEDED into it."""

    async def create() -> None:
        store = Store(home.data / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        await store.close()

    home.data.mkdir(parents=True, exist_ok=True)
    asyncio.run(create())
    now = time.time()
    with contextlib.closing(sqlite3.connect(home.data / "tale.db")) as db, db:
        for task_id, state, parent, text, result in SEEDED:
            db.execute(
                "INSERT INTO tasks (id, text, state, priority, result, error, attempts, "
                "created_at, updated_at, parent_id, step) "
                "VALUES (?, ?, ?, 50, ?, ?, 1, ?, ?, ?, ?)",
                (
                    task_id,
                    text,
                    state,
                    result,
                    "no luck" if state == "failed" else None,
                    now,
                    now,
                    parent,
                    "s1" if parent else None,
                ),
            )


@pytest.fixture(scope="module")
def after() -> Iterator[After]:
    with scripted_server(SCRIPT) as fast, scripted_server(SCRIPT, delay=0.5) as slow:
        home = Home()
        home.env.update(
            {
                "TALE_MODELS__TASK": fast.spec,
                "TALE_PLANNER__CONTEXT_CHARS": str(CONTEXT_CHARS),
                # Every task on the task model (no learned routing to the small one).
                "TALE_LEARNING__ENABLED": "false",
            }
        )
        _seed(home)
        daemon = Daemon(home).start()
        try:
            yield After(daemon, fast, slow, home)
        finally:
            daemon.kill_if_running()
            home.cleanup()


def _sent(server: ScriptedServer, mark: str) -> list[str]:
    """The user messages of every request whose task text carries ``[[script:mark]]``."""
    found = []
    for body in list(server.requests):
        texts = [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "user"]
        if texts and texts[0].startswith(f"[[script:{mark}]]"):
            found.append("\n".join(texts))
    return found


def _held(a: After, mark: str, **extra: Any) -> str:
    """A task on the slow model, paused before it answers: it finishes only when resumed."""
    text = f"[[script:{mark}]] {mark}"
    task_id = a.daemon.call("submit_task", text=text, model=a.slow.spec, **extra)["id"]
    for _ in range(10):
        try:
            a.daemon.call("pause_task", id=task_id)
            break
        except RpcError as exc:  # claimed between the pause's read and its move: again
            assert "no longer" in exc.message, exc.message
    assert a.daemon.call("get_task", id=task_id)["state"] == "paused"
    return task_id


def _rows(home: Home) -> tuple[int, int]:
    """Rows in tasks and task_deps, read from the SQLite file itself."""
    uri = f"file:{home.data / 'tale.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return (
            int(db.execute("SELECT count(*) FROM tasks").fetchone()[0]),
            int(db.execute("SELECT count(*) FROM task_deps").fetchone()[0]),
        )


def _moved_at(task: dict[str, Any], state: str) -> str:
    return next(t["at"] for t in task["transitions"] if t["to"] == state)


def test_a_task_runs_only_after_its_dependency_completes_and_reads_its_result(
    after: After,
) -> None:
    """B --after A stays queued, sent nothing, while A runs; once A completes B runs with
    A's result in its prompt."""
    a_id = after.daemon.call("submit_task", text="[[script:alpha]] Diff it", model=after.slow.spec)[
        "id"
    ]
    b = after.daemon.call("submit_task", text="[[script:beta]] Notes", after=[a_id[:6]])
    assert b["after"] == [a_id] and b["waiting_for"] == [a_id] and b["state"] == "queued"
    time.sleep(1.0)
    assert after.daemon.call("get_task", id=b["id"])["state"] == "queued"
    assert _sent(after.fast, "beta") == []
    a = after.daemon.wait_for(a_id)
    done = after.daemon.wait_for(b["id"])
    assert a["state"] == "completed" and done["state"] == "completed"
    assert _moved_at(done, "running") >= _moved_at(a, "completed")
    (prompt,) = _sent(after.fast, "beta")
    assert "Results of the tasks this one waits for:" in prompt
    assert ALPHA in prompt and a_id in prompt
    assert done["waiting_for"] == []


def test_a_task_after_a_completed_one_runs_at_once_with_its_result(after: After) -> None:
    """A dependency that already completed: the task is not held back and reads its result."""
    done = after.daemon.call("submit_task", text="[[script:gamma]] g", after=["abcd00000001"])
    assert done["waiting_for"] == []
    assert after.daemon.wait_for(done["id"])["state"] == "completed"
    (prompt,) = _sent(after.fast, "gamma")
    assert "seeded one" in prompt and "a seeded task" in prompt


def test_a_long_result_is_cut_to_the_context_budget(after: After) -> None:
    """A dependency's long result reaches the dependent within planner.context_chars."""
    long_id = after.daemon.call("submit_task", text="[[script:long]] long")["id"]
    assert after.daemon.wait_for(long_id)["state"] == "completed"
    task = after.daemon.call("submit_task", text="[[script:gamma]] short", after=[long_id])
    assert after.daemon.wait_for(task["id"])["state"] == "completed"
    prompt = _sent(after.fast, "gamma")[-1]
    block = prompt.split("Results of the tasks this one waits for:\n\n", 1)[1]
    assert len(block) <= CONTEXT_CHARS
    assert "word0000" in block and "word0599" in block and "word0300" not in block


def test_a_failed_dependency_fails_its_dependents_and_theirs(after: After) -> None:
    """A fails → B (after A) fails naming A, and C (after B) fails naming B and A; neither
    ever runs."""
    a_id = _held(after, "nope", criteria=["contains:never-in-the-answer"])
    b_id = after.daemon.call("submit_task", text="[[script:beta]] b", after=[a_id])["id"]
    c_id = after.daemon.call("submit_task", text="[[script:gamma]] c", after=[b_id])["id"]
    sent = len(after.fast.requests)
    after.daemon.call("resume_task", id=a_id)
    assert after.daemon.wait_for(a_id)["state"] == "failed"
    b = after.daemon.call("get_task", id=b_id)
    c = after.daemon.call("get_task", id=c_id)
    assert b["state"] == "failed" and b["error"].startswith(
        f"it was to run after task {a_id}, which failed: "
    )
    assert c["state"] == "failed" and c["error"].startswith(
        f"it was to run after task {b_id}, which failed: it was to run after task {a_id}"
    )
    assert not any(t["to"] == "running" for t in b["transitions"] + c["transitions"])
    assert len(after.fast.requests) == sent  # neither dependent sent anything


def test_cancelling_a_dependency_fails_its_dependent_at_once(after: After) -> None:
    """Cancel A → B (after A) is failed in the same step, its reason naming A."""
    a_id = _held(after, "alpha")
    b_id = after.daemon.call("submit_task", text="[[script:beta]] b", after=[a_id])["id"]
    after.daemon.call("cancel_task", id=a_id)
    b = after.daemon.call("get_task", id=b_id)
    assert b["state"] == "failed"
    assert b["error"] == (
        f"it was to run after task {a_id}, which was cancelled: cancelled by the user"
    )


def test_after_any_runs_the_task_although_its_dependency_failed_and_says_so(
    after: After,
) -> None:
    """--after-any: B runs once A has failed, and its prompt says A did not complete."""
    a_id = _held(after, "nope", criteria=["contains:never-in-the-answer"])
    b = after.daemon.call(
        "submit_task", text="[[script:gamma]] anyway", after=[a_id], after_any=True
    )
    assert b["after_any"] is True
    after.daemon.call("resume_task", id=a_id)
    assert after.daemon.wait_for(a_id)["state"] == "failed"
    assert after.daemon.wait_for(b["id"])["state"] == "completed"
    prompt = _sent(after.fast, "gamma")[-1]
    assert f"{a_id} failed" in prompt and "Not all of them completed" in prompt


def test_an_acting_task_reads_its_dependencys_result_in_its_loop(after: After) -> None:
    """--act --after A: the agent loop's first user message carries A's result."""
    task = after.daemon.call(
        "submit_task", text="[[script:act-beta]] act", act=True, after=["abcd00000002"]
    )
    assert after.daemon.wait_for(task["id"])["state"] == "completed"
    prompt = _sent(after.fast, "act-beta")[0]
    assert "seeded two" in prompt and "Results of the tasks this one waits for:" in prompt


def test_status_and_list_show_what_a_task_waits_for(after: After) -> None:
    """`tale status B` prints its dependencies and "waiting for A"; `tale list` too."""
    a_id = _held(after, "alpha")
    b_id = after.daemon.call("submit_task", text="[[script:beta]] shown", after=[a_id])["id"]
    status = after.home.tale("status", b_id)
    assert status.returncode == 0, status.stderr
    assert f"after     {a_id}" in status.stdout
    assert f"progress  waiting for {a_id}" in status.stdout
    listed = after.home.tale("list")
    line = next(x for x in listed.stdout.splitlines() if x.startswith(b_id))
    assert f"(waiting for {a_id[:8]})" in line
    after.daemon.call("cancel_task", id=a_id)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--after", "0123456789ab"], "no task with that id"),
        (["--after", "abcd"], "more than one task starts with abcd"),
        (["--after", "feed00000002"], "is a step of task feed00000001"),
        (["--after", "dead00000001"], "already failed (no luck)"),
        (["--after", "xyz!"], "give a task id"),
        (["--after", ",".join(f"abcd0000000{i % 2 + 1}" for i in range(21))], "at most 20"),
        (["--after", "abcd00000001", "--at", "in 20m"], "not with --at or --every"),
        (["--after-any"], "--after-any goes with --after"),
    ],
)
def test_bad_after_input_exits_2_and_writes_nothing(
    after: After, args: list[str], says: str
) -> None:
    """An unknown, ambiguous, subtask or failed dependency, a bad id, too many ids, or
    --after with a schedule: a clear error, exit 2, no row written."""
    before = _rows(after.home)
    done = after.home.tale("submit", *args, "[[script:beta]] refused")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr
    assert _rows(after.home) == before


def test_a_prefix_two_task_ids_start_with_names_neither(after: After) -> None:
    """`tale status abcd` with abcd00000001 and abcd00000002 seeded: exit 2, both named,
    and `tale cancel` of it changes nothing."""
    status = after.home.tale("status", "abcd")
    assert status.returncode == 2, status.stdout
    assert "more than one task id starts with abcd (abcd00000001, abcd00000002" in status.stderr
    before = _rows(after.home)
    assert after.home.tale("cancel", "abcd").returncode == 2
    assert _rows(after.home) == before


def test_after_any_accepts_a_dependency_that_already_failed(after: After) -> None:
    """With --after-any a failed dependency is no refusal: the task runs, told of it."""
    done = after.home.tale(
        "submit", "--after", "dead0000", "--after-any", "--wait", "[[script:gamma]] ok"
    )
    assert done.returncode == 0, done.stderr
    assert "dead00000001 failed" in _sent(after.fast, "gamma")[-1]


def test_a_kill_9_while_a_task_waits_runs_it_exactly_once_after_restart(after: After) -> None:
    """kill -9 while A runs and B waits for it: after the restart A completes and B runs
    once, with A's result."""
    a_id = after.daemon.call("submit_task", text="[[script:alpha]] again", model=after.slow.spec)[
        "id"
    ]
    b_id = after.daemon.call("submit_task", text="[[script:beta]] once", after=[a_id])["id"]
    after.daemon.wait_for(a_id, ("running",))
    after.daemon.kill9()
    before = len(_sent(after.fast, "beta"))
    after.daemon = Daemon(after.home).start()
    assert after.daemon.wait_for(a_id)["state"] == "completed"
    b = after.daemon.wait_for(b_id)
    assert b["state"] == "completed"
    assert sum(t["to"] == "running" for t in b["transitions"]) == 1
    sent = _sent(after.fast, "beta")
    assert len(sent) == before + 1
    assert ALPHA in sent[-1] and "once" in sent[-1]
