"""The thin client stays thin: what `tale list` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import Daemon

# Run `tale list` in-process and dump the modules it loaded, at exit.
_PROBE = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["tale", "list"]
from tale_client.cli import main
main()
"""

FORBIDDEN = (
    "mcp",
    "mcp_types",
    "taled",
    "pydantic",
    "pydantic_settings",
    "textual",
    "rich.table",
    "sqlalchemy",
    "llama_cpp",
    "anyio",
)


def test_tale_list_imports_no_heavy_modules(shared_daemon: Daemon, tmp_path: object) -> None:
    """`tale list` imports none of mcp, taled, pydantic, textual, rich.table, sqlalchemy."""
    out = f"{tmp_path}/modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, out],
        env=shared_daemon.home.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(Path(out).read_text())
    loaded = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN)
    assert loaded == [], f"`tale list` imported {loaded}"
    assert "tale_client.rpc" in modules
