"""The TUI against real daemons: chat, board, task screen, dashboard, down and back.

Each test drives the app with Textual's Pilot (``App.run_test``) and polls the
app's own state until what it waits for shows, with a deadline; one runs the
real ``tale chat`` in tmux and reads the screen back. The acting tests run their
tasks on the scripted OpenAI stand-in (tests/standins/openai_scripted.py), which
answers with the tool calls a script names: no real model calls a tool on demand.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandList
from textual.pilot import Pilot
from textual.widgets import DataTable, Markdown, Static, TabbedContent

from tale_client.tui.api import Decision, Verdict
from tale_client.tui.app import TaleApp, build_app
from tale_client.tui.client import DaemonUnreachable, RpcError, TaleClient
from tale_client.tui.model import Approval, ApprovalKind, Task
from tale_client.tui.screens import ApprovalScreen, BoardScreen, DownScreen, TaskScreen
from tale_client.tui.screens.board import BoardColumn
from tale_client.tui.widgets import ApprovalBanner, AssistantMessage, TaskCard, TaskMarker
from tests.harness import Daemon, Home, running_daemon
from tests.standins.openai_scripted import scripted_server

SIZE = (140, 40)
LONG = "Write a very long story about a dragon, at least 2000 words."

# Short replies and answers: what is tested is that they show, not what they say.
FAST = {"TALE_CHAT__MAX_TOKENS": "24", "TALE_RUNNER__MAX_TOKENS": "16"}


@pytest.fixture(scope="module")
def tui_daemon() -> Iterator[Daemon]:
    """One real daemon for the read-mostly TUI tests."""
    with running_daemon(FAST) as d:
        yield d


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    """A model turn that calls one tool."""
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


# Each entry: the model's turns, one per answer (a text turn finishes the task).
ACTING_SCRIPT: dict[str, Any] = {
    "tui-run": [_call("run", command="echo hi > hi.txt"), "wrote hi.txt"],
    "tui-steps": [
        _call("write_file", path="a.txt", content="a\n"),
        _call("list_files", path="."),
        _call("run", command="echo b > b.txt"),
        "made a.txt and b.txt",
    ],
    "tui-write": [_call("write_file", path="hello.txt", content="hello tui\n"), "wrote it"],
}


@pytest.fixture(scope="module")
def acting_daemon() -> Iterator[Daemon]:
    """A real daemon whose task model is the scripted stand-in, for tasks that act."""
    with (
        scripted_server(ACTING_SCRIPT) as server,
        running_daemon({**FAST, "TALE_MODELS__TASK": server.spec}) as d,
    ):
        yield d


async def until(
    pilot: Pilot[None], ready: Callable[[], bool], what: str, timeout: float = 90
) -> None:
    """Let the app run until ``ready()`` holds; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def card_column(app: TaleApp, task_id: str) -> str | None:
    """The board column the task's card is in, or None."""
    for column in app.board_screen.query(BoardColumn):
        if any(c.task_id == task_id for c in column.cards):
            return column.column
    return None


def card_of(app: TaleApp, task_id: str) -> Task | None:
    """The task as its card on the board shows it now (None while the card moves)."""
    cards = app.board_screen.query(f"#card-{task_id}").results(TaskCard)
    return next((c.tale_task for c in cards), None)


def asking(app: TaleApp, task_id: str) -> int:
    """How many approvals the task's card shows as waiting for a person (0: no card)."""
    cards = app.board_screen.query(f"#card-{task_id}").results(TaskCard)
    return next((c.asking for c in cards), 0)


def selected(app: TaleApp) -> str | None:
    """The id of the task whose card has the focus."""
    card = app.board_screen.selected()
    return None if card is None else card.task_id


def tool_rows(screen: TaskScreen) -> list[tuple[str, str]]:
    """(tool, outcome) of each row of the task screen's tool calls table."""
    table = screen.query_one("#tool-calls", DataTable)
    return [(str(r[1]), str(r[2])) for r in (table.get_row_at(i) for i in range(table.row_count))]


def test_chat_streams_the_reply_into_the_conversation(tui_daemon: Daemon) -> None:
    """A message typed in the chat gets a reply that grows piece by piece, then its token line."""

    async def scenario() -> None:
        app = build_app("chat", socket=tui_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.api is not None, "the connection")
            await pilot.press(*"Hello, who are you?")
            await pilot.press("enter")
            screen = app.chat_screen
            await until(pilot, lambda: bool(screen.query(AssistantMessage)), "the reply box")
            answer = screen.query_one(AssistantMessage)
            seen: set[str] = set()

            def finished() -> bool:
                seen.add(answer.markdown.source)
                return not screen.sending

            await until(pilot, finished, "the reply to finish")
            final = answer.markdown.source
            assert final.strip(), "the reply is shown"
            partial = {s for s in seen if s and s != final}
            assert partial, "the reply was shown while it streamed, before it was complete"
            assert all(final.strip().startswith(s.strip()) for s in partial)
            meta = str(answer.query(".meta").first(Static).render())
            assert "tokens" in meta

    run(scenario)


def test_a_request_for_work_becomes_a_task_marker_that_opens_the_task(tui_daemon: Daemon) -> None:
    """A message read as a task shows "→ task ID"; enter on the marker opens that task."""

    async def scenario() -> None:
        app = build_app("chat", socket=tui_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.api is not None, "the connection")
            await app.chat_screen.action_new_conversation()
            await pilot.press(*"Write a Python function that reverses a string")
            await pilot.press("enter")
            screen = app.chat_screen
            await until(pilot, lambda: bool(screen.query(TaskMarker)), "the task marker")
            marker = screen.query_one(TaskMarker)
            assert re.fullmatch(r"[0-9a-f]{12}", marker.ref.id)
            marker.focus()
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TaskScreen), "the task screen")
            assert isinstance(app.screen, TaskScreen)
            assert app.screen.task_id == marker.ref.id

    run(scenario)


def test_task_screen_shows_history_and_result_of_a_finished_task(tui_daemon: Daemon) -> None:
    """A task opened from the command palette lists queued → running → completed and its result."""
    task_id = tui_daemon.call("submit_task", text="Say hi")["id"]
    done = tui_daemon.wait_for(task_id)
    assert done["state"] == "completed"

    async def scenario() -> None:
        app = build_app("board", socket=tui_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.api is not None, "the connection")
            await pilot.press("ctrl+p", *task_id)
            await until(
                pilot,
                lambda: any(c.option_count for c in app.screen.query(CommandList)),
                "the palette's hits",
            )
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TaskScreen), "the task screen")
            screen = app.screen
            assert isinstance(screen, TaskScreen)
            await until(pilot, lambda: screen.shown is not None, "the task")
            table = screen.query_one("#transitions", DataTable)
            states = [table.get_row_at(i)[2] for i in range(table.row_count)]
            assert states == ["queued", "running", "completed"]
            output = screen.query_one("#task-output", Markdown)
            assert output.source == done["result"]
            header = str(screen.query_one("#task-header", Static).render())
            assert "completed" in header and "took" in header
            await pilot.press("escape")
            assert isinstance(app.screen, BoardScreen)

    run(scenario)


def test_dashboard_shows_the_model_pool(tui_daemon: Daemon) -> None:
    """The dashboard's pool table has the ux and task models that models_status reports."""
    models = tui_daemon.call("models_status")["models"]

    async def scenario() -> None:
        app = build_app("dashboard", socket=tui_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            table = app.dashboard_screen.query_one("#pool", DataTable)
            await until(pilot, lambda: table.row_count == len(models), "the pool table")
            rows = [table.get_row_at(i) for i in range(table.row_count)]
            assert [(r[0], r[1]) for r in rows] == [
                (m["role"], f"{m['backend']}:{m['model']}") for m in models
            ]
            assert all(r[4] == "ok" for r in rows)
            latency = app.dashboard_screen.query_one("#latency", DataTable)
            await until(pilot, lambda: latency.row_count > 0, "the latency table")

    run(scenario)


def test_board_moves_a_task_across_columns_with_its_keys() -> None:
    """p moves the selected task to paused, r puts it back to work, c + y cancels it."""
    # One worker and a long answer: the task is running until the test acts on it.
    slow = {**FAST, "TALE_RUNNER__MAX_TOKENS": "4000", "TALE_QUEUE__WORKERS": "1"}
    with running_daemon(slow) as daemon:
        task_id = daemon.call("submit_task", text=LONG)["id"]

        async def scenario() -> None:
            app = build_app("board", socket=daemon.home.socket)
            async with app.run_test(size=SIZE) as pilot:
                await until(
                    pilot, lambda: card_column(app, task_id) == "running", "the running card"
                )
                running = app.board_screen.query_one("#col-running", BoardColumn)
                header = str(running.query_one(".column-header", Static).render())
                assert header == "running 1/1"
                # The keys act at once: the board selects its first card by itself.
                await until(pilot, lambda: selected(app) == task_id, "the first card selected")
                await pilot.press("p")
                await until(pilot, lambda: card_column(app, task_id) == "paused", "paused")
                await until(pilot, lambda: selected(app) == task_id, "the selection to follow")
                await pilot.press("r")
                # Queued, then running again (the only task, one free worker): stable there.
                await until(pilot, lambda: card_column(app, task_id) == "running", "running")
                await until(pilot, lambda: selected(app) == task_id, "the selection to follow")
                await pilot.press("plus")
                await until(
                    pilot,
                    lambda: getattr(card_of(app, task_id), "priority", None) == 60,
                    "priority 60",
                )
                await until(pilot, lambda: selected(app) == task_id, "the selection")
                await pilot.press("c")
                await pilot.press("y")
                await until(pilot, lambda: card_column(app, task_id) == "failed", "cancelled")
                assert getattr(card_of(app, task_id), "state", None) == "cancelled"
                card = app.board_screen.query_one(f"#card-{task_id}", TaskCard)
                assert "cancelled" in str(card.render())

        run(scenario)


def test_down_screen_shows_until_the_daemon_starts_then_returns_when_it_dies(home: Home) -> None:
    """No daemon: the down screen says what to run; a daemon starting brings the app up."""

    async def scenario() -> None:
        app = build_app("board", socket=home.socket, retry_seconds=0.3)
        daemon = Daemon(home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DownScreen), "the down screen")
            text = " ".join(str(s.render()) for s in app.screen.query(Static))
            assert "tale daemon start" in text
            assert str(home.socket) in text
            assert "retrying" in text
            try:
                daemon.start(wait=False)
                await until(pilot, lambda: isinstance(app.screen, BoardScreen), "reconnection")
                assert app.api is not None
                daemon.kill9()
                await until(pilot, lambda: isinstance(app.screen, DownScreen), "down again")
                assert app.api is None
            finally:
                daemon.kill_if_running()

    run(scenario)


def test_a_call_in_flight_fails_as_unreachable_when_the_daemon_dies(daemon: Daemon) -> None:
    """The asyncio client fails a pending call with DaemonUnreachable when the socket drops."""

    async def scenario() -> None:
        client = await TaleClient.connect(daemon.home.socket)
        try:
            # Following a paused task never ends by itself: the call stays in flight.
            task = await client.call_tool("submit_task", {"text": LONG})
            await pause(client, task["id"])
            call = asyncio.ensure_future(client.call_tool("watch_task", {"id": task["id"]}))
            await asyncio.sleep(0.2)
            assert not call.done()
            daemon.kill9()
            with pytest.raises(DaemonUnreachable):
                await asyncio.wait_for(call, 10)
            assert client.closed
        finally:
            await client.close()

    run(scenario)


async def pause(client: TaleClient, task_id: str) -> None:
    """Pause a task that may be moving from queued to running as we ask."""
    for _ in range(50):
        try:
            await client.call_tool("pause_task", {"id": task_id})
            return
        except RpcError as exc:
            if exc.code != -32002:  # only "its state changed under us" is worth a retry
                raise
            await asyncio.sleep(0.02)
    raise AssertionError(f"could not pause task {task_id}")


def _tmux(sock: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["tmux", "-S", sock, *args], env=env, capture_output=True, text=True, timeout=10
    )
    return done.stdout


@pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"
)
def test_tale_chat_in_a_terminal_streams_a_reply(tui_daemon: Daemon) -> None:
    """The real `tale chat` in tmux: a typed message gets a reply on the screen, ctrl+q quits."""
    home = tui_daemon.home
    sock = str(home.root / "tmux.sock")
    env = {**home.env, "TERM": "xterm-256color", "TALE_SOCKET": str(home.socket)}
    command = f"{sys.executable} -m tale_client.cli chat --no-start"
    _tmux(sock, "new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", command, env=env)
    try:
        deadline = time.monotonic() + 30
        screen = ""
        while "Say something" not in screen:
            assert time.monotonic() < deadline, f"the chat did not open:\n{screen}"
            time.sleep(0.1)
            screen = _tmux(sock, "capture-pane", "-p", "-t", "tui")
        # A new conversation: the reply is small talk, not news of earlier tests' tasks.
        _tmux(sock, "send-keys", "-t", "tui", "C-n")
        _tmux(sock, "send-keys", "-t", "tui", "-l", "Hello there")
        _tmux(sock, "send-keys", "-t", "tui", "Enter")
        deadline = time.monotonic() + 90
        while not re.search(r"\d+ tokens", screen):
            assert time.monotonic() < deadline, f"no reply on the screen:\n{screen}"
            time.sleep(0.1)
            screen = _tmux(sock, "capture-pane", "-p", "-t", "tui")
        # The reply's box: from its title to the token line, with text in between.
        box = screen[screen.index("─ tale ─") :]
        body = box[: re.search(r"\d+ tokens", box).start()]  # type: ignore[union-attr]
        assert re.search(r"│ +\S", body), f"the reply box is empty:\n{screen}"
        assert "Hello there" in screen
        _tmux(sock, "send-keys", "-t", "tui", "C-q")
        deadline = time.monotonic() + 10
        while "tui" in _tmux(sock, "list-sessions"):
            assert time.monotonic() < deadline, "ctrl+q did not quit the app"
            time.sleep(0.1)
    finally:
        _tmux(sock, "kill-server")


RUN_APPROVAL = Approval.from_dict(
    {
        "id": "7c1e2a9b3d4f",
        "task_id": "5eed5eed5eed",
        "kind": "tool",
        "tool": "run",
        "summary": "run: make clean",
        "arguments": {"command": "make clean"},
        "rule": "run:make",
    }
)


@pytest.mark.parametrize(
    ("keys", "verdict", "always", "text"),
    [
        (["a"], Verdict.APPROVE, False, ""),
        (["A"], Verdict.APPROVE, True, ""),
        (["d", *"use rm", "enter"], Verdict.DENY, False, "use rm"),
        (["D", "enter"], Verdict.DENY, True, ""),
    ],
)
def test_the_approval_dialogs_keys_decide(
    keys: list[str], verdict: Verdict, always: bool, text: str
) -> None:
    """a approves, A approves always, d opens the reason box and enter denies, D denies always."""

    async def scenario() -> None:
        app = build_app("board", socket=Path("/nonexistent/taled.sock"), live=False)
        decided: list[Decision | None] = []
        async with app.run_test(size=SIZE) as pilot:
            await app.push_screen(ApprovalScreen(RUN_APPROVAL), decided.append)
            await pilot.press(*keys)
            await until(pilot, lambda: bool(decided), "the decision")
        assert decided == [Decision(RUN_APPROVAL, verdict, always=always, text=text)]

    run(scenario)


def test_the_question_dialog_sends_the_answer_typed() -> None:
    """A question's dialog has an answer box: what is typed there, enter sends."""
    question = replace(RUN_APPROVAL, kind=ApprovalKind.QUESTION, summary="Which greeting?")

    async def scenario() -> None:
        app = build_app("board", socket=Path("/nonexistent/taled.sock"), live=False)
        decided: list[Decision | None] = []
        async with app.run_test(size=SIZE) as pilot:
            await app.push_screen(ApprovalScreen(question), decided.append)
            await pilot.press("enter")  # nothing typed: nothing sent
            assert isinstance(app.screen, ApprovalScreen)
            await pilot.press(*"a warm one", "enter")
            await until(pilot, lambda: bool(decided), "the decision")
        assert decided == [Decision(question, Verdict.ANSWER, text="a warm one")]

    run(scenario)


def test_an_approval_shows_on_the_board_and_approving_it_lets_the_task_go_on(
    acting_daemon: Daemon,
) -> None:
    """A task's run call waiting for approval marks its card and shows in the banner; a then
    a in the dialog approves it, and the task runs the command and completes."""
    task_id = acting_daemon.call("submit_task", text="[[script:tui-run]] make hi", act=True)["id"]

    async def scenario() -> None:
        app = build_app("board", socket=acting_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            board = app.board_screen
            await until(pilot, lambda: asking(app, task_id) == 1, "the card marked")
            assert card_column(app, task_id) == "waiting"
            card = board.query_one(f"#card-{task_id}", TaskCard)
            assert "waiting for you" in str(card.render())
            banner = board.query_one("#board-approvals", ApprovalBanner)
            assert banner.display
            assert "run: echo hi > hi.txt" in str(banner.render())
            board.select(task_id)
            await pilot.press("a")
            await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the dialog")
            dialog = app.screen
            assert isinstance(dialog, ApprovalScreen)
            assert dialog.approval.task_id == task_id
            assert dialog.approval.summary == "run: echo hi > hi.txt"
            await pilot.press("a")
            await until(pilot, lambda: card_column(app, task_id) == "done", "the task to complete")
            await until(
                pilot,
                lambda: all(a.task_id != task_id for a in board.approvals),
                "the approval to leave the banner",
            )

    run(scenario)
    done = acting_daemon.call("get_task", id=task_id)
    # The text turn after it is the model's finish, a call of its own.
    assert [(c["tool"], c["outcome"]) for c in done["tool_calls"]] == [
        ("run", "ok"),
        ("finish", "ok"),
    ]
    assert done["result"] == "wrote hi.txt"


def test_task_screen_lists_tool_calls_as_they_happen(acting_daemon: Daemon) -> None:
    """An acting task's screen lists its calls with their outcomes, and the ones made after
    its run is approved there (a, then a in the dialog) join the list."""
    task = acting_daemon.call("submit_task", text="[[script:tui-steps]] make two", act=True)
    task_id = task["id"]
    acting_daemon.wait_for(task_id, ("waiting", "completed", "failed"))

    async def scenario() -> None:
        app = build_app("board", socket=acting_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.api is not None, "the connection")
            app.open_task(task_id)
            await until(pilot, lambda: isinstance(app.screen, TaskScreen), "the task screen")
            screen = app.screen
            assert isinstance(screen, TaskScreen)
            await until(pilot, lambda: screen.shown is not None, "the task")
            await until(
                pilot,
                lambda: tool_rows(screen) == [("write_file", "ok"), ("list_files", "ok")],
                "the two calls made before the run",
            )
            banner = screen.query_one("#task-approvals", ApprovalBanner)
            assert "run: echo b > b.txt" in str(banner.render())
            await pilot.press("a")
            await until(pilot, lambda: isinstance(app.screen, ApprovalScreen), "the dialog")
            await pilot.press("a")
            await until(
                pilot, lambda: tool_rows(screen)[2:3] == [("run", "ok")], "the run call listed"
            )
            await until(pilot, lambda: getattr(screen.shown, "final", False), "the task's end")
            assert screen.shown is not None and screen.shown.state == "completed"
            # The text turn that ended it is the model's finish, listed too.
            assert tool_rows(screen) == [
                ("write_file", "ok"),
                ("list_files", "ok"),
                ("run", "ok"),
                ("finish", "ok"),
            ]
            assert not banner.display

    run(scenario)


def test_task_screen_shows_the_diff_of_what_the_task_changed(acting_daemon: Daemon) -> None:
    """D on an acting task's screen opens the Diff tab with the task's change to its files."""
    task_id = acting_daemon.call("submit_task", text="[[script:tui-write]] greet", act=True)["id"]
    assert acting_daemon.wait_for(task_id)["state"] == "completed"

    async def scenario() -> None:
        app = build_app("board", socket=acting_daemon.home.socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.api is not None, "the connection")
            app.open_task(task_id)
            await until(pilot, lambda: isinstance(app.screen, TaskScreen), "the task screen")
            screen = app.screen
            assert isinstance(screen, TaskScreen)
            await until(pilot, lambda: screen.shown is not None, "the task")
            await pilot.press("D")
            await until(pilot, lambda: screen.diff is not None, "the diff")
            assert screen.query_one("#task-tabs", TabbedContent).active == "tab-diff"
            assert screen.diff is not None and "+hello tui" in screen.diff.diff
            assert "hello.txt" in screen.diff.diff

    run(scenario)
