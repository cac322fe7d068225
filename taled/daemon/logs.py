"""The daemon's log: where it goes, how big it may grow, and what never goes in it.

Under systemd the log is stderr (the journal); a daemon started by ``tale`` is given
``--log-file`` and writes a rotating file itself, so the file never outgrows
``daemon.log_max_bytes`` times ``daemon.log_backups + 1``. The process's own
stdout and stderr are pointed at that file too (a native library's messages, a
traceback at exit), and pointed again at the new file after each rotation.

Under systemd (``JOURNAL_STREAM`` names the stream stderr is), every line starts
with its syslog priority, ``<3>`` for an error to ``<7>`` for debug, which journald
strips and files the entry under (``journalctl -p warning``); there is no time stamp,
as journald stamps each entry itself. The handler writes to its own copy of the
stderr descriptor: llama-cpp-python points descriptor 2 at /dev/null while it loads
a model, which would otherwise swallow every thread's log lines meanwhile.
llama.cpp's own messages come through the ``llama.cpp`` logger
(``taled/models/backends/llamacpp.py``), so they get priorities too.

Two rules hold at every level: prompts and answers stay out (the database
drivers, which log SQL parameters at debug, are held at warning, and so is
llama.cpp, whose debug output is not ours to vouch for and whose info is a few
hundred lines of model metadata per load), and one warning or error repeated in a
loop (a full disk fails every write) is logged a few times per window, then
counted: the count rides on the next one after the window, or is logged at exit.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path

from taled.settings import DaemonSettings
from taled.text import count

__all__ = [
    "QUIET_LOGGERS",
    "JournalFormatter",
    "RepeatFilter",
    "RotatingLogFile",
    "journal_stream",
    "setup_logging",
]

# Held at warning: the database drivers write SQL parameters (task texts, answers,
# chat messages) at debug; llama.cpp (its messages, routed by the llamacpp backend).
QUIET_LOGGERS = ("aiosqlite", "sqlalchemy.engine", "llama.cpp")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# journald stamps each entry: a second time stamp in the text is noise.
_JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# syslog priorities (sd-daemon.h's SD_CRIT ... SD_DEBUG), highest level first.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


@dataclass
class _Window:
    start: float
    seen: int = 0
    dropped: int = 0


def _more(dropped: int, what: str) -> str:
    """``dropped`` more ``what`` (a noun): "1 more error was", "57 more warnings were"."""
    return count(dropped, f"more {what} was", f"more {what}s were")


class RepeatFilter(logging.Filter):
    """Let through ``burst`` warnings or errors per call site per ``window`` seconds.

    A call site (logger, level, file and line) and the exception's type, if one is
    attached, is what repeats in a failure loop; the arguments (a task id, an errno)
    differ each time, so they are not part of the key. The one that fills the burst
    says that more will be counted; the first one after the window carries the count
    of those dropped.
    """

    def __init__(
        self, burst: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._clock = clock
        self._sites: dict[tuple[str, int, str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is written (it may gain a note about its repeats)."""
        if record.levelno < logging.WARNING:
            return True
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, record.pathname, record.lineno, error)
        now = self._clock()
        site = self._sites.get(key)
        if site is None or now - site.start >= self._window:
            dropped = site.dropped if site is not None else 0
            site = self._sites[key] = _Window(start=now)
            if dropped:
                self._note(record, f"{_more(dropped, 'record')} not logged before this one")
        site.seen += 1
        if site.seen > self._burst:
            site.dropped += 1
            return False
        if site.seen == self._burst:
            self._note(
                record,
                f"logged {self._burst} times in {self._window:g} s; more in the next "
                f"{self._window - (now - site.start):.0f} s are counted, not logged",
            )
        return True

    def pending(self) -> list[str]:
        """A line for each call site with dropped records not yet reported."""
        return [
            f"{_more(site.dropped, logging.getLevelName(level).lower())} not logged "
            + (f"({error}) " if error else "")
            + f"from {name} ({os.path.basename(path)}:{line})"
            for (name, level, path, line, error), site in self._sites.items()
            if site.dropped
        ]

    @staticmethod
    def _note(record: logging.LogRecord, note: str) -> None:
        # Appended to the format string: getMessage() still applies the arguments,
        # and the note holds no '%' to confuse it.
        record.msg = f"{record.msg} [{note}]"


class RotatingLogFile(RotatingFileHandler):
    """A size-rotated log file (0600) that also receives the process's stdout and stderr."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._capture()

    def doRollover(self) -> None:
        """Rotate, then point stdout and stderr at the new file."""
        super().doRollover()
        self._capture()

    def _capture(self) -> None:
        if self.stream is None:
            return
        fd = self.stream.fileno()
        # An existing file may date from a umask that let others read it.
        os.fchmod(fd, 0o600)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)


class JournalFormatter(logging.Formatter):
    """Lines journald files under their level: ``<4>WARNING name: message``.

    journald reads the prefix of every line of the stream separately, so each line
    of a multi-line record (a traceback) carries it; otherwise they would be filed
    as info.
    """

    def __init__(self) -> None:
        super().__init__(_JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as lines, each prefixed with its syslog priority."""
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _priority(level: int) -> int:
    for floor, priority in _PRIORITIES:
        if level >= floor:
            return priority
    return _DEBUG_PRIORITY


def journal_stream(fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal.

    systemd sets ``JOURNAL_STREAM`` to that stream's ``device:inode``; comparing
    them (as systemd.exec(5) advises) keeps a process that inherited the variable
    but writes elsewhere (a shell under a service, redirected) from prefixing.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(fd)
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def _stderr_copy() -> logging.Handler:
    """A handler on a duplicate of descriptor 2, unaffected by later redirections of it."""
    sys.stderr.flush()
    stream = open(  # noqa: SIM115  (the handler owns it until exit)
        os.dup(sys.stderr.fileno()),
        "w",
        encoding="utf-8",
        errors="backslashreplace",
        buffering=1,
    )
    return logging.StreamHandler(stream)


def setup_logging(settings: DaemonSettings, log_file: Path | None) -> RepeatFilter:
    """Configure the root logger from ``settings``; returns the repeat filter in use."""
    handler: logging.Handler
    formatter = logging.Formatter(_FORMAT)
    if log_file is not None:
        handler = RotatingLogFile(log_file, settings.log_max_bytes, settings.log_backups)
    elif journal_stream():
        handler = _stderr_copy()
        formatter = JournalFormatter()
    else:
        handler = logging.StreamHandler(sys.stderr)
    repeats = RepeatFilter(settings.log_repeats, settings.log_repeat_seconds)
    handler.addFilter(repeats)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return repeats
