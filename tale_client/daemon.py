"""Finding, starting and stopping the daemon, its systemd user unit, and its log.

When the user unit ``tale daemon install`` writes is installed and ``systemctl
--user`` works, the daemon is systemd's: it is started and stopped with
``systemctl --user start|stop taled`` (as docker and ollama are) and logs to the
journal, so there is never a second, unmanaged daemon beside the unit's. Otherwise
tale runs it directly: a daemon started here writes its log to
``<data dir>/taled.log`` itself (``taled --log-file``), rotating it by size; its
stdout and stderr go to the same file, so what it prints before its logging is set
up (a config error) is there too. The data directory is made 0700 and the log 0600
before the daemon starts.

``supervision`` is the decision, a pure function of what ``probe`` finds: whether
the unit file is installed and what ``systemctl --user show`` says about it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from tale_client import paths
from tale_client.rpc import Connection, DaemonUnreachable

__all__ = [
    "CHECKED_IN_EXEC_START",
    "START_TIMEOUT_SECONDS",
    "UNIT_NAME",
    "UNIT_TEMPLATE",
    "Route",
    "Started",
    "Stopped",
    "Supervision",
    "UnitStatus",
    "connect",
    "daemon_pid",
    "exec_start_line",
    "follow_log",
    "install_unit",
    "journal_argv",
    "log_tail",
    "logs_route",
    "parse_unit_status",
    "probe",
    "query_unit",
    "render_unit",
    "spawn_daemon",
    "start_daemon",
    "start_timeout",
    "stop_daemon",
    "supervision",
    "tail_lines",
    "unit_path",
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
# Hardening, as far as the sandbox and a GPU allow; docs/systemd.md gives the reasons,
# the exposure score and what is left out. Any of the namespace directives makes
# systemd run a user unit in a user namespace of its own (PrivateUsers=yes implied),
# inside which the sandbox still makes its own namespaces. Left out: ProtectHome,
# ProtectSystem=strict and PrivateTmp (tasks act on, worktree and apply into your
# directories, wherever they are), ProtectKernelTunables and ProtectKernelLogs (their
# mounts over /proc keep the sandbox from mounting its own /proc), PrivateDevices
# (the GPU), MemoryDenyWriteExecute (ctypes callbacks), PrivateNetwork (remote models).
NoNewPrivileges=yes
# A user's daemon has no capabilities to lose; this keeps it so. The sandbox's user
# namespaces still get a full set inside them (a new namespace starts with one).
CapabilityBoundingSet=
PrivateMounts=yes
ProtectSystem=full
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectClock=yes
PrivateIPC=yes
KeyringMode=private
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
# The sandbox's own namespaces, and no others (cgroup, time).
RestrictNamespaces=user mnt pid ipc uts net
# Clients and D-Bus (unix), remote models (inet), the sandbox's loopback (netlink).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

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


# -- systemd: is the daemon the user unit's? ------------------------------------------

UNIT_NAME = "taled.service"
# systemctl answers in milliseconds, or not at all when there is no user manager (it
# fails at once: "Failed to connect to bus"); a hung bus must not hang the CLI.
_SYSTEMCTL_TIMEOUT_SECONDS = 5.0
# The unit's daemon is up or on its way: `stop` goes through systemd, `logs` to the journal.
_ACTIVE_STATES = frozenset({"active", "activating", "reloading", "refreshing"})
_JOURNAL_HINT = "its log: journalctl --user -u taled -n 50"


class Route(StrEnum):
    """Who runs the daemon."""

    SYSTEMD = "systemd"  # the user unit, through systemctl --user
    DIRECT = "direct"  # tale itself: spawned in the background, logging to a file


@dataclass(frozen=True)
class UnitStatus:
    """What ``systemctl --user show taled.service`` says, or why it could not say."""

    load_state: str = ""  # "loaded", "not-found", ...
    active_state: str = ""  # "active", "inactive", "failed", "activating", ...
    fragment_path: str = ""  # the unit file systemd loaded
    error: str = ""  # systemctl is missing or no user manager answers: its message


@dataclass(frozen=True)
class Supervision:
    """The decision: does systemd run the daemon here, and is its unit up now."""

    route: Route
    active: bool  # systemd runs the unit now (only with Route.SYSTEMD)
    why: str  # for the output: what was found


@dataclass(frozen=True)
class Started:
    """A daemon that was started: its pid (if the lock names one) and who runs it."""

    pid: int | None
    route: Route
    why: str


@dataclass(frozen=True)
class Stopped:
    """A daemon that was stopped (``pid`` None: none was running) and through whom."""

    pid: int | None
    route: Route


def supervision(unit_file: Path, installed: bool, status: UnitStatus | None) -> Supervision:
    """Whether the daemon is systemd's: a pure function of what ``probe`` found.

    systemd's only when the unit file tale installs exists, systemctl --user works,
    and the user manager has loaded *that* file: a manager that knows a taled.service
    from elsewhere (another XDG_CONFIG_HOME, as in tests) would start a daemon this
    client does not talk to.
    """
    if not installed:
        return Supervision(
            Route.DIRECT, False, f"{UNIT_NAME} is not installed (`tale daemon install` adds it)"
        )
    if status is None or status.error:
        error = status.error if status is not None else "not asked"
        return Supervision(Route.DIRECT, False, f"systemctl --user is not usable: {error}")
    if status.load_state != "loaded":
        return Supervision(
            Route.DIRECT,
            False,
            f"systemd has not loaded {unit_file} (load state {status.load_state or '?'}; "
            "run: systemctl --user daemon-reload)",
        )
    if Path(status.fragment_path) != unit_file:
        return Supervision(
            Route.DIRECT,
            False,
            f"systemd's {UNIT_NAME} is {status.fragment_path or '(no file)'}, not {unit_file}",
        )
    active = status.active_state in _ACTIVE_STATES
    return Supervision(
        Route.SYSTEMD, active, f"{UNIT_NAME} is installed ({status.active_state or '?'})"
    )


def parse_unit_status(text: str) -> UnitStatus:
    """``systemctl show``'s ``Key=value`` lines as a UnitStatus."""
    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    return UnitStatus(
        load_state=values.get("LoadState", ""),
        active_state=values.get("ActiveState", ""),
        fragment_path=values.get("FragmentPath", ""),
    )


def query_unit() -> UnitStatus:
    """Ask ``systemctl --user`` about taled.service (its error when it cannot answer)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return UnitStatus(error="systemctl is not installed")
    argv = [
        systemctl,
        "--user",
        "show",
        UNIT_NAME,
        "--property=LoadState,ActiveState,FragmentPath",
    ]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_SYSTEMCTL_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return UnitStatus(error=f"no answer within {_SYSTEMCTL_TIMEOUT_SECONDS:g} s")
    except OSError as exc:
        return UnitStatus(error=str(exc))
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
        return UnitStatus(error=first)
    return parse_unit_status(done.stdout)


def probe() -> Supervision:
    """Find out who runs the daemon here (systemctl is asked only if the unit is installed)."""
    unit = unit_path()
    installed = unit.is_file()
    return supervision(unit, installed, query_unit() if installed else None)


def _systemctl(action: str, timeout: float) -> None:
    """``systemctl --user ACTION taled.service``; DaemonUnreachable if it fails."""
    argv = [shutil.which("systemctl") or "systemctl", "--user", action, UNIT_NAME]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DaemonUnreachable(
            f"systemctl --user {action} taled did not finish within {timeout:g} s; {_JOURNAL_HINT}"
        ) from None
    except OSError as exc:
        raise DaemonUnreachable(f"cannot run systemctl: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.strip() or f"exit {done.returncode}"
        journal = _journal_tail(15)
        end = f". From the journal:\n{journal}" if journal else f"; {_JOURNAL_HINT}"
        raise DaemonUnreachable(f"systemctl --user {action} taled failed: {said}{end}")


def _journal_tail(lines: int) -> str:
    """The unit's last log lines, to show why it failed ("" if the journal will not say)."""
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        return ""
    try:
        done = subprocess.run(
            [*journal_argv(lines, follow=False), "--no-pager", "-o", "cat"],
            executable=journalctl,
            capture_output=True,
            text=True,
            timeout=_SYSTEMCTL_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.rstrip("\n") if done.returncode == 0 else ""


# -- connecting, starting, stopping ----------------------------------------------------


def connect(
    autostart: bool = True,
    client: str = "tale",
    on_start: Callable[[Started], None] | None = None,
) -> Connection:
    """An initialized connection, starting the daemon first if it is not running.

    ``on_start`` hears how a daemon was started, so the CLI can say which way.
    """
    sock = paths.socket_path()
    try:
        conn = Connection(sock)
    except DaemonUnreachable:
        if not autostart:
            raise
        started = start_daemon()
        if on_start is not None:
            on_start(started)
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


def start_daemon(timeout: float | None = None) -> Started:
    """Start taled and wait until its socket answers: through the user unit when
    systemd runs it (``probe``), else in the background directly.

    ``timeout`` defaults to ``start_timeout()``. Raises DaemonUnreachable, with the
    end of the daemon's log (or where its journal is), if it cannot start.
    """
    timeout = start_timeout() if timeout is None else timeout
    found = probe()
    if found.route is Route.SYSTEMD:
        return _start_unit(timeout, found)
    return Started(_spawn_and_wait(timeout), Route.DIRECT, found.why)


def _start_unit(timeout: float, found: Supervision) -> Started:
    deadline = time.monotonic() + timeout
    # For a Type=notify unit systemctl returns once the daemon said READY=1 (or failed).
    _systemctl("start", timeout)
    while time.monotonic() < deadline:
        if _socket_answers():
            return Started(daemon_pid(), Route.SYSTEMD, found.why)
        time.sleep(_POLL_SECONDS)
    raise DaemonUnreachable(
        f"systemd started {UNIT_NAME}, but no daemon answered on {paths.socket_path()} within "
        f"{timeout:g} s (TALE_START_TIMEOUT); {_JOURNAL_HINT}. The unit's daemon has systemd's "
        "environment: a TALE_SOCKET or XDG_RUNTIME_DIR set only in this shell points elsewhere"
    )


def _spawn_and_wait(timeout: float) -> int:
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


def stop_daemon(timeout: float = 60.0) -> Stopped:
    """Stop the running daemon and wait for it to exit: ``systemctl --user stop`` when
    the unit is up, else SIGTERM to the pid holding the socket's lock."""
    found = probe()
    if found.route is Route.SYSTEMD and found.active:
        pid = daemon_pid()
        _systemctl("stop", timeout)
        # systemctl stop returns once the unit's process exited; the lock goes with it.
        _wait_gone(pid, timeout)
        return Stopped(pid, Route.SYSTEMD)
    pid = daemon_pid()
    if pid is None:
        return Stopped(None, Route.DIRECT)
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, timeout)
    return Stopped(pid, Route.DIRECT)


def _wait_gone(pid: int | None, timeout: float) -> None:
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_pid() is None or not _alive(pid):
            return
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


# -- the log ---------------------------------------------------------------------------

# How often `tale daemon logs -f` looks for new lines (tail -f looks every second).
_FOLLOW_POLL_SECONDS = 0.2
_TAIL_BLOCK = 64 * 1024


def logs_route(found: Supervision, log_exists: bool) -> Route:
    """Where the daemon's log is: the journal while systemd runs it (or when the unit
    ran it and tale never did, so there is no file), else tale's own file."""
    if found.route is Route.SYSTEMD and (found.active or not log_exists):
        return Route.SYSTEMD
    return Route.DIRECT


def journal_argv(lines: int, follow: bool) -> list[str]:
    """The journalctl command line that shows the unit's log (as ``tale daemon logs`` does)."""
    return ["journalctl", "--user", "-u", "taled", "-n", str(lines), *(["-f"] if follow else [])]


def tail_lines(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of the log at ``path``, reaching into the newest rotated
    file (``path.1``) when the current one holds fewer, as right after a rotation."""
    found: list[str] = []
    for candidate in (path, _rotated(path)):
        if len(found) >= lines:
            break
        try:
            with open(candidate, "rb") as f:
                found = _last_lines(f, f.seek(0, os.SEEK_END), lines - len(found)) + found
        except FileNotFoundError:
            continue
    return found


def _rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def _last_lines(f: BinaryIO, end: int, lines: int) -> list[str]:
    """The last ``lines`` lines of ``f`` before offset ``end``. Whole blocks are read
    from the end until enough lines are in: a 10 MiB log is not read through to show
    its last 50 lines."""
    if lines <= 0:
        return []
    start = end
    data = b""
    while start > 0 and data.count(b"\n") <= lines:
        start = max(0, start - _TAIL_BLOCK)
        f.seek(start)
        data = f.read(end - start)
    text = data.decode("utf-8", errors="replace").splitlines()
    if start > 0:
        text = text[1:]  # the first line is cut at the block's edge
    return text[-lines:]


def follow_log(path: Path, lines: int) -> Iterator[str]:
    """The last ``lines`` lines of the log, then every line written to it, as ``tail -F``.

    The daemon rotates the file by renaming it to ``taled.log.1`` and opening a new
    ``taled.log``: when the name points at a new file the old one is read to its end
    (the daemon writes only to the new one by then), then the new one from its start,
    so no line is lost at a rotation. A file not there yet is waited for.
    """
    handle = _open(path)
    identity = _identity(handle)
    try:
        if handle is None:
            yield from tail_lines(_rotated(path), lines)
        else:
            # The tail and the following start at the same offset of the same open
            # file, so a line written in between is neither lost nor shown twice.
            end = handle.seek(0, os.SEEK_END)
            shown = _last_lines(handle, end, lines)
            if len(shown) < lines:
                shown = tail_lines(_rotated(path), lines - len(shown)) + shown
            yield from shown
            handle.seek(end)
        partial = b""
        while True:
            chunk = handle.read() if handle is not None else b""
            if chunk:
                *complete, partial = (partial + chunk).split(b"\n")
                yield from (line.decode("utf-8", errors="replace") for line in complete)
                continue
            now = _identity_of(path)
            if now is not None and now != identity:
                if handle is not None:
                    # The old file ends here: its unterminated last line is a line too.
                    yield from _lines(partial + handle.read())
                    handle.close()
                    partial = b""
                    # A burst can rotate more than once between two looks: the files
                    # between the old one and the new one are read whole, oldest first.
                    for between in _rotated_since(path, identity):
                        with contextlib.suppress(OSError), open(between, "rb") as f:
                            yield from _lines(f.read())
                handle = _open(path)
                identity = _identity(handle)
                continue
            if handle is not None and now == identity and handle.tell() > _size(path):
                handle.seek(0)  # truncated in place: start again from its beginning
            time.sleep(_FOLLOW_POLL_SECONDS)
    finally:
        if handle is not None:
            handle.close()


def _lines(data: bytes) -> Iterator[str]:
    """The lines of a finished piece of log, the last one even without its newline."""
    *complete, last = data.split(b"\n")
    yield from (line.decode("utf-8", errors="replace") for line in complete)
    if last:
        yield last.decode("utf-8", errors="replace")


def _rotated_since(path: Path, old: tuple[int, int] | None) -> list[Path]:
    """The rotated files newer than the one ``old`` identifies, oldest first: with the
    old file now at ``path.3``, that is ``path.2`` then ``path.1``."""
    newer: list[Path] = []
    for k in range(1, 1000):
        candidate = path.with_name(f"{path.name}.{k}")
        found = _identity_of(candidate)
        if found is None or found == old:
            # Past the last backup, the old file was rotated out: every backup is newer.
            return newer[::-1]
        newer.append(candidate)
    return newer[::-1]


def _identity(handle: BinaryIO | None) -> tuple[int, int] | None:
    """The (device, inode) of an open file: which file it is, whatever its name now."""
    if handle is None:
        return None
    info = os.fstat(handle.fileno())
    return (info.st_dev, info.st_ino)


def _identity_of(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _open(path: Path) -> BinaryIO | None:
    try:
        # Closed by follow_log, which holds it across reads.
        return open(path, "rb")
    except OSError:
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            text = _last_lines(f, f.seek(0, os.SEEK_END), lines)
    except OSError:
        return "(no log)"
    return "\n".join(text)


def log_tail(lines: int) -> str:
    """The end of the auto-started daemon's log file."""
    return "\n".join(tail_lines(paths.log_file(), lines))


def journal_available() -> bool:
    """Whether journalctl exists (a systemd-managed daemon logs there)."""
    return shutil.which("journalctl") is not None
