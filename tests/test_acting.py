"""Acting tasks end to end: the real daemon on its socket, a real SQLite file, the real
dulwich checkpoint repository and the real sandbox; the task model is the scripted
OpenAI-compatible stand-in (tests/standins/openai_scripted.py), which answers with the
tool calls a test scripts: no real model can be made to call a given tool on demand.
The same path with the real embedded model is tested at the end of this file.

A script entry is a list of turns; the turn answered is the number of tool results in
the request, so a daemon killed and restarted mid-loop gets the right next turn.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tale_client.rpc import RpcError
from tests.harness import Daemon, Home
from tests.standins.openai_scripted import ScriptedServer, scripted_server

# The slow command sleeps a time no other test run on this machine sleeps, so looking
# for it after a kill finds this run's process only.
SLEEP = f"sleep {60 + secrets.randbelow(10**6) / 10**7:.7f}"


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _finish(result: str) -> dict[str, Any]:
    return _call("finish", result=result)


SCRIPT: dict[str, Any] = {
    "write": [
        _call("write_file", path="hello.txt", content="hello\n"),
        _call("edit_file", path="notes.md", old_text="draft", new_text="final"),
        _finish("wrote hello.txt and finalised notes.md"),
    ],
    "run": [_call("run", command="touch ran.txt"), _finish("ran it")],
    "run-again": [_call("run", command="touch again.txt"), _finish("ran it again")],
    "deny": [_call("run", command="rm -rf build"), _finish("could not")],
    "mistakes": [
        _call("no_such_tool", x=1),
        _call("write_file", path="a.txt"),
        {"raw_arguments": "{not json", "name": "write_file"},
        _call("read_file", path="../../etc/passwd"),
        _finish("survived"),
    ],
    "loop": [_call("read_file", path=f"missing-{i}.txt") for i in range(50)],
    "repeat": [_call("list_files", path=".")] * 50,
    "repeat-missing": [_call("read_file", path="missing.txt")] * 50,
    "slow": [
        _call("run", command=f"echo start >> log.txt; {SLEEP}; echo end >> log.txt"),
        _finish("after the interruption"),
    ],
    "ask": [_call("ask_user", question="Which greeting?"), _finish("asked")],
    "gate": [
        _call("write_file", path="ok.py", content="raise SystemExit(1)\n"),
        _finish("first try"),
        _call("write_file", path="ok.py", content="raise SystemExit(0)\n"),
        _finish("fixed"),
    ],
    "mcp": [_call("bench.add", a=2, b=3), _finish("added")],
    "mcp-ask": [_call("bench.wipe", path="old.txt"), _finish("wiped")],
    "mcp-crash": [_call("bench.crash"), _finish("after the crash")],
    "gone": [
        _call("write_file", path="a.txt", content="a\n"),
        _call("run", command="mkdir b"),
        _finish("never"),
    ],
    "secret": [_call("read_file", path=".env"), _finish("read it")],
    "classified": [_call("write_file", path="hi.txt", content="hi\n"), _finish("made hi.txt")],
    "steps": [
        _call("write_file", path="one.txt", content="1\n"),
        _call("write_file", path="two.txt", content="2\n"),
        _call("run", command="echo three > three.txt"),
        _finish("three files"),
    ],
}

CONFIG = """
[tools.agent]
max_steps = 8

[tools.policy]
"bench.add" = "allow"

[tools.mcp.bench]
command = "{python}"
args = ["{server}"]
env = {{ WORKBENCH_RUNS = "{runs}" }}
"""
WORKBENCH = Path(__file__).resolve().parent / "mcp_servers" / "workbench.py"


@pytest.fixture(scope="module")
def acting() -> Iterator[tuple[Daemon, ScriptedServer, Home]]:
    home = Home()
    home.write_config(
        CONFIG.format(python=sys.executable, server=WORKBENCH, runs=home.root / "mcp-runs.log")
    )
    with scripted_server(SCRIPT) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        daemon = Daemon(home).start()
        try:
            yield daemon, server, home
        finally:
            daemon.kill_if_running()
            home.cleanup()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project directory."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "notes.md").write_text("a draft note\n")
    (root / "keep.txt").write_text("untouched\n")
    return root


def _tool_messages(server: ScriptedServer, task_text_mark: str) -> list[str]:
    """The tool results the model was sent, in the latest request for a task."""
    for body in reversed(server.requests):
        texts = [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "user"]
        if any(task_text_mark in t for t in texts):
            return [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "tool"]
    return []


def _workspace(home: Home, task_id: str) -> Path:
    return home.data / "workspaces" / task_id


def _approval(daemon: Daemon, task_id: str) -> dict[str, Any]:
    daemon.wait_for(task_id, ("waiting",))
    pending = daemon.call("list_approvals", task=task_id)["approvals"]
    assert len(pending) == 1, pending
    return pending[0]


def test_a_task_in_a_directory_changes_its_copy_and_not_the_original(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert done["result"] == "wrote hello.txt and finalised notes.md"
    assert not (project / "hello.txt").exists()
    assert (project / "notes.md").read_text() == "a draft note\n"
    copy = _workspace(home, task["id"])
    assert (copy / "hello.txt").read_text() == "hello\n"
    assert (copy / "notes.md").read_text() == "a final note\n"
    assert [c["tool"] for c in done["tool_calls"]] == ["write_file", "edit_file", "finish"]


def test_the_learning_engine_predicts_an_acting_tasks_steps_from_similar_ones(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, _home = acting
    for _ in range(2):
        done = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
        assert daemon.wait_for(done["id"])["state"] == "completed"
    task = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
    finished = daemon.wait_for(task["id"])
    assert finished["estimate"]["predicted_steps"] == 3  # write, edit, finish


def test_diff_shows_the_change_and_apply_brings_it_back(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
    daemon.wait_for(task["id"])
    diff = home.tale("diff", task["id"])
    assert diff.returncode == 0, diff.stderr
    assert "+++ b/hello.txt" in diff.stdout
    assert "-a draft note" in diff.stdout and "+a final note" in diff.stdout
    applied = home.tale("apply", task["id"])
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == f"applied 2 changes to {project}"
    assert (project / "hello.txt").read_text() == "hello\n"
    assert (project / "notes.md").read_text() == "a final note\n"
    assert (project / "keep.txt").read_text() == "untouched\n"


def test_diff_and_apply_say_when_a_task_changed_nothing(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    """A task that only looked: diff and apply say it changed nothing (not that the
    directory "already has" its change), naming it by its whole id."""
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:repeat]] look around", workspace=str(project))
    daemon.wait_for(task["id"])
    diff = home.tale("diff", task["id"][:6])
    assert (diff.returncode, diff.stdout) == (0, f"task {task['id']} changed nothing\n")
    applied = home.tale("apply", task["id"][:6])
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == f"nothing to apply: task {task['id']} changed nothing\n"


def test_apply_twice_says_the_directory_already_has_the_change(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
    daemon.wait_for(task["id"])
    assert home.tale("apply", task["id"]).returncode == 0
    again = home.tale("apply", task["id"])
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"nothing to apply: {project} already has task {task['id']}'s change\n"


def test_apply_refuses_when_the_users_file_changed_and_writes_nothing(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:write]] tidy up", workspace=str(project))
    daemon.wait_for(task["id"])
    (project / "notes.md").write_text("I edited this meanwhile\n")
    applied = home.tale("apply", task["id"])
    assert applied.returncode != 0
    assert "notes.md" in applied.stderr
    assert not (project / "hello.txt").exists()
    assert (project / "notes.md").read_text() == "I edited this meanwhile\n"


def test_run_waits_for_approval_which_survives_a_restart(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    pending = _approval(daemon, task["id"])
    assert pending["summary"] == "run: touch ran.txt"
    assert pending["kind"] == "tool"
    listed = home.tale("approvals")
    assert pending["id"][:8] in listed.stdout
    assert "for you (`tale approvals`)" in home.tale("status").stdout
    daemon.stop()
    daemon.start()
    assert daemon.call("get_task", id=task["id"])["state"] == "waiting"
    again = daemon.call("list_approvals", task=task["id"])["approvals"]
    assert [a["id"] for a in again] == [pending["id"]]
    approved = home.tale("approve", pending["id"][:6])
    assert approved.returncode == 0, approved.stderr
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert (_workspace(home, task["id"]) / "ran.txt").exists()


def test_following_a_task_that_waits_for_you_keeps_hearing_from_the_daemon(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    """tale submit --wait on a task waiting for approval: the line does not change, yet
    the daemon repeats it, so the client (30 s read timeout) never gives up on it."""
    daemon, _server, _home = acting
    task = daemon.call("submit_task", text="[[script:deny]] clean the build", act=True)
    pending = _approval(daemon, task["id"])
    heard: list[str] = []
    done: dict[str, Any] = {}

    def follow() -> None:
        with daemon.client() as conn:
            done.update(
                conn.call_tool(
                    "watch_task", {"id": task["id"]}, on_event=lambda *e: heard.append(e[2])
                )
            )

    watcher = threading.Thread(target=follow)
    watcher.start()
    time.sleep(11.5)
    daemon.call("deny", id=pending["id"])
    watcher.join(60)
    waiting = [m for m in heard if m.startswith("waiting for you")]
    assert len(waiting) >= 2, heard
    assert f"tale approve {pending['id'][:8]}" in waiting[0]
    assert done["state"] == "completed"


def test_a_denial_and_its_reason_go_back_to_the_model(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, home = acting
    task = daemon.call("submit_task", text="[[script:deny]] clean the build", act=True)
    pending = _approval(daemon, task["id"])
    denied = home.tale("deny", pending["id"], "use make clean instead")
    assert denied.returncode == 0, denied.stderr
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed"
    results = _tool_messages(server, "[[script:deny]]")
    assert any("denied" in r and "use make clean instead" in r for r in results), results
    assert [c["outcome"] for c in done["tool_calls"]][:1] == ["denied"]


def test_approve_always_adds_a_rule_so_the_next_such_call_runs_unasked(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    first = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    pending = _approval(daemon, first["id"])
    assert pending["rule"] == "run:touch"
    assert home.tale("approve", pending["id"], "--always").returncode == 0
    daemon.wait_for(first["id"])
    second = daemon.call("submit_task", text="[[script:run-again]] run it", act=True)
    done = daemon.wait_for(second["id"], ("completed", "failed", "waiting"))
    assert done["state"] == "completed", done
    assert "run:touch" in daemon.call("list_tools")["rules"]


def test_model_mistakes_go_back_as_errors_and_the_task_carries_on(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, _home = acting
    task = daemon.call("submit_task", text="[[script:mistakes]] go", act=True)
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    results = _tool_messages(server, "[[script:mistakes]]")
    assert "no tool named 'no_such_tool'" in results[0]
    assert "content" in results[1]  # the missing argument is named
    assert results[2]  # unparseable arguments: an error, not a crash
    assert "outside" in results[3] or "escape" in results[3] or ".." in results[3], results[3]
    assert [c["outcome"] for c in done["tool_calls"]][:4] == ["error"] * 4


def test_a_loop_that_never_finishes_stops_at_its_step_budget(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, _home = acting
    task = daemon.call("submit_task", text="[[script:loop]] look around", act=True)
    done = daemon.wait_for(task["id"])
    assert done["state"] == "failed"
    assert "tools.agent.max_steps" in done["error"]
    assert len(done["tool_calls"]) == 8


def test_a_model_that_repeats_the_same_call_is_told_then_stopped(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, _home = acting
    task = daemon.call("submit_task", text="[[script:repeat]] look around", act=True)
    done = daemon.wait_for(task["id"])
    assert done["state"] == "failed"
    assert "3 times in a row (tools.agent.max_repeats = 3)" in done["error"]
    assert len(done["tool_calls"]) == 2
    assert (
        "You made exactly this call just before" in _tool_messages(server, "[[script:repeat]]")[1]
    )


def test_a_repeated_failing_call_shows_a_person_the_tools_own_error(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    """The model is told it repeats itself; `tale status` shows each call's own error,
    not that nudge (it is for the model)."""
    daemon, server, home = acting
    task = daemon.call("submit_task", text="[[script:repeat-missing]] read it", act=True)
    done = daemon.wait_for(task["id"])
    assert "You made exactly this call" in _tool_messages(server, "[[script:repeat-missing]]")[1]
    details = [c["detail"] for c in done["tool_calls"]]
    assert len(details) == 2 and all("missing.txt" in d for d in details), details
    assert not any("You made" in d for d in details), details
    shown = home.tale("status", task["id"]).stdout
    assert "You made" not in shown, shown


def test_ask_user_waits_for_an_answer_that_reaches_the_model(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, home = acting
    task = daemon.call("submit_task", text="[[script:ask]] greet someone", act=True)
    pending = _approval(daemon, task["id"])
    assert pending["kind"] == "question" and pending["summary"] == "Which greeting?"
    refused = home.tale("approve", pending["id"])
    assert refused.returncode != 0 and "tale answer" in refused.stderr
    assert home.tale("answer", pending["id"], "a cheerful one").returncode == 0
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed"
    assert any("a cheerful one" in r for r in _tool_messages(server, "[[script:ask]]"))


def test_a_run_criterion_gates_the_finish_in_the_workspace(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, _home = acting
    task = daemon.call(
        "submit_task", text="[[script:gate]] make ok.py exit 0", criteria=["run:python ok.py"]
    )
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert done["result"] == "fixed"
    results = _tool_messages(server, "[[script:gate]]")
    assert any("not done yet" in r and "run:python ok.py" in r for r in results), results


def test_a_workspace_inside_tales_own_directories_is_refused(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    with pytest.raises(RpcError) as err:
        daemon.call("submit_task", text="look", workspace=str(home.data))
    assert "tale's own directory" in err.value.message
    with pytest.raises(RpcError) as err:
        daemon.call("submit_task", text="look", workspace="/no/such/dir")
    assert "does not exist" in err.value.message


def test_restore_rewinds_the_files_with_the_state(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:steps]] make three", act=True)
    _approval(daemon, task["id"])  # one.txt and two.txt written; run waits
    copy = _workspace(home, task["id"])
    assert (copy / "one.txt").exists() and (copy / "two.txt").exists()
    daemon.call("pause_task", id=task["id"])
    history = daemon.call("list_checkpoints", id=task["id"])["checkpoints"]
    first_write = next(
        c for c in reversed(history) if c["kind"] == "tool-done" and c["step"] == "write_file"
    )
    written = (copy / "two.txt").stat().st_mtime_ns
    restored = home.tale("restore", task["id"], first_write["commit"][:12])
    assert restored.returncode == 0, restored.stderr
    assert (copy / "one.txt").exists()
    # Restored, the task is queued at once and may write two.txt again before this
    # looks: gone, or a new file written after the restore; never the old one.
    two = copy / "two.txt"
    assert not two.exists() or two.stat().st_mtime_ns != written


def test_kill_9_during_a_command_reports_it_interrupted_and_never_runs_it_again(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, home = acting
    task = daemon.call("submit_task", text="[[script:slow]] long job", act=True)
    pending = _approval(daemon, task["id"])
    daemon.call("approve", id=pending["id"])
    log = _workspace(home, task["id"]) / "log.txt"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text()):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    daemon.kill9()
    # The command died with the daemon (the sandbox dies with its parent).
    time.sleep(1)
    out = subprocess.run(["pgrep", "-f", SLEEP], capture_output=True, text=True)
    daemon.start()  # before asserting: the module's other tests need the daemon
    assert not out.stdout.strip(), out.stdout
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert log.read_text() == "start\n"  # ran once, cut off; never run again
    results = _tool_messages(server, "[[script:slow]]")
    assert results and results[0].startswith("interrupted"), results
    outcomes = [c["outcome"] for c in done["tool_calls"]]
    assert outcomes == ["interrupted", "ok"], outcomes


def test_a_task_that_plainly_asks_for_a_file_acts_without_being_told_to(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:classified]] create a file hi.txt saying hi")
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert done["act"] is True
    assert [c["tool"] for c in done["tool_calls"]] == ["write_file", "finish"]
    assert (_workspace(home, task["id"]) / "hi.txt").read_text() == "hi\n"


def test_a_plain_question_gets_a_plain_answer_with_no_tools(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="What is a tuple?")
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert done["act"] is False and "tool_calls" not in done
    assert not _workspace(home, task["id"]).exists()


def _mcp_runs(home: Home) -> list[str]:
    runs = home.root / "mcp-runs.log"
    return runs.read_text().split() if runs.exists() else []


def _mcp_up(daemon: Daemon) -> None:
    deadline = time.monotonic() + 60
    while True:
        servers = daemon.call("list_tools")["servers"]
        if servers and servers[0]["state"] == "up":
            return
        assert time.monotonic() < deadline, servers
        time.sleep(0.1)


def test_an_mcp_servers_tool_is_called_through_the_loop(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, _home = acting
    _mcp_up(daemon)
    task = daemon.call("submit_task", text="[[script:mcp]] add them", act=True)
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert [c["tool"] for c in done["tool_calls"]] == ["bench.add", "finish"]
    assert "5" in _tool_messages(server, "[[script:mcp]]")[0]
    # The model saw the server's tools, under a name its API accepts.
    offered = {t["function"]["name"] for t in server.requests[-1].get("tools", [])}
    assert any("bench" in name and "add" in name for name in offered), offered


def test_an_mcp_tool_asks_by_default_and_runs_once_approved(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    _mcp_up(daemon)
    before = _mcp_runs(home).count("wipe")
    task = daemon.call("submit_task", text="[[script:mcp-ask]] wipe it", act=True)
    pending = _approval(daemon, task["id"])
    assert pending["summary"] == "bench.wipe: old.txt"
    assert _mcp_runs(home).count("wipe") == before
    daemon.call("approve", id=pending["id"])
    assert daemon.wait_for(task["id"])["state"] == "completed"
    assert _mcp_runs(home).count("wipe") == before + 1


def test_an_mcp_server_that_dies_mid_call_is_reported_and_the_call_not_resent(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, server, home = acting
    _mcp_up(daemon)
    task = daemon.call("submit_task", text="[[script:mcp-crash]] crash it", act=True)
    pending = _approval(daemon, task["id"])
    daemon.call("approve", id=pending["id"])
    done = daemon.wait_for(task["id"])
    assert done["state"] == "completed", done
    assert "crashed during the call" in _tool_messages(server, "[[script:mcp-crash]]")[0]
    assert _mcp_runs(home).count("crash") == 1
    _mcp_up(daemon)  # restarted


def test_a_workspace_deleted_underneath_a_task_fails_it_clearly(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:gone]] then vanish", act=True)
    pending = _approval(daemon, task["id"])
    subprocess.run(["rm", "-rf", str(_workspace(home, task["id"]))], check=True)
    daemon.call("approve", id=pending["id"])
    done = daemon.wait_for(task["id"])
    assert done["state"] == "failed"
    assert "is gone: it was deleted while the task used it" in done["error"]


def test_a_secret_a_tool_read_is_redacted_before_the_model_sees_it(
    acting: tuple[Daemon, ScriptedServer, Home], project: Path
) -> None:
    daemon, server, _home = acting
    key = "sk-" + "A1b2C3d4E5f6G7h8I9j0" * 2
    (project / ".env").write_text(f"OPENAI_API_KEY={key}\nDEBUG=1\n")
    task = daemon.call("submit_task", text="[[script:secret]] read env", workspace=str(project))
    assert daemon.wait_for(task["id"])["state"] == "completed"
    seen = _tool_messages(server, "[[script:secret]]")[0]
    assert "DEBUG=1" in seen and key not in seen and "[REDACTED]" in seen


def test_tools_lists_the_builtins_and_their_rules(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    _daemon, _server, home = acting
    listed = home.tale("tools")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines() if line}
    assert lines["read_file"] == "allow"
    assert lines["run"] == "ask"


def test_tools_lists_each_mcp_tool_with_its_rule_and_the_ones_refused(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    """`tale tools` names a server's tools as a rule takes them ("bench.add"), each with
    the decision that applies now, and says which tools were not offered and why."""
    daemon, _server, home = acting
    _mcp_up(daemon)
    listed = home.tale("tools")
    assert listed.returncode == 0, listed.stderr
    rules = {
        line.split()[0]: line.split()[1]
        for line in listed.stdout.splitlines()
        if line.startswith("  bench.")
    }
    assert rules["bench.add"] == "allow"  # its own rule
    assert rules["bench.fail"] == "ask"  # every MCP tool asks by default
    assert "  not offered: tool 'bad name!' refused" in listed.stdout


def test_status_shows_the_tool_calls_and_what_waits(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    daemon, _server, home = acting
    task = daemon.call("submit_task", text="[[script:deny]] clean the build", act=True)
    pending = _approval(daemon, task["id"])
    shown = home.tale("status", task["id"])
    assert "waiting for you" in shown.stdout
    assert pending["id"][:8] in shown.stdout
    daemon.call("deny", id=pending["id"])
    daemon.wait_for(task["id"])
    shown = home.tale("status", task["id"])
    assert "tool calls" in shown.stdout and "denied" in shown.stdout


def test_the_checkpoint_repository_stays_consistent(
    acting: tuple[Daemon, ScriptedServer, Home],
) -> None:
    """After all of the above (restarts, a kill -9, a restore), git fsck is clean."""
    _daemon, _server, home = acting
    repo = home.data / "checkpoints.git"
    fsck = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--strict", "--no-dangling"],
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
    )
    assert fsck.returncode == 0, fsck.stderr


def test_an_acting_task_stays_on_the_task_model_while_simple_tasks_explore_ux(
    project: Path,
) -> None:
    """With every simple task sent to ux (explore_rate 1), an acting task that looks as
    simple still runs on the task model: ux's record is of answers, not of tool loops,
    and a person's chat replies need the ux model."""
    home = Home({"TALE_LEARNING__EXPLORE_RATE": "1"})
    try:
        with scripted_server(SCRIPT) as server:
            home.env["TALE_MODELS__TASK"] = server.spec
            daemon = Daemon(home).start()
            try:
                answer = daemon.call("submit_task", text="Say hi")
                acting = daemon.call(
                    "submit_task",
                    text="[[script:classified]] make hi.txt",
                    workspace=str(project),
                )
                answered = daemon.wait_for(answer["id"])
                acted = daemon.wait_for(acting["id"])
            finally:
                daemon.kill_if_running()
    finally:
        home.cleanup()
    assert (answered["estimate"]["level"], answered["estimate"]["role"]) == ("simple", "ux")
    assert acted["estimate"]["level"] == "simple"
    assert (acted["state"], acted["estimate"]["role"]) == ("completed", "task"), acted
