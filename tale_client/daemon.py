"""Finding, starting and stopping the daemon, and its systemd user unit.

A daemon started here writes its log to ``<data dir>/taled.log`` itself
(``taled --log-file``), rotating it by size; its stdout and stderr go to the same
file, so what it prints before its logging is set up (a config error) is there
too. The data directory is made 0700 and the log 0600 before the daemon starts.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tale_client import paths
from tale_client.rpc import Connection, DaemonUnreachable

__all__ = [
    "CHECKED_IN_EXEC_START",
    "START_TIMEOUT_SECONDS",
    "UNIT_TEMPLATE",
    "connect",
    "daemon_pid",
    "exec_start_line",
    "install_unit",
    "render_unit",
    "spawn_daemon",
    "start_daemon",
    "start_timeout",
    "stop_daemon",
]

# Loading the embedded model takes well under a second; a bigger one or a cold
# disk can take much longer, so the wait is generous and overridable.
START_TIMEOUT_SECONDS = 60.0
_POLL_SECONDS = 0.05

UNIT_TEMPLATE = """\
[Unit]
Description=tale daemon: a personal AI worker (local models, task queue, MCP socket)

[Service]
# READY=1 once the models are loaded and the socket listens; WATCHDOG=1 pings.
Type=notify
NotifyAccess=main
# `tale daemon install` writes this unit with the interpreter of the environment
# tale is installed in; the repository's systemd/taled.service assumes
# `pipx install tale` (or `pip install --user`), which puts taled in ~/.local/bin.
ExecStart={exec_start}
Restart=on-failure
RestartSec=2
# 2: invalid configuration, 3: another daemon owns the socket; restarting will not help.
RestartPreventExitStatus=2 3
WatchdogSec=30
TimeoutStartSec=180
# Longer than the daemon's default shutdown grace (daemon.shutdown_grace_seconds).
TimeoutStopSec=60
# The database, log and checkpoints hold prompts and answers: private whatever the
# login session's umask (the daemon sets 077 itself too).
UMask=0077

[Install]
WantedBy=default.target
"""

# ExecStart of the repository's systemd/taled.service (a test pins the two equal).
CHECKED_IN_EXEC_START = "%h/.local/bin/taled"


def render_unit(exec_start: str) -> str:
    """The user unit text with the given ExecStart command line (already escaped)."""
    return UNIT_TEMPLATE.format(exec_start=exec_start)


def exec_start_line(argv: list[str]) -> str:
    """``argv`` as an ExecStart command line that systemd splits back into ``argv``.

    ``%`` (specifiers) is escaped everywhere, ``$`` (variables) in the arguments
    (systemd does not expand it in the executable's name), ``\\`` and ``"`` too;
    a word that needed escaping, is empty or holds a space or a quote is
    double-quoted, so a venv under "~/My Projects" still works. (systemd refuses
    executable names that contain quotes or backslashes however they are written.)
    """
    words = []
    for i, arg in enumerate(argv):
        escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        if i > 0:
            escaped = escaped.replace("$", "$$")
        plain = bool(arg) and escaped == arg and not any(c.isspace() or c == "'" for c in arg)
        words.append(arg if plain else f'"{escaped}"')
    return " ".join(words)


def unit_path() -> Path:
    """Where ``tale daemon install`` writes the unit."""
    return paths.config_file().parent.parent / "systemd" / "user" / "taled.service"


def install_unit() -> Path:
    """Write the user unit, pointing at this environment's taled."""
    target = unit_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_unit(exec_start_line([sys.executable, "-m", "taled"])))
    return target


def connect(autostart: bool = True, client: str = "tale") -> Connection:
    """An initialized connection, starting the daemon first if it is not running."""
    sock = paths.socket_path()
    try:
        conn = Connection(sock)
    except DaemonUnreachable:
        if not autostart:
            raise
        start_daemon()
        conn = Connection(sock)
    try:
        conn.initialize(client)
    except BaseException:
        conn.close()
        raise
    return conn


def daemon_pid() -> int | None:
    """The pid of the daemon holding the socket's lock, or None if none holds it."""
    try:
        with open(paths.lock_file(), "rb") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = lock.read().decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            # We got the lock, so no daemon holds it (the pid inside is stale).
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def _socket_answers() -> bool:
    try:
        Connection(paths.socket_path(), timeout=2).close()
    except DaemonUnreachable:
        return False
    return True


def spawn_daemon() -> subprocess.Popen[bytes]:
    """Start taled in the background, in its own session, logging to ``paths.log_file()``."""
    log_path = paths.log_file()
    try:
        # Made private here, not only by the daemon: it writes to the log before it
        # gets to repairing anything.
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path.parent.chmod(0o700)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise DaemonUnreachable(f"cannot start the daemon: {exc}") from None
    with os.fdopen(fd, "ab") as log:
        os.fchmod(fd, 0o600)
        # Its own session: the daemon outlives the command (and a ctrl+c in it).
        return subprocess.Popen(
            [sys.executable, "-m", "taled", "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def start_timeout() -> float:
    """How long to wait for a daemon to start: ``$TALE_START_TIMEOUT`` or 60 s."""
    text = os.environ.get("TALE_START_TIMEOUT", "")
    if not text:
        return START_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise DaemonUnreachable(f"TALE_START_TIMEOUT={text!r} must be a positive number of seconds")
    return seconds


def start_daemon(timeout: float | None = None) -> int:
    """Start taled in the background and wait until its socket answers; returns its pid.

    ``timeout`` defaults to ``start_timeout()``. Raises DaemonUnreachable, with the
    end of the daemon's log, if it cannot start.
    """
    timeout = start_timeout() if timeout is None else timeout
    log_path = paths.log_file()
    proc = spawn_daemon()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _socket_answers():
            return proc.pid
        code = proc.poll()
        # Exit code 3 means another daemon won the race to start: wait for it.
        if code is not None and code != 3:
            raise DaemonUnreachable(
                f"the daemon failed to start (exit {code}). From {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(_POLL_SECONDS)
    raise DaemonUnreachable(
        f"the daemon did not answer within {timeout:g} s (TALE_START_TIMEOUT). "
        f"From {log_path}:\n{_tail(log_path)}"
    )


def stop_daemon(timeout: float = 60.0) -> int | None:
    """SIGTERM the running daemon and wait for it to exit; returns its pid or None."""
    pid = daemon_pid()
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_pid() is None or not _alive(pid):
            return pid
        time.sleep(_POLL_SECONDS)
    raise DaemonUnreachable(f"the daemon (pid {pid}) did not stop within {timeout:g} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def log_tail(lines: int) -> str:
    """The end of the auto-started daemon's log file."""
    return _tail(paths.log_file(), lines)


def journal_available() -> bool:
    """Whether journalctl exists (a systemd-managed daemon logs there)."""
    return shutil.which("journalctl") is not None
