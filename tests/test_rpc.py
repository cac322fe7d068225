"""The wire's protocol (tale_client.rpc.Session), bytes in and bytes out, no socket.

Both faces, the CLI's blocking ``Connection`` and the TUI's asyncio ``TaleClient``,
take every protocol decision from ``Session``; the tests that run them against a real
daemon cover the sockets, these the frames nobody sends on purpose.
"""

from __future__ import annotations

import json

import pytest

from tale_client import protocol
from tale_client.rpc import Progress, ProgressNote, Reply, RpcError, Session, tool_result


def _line(doc: object) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def test_requests_are_numbered_from_one_on_one_line_each() -> None:
    """Each request takes the next id and is one JSON object ending in a newline."""
    session = Session()
    first, second = session.request("ping"), session.request("tools/list", {})
    assert (first.id, second.id) == (1, 2)
    assert first.frame == b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n'
    assert json.loads(second.frame) == {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/list",
        "params": {},
    }


def test_a_tool_call_asking_for_progress_carries_a_token_of_its_own() -> None:
    """A tools/call with progress names a token in ``_meta`` that no other call has."""
    session = Session()
    quiet, loud, louder = (
        session.call_tool("list_tasks"),
        session.call_tool("chat", {"message": "hi"}, progress=True),
        session.call_tool("chat", {"message": "ho"}, progress=True),
    )
    assert quiet.token is None and "_meta" not in json.loads(quiet.frame)["params"]
    assert json.loads(loud.frame)["params"]["_meta"] == {"progressToken": loud.token}
    assert loud.token != louder.token


def test_the_handshake_keeps_the_servers_info() -> None:
    """``initialized`` records serverInfo and answers with notifications/initialized."""
    session = Session()
    request = session.initialize("tale-test")
    assert json.loads(request.frame)["params"]["clientInfo"] == {
        "name": "tale-test",
        "version": "0",
    }
    frame = session.initialized({"serverInfo": {"name": "taled"}})
    assert json.loads(frame) == {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert session.server_info == {"name": "taled"}


def test_an_error_reply_raises_its_code_and_message() -> None:
    """A JSON-RPC error is a Reply whose value raises RpcError with the daemon's code."""
    reply = Session().receive(
        _line({"jsonrpc": "2.0", "id": 3, "error": {"code": -32001, "message": "no task"}})
    )
    assert isinstance(reply, Reply) and reply.id == 3
    with pytest.raises(RpcError) as caught:
        reply.value()
    assert (caught.value.code, caught.value.message) == (protocol.NOT_FOUND, "no task")


def test_an_error_without_an_id_answers_whoever_waits() -> None:
    """An error on a frame the daemon could not parse comes back as a Reply with no id."""
    reply = Session().receive(_line({"jsonrpc": "2.0", "id": None, "error": {"code": -32700}}))
    assert isinstance(reply, Reply) and reply.id is None
    assert reply.error is not None and reply.error.code == protocol.PARSE_ERROR


def test_progress_is_read_for_its_token() -> None:
    """A progress notification becomes a note for the call whose token it names."""
    note = {"progressToken": "p2", "progress": 3, "total": 10, "message": "step"}
    heard = Session().receive(
        _line({"jsonrpc": "2.0", "method": "notifications/progress", "params": note})
    )
    assert heard == Progress("p2", ProgressNote(3.0, 10.0, "step"))


def test_what_no_call_waits_on_is_passed_over() -> None:
    """Other notifications, server requests and replies with a foreign id read as None."""
    session = Session()
    assert session.receive(_line({"jsonrpc": "2.0", "method": "notifications/message"})) is None
    assert session.receive(_line({"jsonrpc": "2.0", "id": 1, "method": "ping"})) is None
    assert session.receive(_line({"jsonrpc": "2.0", "id": "x", "result": {}})) is None
    assert session.receive(_line([1, 2])) is None


def test_a_refused_tool_call_raises_the_code_it_carries() -> None:
    """A result with isError raises RpcError with the code in structuredContent.error."""
    result = {
        "isError": True,
        "content": [{"type": "text", "text": "no such task"}],
        "structuredContent": {"error": {"code": protocol.NOT_FOUND, "message": "no such task"}},
    }
    with pytest.raises(RpcError) as caught:
        tool_result("get_task", result)
    assert caught.value.code == protocol.NOT_FOUND
