"""MCP resources: tasks, schedules and the daemon's status, read through `tale mcp`."""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from tests.harness import Daemon
from tests.test_mcp_sdk import run


def _json(result: types.ReadResourceResult) -> Any:
    (content,) = result.contents
    assert isinstance(content, types.TextResourceContents)
    assert content.mime_type == "application/json"
    return json.loads(content.text)


def test_lists_the_resources_and_templates(shared_daemon: Daemon) -> None:
    """resources/list and resources/templates/list name every resource, as JSON."""

    async def body(session: ClientSession) -> Any:
        init = session.initialize_result
        assert init is not None
        return init, await session.list_resources(), await session.list_resource_templates()

    init, listed, templates = run(shared_daemon, body)
    assert init.capabilities.resources is not None
    assert {r.uri for r in listed.resources} == {
        "tale://tasks",
        "tale://schedules",
        "tale://dashboard",
    }
    assert {t.uri_template for t in templates.resource_templates} == {
        "task://{id}",
        "schedule://{id}",
    }
    for item in [*listed.resources, *templates.resource_templates]:
        assert item.mime_type == "application/json"
        assert item.title and item.description


def test_task_resource_is_what_get_task_returns(shared_daemon: Daemon) -> None:
    """task://ID holds the task get_task returns; tale://tasks lists it."""

    async def body(session: ClientSession) -> Any:
        submitted = await session.call_tool("submit_task", {"text": "Name a river", "priority": 9})
        assert submitted.structured_content is not None
        task_id = submitted.structured_content["id"]
        got = await session.call_tool("get_task", {"id": task_id})
        read = _json(await session.read_resource(f"task://{task_id}"))
        listed = _json(await session.read_resource("tale://tasks"))
        return task_id, got.structured_content, read, listed

    task_id, got, read, listed = run(shared_daemon, body)
    for field in ("id", "text", "priority", "created_at"):
        assert read[field] == got[field]
    assert (read["id"], read["text"], read["priority"]) == (task_id, "Name a river", 9)
    assert "subtasks" in read
    assert task_id in [t["id"] for t in listed["tasks"]]


def test_schedule_resource_by_id_and_prefix(shared_daemon: Daemon) -> None:
    """schedule://ID (or a unique prefix) holds what get_schedule returns; tale://schedules
    lists it."""

    async def body(session: ClientSession) -> Any:
        made = await session.call_tool(
            "submit_task", {"text": "Water the plants", "every": "daily 07:00"}
        )
        assert made.structured_content is not None
        schedule_id = made.structured_content["id"]
        got = await session.call_tool("get_schedule", {"id": schedule_id})
        read = _json(await session.read_resource(f"schedule://{schedule_id}"))
        by_prefix = _json(await session.read_resource(f"schedule://{schedule_id[:10]}"))
        listed = _json(await session.read_resource("tale://schedules"))
        return schedule_id, got.structured_content, read, by_prefix, listed

    schedule_id, got, read, by_prefix, listed = run(shared_daemon, body)
    assert read == got
    assert read["id"] == by_prefix["id"] == schedule_id
    assert "history" in read
    assert schedule_id in [s["id"] for s in listed["schedules"]]


def test_dashboard_resource_is_the_daemon_status(shared_daemon: Daemon) -> None:
    """tale://dashboard holds daemon_status's answer."""

    async def body(session: ClientSession) -> Any:
        status = await session.call_tool("daemon_status", {})
        return status.structured_content, _json(await session.read_resource("tale://dashboard"))

    status, read = run(shared_daemon, body)
    assert set(read) == set(status)
    assert read["version"] == status["version"]


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("task://0123456789ab", "no task with id 0123456789ab"),
        ("task://XYZ", "not a task id"),
        ("schedule://fedcba987654", "no schedule with id"),
        ("tale://nothing", "resources: tale://tasks"),
    ],
)
def test_unknown_resource_is_an_error_naming_it(shared_daemon: Daemon, uri: str, says: str) -> None:
    """A URI or id that names nothing is a JSON-RPC -32602 error (the SDK's code for a
    missing resource) carrying the URI, with a message that says what exists."""

    async def body(session: ClientSession) -> MCPError:
        with pytest.raises(MCPError) as info:
            await session.read_resource(uri)
        return info.value

    error = run(shared_daemon, body)
    assert error.code == types.INVALID_PARAMS
    assert says in error.message
    assert error.data == {"uri": uri}
