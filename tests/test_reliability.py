"""Work goes on through hostile answers, damaged checkpoints, full disks and crashes.

Every test runs the real daemon; the task model is a scripted OpenAI-compatible
server (tests/standins/openai_scripted.py) where a test needs exact answers, and full
disks are real: a small tmpfs mounted as the data or checkpoint directory (the
tests run as root; they are skipped, saying why, where mounting is not allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dulwich.objects import Commit, Tree
from dulwich.refs import Ref
from dulwich.repo import Repo

from taled.sandbox.sandbox import run_python
from taled.settings import SandboxSettings
from tests.harness import Daemon, Home
from tests.standins.openai_scripted import ScriptedServer, scripted_server

# Builds a chain of directories DEPTH deep in its working directory, renaming as it
# goes so that no path it names is long (each level costs the same).
NEST = """\
import os
os.mkdir("d")
for _ in range({depth}):
    os.mkdir("n")
    os.rename("d", "n/d")
    os.rename("n", "d")
print("nested")
"""
# Answers by task text: "[[script:story]] ..." is told slowly (see ``delay``).
SCRIPT = {"story": "Once upon a time a dragon counted every coin in its hoard. " * 5}
STORY = "[[script:story]] Tell me a story"


def _wait(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.05)


@contextmanager
def _daemon(env: dict[str, str], mount: tuple[str, int] | None = None) -> Iterator[Daemon]:
    """A daemon in a fresh home; ``mount`` = (data subdirectory, MiB) puts a tmpfs there."""
    home = Home(env)
    mounted: Path | None = None
    daemon = Daemon(home)
    try:
        if mount is not None:
            where, size = mount
            mounted = home.data / where if where else home.data
            mounted.mkdir(parents=True, exist_ok=True, mode=0o700)
            home.data.chmod(0o700)
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}m,mode=0700", "tmpfs", str(mounted)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                mounted = None
                pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
        yield daemon.start()
    finally:
        daemon.kill_if_running()
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)
        home.cleanup()


def _fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler


def _state(d: Daemon, task_id: str) -> dict[str, Any]:
    return d.call("get_task", id=task_id)


def _workers(d: Daemon) -> dict[str, Any]:
    workers: dict[str, Any] = d.call("daemon_status")["workers"]
    return workers


# -- a hostile answer ---------------------------------------------------------------


def test_the_sandbox_removes_a_scratch_dir_nested_deeper_than_path_max() -> None:
    """Code that nests directories 2,500 deep (5,000 characters of path) is run and its
    scratch directory removed without a RecursionError."""
    root = Path(tempfile.mkdtemp(prefix="tale-nest-"))
    try:
        result = asyncio.run(
            run_python(NEST.format(depth=2500), SandboxSettings(), scratch_root=root)
        )
        assert result.ok, result.reason
        assert result.stdout.strip() == "nested"
        assert list(root.iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


# -- damaged checkpoints ------------------------------------------------------------


def _paused_task(d: Daemon, model: ScriptedServer) -> str:
    """A task that ran, was checkpointed mid-answer, and is paused."""
    asked = model.chats()
    task_id: str = d.call("submit_task", text=STORY)["id"]
    _wait("answering", lambda: model.chats() > asked and _state(d, task_id)["state"] == "running")
    time.sleep(0.3)
    d.call("pause_task", id=task_id)
    _wait("paused", lambda: _state(d, task_id)["state"] == "paused")
    return task_id


def _missing_state_object(repo_path: Path, task_id: str) -> str:
    """Delete the state blob of the task's newest checkpoint; returns its sha."""
    repo = Repo(str(repo_path))
    try:
        commit = repo[repo.refs[Ref(f"refs/tale/tasks/{task_id}".encode())]]
        assert isinstance(commit, Commit)
        tree = repo[commit.tree]
        assert isinstance(tree, Tree)
        blob: str = tree[b"state.json"][1].decode()
    finally:
        repo.close()
    (repo_path / "objects" / blob[:2] / blob[2:]).unlink()
    return blob


def _garbage_ref(repo_path: Path, task_id: str) -> str:
    (repo_path / "refs" / "tale" / "tasks" / task_id).write_text("garbage\n")
    return "garbage"


@pytest.mark.parametrize(
    "damage", [_missing_state_object, _garbage_ref], ids=["missing object", "garbage ref"]
)
def test_a_task_with_a_damaged_checkpoint_fails_naming_it_and_its_worker_goes_on(
    damage: Callable[[Path, str], str],
) -> None:
    """A resumed task whose checkpoint is damaged fails with a message naming the repository
    and what is wrong (logged with a traceback); the one worker then runs the next task."""
    with scripted_server(SCRIPT, delay=0.05) as model:
        env = {"TALE_MODELS__TASK": model.spec, "TALE_QUEUE__WORKERS": "1"}
        with _daemon(env) as d:
            task_id = _paused_task(d, model)
            repo = d.home.data / "checkpoints.git"
            named = damage(repo, task_id)
            d.call("resume_task", id=task_id)
            damaged = d.wait_for(task_id, timeout=30)
            after = d.wait_for(d.call("submit_task", text="Say hello")["id"], timeout=30)
            log = d.log_text()
    assert damaged["state"] == "failed"
    assert str(repo) in damaged["error"] and named in damaged["error"], damaged["error"]
    assert after["state"] == "completed"
    assert "Traceback" in log


def test_a_queued_task_whose_record_is_damaged_fails_and_the_queue_moves_on() -> None:
    """A queued task whose stored record cannot be read fails when claimed, saying so,
    instead of stopping every claim; the task behind it runs."""
    with scripted_server(SCRIPT, delay=0.05) as model:
        env = {"TALE_MODELS__TASK": model.spec, "TALE_QUEUE__WORKERS": "1"}
        with _daemon(env) as d:
            busy = d.call("submit_task", text=STORY)["id"]
            _wait("answering", lambda: model.chats() >= 1)
            damaged = d.call("submit_task", text="Say hello")["id"]
            behind = d.call("submit_task", text="Say hello again")["id"]
            db = sqlite3.connect(d.home.data / "tale.db", timeout=10)
            with db:
                db.execute("UPDATE tasks SET criteria = '[not json' WHERE id = ?", (damaged,))
            tasks = [d.wait_for(t, timeout=60) for t in (busy, behind)]
            # Not through the daemon: the record cannot be read into a task.
            state, error = db.execute(
                "SELECT state, error FROM tasks WHERE id = ?", (damaged,)
            ).fetchone()
            db.close()
    assert [t["state"] for t in tasks] == ["completed", "completed"]
    assert state == "failed"
    assert "its record in" in error and "is damaged" in error, error


# -- full disks -----------------------------------------------------------------------


def test_a_full_checkpoint_disk_parks_tasks_until_space_returns() -> None:
    """With the checkpoint disk full, acknowledged tasks wait (saying which disk is full,
    the workers reported blocked, not dead) and all complete once space returns."""
    with scripted_server({}) as model:
        env = {"TALE_MODELS__TASK": model.spec, "TALE_QUEUE__WORKERS": "2"}
        with _daemon(env, mount=("checkpoints.git", 4)) as d:
            repo = d.home.data / "checkpoints.git"
            d.wait_for(d.call("submit_task", text="warm up")["id"])
            filler = _fill(repo)
            ids = [d.call("submit_task", text=f"say hello {i}")["id"] for i in range(20)]

            def parked() -> bool:
                waiting = d.call("list_tasks", state="waiting")["tasks"]
                return any(
                    f"the disk holding {repo}" in t["transitions"][-1]["reason"] for t in waiting
                )

            _wait("parked", parked)
            workers = _workers(d)
            shown = d.home.tale("daemon", "status").stdout
            listed = {t["id"] for t in d.call("list_tasks", limit=100)["tasks"]}
            filler.unlink()
            tasks = [d.wait_for(t, timeout=120) for t in ids]
    assert workers["alive"] == 2, workers
    assert workers["down"] == [] and workers["parked"], workers
    assert all("is full" in b["reason"] for b in workers["blocked"]), workers
    assert f"blocked: task {workers['parked'][0]['id']} parked: the disk holding" in shown, shown
    assert set(ids) <= listed
    assert [t["state"] for t in tasks] == ["completed"] * len(ids)


def test_a_full_database_disk_refuses_submits_saying_so_and_work_resumes_by_itself() -> None:
    """With the data disk full, `tale submit` fails saying which disk is full (no driver
    text), every acknowledged task stays, and the queue drains once space returns."""
    with scripted_server({"hello": "Hello there, my friend."}, delay=0.05) as model:
        env = {"TALE_MODELS__TASK": model.spec, "TALE_QUEUE__WORKERS": "2"}
        with _daemon(env, mount=("", 16)) as d:
            ids = [d.call("submit_task", text=f"[[script:hello]] {i}")["id"] for i in range(10)]
            _wait("running", lambda: model.chats() >= 1)
            filler = _fill(d.home.data)
            refused = d.home.tale("submit", "one more")
            time.sleep(2)  # the workers run into the full disk meanwhile
            listed = {t["id"] for t in d.call("list_tasks", limit=100)["tasks"]}
            status = d.call("daemon_status")
            filler.unlink()
            tasks = [d.wait_for(t, timeout=120) for t in ids]
            later = d.wait_for(d.call("submit_task", text="and now")["id"], timeout=60)
    db = d.home.data / "tale.db"
    assert refused.returncode == 1, refused
    assert refused.stderr.strip() == f"tale: the disk holding {db} is full", refused.stderr
    assert set(ids) <= listed
    assert status["workers"]["down"] == [], status["workers"]
    assert [t["state"] for t in tasks] == ["completed"] * len(ids)
    assert later["state"] == "completed"


# -- crashes ----------------------------------------------------------------------


def _crash_while_running(
    d: Daemon, model: ScriptedServer, task_id: str, sig: int, times: int
) -> None:
    """``times`` over: once the task's model call is under way, kill the daemon with
    ``sig`` and start it again."""
    asked = 0

    def answering() -> bool:
        return model.chats() > asked and _state(d, task_id)["state"] == "running"

    for _ in range(times):
        _wait("answering", answering)
        asked = model.chats()
        assert d.proc is not None
        os.kill(d.proc.pid, sig)
        assert d.proc.wait(30) == -sig
        d.start()


def test_a_task_the_daemon_keeps_crashing_on_is_quarantined() -> None:
    """A task running each time the daemon died of a fatal signal is failed as quarantined
    after runner.quarantine_after crashes, and the task queued behind it runs."""
    with scripted_server(SCRIPT, delay=0.2) as model:
        env = {
            "TALE_MODELS__TASK": model.spec,
            "TALE_QUEUE__WORKERS": "1",
            "TALE_RUNNER__QUARANTINE_AFTER": "2",
        }
        with _daemon(env) as d:
            suspect = d.call("submit_task", text=STORY, priority=90)["id"]
            behind = d.call("submit_task", text="Say hello", priority=10)["id"]
            _crash_while_running(d, model, suspect, signal.SIGSEGV, times=2)
            quarantined = d.wait_for(suspect, timeout=30)
            model.delay = 0
            after = d.wait_for(behind, timeout=60)
    assert quarantined["state"] == "failed"
    assert "quarantined: the daemon crashed 2 times" in quarantined["error"], quarantined
    assert "Segmentation fault" in quarantined["error"]
    assert after["state"] == "completed"


def test_kill_9_never_counts_towards_quarantine() -> None:
    """A kill (kill -9, the OOM killer) is not the task's doing: the task runs again."""
    with scripted_server(SCRIPT, delay=0.2) as model:
        env = {
            "TALE_MODELS__TASK": model.spec,
            "TALE_QUEUE__WORKERS": "1",
            "TALE_RUNNER__QUARANTINE_AFTER": "2",
        }
        with _daemon(env) as d:
            task_id = d.call("submit_task", text=STORY)["id"]
            _crash_while_running(d, model, task_id, signal.SIGKILL, times=2)
            model.delay = 0
            task = d.wait_for(task_id, timeout=60)
    assert task["state"] == "completed", task


def _restore_in_background(d: Daemon, task_id: str) -> threading.Thread:
    """Ask for the task's restore from another thread (the daemon may be killed under it)."""

    def restore() -> None:
        with contextlib.suppress(Exception):
            d.call("restore_checkpoint", id=task_id)

    caller = threading.Thread(target=restore)
    caller.start()
    return caller


def test_kill_9_during_a_restore_never_leaves_it_half_done() -> None:
    """kill -9 at seeded moments during restore_checkpoint: after the restart, a task has
    a restore checkpoint exactly when the store no longer calls it paused."""
    rng = random.Random(20261207)
    with scripted_server(SCRIPT, delay=0.05) as model:
        env = {"TALE_MODELS__TASK": model.spec, "TALE_QUEUE__WORKERS": "1"}
        with _daemon(env) as d:
            paused = [_paused_task(d, model) for _ in range(16)]
            # How long a whole restore takes here, from asking to the answer: the kills
            # land where its writes are (on the old code, a quarter of them split it).
            took = []
            for task_id in paused[:2]:
                started = time.perf_counter()
                _restore_in_background(d, task_id).join(30)
                took.append(time.perf_counter() - started)
            whole = max(took)
            outcomes = []
            for task_id in paused[2:]:
                caller = _restore_in_background(d, task_id)
                time.sleep(rng.uniform(0.35, 0.9) * whole)
                d.kill9()
                caller.join(10)
                d.start()
                state = _state(d, task_id)["state"]
                steps = [c["step"] for c in d.call("list_checkpoints", id=task_id)["checkpoints"]]
                outcomes.append((task_id, state, "restore" in steps))
    half_done = [(t, s, r) for t, s, r in outcomes if r != (s != "paused")]
    assert half_done == [], (
        f"half-done restores (task, state, has a restore checkpoint): {half_done}"
    )


def test_a_deep_scratch_dir_left_by_a_killed_run_does_not_stop_the_next_start() -> None:
    """A directory chain 1,100 deep left in the scratch dir (a daemon killed mid-gate)
    neither stops start-up (the data dir's mode repair walks the tree) nor stays."""
    home = Home()
    left = home.data / "scratch" / "tale-sandbox-leftover"
    left.mkdir(parents=True)
    here = os.getcwd()
    try:
        os.chdir(left)
        for _ in range(1100):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(here)
    daemon = Daemon(home)
    try:
        daemon.start()
        task_id = daemon.call("submit_task", text="Say hi")["id"]
        assert daemon.wait_for(task_id)["state"] == "completed"
        assert not left.exists()
    finally:
        daemon.kill_if_running()
        home.cleanup()
