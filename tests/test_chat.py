"""Two pinned roles: the UX model answers people while the task model works."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tale_client.rpc import Connection, RpcError
from tests.harness import Daemon, running_daemon

LONG = "Write a very long story about a dragon, at least 2000 words."


def test_tale_ask_streams_the_ux_models_reply(shared_daemon: Daemon) -> None:
    """`tale ask` prints the reply on stdout and the call is in the ledger under role ux."""
    proc = shared_daemon.home.tale("ask", "Hello, who are you?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    # Ledger rows are group-committed after the reply; `tale usage` waits for them.
    usage = json.loads(shared_daemon.home.tale("usage", "--json").stdout)
    assert any(r["role"] == "ux" and r["calls"] >= 1 for r in usage["by_role"])
    db = shared_daemon.home.data / "tale.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT role, task_id, success FROM model_calls WHERE role = 'ux'"
        ).fetchall()
    assert ("ux", None, 1) in rows


def test_chat_streams_pieces_that_add_up_to_the_reply(shared_daemon: Daemon) -> None:
    """With a progress token, each notifications/progress carries the next piece of text."""
    pieces: list[str] = []
    with Connection(shared_daemon.home.socket) as conn:
        conn.initialize("tests")
        reply = conn.call_tool("chat", {"text": "Name three colours."}, on_progress=pieces.append)
    assert len(pieces) > 1, "the reply arrives in several pieces, not at once"
    assert "".join(pieces) == reply["text"]
    assert reply["tokens"]["completion"] > 0


def test_sdk_client_receives_chat_progress(shared_daemon: Daemon) -> None:
    """The official MCP client over `tale mcp` gets the streamed pieces via progress_callback."""
    received: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append(message or "")

    async def run() -> Any:
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "tale_client.cli", "mcp"],
            env=shared_daemon.home.env,
        )
        async with (
            stdio_client(params) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool(
                "chat", {"text": "Say hello."}, progress_callback=on_progress
            )

    result = anyio.run(run)
    assert result.structured_content is not None
    assert "".join(received) == result.structured_content["text"]


def test_chat_answers_while_the_task_model_is_busy() -> None:
    """A chat reply completes while a long task is still generating on the task role."""
    with running_daemon({"TALE_RUNNER__MAX_TOKENS": "1500"}) as daemon:
        task_id = daemon.call("submit_task", text=LONG)["id"]
        daemon.wait_for(task_id, ("running",))
        reply = daemon.call("chat", text="Say yes.")
        assert reply["text"]
        assert daemon.call("get_task", id=task_id)["state"] == "running"
        daemon.call("cancel_task", id=task_id)


def test_empty_and_oversized_chat_messages_are_invalid(shared_daemon: Daemon) -> None:
    """An empty or over-long chat message is -32602 with a message saying what is wrong."""
    for text, expected in (("   ", "empty"), ("", "empty"), ("x" * 4001, "limit is 4000")):
        try:
            shared_daemon.call("chat", text=text)
        except RpcError as exc:
            assert exc.code == -32602
            assert expected in exc.message
        else:
            raise AssertionError(f"chat accepted {text[:10]!r}")


def test_models_shows_both_roles_pinned_and_loaded_with_their_calls(
    shared_daemon: Daemon,
) -> None:
    """`tale models --json` lists ux and task, pinned and loaded, calls counted per role."""
    task_id = shared_daemon.call("submit_task", text="Answer yes or no: is 2 > 1?")["id"]
    shared_daemon.wait_for(task_id)
    shared_daemon.call("chat", text="Hi")
    proc = shared_daemon.home.tale("models", "--json")
    assert proc.returncode == 0, proc.stderr
    roles = {r["role"]: r for r in json.loads(proc.stdout)["models"]}
    assert set(roles) == {"ux", "task"}
    for role in roles.values():
        assert role["pinned"] and role["loaded"]
        assert role["health"] == "ok"
        assert role["serving"] is None
        assert role["backend"] == "llamacpp"
        assert role["memory_bytes"] > 50_000_000
        assert role["memory_local"]
        assert role["calls"] >= 1
        assert role["last_error"] is None


def test_stream_interval_gathers_pieces() -> None:
    """With a long stream interval the first piece comes at once and the rest together."""
    with running_daemon({"TALE_CHAT__STREAM_INTERVAL_MS": "10000"}) as daemon:
        pieces: list[str] = []
        with daemon.client() as conn:
            reply = conn.call_tool(
                "chat", {"text": "Name three colours."}, on_progress=pieces.append
            )
        assert reply["tokens"]["completion"] > 2
        assert len(pieces) == 2
        assert "".join(pieces) == reply["text"]


def test_usage_right_after_a_reply_includes_it(shared_daemon: Daemon) -> None:
    """The reply does not wait for its ledger row, but the ledger's reads do."""
    with shared_daemon.client() as conn:
        before = conn.call_tool("usage")["total"]["calls"]
        reply = conn.call_tool("chat", {"text": "Say yes."})
        after = conn.call_tool("usage")
    assert after["total"]["calls"] == before + 1
    ux = next(r for r in after["by_role"] if r["role"] == "ux")
    assert ux["completion_tokens"] >= reply["tokens"]["completion"]


def test_role_threads_sets_each_instances_threads() -> None:
    """models.llamacpp.role_threads gives each role's instance its own thread count."""
    with running_daemon({"TALE_MODELS__LLAMACPP__ROLE_THREADS": '{"ux": 1}'}) as daemon:
        roles = {r["role"]: r for r in daemon.call("models_status")["models"]}
    assert roles["ux"]["threads"] == 1
    assert roles["task"]["threads"] == os.cpu_count()
