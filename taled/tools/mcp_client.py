"""The user's MCP servers: started, supervised and called by the daemon (an MCP client).

Each server in ``[tools.mcp.NAME]`` lives in its own long-running asyncio task that
owns the SDK's async context managers (their anyio task groups must be entered and left
in one task): the transport (the SDK's stdio client for ``command``, its streamable-HTTP
client for ``url``) and the ``ClientSession``. Calls reach it from the callers' tasks
through that session.

    McpServers.start()                      one task per enabled server, not awaited
      └── _Server._supervise()              starting → up → down → (backoff) → starting …
            └── _Server._attempt()          spawn/connect, initialize, tools/list, then
                                            ping every ``ping_interval`` until the
                                            connection breaks or stop() cancels it

A server that fails to start or dies is marked down and restarted with exponential
backoff (0.5 s doubling to 60 s; the count resets after a minute up). A call in flight
when its server dies is answered with an error and never sent again: a tool's side
effect is never silently repeated. A stdio server's stderr goes to
``log_dir/mcp-NAME.log`` (rotated at 1 MiB to ``mcp-NAME.log.1``), its environment is
PATH, HOME and LANG plus the configured ``env`` (the SDK adds its own short safe list:
LOGNAME, SHELL, TERM, USER), never the daemon's whole environment, and its process group
is killed when it stops.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import anyio
import mcp_types as types
import psutil
from mcp.client._transport import ReadStream, WriteStream
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from taled import __version__
from taled.settings import McpServerSettings
from taled.tools.base import ToolCall, ToolResult, ToolSpec

__all__ = ["McpServerState", "McpServerStatus", "McpServers"]

log = logging.getLogger(__name__)

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TOOL_NAME_MAX = 64
"""The longest tool name (the part after ``NAME.``) a server may offer."""
_CHILD_ENV = ("PATH", "HOME", "LANG")
"""What a stdio server gets of the daemon's environment (plus its configured ``env``)."""
_LOG_CAP = 1 << 20
"""A server's log is rotated when it would grow past this many bytes."""
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 60.0
_STABLE_SECONDS = 60.0
"""A server up this long counts as healthy again: its next restart waits the first delay."""
_GROUP_GRACE = 2.0
"""Time a stopped server's leftover process group gets between SIGTERM and SIGKILL."""
_PIPE_DRAIN = 1.0
"""How long a stopped server's stderr may take to deliver its last bytes."""
_STOP_DEADLINE = 15.0
"""How long stop() waits for a server to wind down before cancelling its task."""


class McpServerState(StrEnum):
    """Where one of the user's MCP servers is."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    DISABLED = "disabled"


@dataclass(frozen=True)
class McpServerStatus:
    """One server as ``tale tools`` shows it."""

    name: str
    state: McpServerState
    tools: int
    """Tools offered (refused ones not counted); 0 unless up."""
    pid: int | None
    """The stdio server's process while it runs; None for a URL or when not running."""
    restarts: int
    """Times it was started again after the first start."""
    last_error: str
    """Why it last failed to start or went down; empty if it never did."""
    since: float
    """When it entered ``state`` (seconds since the epoch)."""
    notes: tuple[str, ...] = ()
    """Tools it offers that were refused, and why."""

    def as_json(self) -> dict[str, Any]:
        """The status as the wire and ``--json`` carry it."""
        return {
            "name": self.name,
            "state": self.state.value,
            "tools": self.tools,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "since": datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds"),
            "notes": list(self.notes),
        }


class McpServers:
    """Every MCP server the user configured, started together and called by tool name."""

    def __init__(
        self,
        settings: Mapping[str, McpServerSettings],
        *,
        log_dir: Path,
        ping_interval: float = 15.0,
        ping_timeout: float = 10.0,
    ) -> None:
        self._log_dir = log_dir
        self._changed = asyncio.Event()
        self._servers = {
            name: _Server(
                name,
                server,
                log_dir / f"mcp-{name}.log",
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                on_change=self._pulse,
            )
            for name, server in settings.items()
        }

    async def start(self) -> None:
        """Start every enabled server concurrently, without waiting for any of them.

        A server that fails to start shows ``down`` in ``status()`` and is retried with
        backoff; nothing here blocks the daemon's start.
        """
        if any(s.settings.enabled for s in self._servers.values()):
            self._log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for server in self._servers.values():
            server.start()

    async def stop(self) -> None:
        """Close every session and end every server's processes (no orphans)."""
        await asyncio.gather(*(s.stop() for s in self._servers.values()))

    def tools(self, server: str | None = None) -> list[ToolSpec]:
        """The tools of every server that is up (or only of the one named), named
        ``NAME.tool``."""
        return [
            spec
            for name, s in self._servers.items()
            if s.is_up and server in (None, name)
            for spec in s.tools
        ]

    def server_of(self, tool_name: str) -> str | None:
        """The configured server a ``NAME.tool`` name belongs to, or None."""
        name, dot, tool = tool_name.partition(".")
        return name if dot and tool and name in self._servers else None

    async def call(self, call: ToolCall, *, timeout: float | None = None) -> ToolResult:
        """Send ``NAME.tool`` to that server's ``tools/call`` and read the answer as text.

        A model's mistake (unknown server or tool, arguments not an object), a server
        that is not up, a tool error, a timeout or a crash mid-call all come back as a
        result with ``is_error``; this never raises for them. A call is sent at most
        once. ``timeout`` overrides ``tools.mcp.NAME.call_timeout_seconds``.
        """
        if call.error:
            return _error(call.error)
        name = self.server_of(call.name)
        if name is None:
            return _error(self._unknown(call.name))
        return await self._servers[name].call(call, timeout)

    def status(self) -> list[McpServerStatus]:
        """Each configured server's state, in configuration order."""
        return [s.status() for s in self._servers.values()]

    async def settled(self, timeout: float) -> bool:
        """Wait until no server is ``starting`` (each is up, down or disabled), at most
        ``timeout`` seconds; whether that happened."""
        return await self.wait_for(
            lambda statuses: all(s.state is not McpServerState.STARTING for s in statuses),
            timeout,
        )

    async def wait_for(
        self, predicate: Callable[[list[McpServerStatus]], bool], timeout: float
    ) -> bool:
        """Wait until ``predicate(status())`` holds, at most ``timeout`` seconds; whether
        it did. Woken by each change of a server's state."""
        with anyio.move_on_after(timeout):
            while True:
                changed = self._changed
                if predicate(self.status()):
                    return True
                await changed.wait()
        return predicate(self.status())

    def _pulse(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _unknown(self, tool_name: str) -> str:
        name, dot, _ = tool_name.partition(".")
        live = sorted(self._servers)
        if not dot or name not in self._servers:
            known = ", ".join(live) if live else "none are configured"
            return (
                f"{tool_name!r} is not a tool of any MCP server: their tools are named "
                f"SERVER.tool, and the servers are: {known}"
            )
        return f"{tool_name!r} names no tool"


@dataclass
class _Link:
    """One connection to a server (a new one after every restart), and how it ended."""

    pid: int | None
    closed: bool = False
    """The connection ended: the transport closed, or a call found the server gone."""
    reason: str = ""
    """Why, when a call found out; empty when the transport closed."""


@dataclass
class _Connection:
    """A link with its live session."""

    link: _Link
    session: ClientSession


class _Server:
    """One server's supervisor: its task, its session, its state."""

    def __init__(
        self,
        name: str,
        settings: McpServerSettings,
        log_path: Path,
        *,
        ping_interval: float,
        ping_timeout: float,
        on_change: Callable[[], None],
    ) -> None:
        self.name = name
        self.settings = settings
        self._log = _ServerLog(log_path)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_change = on_change
        self.state = McpServerState.STARTING if settings.enabled else McpServerState.DISABLED
        self.since = time.time()
        self.restarts = 0
        self.last_error = ""
        self.tools: list[ToolSpec] = []
        self._tool_names: set[str] = set()
        self._notes: tuple[str, ...] = ()
        self._conn: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tools_changed = False

    @property
    def is_up(self) -> bool:
        return self.state is McpServerState.UP and self._conn is not None

    def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"mcp-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self._wake.set()
        if self._scope is not None:
            self._scope.cancel()
        task = self._task
        if task is None:
            if self.state is McpServerState.STARTING:
                self._set(McpServerState.DOWN)
            return
        done, _ = await asyncio.wait({task}, timeout=_STOP_DEADLINE)
        if not done:
            log.warning(
                "MCP server %s did not stop in %s s; cancelling it", self.name, _STOP_DEADLINE
            )
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._log.close()

    def status(self) -> McpServerStatus:
        up = self.is_up
        return McpServerStatus(
            name=self.name,
            state=self.state,
            tools=len(self.tools) if up else 0,
            pid=self._conn.link.pid if self._conn is not None else None,
            restarts=self.restarts,
            last_error=self.last_error,
            since=self.since,
            notes=self._notes,
        )

    async def call(self, call: ToolCall, timeout: float | None) -> ToolResult:
        tool = call.name.partition(".")[2]
        conn = self._conn
        if conn is not None and conn.link.closed:
            return _error(
                f"{call.name}: the MCP server {self.name} has just gone down; it is being restarted"
            )
        if not self.is_up or conn is None:
            why = f" ({self.last_error})" if self.last_error else ""
            return _error(
                f"{call.name}: the MCP server {self.name} is {self.state.value}{why}; "
                "its tools cannot be called now"
            )
        if tool not in self._tool_names:
            offered = ", ".join(sorted(self._tool_names)) or "none"
            return _error(f"the MCP server {self.name} has no tool {tool!r}; its tools: {offered}")
        arguments: object = call.arguments
        if not isinstance(arguments, dict):
            return _error(f"{call.name}: the arguments must be a JSON object")
        configured = self.settings.call_timeout_seconds
        limit = configured if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                result = await conn.session.call_tool(tool, arguments)
        except TimeoutError:
            hint = f" (tools.mcp.{self.name}.call_timeout_seconds)" if limit == configured else ""
            return _error(f"{call.name} did not answer within {limit:g} s{hint}")
        except MCPError as exc:
            if conn.link.closed or self._stopping:
                return _error(self._cut_off())
            if exc.code == types.CONNECTION_CLOSED and not await self._answers(conn):
                self._lost(conn.link, "it stopped answering during a call")
                return _error(self._cut_off())
            return _error(f"{call.name} failed: {exc.message}")
        except (ValidationError, RuntimeError) as exc:
            if conn.link.closed or self._stopping:
                return _error(self._cut_off())
            return _error(f"{call.name}: the server's answer is not usable: {_describe(exc)}")
        return _read_result(result)

    def _cut_off(self) -> str:
        if self._stopping:
            return (
                f"{self.name} was stopped during the call (the daemon is stopping); "
                "the call was not retried"
            )
        return (
            f"{self.name} crashed during the call; it is being restarted; the call was not retried"
        )

    # --- the supervisor ---------------------------------------------------------------

    def _set(self, state: McpServerState, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state is not self.state:
            self.state = state
            self.since = time.time()
        self._on_change()

    async def _supervise(self) -> None:
        failures = 0
        first = True
        while not self._stopping:
            if not first:
                self.restarts += 1
            first = False
            self._set(McpServerState.STARTING)
            up_since: list[float] = []
            error = ""
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._stopping:
                    scope.cancel()
                try:
                    await self._attempt(up_since)
                except Exception as exc:  # noqa: BLE001 - a server's failure is reported, never raised
                    error = _describe(exc)
                    if self.settings.url and not isinstance(_innermost(exc), _Down):
                        error = f"{self.settings.url}: {error}"
                    # Read after the transport closed: the server's stderr is all in by now.
                    if self._log.last_line:
                        error += f"; its last stderr line: {self._log.last_line}"
            self._scope = None
            self._conn = None
            self.tools, self._tool_names = [], set()
            if self._stopping:
                self._log.note("stopped")
                self._set(McpServerState.DOWN)
                return
            if up_since and time.monotonic() - up_since[0] >= _STABLE_SECONDS:
                failures = 0
            delay = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2**failures)
            failures += 1
            self._log.note(f"down: {error}; restarting in {delay:g} s")
            self._set(McpServerState.DOWN, error)
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def _attempt(self, up_since: list[float]) -> None:
        """One life of the server: connect, list its tools, keep it healthy.

        Returns when stop() asked; raises when the server failed to start or went down.
        """
        async with AsyncExitStack() as stack:
            if self.settings.command:
                read, write, pid = await self._spawn(stack)
            else:
                self._log.note(f"connecting to {self.settings.url}")
                read, write = await stack.enter_async_context(
                    streamable_http_client(self.settings.url)
                )
                pid = None
            link = _Link(pid)
            session = await stack.enter_async_context(
                ClientSession(
                    _WatchedReadStream(read, lambda: self._lost(link)),
                    write,
                    client_info=types.Implementation(name="taled", version=__version__),
                    logging_callback=self._server_log,
                    message_handler=self._server_message,
                )
            )
            conn = _Connection(link, session)
            self._conn = conn
            self._tools_changed = False
            timeout = self.settings.start_timeout_seconds
            try:
                with anyio.fail_after(timeout):
                    await session.initialize()
                    await self._list_tools(conn)
            except TimeoutError:
                raise _Down(
                    f"it did not start within {timeout:g} s "
                    f"(tools.mcp.{self.name}.start_timeout_seconds)"
                ) from None
            except MCPError as exc:
                if link.closed:
                    raise _Down(self._exit_reason("before it finished starting")) from None
                raise _Down(f"it refused to start: {exc.message}") from None
            up_since.append(time.monotonic())
            self._log.note(f"up: {len(self.tools)} tools")
            self._set(McpServerState.UP)
            await self._keep_alive(conn)

    async def _spawn(
        self, stack: AsyncExitStack
    ) -> tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage], int | None]:
        """Start the stdio server; its stderr is piped into its log."""
        command = self.settings.command
        env = {k: os.environ[k] for k in _CHILD_ENV if k in os.environ} | self.settings.env
        params = StdioServerParameters(command=command, args=self.settings.args, env=env)
        self._log.note("starting: " + " ".join([command, *self.settings.args]))
        self._log.forget()
        read_fd, write_fd = os.pipe()
        pipe_inode = os.fstat(read_fd).st_ino
        loop = asyncio.get_running_loop()
        reader = os.fdopen(read_fd, "rb", buffering=0)
        stderr = _StderrPipe(self._log)
        try:
            pipe, _ = await loop.connect_read_pipe(lambda: stderr, reader)
        except BaseException:
            reader.close()
            os.close(write_fd)
            raise
        stack.push_async_callback(stderr.drain, pipe)
        # Runs after the SDK's own shutdown (stdin closed, then the group signalled if
        # the server lingers): whatever the server started and left behind goes too.
        group: list[int] = []
        stack.push_async_callback(_end_group, group)
        errlog: TextIO = os.fdopen(write_fd, "w")
        try:
            try:
                read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
            except OSError as exc:
                raise _Down(f"could not run {command!r}: {exc.strerror or exc}") from None
        finally:
            errlog.close()  # the server has its own copy
        pid = _child_on_pipe(pipe_inode)
        group.extend([pid] if pid is not None else [])
        return read, write, pid

    async def _keep_alive(self, conn: _Connection) -> None:
        last_ping = time.monotonic()
        while True:
            wait = max(0.0, last_ping + self._ping_interval - time.monotonic())
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            if conn.link.closed:
                raise _Down(conn.link.reason or self._exit_reason("while it was up"))
            if self._tools_changed:
                self._tools_changed = False
                try:
                    with anyio.fail_after(self._ping_timeout):
                        await self._list_tools(conn)
                except TimeoutError:
                    raise _Down(
                        f"it did not list its changed tools within {self._ping_timeout:g} s"
                    ) from None
                self._log.note(f"tools changed: {len(self.tools)} tools")
                self._on_change()
            if time.monotonic() - last_ping >= self._ping_interval:
                try:
                    with anyio.fail_after(self._ping_timeout):
                        await conn.session.send_ping()
                except TimeoutError:
                    if conn.link.pid is not None:
                        # Hung: no use asking it to exit politely first.
                        with suppress(OSError):
                            os.killpg(conn.link.pid, signal.SIGKILL)
                    raise _Down(
                        f"it did not answer a ping within {self._ping_timeout:g} s"
                    ) from None
                except MCPError as exc:
                    if conn.link.closed:
                        raise _Down(self._exit_reason("while it was up")) from None
                    raise _Down(f"it answered a ping with an error: {exc.message}") from None
                last_ping = time.monotonic()

    async def _list_tools(self, conn: _Connection) -> None:
        listed: list[types.Tool] = []
        cursor: str | None = None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await conn.session.list_tools(params=params)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        specs, notes = [], []
        for tool in listed:
            problem = _name_problem(tool.name)
            if problem:
                notes.append(f"tool {tool.name[:80]!r} refused: {problem}")
                continue
            specs.append(_spec(self.name, tool))
        for note in notes:
            self._log.note(note)
        self.tools = specs
        self._tool_names = {spec.name.partition(".")[2] for spec in specs}
        self._notes = tuple(notes)

    def _lost(self, link: _Link, reason: str = "") -> None:
        if not link.closed:
            link.closed, link.reason = True, reason
        self._wake.set()

    async def _answers(self, conn: _Connection) -> bool:
        """Whether the server still answers a ping (asked after a call's connection broke:
        an HTTP server's death reaches a call as an error, not as the end of a stream)."""
        try:
            with anyio.fail_after(min(self._ping_timeout, 5.0)):
                await conn.session.send_ping()
        except Exception:  # noqa: BLE001 - any failure means it does not answer
            return False
        return True

    def _exit_reason(self, when: str) -> str:
        what = "the server closed the connection"
        if self.settings.command:
            what = "the server exited or closed its connection"
        return f"{what} {when}"

    async def _server_log(self, params: types.LoggingMessageNotificationParams) -> None:
        source = f" {params.logger}" if params.logger else ""
        self._log.write(f"[{params.level}{source}] {params.data}\n".encode())

    async def _server_message(self, message: types.ServerNotification | Exception) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._tools_changed = True
            self._wake.set()
        elif isinstance(message, Exception):
            self._log.note(f"transport error: {_describe(message)}")


class _Down(Exception):
    """A server failed to start or went down; the message says why, for ``last_error``."""


# --- a session's read side, watched ------------------------------------------------------


class _WatchedReadStream:
    """The transport's read stream, telling the supervisor when the connection ends.

    The SDK's dispatcher fails the calls in flight when its read stream ends; this lets
    the supervisor see the same moment, mark the session closed and restart the server.
    """

    def __init__(
        self, inner: ReadStream[SessionMessage | Exception], on_end: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- a stdio server's log and processes --------------------------------------------------


class _ServerLog:
    """A server's stderr and log messages in ``mcp-NAME.log`` (0600), rotated at 1 MiB."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._line = ""
        self._tail = ""
        self._fd: int | None = None
        self._size = 0
        self._failed = False

    def write(self, data: bytes, *, stderr: bool = False) -> None:
        if stderr:
            self._remember(data)
        data = data[-_LOG_CAP:]
        try:
            if self._fd is None:
                self._open()
            if self._size + len(data) > _LOG_CAP:
                self.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._open()
            assert self._fd is not None
            os.write(self._fd, data)
            self._size += len(data)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write %s: %s", self.path, exc)
            self._failed = True

    @property
    def last_line(self) -> str:
        """The server's last non-blank stderr line since ``forget()``."""
        return (self._tail.strip() or self._line)[:300]

    def forget(self) -> None:
        """Start a new run: its stderr lines only."""
        self._line = self._tail = ""

    def _remember(self, data: bytes) -> None:
        *lines, self._tail = (self._tail + data.decode("utf-8", "replace")).split("\n")
        self._tail = self._tail[-4096:]
        for line in reversed(lines):
            if line.strip():
                self._line = line.strip()[:300]
                break

    def note(self, text: str) -> None:
        """A line of the daemon's own about this server (its starts, stops and refusals)."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        self.write(f"--- {stamp} {text}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)
        self._size = os.fstat(self._fd).st_size


class _StderrPipe(asyncio.Protocol):
    """Copies what a server writes to stderr into its log."""

    def __init__(self, sink: _ServerLog) -> None:
        self._sink = sink
        self._ended = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self._sink.write(data, stderr=True)

    def eof_received(self) -> None:
        self._ended.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()

    async def drain(self, pipe: asyncio.BaseTransport) -> None:
        """Read what is left (the server has exited, its group is gone), then close."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_PIPE_DRAIN):
            await self._ended.wait()
        pipe.close()


def _child_on_pipe(inode: int) -> int | None:
    """The pid of our child whose stderr is the pipe ``inode`` (the server just spawned).

    The SDK's stdio client keeps its process to itself; the stderr pipe it was given
    tells which child it is (Linux ``/proc``).
    """
    target = f"pipe:[{inode}]"
    for child in psutil.Process().children():
        with suppress(OSError):
            if os.readlink(f"/proc/{child.pid}/fd/2") == target:
                return child.pid
    return None


async def _end_group(group: list[int]) -> None:
    """Kill what is left of a stopped server's process group (it leads its own session):
    helpers it started that outlived it. SIGTERM, then SIGKILL after a grace period."""
    if not group:
        return
    pid = group[0]
    with anyio.CancelScope(shield=True):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        with anyio.move_on_after(_GROUP_GRACE):
            while _group_alive(pid):
                await anyio.sleep(0.02)
            return
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- tools and results -------------------------------------------------------------------


def _name_problem(name: str) -> str:
    if not _TOOL_NAME.fullmatch(name):
        return "a tool name may hold only letters, digits, '_' and '-'"
    if len(name) > _TOOL_NAME_MAX:
        return f"a tool name may be at most {_TOOL_NAME_MAX} characters"
    return ""


def _spec(server: str, tool: types.Tool) -> ToolSpec:
    """The tool as a model sees it. MCP's hint defaults apply: a tool that does not say
    it is read-only may write, and one that may write is taken as destructive unless it
    says ``destructiveHint: false``."""
    hints = tool.annotations
    read_only = bool(hints and hints.read_only_hint)
    destructive = not read_only and (hints is None or hints.destructive_hint is not False)
    title = tool.title or (hints.title if hints and hints.title else "")
    return ToolSpec(
        name=f"{server}.{tool.name}",
        description=tool.description or "",
        input_schema=dict(tool.input_schema),
        read_only=read_only,
        destructive=destructive,
        title=title,
    )


def _read_result(result: types.CallToolResult) -> ToolResult:
    structured = result.structured_content
    if result.content:
        text = "\n".join(_describe_content(item) for item in result.content)
    elif structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    else:
        text = "(the tool returned nothing)"
    data = {"structured_content": structured} if structured is not None else None
    return ToolResult(content=text, is_error=bool(result.is_error), data=data)


def _describe_content(item: types.ContentBlock) -> str:
    if isinstance(item, types.TextContent):
        return item.text
    if isinstance(item, types.ImageContent):
        return f"[image {_size(_b64_len(item.data))}]"
    if isinstance(item, types.AudioContent):
        return f"[audio {_size(_b64_len(item.data))}]"
    if isinstance(item, types.ResourceLink):
        return f"[resource link {item.uri}]"
    if isinstance(item, types.EmbeddedResource):
        resource = item.resource
        if isinstance(resource, types.TextResourceContents):
            return f"[resource {resource.uri}]\n{resource.text}"
        return f"[resource {resource.uri} {_size(_b64_len(resource.blob))}]"
    return f"[{getattr(item, 'type', 'content')}]"


def _b64_len(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except ValueError:
        return len(data) * 3 // 4


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{round(n / 1024)} KiB"
    return f"{n / 2**20:.1f} MiB"


def _error(text: str) -> ToolResult:
    return ToolResult(content=text, is_error=True)


def _describe(exc: BaseException) -> str:
    """A failure as one line for ``last_error``: the innermost real error of a group."""
    exc = _innermost(exc)
    if isinstance(exc, _Down | MCPError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _innermost(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
