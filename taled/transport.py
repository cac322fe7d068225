"""The Unix socket: a private listener, one MCP session per connection.

The socket lives in a 0700 directory and is itself 0600; every connection's
peer uid is checked with SO_PEERCRED before a byte is read. Frames are
newline-delimited JSON-RPC; a frame that is not JSON, or longer than
``max_frame_bytes``, is answered here with a JSON-RPC error (the SDK would drop
it silently) and the session goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import anyio
import mcp_types as types
from anyio.abc import SocketStream
from mcp.shared._context_streams import create_context_streams
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from taled.errors import AlreadyRunning, DaemonError

__all__ = ["SessionHandler", "SocketListener", "peer_uid"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_CHUNK = 65536

SessionHandler = Callable[
    [ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]], Awaitable[None]
]


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _error_frame(code: int, message: str, request_id: Any = None) -> bytes:
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return (json.dumps(body) + "\n").encode()


def _has_id(line: bytes) -> bool:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "id" in doc


class SocketListener:
    """Owns the socket file, its lock and the accept loop."""

    def __init__(
        self,
        path: Path,
        lock_path: Path,
        *,
        max_frame_bytes: int,
        max_connections: int,
    ) -> None:
        self.path = path
        self._lock_path = lock_path
        self._max_frame = max_frame_bytes
        self._max_connections = max_connections
        self._lock_file: IO[bytes] | None = None
        self._listener: Any = None
        self._active = 0

    def lock(self) -> None:
        """Take the one-daemon-per-socket lock; DaemonError if another daemon holds it."""
        size = len(os.fsencode(self.path))
        if size > _MAX_SOCKET_PATH:
            raise DaemonError(
                f"socket path {self.path} is too long ({size} bytes; Unix sockets allow "
                f"{_MAX_SOCKET_PATH}). Set TALE_SOCKET or XDG_RUNTIME_DIR to a shorter path"
            )
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise DaemonError(f"{directory} is not a directory owned by you; refusing to use it")
        if stat.S_IMODE(info.st_mode) & 0o077 and directory.name == "tale":
            directory.chmod(0o700)
        self._take_lock()

    async def listen(self) -> None:
        """Replace a stale socket and listen on a fresh one (0600). Call after lock()."""
        assert self._lock_file is not None, "lock() first"
        if self.path.exists() or self.path.is_symlink():
            # We hold the lock, so whatever is there belongs to a dead daemon.
            log.warning("removing stale socket %s left by a daemon that died", self.path)
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._listener = await anyio.create_unix_listener(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    def _take_lock(self) -> None:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(self._lock_path, "ab")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(
                    f"another taled is already running on {self.path} "
                    "(`tale daemon status` shows it; `tale daemon stop` stops it)"
                ) from None
            raise
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n".encode())
        lock.flush()
        self._lock_file = lock

    async def serve(self, handler: SessionHandler) -> None:
        """Accept connections until cancelled; each runs ``handler`` as one MCP session."""
        assert self._listener is not None

        async def on_connection(stream: SocketStream) -> None:
            async with stream:
                try:
                    await self._session(stream, handler)
                except Exception:
                    # One broken session must never take the daemon (and every
                    # other client) down with it.
                    log.exception("a client session failed; the connection was closed")

        await self._listener.serve(on_connection)

    async def close(self) -> None:
        """Stop listening, remove the socket and release the lock (if we hold them)."""
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        if self._lock_file is None:
            # Never ours: the socket there (if any) belongs to another daemon.
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _session(self, stream: SocketStream, handler: SessionHandler) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        uid = peer_uid(raw)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d", uid)
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(_error_frame(-32600, "permission denied: not your daemon"))
            return
        if self._active >= self._max_connections:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(
                    _error_frame(-32003, f"too many connections (limit {self._max_connections})")
                )
            return
        self._active += 1
        try:
            await self._pump(stream, handler)
        finally:
            self._active -= 1

    async def _pump(self, stream: SocketStream, handler: SessionHandler) -> None:
        in_send, in_recv = create_context_streams[SessionMessage | Exception](0)
        out_send, out_recv = create_context_streams[SessionMessage](0)
        send_lock = anyio.Lock()

        async def send_bytes(data: bytes) -> None:
            async with send_lock:
                await stream.send(data)

        async def reader() -> None:
            buf = bytearray()
            discarding = False
            async with in_send:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    while True:
                        chunk = await stream.receive(_CHUNK)
                        buf += chunk
                        while True:
                            nl = buf.find(b"\n")
                            if nl < 0:
                                break
                            line = bytes(buf[:nl])
                            del buf[: nl + 1]
                            if discarding:
                                discarding = False
                                continue
                            await self._dispatch_line(line, in_send, send_bytes)
                        if len(buf) > self._max_frame:
                            if not discarding:
                                await send_bytes(self._too_large())
                            discarding = True
                            buf.clear()

        async def writer() -> None:
            async with out_recv:
                async for message in out_recv:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await send_bytes(data.encode() + b"\n")

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            await handler(in_recv, out_send)
            tg.cancel_scope.cancel()

    def _too_large(self) -> bytes:
        return _error_frame(-32600, f"frame larger than {self._max_frame} bytes; it was dropped")

    async def _dispatch_line(
        self,
        line: bytes,
        in_send: Any,
        send_bytes: Callable[[bytes], Awaitable[None]],
    ) -> None:
        if not line.strip():
            return
        if len(line) > self._max_frame:
            await send_bytes(self._too_large())
            return
        try:
            message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        except ValidationError as exc:
            await send_bytes(_error_frame(*self._diagnose(line, exc)))
            return
        if isinstance(message, types.JSONRPCNotification) and _has_id(line):
            # pydantic reads {"id": 1.5 | null | true, "method": ...} as a notification
            # (it ignores the bad id), so the caller would wait forever for an answer.
            await send_bytes(
                _error_frame(
                    -32600, "invalid request: 'id' must be a string or an integer (not null)"
                )
            )
            return
        await in_send.send(SessionMessage(message))

    @staticmethod
    def _diagnose(line: bytes, exc: ValidationError) -> tuple[int, str, Any]:
        for err in exc.errors():
            if err["type"] == "json_invalid":
                return -32700, f"parse error: the frame is not JSON ({err['msg']})", None
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            # pydantic parsed it but the stdlib cannot (too deep): no id to answer with.
            doc = None
        request_id = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            request_id = None
        return (
            -32600,
            "invalid request: expected a JSON-RPC 2.0 object with 'jsonrpc', 'method' and 'id'",
            request_id,
        )
