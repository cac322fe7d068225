"""The TUI's face of the wire: one persistent asyncio connection, many calls in flight.

``tale_client.rpc.Session`` owns the protocol (ids, frames, the handshake, replies,
progress, errors); this module only moves its bytes without blocking: a reader task
resolves each reply by its request id and hands each progress note to the call
that owns its token, so the board can poll while a chat reply streams on the same
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tale_client.rpc import (
    CLOSED,
    DaemonUnreachable,
    Progress,
    ProgressNote,
    Reply,
    Request,
    RpcError,
    Session,
    connect_error,
    hung_up,
    tool_result,
)

__all__ = [
    "DaemonUnreachable",
    "ProgressNote",
    "RpcError",
    "TaleClient",
    "ToolStream",
]

# A get_task of a big task tree is one line; asyncio's default limit is 64 KiB.
_LINE_LIMIT = 64 * 2**20


class TaleClient:
    """One initialized MCP session with the daemon over its Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._session = Session()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, Callable[[ProgressNote], None]] = {}
        self._closed = asyncio.Event()
        self._close_reason = CLOSED
        self._reader_task = asyncio.create_task(self._read_loop(), name="tale-client-reader")

    @classmethod
    async def connect(cls, path: Path, client_name: str = "tale-tui") -> TaleClient:
        """Connect and complete the MCP handshake; DaemonUnreachable if nobody answers."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT)
        except OSError as exc:
            raise connect_error(path, exc) from None
        client = cls(reader, writer)
        try:
            result = await asyncio.wait_for(
                client._call(client._session.initialize(client_name)), timeout=10
            )
            await client._send(client._session.initialized(result))
        except TimeoutError:
            await client.close()
            raise DaemonUnreachable(f"the daemon on {path} did not answer the handshake") from None
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's ``serverInfo`` from the handshake."""
        return self._session.server_info

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
        await self._send(self._session.notification(method, params))

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and wait for its result; RpcError for a JSON-RPC error."""
        return await self._call(self._session.request(method, params))

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
        request = self._session.call_tool(name, arguments, progress=on_progress is not None)
        if request.token is not None and on_progress is not None:
            self._listeners[request.token] = on_progress
        try:
            result = await self._call(request)
        finally:
            if request.token is not None:
                self._listeners.pop(request.token, None)
        return tool_result(name, result)

    def stream_tool(self, name: str, arguments: dict[str, Any] | None = None) -> ToolStream:
        """Start a tool call whose progress notes are read with ``async for``."""
        return ToolStream(self, name, arguments or {})

    # -- the bytes -----------------------------------------------------------

    async def _call(self, request: Request) -> dict[str, Any]:
        """Send ``request`` and wait for the reader task to settle its reply."""
        if self.closed:
            raise DaemonUnreachable(self._close_reason)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        try:
            await self._send(request.frame)
            return await future
        finally:
            self._pending.pop(request.id, None)

    async def _send(self, frame: bytes) -> None:
        if self.closed:
            raise DaemonUnreachable(self._close_reason)
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown(hung_up(exc))
            raise DaemonUnreachable(self._close_reason) from None

    async def _read_loop(self) -> None:
        reason = CLOSED
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    incoming = self._session.receive(line)
                except json.JSONDecodeError:
                    reason = f"the daemon sent something that is not JSON: {line[:80]!r}"
                    break
                self._dispatch(incoming)
        except (ConnectionError, OSError) as exc:
            reason = hung_up(exc)
        except ValueError as exc:  # a line over the reader's limit
            reason = f"the daemon sent an oversized message ({exc})"
        self._shutdown(reason)

    def _dispatch(self, incoming: Reply | Progress | None) -> None:
        if isinstance(incoming, Progress):
            listener = self._listeners.get(incoming.token)
            if listener is not None:
                listener(incoming.note)
        elif isinstance(incoming, Reply):
            # A reply without an id (an error on a frame the daemon could not parse)
            # answers one of the calls in flight, and we cannot tell which: all fail.
            for request_id in list(self._pending) if incoming.id is None else [incoming.id]:
                future = self._pending.get(request_id)
                if future is None or future.done():
                    continue
                if incoming.error is not None:
                    future.set_exception(incoming.error)
                else:
                    future.set_result(incoming.result)

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
