"""The only module that writes stdout, and the one that owns stderr and exit codes.

Answers go to stdout (``--json``: exactly one JSON document); progress and
diagnostics go to stderr. Text from the daemon is made ``printable`` on its way
out (tale_client/sanitize.py says why); JSON keeps it exact.
"""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from typing import Any, NoReturn

from tale_client.sanitize import json_safe, printable

__all__ = [
    "CliError",
    "Exit",
    "bell",
    "emit",
    "emit_json",
    "emit_piece",
    "emit_rich",
    "fail",
    "note",
]


class Exit(IntEnum):
    """The CLI's exit codes (a contract scripts rely on)."""

    OK = 0
    FAILED = 1  # the task or the call failed
    USAGE = 2  # bad usage or invalid input; nothing was written
    UNREACHABLE = 3  # the daemon could not be reached or started


class CliError(Exception):
    """Stop the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def emit(text: str) -> None:
    """Write an answer line to stdout."""
    sys.stdout.write(printable(text) + "\n")
    sys.stdout.flush()


def emit_piece(text: str) -> None:
    """Write streamed text to stdout as it arrives (no newline)."""
    sys.stdout.write(printable(text))
    sys.stdout.flush()


def emit_json(doc: Any) -> None:
    """Write one JSON document to stdout (C0 controls are escaped by JSON, C1 here)."""
    sys.stdout.write(json_safe(json.dumps(doc, indent=2, ensure_ascii=False)) + "\n")
    sys.stdout.flush()


def emit_rich(renderables: list[Any]) -> None:
    """Write rich renderables (tables, text) to stdout; plain when NO_COLOR or not a TTY.

    Rich passes escape sequences in its text through: build them from ``printable_doc``.
    """
    # Imported here: rich's console is only worth loading for the commands that draw tables.
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    for item in renderables:
        console.print(item)
    sys.stdout.flush()


def bell() -> None:
    """Ring the terminal's bell: BEL on stderr, only when stderr is a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write("\a")
        sys.stderr.flush()


def note(text: str) -> None:
    """A diagnostic or progress line on stderr."""
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


def fail(message: str, code: Exit) -> NoReturn:
    """Print ``tale: message`` to stderr and exit with ``code``."""
    note(f"tale: {message}")
    raise SystemExit(int(code))
