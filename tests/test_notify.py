"""Notifications end to end: the real daemon on its socket tells a real D-Bus session bus
(a private ``dbus-daemon``) what its tasks did, where a stand-in notification service
records every call (tests/standins/notification_server.py, written with jeepney as the
daemon is), and runs the configured hooks in the real sandbox; ``tale submit --wait``
rings the bell on a terminal only. The task model is the scripted OpenAI-compatible
stand-in (tests/standins/openai_scripted.py), so a task completes, fails or waits for an
approval on demand.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taled.db.acting import Approval, ApprovalKind, ApprovalState
from taled.db.store import TaskRecord
from taled.errors import ConfigError
from taled.notify.desktop import Desktop
from taled.notify.notice import Notice, NoticeKind
from taled.settings import NotificationSettings, load_settings
from taled.tasks.lifecycle import TaskState
from tests.harness import Daemon, Home
from tests.standins.notification_server import (
    Notification,
    NotificationServer,
    session_bus,
)
from tests.standins.openai_scripted import ScriptedServer, scripted_server

pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None,
    reason="dbus-daemon is not installed (apt install dbus-daemon): no session bus to test on",
)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _plan(*steps: tuple[str, str]) -> str:
    return json.dumps(
        {"steps": [{"id": sid, "title": sid, "do": do, "needs": []} for sid, do in steps]}
    )


SCRIPT: dict[str, Any] = {
    "hello": "Hello <b>world</b> & co\nand a second line",
    "run": [_call("run", command="touch ran.txt"), _call("finish", result="ran it")],
    "loop": [_call("read_file", path=f"missing-{i}.txt") for i in range(20)],
    # A planned acting task: one step asks to run rm (asked about), the other does not.
    "plan": [
        _plan(
            ("s1", "[[script:ask-s1]] Remove the old build output."),
            ("s2", "[[script:ask-s2]] Write notes.txt."),
        )
    ],
    "ask-s1": [_call("run", command="rm -f old.txt"), _call("finish", result="cleaned")],
    "ask-s2": [
        _call("write_file", path="notes.txt", content="notes\n"),
        _call("finish", result="wrote notes"),
    ],
}
PLANNED = "[[script:plan]] Remove the old build output and then write notes.txt for it"

CONFIG = """
[tools.agent]
max_steps = 3

[hooks]
on_done = "cat >> done.jsonl"
on_failed = "cat >> failed.jsonl; exit 1"
on_waiting = "cat >> waiting.jsonl"
workdir = "{workdir}"
timeout_seconds = 20
"""


@dataclass
class Setup:
    daemon: Daemon
    home: Home
    server: NotificationServer
    workdir: Path


def _home(model: ScriptedServer, **env: str) -> Home:
    home = Home(env)
    # Both roles on the stand-in: no embedded model to load, every answer scripted.
    home.env["TALE_MODELS__TASK"] = model.spec
    home.env["TALE_MODELS__UX"] = model.spec
    return home


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedServer]:
    with scripted_server(SCRIPT) as server:
        yield server


@pytest.fixture(scope="module")
def bus() -> Iterator[str]:
    with session_bus() as address:
        yield address


@pytest.fixture(scope="module")
def setup(model: ScriptedServer, bus: str) -> Iterator[Setup]:
    with NotificationServer(bus) as server:
        home = _home(model, DBUS_SESSION_BUS_ADDRESS=bus)
        workdir = home.root / "hooks"
        home.write_config(CONFIG.format(workdir=workdir))
        daemon = Daemon(home).start()
        try:
            yield Setup(daemon, home, server, workdir)
        finally:
            daemon.kill_if_running()
            home.cleanup()


def _of(server: NotificationServer, task_id: str, count: int = 1) -> list[Notification]:
    """The notifications about one task, once ``count`` of them came."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [n for n in server.received() if f" task {task_id} " in n.summary + " "]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} notification(s) of {task_id} expected: {server.received()}")


def _hook_lines(path: Path, task_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The JSON documents a hook appended to ``path`` about one task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            found = [d for d in docs if d["task"]["id"] == task_id]
            if found:
                return found
        time.sleep(0.05)
    raise AssertionError(f"no line about task {task_id} in {path}")


def _wait_log(daemon: Daemon, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the daemon's log:\n{daemon.log_text()[-3000:]}")


# -- the desktop -----------------------------------------------------------------------


def test_a_completed_task_sends_one_desktop_notification(setup: Setup) -> None:
    """A completed task is one Notify from app "tale", its summary naming the task and
    its body the task's first line and the result's, escaped for a markup-reading service."""
    task = setup.daemon.call("submit_task", text="[[script:hello]] greet <them>\nplease")
    assert setup.daemon.wait_for(task["id"])["state"] == "completed"
    (shown,) = _of(setup.server, task["id"])
    assert shown.app_name == "tale"
    assert shown.summary == f"tale: task {task['id']} completed"
    assert (
        shown.body == "[[script:hello]] greet &lt;them&gt;\nHello &lt;b&gt;world&lt;/b&gt; &amp; co"
    )
    assert shown.hints["urgency"] == ("y", 1)
    assert shown.expire_timeout == 10_000
    time.sleep(1)  # nothing more comes about it
    assert len(_of(setup.server, task["id"])) == 1


def test_a_failed_task_sends_a_critical_notification_with_its_error(setup: Setup) -> None:
    """A failed task's notification says so, carries the first line of its error and is
    critical."""
    task = setup.daemon.call("submit_task", text="[[script:loop]] look around", act=True)
    done = setup.daemon.wait_for(task["id"])
    assert done["state"] == "failed", done
    (shown,) = _of(setup.server, task["id"])
    assert shown.summary == f"tale: task {task['id']} failed"
    first = " ".join(next(t for t in done["error"].splitlines() if t.strip()).split())
    first = first if len(first) <= 200 else first[:199].rstrip() + "…"
    assert shown.body.splitlines()[1] == html.escape(first, quote=False)
    assert shown.hints["urgency"] == ("y", 2)


def test_a_task_waiting_for_an_approval_notifies_and_is_replaced_when_it_ends(
    setup: Setup,
) -> None:
    """An acting task that asks to run a command notifies "waits for you" with the
    command and how to approve it; its completion replaces that notification."""
    task = setup.daemon.call("submit_task", text="[[script:run]] make a file", act=True)
    setup.daemon.wait_for(task["id"], ("waiting",))
    (pending,) = setup.daemon.call("list_approvals", task=task["id"])["approvals"]
    (waiting,) = _of(setup.server, task["id"])
    assert waiting.summary == f"tale: task {task['id']} waits for you"
    assert f"run: touch ran.txt (tale approve {pending['id']})" in waiting.body
    assert waiting.hints["urgency"] == ("y", 2)
    setup.daemon.call("approve", id=pending["id"])
    assert setup.daemon.wait_for(task["id"])["state"] == "completed"
    _, done = _of(setup.server, task["id"], 2)
    assert done.summary == f"tale: task {task['id']} completed"
    assert done.replaces_id == waiting.id


def test_without_markup_the_body_is_sent_as_written() -> None:
    """A notification service that reads no markup gets the body unescaped (and no
    control characters)."""
    now = time.time()
    task = TaskRecord(
        id="0123456789ab",
        text="tidy <src> & docs",
        state=TaskState.COMPLETED,
        priority=50,
        result="\x1b[31mdone\x1b[0m <ok>",
        error=None,
        attempts=1,
        created_at=now - 5,
        updated_at=now,
    )
    with session_bus() as bus, NotificationServer(bus, capabilities=("body",)) as server:
        desktop = Desktop(NotificationSettings(expire_seconds=0), bus)
        assert asyncio.run(desktop.send(Notice(NoticeKind.COMPLETED, task, now)))
        (shown,) = server.wait_for(1)
    assert shown.body == "tidy <src> & docs\n[31mdone[0m <ok>"
    assert shown.expire_timeout == -1  # 0: the service decides


def test_a_bus_with_no_notification_service_is_logged_and_given_up() -> None:
    """Sending to a bus where nobody serves notifications returns False at once (the
    bus's error), without raising."""
    now = time.time()
    task = TaskRecord("0123456789ab", "t", TaskState.FAILED, 50, None, "boom", 1, now, now)
    with session_bus() as bus:
        desktop = Desktop(NotificationSettings(timeout_seconds=5), bus)
        started = time.monotonic()
        assert asyncio.run(desktop.send(Notice(NoticeKind.FAILED, task, now))) is False
        assert time.monotonic() - started < 5


def test_the_waiting_body_says_how_to_answer_a_question() -> None:
    """A question's notice says what was asked and the command that answers it."""
    now = time.time()
    task = TaskRecord("0123456789ab", "plan a trip", TaskState.WAITING, 50, None, None, 1, now, now)
    asked = Approval(
        "ffee00112233",
        task.id,
        "c1",
        ApprovalKind.QUESTION,
        "ask_user",
        {},
        "Which city?",
        None,
        ApprovalState.PENDING,
        None,
        now,
        None,
    )
    notice = Notice(NoticeKind.WAITING, task, now, (asked,))
    assert notice.body(200) == "plan a trip\nasks: Which city? (tale answer ffee00112233 TEXT)"
    assert notice.to_json()["approvals"][0]["kind"] == "question"


def test_without_a_session_bus_tasks_complete_and_the_log_says_so_once(
    model: ScriptedServer,
) -> None:
    """No DBUS_SESSION_BUS_ADDRESS (and no $XDG_RUNTIME_DIR/bus): desktop notifications
    are off, said once at INFO, and tasks complete as ever."""
    home = _home(model)
    assert "DBUS_SESSION_BUS_ADDRESS" not in home.env
    daemon = Daemon(home).start()
    try:
        for _ in range(2):
            task = daemon.call("submit_task", text="[[script:hello]] hi")
            assert daemon.wait_for(task["id"])["state"] == "completed"
        log = _wait_log(daemon, "desktop notifications are off")
        assert log.count("desktop notifications are off") == 1
        assert "Traceback" not in log
    finally:
        daemon.kill_if_running()
        home.cleanup()


def test_a_planned_task_notifies_for_its_step_that_waits_for_you_not_for_its_steps(
    model: ScriptedServer, tmp_path: Path
) -> None:
    """A planned task waiting for its steps says nothing, nor do its steps as they end;
    a step that waits for an approval notifies (and runs on_waiting) about the top-level
    task, naming the step's approval; the task's completion replaces that notification."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "old.txt").write_text("old\n")
    with session_bus() as bus, NotificationServer(bus) as server:
        home = _home(model, DBUS_SESSION_BUS_ADDRESS=bus, TALE_PLANNER__DECOMPOSE="true")
        workdir = home.root / "hooks"
        home.write_config(
            f'[queue]\nworkers = 2\n\n[tools.policy]\nrun = "allow"\n"run:rm" = "ask"\n\n'
            f'[hooks]\non_waiting = "cat >> waiting.jsonl"\nworkdir = "{workdir}"\n'
        )
        daemon = Daemon(home).start()
        try:
            task = daemon.call("submit_task", text=PLANNED, workspace=str(project))
            deadline = time.monotonic() + 60
            while not (pending := daemon.call("list_approvals", task=task["id"])["approvals"]):
                assert time.monotonic() < deadline, "no step asked for an approval"
                time.sleep(0.05)
            (asked,) = pending
            assert asked["task_id"] != task["id"]  # the step's
            (waiting,) = _of(server, task["id"])
            assert waiting.summary == f"tale: task {task['id']} waits for you"
            assert f"run: rm -f old.txt (tale approve {asked['id']})" in waiting.body
            (doc,) = _hook_lines(workdir / "waiting.jsonl", task["id"])
            assert doc["approvals"][0]["task_id"] == asked["task_id"]
            daemon.call("approve", id=asked["id"])
            assert daemon.wait_for(task["id"])["state"] == "completed"
            _, done = _of(server, task["id"], 2)
            assert done.replaces_id == waiting.id
            time.sleep(1)  # nothing more comes: not the steps', not the waiting for them
            assert [n.summary for n in server.received()] == [
                f"tale: task {task['id']} waits for you",
                f"tale: task {task['id']} completed",
            ]
        finally:
            daemon.kill_if_running()
            home.cleanup()


# -- hooks -----------------------------------------------------------------------------


def test_on_done_gets_the_task_as_json_on_stdin(setup: Setup) -> None:
    """on_done reads one line of JSON: version, event, the task's id, state, text,
    result and times, and no approvals."""
    task = setup.daemon.call("submit_task", text="[[script:hello]] say hi")
    setup.daemon.wait_for(task["id"])
    (doc,) = _hook_lines(setup.workdir / "done.jsonl", task["id"])
    assert doc["version"] == 1
    assert doc["event"] == "completed"
    got = doc["task"]
    assert got["state"] == "completed"
    assert got["text"] == "[[script:hello]] say hi"
    assert got["title"] == "[[script:hello]] say hi"
    assert got["result"] == SCRIPT["hello"]
    assert got["error"] is None
    assert got["created_at"].endswith("Z") and got["updated_at"] >= got["created_at"]
    assert doc["approvals"] == []


def test_on_waiting_gets_the_approvals_it_waits_for(setup: Setup) -> None:
    """on_waiting's JSON lists the pending approval: its id, tool and summary."""
    task = setup.daemon.call("submit_task", text="[[script:run]] make it", act=True)
    setup.daemon.wait_for(task["id"], ("waiting",))
    (doc,) = _hook_lines(setup.workdir / "waiting.jsonl", task["id"])
    (pending,) = setup.daemon.call("list_approvals", task=task["id"])["approvals"]
    assert doc["event"] == "waiting"
    assert doc["task"]["state"] == "waiting"
    (asked,) = doc["approvals"]
    assert asked["id"] == pending["id"]
    assert asked["tool"] == "run"
    assert asked["summary"] == "run: touch ran.txt"
    setup.daemon.call("deny", id=pending["id"], reason="no")
    setup.daemon.wait_for(task["id"])


def test_a_relative_hook_workdir_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """hooks.workdir must be absolute (or start with ~): a relative one names the key."""
    monkeypatch.setenv("TALE_HOOKS__WORKDIR", "hooks/here")
    with pytest.raises(ConfigError, match=r"hooks\.workdir: .*must be an absolute path"):
        load_settings(None)


def test_a_failing_hook_is_logged_and_the_task_stays_as_it_ended(setup: Setup) -> None:
    """on_failed exits 1: the log names the hook, the task and the exit status (not its
    output), and the task is still failed."""
    task = setup.daemon.call("submit_task", text="[[script:loop]] look again", act=True)
    assert setup.daemon.wait_for(task["id"])["state"] == "failed"
    _hook_lines(setup.workdir / "failed.jsonl", task["id"])
    line = f"hook on_failed for task {task['id']} failed: exit status 1"
    _wait_log(setup.daemon, line)
    assert setup.daemon.call("get_task", id=task["id"])["state"] == "failed"


def test_a_hook_that_hangs_is_killed_at_its_timeout_and_holds_nothing_up(
    model: ScriptedServer,
) -> None:
    """on_done sleeps for ever: while it hangs the next task runs and completes, then the
    hook is killed at hooks.timeout_seconds (logged) and the task is still completed.
    Also: a bus where no service owns the notifications' name costs a log line."""
    with session_bus() as bus:  # nobody serves notifications on it
        home = _home(model, DBUS_SESSION_BUS_ADDRESS=bus)
        workdir = home.root / "hooks"
        home.write_config(
            f'[hooks]\non_done = "echo started >> started.txt; sleep 1000"\n'
            f'timeout_seconds = 6\nworkdir = "{workdir}"\n'
        )
        _hanging_hook(Daemon(home).start(), home, workdir / "started.txt")


def _hanging_hook(daemon: Daemon, home: Home, started: Path) -> None:
    try:
        first = daemon.call("submit_task", text="[[script:hello]] one")
        assert daemon.wait_for(first["id"])["state"] == "completed"
        deadline = time.monotonic() + 60
        while not started.exists():  # its hook runs (and hangs) now
            assert time.monotonic() < deadline, "on_done never started"
            time.sleep(0.05)
        second = daemon.call("submit_task", text="[[script:hello]] two")
        assert daemon.wait_for(second["id"])["state"] == "completed"
        killed = f"hook on_done for task {first['id']} killed after 6 s"
        assert killed not in daemon.log_text(), "the second task waited for the first's hook"
        log = _wait_log(daemon, killed)
        assert "desktop notification for task" in log and "not sent" in log
        assert daemon.call("get_task", id=first["id"])["state"] == "completed"
    finally:
        daemon.kill_if_running()
        home.cleanup()


# -- tale submit --wait ----------------------------------------------------------------


def _submit_wait(home: Home, *extra: str, tty: bool) -> tuple[int, str, str]:
    """Run ``tale submit --wait`` with stderr on a terminal (a pty) or a pipe."""
    argv = [sys.executable, "-m", "tale_client.cli", "submit", "--wait", *extra]
    argv.append("[[script:hello]] ring")
    if not tty:
        done = subprocess.run(argv, env=home.env, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv,
        env={**home.env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(10), out, seen.decode(errors="replace")


def test_submit_wait_rings_the_bell_on_a_terminal(setup: Setup) -> None:
    """With stderr on a terminal, the end of the task rings the bell once and says it
    completed in one line."""
    code, out, err = _submit_wait(setup.home, tty=True)
    assert code == 0, err
    assert out.startswith("Hello <b>world</b>")
    assert err.count("\a") == 1
    assert "completed in" in err.split("\a", 1)[1]


def test_submit_wait_does_not_ring_into_a_pipe_or_when_told_not_to(setup: Setup) -> None:
    """Stderr a pipe: no bell, and the task's end said once (its last progress line);
    --no-bell on a terminal: none."""
    code, _out, err = _submit_wait(setup.home, tty=False)
    assert code == 0, err
    assert "\a" not in err
    assert [line for line in err.splitlines() if " completed" in line] == [
        next(line for line in err.splitlines() if "completed after" in line)
    ]
    code, _out, err = _submit_wait(setup.home, "--no-bell", tty=True)
    assert code == 0, err
    assert "\a" not in err
