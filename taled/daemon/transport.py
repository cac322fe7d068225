"""The Unix socket: a private listener, one MCP session per connection.

The socket lives in a 0700 directory and is itself 0600; every connection's
peer uid is checked with SO_PEERCRED before a byte is read. Nothing else at the
socket's path is ever removed: only a socket that no daemon answers on, found
while holding the lock, is replaced; a file, a directory or a link there (a
mistyped TALE_SOCKET) stops the daemon with an error that says what is there. Frames are
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
import re
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


# What a lock file holds: nothing yet, or the pid of the daemon that took it last.
_PID_LINE = re.compile(rb"(\d{1,10}\n?)?")


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            # A full backlog (EAGAIN) or a timeout: someone is there, just busy.
            return True
    return True


def _lock_file_problem(lock: IO[bytes]) -> str:
    """Why the opened file cannot be the daemon's lock ('' if it can)."""
    info = os.fstat(lock.fileno())
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.getuid():
        return "belongs to another user"
    if not _PID_LINE.fullmatch(lock.read(64)):
        return "is not a taled lock file (it holds more than a pid)"
    return ""


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
        self._created_socket = False
        self._active = 0

    def lock(self) -> None:
        """Take the one-daemon-per-socket lock; DaemonError if another daemon holds it.

        Also DaemonError, before anything is created, if the socket's path is
        relative, too long, or holds something other than a socket.
        """
        if not self.path.is_absolute():
            raise DaemonError(f"socket path {self.path} is relative; give an absolute path")
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
        self._check_socket_path()
        self._take_lock()

    async def listen(self) -> None:
        """Replace a stale socket and listen on a fresh one (0600). Call after lock()."""
        assert self._lock_file is not None, "lock() first"
        if self._check_socket_path():
            # We hold the lock, yet check: a socket someone answers on is not stale
            # (the lock file was deleted, or the path is another program's socket).
            if _answers(self.path):
                raise DaemonError(
                    f"something already answers on {self.path} without holding "
                    f"{self._lock_path}; stop it, or set TALE_SOCKET to another path"
                )
            log.warning("removing stale socket %s left by a daemon that died", self.path)
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._listener = await anyio.create_unix_listener(self.path)
        finally:
            os.umask(old_umask)
        self._created_socket = True
        os.chmod(self.path, 0o600)

    def _check_socket_path(self) -> bool:
        """Whether a socket is at the path; DaemonError if anything else is."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return False
        if stat.S_ISSOCK(info.st_mode):
            return True
        what = (
            "a directory"
            if stat.S_ISDIR(info.st_mode)
            else "a symbolic link"
            if stat.S_ISLNK(info.st_mode)
            else "a file that is not a socket"
        )
        raise DaemonError(
            f"{self.path} is {what}; refusing to replace it with the daemon's socket. "
            "Point TALE_SOCKET at a new path (e.g. $XDG_RUNTIME_DIR/tale/taled.sock)"
        )

    def _take_lock(self) -> None:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # No O_TRUNC and no symlinks followed: the path is derived from TALE_SOCKET, and
        # whatever file might already be there is only rewritten once it proves ours.
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise DaemonError(f"cannot use {self._lock_path} as the lock file: {exc}") from None
        lock = os.fdopen(fd, "r+b")
        problem = _lock_file_problem(lock)
        if problem:
            lock.close()
            raise DaemonError(
                f"{self._lock_path} {problem}; refusing to take it over as the daemon's lock. "
                "Point TALE_SOCKET at another path"
            )
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
        lock.seek(0)
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
        if self._created_socket:
            # Only the socket this daemon made: start-up may have stopped at
            # something else at the path, which is not ours to remove.
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._created_socket = False
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
