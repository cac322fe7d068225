"""A real MCP server for the client's tests: ``python workbench.py [--http PORT]``.

Every tool run appends the tool's name to the file named by ``WORKBENCH_RUNS`` (when
set) before it does anything else, so a test can count what really ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import TypedDict

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

server = MCPServer("workbench")


def _ran(tool: str) -> None:
    runs = os.environ.get("WORKBENCH_RUNS")
    if runs:
        with open(runs, "a", encoding="utf-8") as f:
            f.write(tool + "\n")
            f.flush()
            os.fsync(f.fileno())


class Sum(TypedDict):
    total: int


@server.tool(
    title="Echo",
    description="Say the text back.",
    annotations=ToolAnnotations(read_only_hint=True),
)
def echo(text: str) -> str:
    _ran("echo")
    return text


@server.tool(description="Add two integers.", annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> Sum:
    _ran("add")
    return {"total": a + b}


@server.tool(
    description="Pretend to delete a file.", annotations=ToolAnnotations(destructive_hint=True)
)
def wipe(path: str) -> str:
    _ran("wipe")
    return f"wiped {path}"


@server.tool(
    description="Append a line (not destructive).",
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False),
)
def note(line: str) -> str:
    _ran("note")
    return "noted"


@server.tool(description="Always fails with the given reason.")
def fail(reason: str) -> str:
    _ran("fail")
    raise ToolError(reason)


@server.tool(description="The server's process exits in the middle of the call.")
def crash() -> str:
    _ran("crash")
    os._exit(3)


@server.tool(description="Answer after a while.")
async def slow(seconds: float) -> str:
    _ran("slow")
    await anyio.sleep(seconds)
    return "done"


@server.tool(description="Answer, then freeze the whole process (SIGSTOP) a moment later.")
def freeze() -> str:
    _ran("freeze")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGSTOP)).start()
    return "freezing"


@server.tool(description="An environment variable of the server ('' when unset).")
def getenv(name: str) -> str:
    _ran("getenv")
    return os.environ.get(name, "")


@server.tool(description="The server's process id.")
def pid() -> int:
    _ran("pid")
    return os.getpid()


@server.tool(
    description="Start a helper process (sleep 300) in the server's group; return its pid."
)
def helper() -> int:
    _ran("helper")
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    return child.pid


@server.tool(description="A small PNG-ish image (12 KiB).")
def picture() -> Image:
    _ran("picture")
    return Image(data=b"\x89PNG" + bytes(12 * 1024 - 4), format="png")


@server.tool(description="Write this many KiB of lines to stderr.")
def shout(kib: int) -> str:
    _ran("shout")
    line = "x" * 1023 + "\n"
    for _ in range(kib):
        sys.stderr.write(line)
    sys.stderr.write("shouted\n")
    sys.stderr.flush()
    return "shouted"


def grown() -> str:
    _ran("grown")
    return "I am new"


@server.tool(description="Add the tool 'grown' and tell the client the tool list changed.")
async def grow(ctx: Context) -> str:
    _ran("grow")
    server.add_tool(grown, description="A tool added while the server runs.")
    await ctx.session.send_tool_list_changed()
    return "grew"


@server.tool(name="bad name!", description="A name with characters the client refuses.")
def bad_name() -> str:
    return "never listed"


@server.tool(name="x" * 80, description="A name longer than the client allows.")
def long_name() -> str:
    return "never listed"


if __name__ == "__main__":
    print("workbench: starting", file=sys.stderr, flush=True)
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
