"""The agent loop with the real embedded model (SmolLM2-135M, llama.cpp, a JSON-Schema
grammar for its calls): the same path as tests/test_acting.py without a stand-in.

What is asserted is the machinery, not the 135M model's competence: its calls parse
and name real tools, the loop ends (done, or failed by its budget, saying so), every
call is in the ledger once, and the checkpoints hold the workspace.
"""

from __future__ import annotations

from pathlib import Path

from tests.harness import Daemon, Home

CONFIG = """
[tools.policy]
run = "deny"

[tools.agent]
max_steps = 5
max_tokens = 96
"""

BUILTINS = {"list_files", "read_file", "write_file", "edit_file", "search", "run", "finish"}
BUILTINS |= {"ask_user"}


def test_the_embedded_model_drives_the_loop_to_an_end_within_its_budget(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("# Notes\n\nnothing yet\n")
    home = Home()
    home.write_config(CONFIG)
    daemon = Daemon(home).start()
    try:
        task = daemon.call(
            "submit_task",
            text="Create a file named hello.txt containing the text: hi",
            workspace=str(project),
        )
        done = daemon.wait_for(task["id"], ("completed", "failed", "waiting"), timeout=600)
        if done["state"] == "waiting":  # it asked a question: answer, and let it end
            for pending in daemon.call("list_approvals", task=task["id"])["approvals"]:
                daemon.call("answer", id=pending["id"], text="just do it")
            done = daemon.wait_for(task["id"], ("completed", "failed"), timeout=600)
        calls = done["tool_calls"]
        assert done["state"] in ("completed", "failed")
        if done["state"] == "failed":
            assert "tools.agent" in done["error"], done["error"]
        assert 1 <= len(calls) <= 5 + 1
        assert {c["tool"] for c in calls} <= BUILTINS, calls
        assert len({c["call_id"] for c in calls}) == len(calls)
        # The grammar makes calls readable (only one cut off by max_tokens is not).
        assert any(not (c.get("detail") or "").startswith("your call") for c in calls), calls
        kinds = [c["kind"] for c in daemon.call("list_checkpoints", id=task["id"])["checkpoints"]]
        assert "act-start" in kinds and "act-turn" in kinds
        assert isinstance(daemon.call("task_diff", id=task["id"])["diff"], str)
        assert (project / "notes.md").read_text() == "# Notes\n\nnothing yet\n"
    finally:
        daemon.kill_if_running()
        home.cleanup()


def test_the_embedded_model_plans_an_acting_task_whose_steps_act_in_one_workspace(
    tmp_path: Path,
) -> None:
    """A complex acting task: the 135M model's constrained plan, a loop per step in the
    task's workspace, then the task's own check; whatever the model writes, it ends."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("# Notes\n")
    home = Home()
    home.write_config(CONFIG + "\n[planner]\nmax_steps = 2\nplan_attempts = 1\n")
    home.env["TALE_PLANNER__DECOMPOSE"] = "true"
    daemon = Daemon(home).start()
    try:
        task = daemon.call(
            "submit_task",
            text="Write a greeting module and a test for it, then make the test pass",
            workspace=str(project),
        )
        done = daemon.wait_for(task["id"], ("completed", "failed", "waiting"), timeout=900)
        while done["state"] == "waiting":  # a step asked a question: answer it
            for pending in daemon.call("list_approvals", task=task["id"])["approvals"]:
                daemon.call("answer", id=pending["id"], text="just do it")
            done = daemon.wait_for(task["id"], ("completed", "failed", "waiting"), timeout=900)
        steps = done["subtasks"]
        assert len(steps) == 2, done
        assert all(s["act"] for s in steps)
        workspace = home.data / "workspaces" / task["id"]
        assert workspace.is_dir()
        assert not any((home.data / "workspaces" / s["id"]).exists() for s in steps)
        for step in steps:
            assert {c["tool"] for c in step["tool_calls"]} <= BUILTINS, step
        kinds = [c["kind"] for c in daemon.call("list_checkpoints", id=task["id"])["checkpoints"]]
        assert "plan" in kinds and "act-start" in kinds
        assert (project / "notes.md").read_text() == "# Notes\n"
    finally:
        daemon.kill_if_running()
        home.cleanup()
