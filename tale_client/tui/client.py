"""An asyncio MCP client for the TUI: one persistent connection, many calls in flight.

The same wire protocol as ``tale_client/rpc.py`` (newline-delimited JSON-RPC 2.0,
the ``initialize`` handshake, ``tools/call``), but non-blocking: a reader task
resolves each response by its request id and hands ``notifications/progress``
to the call that owns the progress token, so the board can poll while a chat
reply streams on the same socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tale_client import protocol
from tale_client.rpc import PROTOCOL_VERSION, DaemonUnreachable, RpcError, tool_error

__all__ = [
    "DaemonUnreachable",
    "ProgressNote",
    "RpcError",
    "TaleClient",
    "ToolStream",
    "is_unknown_argument",
    "is_unknown_tool",
]

# A get_task of a big task tree is one line; asyncio's default limit is 64 KiB.
_LINE_LIMIT = 64 * 2**20


@dataclass(frozen=True)
class ProgressNote:
    """One ``notifications/progress``: a streamed piece of text or a task's progress line."""

    progress: float
    total: float | None
    message: str


def is_unknown_tool(exc: RpcError) -> bool:
    """Whether the daemon does not have the tool (an older daemon)."""
    unknown = (protocol.METHOD_NOT_FOUND, protocol.INVALID_PARAMS)
    return exc.code in unknown and "unknown tool" in exc.message


def is_unknown_argument(exc: RpcError) -> bool:
    """Whether the daemon rejected an argument it does not know (an older daemon)."""
    return exc.code == protocol.INVALID_PARAMS and "unknown argument" in exc.message


class TaleClient:
    """One initialized MCP session with the daemon over its Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, Callable[[ProgressNote], None]] = {}
        self._closed = asyncio.Event()
        self._close_reason = "the daemon closed the connection"
        self._reader_task = asyncio.create_task(self._read_loop(), name="tale-client-reader")
        self.server_info: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: Path, client_name: str = "tale-tui") -> TaleClient:
        """Connect and complete the MCP handshake; DaemonUnreachable if nobody answers."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no daemon is listening on {path} ({exc.strerror})") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot connect to {path}: {exc}") from None
        client = cls(reader, writer)
        try:
            result = await asyncio.wait_for(
                client.request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": client_name, "version": "0"},
                    },
                ),
                timeout=10,
            )
            await client.notify("notifications/initialized")
        except TimeoutError:
            await client.close()
            raise DaemonUnreachable(f"the daemon on {path} did not answer the handshake") from None
        except BaseException:
            await client.close()
            raise
        client.server_info = result.get("serverInfo", {})
        return client

    @property
    def closed(self) -> bool:
        """Whether the connection is gone."""
        return self._closed.is_set()

    async def wait_closed(self) -> str:
        """Wait until the connection drops; returns why."""
        await self._closed.wait()
        return self._close_reason

    async def close(self) -> None:
        """Hang up; calls still in flight fail with DaemonUnreachable."""
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._shutdown("the connection was closed")
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification (no answer expected)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and wait for its result; RpcError for a JSON-RPC error."""
        if self.closed:
            raise DaemonUnreachable(self._close_reason)
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            await self._send(message)
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        on_progress: Callable[[ProgressNote], None] | None = None,
    ) -> dict[str, Any]:
        """Call one tool and return its structured result.

        With ``on_progress`` the call carries a progress token and every progress
        notification for it is handed over as it arrives, before the result.
        """
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        token = None
        if on_progress is not None:
            token = f"tui{next(self._ids)}"
            params["_meta"] = {"progressToken": token}
            self._listeners[token] = on_progress
        try:
            result = await self.request("tools/call", params)
        finally:
            if token is not None:
                self._listeners.pop(token, None)
        if result.get("isError"):
            raise tool_error(name, result)
        structured = result.get("structuredContent")
        if isinstance(structured, dict):
            return structured
        doc = json.loads(result["content"][0]["text"])
        return doc if isinstance(doc, dict) else {}

    def stream_tool(self, name: str, arguments: dict[str, Any] | None = None) -> ToolStream:
        """Start a tool call whose progress notes are read with ``async for``."""
        return ToolStream(self, name, arguments or {})

    # -- the wire ----------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise DaemonUnreachable(self._close_reason)
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown(f"the daemon hung up ({exc})")
            raise DaemonUnreachable(self._close_reason) from None

    async def _read_loop(self) -> None:
        reason = "the daemon closed the connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    reason = f"the daemon sent something that is not JSON: {line[:80]!r}"
                    break
                if isinstance(doc, dict):
                    self._dispatch(doc)
        except (ConnectionError, OSError) as exc:
            reason = f"the daemon hung up ({exc})"
        except ValueError as exc:  # a line over the reader's limit
            reason = f"the daemon sent an oversized message ({exc})"
        self._shutdown(reason)

    def _dispatch(self, doc: dict[str, Any]) -> None:
        if "method" in doc:
            if "id" not in doc and doc["method"] == "notifications/progress":
                body = doc.get("params") or {}
                listener = self._listeners.get(str(body.get("progressToken")))
                if listener is not None:
                    total = body.get("total")
                    listener(
                        ProgressNote(
                            float(body.get("progress") or 0),
                            float(total) if total is not None else None,
                            str(body.get("message") or ""),
                        )
                    )
            # Other notifications and server requests (none today) are not for the TUI.
            return
        request_id = doc.get("id")
        if "error" in doc:
            error = doc["error"] if isinstance(doc["error"], dict) else {}
            exc = RpcError(
                int(error.get("code", protocol.INTERNAL_ERROR)),
                str(error.get("message", "unknown error")),
            )
            if request_id is None:
                # An error nobody's id is on (a frame the daemon could not parse):
                # it answers one of the calls in flight, and we cannot tell which.
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(exc)
                return
            failed = self._pending.get(request_id)
            if failed is not None and not failed.done():
                failed.set_exception(exc)
            return
        answered = self._pending.get(request_id) if isinstance(request_id, int) else None
        if answered is not None and not answered.done():
            result = doc.get("result")
            answered.set_result(result if isinstance(result, dict) else {})

    def _shutdown(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DaemonUnreachable(reason))
        self._listeners.clear()


class ToolStream:
    """A tool call in flight: ``async for note in stream`` then ``await stream.result()``."""

    def __init__(self, client: TaleClient, name: str, arguments: dict[str, Any]) -> None:
        self._notes: asyncio.Queue[ProgressNote | None] = asyncio.Queue()
        self._call = asyncio.ensure_future(
            client.call_tool(name, arguments, on_progress=self._notes.put_nowait)
        )
        # Notifications come before their response on the one socket, so the
        # sentinel queued when the call ends is always behind the last note.
        self._call.add_done_callback(lambda _: self._notes.put_nowait(None))

    def __aiter__(self) -> AsyncIterator[ProgressNote]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ProgressNote]:
        while (note := await self._notes.get()) is not None:
            yield note

    async def result(self) -> dict[str, Any]:
        """The call's result (raises its error)."""
        return await self._call

    def cancel(self) -> None:
        """Stop waiting for the call (the daemon finishes it anyway)."""
        self._call.cancel()
