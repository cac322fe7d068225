"""`tale daemon start|stop|logs` and auto-start: through the systemd user unit when it is
installed, else directly; the log from the journal or from tale's own rotating file.

This machine has no systemd user manager, so systemd is played by stand-ins on PATH: a
``systemctl`` that records its arguments and runs the installed unit's ExecStart the way
the unit would (in the background, its output to a journal file), and a ``journalctl``
that records its arguments. They are stand-ins for the external tools, not for tale.
The decision itself (``supervision``) is a pure function, tested first on its own.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from logging.handlers import RotatingFileHandler
from pathlib import Path

import pytest

from tale_client.daemon import (
    Route,
    UnitStatus,
    journal_argv,
    logs_route,
    parse_unit_status,
    supervision,
)
from tale_client.rpc import Connection, DaemonUnreachable
from tests.harness import Daemon, Home

# `systemctl --user` with a user manager that has loaded the unit `tale daemon install`
# wrote. The daemon it runs is found dead when it is a zombie too: nobody may reap it.
FAKE_SYSTEMCTL = r"""#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_SYSTEMD/calls"
if [ -e "$FAKE_SYSTEMD/no-bus" ]; then
  echo "Failed to connect to bus: No medium found" >&2
  exit 1
fi
unit="$XDG_CONFIG_HOME/systemd/user/taled.service"
pidfile="$FAKE_SYSTEMD/main.pid"
running() {
  [ -f "$pidfile" ] || return 1
  stat=$(cat "/proc/$(cat "$pidfile")/stat" 2>/dev/null) || return 1
  case "$stat" in *") Z "*) return 1 ;; esac
  return 0
}
[ "$1" = "--user" ] || { echo "this stand-in knows only --user" >&2; exit 1; }
case "$2" in
show)
  if [ -f "$unit" ]; then
    echo LoadState=loaded; echo "FragmentPath=$unit"
  else
    echo LoadState=not-found; echo FragmentPath=
  fi
  if running || [ -e "$FAKE_SYSTEMD/active" ]; then
    echo ActiveState=active
  else
    echo ActiveState=inactive
  fi
  ;;
start)
  if [ -e "$FAKE_SYSTEMD/start-fails" ]; then
    echo "Job for taled.service failed because the control process exited with error code." >&2
    exit 1
  fi
  running && exit 0
  command=$(sed -n 's/^ExecStart=//p' "$unit")
  $command >> "$FAKE_SYSTEMD/journal" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  ;;
stop)
  running || exit 0
  kill -TERM "$(cat "$pidfile")"
  for _ in $(seq 300); do running || exit 0; sleep 0.1; done
  echo "taled.service did not stop" >&2; exit 1
  ;;
*)
  echo "this stand-in does not know: $2" >&2; exit 1
  ;;
esac
"""

FAKE_JOURNALCTL = r"""#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_SYSTEMD/calls"
echo "journal: $*"
"""


class FakeSystemd:
    """The stand-ins' directory: their calls, the unit's output, switches for their state."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name, script in (("systemctl", FAKE_SYSTEMCTL), ("journalctl", FAKE_JOURNALCTL)):
            (self.bin / name).write_text(script)
            (self.bin / name).chmod(0o755)

    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def journal(self) -> str:
        path = self.root / "journal"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def systemd(home: Home) -> Iterator[FakeSystemd]:
    """The stand-ins first on ``home``'s PATH (nothing installed or running yet)."""
    fake = FakeSystemd(home.root / "systemd")
    home.env["PATH"] = f"{fake.bin}{os.pathsep}{home.env.get('PATH', '')}"
    home.env["FAKE_SYSTEMD"] = str(fake.root)
    yield fake


def _install(home: Home) -> None:
    done = home.tale("daemon", "install")
    assert done.returncode == 0, done.stderr


def _answers(home: Home) -> bool:
    try:
        Connection(home.socket, timeout=2).close()
    except DaemonUnreachable:
        return False
    return True


# -- who runs the daemon: the decision --------------------------------------------------

UNIT = Path("/home/me/.config/systemd/user/taled.service")


def _loaded(active_state: str, fragment: Path = UNIT) -> UnitStatus:
    return UnitStatus(load_state="loaded", active_state=active_state, fragment_path=str(fragment))


def test_without_the_unit_file_tale_runs_the_daemon_and_says_how_to_install_it() -> None:
    """No unit installed: the direct route, pointing at `tale daemon install`."""
    found = supervision(UNIT, installed=False, status=None)
    assert found.route is Route.DIRECT
    assert "tale daemon install" in found.why


def test_with_systemctl_unusable_tale_runs_the_daemon_and_quotes_the_error() -> None:
    """Unit installed but no user manager answers: the direct route, with systemctl's words."""
    error = "Failed to connect to bus: No medium found"
    found = supervision(UNIT, installed=True, status=UnitStatus(error=error))
    assert found.route is Route.DIRECT
    assert error in found.why


def test_a_loaded_unit_from_the_installed_file_is_systemds_route() -> None:
    """Unit installed and loaded from that file: systemd's route, active while it runs."""
    running = supervision(UNIT, True, _loaded("active"))
    assert (running.route, running.active) == (Route.SYSTEMD, True)
    stopped = supervision(UNIT, True, _loaded("inactive"))
    assert (stopped.route, stopped.active) == (Route.SYSTEMD, False)


def test_a_unit_systemd_loaded_from_another_file_is_not_used() -> None:
    """A manager whose taled.service is another file (another XDG_CONFIG_HOME) would start a
    daemon this client does not talk to: the direct route."""
    found = supervision(UNIT, True, _loaded("active", Path("/usr/lib/systemd/user/taled.service")))
    assert found.route is Route.DIRECT
    assert "/usr/lib/systemd/user/taled.service" in found.why


def test_a_unit_systemd_has_not_loaded_yet_asks_for_daemon_reload() -> None:
    """The file is there but the manager says not-found: direct, suggesting daemon-reload."""
    status = UnitStatus(load_state="not-found", active_state="inactive")
    found = supervision(UNIT, True, status)
    assert found.route is Route.DIRECT
    assert "systemctl --user daemon-reload" in found.why


def test_systemctl_show_output_is_parsed_into_a_unit_status() -> None:
    """`systemctl show -p ...` prints Key=value lines; the ones asked for are read."""
    text = f"LoadState=loaded\nActiveState=active\nFragmentPath={UNIT}\n"
    assert parse_unit_status(text) == _loaded("active")


def test_logs_come_from_the_journal_while_systemd_runs_the_daemon() -> None:
    """Unit active: the journal, even when an old log file of tale's exists."""
    assert logs_route(supervision(UNIT, True, _loaded("active")), log_exists=True) is Route.SYSTEMD


def test_logs_come_from_the_file_when_tale_ran_the_daemon_last() -> None:
    """Unit installed but inactive, and a log file of tale's: that file."""
    found = supervision(UNIT, True, _loaded("inactive"))
    assert logs_route(found, log_exists=True) is Route.DIRECT


def test_logs_come_from_the_journal_when_only_the_unit_ever_ran_the_daemon() -> None:
    """Unit installed and inactive, no log file: the unit's past runs, in the journal."""
    found = supervision(UNIT, True, _loaded("inactive"))
    assert logs_route(found, log_exists=False) is Route.SYSTEMD


def test_journal_argv_passes_n_and_f() -> None:
    """The journal is asked for the unit's last N lines, and to follow with -f."""
    assert journal_argv(5, follow=True) == ["journalctl", "--user", "-u", "taled", "-n", "5", "-f"]
    assert journal_argv(50, follow=False) == ["journalctl", "--user", "-u", "taled", "-n", "50"]


# -- start, stop, auto-start ------------------------------------------------------------


def test_daemon_start_goes_through_systemctl_when_the_unit_is_installed(
    home: Home, systemd: FakeSystemd
) -> None:
    """With the unit installed, `tale daemon start` runs `systemctl --user start`, waits for
    the unit's daemon to answer and says systemd started it; tale spawns none of its own."""
    _install(home)
    started = home.tale("daemon", "start")
    assert started.returncode == 0, started.stderr
    assert "started by systemd" in started.stdout
    assert "--user start taled.service" in systemd.calls()
    assert _answers(home)
    assert "taled ready in" in systemd.journal()
    assert not (home.data / "taled.log").exists(), "tale spawned a daemon of its own"


def test_a_unit_that_fails_to_start_exits_3_with_the_journals_last_lines(
    home: Home, systemd: FakeSystemd
) -> None:
    """When `systemctl --user start` fails, `tale daemon start` exits 3 with systemctl's
    words and the unit's last lines from the journal, and starts no daemon of its own."""
    _install(home)
    (systemd.root / "start-fails").touch()
    started = home.tale("daemon", "start")
    assert started.returncode == 3
    assert "Job for taled.service failed" in started.stderr
    assert "journal: --user -u taled -n 15 --no-pager -o cat" in started.stderr
    assert not _answers(home)
    assert not (home.data / "taled.log").exists()


def test_daemon_stop_goes_through_systemctl_when_the_unit_runs(
    home: Home, systemd: FakeSystemd
) -> None:
    """While the unit runs, `tale daemon stop` is `systemctl --user stop` and says so."""
    _install(home)
    assert home.tale("daemon", "start").returncode == 0
    stopped = home.tale("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "by systemd (systemctl --user stop taled)" in stopped.stdout
    assert "--user stop taled.service" in systemd.calls()
    assert not _answers(home)


def test_auto_start_goes_through_the_unit_and_says_so(home: Home, systemd: FakeSystemd) -> None:
    """`tale submit` with no daemon starts the installed unit (not a daemon of its own) and
    says on stderr which way it started it."""
    _install(home)
    submitted = home.tale("submit", "--json", "Say hi")
    assert submitted.returncode == 0, submitted.stderr
    assert "started it with systemctl --user start taled" in submitted.stderr
    assert "--user start taled.service" in systemd.calls()
    assert not (home.data / "taled.log").exists()


def test_without_the_unit_start_is_direct_and_systemctl_is_not_asked(
    home: Home, systemd: FakeSystemd
) -> None:
    """With no unit installed tale starts the daemon itself, says why not systemd, and
    does not even run systemctl."""
    started = home.tale("daemon", "start")
    try:
        assert started.returncode == 0, started.stderr
        assert "by tale, not systemd: taled.service is not installed" in started.stdout
        assert systemd.calls() == []
        assert (home.data / "taled.log").exists()
    finally:
        home.tale("daemon", "stop")


def test_with_no_user_manager_start_is_direct_and_names_systemctls_error(
    home: Home, systemd: FakeSystemd
) -> None:
    """Unit installed but `systemctl --user` cannot reach a user manager (as in a container):
    tale starts the daemon itself and quotes systemctl's error."""
    _install(home)
    (systemd.root / "no-bus").touch()
    started = home.tale("daemon", "start")
    try:
        assert started.returncode == 0, started.stderr
        assert "systemctl --user is not usable: Failed to connect to bus" in started.stdout
        assert _answers(home)
        assert (home.data / "taled.log").exists()
    finally:
        home.tale("daemon", "stop")


def test_stop_of_a_daemon_systemd_does_not_run_signals_it_directly(
    daemon: Daemon, systemd: FakeSystemd
) -> None:
    """Unit installed but inactive, a daemon started otherwise: stop sends it SIGTERM as
    before, after asking systemctl only whether the unit runs."""
    assert daemon.proc is not None
    _install(daemon.home)
    stopped = daemon.home.tale("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"taled stopped (pid {daemon.proc.pid})"
    assert [c.split()[1] for c in systemd.calls()] == ["show"]
    assert daemon.proc.wait(30) == 0


# -- logs -------------------------------------------------------------------------------


def test_logs_while_systemd_runs_the_daemon_is_journalctl_with_n_and_f(
    home: Home, systemd: FakeSystemd
) -> None:
    """While the unit is active, `tale daemon logs -f -n 5` is `journalctl --user -u taled
    -n 5 -f` (tale is replaced by it, so its output is journalctl's)."""
    _install(home)
    (systemd.root / "active").touch()
    proc = home.tale("daemon", "logs", "-f", "-n", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "journal: --user -u taled -n 5 -f\n"


def test_logs_without_f_asks_the_journal_for_the_last_50_lines(
    home: Home, systemd: FakeSystemd
) -> None:
    """`tale daemon logs` under systemd asks journalctl for the default 50 lines, not -f."""
    _install(home)
    (systemd.root / "active").touch()
    proc = home.tale("daemon", "logs")
    assert proc.stdout == "journal: --user -u taled -n 50\n"


def test_logs_prints_the_last_n_lines_of_the_file(home: Home) -> None:
    """With a daemon tale started, `tale daemon logs -n 3` prints exactly the log file's
    last three lines."""
    assert home.tale("daemon", "start").returncode == 0
    try:
        proc = home.tale("daemon", "logs", "-n", "3")
        assert proc.returncode == 0, proc.stderr
        lines = (home.data / "taled.log").read_text().splitlines()
        assert proc.stdout.splitlines() == lines[-3:]
    finally:
        home.tale("daemon", "stop")


def test_logs_with_a_negative_count_exits_2(home: Home) -> None:
    """`tale daemon logs -n -1` is a usage error that says what is wanted."""
    proc = home.tale("daemon", "logs", "-n", "-1")
    assert proc.returncode == 2
    assert "--lines must be 0 or more" in proc.stderr


class _Follower:
    """`tale daemon logs -f` running in the background, its lines collected."""

    def __init__(self, home: Home, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tale_client.cli", "daemon", "logs", "-f", *args],
            env=home.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, wanted: str, timeout: float = 30) -> list[str]:
        """Every line until one containing ``wanted``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not any(wanted in line for line in self.seen):
            try:
                self.seen.append(self.lines.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                raise AssertionError(f"no line with {wanted!r} in {self.seen}") from None
        return self.seen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_logs_f_prints_what_the_daemon_logs_next(home: Home) -> None:
    """`tale daemon logs -f -n 0` prints the lines a running daemon writes after it started:
    here the daemon's own shutdown lines."""
    assert home.tale("daemon", "start").returncode == 0
    follower = _Follower(home, "-n", "0")
    try:
        time.sleep(1)  # let it open the file: only what comes after is wanted
        assert home.tale("daemon", "stop").returncode == 0
        lines = follower.wait_for("taled stopped")
        assert not any("taled ready in" in line for line in lines), "-n 0 showed old lines"
    finally:
        follower.stop()
        home.tale("daemon", "stop")


def _rotating_log(home: Home, backups: int) -> logging.Logger:
    """A logger writing the daemon's log file as the daemon does: a RotatingFileHandler
    (the class taled's RotatingLogFile extends) at the smallest size taled allows."""
    home.data.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(home.data / "taled.log", maxBytes=4096, backupCount=backups)
    log = logging.getLogger(f"rotation-test-{home.root.name}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log


def test_logs_f_follows_the_file_across_a_rotation(home: Home) -> None:
    """Following the log loses no line when the file is rotated under it, once and again."""
    log = _rotating_log(home, backups=3)
    log.info("first")
    follower = _Follower(home, "-n", "1")
    try:
        follower.wait_for("first")
        written = ["first"]
        for burst in range(3):
            # 60 lines of 100 bytes: one rotation (at 4096 bytes) in each burst.
            lines = [f"burst {burst} line {i:02d} " + "x" * 80 for i in range(60)]
            for line in lines:
                log.info(line)
            written += lines
            follower.wait_for(lines[-1])
        assert (home.data / "taled.log.2").exists(), "the test did not rotate twice"
        assert follower.seen == written
    finally:
        follower.stop()


def test_logs_f_reads_a_file_it_skipped_when_two_rotations_come_at_once(home: Home) -> None:
    """A burst that rotates the log twice between two looks loses nothing: the file in
    between is read whole, in order."""
    log = _rotating_log(home, backups=5)
    log.info("first")
    follower = _Follower(home, "-n", "1")
    try:
        follower.wait_for("first")
        lines = [f"line {i:03d} " + "x" * 90 for i in range(100)]  # two rotations at once
        for line in lines:
            log.info(line)
        follower.wait_for(lines[-1])
        assert follower.seen == ["first", *lines]
    finally:
        follower.stop()
