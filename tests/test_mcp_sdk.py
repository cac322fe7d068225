"""Editors' path: the official MCP SDK client talks to the daemon through `tale mcp`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.shared.exceptions import MCPError

from tests.harness import Daemon, Home


def _bridge(daemon: Daemon) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "tale_client.cli", "mcp"], env=daemon.home.env
    )


async def _with_session(daemon: Daemon, body: Any) -> Any:
    async with (
        stdio_client(_bridge(daemon)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await body(session)


def run(daemon: Daemon, body: Any) -> Any:
    return anyio.run(_with_session, daemon, body)


def test_sdk_client_lists_tools_with_real_schemas(shared_daemon: Daemon) -> None:
    """tools/list over `tale mcp` publishes every tool with an object schema."""

    async def body(session: ClientSession) -> types.ListToolsResult:
        return await session.list_tools()

    result = run(shared_daemon, body)
    tools = {t.name: t for t in result.tools}
    assert {"submit_task", "get_task", "list_tasks", "cancel_task", "usage"} <= set(tools)
    submit = tools["submit_task"].input_schema
    assert submit["type"] == "object"
    assert submit["required"] == ["text"]
    assert submit["properties"]["priority"]["minimum"] == 0
    assert submit["additionalProperties"] is False


def test_sdk_client_submits_and_reads_a_task(shared_daemon: Daemon) -> None:
    """submit_task then get_task through the SDK returns the stored task."""

    async def body(session: ClientSession) -> tuple[Any, Any]:
        submitted = await session.call_tool("submit_task", {"text": "Name a colour", "priority": 7})
        assert submitted.structured_content is not None
        task_id = submitted.structured_content["id"]
        got = await session.call_tool("get_task", {"id": task_id})
        return submitted.structured_content, got.structured_content

    submitted, got = run(shared_daemon, body)
    assert got["id"] == submitted["id"]
    assert got["priority"] == 7
    assert got["text"] == "Name a colour"


def test_sdk_client_gets_bad_arguments_as_a_tool_error(shared_daemon: Daemon) -> None:
    """Bad arguments reach an SDK client as an isError result naming the field, with the
    JSON-RPC code -32602 in its structured content (MCP: the model can correct itself)."""

    async def body(session: ClientSession) -> types.CallToolResult:
        return await session.call_tool("submit_task", {"text": "x", "priority": -3})

    result = run(shared_daemon, body)
    assert result.is_error
    (text,) = result.content
    assert isinstance(text, types.TextContent)
    assert "priority" in text.text
    assert result.structured_content == {"error": {"code": -32602, "message": text.text}}


def test_sdk_client_gets_an_unknown_tool_as_a_protocol_error(shared_daemon: Daemon) -> None:
    """A tool that does not exist stays a JSON-RPC -32602 error, listing the tools."""

    async def body(session: ClientSession) -> MCPError:
        with pytest.raises(MCPError) as info:
            await session.call_tool("no_such_tool", {})
        return info.value

    error = run(shared_daemon, body)
    assert error.code == -32602
    assert "unknown tool 'no_such_tool'" in error.message
    assert "submit_task" in error.message


def test_sdk_client_pings(shared_daemon: Daemon) -> None:
    """ping is answered."""

    async def body(session: ClientSession) -> object:
        return await session.send_ping()

    run(shared_daemon, body)


def test_tale_mcp_in_an_editors_minimal_environment_finds_the_shells_daemon(
    login_runtime_dir: Path,
) -> None:
    """`tale mcp` launched with only the SDK's default variables reaches the running daemon."""
    assert "XDG_RUNTIME_DIR" not in get_default_environment()
    home = Home(extra_env={"XDG_RUNTIME_DIR": str(login_runtime_dir)})
    daemon = Daemon(home)
    try:
        daemon.start()
        task_id = home.tale("submit", "Name a colour").stdout.strip()
        # What an editor passes: the SDK's default variables, HOME isolated in the test home.
        editor = StdioServerParameters(
            command=sys.executable,
            args=["-m", "tale_client.cli", "mcp"],
            env={"HOME": str(home.root)},
        )

        async def get_task() -> Any:
            async with (
                stdio_client(editor) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await session.call_tool("get_task", {"id": task_id})

        got = anyio.run(get_task)
        assert got.structured_content is not None
        assert got.structured_content["id"] == task_id
    finally:
        daemon.kill_if_running()
        home.cleanup()
