"""MCP elicitation: a client following a task with ``watch_task`` is asked, as a form,
about the tool calls the task waits to have approved and the questions its model asks.

The real daemon on its socket, reached by the official SDK client through ``tale mcp``
(the editor's path); the task model is the scripted OpenAI-compatible stand-in
(tests/standins/openai_scripted.py), which makes the model call ``run`` (the default
policy asks about it) or ``ask_user`` on demand.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext, ClientSession, ElicitationFnT
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.harness import Daemon, Home
from tests.standins.openai_scripted import ScriptedServer, scripted_server


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


SCRIPT: dict[str, Any] = {
    "run": [_call("run", command="touch ran.txt"), _call("finish", result="ran it")],
    "deny": [_call("run", command="rm -rf build"), _call("finish", result="could not")],
    "ask": [_call("ask_user", question="Which greeting?"), _call("finish", result="asked")],
    "always": [_call("run", command="mkdir made"), _call("finish", result="made it")],
    "always-again": [_call("run", command="mkdir again"), _call("finish", result="again")],
}

# How long one test may follow its task before it is a failure, not a slow machine.
TIMEOUT = 120
ELICITATION_LOGGER = "taled.daemon.elicitation"

Setup = tuple[Daemon, ScriptedServer, Home]


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    home = Home()
    with scripted_server(SCRIPT) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        daemon = Daemon(home).start()
        try:
            yield daemon, server, home
        finally:
            daemon.kill_if_running()
            home.cleanup()


class Forms:
    """An elicitation callback: records each form and answers with the next reply."""

    def __init__(self, *replies: types.ElicitResult) -> None:
        self.replies = list(replies)
        self.asked: list[types.ElicitRequestFormParams] = []
        self.answered = anyio.Event()

    async def __call__(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        assert isinstance(params, types.ElicitRequestFormParams), params
        self.asked.append(params)
        reply = self.replies.pop(0)
        self.answered.set()
        return reply


def _accept(**content: Any) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content=content)


@asynccontextmanager
async def _session(daemon: Daemon, on_form: ElicitationFnT | None) -> AsyncIterator[ClientSession]:
    """An SDK client session on the daemon, declaring elicitation when given a callback."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "tale_client.cli", "mcp"], env=daemon.home.env
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, elicitation_callback=on_form) as session,
    ):
        await session.initialize()
        yield session


async def _watch(session: ClientSession, task_id: str, lines: list[str]) -> dict[str, Any]:
    """watch_task to the end, keeping its progress lines."""

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        lines.append(message or "")

    result = await session.call_tool("watch_task", {"id": task_id}, progress_callback=on_progress)
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


def _follow(daemon: Daemon, task_id: str, forms: Forms) -> dict[str, Any]:
    """Follow a task from a client that answers forms with ``forms``; the ended task."""

    async def main() -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, forms) as session:
                return await _watch(session, task_id, [])

    return anyio.run(main)


def _tool_messages(server: ScriptedServer, mark: str) -> list[str]:
    """The tool results the model was sent, in the latest request for a task."""
    for body in reversed(server.requests):
        texts = [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "user"]
        if any(mark in t for t in texts):
            return [str(m.get("content", "")) for m in body["messages"] if m.get("role") == "tool"]
    return []


def _first_call(task: dict[str, Any]) -> tuple[str, str]:
    """The first tool call of a task: its tool and outcome."""
    first = task["tool_calls"][0]
    return first["tool"], first["outcome"]


def _log_lines(daemon: Daemon, *words: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if all(w in line for w in words)]


def _pending(daemon: Daemon, task_id: str) -> list[dict[str, Any]]:
    approvals: list[dict[str, Any]] = daemon.call("list_approvals", task=task_id)["approvals"]
    return approvals


def test_approving_in_the_clients_form_runs_the_call_and_the_task_completes(setup: Setup) -> None:
    """Accepting "approve" in the form lets the call run, as the approve tool would."""
    daemon, _server, home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    forms = Forms(_accept(decision="approve"))
    done = _follow(daemon, task["id"], forms)
    assert done["state"] == "completed", done
    [form] = forms.asked
    assert form.message == f"Task {task['id']} wants to run: `touch ran.txt` (tool run). Approve?"
    schema = form.requested_schema
    assert schema["required"] == ["decision"]
    assert schema["properties"]["decision"]["enum"] == ["approve", "deny"]
    assert schema["properties"]["always"]["type"] == "boolean"
    assert "run:touch" in schema["properties"]["always"]["description"]
    assert schema["properties"]["reason"]["type"] == "string"
    assert _first_call(done) == ("run", "ok")
    assert (home.data / "workspaces" / task["id"] / "ran.txt").exists()
    assert any(t["reason"] == "run: touch ran.txt: approved" for t in done["transitions"])
    decided = _log_lines(daemon, "approved through MCP elicitation", f"(task {task['id']})")
    assert len(decided) == 1, daemon.log_text()[-2000:]


def test_always_in_the_form_adds_the_rule_so_the_next_such_call_runs_unasked(
    setup: Setup,
) -> None:
    """ "always" with approve adds the approval's rule, as `tale approve --always` does."""
    daemon, _server, _home = setup
    first = daemon.call("submit_task", text="[[script:always]] make a directory", act=True)
    done = _follow(daemon, first["id"], Forms(_accept(decision="approve", always=True)))
    assert done["state"] == "completed", done
    assert daemon.call("list_tools")["rules"].get("run:mkdir") == "allow"
    second = daemon.call("submit_task", text="[[script:always-again]] another one", act=True)
    again = daemon.wait_for(second["id"], ("completed", "failed", "waiting"))
    assert again["state"] == "completed", again


def test_a_denial_in_the_form_and_its_reason_go_back_to_the_model(setup: Setup) -> None:
    """Accepting "deny" with a reason refuses the call; the model reads the reason."""
    daemon, server, _home = setup
    task = daemon.call("submit_task", text="[[script:deny]] clean the build", act=True)
    forms = Forms(_accept(decision="deny", reason="use make clean instead"))
    done = _follow(daemon, task["id"], forms)
    assert done["state"] == "completed", done
    assert [c["outcome"] for c in done["tool_calls"]][:1] == ["denied"]
    results = _tool_messages(server, "[[script:deny]]")
    assert any("denied" in r and "use make clean instead" in r for r in results), results


def test_a_question_is_asked_in_the_form_and_the_answer_reaches_the_model(
    setup: Setup,
) -> None:
    """A model's ask_user question is the form's message; the typed answer goes to it."""
    daemon, server, _home = setup
    task = daemon.call("submit_task", text="[[script:ask]] greet someone", act=True)
    forms = Forms(_accept(answer="a cheerful one"))
    done = _follow(daemon, task["id"], forms)
    assert done["state"] == "completed", done
    [form] = forms.asked
    assert form.message == f"Task {task['id']} asks: Which greeting?"
    assert form.requested_schema["required"] == ["answer"]
    assert set(form.requested_schema["properties"]) == {"answer"}
    assert any("a cheerful one" in r for r in _tool_messages(server, "[[script:ask]]"))


def test_declining_the_form_leaves_the_approval_to_the_approve_tool(setup: Setup) -> None:
    """A declined form is not asked again in that watch; the approval stays pending and
    the approve tool, called meanwhile on the same session, lets the task finish."""
    daemon, _server, _home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    forms = Forms(types.ElicitResult(action="decline"))
    lines: list[str] = []
    done: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, forms) as session, anyio.create_task_group() as tg:

                async def watch() -> None:
                    done.update(await _watch(session, task["id"], lines))

                tg.start_soon(watch)
                await forms.answered.wait()
                while not _log_lines(daemon, ELICITATION_LOGGER, "chose decline"):
                    await anyio.sleep(0.05)
                # The watch reads the store every second: a few rounds with no new form.
                await anyio.sleep(2.5)
                [pending] = await anyio.to_thread.run_sync(_pending, daemon, task["id"])
                assert pending["summary"] == "run: touch ran.txt"
                approved = await session.call_tool("approve", {"id": pending["id"]})
                assert approved.structured_content is not None
                assert approved.structured_content["state"] == "approved"

    anyio.run(main)
    assert done["state"] == "completed", done
    assert len(forms.asked) == 1
    assert any(line.startswith("waiting for you: run: touch ran.txt") for line in lines), lines


def test_a_client_without_elicitation_is_never_asked_and_the_watch_ends_with_the_task(
    setup: Setup,
) -> None:
    """No elicitation capability: today's behaviour, progress lines only, no form sent."""
    daemon, _server, _home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    lines: list[str] = []
    done: dict[str, Any] = {}
    approval_id = ""

    async def main() -> None:
        nonlocal approval_id
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, None) as session, anyio.create_task_group() as tg:

                async def watch() -> None:
                    done.update(await _watch(session, task["id"], lines))

                tg.start_soon(watch)
                while not any(line.startswith("waiting for you") for line in lines):
                    await anyio.sleep(0.05)
                listed = await session.call_tool("list_approvals", {"task": task["id"]})
                assert listed.structured_content is not None
                [pending] = listed.structured_content["approvals"]
                approval_id = pending["id"]
                await session.call_tool("approve", {"id": approval_id})

    anyio.run(main)
    assert done["state"] == "completed", done
    waiting = next(line for line in lines if line.startswith("waiting for you"))
    assert f"`tale approve {approval_id[:8]}`" in waiting
    assert _log_lines(daemon, ELICITATION_LOGGER, approval_id) == []


def test_an_approval_decided_with_the_cli_while_its_form_is_open_withdraws_the_form(
    setup: Setup,
) -> None:
    """`tale approve` while the form is open: the form is cancelled, the watch goes on and
    ends with the completed task."""
    daemon, _server, home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    opened = anyio.Event()
    withdrawn: list[bool] = []

    async def hold_open(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        opened.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            withdrawn.append(True)
            raise
        raise AssertionError("unreachable")

    done: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, hold_open) as session, anyio.create_task_group() as tg:

                async def watch() -> None:
                    done.update(await _watch(session, task["id"], []))

                tg.start_soon(watch)
                await opened.wait()
                [pending] = await anyio.to_thread.run_sync(_pending, daemon, task["id"])
                approved = await anyio.to_thread.run_sync(home.tale, "approve", pending["id"])
                assert approved.returncode == 0, approved.stderr

    anyio.run(main)
    assert done["state"] == "completed", done
    assert _first_call(done) == ("run", "ok")
    assert withdrawn == [True]


def test_a_form_withdrawn_by_a_pause_is_asked_again_when_the_task_waits_again(
    setup: Setup,
) -> None:
    """Pausing the waiting task withdraws its form (not the person's choice); once
    resumed, the task waits again and the same watch asks again."""
    daemon, _server, _home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    opened: list[anyio.Event] = [anyio.Event(), anyio.Event()]
    withdrawn = anyio.Event()

    async def hold_then_approve(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        if not opened[0].is_set():
            opened[0].set()
            try:
                await anyio.sleep_forever()
            finally:
                withdrawn.set()
        opened[1].set()
        return _accept(decision="approve")

    done: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            async with (
                _session(daemon, hold_then_approve) as session,
                anyio.create_task_group() as tg,
            ):

                async def watch() -> None:
                    done.update(await _watch(session, task["id"], []))

                tg.start_soon(watch)
                await opened[0].wait()
                await session.call_tool("pause_task", {"id": task["id"]})
                await withdrawn.wait()
                await session.call_tool("resume_task", {"id": task["id"]})
                await opened[1].wait()

    anyio.run(main)
    assert done["state"] == "completed", done
    assert _first_call(done) == ("run", "ok")


def test_progress_keeps_coming_while_the_form_is_open(setup: Setup) -> None:
    """The form is asked in the background: the watch's heartbeat lines go on arriving
    while the person thinks, so a client reading with a timeout keeps the daemon."""
    daemon, _server, _home = setup
    task = daemon.call("submit_task", text="[[script:run]] run it", act=True)
    opened: list[float] = []

    async def hold_open(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        opened.append(time.monotonic())
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    heard: list[tuple[float, str]] = []
    done: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, hold_open) as session, anyio.create_task_group() as tg:

                async def on_progress(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    heard.append((time.monotonic(), message or ""))

                async def watch() -> None:
                    result = await session.call_tool(
                        "watch_task", {"id": task["id"]}, progress_callback=on_progress
                    )
                    assert result.structured_content is not None
                    done.update(result.structured_content)

                tg.start_soon(watch)
                # The unchanged line is repeated every 10 s; one after the form opened.
                while not (
                    opened
                    and any(
                        at > opened[0] + 1 and m.startswith("waiting for you") for at, m in heard
                    )
                ):
                    await anyio.sleep(0.1)
                [pending] = await anyio.to_thread.run_sync(_pending, daemon, task["id"])
                await session.call_tool("approve", {"id": pending["id"]})

    anyio.run(main)
    assert done["state"] == "completed", done
    assert len(opened) == 1


def test_an_answer_arriving_after_the_cli_decided_is_dropped_and_the_watch_goes_on(
    setup: Setup,
) -> None:
    """A form answered after `tale approve` decided: the late "deny" changes nothing, the
    watch does not fail, and the task completes with the call run."""
    daemon, server, home = setup
    task = daemon.call("submit_task", text="[[script:deny]] clean the build", act=True)

    async def approve_then_deny(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        [pending] = await anyio.to_thread.run_sync(_pending, daemon, task["id"])
        approved = await anyio.to_thread.run_sync(home.tale, "approve", pending["id"])
        assert approved.returncode == 0, approved.stderr
        return _accept(decision="deny", reason="too late")

    async def main() -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            async with _session(daemon, approve_then_deny) as session:
                return await _watch(session, task["id"], [])

    done = anyio.run(main)
    assert done["state"] == "completed", done
    assert _first_call(done) == ("run", "ok")
    assert not any("too late" in r for r in _tool_messages(server, "[[script:deny]]"))
    # Either the late answer was dropped, or the watch saw the CLI's decision first and
    # withdrew the form: both leave the CLI's decision standing.
    handled = _log_lines(daemon, ELICITATION_LOGGER, "is not used") + _log_lines(
        daemon, ELICITATION_LOGGER, "withdrawn"
    )
    assert handled, daemon.log_text()[-2000:]


def test_tale_submit_wait_is_never_asked_and_ends_with_the_task(setup: Setup) -> None:
    """`tale`'s own client declares no elicitation: `tale submit --wait` follows a waiting
    task as before, with no form sent, and ends once `tale approve` lets it go on."""
    daemon, _server, home = setup
    approved: list[str] = []

    def approve_when_asked() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pending = daemon.call("list_approvals")["approvals"]
            if pending:
                approved.append(pending[0]["id"])
                home.tale("approve", pending[0]["id"])
                return
            time.sleep(0.05)

    approver = threading.Thread(target=approve_when_asked)
    approver.start()
    submitted = home.tale("submit", "--act", "--wait", "[[script:run]] run it", timeout=TIMEOUT)
    approver.join(TIMEOUT)
    assert submitted.returncode == 0, submitted.stderr
    assert "ran it" in submitted.stdout
    [approval_id] = approved
    assert _log_lines(daemon, ELICITATION_LOGGER, approval_id) == []
