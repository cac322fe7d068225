"""Another user gets nothing: private data files whatever the umask, no prompts in the log,
and a log that stays small when something fails in a loop."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taled.daemon.logs import RepeatFilter
from taled.paths import secure_data_dir
from tests.harness import Daemon, Home

OTHER_UID = 61000
NOBODY = 65534
REPO = Path(__file__).resolve().parent.parent
_AS_OTHER_UID = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, inherited by the daemons and clients the test starts."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that its group or others can use."""
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:  # gone since listed (a backup's journal, say)
            continue
        if stat.S_ISLNK(info.st_mode):
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077 or (stat.S_ISDIR(info.st_mode) and mode != 0o700):
            found.append(f"{path.relative_to(root.parent)} {mode:o}")
    return found


def _run_one_task(daemon: Daemon) -> None:
    task = daemon.call("submit_task", text="write hello")
    daemon.wait_for(task["id"])


def test_data_files_are_private_under_umask_022(umask_022: None, home: Home) -> None:
    """With umask 022, the data dir and everything in it (database, checkpoints) is 0700/0600."""
    daemon = Daemon(home).start()
    try:
        _run_one_task(daemon)
        assert (home.data / "tale.db").exists()
        assert (home.data / "checkpoints.git").is_dir()
        assert _loose_modes(home.data) == []
    finally:
        daemon.stop()


@needs_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")
def test_another_uid_cannot_read_the_database(umask_022: None, home: Home) -> None:
    """Even with the home and XDG dirs open to all, another uid cannot read tale.db."""
    daemon = Daemon(home).start()
    try:
        _run_one_task(daemon)
        # A usual home: every directory above the data dir can be traversed by anyone.
        for directory in (home.root, home.root / "d"):
            directory.chmod(0o755)
        proc = subprocess.run(
            [*_AS_OTHER_UID, "cat", str(home.data / "tale.db")],
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode != 0
        assert b"Permission denied" in proc.stderr
    finally:
        daemon.stop()


def test_world_readable_files_of_an_old_install_are_made_private_on_start(home: Home) -> None:
    """Files left 0644 (and dirs 0755) by an older taled are 0600/0700 after the next start."""
    first = Daemon(home).start()
    _run_one_task(first)
    first.stop()
    for path in [home.data, *home.data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert _loose_modes(home.data) != []
    second = Daemon(home).start()
    try:
        assert _loose_modes(home.data) == []
    finally:
        second.stop()


def test_the_repair_never_follows_a_symlink(tmp_path: Path) -> None:
    """A link in the data dir to a file elsewhere leaves that file's mode as it was."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not tale's")
    outside.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "link").symlink_to(outside)
    (data / "own.txt").write_text("tale's")
    (data / "own.txt").chmod(0o644)
    assert secure_data_dir(data) == 2  # the directory and own.txt
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    assert stat.S_IMODE((data / "own.txt").stat().st_mode) == 0o600


def test_a_read_only_git_object_stays_read_only(tmp_path: Path) -> None:
    """The repair removes group and other bits only: a 0444 object becomes 0400, not 0600."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    obj = data / "object"
    obj.write_text("x")
    obj.chmod(0o444)
    secure_data_dir(data)
    assert stat.S_IMODE(obj.stat().st_mode) == 0o400


def test_the_systemd_unit_sets_a_private_umask() -> None:
    """systemd/taled.service runs the daemon with UMask=0077."""
    assert "\nUMask=0077\n" in (REPO / "systemd" / "taled.service").read_text()


# --- the log ---------------------------------------------------------------------------


def test_prompts_stay_out_of_the_log_at_debug(home: Home) -> None:
    """At log_level=debug, neither a task's text nor a chat message appears in the log."""
    home.env["TALE_DAEMON__LOG_LEVEL"] = "debug"
    daemon = Daemon(home).start()
    try:
        _run_one_task(daemon)
        task = daemon.call("submit_task", text="zebra-7f3a write a haiku")
        daemon.wait_for(task["id"])
        daemon.call("chat", text="giraffe-91c2 how are you?")
    finally:
        daemon.stop()
    log = daemon.log_text()
    assert " DEBUG " in log
    assert "zebra-7f3a" not in log
    assert "giraffe-91c2" not in log


def test_an_auto_started_daemon_makes_its_log_and_data_dir_private(
    umask_022: None, home: Home
) -> None:
    """`tale list` starting the daemon leaves taled.log 0600 and the data dir 0700,
    even where an older version had left them 0644/0755."""
    home.data.mkdir(parents=True, mode=0o755)
    (home.data / "taled.log").write_text("an old line\n")
    (home.data / "taled.log").chmod(0o644)
    try:
        assert home.tale("list").returncode == 0
        assert stat.S_IMODE((home.data / "taled.log").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.data.stat().st_mode) == 0o700
        assert "an old line" in (home.data / "taled.log").read_text()
    finally:
        home.tale("daemon", "stop")


def test_an_auto_started_daemons_log_is_rotated_at_its_size_limit(home: Home) -> None:
    """Daemons started by `tale` rotate taled.log at daemon.log_max_bytes and keep
    daemon.log_backups old files (all 0600); the oldest lines go."""
    home.env["TALE_DAEMON__LOG_MAX_BYTES"] = "4096"
    home.env["TALE_DAEMON__LOG_BACKUPS"] = "1"

    def kept() -> str:
        return "".join(p.read_text() for p in home.data.glob("taled.log*"))

    # Only the first start logs the store's migrations; start and stop (about 1-2 KB
    # of log each time) until they have been rotated out.
    for _ in range(20):
        assert home.tale("daemon", "start").returncode == 0
        assert home.tale("daemon", "stop").returncode == 0
        if "store migrated" not in kept():
            break
    assert "store migrated" not in kept()
    logs = sorted(home.data.glob("taled.log*"))
    assert [p.name for p in logs] == ["taled.log", "taled.log.1"]
    for path in logs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size < 2 * 4096, path.name


# Log past one rotation, then write to fd 2 the way a native library does.
_NATIVE_AFTER_ROTATION = """
import logging, os, sys
from pathlib import Path
from taled.daemon.logs import RotatingLogFile
handler = RotatingLogFile(Path(sys.argv[1]), max_bytes=4096, backups=1)
logging.getLogger().addHandler(handler)
for n in range(100):
    logging.getLogger().warning("line %d of padding padding padding padding", n)
os.write(2, b"native message after the rotation\\n")
"""


def test_stderr_follows_the_log_file_across_a_rotation(tmp_path: Path) -> None:
    """What the process writes to fd 2 lands in the current taled.log, not a rotated one."""
    log = tmp_path / "taled.log"
    proc = subprocess.run(
        [sys.executable, "-c", _NATIVE_AFTER_ROTATION, str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "taled.log.1").exists()
    assert "native message after the rotation" in log.read_text()
    assert "native message" not in (tmp_path / "taled.log.1").read_text()


# Connect as another user ``count`` times; the daemon refuses (and logs) each one.
_STRANGER = """
import os, socket, sys
os.chdir(sys.argv[1])
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect("taled.sock")
        while sock.recv(65536):
            pass
"""


@needs_root
def test_a_warning_repeated_in_a_loop_is_logged_a_few_times_then_counted(home: Home) -> None:
    """60 refused connections log 3 lines, the third saying more are counted; at exit, the
    count of the other 57 is logged."""
    home.env["TALE_DAEMON__LOG_REPEATS"] = "3"
    daemon = Daemon(home).start()
    sock = home.socket
    sock.parent.chmod(0o711)
    sock.chmod(0o666)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _STRANGER, str(sock.parent), str(NOBODY), "60"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        daemon.stop()
    refused = [line for line in daemon.log_text().splitlines() if "refused a connection" in line]
    assert len(refused) == 3
    assert "more in the next" in refused[2]
    assert "57 more warnings were not logged from taled.daemon.transport" in daemon.log_text()


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, line: int = 10) -> logging.LogRecord:
    return logging.LogRecord("taled.db.store", logging.ERROR, "store.py", line, msg, args, None)


def test_the_first_record_after_the_window_carries_the_dropped_count() -> None:
    """After the window, the next record from the same place says how many were dropped."""
    clock = _Clock()
    limiter = RepeatFilter(burst=2, window=60, clock=clock)
    passed = [limiter.filter(_record("write failed: %s", n)) for n in range(10)]
    assert passed == [True, True] + [False] * 8
    clock.now = 61
    late = _record("write failed: %s", "disk full")
    assert limiter.filter(late)
    assert late.getMessage() == (
        "write failed: disk full [8 more records were not logged before this one]"
    )
    assert limiter.pending() == []


def test_records_from_different_places_are_limited_separately() -> None:
    """A flood from one call site does not silence an error from another."""
    limiter = RepeatFilter(burst=1, window=60, clock=_Clock())
    assert limiter.filter(_record("a", line=10))
    assert not limiter.filter(_record("a", line=10))
    assert limiter.filter(_record("b", line=20))
    assert limiter.pending() == ["1 more error was not logged from taled.db.store (store.py:10)"]


def test_different_exceptions_from_one_place_are_limited_separately() -> None:
    """A flood of one exception at a call site does not hide another exception there."""
    limiter = RepeatFilter(burst=1, window=60, clock=_Clock())

    def failed(exc: Exception) -> logging.LogRecord:
        record = _record("a client session failed")
        record.exc_info = (type(exc), exc, None)
        return record

    assert limiter.filter(failed(OSError("disk full")))
    assert not limiter.filter(failed(OSError("disk full")))
    assert limiter.filter(failed(KeyError("x")))


def test_info_records_are_never_limited() -> None:
    """Only warnings and errors are counted; info lines all pass."""
    limiter = RepeatFilter(burst=1, window=60, clock=_Clock())
    info = logging.LogRecord("taled", logging.INFO, "app.py", 1, "tick", None, None)
    assert all(limiter.filter(info) for _ in range(5))
