"""The wire to the daemon: an MCP session over its Unix socket, standard library only.

Importing the MCP SDK costs over a second, so the client speaks the wire
protocol itself: newline-delimited JSON-RPC 2.0, the ``initialize`` handshake,
then ``tools/call``. A refused call comes back as a result with ``isError`` and is
raised as the same ``RpcError`` a JSON-RPC error is.

The protocol is written once, in ``Session``, which does no I/O (h11's way with
HTTP): it numbers the requests and frames them, reads a frame back as a ``Reply``
or a ``Progress`` note, and turns a tool's result into its value or its error.
Two faces move its bytes::

    Session            ids, frames, the handshake, replies, progress, errors
    ├── Connection     blocking, one call at a time: the CLI's (below)
    └── TaleClient     asyncio, many calls in flight on one socket: the TUI's
                       (tale_client/tui/client.py)
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tale_client import protocol

__all__ = [
    "CLOSED",
    "PROTOCOL_VERSION",
    "Connection",
    "DaemonUnreachable",
    "Progress",
    "ProgressNote",
    "Reply",
    "Request",
    "RpcError",
    "Session",
    "connect_error",
    "hung_up",
    "is_unknown_argument",
    "is_unknown_tool",
    "tool_error",
    "tool_result",
]

PROTOCOL_VERSION = "2025-11-25"

# Why a connection ended, when the daemon simply closed it.
CLOSED = "the daemon closed the connection"


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (or it hung up)."""


def connect_error(path: Path, exc: OSError) -> DaemonUnreachable:
    """What a failed connect to the socket at ``path`` tells the user."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return DaemonUnreachable(f"no daemon is listening on {path} ({exc.strerror})")
    return DaemonUnreachable(f"cannot connect to {path}: {exc}")


def hung_up(exc: OSError) -> str:
    """Why a connection ended, when reading or writing it failed."""
    return f"the daemon hung up ({exc})"


def tool_error(name: str, result: dict[str, Any]) -> RpcError:
    """The RpcError a tools/call result with ``isError`` stands for.

    The daemon reports a refused call (no such task, bad arguments, a state that does
    not allow it) in the result, as MCP asks, with the JSON-RPC code it would have
    answered with in ``structuredContent.error``: callers see the same code and
    message either way, and so exit codes do not change."""
    texts = [c.get("text", "") for c in result.get("content") or [] if isinstance(c, dict)]
    structured = result.get("structuredContent")
    error = structured.get("error") if isinstance(structured, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), int):
        message = error.get("message")
        return RpcError(error["code"], str(message) if message else " ".join(texts))
    # Another server's tool error, or one without a code: an internal error.
    return RpcError(protocol.INTERNAL_ERROR, " ".join(texts) or f"{name} failed")


def tool_result(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A tools/call result's value: its structured content; ``tool_error`` if it is an error."""
    if result.get("isError"):
        raise tool_error(name, result)
    structured = result.get("structuredContent")
    if isinstance(structured, dict):
        return structured
    doc = json.loads(result["content"][0]["text"])
    return doc if isinstance(doc, dict) else {}


def is_unknown_tool(exc: RpcError) -> bool:
    """Whether the daemon does not have the tool (an older daemon)."""
    unknown = (protocol.METHOD_NOT_FOUND, protocol.INVALID_PARAMS)
    return exc.code in unknown and "unknown tool" in exc.message


def is_unknown_argument(exc: RpcError) -> bool:
    """Whether the daemon rejected an argument it does not know (an older daemon)."""
    return exc.code == protocol.INVALID_PARAMS and "unknown argument" in exc.message


@dataclass(frozen=True)
class Request:
    """A request ready to send: its id, its frame, and its progress token if it asked for one."""

    id: int
    frame: bytes
    token: str | None = None


@dataclass(frozen=True)
class Reply:
    """The daemon's answer to request ``id``: a result, or the error it failed with.

    ``id`` is None for an error the daemon could not pin on a request (a frame it
    could not parse): it answers one of the calls in flight, and nobody can tell which.
    """

    id: int | None
    result: dict[str, Any]
    error: RpcError | None = None

    def value(self) -> dict[str, Any]:
        """The result; raises the error."""
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(frozen=True)
class ProgressNote:
    """One ``notifications/progress``: a streamed piece of text or a task's progress line."""

    progress: float
    total: float | None
    message: str


@dataclass(frozen=True)
class Progress:
    """A progress note for the call that carries ``token``."""

    token: str
    note: ProgressNote


class Session:
    """One MCP session's protocol, without I/O: what to send, and what a received frame is."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.server_info: dict[str, Any] = {}

    def request(self, method: str, params: dict[str, Any] | None = None) -> Request:
        """A request with the next id."""
        request_id = next(self._ids)
        return Request(request_id, _frame(method, params, request_id))

    def notification(self, method: str, params: dict[str, Any] | None = None) -> bytes:
        """A notification's frame (no answer expected)."""
        return _frame(method, params)

    def initialize(self, client_name: str, version: str = "0") -> Request:
        """The handshake's request; hand its result to ``initialized``."""
        return self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": client_name, "version": version},
            },
        )

    def initialized(self, result: dict[str, Any]) -> bytes:
        """Take the server's ``initialize`` result; the notification that ends the handshake."""
        self.server_info = result.get("serverInfo", {})
        return self.notification("notifications/initialized")

    def call_tool(
        self, name: str, arguments: dict[str, Any] | None = None, progress: bool = False
    ) -> Request:
        """A tools/call; with ``progress`` it carries a token its progress notes will name.

        Hand the reply's value to ``tool_result``."""
        request_id = next(self._ids)
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        token = None
        if progress:
            token = f"p{request_id}"
            params["_meta"] = {"progressToken": token}
        return Request(request_id, _frame("tools/call", params, request_id), token)

    def receive(self, line: bytes) -> Reply | Progress | None:
        """What one frame from the daemon is; None for what no call waits on.

        Raises ``json.JSONDecodeError`` for a frame that is not JSON."""
        doc = json.loads(line)
        if not isinstance(doc, dict):
            return None
        if "method" in doc:
            if "id" not in doc and doc["method"] == "notifications/progress":
                body = doc.get("params")
                return _progress(body if isinstance(body, dict) else {})
            # Other notifications and server requests (none today) are not for the client.
            return None
        request_id = doc.get("id")
        if "error" in doc:
            error = doc["error"] if isinstance(doc["error"], dict) else {}
            exc = RpcError(
                int(error.get("code", protocol.INTERNAL_ERROR)),
                str(error.get("message", "unknown error")),
            )
            if request_id is None or isinstance(request_id, int):
                return Reply(request_id, {}, exc)
            return None
        if isinstance(request_id, int):
            result = doc.get("result")
            return Reply(request_id, result if isinstance(result, dict) else {})
        return None


def _frame(method: str, params: dict[str, Any] | None, request_id: int | None = None) -> bytes:
    """One JSON-RPC message on one line: a request with an id, a notification without."""
    message: dict[str, Any] = {"jsonrpc": "2.0"}
    if request_id is not None:
        message["id"] = request_id
    message["method"] = method
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode() + b"\n"


def _progress(body: dict[str, Any]) -> Progress:
    total = body.get("total")
    note = ProgressNote(
        float(body.get("progress") or 0),
        float(total) if total is not None else None,
        str(body.get("message") or ""),
    )
    return Progress(str(body.get("progressToken")), note)


class Connection:
    """One MCP session with the daemon, blocking: each call waits for its answer."""

    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        self.path = path
        self._session = Session()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise connect_error(path, exc) from None
        self._file = self._sock.makefile("rwb")

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's ``serverInfo``, once ``initialize`` has run."""
        return self._session.server_info

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up."""
        try:
            self._file.close()
        finally:
            self._sock.close()

    def initialize(self, client_name: str = "tale", version: str = "0") -> dict[str, Any]:
        """The MCP handshake; returns the server's ``initialize`` result."""
        result = self._call(self._session.initialize(client_name, version))
        self._send(self._session.initialized(result))
        return result

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification (no answer expected)."""
        self._send(self._session.notification(method, params))

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and wait for its result; RpcError for a JSON-RPC error."""
        return self._call(self._session.request(method, params))

    def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        on_progress: Callable[[str], None] | None = None,
        on_event: Callable[[float, float | None, str], None] | None = None,
    ) -> dict[str, Any]:
        """Call one MCP tool and return its structured result.

        With ``on_progress``, the call carries a progress token and each progress
        notification's message (a streamed piece of text) is handed over as it comes;
        ``on_event`` gets the whole notification: progress, total (or None), message.
        """

        def heard(note: ProgressNote) -> None:
            if on_progress is not None:
                on_progress(note.message)
            if on_event is not None:
                on_event(note.progress, note.total, note.message)

        progress = on_progress is not None or on_event is not None
        request = self._session.call_tool(name, arguments, progress)
        return tool_result(name, self._call(request, heard))

    def _call(
        self, request: Request, on_note: Callable[[ProgressNote], None] | None = None
    ) -> dict[str, Any]:
        """Send ``request`` and read until its reply, handing its progress notes over."""
        self._send(request.frame)
        while True:
            incoming = self._session.receive(self._receive())
            if isinstance(incoming, Reply) and incoming.id in (request.id, None):
                return incoming.value()
            if isinstance(incoming, Progress) and incoming.token == request.token and on_note:
                on_note(incoming.note)

    def _send(self, frame: bytes) -> None:
        try:
            self._file.write(frame)
            self._file.flush()
        except OSError as exc:
            raise DaemonUnreachable(hung_up(exc)) from None

    def _receive(self) -> bytes:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise DaemonUnreachable("the daemon did not answer in time") from None
        except OSError as exc:
            raise DaemonUnreachable(hung_up(exc)) from None
        if not line:
            raise DaemonUnreachable(CLOSED)
        return line
