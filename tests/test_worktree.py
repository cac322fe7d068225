"""An acting task given the top of a git work tree works in a git worktree on branch
``tale/<id>``, end to end: the real daemon, real git repositories in temp dirs, the real
sandbox, and the scripted OpenAI-compatible stand-in as the task model (it answers with
the tool calls a test scripts; see tests/test_acting.py)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taled.tools import worktree
from tests.harness import Daemon, Home, git
from tests.standins.openai_scripted import ScriptedServer, scripted_server

CONFIG = """
[tools.agent]
max_steps = 6

[tools.policy]
"run:cp" = "allow"
"""
# Every hook git could run on a commit or a checkout: each would leave a marker file.
HOOKS = ("pre-commit", "commit-msg", "post-commit", "post-checkout", "reference-transaction")


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _finish(result: str) -> dict[str, Any]:
    return _call("finish", result=result)


def _script(evil: Path) -> dict[str, Any]:
    return {
        "git-write": [
            _call("write_file", path="task.txt", content="the task's work\n"),
            _finish("wrote task.txt\nand nothing else"),
        ],
        "git-evil": [
            _call("write_file", path="gitfile.txt", content=f"gitdir: {evil}\n"),
            _call("run", command="cp gitfile.txt .git"),
            _finish("pointed .git elsewhere"),
        ],
        "git-steps": [
            _call("write_file", path="one.txt", content="1\n"),
            _call("write_file", path="two.txt", content="2\n"),
            _call("run", command="echo three > three.txt"),
            _finish("three files"),
        ],
        "git-fail": [
            _call("write_file", path="partial.txt", content="half done\n"),
            *[_call("read_file", path=f"missing-{i}.txt") for i in range(10)],
        ],
    }


def _hooks(git_dir: Path, marker: Path) -> None:
    """Install every hook in HOOKS in ``git_dir``, each touching ``marker`` if run."""
    (git_dir / "hooks").mkdir(exist_ok=True)
    for name in HOOKS:
        hook = git_dir / "hooks" / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(0o755)


@pytest.fixture(scope="module")
def home() -> Iterator[Home]:
    made = Home()
    made.write_config(CONFIG)
    yield made
    made.cleanup()


@pytest.fixture(scope="module")
def evil(home: Home) -> Path:
    """A repository a model might point the workspace's .git at: hooks and an fsmonitor
    that would each leave a marker if git ever used it."""
    repo = home.root / "evil"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    marker = home.root / "evil-ran"
    _hooks(repo / ".git", marker)
    monitor = repo / "monitor.sh"
    monitor.write_text(f"#!/bin/sh\necho fsmonitor >> {marker}\n")
    monitor.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(monitor))
    return repo / ".git"


@pytest.fixture(scope="module")
def acting(home: Home, evil: Path) -> Iterator[tuple[Daemon, ScriptedServer]]:
    with scripted_server(_script(evil)) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        daemon = Daemon(home).start()
        try:
            yield daemon, server
        finally:
            daemon.kill_if_running()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A user's repository: one commit on main, then an uncommitted edit and an untracked
    file; every hook installed, leaving ``hooks-ran`` beside it if one runs."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "notes.md").write_text("a draft note\n")
    (root / "keep.txt").write_text("committed\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "the user's commit")
    (root / "notes.md").write_text("a draft note, edited\n")
    (root / "new.txt").write_text("not yet added\n")
    _hooks(root / ".git", tmp_path / "hooks-ran")
    return root


def _workspace(home: Home, task_id: str) -> Path:
    return home.data / "workspaces" / task_id


def _as_seen(repo: Path) -> tuple[str, str, str, dict[str, str]]:
    """The user's branch, HEAD, status and files: what a task must not change."""
    files = {
        p.relative_to(repo).as_posix(): p.read_text()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(repo).parts
    }
    return (
        git(repo, "symbolic-ref", "HEAD"),
        git(repo, "rev-parse", "HEAD"),
        git(repo, "status", "--porcelain"),
        files,
    )


def test_a_task_in_a_repository_works_in_a_worktree_on_its_own_branch(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """The worktree is listed by git, on branch tale/<id>, and holds what the user sees
    (the uncommitted edit and the untracked file included)."""
    daemon, _server = acting
    before = _as_seen(repo)
    task = daemon.call("submit_task", text="[[script:git-write]] add a file", workspace=str(repo))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    workspace = _workspace(home, task["id"])
    listed = git(repo, "worktree", "list", "--porcelain")
    assert f"worktree {workspace}\n" in listed
    assert f"branch refs/heads/tale/{task['id']}\n" in listed
    assert (workspace / "notes.md").read_text() == "a draft note, edited\n"
    assert (workspace / "new.txt").read_text() == "not yet added\n"
    assert (workspace / ".git").is_file()
    assert _as_seen(repo) == before
    assert not (repo.parent / "hooks-ran").exists()


def test_the_result_is_committed_on_the_branch_after_the_users_uncommitted_changes(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """The branch has a commit of the user's uncommitted changes, then the task's own,
    whose diff against its parent is exactly the task's change."""
    daemon, _server = acting
    user_head = git(repo, "rev-parse", "HEAD").strip()
    task = daemon.call("submit_task", text="[[script:git-write]] add a file", workspace=str(repo))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    branch = f"tale/{task['id']}"
    subjects = git(repo, "log", "--format=%s", branch).splitlines()
    assert subjects == [
        f"tale {task['id'][:8]}: [[script:git-write]] add a file",
        f"tale: the uncommitted changes in {repo} when task {task['id']} started",
        "the user's commit",
    ]
    assert git(repo, "rev-parse", f"{branch}~2").strip() == user_head
    start = git(repo, "diff", "--name-status", f"{branch}~2", f"{branch}~1").split("\n")
    assert sorted(filter(None, start)) == ["A\tnew.txt", "M\tnotes.md"]
    work = git(repo, "diff", f"{branch}~1", branch)
    assert "+++ b/task.txt" in work and "+the task's work" in work
    assert git(repo, "diff", "--name-only", f"{branch}~1", branch) == "task.txt\n"
    body = git(repo, "log", "-1", "--format=%B", branch)
    assert "completed" in body and "wrote task.txt\nand nothing else" in body
    assert git(repo, "log", "-1", "--format=%an <%ae>", branch) == "tale <tale@localhost>\n"
    assert not (repo.parent / "hooks-ran").exists()


def test_a_clean_checkout_starts_from_head_itself(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """With nothing uncommitted, the task's commit follows the user's HEAD directly."""
    daemon, _server = acting
    git(repo, "add", "-A")
    git(repo, "-c", "core.hooksPath=/dev/null", "commit", "-q", "-m", "everything")
    task = daemon.call("submit_task", text="[[script:git-write]] add a file", workspace=str(repo))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    branch = f"tale/{task['id']}"
    assert git(repo, "rev-parse", f"{branch}~1") == git(repo, "rev-parse", "HEAD")


def test_apply_brings_a_worktree_tasks_change_into_the_directory(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """tale diff and tale apply work as for a managed copy; the user's branch and HEAD
    stay where they were."""
    daemon, _server = acting
    head = git(repo, "rev-parse", "HEAD")
    task = daemon.call("submit_task", text="[[script:git-write]] add a file", workspace=str(repo))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    diff = home.tale("diff", task["id"])
    assert diff.returncode == 0, diff.stderr
    assert "+++ b/task.txt" in diff.stdout and "notes.md" not in diff.stdout
    applied = home.tale("apply", task["id"])
    assert applied.returncode == 0, applied.stderr
    assert (repo / "task.txt").read_text() == "the task's work\n"
    assert (repo / "notes.md").read_text() == "a draft note, edited\n"
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main\n"


@pytest.mark.parametrize("kind", ["no commits", "plain directory", "inside a repository"])
def test_what_is_not_a_repositorys_top_gets_a_managed_copy(
    home: Home, acting: tuple[Daemon, ScriptedServer], tmp_path: Path, kind: str
) -> None:
    """A repository with no commit, a directory outside git, or a directory below a work
    tree's top: the task works in a managed copy, and no branch is made."""
    daemon, _server = acting
    top = tmp_path / "project"
    top.mkdir()
    target = top
    if kind == "no commits":
        git(top, "init", "-q", "-b", "main")
    elif kind == "inside a repository":
        git(top, "init", "-q", "-b", "main")
        (top / "sub").mkdir()
        (top / "sub" / "a.txt").write_text("a\n")
        git(top, "add", "-A")
        git(top, "commit", "-q", "-m", "one")
        target = top / "sub"
    (target / "notes.md").write_text("a note\n")
    task = daemon.call("submit_task", text="[[script:git-write]] add a file", workspace=str(target))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    workspace = _workspace(home, task["id"])
    assert (workspace / "notes.md").read_text() == "a note\n"
    assert (workspace / "task.txt").exists()
    assert not (workspace / ".git").exists()
    if kind != "plain directory":
        assert f"tale/{task['id']}" not in git(top, "branch", "--list", "--all")
        assert git(top, "worktree", "list").count("\n") == 1


def test_a_model_that_rewrites_the_git_file_does_not_steer_git(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path, evil: Path
) -> None:
    """A command in the sandbox points the workspace's .git at another repository with
    hooks and an fsmonitor: tale still commits to the user's repository, runs nothing of
    the other's, and leaves the other untouched."""
    daemon, _server = acting
    task = daemon.call("submit_task", text="[[script:git-evil]] misdirect", workspace=str(repo))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    workspace = _workspace(home, task["id"])
    assert (workspace / ".git").read_text() == f"gitdir: {evil}\n"  # the model did write it
    branch = f"tale/{task['id']}"
    assert git(repo, "diff", "--name-only", f"{branch}~1", branch) == "gitfile.txt\n"
    assert ".git\n" not in git(repo, "ls-tree", "-r", "--name-only", branch)
    assert not (home.root / "evil-ran").exists()
    assert not (repo.parent / "hooks-ran").exists()
    assert git(evil.parent, "rev-parse", "--verify", "-q", "HEAD", check=False) == ""
    assert "tale/" not in git(evil.parent, "branch", "--list", "--all")


def test_restore_keeps_the_worktrees_git_file(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """Rewinding a worktree task's files leaves its .git file as git wrote it: the
    workspace is still a worktree of the user's repository afterwards."""
    daemon, _server = acting
    task = daemon.call("submit_task", text="[[script:git-steps]] make three", workspace=str(repo))
    daemon.wait_for(task["id"], ("waiting",))  # one.txt and two.txt written; run asks
    workspace = _workspace(home, task["id"])
    link = (workspace / ".git").read_text()
    daemon.call("pause_task", id=task["id"])
    history = daemon.call("list_checkpoints", id=task["id"])["checkpoints"]
    first_write = next(
        c for c in reversed(history) if c["kind"] == "tool-done" and c["step"] == "write_file"
    )
    restored = home.tale("restore", task["id"], first_write["commit"][:12])
    assert restored.returncode == 0, restored.stderr
    assert (workspace / ".git").read_text() == link
    # The task carries on from the restore (the script writes two.txt again) and asks.
    daemon.wait_for(task["id"], ("waiting",))
    assert (workspace / ".git").read_text() == link
    assert git(workspace, "rev-parse", "--abbrev-ref", "HEAD") == f"tale/{task['id']}\n"
    daemon.call("cancel_task", id=task["id"])


def test_a_failed_task_leaves_its_work_on_its_branch(
    home: Home, acting: tuple[Daemon, ScriptedServer], repo: Path
) -> None:
    """A task that runs out of steps fails, and what it did so far is committed, saying so."""
    daemon, _server = acting
    task = daemon.call("submit_task", text="[[script:git-fail]] never ends", workspace=str(repo))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "failed", done
    branch = f"tale/{task['id']}"
    assert git(repo, "diff", "--name-only", f"{branch}~1", branch) == "partial.txt\n"
    body = git(repo, "log", "-1", "--format=%B", branch)
    assert "failed" in body and "tools.agent.max_steps" in body


# --- the module on its own: real git, no daemon ------------------------------------------


def test_a_worktree_made_again_after_a_crash_resets_its_branch(repo: Path, tmp_path: Path) -> None:
    """A task's workspace made again (its first attempt died before its first checkpoint)
    gets a fresh worktree: the stale one is forgotten and the branch reset to HEAD."""
    root = tmp_path / "workspaces" / "abc123"

    async def make() -> Path:
        top = await worktree.detect(repo)
        assert top == repo.resolve()
        return await worktree.add(top, root, worktree.branch_for("abc123"))

    git_dir = asyncio.run(make())
    (root / "stray.txt").write_text("from the first attempt\n")
    asyncio.run(worktree.commit_result(git_dir, root, "first attempt"))
    shutil.rmtree(root)  # what create_workspace does with a crashed attempt's leftovers
    again = asyncio.run(make())
    assert again == git_dir
    assert git(repo, "rev-parse", "tale/abc123") == git(repo, "rev-parse", "HEAD")
    assert git(repo, "worktree", "list").count("\n") == 2


def test_without_git_on_path_there_is_no_worktree(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No git installed: detect says None, and the caller copies instead."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert asyncio.run(worktree.detect(repo)) is None
