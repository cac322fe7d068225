"""Random bytes on the socket never take the daemon down (property-based)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Daemon, running_daemon

# The smallest frame limit the settings allow, so "giant" lines stay cheap to send.
MAX_FRAME = 4096


@pytest.fixture(scope="module")
def small_frame_daemon() -> Iterator[Daemon]:
    """One real taled for the module, with a 4 KiB frame limit."""
    with running_daemon({"TALE_SERVER__MAX_FRAME_BYTES": str(MAX_FRAME)}) as daemon:
        yield daemon


_json_fragments = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b'"',
        b'{"jsonrpc": "2.0"',
        b', "id": 1',
        b', "id": null',
        b', "method": "tools/call"',
        b', "method": "initialize"',
        b', "params": {"name": "submit_task", "arguments": {"text": ',
        b"\\u0000",
        b"\xff\xfe",
        b"\xc3\x28",
        b"\r",
        b"\n",
        b"\x00",
    ]
)


def _giant_line(pattern: bytes, frames: int) -> bytes:
    """A line of ``pattern`` just over ``frames`` times the frame limit."""
    size = MAX_FRAME * frames + 1
    return (pattern * (size // len(pattern) + 1))[:size]


_line = st.one_of(
    st.binary(max_size=200),
    st.lists(_json_fragments, max_size=20).map(b"".join),
    # Deeply nested JSON (deeper than any parser's recursion limit), within the frame limit.
    st.builds(
        lambda opener, fill: opener * int(fill * (MAX_FRAME - 1) // len(opener)),
        st.sampled_from([b"[", b'{"a":', b'{"params": ']),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    st.builds(
        _giant_line,
        st.binary(min_size=1, max_size=16).filter(lambda b: b"\n" not in b),
        st.integers(min_value=1, max_value=6),
    ),
)

frames = st.builds(
    lambda lines, end: b"\n".join(lines) + (b"\n" if end else b""),
    st.lists(_line, min_size=1, max_size=8),
    st.booleans(),
)


def _exchange(daemon: Daemon, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return everything the daemon wrote back."""
    received = bytearray()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.home.socket))

        def drain() -> None:
            # Read concurrently: many short bad lines produce more answers than a
            # socket buffer holds, and the daemon stops reading while it cannot write.
            try:
                while chunk := sock.recv(65536):
                    received.extend(chunk)
            except OSError:
                pass

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(30)
        assert not reader.is_alive(), "the daemon did not close the connection after EOF"
    return bytes(received)


def _healthy(daemon: Daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()[-2000:]
    with daemon.client() as conn:
        assert "tasks" in conn.call_tool("list_tasks", {"limit": 1})


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=frames)
def test_random_frames_never_kill_the_daemon(small_frame_daemon: Daemon, payload: bytes) -> None:
    """Whatever bytes a client sends, it gets only JSON-RPC objects back and others are served."""
    answer = _exchange(small_frame_daemon, payload)
    for line in answer.splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict)
        assert doc.get("jsonrpc") == "2.0"
    _healthy(small_frame_daemon)
