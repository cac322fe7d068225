"""Planned acting tasks end to end: a complex acting task is planned into steps, each
step is its own agent loop in the task's one workspace, never two at once (the workspace
lock), and the task then checks the whole under its done-criteria. The real daemon, store,
checkpoints and sandbox; the scripted OpenAI-compatible stand-in as the task model (it
answers the plan request with a plan and each step with its calls).

The stand-in answers the newest user message that names ``[[script:NAME]]``: each step's
instruction names its own entry, and a step's finish result names ``check``, the entry
the task's own check loop is answered from (it reads the steps' results last).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, Home, git
from tests.standins.openai_scripted import ScriptedServer, scripted_server


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _plan(*steps: tuple[str, str, str]) -> str:
    return json.dumps(
        {"steps": [{"id": sid, "title": title, "do": do, "needs": []} for sid, title, do in steps]}
    )


# Independent steps (no needs): with two workers they would run at once but for the lock.
# Each brackets its work with lines in order.log and sleeps between them.
SCRIPT: dict[str, Any] = {
    "plan": [
        _plan(
            ("s1", "Write greet.py", "[[script:s1]] Write greet.py with a greet function."),
            ("s2", "Write its test", "[[script:s2]] Write test_greet.py testing greet."),
        )
    ],
    "s1": [
        _call("run", command="echo s1-start >> order.log; sleep 1; echo s1-end >> order.log"),
        _call("write_file", path="greet.py", content="def greet(n):\n    return 'hello ' + n\n"),
        _call("finish", result="wrote greet.py [[script:check]]"),
    ],
    "s2": [
        _call("run", command="echo s2-start >> order.log; sleep 1; echo s2-end >> order.log"),
        _call(
            "write_file",
            path="test_greet.py",
            content="from greet import greet\nassert greet('x') == 'hello x'\n",
        ),
        _call("finish", result="wrote test_greet.py [[script:check]]"),
    ],
    "check": [
        _call("run", command="python3 test_greet.py"),
        _call("finish", result="greet.py and its passing test"),
    ],
    "ask-plan": [
        _plan(
            ("s1", "Clean up", "[[script:ask-s1]] Remove the old build output."),
            ("s2", "Write notes", "[[script:ask-s2]] Write notes.txt."),
        )
    ],
    "git-plan": [
        json.dumps(
            {
                "steps": [
                    {"id": "s1", "title": "Start", "do": "[[script:git-s1]] Start.", "needs": []},
                    {"id": "s2", "title": "End", "do": "[[script:s2]] End.", "needs": ["s1"]},
                ]
            }
        )
    ],
    # Writes a file, then repeats itself until the loop stops it: the step fails.
    "git-s1": [
        _call("write_file", path="partial.txt", content="half\n"),
        *[_call("list_files", path=".")] * 5,
    ],
    "ask-s1": [_call("run", command="rm -f old.txt"), _call("finish", result="cleaned")],
    "ask-s2": [
        _call("write_file", path="notes.txt", content="notes\n"),
        _call("finish", result="wrote notes"),
    ],
}

TASK = "[[script:plan]] Write a greeting module and a test for it, then make the test pass"
ASK_TASK = "[[script:ask-plan]] Remove the old build output and then write notes.txt for it"

CONFIG = """
[queue]
workers = 2

[tools.policy]
run = "allow"
"run:rm" = "ask"
"""


@pytest.fixture(scope="module")
def planned() -> Iterator[tuple[Daemon, ScriptedServer, Home]]:
    home = Home()
    home.write_config(CONFIG)
    with scripted_server(SCRIPT) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        home.env["TALE_PLANNER__DECOMPOSE"] = "true"  # the harness turns planning off
        daemon = Daemon(home).start()
        try:
            yield daemon, server, home
        finally:
            daemon.kill_if_running()
            home.cleanup()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "README.md").write_text("greetings\n")
    return root


def _submit(daemon: Daemon, text: str, project: Path) -> dict[str, Any]:
    return daemon.call(
        "submit_task", text=text, workspace=str(project), criteria=["run:python3 test_greet.py"]
    )


def test_a_complex_acting_task_is_planned_into_steps_that_act_in_its_workspace(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = planned
    task = _submit(daemon, TASK, project)
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert done["result"] == "greet.py and its passing test"
    steps = done["subtasks"]
    assert [s["step"] for s in steps] == ["s1", "s2"]
    assert all(s["state"] == "completed" for s in steps), steps
    assert [c["tool"] for c in steps[0]["tool_calls"]] == ["run", "write_file", "finish"]
    workspace = home.data / "workspaces" / task["id"]
    assert (workspace / "greet.py").exists() and (workspace / "test_greet.py").exists()
    # No step has a workspace of its own: they all worked in the task's.
    assert not any((home.data / "workspaces" / s["id"]).exists() for s in steps)
    assert [c["tool"] for c in done["tool_calls"]] == ["run", "finish"]
    assert not (project / "greet.py").exists()


def test_steps_that_share_a_workspace_never_run_at_the_same_time(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = planned
    task = _submit(daemon, TASK, project)
    assert daemon.wait_for(task["id"])["state"] == "completed"
    lines = (home.data / "workspaces" / task["id"] / "order.log").read_text().split()
    # One step's start and end are next to each other: the other never ran in between.
    assert sorted([lines[0:2], lines[2:4]]) == [["s1-start", "s1-end"], ["s2-start", "s2-end"]]


def test_the_task_checks_the_whole_after_its_steps_with_their_results(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, server, _home = planned
    task = _submit(daemon, TASK, project)
    assert daemon.wait_for(task["id"])["state"] == "completed"
    history = daemon.call("list_checkpoints", id=task["id"])["checkpoints"]
    assert any(c["step"] == "check" for c in history), [c["step"] for c in history]
    checks = [
        body
        for body in server.requests
        if any("What each step reported" in str(m.get("content")) for m in body["messages"])
    ]
    assert checks, "the check loop never ran"
    brief = str(checks[0]["messages"][-1]["content"])
    assert "wrote greet.py" in brief and "wrote test_greet.py" in brief


def test_diff_of_a_planned_task_holds_every_steps_change_and_apply_brings_it_back(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = planned
    task = _submit(daemon, TASK, project)
    daemon.wait_for(task["id"])
    diff = home.tale("diff", task["id"])
    assert diff.returncode == 0, diff.stderr
    assert "+++ b/greet.py" in diff.stdout and "+++ b/test_greet.py" in diff.stdout
    applied = home.tale("apply", task["id"])
    assert applied.returncode == 0, applied.stderr
    assert (project / "greet.py").exists() and (project / "test_greet.py").exists()


def _until(probe: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def _pending(daemon: Daemon, task_id: str) -> list[dict[str, Any]]:
    return _until(
        lambda: daemon.call("list_approvals", task=task_id)["approvals"],
        f"an approval for task {task_id}",
    )


def test_a_steps_approval_is_shown_for_its_task_and_answers_the_step(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = planned
    (project / "old.txt").write_text("old\n")
    task = daemon.call("submit_task", text=ASK_TASK, workspace=str(project))
    pending = _pending(daemon, task["id"])
    assert [a["summary"] for a in pending] == ["run: rm -f old.txt"]
    assert pending[0]["task_id"] != task["id"]  # the step's, shown for its task
    shown = home.tale("status", task["id"])
    assert pending[0]["id"][:8] in shown.stdout, shown.stdout
    daemon.call("approve", id=pending[0]["id"])
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    workspace = home.data / "workspaces" / task["id"]
    assert not (workspace / "old.txt").exists() and (workspace / "notes.txt").exists()


def test_restoring_a_planned_task_to_its_plan_rewinds_the_files_its_steps_made(
    planned: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = planned
    (project / "old.txt").write_text("old\n")
    task = daemon.call("submit_task", text=ASK_TASK, workspace=str(project))
    workspace = home.data / "workspaces" / task["id"]
    first = _pending(daemon, task["id"])[0]
    # The other step does not wait for the one that waits for a person.
    _until(lambda: (workspace / "notes.txt").exists(), "the second step wrote notes.txt")
    _until(
        lambda: any(
            c["step"] == "s2 done"
            for c in daemon.call("list_checkpoints", id=task["id"])["checkpoints"]
        ),
        "the second step's result reached its task",
    )
    daemon.call("pause_task", id=task["id"])
    history = daemon.call("list_checkpoints", id=task["id"])["checkpoints"]
    plan = next(c for c in history if c["kind"] == "plan")
    restored = home.tale("restore", task["id"], plan["commit"][:12])
    assert restored.returncode == 0, restored.stderr
    assert not (workspace / "notes.txt").exists()
    assert (workspace / "old.txt").exists()
    # The abandoned round's step and its approval are gone; the new round asks again.
    again = _until(
        lambda: [
            a
            for a in daemon.call("list_approvals", task=task["id"])["approvals"]
            if a["id"] != first["id"]
        ],
        "the new round's approval",
    )
    assert [a["id"] for a in daemon.call("list_approvals")["approvals"]] == [again[0]["id"]]
    daemon.call("approve", id=again[0]["id"])
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert (workspace / "notes.txt").exists() and not (workspace / "old.txt").exists()


def test_a_planned_task_whose_step_fails_leaves_the_steps_work_on_its_branch(
    planned: tuple[Daemon, ScriptedServer, Home], tmp_path: Path
) -> None:
    daemon, _server, _home = planned
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("hello\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    text = "[[script:git-plan]] Start the work and then finish it, then check both parts"
    task = daemon.call("submit_task", text=text, workspace=str(repo))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "failed", done
    branch = f"tale/{task['id']}"
    assert git(repo, "diff", "--name-only", f"{branch}~1", branch) == "partial.txt\n"
    assert "failed" in git(repo, "log", "-1", "--format=%B", branch)
