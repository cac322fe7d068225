"""Telling a crash from a kill: the daemon's own record of a fatal error.

``faulthandler`` writes the Python stacks of every thread to ``crash.log`` in the
data directory when the process dies of a fatal signal (SIGSEGV, SIGFPE, SIGABRT,
SIGBUS, SIGILL: a native crash in llama.cpp, say). The next start reads it: a
non-empty file means the previous run crashed by itself, and the tasks it was
running are suspects (``runner.quarantine_after``). A kill (``kill -9``, the OOM
killer, a power cut) writes nothing, so it never counts against a task.
"""

from __future__ import annotations

import faulthandler
import logging
import os
from pathlib import Path
from typing import TextIO

__all__ = ["CrashLog"]

log = logging.getLogger(__name__)


class CrashLog:
    """``arm()`` at start-up (it says whether the last run crashed); ``disarm()`` at a stop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def arm(self) -> str | None:
        """What the previous run died of (the first line of its fatal error), or None;
        from now on a fatal error of this run is written to the file."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            text = ""
        crash = None
        if text:
            crash = text.splitlines()[0].removeprefix("Fatal Python error: ").strip()
            log.error("the previous run of the daemon crashed: %s\n%s", crash, text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        faulthandler.enable(self._file, all_threads=True)
        return crash or None

    def disarm(self) -> None:
        """Stop recording (a clean stop leaves the file empty)."""
        if self._file is None:
            return
        faulthandler.disable()
        self._file.close()
        self._file = None
