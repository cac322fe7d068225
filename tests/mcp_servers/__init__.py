"""Real MCP servers, written with the official SDK, that tests/test_mcp_client.py supervises.

``workbench.py`` offers one tool per behaviour the client must handle (text,
structured content, a tool error, a crash mid-call, a slow answer, a frozen process,
an image, names the client refuses); each tool run appends its name to the file named
by ``WORKBENCH_RUNS``, so a test can count what really ran.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["WORKBENCH", "workbench_args"]

WORKBENCH = Path(__file__).with_name("workbench.py")


def workbench_args(*extra: str) -> tuple[str, list[str]]:
    """The command and arguments that start the workbench server on stdio."""
    return sys.executable, [str(WORKBENCH), *extra]
