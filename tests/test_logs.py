"""The daemon's log under systemd: journald priorities, no second time stamp.

Each test runs ``setup_logging`` in a fresh interpreter whose stderr is a file, as
systemd connects a service's stderr to the journal and names that stream in
``JOURNAL_STREAM`` (``device:inode``); the file stands in for the journal's socket.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

# Sets up logging as taled does without a --log-file, then runs the test's lines.
PRELUDE = """
import logging
from taled.daemon.logs import setup_logging
from taled.settings import DaemonSettings
setup_logging(DaemonSettings(log_level="debug"), None)
log = logging.getLogger("taled.test")
"""

STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _stderr_of(code: str, tmp_path: Path, journal: str | None = "stderr") -> list[str]:
    """Run PRELUDE + ``code`` with stderr to a file; ``journal``: what JOURNAL_STREAM names.

    ``"stderr"`` names that file (as systemd would), ``"other"`` another file (a
    variable inherited from a service by a process whose stderr went elsewhere),
    None leaves it unset.
    """
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err.open("wb") as stream:
        if journal is not None:
            named = os.fstat(stream.fileno())
            if journal == "other":
                named = os.stat(tmp_path)
            env["JOURNAL_STREAM"] = f"{named.st_dev}:{named.st_ino}"
        subprocess.run(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            stderr=stream,
            env=env,
            timeout=120,
            check=True,
        )
    return err.read_text().splitlines()


def test_under_the_journal_each_level_gets_its_syslog_priority(tmp_path: Path) -> None:
    """debug, info, warning, error and critical lines start <7>, <6>, <4>, <3> and <2>."""
    lines = _stderr_of(
        """
        log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
        """,
        tmp_path,
    )
    assert lines == [
        "<7>DEBUG taled.test: d",
        "<6>INFO taled.test: i",
        "<4>WARNING taled.test: w",
        "<3>ERROR taled.test: e",
        "<2>CRITICAL taled.test: c",
    ]


def test_under_the_journal_every_line_of_a_traceback_carries_the_priority(
    tmp_path: Path,
) -> None:
    """A logged exception's traceback lines are all filed as errors, not as info."""
    lines = _stderr_of(
        """
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("failed")
        """,
        tmp_path,
    )
    assert lines[0] == "<3>ERROR taled.test: failed"
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in lines), lines


def test_without_journal_stream_lines_keep_their_time_stamp_and_no_prefix(
    tmp_path: Path,
) -> None:
    """Outside systemd (a terminal, a pipe) the format is the usual one, time stamp first."""
    (line,) = _stderr_of('log.warning("w")', tmp_path, journal=None)
    assert STAMP.match(line), line
    assert line.endswith(" WARNING taled.test: w")


def test_a_journal_stream_naming_another_stream_is_ignored(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr is elsewhere adds no prefix."""
    (line,) = _stderr_of('log.warning("w")', tmp_path, journal="other")
    assert STAMP.match(line), line
    assert not line.startswith("<")


def test_llama_cpp_errors_reach_the_journal_with_their_priority(tmp_path: Path) -> None:
    """llama.cpp's own error lines, written while it loads a model, are logged as errors."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    lines = _stderr_of(
        f"""
        import asyncio
        from taled.errors import ModelError
        from taled.models.backends.llamacpp import LlamaCppBackend
        from taled.settings import LlamaCppSettings
        try:
            asyncio.run(LlamaCppBackend({str(broken)!r}, LlamaCppSettings()).load())
        except ModelError as exc:
            log.info("refused: %s", exc)
        """,
        tmp_path,
    )
    native = [line for line in lines if " llama.cpp: " in line]
    assert native, lines
    assert all(line.startswith("<3>ERROR llama.cpp: ") for line in native), native
    assert any(line.startswith("<6>INFO taled.test: refused: ") for line in lines), lines
