"""docs/editors.md is true: each editor's block parses, has the form that editor reads,
and its command, launched as an editor launches it (the MCP SDK's default environment
only), reaches the daemon the shell uses."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client

from tests.harness import Daemon, Home

DOC = Path(__file__).resolve().parents[1] / "docs" / "editors.md"
# Where each editor reads its servers from, in the block under its heading.
SERVERS_KEY = {
    "Claude Code": "mcpServers",
    "VS Code": "servers",
    "Cursor": "mcpServers",
    "Zed": "context_servers",
}


def _sections() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _entries() -> dict[str, dict[str, Any]]:
    """The ``tale`` server entry of each editor's JSON block."""
    sections = _sections()
    found: dict[str, dict[str, Any]] = {}
    for editor, key in SERVERS_KEY.items():
        [block] = _blocks(sections[editor], "json")
        found[editor] = json.loads(block)[key]["tale"]
    return found


def test_every_editor_named_has_a_block_in_the_form_it_reads() -> None:
    entries = _entries()
    assert set(entries) == set(SERVERS_KEY)
    for editor, entry in entries.items():
        assert entry["command"] == "tale", editor
        assert entry["args"] == ["mcp"], editor
    assert entries["VS Code"]["type"] == "stdio"  # VS Code needs the transport named


def test_the_claude_code_command_adds_the_same_server_as_its_json() -> None:
    [block] = _blocks(_sections()["Claude Code"], "console")
    argv = shlex.split(block.strip().removeprefix("$ "))
    assert argv[:3] == ["claude", "mcp", "add"]
    name = argv[argv.index("--") - 1]
    launched = argv[argv.index("--") + 1 :]
    entry = _entries()["Claude Code"]
    assert name == "tale"
    assert launched == [entry["command"], *entry["args"]]


@pytest.mark.parametrize("editor", sorted(SERVERS_KEY))
def test_each_editors_command_reaches_the_running_daemon(
    editor: str, login_runtime_dir: Path
) -> None:
    entry = _entries()[editor]
    command = shutil.which(entry["command"])
    assert command is not None, f"{entry['command']} is not on PATH"
    home = Home(extra_env={"XDG_RUNTIME_DIR": str(login_runtime_dir)})
    daemon = Daemon(home)
    try:
        daemon.start()
        task_id = home.tale("submit", "Name a colour").stdout.strip()
        # What an editor passes: the SDK's default variables (HOME isolated in the test
        # home) and the entry's own env.
        env = {**get_default_environment(), "HOME": str(home.root), **entry.get("env", {})}
        params = StdioServerParameters(command=command, args=entry["args"], env=env)

        async def get_task() -> Any:
            async with (
                stdio_client(params) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await session.call_tool("get_task", {"id": task_id})

        got = anyio.run(get_task)
        assert got.structured_content is not None
        assert got.structured_content["id"] == task_id
    finally:
        daemon.kill_if_running()
        home.cleanup()
