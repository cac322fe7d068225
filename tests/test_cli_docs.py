"""docs/cli.md is the real ``--help`` of ``tale`` and every subcommand, kept in sync.

Regenerate it after changing the command line with::

    python -m tests.test_cli_docs

Help is rendered by running the CLI with ``COLUMNS=100``, ``NO_COLOR=1`` and
``TERM=dumb`` in a minimal environment, so the output does not depend on the
terminal, and any styling left is stripped.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parent.parent
CLI_MD = REPO / "docs" / "cli.md"
REGENERATE = "python -m tests.test_cli_docs"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
_HELP_ENV = {
    "COLUMNS": "100",
    "NO_COLOR": "1",
    "TERM": "dumb",
    "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
}


def command_paths() -> list[tuple[str, ...]]:
    """Every visible command, as argument tuples: (), ('submit',), ('daemon', 'install'), ..."""
    from tale_client.cli import app

    paths: list[tuple[str, ...]] = []

    # Typer >= 0.28 vendors click, so groups are recognised by their ``commands``
    # mapping (in registration order, the order --help lists them) not by class.
    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


def render_help(path: tuple[str, ...], columns: int = 100) -> str:
    """``tale <path> --help`` as the real CLI prints it, unstyled, without trailing blanks."""
    env = {"PATH": os.environ.get("PATH", ""), **_HELP_ENV, "COLUMNS": str(columns)}
    result = subprocess.run(
        [sys.executable, "-m", "tale_client.cli", *path, "--help"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"tale {' '.join(path)} --help exited {result.returncode}:\n{result.stderr}"
        )
    lines = [line.rstrip() for line in _ANSI.sub("", result.stdout).splitlines()]
    return "\n".join(lines).strip("\n")


@functools.cache
def generate() -> str:
    """The text docs/cli.md must have."""
    paths = command_paths()
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = list(pool.map(render_help, paths))
    parts = [
        "# The `tale` command line\n",
        f"<!-- Generated from the real --help output by `{REGENERATE}`; do not edit. -->\n",
        "Every command's `--help`, as printed at 100 columns. Exit codes: 0 success, "
        "1 the task or call failed, 2 bad usage or invalid input, 3 the daemon could not "
        "be reached or started.\n",
    ]
    for path, text in zip(paths, helps, strict=True):
        parts.append(f"## `{' '.join(('tale', *path))}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def test_cli_md_matches_the_current_help_output() -> None:
    """docs/cli.md is exactly what the generator produces from today's --help output."""
    current = CLI_MD.read_text() if CLI_MD.exists() else ""
    assert current == generate(), (
        f"docs/cli.md is out of date with the CLI's --help output. Regenerate it with "
        f"`{REGENERATE}` (from the repository root) and commit the result."
    )


def test_cli_md_covers_nested_subcommands() -> None:
    """The generator documents subcommands of groups too, e.g. `tale daemon install`."""
    assert ("daemon", "install") in command_paths()
    assert "## `tale daemon install`" in generate()


def main() -> None:
    """Rewrite docs/cli.md from the current --help output."""
    CLI_MD.parent.mkdir(parents=True, exist_ok=True)
    CLI_MD.write_text(generate())
    print(f"wrote {CLI_MD.relative_to(REPO)} ({len(command_paths())} commands)")


if __name__ == "__main__":
    main()


def test_a_command_list_gives_each_summary_on_one_line() -> None:
    """`tale --help` (and each group's) lists a command by its docstring's first
    paragraph as one line where the terminal is wide enough: not broken where the
    docstring's source lines were."""
    from tale_client.cli import app

    def groups(cmd: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
        found = [(path, cmd)] if getattr(cmd, "commands", None) else []
        for name, sub in getattr(cmd, "commands", {}).items():
            found += groups(sub, (*path, name))
        return found

    checked = 0
    for path, group in groups(typer.main.get_command(app), ()):
        listing = render_help(path, columns=400)
        for name, sub in group.commands.items():
            if sub.hidden or not sub.help:
                continue
            summary = " ".join(sub.help.split("\n\n")[0].split())
            assert any(summary in line for line in listing.splitlines()), (
                f"tale {' '.join(path)} --help does not list {name!r} on one line"
            )
            checked += 1
    assert checked >= 30  # every group's commands were looked at
