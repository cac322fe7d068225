"""The MCP surface beyond tools/call: tool annotations and output schemas, tool errors
as results, rising progress, resource subscriptions, logging, prompts, cancellation,
and the MCP Inspector's view of it all.

The real daemon on its socket, reached by the official SDK client through ``tale mcp``
(the editor's path) or by tale's own thin client where the raw result matters.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import jsonschema
import mcp_types as types
import psutil
import pytest
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from tale_client.rpc import RpcError
from tests.harness import Daemon, Home
from tests.standins.openai_scripted import ScriptedServer, scripted_server

# How long a test waits for a notification before it is a failure, not a slow machine.
TIMEOUT = 60
MISSING = "0123456789ab"


class Inbox:
    """A client's message handler: keeps the server's notifications, and wakes waiters."""

    def __init__(self) -> None:
        self.notes: list[types.ServerNotification] = []
        self._arrived = anyio.Event()

    async def __call__(self, message: IncomingMessage) -> None:
        if isinstance(message, Exception):
            raise message
        if isinstance(message, types.ServerNotification):
            self.notes.append(message)
            self._arrived.set()
            self._arrived = anyio.Event()

    async def wait_for(self, found: Callable[[types.ServerNotification], bool]) -> Any:
        """The first notification ``found`` accepts, waiting for it if need be."""
        with anyio.fail_after(TIMEOUT):
            while True:
                for note in self.notes:
                    if found(note):
                        return note
                await self._arrived.wait()

    def updated(self) -> list[str]:
        return [
            n.params.uri for n in self.notes if isinstance(n, types.ResourceUpdatedNotification)
        ]


def _updated(uri: str) -> Callable[[types.ServerNotification], bool]:
    return lambda n: isinstance(n, types.ResourceUpdatedNotification) and n.params.uri == uri


def _logged(found: Callable[[Any], bool]) -> Callable[[types.ServerNotification], bool]:
    return lambda n: isinstance(n, types.LoggingMessageNotification) and found(n.params)


@asynccontextmanager
async def _session(daemon: Daemon, inbox: Inbox | None = None) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "tale_client.cli", "mcp"], env=daemon.home.env
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, message_handler=inbox) as session,
    ):
        await session.initialize()
        yield session


def _run(daemon: Daemon, body: Callable[[ClientSession, Inbox], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        inbox = Inbox()
        async with _session(daemon, inbox) as session:
            return await body(session, inbox)

    return anyio.run(main)


async def _list_tools(session: ClientSession, _inbox: Inbox) -> types.ListToolsResult:
    return await session.list_tools()


def _tools(daemon: Daemon) -> dict[str, types.Tool]:
    """tools/list through the SDK client, by name."""
    return {t.name: t for t in _run(daemon, _list_tools).tools}


async def _call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


async def _subscribe(session: ClientSession, uri: str) -> None:
    # The request itself: ClientSession.subscribe_resource warns that 2026-07-28 drops it.
    await session.send_request(
        types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult
    )


async def _unsubscribe(session: ClientSession, uri: str) -> None:
    await session.send_request(
        types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri)),
        types.EmptyResult,
    )


async def _set_level(session: ClientSession, level: types.LoggingLevel) -> None:
    await session.send_request(
        types.SetLevelRequest(params=types.SetLevelRequestParams(level=level)), types.EmptyResult
    )


async def _paused_task(session: ClientSession, text: str) -> str:
    """A task submitted and paused at once: it moves only when the test moves it."""
    task_id = str((await _call(session, "submit_task", text=text, priority=1))["id"])
    # A worker may take it between the two calls (queued → running): pause it again.
    for _ in range(3):
        paused = await session.call_tool("pause_task", {"id": task_id})
        if not paused.is_error:
            return task_id
    raise AssertionError(f"task {task_id} could not be paused: {paused}")


def _read_json(result: types.ReadResourceResult) -> Any:
    (content,) = result.contents
    assert isinstance(content, types.TextResourceContents)
    return json.loads(content.text)


# -- tools: annotations and output schemas ----------------------------------------


def test_every_tool_has_a_title_and_all_four_hints(shared_daemon: Daemon) -> None:
    """tools/list gives every tool a title and annotations with each hint set, none
    of them open-world."""

    tools = _tools(shared_daemon)
    for tool in tools.values():
        assert tool.title, tool.name
        hints = tool.annotations
        assert hints is not None, tool.name
        assert hints.read_only_hint is not None, tool.name
        assert hints.destructive_hint is not None, tool.name
        assert hints.idempotent_hint is not None, tool.name
        assert hints.open_world_hint is False, tool.name


def test_hints_say_what_each_kind_of_tool_does(shared_daemon: Daemon) -> None:
    """Reading tools are read-only; deleting and cancelling are destructive; submitting
    is neither destructive nor idempotent."""

    tools = _tools(shared_daemon)

    def hints(name: str) -> types.ToolAnnotations:
        found = tools[name].annotations
        assert found is not None
        return found

    for name in ("get_task", "list_tasks", "usage", "metrics", "task_diff"):
        assert hints(name).read_only_hint is True, name
    for name in ("delete_task", "purge_tasks", "cancel_task", "apply_task"):
        assert (hints(name).read_only_hint, hints(name).destructive_hint) == (False, True), name
    submit = hints("submit_task")
    assert (submit.read_only_hint, submit.destructive_hint, submit.idempotent_hint) == (
        False,
        False,
        False,
    )


def test_every_output_schema_is_a_valid_object_schema(shared_daemon: Daemon) -> None:
    """Every tool publishes an outputSchema that is a valid JSON Schema of an object."""

    for tool in _tools(shared_daemon).values():
        assert tool.output_schema is not None, tool.name
        assert tool.output_schema["type"] == "object", tool.name
        jsonschema.Draft202012Validator.check_schema(tool.output_schema)


def test_real_results_match_their_output_schemas(shared_daemon: Daemon) -> None:
    """The structuredContent of real calls of the tools fits each tool's outputSchema."""
    with shared_daemon.client() as conn:
        schemas = {t["name"]: t["outputSchema"] for t in conn.request("tools/list")["tools"]}
        results: list[tuple[str, dict[str, Any]]] = []

        def call(tool: str, **arguments: Any) -> dict[str, Any]:
            result = conn.call_tool(tool, arguments, on_event=lambda *_: None)
            results.append((tool, result))
            return result

        task = call("submit_task", text="Name a colour", priority=100)
        shared_daemon.wait_for(task["id"])
        call("get_task", id=task["id"])
        call("watch_task", id=task["id"])
        call("list_tasks")
        call("list_checkpoints", id=task["id"])
        waiting = call("submit_task", text="Name a fruit", priority=1)
        for _ in range(3):  # a worker may take it meanwhile (queued → running)
            with contextlib.suppress(RpcError):
                call("pause_task", id=waiting["id"])
                break
        call("resume_task", id=waiting["id"])
        call("set_priority", id=waiting["id"], priority=2)
        call("cancel_task", id=waiting["id"])
        schedule = call("submit_task", text="Water the plants", every="daily 07:00")
        call("list_schedules")
        call("get_schedule", id=schedule["id"])
        call("pause_schedule", id=schedule["id"])
        call("resume_schedule", id=schedule["id"])
        call("delete_schedule", id=schedule["id"])
        call("list_approvals")
        call("list_tools")
        turn = call("chat", text="Say hello.", new=True)
        call("get_conversation", id=turn["conversation"])
        call("list_conversations")
        call("detect_intent", text="Write a poem about rivers")
        for tool in ("usage", "metrics", "models_status", "daemon_status"):
            call(tool)
        call("purge_tasks", older_than="1s", dry_run=True)
        call("delete_task", id=waiting["id"])
    for tool, result in results:
        jsonschema.validate(result, schemas[tool])
    # What is not called here needs an acting task (diffs, approvals, checkpoints to
    # restore): tests/test_acting*.py call those through the SDK, which validates too.
    assert {tool for tool, _ in results} >= set(schemas) - {
        "task_diff",
        "apply_task",
        "restore_checkpoint",
        "approve",
        "deny",
        "answer",
    }


# -- tool errors --------------------------------------------------------------------


def test_a_refused_call_is_an_error_result_carrying_its_code(shared_daemon: Daemon) -> None:
    """A handler's error (an unknown task) is a result with isError, its message as text
    and {"error": {"code", "message"}} as structuredContent, not a JSON-RPC error."""
    with shared_daemon.client() as conn:
        result = conn.request("tools/call", {"name": "cancel_task", "arguments": {"id": MISSING}})
    assert result["isError"] is True
    message = result["content"][0]["text"]
    assert f"no task with id {MISSING}" in message
    assert result["structuredContent"] == {"error": {"code": -32001, "message": message}}


def test_thin_client_raises_the_error_results_code_and_message(shared_daemon: Daemon) -> None:
    """tale's own client turns an isError result into the RpcError it always raised."""
    with shared_daemon.client() as conn, pytest.raises(RpcError) as info:
        conn.call_tool("get_task", {"id": MISSING})
    assert info.value.code == -32001
    assert f"no task with id {MISSING}" in info.value.message


def test_bridge_passes_an_error_result_through_unchanged(shared_daemon: Daemon) -> None:
    """`tale mcp` relays an isError result to an SDK client as the daemon wrote it."""

    async def body(session: ClientSession, _inbox: Inbox) -> types.CallToolResult:
        return await session.call_tool("resume_task", {"id": MISSING})

    result = _run(shared_daemon, body)
    assert result.is_error
    assert result.structured_content is not None
    assert result.structured_content["error"]["code"] == -32001


# -- progress -------------------------------------------------------------------------


def test_watch_task_progress_strictly_increases(shared_daemon: Daemon) -> None:
    """Every progress value of one watch_task call is larger than the one before, and
    one with a total stays within it."""
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async def body(session: ClientSession, _inbox: Inbox) -> None:
        task = await _call(session, "submit_task", text="Name a colour", priority=100)
        with anyio.fail_after(TIMEOUT * 2):
            await session.call_tool("watch_task", {"id": task["id"]}, progress_callback=on_progress)
            # Again, ended: its one line (progress 0) must still rise from nothing.
            await session.call_tool("watch_task", {"id": task["id"]}, progress_callback=on_progress)

    _run(shared_daemon, body)
    first = seen[:-1]
    assert len(first) >= 2, seen
    values = [p for p, _ in first]
    assert values == sorted(set(values)), values
    assert all(p <= total for p, total in first if total is not None), first


def test_chat_progress_strictly_increases(shared_daemon: Daemon) -> None:
    """Every progress value of one streamed chat reply is larger than the one before."""
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    async def body(session: ClientSession, _inbox: Inbox) -> None:
        await session.call_tool(
            "chat", {"text": "Name three colours.", "new": True}, None, on_progress
        )

    _run(shared_daemon, body)
    assert values, "no progress"
    assert values == sorted(set(values)), values


# -- resource subscriptions -----------------------------------------------------------


def test_server_declares_subscribe_logging_and_prompts(shared_daemon: Daemon) -> None:
    """initialize declares resources.subscribe, logging and prompts."""

    async def body(session: ClientSession, _inbox: Inbox) -> types.ServerCapabilities:
        assert session.initialize_result is not None
        return session.initialize_result.capabilities

    capabilities = _run(shared_daemon, body)
    assert capabilities.resources is not None and capabilities.resources.subscribe is True
    assert capabilities.logging is not None
    assert capabilities.prompts is not None


def test_subscribed_task_is_updated_when_it_moves(shared_daemon: Daemon) -> None:
    """After resources/subscribe to task://ID, the task's state change sends
    notifications/resources/updated for that uri, and a read shows the new state."""

    async def body(session: ClientSession, inbox: Inbox) -> Any:
        task_id = await _paused_task(session, "Name a tree")
        uri = f"task://{task_id}"
        await _subscribe(session, uri)
        await _call(session, "cancel_task", id=task_id)
        await inbox.wait_for(_updated(uri))
        return _read_json(await session.read_resource(uri))

    assert _run(shared_daemon, body)["state"] == "cancelled"


def test_subscribed_task_list_is_updated_on_submit(shared_daemon: Daemon) -> None:
    """A subscription to tale://tasks is told when a task is submitted."""

    async def body(session: ClientSession, inbox: Inbox) -> None:
        await _subscribe(session, "tale://tasks")
        task = await _call(session, "submit_task", text="Name a bird", priority=1)
        await inbox.wait_for(_updated("tale://tasks"))
        await _call(session, "cancel_task", id=task["id"])

    _run(shared_daemon, body)


def test_unsubscribed_task_is_not_updated(shared_daemon: Daemon) -> None:
    """After resources/unsubscribe, a task's moves send nothing for its uri."""

    async def body(session: ClientSession, inbox: Inbox) -> tuple[str, list[str]]:
        dropped = await _paused_task(session, "Name a lake")
        kept = await _paused_task(session, "Name a hill")
        await _subscribe(session, f"task://{dropped}")
        await _subscribe(session, f"task://{kept}")
        await _unsubscribe(session, f"task://{dropped}")
        await _call(session, "cancel_task", id=dropped)
        await _call(session, "cancel_task", id=kept)
        # One sender sends a session's updates in order: the kept task's came after.
        await inbox.wait_for(_updated(f"task://{kept}"))
        return dropped, inbox.updated()

    dropped, updated = _run(shared_daemon, body)
    assert f"task://{dropped}" not in updated


def test_subscribing_to_a_missing_task_is_invalid_params(shared_daemon: Daemon) -> None:
    """resources/subscribe to a task that does not exist is -32602 with data.uri, as a
    read of it is."""

    async def body(session: ClientSession, _inbox: Inbox) -> MCPError:
        with pytest.raises(MCPError) as info:
            await _subscribe(session, f"task://{MISSING}")
        return info.value

    error = _run(shared_daemon, body)
    assert error.code == types.INVALID_PARAMS
    assert error.data == {"uri": f"task://{MISSING}"}


# -- logging ----------------------------------------------------------------------------


def test_refused_call_is_logged_to_a_session_at_warning(shared_daemon: Daemon) -> None:
    """After logging/setLevel warning, a refused tool call arrives as a warning
    notifications/message carrying its code."""

    async def body(session: ClientSession, inbox: Inbox) -> types.LoggingMessageNotification:
        await _set_level(session, "warning")
        await session.call_tool("get_task", {"id": MISSING})
        note: types.LoggingMessageNotification = await inbox.wait_for(
            _logged(lambda p: p.level == "warning")
        )
        return note

    note = _run(shared_daemon, body)
    assert note.params.data["code"] == -32001
    assert note.params.data["tool"] == "get_task"


def test_a_sessions_cancelled_task_is_logged_at_notice(shared_daemon: Daemon) -> None:
    """A task the session submitted and then cancelled is logged to it at notice, and
    nothing below the level it set arrives."""

    async def body(session: ClientSession, inbox: Inbox) -> list[types.LoggingMessageNotification]:
        await _set_level(session, "notice")
        task_id = await _paused_task(session, "Name a mountain")
        await _call(session, "cancel_task", id=task_id)
        await inbox.wait_for(
            _logged(lambda p: isinstance(p.data, dict) and p.data.get("to") == "cancelled")
        )
        return [n for n in inbox.notes if isinstance(n, types.LoggingMessageNotification)]

    notes = _run(shared_daemon, body)
    moves = [n.params for n in notes if n.params.logger == "taled.tasks"]
    # Its move to paused (debug) stayed below the level; only the cancel arrived.
    assert [(p.level, p.data["from"], p.data["to"]) for p in moves] == [
        ("notice", "paused", "cancelled")
    ]
    assert all(n.params.level not in ("debug", "info") for n in notes)


# -- prompts ------------------------------------------------------------------------------


def test_prompts_list_names_submit_and_summarise(shared_daemon: Daemon) -> None:
    """prompts/list offers submit (with its required task argument) and summarise."""

    async def body(session: ClientSession, _inbox: Inbox) -> types.ListPromptsResult:
        return await session.list_prompts()

    prompts = {p.name: p for p in _run(shared_daemon, body).prompts}
    assert set(prompts) == {"submit", "summarise"}
    (argument,) = prompts["submit"].arguments or []
    assert (argument.name, argument.required) == ("task", True)


def test_submit_prompt_asks_for_submit_task(shared_daemon: Daemon) -> None:
    """prompts/get submit is one user message asking to call submit_task with the task."""

    async def body(session: ClientSession, _inbox: Inbox) -> types.GetPromptResult:
        return await session.get_prompt("submit", {"task": "Sort the photos by date"})

    (message,) = _run(shared_daemon, body).messages
    assert message.role == "user"
    assert isinstance(message.content, types.TextContent)
    assert "submit_task" in message.content.text
    assert "Sort the photos by date" in message.content.text


def test_summarise_prompt_carries_the_task_list(shared_daemon: Daemon) -> None:
    """prompts/get summarise holds the current list_tasks answer as JSON."""

    async def body(session: ClientSession, _inbox: Inbox) -> tuple[str, types.GetPromptResult]:
        task = await _call(session, "submit_task", text="Name a planet", priority=1)
        await _call(session, "cancel_task", id=task["id"])
        return task["id"], await session.get_prompt("summarise")

    task_id, result = _run(shared_daemon, body)
    (message,) = result.messages
    assert isinstance(message.content, types.TextContent)
    text = message.content.text
    listed = json.loads(text[text.index("```json") + 7 : text.rindex("```")])
    assert task_id in [t["id"] for t in listed["tasks"]]


def test_prompt_without_its_required_argument_is_invalid_params(shared_daemon: Daemon) -> None:
    """prompts/get submit without task is -32602 naming the argument."""

    async def body(session: ClientSession, _inbox: Inbox) -> MCPError:
        with pytest.raises(MCPError) as info:
            await session.get_prompt("submit", {})
        return info.value

    error = _run(shared_daemon, body)
    assert error.code == types.INVALID_PARAMS
    assert "'task'" in error.message


# -- cancellation --------------------------------------------------------------------------

# A reply the stand-in streams a word every 0.2 s: a minute, unless the call stops.
LONG = " ".join(["word"] * 300)


@pytest.fixture(scope="module")
def slow_model() -> Iterator[tuple[Daemon, ScriptedServer]]:
    with scripted_server({"long": LONG}, delay=0.2) as server:
        home = Home({"TALE_MODELS__UX": server.spec, "TALE_MODELS__TASK": server.spec})
        daemon = Daemon(home).start()
        try:
            yield daemon, server
        finally:
            daemon.kill_if_running()
            home.cleanup()


def _streams_to(daemon: Daemon, server: ScriptedServer) -> int:
    """The daemon's open connections to the model stand-in (each call generating holds
    one)."""
    assert daemon.proc is not None
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    return sum(
        1
        for c in psutil.Process(daemon.proc.pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_cancelled_chat_stops_the_models_work(slow_model: tuple[Daemon, ScriptedServer]) -> None:
    """notifications/cancelled for a chat call in flight stops its model call: the
    daemon hangs up on the model's stream at once instead of reading it to the end."""
    daemon, server = slow_model
    pieces: list[str] = []
    streaming: list[int] = []

    async def body(session: ClientSession, _inbox: Inbox) -> None:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            pieces.append(message or "")

        # Leaving the scope cancels the request: the SDK sends notifications/cancelled.
        with anyio.move_on_after(TIMEOUT) as scope:

            async def chat() -> None:
                await session.call_tool(
                    "chat",
                    {"text": "Say hello. [[script:long]]", "new": True},
                    progress_callback=on_progress,
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(chat)
                while len("".join(pieces).split()) < 3:
                    await anyio.sleep(0.05)
                streaming.append(_streams_to(daemon, server))
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the reply never started streaming"
        # The session goes on: the daemon answers the next request on it.
        await session.send_ping()

    _run(daemon, body)
    # Other connections to the stand-in (an idle keep-alive one) may stay open; the
    # streaming one must go.
    (during,) = streaming
    assert during >= 1
    deadline = time.monotonic() + 10
    while _streams_to(daemon, server) >= during and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _streams_to(daemon, server) < during
    assert len("".join(pieces).split()) < 100


# -- the MCP Inspector -------------------------------------------------------------------


def test_inspector_cli_lists_the_tools_with_annotations(shared_daemon: Daemon) -> None:
    """`npx @modelcontextprotocol/inspector --cli tale mcp --method tools/list` lists
    every tool with its annotations."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx (Node.js) is not installed")
    command = [
        npx,
        "-y",
        "@modelcontextprotocol/inspector",
        "--cli",
        sys.executable,
        "-m",
        "tale_client.cli",
        "mcp",
        "--method",
        "tools/list",
    ]
    try:
        done = subprocess.run(
            command, env=shared_daemon.home.env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.skip("the inspector did not install and run within 10 minutes")
    if done.returncode != 0 and "npm" in done.stderr and "ERR" in done.stderr:
        pytest.skip(f"npx could not install the inspector: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr
    tools = {t["name"]: t for t in json.loads(done.stdout)["tools"]}
    assert "submit_task" in tools
    assert tools["get_task"]["annotations"]["readOnlyHint"] is True
    assert tools["delete_task"]["annotations"]["destructiveHint"] is True
