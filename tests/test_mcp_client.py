"""The daemon as an MCP client: the user's servers started, supervised and called.

Every server here is real: ``tests/mcp_servers/workbench.py`` (the official SDK's
``MCPServer``) over stdio or streamable HTTP, and the reference filesystem server from
npm through ``npx``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from taled.settings import McpServerSettings
from taled.tools.base import ToolCall, ToolResult
from taled.tools.mcp_client import McpServers, McpServerState, McpServerStatus
from tests.mcp_servers import WORKBENCH, workbench_args

START = 60.0
"""Seconds a test waits for a Python MCP server to come up (importing the SDK is slow)."""


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def workbench(tmp_path: Path, **fields: Any) -> McpServerSettings:
    """The workbench server on stdio, counting its tool runs in ``tmp_path/runs``."""
    command, args = workbench_args()
    env = {"WORKBENCH_RUNS": str(tmp_path / "runs"), **fields.pop("env", {})}
    return McpServerSettings(command=command, args=args, env=env, **fields)


def runs(tmp_path: Path) -> list[str]:
    """The tools the workbench really ran, in order."""
    path = tmp_path / "runs"
    return path.read_text().splitlines() if path.exists() else []


@asynccontextmanager
async def started(
    tmp_path: Path, servers: dict[str, McpServerSettings], **options: float
) -> AsyncIterator[McpServers]:
    mcp = McpServers(servers, log_dir=tmp_path / "logs", **options)
    await mcp.start()
    try:
        yield mcp
    finally:
        await mcp.stop()


def one(mcp: McpServers, name: str) -> McpServerStatus:
    return next(s for s in mcp.status() if s.name == name)


async def until(
    mcp: McpServers, test: Callable[[dict[str, McpServerStatus]], bool], timeout: float = START
) -> dict[str, McpServerStatus]:
    """Wait for the servers' statuses to pass ``test``; fail with them if they never do."""
    ok = await mcp.wait_for(lambda statuses: test({s.name: s for s in statuses}), timeout)
    statuses = {s.name: s for s in mcp.status()}
    assert ok, statuses
    return statuses


async def up(mcp: McpServers, *names: str, timeout: float = START) -> None:
    await until(mcp, lambda s: all(s[n].state is McpServerState.UP for n in names), timeout)


async def call(
    mcp: McpServers, tool: str, /, *, timeout: float | None = None, **args: Any
) -> ToolResult:
    return await mcp.call(ToolCall(id="c1", name=tool, arguments=args), timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_tools_are_listed_namespaced_with_annotations(tmp_path: Path) -> None:
    """A server's tools are offered as NAME.tool with its title and hints mapped."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            tools = {t.name: t for t in mcp.tools()}
            assert {"wb.echo", "wb.add", "wb.wipe", "wb.note", "wb.crash"} <= set(tools)
            echo = tools["wb.echo"]
            assert echo.title == "Echo"
            assert echo.description == "Say the text back."
            assert (echo.read_only, echo.destructive) == (True, False)
            assert echo.input_schema["type"] == "object"
            assert echo.input_schema["required"] == ["text"]
            assert (tools["wb.wipe"].read_only, tools["wb.wipe"].destructive) == (False, True)
            assert (tools["wb.note"].read_only, tools["wb.note"].destructive) == (False, False)
            assert mcp.server_of("wb.echo") == "wb"
            assert mcp.server_of("other.echo") is None
            assert one(mcp, "wb").tools == len(tools)

    run(body)


def test_a_changed_tool_list_is_listed_again(tmp_path: Path) -> None:
    """A server's tools/list_changed notification makes its new tools callable."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            before = one(mcp, "wb").tools
            assert (await call(mcp, "wb.grow")).content == "grew"
            await until(mcp, lambda s: s["wb"].tools == before + 1)
            assert "wb.grown" in {t.name for t in mcp.tools()}
            assert (await call(mcp, "wb.grown")).content == "I am new"

    run(body)


def test_tools_with_unusable_names_are_refused_and_noted(tmp_path: Path) -> None:
    """Tool names with characters outside [A-Za-z0-9_-] or over 64 long are skipped and
    the status says which and why."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            names = {t.name for t in mcp.tools()}
            assert "wb.bad name!" not in names
            assert not any(len(n) > 64 + 3 for n in names)
            notes = one(mcp, "wb").notes
            assert any("'bad name!'" in n and "letters, digits" in n for n in notes), notes
            assert any("at most 64 characters" in n for n in notes), notes

    run(body)


def test_a_call_returns_text_and_structured_content(tmp_path: Path) -> None:
    """A tool's text content is the result and its structuredContent is kept in data."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            echoed = await call(mcp, "wb.echo", text="hello there")
            assert echoed == ToolResult(
                "hello there", data={"structured_content": {"result": "hello there"}}
            )
            added = await call(mcp, "wb.add", a=2, b=40)
            assert not added.is_error
            assert '"total": 42' in added.content
            assert added.data == {"structured_content": {"total": 42}}

    run(body)


def test_non_text_content_is_described(tmp_path: Path) -> None:
    """An image in a tool's answer reaches the model as a short description, not bytes."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            assert await call(mcp, "wb.picture") == ToolResult("[image 12 KiB]")

    run(body)


def test_a_tool_error_comes_back_as_is_error(tmp_path: Path) -> None:
    """A tool's isError answer is an is_error result carrying the server's message."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            result = await call(mcp, "wb.fail", reason="the disk is on fire")
            assert result.is_error
            assert "the disk is on fire" in result.content
            assert one(mcp, "wb").state is McpServerState.UP

    run(body)


def test_model_mistakes_are_error_results(tmp_path: Path) -> None:
    """An unknown server or tool and arguments that are not an object are is_error
    results naming what exists; nothing is sent to the server."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            nowhere = await call(mcp, "nosuch.echo", text="x")
            assert nowhere.is_error and "wb" in nowhere.content
            bare = await call(mcp, "echo", text="x")
            assert bare.is_error and "SERVER.tool" in bare.content
            missing = await call(mcp, "wb.nosuch")
            assert missing.is_error
            assert "has no tool 'nosuch'" in missing.content and "echo" in missing.content
            for arguments in (None, ["x"], "text"):
                bad = await mcp.call(ToolCall(id="c2", name="wb.echo", arguments=arguments))  # type: ignore[arg-type]
                assert bad.is_error and "must be a JSON object" in bad.content
            assert runs(tmp_path) == []

    run(body)


def test_a_server_that_exits_mid_call_is_restarted_and_the_call_is_not_resent(
    tmp_path: Path,
) -> None:
    """A call cut off by the server's death is an is_error result; the server comes back
    (restarts counts it), the next call works, and the cut-off call ran exactly once."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            first_pid = one(mcp, "wb").pid
            result = await call(mcp, "wb.crash")
            assert result.is_error
            assert result.content == (
                "wb crashed during the call; it is being restarted; the call was not retried"
            )
            status = await until(
                mcp, lambda s: s["wb"].restarts >= 1 and s["wb"].state is McpServerState.UP
            )
            assert status["wb"].restarts == 1
            assert "exited or closed its connection" in status["wb"].last_error
            assert status["wb"].pid not in (None, first_pid)
            assert await call(mcp, "wb.echo", text="back") == ToolResult(
                "back", data={"structured_content": {"result": "back"}}
            )
            assert runs(tmp_path) == ["crash", "echo"]

    run(body)


def test_a_server_that_never_starts_is_down_and_does_not_block_start(tmp_path: Path) -> None:
    """A bad command leaves its server down with a clear last_error, retried with
    backoff, while start() returns at once and the other servers come up."""

    async def body() -> None:
        servers = {
            "broken": McpServerSettings(command="/nonexistent/tale-mcp-server"),
            "wb": workbench(tmp_path),
        }
        begun = time.monotonic()
        async with started(tmp_path, servers) as mcp:
            assert time.monotonic() - begun < 1.0
            status = await until(
                mcp,
                lambda s: (
                    s["broken"].restarts >= 1
                    and s["broken"].state is McpServerState.DOWN
                    and s["wb"].state is McpServerState.UP
                ),
            )
            broken = status["broken"]
            assert broken.last_error == (
                "could not run '/nonexistent/tale-mcp-server': No such file or directory"
            )
            assert broken.tools == 0 and broken.pid is None
            assert all(t.name.startswith("wb.") for t in mcp.tools())
            result = await call(mcp, "broken.anything")
            assert result.is_error and "is down" in result.content

    run(body)


def test_a_server_that_exits_at_start_shows_its_last_stderr_line(tmp_path: Path) -> None:
    """A server that dies before answering initialize is down, and last_error quotes the
    last line it wrote to stderr."""

    async def body() -> None:
        code = "import sys; print('loading config', file=sys.stderr); sys.exit('no API key set')"
        servers = {"dies": McpServerSettings(command=sys.executable, args=["-c", code])}
        async with started(tmp_path, servers) as mcp:
            status = await until(mcp, lambda s: s["dies"].state is McpServerState.DOWN)
            assert status["dies"].last_error == (
                "the server exited or closed its connection before it finished starting; "
                "its last stderr line: no API key set"
            )

    run(body)


def test_a_slow_tool_hits_the_timeout(tmp_path: Path) -> None:
    """A call past call_timeout_seconds is an is_error result naming the setting, and the
    server stays up for the next call."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path, call_timeout_seconds=1)}) as mcp:
            await up(mcp, "wb")
            begun = time.monotonic()
            result = await call(mcp, "wb.slow", seconds=30)
            assert time.monotonic() - begun < 5
            assert result == ToolResult(
                "wb.slow did not answer within 1 s (tools.mcp.wb.call_timeout_seconds)",
                is_error=True,
            )
            assert (await call(mcp, "wb.echo", text="still here")).content == "still here"
            shorter = await call(mcp, "wb.slow", timeout=0.5, seconds=30)
            assert shorter.content == "wb.slow did not answer within 0.5 s"

    run(body)


def test_a_frozen_server_fails_its_ping_and_is_restarted(tmp_path: Path) -> None:
    """A server that stops answering (SIGSTOP) is found by the ping, marked down, killed
    and started again."""

    async def body() -> None:
        options = {"ping_interval": 0.5, "ping_timeout": 0.5}
        async with started(tmp_path, {"wb": workbench(tmp_path)}, **options) as mcp:
            await up(mcp, "wb")
            frozen = one(mcp, "wb").pid
            assert frozen is not None
            assert (await call(mcp, "wb.freeze")).content == "freezing"
            status = await until(
                mcp, lambda s: s["wb"].restarts >= 1 and s["wb"].state is McpServerState.UP
            )
            assert "did not answer a ping within 0.5 s" in status["wb"].last_error
            assert gone(frozen)
            assert (await call(mcp, "wb.echo", text="thawed")).content == "thawed"

    run(body)


def test_stop_leaves_no_child_processes(tmp_path: Path) -> None:
    """stop() ends each server's process and the helpers it started (by pid)."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            server_pid = one(mcp, "wb").pid
            assert (await call(mcp, "wb.pid")).content == str(server_pid)
            helper = int((await call(mcp, "wb.helper")).content)
            assert server_pid is not None and not gone(server_pid) and not gone(helper)
            await mcp.stop()
            assert gone(server_pid)
            assert gone(helper)
            assert one(mcp, "wb").state is McpServerState.DOWN
            assert one(mcp, "wb").pid is None
            assert mcp.tools() == []
            stopped = await call(mcp, "wb.echo", text="x")
            assert stopped.is_error

    run(body)


def test_the_server_does_not_see_the_daemons_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stdio server gets PATH, HOME, LANG and its configured env, not the daemon's
    secrets."""
    monkeypatch.setenv("TALE_TEST_OPENAI_API_KEY", "sk-daemon-only")
    monkeypatch.setenv("LANG", "C.UTF-8")

    async def body() -> None:
        settings = workbench(tmp_path, env={"WORKBENCH_TOKEN": "configured"})
        async with started(tmp_path, {"wb": settings}) as mcp:
            await up(mcp, "wb")

            async def env(name: str) -> str:
                return (await call(mcp, "wb.getenv", name=name)).content

            assert await env("TALE_TEST_OPENAI_API_KEY") == ""
            assert await env("WORKBENCH_TOKEN") == "configured"
            assert await env("LANG") == "C.UTF-8"
            assert await env("PATH") == os.environ["PATH"]

    run(body)


def test_server_stderr_goes_to_its_own_capped_log(tmp_path: Path) -> None:
    """A server's stderr lands in log_dir/mcp-NAME.log (0600), rotated before 1 MiB."""

    async def body() -> None:
        async with started(tmp_path, {"wb": workbench(tmp_path)}) as mcp:
            await up(mcp, "wb")
            assert (await call(mcp, "wb.shout", kib=1500)).content == "shouted"
        log = tmp_path / "logs" / "mcp-wb.log"
        text = log.read_text()
        assert "workbench: starting" in (tmp_path / "logs" / "mcp-wb.log.1").read_text()
        assert "shouted" in text
        assert log.stat().st_size <= 1 << 20
        assert log.stat().st_mode & 0o777 == 0o600

    run(body)


def test_a_disabled_server_is_listed_and_never_started(tmp_path: Path) -> None:
    """enabled = false: the server shows as disabled and offers no tools."""

    async def body() -> None:
        async with started(tmp_path, {"off": workbench(tmp_path, enabled=False)}) as mcp:
            assert await mcp.settled(1.0)
            status = one(mcp, "off")
            assert (status.state, status.pid, status.tools) == (McpServerState.DISABLED, None, 0)
            assert mcp.tools() == []
            assert status.as_json()["state"] == "disabled"

    run(body)


@contextmanager
def http_workbench(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The workbench server on streamable HTTP at ``port``, listening when this yields."""
    with (tmp_path / "http.log").open("a") as out:
        server = subprocess.Popen(
            [sys.executable, str(WORKBENCH), "--http", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, "WORKBENCH_RUNS": str(tmp_path / "runs")},
        )
    try:
        deadline = time.monotonic() + START
        while True:
            assert server.poll() is None, (tmp_path / "http.log").read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the HTTP server never listened"
            time.sleep(0.1)
        yield server
    finally:
        server.kill()
        server.wait(10)


def test_a_streamable_http_server_is_called_by_url(tmp_path: Path) -> None:
    """A server given by url is reached with the SDK's streamable-HTTP client."""
    port = free_port()

    async def body() -> None:
        url = McpServerSettings(url=f"http://127.0.0.1:{port}/mcp")
        async with started(tmp_path, {"web": url}) as mcp:
            await up(mcp, "web")
            assert one(mcp, "web").pid is None
            assert "web.echo" in {t.name for t in mcp.tools()}
            assert (await call(mcp, "web.echo", text="over http")).content == "over http"

    with http_workbench(tmp_path, port):
        run(body)


def test_an_http_server_that_dies_mid_call_is_reconnected_when_back(tmp_path: Path) -> None:
    """A call cut off by an HTTP server's death is a "crashed" result, not re-sent; the
    server shows down while unreachable and up again once it is back."""
    port = free_port()

    async def body() -> None:
        url = McpServerSettings(url=f"http://127.0.0.1:{port}/mcp")
        async with started(tmp_path, {"web": url}) as mcp:
            with http_workbench(tmp_path, port):
                await up(mcp, "web")
                result = await call(mcp, "web.crash")
            assert result.is_error and "crashed during the call" in result.content
            status = await until(mcp, lambda s: s["web"].state is McpServerState.DOWN)
            assert status["web"].last_error
            with http_workbench(tmp_path, port):
                await until(
                    mcp,
                    lambda s: s["web"].state is McpServerState.UP and s["web"].restarts >= 1,
                )
                assert (await call(mcp, "web.echo", text="again")).content == "again"
        assert runs(tmp_path) == ["crash", "echo"]

    run(body)


def test_the_reference_filesystem_server_reads_a_file(tmp_path: Path) -> None:
    """The npm reference server (npx -y @modelcontextprotocol/server-filesystem DIR)
    starts under supervision and reads a file through its tools."""
    package = "@modelcontextprotocol/server-filesystem"
    npx, npm = shutil.which("npx"), shutil.which("npm")
    if npx is None or npm is None:
        pytest.skip("npx is not installed")
    try:
        probe = subprocess.run(
            [npm, "view", package, "version"], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the npm registry did not answer for {package} within 90 s")
    if probe.returncode != 0:
        pytest.skip(f"{package} cannot be fetched from npm: {probe.stderr.strip()[-300:]}")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("the answer is 42\n")

    async def body() -> None:
        settings = McpServerSettings(
            command="npx", args=["-y", package, str(shared)], start_timeout_seconds=300
        )
        async with started(tmp_path, {"fs": settings}) as mcp:
            status = await until(mcp, lambda s: s["fs"].state is not McpServerState.STARTING, 330)
            log = tmp_path / "logs" / "mcp-fs.log"
            assert status["fs"].state is McpServerState.UP, (status, log.read_text())
            names = {t.name for t in mcp.tools()}
            read = "fs.read_text_file" if "fs.read_text_file" in names else "fs.read_file"
            assert read in names, names
            result = await call(mcp, read, path=str(shared / "notes.txt"))
            assert not result.is_error, result
            assert "the answer is 42" in result.content
            outside = await call(mcp, read, path="/etc/hostname")
            assert outside.is_error

    run(body)
