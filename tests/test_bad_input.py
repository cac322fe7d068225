"""Bad input, through the real socket and CLI: a clear error, and nothing written."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tale_client.rpc import PROTOCOL_VERSION, RpcError
from tests.harness import Daemon

INVALID_PARAMS = -32602
NOT_FOUND = -32001
PARSE_ERROR = -32700
INVALID_REQUEST = -32600

UNKNOWN_ID = "0123456789ab"
# Greedy decoding answers this in a couple of tokens: a task that completes fast.
SHORT_ANSWER = "Answer yes or no: is 2 > 1?"


def _sqlite_task_rows(daemon: Daemon) -> int:
    """Rows in the real ``tasks`` table, read from the SQLite file itself (read-only)."""
    uri = f"file:{daemon.home.data / 'tale.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM tasks").fetchone()[0])


def _listed_tasks(daemon: Daemon) -> int:
    return len(daemon.call("list_tasks", limit=1000)["tasks"])


@contextlib.contextmanager
def _nothing_written(daemon: Daemon) -> Iterator[None]:
    """Assert that the block adds no task, as seen by list_tasks and by the SQLite file."""
    before = (_listed_tasks(daemon), _sqlite_task_rows(daemon))
    yield
    assert (_listed_tasks(daemon), _sqlite_task_rows(daemon)) == before


def _rejected(daemon: Daemon, tool: str, **arguments: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        daemon.call(tool, **arguments)
    return caught.value


def _rejected_submit(daemon: Daemon, **arguments: Any) -> RpcError:
    with _nothing_written(daemon):
        return _rejected(daemon, "submit_task", **arguments)


class _Raw:
    """A bare socket connection that sends bytes and reads newline-delimited JSON."""

    def __init__(self, daemon: Daemon, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(daemon.home.socket))
        self.file = self.sock.makefile("rwb")

    def send(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the daemon closed the connection"
        doc = json.loads(line)
        assert isinstance(doc, dict)
        return doc

    def request(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        self.send(json.dumps(body).encode() + b"\n")
        return self.receive()

    def initialize(self) -> None:
        answer = self.request(
            1,
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "tests", "version": "0"},
            },
        )
        assert answer["result"]["serverInfo"]["name"] == "taled"
        self.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(shared_daemon: Daemon) -> Iterator[_Raw]:
    """A raw connection to the module's daemon."""
    conn = _Raw(shared_daemon)
    yield conn
    conn.close()


# -- submit_task: the text ------------------------------------------------------


def test_empty_text_is_invalid_params_naming_the_field(shared_daemon: Daemon) -> None:
    """An empty task text is rejected with -32602 naming `text`, and no task is stored."""
    error = _rejected_submit(shared_daemon, text="")
    assert error.code == INVALID_PARAMS
    assert "text" in error.message


def test_whitespace_only_text_is_invalid_params_saying_it_is_empty(
    shared_daemon: Daemon,
) -> None:
    """A text of only whitespace is rejected as empty with -32602, and no task is stored."""
    error = _rejected_submit(shared_daemon, text=" \t\n \r\n ")
    assert error.code == INVALID_PARAMS
    assert "empty" in error.message


def test_text_over_the_limit_is_invalid_params_naming_length_and_limit(
    shared_daemon: Daemon,
) -> None:
    """A text of 10,001 characters is rejected with -32602 stating its length and the limit."""
    error = _rejected_submit(shared_daemon, text="x" * 10_001)
    assert error.code == INVALID_PARAMS
    assert "10001" in error.message
    assert "10000" in error.message


def test_text_at_the_limit_after_trimming_is_accepted(shared_daemon: Daemon) -> None:
    """A text that is exactly 10,000 characters once trimmed is accepted and stored trimmed."""
    before = _sqlite_task_rows(shared_daemon)
    task = shared_daemon.call("submit_task", text="\n  " + "y" * 10_000 + "  \t")
    assert task["text"] == "y" * 10_000
    assert _sqlite_task_rows(shared_daemon) == before + 1


# -- task ids ---------------------------------------------------------------------


def test_malformed_task_id_is_invalid_params_describing_an_id(shared_daemon: Daemon) -> None:
    """A task id that is not 12 lowercase hex digits is rejected with -32602 saying what one is."""
    error = _rejected(shared_daemon, "get_task", id="zz")
    assert error.code == INVALID_PARAMS
    assert "'zz'" in error.message
    assert "12 lowercase hex digits" in error.message


@pytest.mark.parametrize(
    ("tool", "arguments", "says"),
    [
        ("get_task", {"id": "zz"}, "'zz' is not a task id"),
        ("cancel_task", {"id": "abc"}, "'abc' is not a task id"),
        ("list_approvals", {"task": "zz"}, "'zz' is not a task id"),
        ("approve", {"id": "zz"}, "'zz' is not an approval id"),
        ("deny", {"id": "zz"}, "'zz' is not an approval id"),
        ("answer", {"id": "zz", "text": "yes"}, "'zz' is not an approval id"),
        ("get_schedule", {"id": "zz"}, "'zz' is not a schedule id"),
        ("get_conversation", {"id": "zz"}, "'zz' is not a conversation id"),
        ("chat", {"text": "hi", "conversation": "zz"}, "'zz' is not a conversation id"),
    ],
)
def test_a_malformed_id_is_refused_naming_the_kind_of_id_wanted(
    shared_daemon: Daemon, tool: str, arguments: dict[str, Any], says: str
) -> None:
    """An approval's id is not called a task id: each id argument says what it names."""
    error = _rejected(shared_daemon, tool, **arguments)
    assert error.code == INVALID_PARAMS
    assert says in error.message


def test_every_id_argument_says_what_it_names() -> None:
    """A tool argument shaped like an id (lowercase hex) is listed in its arguments'
    ``id_kinds``, so a malformed one is told what it should be."""
    from taled.daemon.server import TOOLS

    unnamed = [
        (name, field)
        for name, tool in TOOLS.items()
        for field, info in tool.args.model_fields.items()
        for meta in info.metadata
        if str(getattr(meta, "pattern", "")).startswith("^[0-9a-f]{")
        and field not in tool.args.id_kinds
    ]
    assert unnamed == []


def test_unknown_task_id_is_not_found_naming_the_id(shared_daemon: Daemon) -> None:
    """A well-formed id that names no task is -32001 with the id and a pointer to `tale list`."""
    error = _rejected(shared_daemon, "get_task", id=UNKNOWN_ID)
    assert error.code == NOT_FOUND
    assert UNKNOWN_ID in error.message
    assert "tale list" in error.message


# -- priority -------------------------------------------------------------------------


def test_negative_priority_is_invalid_params_naming_the_bound(shared_daemon: Daemon) -> None:
    """Priority -1 is rejected with -32602 naming `priority` and its lower bound 0."""
    error = _rejected_submit(shared_daemon, text="say hi", priority=-1)
    assert error.code == INVALID_PARAMS
    assert "priority" in error.message
    assert "0" in error.message
    assert "-1" in error.message


def test_priority_over_100_is_invalid_params_naming_the_bound(shared_daemon: Daemon) -> None:
    """Priority 101 is rejected with -32602 naming `priority` and its upper bound 100."""
    error = _rejected_submit(shared_daemon, text="say hi", priority=101)
    assert error.code == INVALID_PARAMS
    assert "priority" in error.message
    assert "100" in error.message
    assert "101" in error.message


# -- tools and argument types -----------------------------------------------------------


def test_unknown_tool_is_invalid_params_listing_the_tools(shared_daemon: Daemon) -> None:
    """Calling a tool that does not exist is -32602 naming it and listing the real tools."""
    error = _rejected(shared_daemon, "launch_rockets")
    assert error.code == INVALID_PARAMS
    assert "'launch_rockets'" in error.message
    assert "submit_task" in error.message


def test_text_as_integer_is_invalid_params_naming_the_field(shared_daemon: Daemon) -> None:
    """`text` given as a number is rejected with -32602 naming `text` and the expected type."""
    error = _rejected_submit(shared_daemon, text=42)
    assert error.code == INVALID_PARAMS
    assert "'text'" in error.message
    assert "string" in error.message


def test_priority_as_string_is_invalid_params_naming_the_field(shared_daemon: Daemon) -> None:
    """`priority` given as a string is rejected with -32602 (no coercion), naming the field."""
    error = _rejected_submit(shared_daemon, text="say hi", priority="5")
    assert error.code == INVALID_PARAMS
    assert "'priority'" in error.message
    assert "integer" in error.message


def test_id_as_integer_is_invalid_params_naming_the_field(shared_daemon: Daemon) -> None:
    """A task `id` given as a number is rejected with -32602 naming `id` and the expected type."""
    error = _rejected(shared_daemon, "get_task", id=123456789012)
    assert error.code == INVALID_PARAMS
    assert "'id'" in error.message
    assert "string" in error.message


def test_unknown_argument_is_invalid_params_listing_the_allowed_ones(
    shared_daemon: Daemon,
) -> None:
    """An argument the tool does not take is -32602 naming it and the allowed arguments."""
    error = _rejected_submit(shared_daemon, text="say hi", colour="red")
    assert error.code == INVALID_PARAMS
    assert "'colour'" in error.message
    assert "text" in error.message
    assert "priority" in error.message


# -- frames -----------------------------------------------------------------------------


def test_non_json_frame_is_parse_error_and_the_connection_goes_on(raw: _Raw) -> None:
    """A frame that is not JSON gets -32700 with id null, and the same connection still works."""
    raw.send(b"this is not json {\n")
    answer = raw.receive()
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] is None
    assert answer["error"]["code"] == PARSE_ERROR
    assert "not JSON" in answer["error"]["message"]
    raw.initialize()
    listed = raw.request(2, "tools/call", {"name": "list_tasks", "arguments": {}})
    assert "tasks" in listed["result"]["structuredContent"]


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        (b'{"hello": "world"}', None),
        (b"[1, 2, 3]", None),
        (b'"a string"', None),
        (b"42", None),
        (b'{"jsonrpc": "2.0", "id": 7}', 7),
        (b'{"jsonrpc": "1.0", "id": 8, "method": "ping"}', 8),
        (b'{"jsonrpc": "2.0", "id": 9, "method": 5}', 9),
        (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', None),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', None),
    ],
)
def test_json_that_is_not_a_request_is_invalid_request(
    raw: _Raw, frame: bytes, request_id: int | None
) -> None:
    """Valid JSON that is not a JSON-RPC 2.0 request gets -32600, echoing a usable id."""
    raw.send(frame + b"\n")
    answer = raw.receive()
    assert answer["id"] == request_id
    assert answer["error"]["code"] == INVALID_REQUEST
    assert "invalid request" in answer["error"]["message"]
    raw.initialize()


def test_ten_megabyte_frame_is_answered_dropped_and_the_daemon_serves_on(
    shared_daemon: Daemon, raw: _Raw
) -> None:
    """A 10 MB submit frame gets an error naming the limit, stores nothing, and serving goes on."""
    raw.initialize()
    giant = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {"name": "submit_task", "arguments": {"text": "z" * (10 * 1024 * 1024)}},
    }
    with _nothing_written(shared_daemon):
        raw.send(json.dumps(giant).encode() + b"\n")
        answer = raw.receive()
        assert answer["error"]["code"] == INVALID_REQUEST
        assert "larger than 1048576 bytes" in answer["error"]["message"]
        pong = raw.request(6, "ping", {})
        assert pong == {"jsonrpc": "2.0", "id": 6, "result": {}}
    assert shared_daemon.proc is not None and shared_daemon.proc.poll() is None


def test_client_that_hangs_up_mid_call_does_not_disturb_the_daemon(
    shared_daemon: Daemon,
) -> None:
    """Clients that vanish mid-request or mid-frame leave the daemon serving everyone else."""
    log_before = len(shared_daemon.log_text())
    bystander = shared_daemon.client()
    try:
        # Hang up with a call in flight, before its answer is read.
        quitter = _Raw(shared_daemon)
        quitter.initialize()
        quitter.send(
            b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", '
            b'"params": {"name": "list_tasks", "arguments": {}}}\n'
        )
        quitter.close()
        # Hang up halfway through a frame.
        halfway = _Raw(shared_daemon)
        halfway.send(b'{"jsonrpc": "2.0", "id": 1, "method": "initi')
        halfway.close()
        assert "tasks" in bystander.call_tool("list_tasks", {})
        assert "tasks" in shared_daemon.call("list_tasks")
    finally:
        bystander.close()
    assert shared_daemon.proc is not None and shared_daemon.proc.poll() is None
    assert "Traceback" not in shared_daemon.log_text()[log_before:]


# -- the CLI ------------------------------------------------------------------------------


def test_cli_submit_empty_text_exits_2_with_message_on_stderr_only(
    shared_daemon: Daemon,
) -> None:
    """`tale submit ""` exits 2 saying the text is empty on stderr; no output, nothing stored."""
    with _nothing_written(shared_daemon):
        proc = shared_daemon.home.tale("submit", "")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "empty" in proc.stderr


def test_cli_status_of_malformed_id_exits_2(shared_daemon: Daemon) -> None:
    """`tale status zz` exits 2 and explains on stderr what a task id looks like."""
    proc = shared_daemon.home.tale("status", "zz")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "not a task id" in proc.stderr


def test_cli_list_with_unknown_state_exits_2_listing_the_states(shared_daemon: Daemon) -> None:
    """`tale list --state bogus` exits 2 naming the bad state and the valid ones."""
    proc = shared_daemon.home.tale("list", "--state", "bogus")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "'bogus'" in proc.stderr
    assert "completed" in proc.stderr


def test_cli_cancel_of_a_completed_task_exits_1(shared_daemon: Daemon) -> None:
    """`tale cancel` of a completed task exits 1 saying the task is already completed."""
    task_id = shared_daemon.call("submit_task", text=SHORT_ANSWER, priority=100)["id"]
    assert shared_daemon.wait_for(task_id)["state"] == "completed"
    proc = shared_daemon.home.tale("cancel", task_id)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert task_id in proc.stderr
    assert "already completed" in proc.stderr
