"""The socket is private: its permissions, the peer-uid check, and one daemon per socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.harness import Daemon, Home

NOBODY = 65534

# Run as another user: connect to the socket and report what the daemon sent back.
_OTHER_USER_CLIENT = """
import json, os, socket, sys
os.chdir(sys.argv[1])  # the socket's directory: no need to traverse its private parents
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect("taled.sock")
received = b""
while chunk := sock.recv(65536):
    received += chunk
print(json.dumps({"uid": os.getuid(), "received": received.decode()}))
"""


def _taled(home: Home) -> subprocess.CompletedProcess[str]:
    """Run a taled in ``home`` to completion (for daemons expected to refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "taled"],
        env=home.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_socket_directory_is_0700_and_socket_0600(shared_daemon: Daemon) -> None:
    """The socket's directory is private to its owner (0700) and the socket is 0600."""
    sock = shared_daemon.home.socket
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert sock.stat().st_uid == sock.parent.stat().st_uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_connection_from_another_uid_is_refused(shared_daemon: Daemon) -> None:
    """Even with the file permissions opened, another uid gets one 'permission denied' error."""
    sock = shared_daemon.home.socket
    log_before = len(shared_daemon.log_text())
    # Open the filesystem path so only SO_PEERCRED stands between the stranger and the daemon.
    sock.parent.chmod(0o711)
    sock.chmod(0o666)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _OTHER_USER_CLIENT, str(sock.parent), str(NOBODY)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        sock.chmod(0o600)
        sock.parent.chmod(0o700)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["uid"] == NOBODY
    [line] = report["received"].splitlines()  # one answer, then the daemon hung up
    answer = json.loads(line)
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] is None
    assert "permission denied" in answer["error"]["message"]
    assert f"refused a connection from uid {NOBODY}" in shared_daemon.log_text()[log_before:]
    assert "tasks" in shared_daemon.call("list_tasks")


def test_stale_socket_of_a_killed_daemon_is_replaced(daemon: Daemon) -> None:
    """After `kill -9` leaves the socket file behind, the next daemon replaces it and serves."""
    daemon.kill9()
    sock = daemon.home.socket
    assert stat.S_ISSOCK(sock.lstat().st_mode), "kill -9 leaves the socket file"
    successor = Daemon(daemon.home).start()
    try:
        assert "tasks" in successor.call("list_tasks")
        # (Inode numbers are reused after unlink, so the log is the witness here.)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert "removing stale socket" in successor.log_text()
    finally:
        successor.stop()


def test_second_daemon_on_the_same_socket_exits_3_naming_it(shared_daemon: Daemon) -> None:
    """A second taled on a live daemon's socket exits 3, says why on stderr, and harms nothing."""
    proc = _taled(shared_daemon.home)
    assert proc.returncode == 3
    assert "already running" in proc.stderr
    assert str(shared_daemon.home.socket) in proc.stderr
    assert shared_daemon.home.socket.exists()
    assert "tasks" in shared_daemon.call("list_tasks")


def test_too_long_socket_path_stops_taled_with_a_clear_message(home: Home) -> None:
    """A TALE_SOCKET longer than 107 bytes makes taled exit non-zero saying the path is too long."""
    long_path = home.root / ("s" * 100) / "taled.sock"
    assert len(os.fsencode(long_path)) > 107
    home.env["TALE_SOCKET"] = str(long_path)
    proc = _taled(home)
    assert proc.returncode != 0
    assert "too long" in proc.stderr
    assert str(long_path) in proc.stderr
    assert not long_path.parent.exists()


# --- what TALE_SOCKET may point at --------------------------------------------------


def test_tale_socket_at_a_regular_file_leaves_it_and_its_lock_neighbour_alone(home: Home) -> None:
    """TALE_SOCKET naming a file: taled exits 1 saying so; the file and FILE.lock are intact."""
    target = home.root / "notes.txt"
    target.write_text("my notes\n")
    neighbour = home.root / "notes.txt.lock"
    neighbour.write_text("also mine\n")
    home.env["TALE_SOCKET"] = str(target)
    proc = _taled(home)
    assert proc.returncode == 1
    assert f"{target} is a file that is not a socket" in proc.stderr
    assert target.read_text() == "my notes\n"
    assert neighbour.read_text() == "also mine\n"


def test_tale_socket_at_a_directory_is_refused_without_a_traceback(home: Home) -> None:
    """TALE_SOCKET naming a directory: taled exits 1 saying it is a directory, no traceback."""
    target = home.root / "somedir"
    target.mkdir()
    home.env["TALE_SOCKET"] = str(target)
    proc = _taled(home)
    assert proc.returncode == 1
    assert f"{target} is a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert target.is_dir()


def test_tale_socket_at_a_symlink_is_refused(home: Home) -> None:
    """A symbolic link at the socket path is neither followed nor removed."""
    target = home.root / "elsewhere"
    target.write_text("x")
    link = home.root / "taled.sock"
    link.symlink_to(target)
    home.env["TALE_SOCKET"] = str(link)
    proc = _taled(home)
    assert proc.returncode == 1
    assert f"{link} is a symbolic link" in proc.stderr
    assert link.is_symlink()
    assert target.read_text() == "x"


def test_a_lock_path_holding_someone_elses_file_is_not_truncated(home: Home) -> None:
    """If SOCKET.lock exists and holds more than a pid, taled refuses and leaves it as it was."""
    sock = home.root / "x.sock"
    lock = home.root / "x.sock.lock"
    lock.write_text("an important file\n")
    home.env["TALE_SOCKET"] = str(sock)
    proc = _taled(home)
    assert proc.returncode == 1
    assert "is not a taled lock file" in proc.stderr
    assert lock.read_text() == "an important file\n"
    assert not sock.exists()


def test_a_socket_another_process_answers_on_is_not_removed(home: Home) -> None:
    """A live socket with no taled lock (another program's) is left alone; taled exits 1."""
    path = home.root / "other.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        home.env["TALE_SOCKET"] = str(path)
        proc = _taled(home)
        assert proc.returncode == 1
        assert f"something already answers on {path}" in proc.stderr
        assert stat.S_ISSOCK(path.lstat().st_mode)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the other program's, still listening
