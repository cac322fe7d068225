"""Forgetting tasks (`tale delete`, `tale purge`, `retention.keep_days`), end to end: the
real daemon on its socket, its real SQLite file, backups and checkpoint repository, a
real git repository for a worktree task; the task model is the scripted OpenAI-compatible
stand-in (tests/standins/openai_scripted.py), the UX model the embedded one.

"Found nowhere" is checked byte for byte: every file under the data directory (the
database, its write-ahead log, the backups, workspaces, run outputs, the checkpoint
repository's files) and the daemon's log are read raw, and, because git objects are
zlib-compressed, every object of the checkpoint repository (loose and packed) is read
decompressed through dulwich. Each test first checks that the text was there to find.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dulwich.repo import Repo

from tale_client.cli import AGE_PATTERN
from tale_client.rpc import Connection, RpcError
from taled.db.forget import ForgetRecords
from taled.db.store import Store, SubtaskSpec
from taled.errors import IllegalTransition, InvalidInput, NotFound
from taled.learning.memory import VectorIndex
from taled.retention import age
from taled.settings import StoreSettings
from taled.tasks.lifecycle import TaskState
from tests.harness import Daemon, Home, git
from tests.standins.openai_scripted import scripted_server

# Markers: one per test, unlike any word tale or a model would write, lowercase so that
# the full-text index holds them as they are.
MARK_PLAIN = "zqplain" + secrets.token_hex(5)
MARK_ACT = "zqact" + secrets.token_hex(5)
MARK_CHAT = "zqchat" + secrets.token_hex(5)
MARK_USAGE = "zqusage" + secrets.token_hex(5)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


SCRIPT: dict[str, Any] = {
    "plain": f"The answer is {MARK_PLAIN}, as asked.",
    "usage": f"Counted {MARK_USAGE}.",
    "act": [
        _call("write_file", path="found.txt", content=f"the file says {MARK_ACT}\n"),
        _call("run", command=f"echo {MARK_ACT}-printed"),
        _call("finish", result=f"wrote found.txt with {MARK_ACT}"),
    ],
    "ask": [_call("run", command="rm -rf build"), _call("finish", result="removed")],
    "fail": [_call("read_file", path=f"missing-{i}.txt") for i in range(20)],
}

CONFIG = """
[tools.agent]
max_steps = 5

[tools.policy]
"run:echo" = "allow"
"""


@pytest.fixture(scope="module")
def home() -> Iterator[Home]:
    # Backups every 1.2 s (when the database changed), so a backup holds a task's text
    # before it is deleted: the check that none does afterwards means something.
    made = Home({"TALE_STORE__BACKUP_INTERVAL_MINUTES": "0.02"})
    made.write_config(CONFIG)
    yield made
    made.cleanup()


@pytest.fixture(scope="module")
def daemon(home: Home) -> Iterator[Daemon]:
    with scripted_server(SCRIPT) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        started = Daemon(home).start()
        try:
            yield started
        finally:
            started.kill_if_running()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A user's repository with one commit."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "notes.md").write_text("a note\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "the user's commit")
    return root


def found(home: Home, marker: str) -> list[str]:
    """Where ``marker`` is: raw files under the data directory and the daemon's log, and
    every checkpoint object, decompressed.

    A running daemon may delete or repack files while they are read (the retention
    sweep does exactly that); a scan that meets a vanished file is not evidence either
    way, so it starts again rather than count the file as clean."""
    for _ in range(20):
        try:
            return _scan(home, marker.encode())
        except (FileNotFoundError, KeyError):
            time.sleep(0.05)
    raise AssertionError("the data directory kept changing under every scan")


def _scan(home: Home, needle: bytes) -> list[str]:
    where = [
        str(path.relative_to(home.root))
        for path in [*sorted(home.data.rglob("*")), home.root / "taled.log"]
        if path.is_file() and needle in path.read_bytes()
    ]
    repo = Repo(str(home.data / "checkpoints.git"))
    try:
        store = repo.object_store
        where += [
            f"checkpoint object {sha.decode()}"
            for sha in store
            if needle in store[sha].as_raw_string()
        ]
    finally:
        repo.close()
    return where


def checkpoint_wal(home: Home) -> None:
    """Copy the write-ahead log into the database file, as SQLite does by itself every
    1000 pages: a task that has been around a while is in the file, not only the log."""
    with sqlite3.connect(home.data / "tale.db", timeout=30) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def in_backups(home: Home, marker: str) -> bool:
    return any(marker.encode() in b.read_bytes() for b in (home.data / "backups").glob("*.db"))


def wait_until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {timeout} s: {what}")
        time.sleep(0.1)


def chat(daemon: Daemon, text: str, **args: Any) -> dict[str, Any]:
    with Connection(daemon.home.socket, timeout=180) as conn:
        conn.initialize("tests")
        return conn.call_tool("chat", {"text": text, **args})


def usage_totals(daemon: Daemon) -> dict[str, Any]:
    report = daemon.call("usage")
    return {k: report[k] for k in ("total", "by_model", "by_role", "by_route", "by_day")}


def test_a_deleted_task_is_found_nowhere(home: Home, daemon: Daemon) -> None:
    """After `tale delete`, a task's text and result are in no file tale keeps: not the
    database, its log, a backup, nor any checkpoint object or file."""
    task = daemon.call("submit_task", text=f"[[script:plain]] say {MARK_PLAIN}")
    assert daemon.wait_for(task["id"])["state"] == "completed"
    wait_until("a backup holds the task", lambda: in_backups(home, MARK_PLAIN))
    checkpoint_wal(home)
    before = found(home, MARK_PLAIN)
    assert any(w.startswith("checkpoint object") for w in before), before
    assert "d/tale/tale.db" in before, before

    deleted = home.tale("delete", task["id"])
    assert deleted.returncode == 0, deleted.stderr
    assert f"task {task['id']} forgotten" in deleted.stdout

    assert found(home, MARK_PLAIN) == []
    assert list((home.data / "backups").glob("*.db")), "a fresh backup replaced the others"
    with pytest.raises(RpcError, match="no task"):
        daemon.call("get_task", id=task["id"])


def test_an_acting_tasks_workspace_outputs_and_branch_are_forgotten(
    home: Home, daemon: Daemon, repo: Path
) -> None:
    """A task that worked in a git worktree: its workspace, its run's output, the worktree
    and its branch tale/ID go, with the rest; the user's repository is otherwise as it was."""
    task = daemon.call("submit_task", text=f"[[script:act]] note {MARK_ACT}", workspace=str(repo))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    workspace = home.data / "workspaces" / task["id"]
    assert MARK_ACT in (workspace / "found.txt").read_text()
    outputs = home.data / "tool-output" / task["id"]
    assert any(MARK_ACT in p.read_text() for p in outputs.iterdir())
    branch = f"tale/{task['id']}"
    assert MARK_ACT in git(repo, "log", "--format=%B", branch)
    assert found(home, MARK_ACT)

    deleted = home.tale("delete", task["id"])
    assert deleted.returncode == 0, deleted.stderr

    assert found(home, MARK_ACT) == []
    assert not workspace.exists() and not outputs.exists()
    assert git(repo, "branch", "--list", branch).strip() == ""
    assert str(workspace) not in git(repo, "worktree", "list")
    assert MARK_ACT not in git(repo, "log", "--all", "--format=%B")
    assert git(repo, "log", "--format=%s", "main").strip() == "the user's commit"


def test_a_branch_with_someone_elses_commit_is_left_to_its_owner(
    home: Home, daemon: Daemon, repo: Path
) -> None:
    """A forgotten task's branch that someone else committed on since is not deleted (the
    commit is theirs); its worktree and workspace go all the same."""
    task = daemon.call("submit_task", text="[[script:act]] a branch to keep", workspace=str(repo))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    branch = f"tale/{task['id']}"
    tree = git(repo, "rev-parse", f"{branch}^{{tree}}").strip()
    mine = git(repo, "commit-tree", tree, "-p", branch, "-m", "my own work").strip()
    git(repo, "update-ref", f"refs/heads/{branch}", mine)

    assert home.tale("delete", task["id"]).returncode == 0

    assert git(repo, "rev-parse", branch).strip() == mine
    assert not (home.data / "workspaces" / task["id"]).exists()
    assert str(home.data / "workspaces" / task["id"]) not in git(repo, "worktree", "list")


def test_the_conversation_turns_that_submitted_a_task_are_forgotten(
    home: Home, daemon: Daemon
) -> None:
    """The chat request that handed the task off, the reply naming it and a later answer
    about it go; the conversation's other turns stay."""
    hello = chat(daemon, "hello there!", new=True)
    conversation = hello["conversation"]
    turn = chat(
        daemon,
        f"Write a Python function named {MARK_CHAT} that reverses a string",
        conversation=conversation,
    )
    assert turn["handed_off"] is True, turn
    task_id = turn["task"]["id"]
    daemon.wait_for(task_id)
    about = chat(daemon, "how is my task doing?", conversation=conversation)
    assert task_id in about["text"]
    assert found(home, MARK_CHAT)

    deleted = home.tale("delete", task_id)
    assert deleted.returncode == 0, deleted.stderr

    assert found(home, MARK_CHAT) == []
    kept = daemon.call("get_conversation", id=conversation)
    assert [m["text"] for m in kept["messages"]][:1] == ["hello there!"]
    assert all(task_id not in m["text"] for m in kept["messages"])
    assert len(kept["messages"]) == 2
    # The conversation goes on: nothing it still tracks is gone from under it.
    assert chat(daemon, "thanks", conversation=conversation)["updates"] == []


def test_usage_totals_are_the_same_after_a_delete(home: Home, daemon: Daemon) -> None:
    """The ledger keeps a forgotten task's token counts: every usage total is unchanged."""
    task = daemon.call("submit_task", text=f"[[script:usage]] count {MARK_USAGE}")
    assert daemon.wait_for(task["id"])["state"] == "completed"
    before = usage_totals(daemon)
    assert before["total"]["calls"] > 0

    assert home.tale("delete", task["id"]).returncode == 0

    assert usage_totals(daemon) == before
    report = daemon.call("usage", top=100)
    row = next(r for r in report["by_task"] if r["id"] == task["id"])
    assert row["text"] == "" and row["total_tokens"] > 0


def test_the_learning_engine_learns_again_without_the_task(home: Home, daemon: Daemon) -> None:
    """What the learning engine fitted on a forgotten task's text is fitted again without
    it: the distinct texts it learned from are back to what they were."""

    def distinct() -> int:
        return int(daemon.call("daemon_status")["learning"]["distinct_tasks"])

    start = distinct()
    task = daemon.call("submit_task", text=f"[[script:plain]] learn {secrets.token_hex(4)}")
    daemon.wait_for(task["id"])
    wait_until("the engine learned from it", lambda: distinct() == start + 1)

    assert home.tale("delete", task["id"]).returncode == 0

    assert distinct() == start


def test_other_tasks_are_untouched_and_still_restorable(home: Home, daemon: Daemon) -> None:
    """Deleting one task leaves another's text, checkpoints and restore as they were."""
    other = daemon.call("submit_task", text="[[script:fail]] keep me", act=True)
    assert daemon.wait_for(other["id"])["state"] == "failed"
    checkpoints = daemon.call("list_checkpoints", id=other["id"])["checkpoints"]
    doomed = daemon.call("submit_task", text="[[script:plain]] forget me")
    daemon.wait_for(doomed["id"])

    assert home.tale("delete", doomed["id"]).returncode == 0

    assert daemon.call("get_task", id=other["id"])["text"] == "[[script:fail]] keep me"
    assert daemon.call("list_checkpoints", id=other["id"])["checkpoints"] == checkpoints
    restored = home.tale("restore", other["id"])
    assert restored.returncode == 0, restored.stderr
    assert daemon.wait_for(other["id"])["state"] == "failed"


def test_a_live_task_is_refused_and_can_be_deleted_once_cancelled(
    home: Home, daemon: Daemon
) -> None:
    """A task waiting for an approval is not deleted: the error says to cancel it first."""
    task = daemon.call("submit_task", text="[[script:ask]] clean up", act=True)
    daemon.wait_for(task["id"], ("waiting",))

    refused = home.tale("delete", task["id"])
    assert refused.returncode == 1
    assert f"tale cancel {task['id']}" in refused.stderr
    assert daemon.call("get_task", id=task["id"])["state"] == "waiting"

    assert home.tale("cancel", task["id"]).returncode == 0
    assert home.tale("delete", task["id"]).returncode == 0


def test_deleting_twice_or_an_unknown_id_is_not_found(home: Home, daemon: Daemon) -> None:
    """The second delete of a task, like a delete of an id that never was, is NotFound
    (exit 2)."""
    task = daemon.call("submit_task", text="[[script:plain]] once")
    daemon.wait_for(task["id"])
    assert home.tale("delete", task["id"]).returncode == 0
    for task_id in (task["id"], "0123456789ab"):
        again = home.tale("delete", task_id)
        assert again.returncode == 2
        assert f"no task with id {task_id}" in again.stderr


def test_purge_dry_run_lists_and_forgets_nothing(home: Home, daemon: Daemon) -> None:
    """`--dry-run` lists the finished tasks old enough, with their text, and deletes none."""
    task = daemon.call("submit_task", text="[[script:plain]] dry run")
    daemon.wait_for(task["id"])
    time.sleep(1.2)
    listed = home.tale("purge", "--older-than", "1s", "--dry-run", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["dry_run"] is True
    entry = next(t for t in report["tasks"] if t["id"] == task["id"])
    assert entry["text"] == "[[script:plain]] dry run"
    assert daemon.call("get_task", id=task["id"])["text"] == "[[script:plain]] dry run"


def test_purge_forgets_only_finished_tasks_older_than_the_age(home: Home, daemon: Daemon) -> None:
    """Old finished tasks go; a task finished since, and an old one still live, stay."""
    live = daemon.call("submit_task", text="[[script:ask]] still waiting", act=True)
    daemon.wait_for(live["id"], ("waiting",))
    old = daemon.call("submit_task", text="[[script:plain]] old one")
    daemon.wait_for(old["id"])
    time.sleep(4)
    new = daemon.call("submit_task", text="[[script:plain]] new one")
    daemon.wait_for(new["id"])

    purged = home.tale("purge", "--older-than", "3s")
    assert purged.returncode == 0, purged.stderr
    assert old["id"] in purged.stdout and new["id"] not in purged.stdout

    with pytest.raises(RpcError, match="no task"):
        daemon.call("get_task", id=old["id"])
    assert daemon.call("get_task", id=new["id"])["state"] == "completed"
    assert daemon.call("get_task", id=live["id"])["state"] == "waiting"
    daemon.call("cancel_task", id=live["id"])


@pytest.mark.parametrize("bad", ["30", "d", "3x", "-1d", "1.5d", "0d", "30 days"])
def test_a_bad_age_is_a_usage_error(home: Home, bad: str) -> None:
    """An age that is not a whole number and a unit is exit 2, saying how to write one."""
    done = home.tale("purge", "--older-than", bad)
    assert done.returncode == 2
    assert "90m, 12h, 30d or 2w" in done.stderr


def test_the_daemon_refuses_a_bad_age_from_any_client(daemon: Daemon) -> None:
    """purge_tasks over MCP checks the age too: invalid input, nothing forgotten."""
    with pytest.raises(RpcError, match="90m, 12h, 30d or 2w") as caught:
        daemon.call("purge_tasks", older_than="soon")
    assert caught.value.code == -32602


def test_the_client_checks_ages_as_the_daemon_does() -> None:
    """The thin client's copy of the age pattern is the daemon's."""
    assert AGE_PATTERN == age.AGE_PATTERN
    assert age.parse_age("90m") == 5400 and age.parse_age("2w") == 14 * 86_400


def test_the_retention_sweep_forgets_tasks_past_keep_days() -> None:
    """With retention.keep_days set, finished tasks older than it are forgotten by the
    daemon itself, their text with them; live ones stay."""
    home = Home(
        {
            # Five seconds, swept every second.
            "TALE_RETENTION__KEEP_DAYS": str(5 / 86_400),
            "TALE_RETENTION__SWEEP_INTERVAL_HOURS": str(1 / 3600),
        }
    )
    mark = "zqsweep" + secrets.token_hex(5)
    home.write_config(CONFIG)
    try:
        with scripted_server({"sweep": f"swept {mark}", **SCRIPT}) as server:
            home.env["TALE_MODELS__TASK"] = server.spec
            daemon = Daemon(home).start()
            try:
                live = daemon.call("submit_task", text="[[script:ask]] wait", act=True)
                task = daemon.call("submit_task", text=f"[[script:sweep]] {mark}")
                assert daemon.wait_for(task["id"])["state"] == "completed"
                assert found(home, mark)

                def gone() -> bool:
                    try:
                        daemon.call("get_task", id=task["id"])
                    except RpcError:
                        return True
                    return False

                wait_until("the sweep forgot the task", gone, timeout=30)
                wait_until("its text is nowhere", lambda: not found(home, mark), timeout=30)
                assert daemon.call("get_task", id=live["id"])["state"] == "waiting"
            finally:
                daemon.kill_if_running()
    finally:
        home.cleanup()


def test_a_forgetting_cut_off_by_a_crash_is_finished_at_start(tmp_path: Path) -> None:
    """A task whose rows were deleted when the daemon died keeps no checkpoint: the
    journal it left is finished at the next start."""
    home = Home()
    mark = "zqcrash" + secrets.token_hex(5)
    try:
        with scripted_server({"crash": f"crashed {mark}"}) as server:
            home.env["TALE_MODELS__TASK"] = server.spec
            daemon = Daemon(home).start()
            task = daemon.call("submit_task", text="[[script:crash]] go")
            daemon.wait_for(task["id"])
            daemon.stop()
            # What a daemon killed right after the rows' transaction leaves behind.
            with sqlite3.connect(home.data / "tale.db") as db:
                for table in ("transitions", "task_outcomes", "tasks"):
                    key = "id" if table == "tasks" else "task_id"
                    db.execute(f"DELETE FROM {table} WHERE {key} = ?", (task["id"],))
                db.execute("DELETE FROM task_memory WHERE task_id = ?", (task["id"],))
            (home.data / "forgetting.json").write_text(f'{{"tasks": {{"{task["id"]}": {{}}}}}}')
            assert any(w.startswith("checkpoint object") for w in found(home, mark))

            daemon = Daemon(home).start()
            try:
                wait_until(
                    "the journal is finished", lambda: not (home.data / "forgetting.json").exists()
                )
                assert [w for w in found(home, mark) if w.startswith("checkpoint")] == []
                assert found(home, mark) == []
            finally:
                daemon.kill_if_running()
    finally:
        home.cleanup()


def test_a_subtask_is_refused_naming_its_task(tmp_path: Path) -> None:
    """Deleting a planned task's step is refused: the message names the task to delete;
    the planned task itself, still waiting for its steps, is refused as live."""

    async def run() -> None:
        store = Store(tmp_path / "t.db", StoreSettings(), write_batch_max=64)
        await store.open()
        try:
            await store.submit("plan me", 50)
            parent = await store.claim_next()
            assert parent is not None
            await store.add_subtasks(parent, 0, [SubtaskSpec("s1", "one", "do one", ())], "plan")
            (child,) = await store.children(parent.id)
            records = ForgetRecords(store, title_chars=60)
            with pytest.raises(InvalidInput, match=f"tale delete {parent.id}"):
                await records.check(child.id)
            with pytest.raises(IllegalTransition, match=f"tale cancel {parent.id}"):
                await records.check(parent.id)
            with pytest.raises(NotFound):
                await records.check("0123456789ab")
            assert (await store.get_task(parent.id)).state == TaskState.WAITING
        finally:
            await store.close()

    asyncio.run(run())


def test_a_forgotten_tasks_vector_leaves_the_index() -> None:
    """The in-memory index of embeddings lets go of a forgotten task's vector and keeps
    the others, their cosines unchanged."""
    index = VectorIndex("m", capacity=10)
    vectors = {t: np.eye(4, dtype=np.float32)[i] for i, t in enumerate("abc")}
    for task_id, v in vectors.items():
        index.add(task_id, v)
    assert index.remove("b") and not index.remove("b")
    assert len(index) == 2
    assert index.cosine("b", vectors["b"]) is None
    assert index.cosine("c", vectors["c"]) == pytest.approx(1.0)
    assert index.top(vectors["a"], 5, 0.5) == [("a", pytest.approx(1.0))]
