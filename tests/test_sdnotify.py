"""systemd's notify protocol: READY=1, WATCHDOG=1 and STOPPING=1 on a real socket.

The test plays the service manager: it binds an AF_UNIX datagram socket, hands its
address to a real taled as ``NOTIFY_SOCKET`` and reads what arrives.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tale_client.rpc import Connection, DaemonUnreachable
from taled.daemon.sdnotify import Notifier
from tests.harness import Daemon, Home

STARTUP_TIMEOUT = 60.0


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: Path | None = None
        if abstract:
            name = f"tale-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # Short, private path: AF_UNIX addresses are limited to ~108 bytes.
            self._dir = Path(tempfile.mkdtemp(prefix="n", dir="/tmp"))
            self.address = str(self._dir / "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float) -> list[str] | None:
        """The fields of the next datagram, or None if none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    def drain(self) -> None:
        """Discard the datagrams already queued."""
        while self.receive(0.001) is not None:
            pass

    def wait_for(self, field: str, daemon: Daemon, timeout: float = STARTUP_TIMEOUT) -> list[str]:
        """Read datagrams until one carries ``field``; fail early if the daemon dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(0.2)
            if fields is not None and field in fields:
                return fields
            assert daemon.proc is not None
            if fields is None and daemon.proc.poll() is not None:
                pytest.fail(
                    f"taled exited ({daemon.proc.returncode}) before {field}:\n" + daemon.log_text()
                )
        pytest.fail(f"no {field} within {timeout} s:\n{daemon.log_text()}")

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _socket_answers(path: Path) -> bool:
    try:
        Connection(path, timeout=2).close()
    except DaemonUnreachable:
        return False
    return True


def _sigterm(daemon: Daemon, listener: NotifyListener) -> int:
    """SIGTERM the daemon, expect STOPPING=1, and return its exit code."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", daemon, timeout=30)
    try:
        return daemon.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"taled did not exit within 30 s of SIGTERM:\n{daemon.log_text()}")


def _kill(daemon: Daemon) -> None:
    daemon.kill_if_running()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    """A bound NOTIFY_SOCKET with a filesystem path."""
    lst = NotifyListener()
    yield lst
    lst.close()


class WatchedDaemon:
    """A taled started under a fake service manager, and what it saw at READY=1.

    Its NOTIFY_SOCKET is in the abstract namespace ('@name'); the SIGTERM tests
    use a filesystem path, so both forms reach a real daemon.
    """

    def __init__(self) -> None:
        self.listener = NotifyListener(abstract=True)
        self.home = Home(
            extra_env={"NOTIFY_SOCKET": self.listener.address, "WATCHDOG_USEC": "200000"}
        )
        self.daemon = Daemon(self.home).start(wait=False)
        self.ready = self.listener.wait_for("READY=1", self.daemon)
        # Checked the moment READY=1 arrives, before anything else can happen.
        self.socket_answered_at_ready = _socket_answers(self.home.socket)

    def close(self) -> None:
        _kill(self.daemon)
        self.listener.close()
        self.home.cleanup()


@pytest.fixture(scope="module")
def watched() -> Iterator[WatchedDaemon]:
    """One real taled with NOTIFY_SOCKET=@name and WATCHDOG_USEC=200000, past READY=1."""
    w = WatchedDaemon()
    yield w
    w.close()


# -- a real daemon -------------------------------------------------------------


def test_ready_is_sent_only_once_the_socket_answers(watched: WatchedDaemon) -> None:
    """When READY=1 arrives the daemon's MCP socket already accepts connections."""
    assert watched.socket_answered_at_ready


def test_ready_carries_a_status_line(watched: WatchedDaemon) -> None:
    """READY=1 comes with a STATUS= line systemctl can show."""
    assert any(field.startswith("STATUS=ready") for field in watched.ready)


def test_watchdog_pings_repeat_faster_than_watchdog_usec(watched: WatchedDaemon) -> None:
    """With WATCHDOG_USEC=200000 the daemon sends WATCHDOG=1 more than once per 0.2 s."""
    watched.listener.drain()
    pings = 0
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        fields = watched.listener.receive(left)
        pings += fields is not None and "WATCHDOG=1" in fields
    # Every 0.1 s (WATCHDOG_USEC x daemon.watchdog_fraction 0.5): about 10 in 1 s;
    # systemd needs at least one per 0.2 s, i.e. 5.
    assert pings >= 5, f"only {pings} WATCHDOG=1 in 1 s"


def test_sigterm_sends_stopping_then_exits_zero_and_removes_its_socket(
    listener: NotifyListener,
) -> None:
    """On SIGTERM the daemon sends STOPPING=1, exits with 0 and leaves no socket file behind."""
    home = Home(extra_env={"NOTIFY_SOCKET": listener.address})
    daemon = Daemon(home).start(wait=False)
    try:
        listener.wait_for("READY=1", daemon)
        # A full MCP round trip: the main loop (and its signal handling) is running.
        daemon.call("daemon_status")
        code = _sigterm(daemon, listener)
        assert code == 0, daemon.log_text()
        assert not home.socket.exists()
    finally:
        _kill(daemon)
        home.cleanup()


def test_sigterm_right_after_ready_still_stops_gracefully(listener: NotifyListener) -> None:
    """A SIGTERM sent the moment READY=1 arrives still gets STOPPING=1 and exit code 0."""
    home = Home(extra_env={"NOTIFY_SOCKET": listener.address})
    daemon = Daemon(home).start(wait=False)
    try:
        listener.wait_for("READY=1", daemon)
        assert _sigterm(daemon, listener) == 0, daemon.log_text()
    finally:
        _kill(daemon)
        home.cleanup()


def test_abstract_namespace_notify_socket_receives_ready(watched: WatchedDaemon) -> None:
    """A NOTIFY_SOCKET of the form '@name' (Linux's abstract namespace) gets READY=1."""
    assert watched.listener.address.startswith("@")
    assert "READY=1" in watched.ready


# -- the Notifier on its own ---------------------------------------------------------


def test_notify_without_notify_socket_returns_false() -> None:
    """Outside systemd (no NOTIFY_SOCKET) the notifier is disabled and notify returns False."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False


def test_notify_sends_all_fields_in_one_newline_separated_datagram(
    listener: NotifyListener,
) -> None:
    """notify('READY=1', 'STATUS=x') sends one datagram 'READY=1\\nSTATUS=x'."""
    assert Notifier({"NOTIFY_SOCKET": listener.address}).notify("READY=1", "STATUS=x")
    assert listener.receive(5) == ["READY=1", "STATUS=x"]


def test_notify_reaches_an_abstract_socket_named_with_an_at_sign() -> None:
    """An '@name' address is sent to the abstract socket 'name'."""
    listener = NotifyListener(abstract=True)
    try:
        assert Notifier({"NOTIFY_SOCKET": listener.address}).notify("READY=1")
        assert listener.receive(5) == ["READY=1"]
    finally:
        listener.close()


def test_notify_returns_false_when_nobody_listens(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET path nobody is bound to makes notify return False, not raise."""
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify("READY=1") is False


def test_watchdog_pid_of_another_process_disables_the_watchdog() -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours to ping."""
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())}
    assert Notifier(env).watchdog_seconds is None


def test_watchdog_pid_of_this_process_enables_the_watchdog() -> None:
    """WATCHDOG_PID equal to our pid (or absent) turns WATCHDOG_USEC into seconds."""
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_seconds == pytest.approx(0.2)


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_usec_that_is_not_a_positive_integer_disables_the_watchdog(usec: str) -> None:
    """A missing, zero, negative or non-numeric WATCHDOG_USEC means no watchdog."""
    assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": usec}).watchdog_seconds is None


def test_watchdog_loop_returns_at_once_without_a_watchdog(listener: NotifyListener) -> None:
    """Without WATCHDOG_USEC the watchdog coroutine returns immediately and sends nothing."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.address})

    async def run() -> None:
        with anyio.fail_after(1):
            await notifier.watchdog(0.5)

    anyio.run(run)
    assert listener.receive(0.05) is None


def test_notify_never_blocks_when_the_managers_queue_is_full(listener: NotifyListener) -> None:
    """With nobody reading NOTIFY_SOCKET, notify soon returns False instead of blocking."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.address})
    outcome: list[bool] = []

    def flood() -> None:
        outcome.append(all(notifier.notify("WATCHDOG=1") for _ in range(100_000)))

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "notify blocked on a full datagram queue"
    assert outcome == [False]
