"""A real taled in a private XDG home, driven through its real socket and CLI.

Socket paths are limited to ~108 bytes, so homes live in short /tmp paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from tale_client.rpc import Connection, DaemonUnreachable

READY_TIMEOUT = 60.0

# Keep model calls short in tests: the answers' content is not what is tested.
# A task is one step unless a test asks for planning and gates (tests of those
# turn them on): a 48-token answer from the 135M model rarely passes a code gate,
# and its retries would only slow the tests of everything else.
TEST_SETTINGS = {
    "TALE_RUNNER__MAX_TOKENS": "48",
    "TALE_RUNNER__TEMPERATURE": "0",
    # Chat turns carry their conversation's history now; short replies keep the suite quick.
    "TALE_CHAT__MAX_TOKENS": "96",
    "TALE_DAEMON__SHUTDOWN_GRACE_SECONDS": "5",
    "TALE_PLANNER__DECOMPOSE": "false",
    "TALE_GATES__PYTHON_CODE": "false",
    # The learning engine sends a share of simple tasks to ux while it has few samples,
    # by task id: tests that check routing ask for it; the rest stay on the task model.
    "TALE_LEARNING__EXPLORE_RATE": "0",
    # Many tests need a task that keeps running while they act on it, and get one from
    # the small model looping on LONG to max_tokens; the loop guard's tests turn it on.
    "TALE_LOOPS__ENABLED": "false",
}


class Home:
    """An isolated XDG home: runtime, data and config dirs under one short path."""

    def __init__(self, extra_env: Mapping[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                # No test daemon notifies the desktop of the person running the tests.
                if not k.startswith(("TALE_", "XDG_", "NOTIFY_", "WATCHDOG_", "DBUS_"))
            },
            "XDG_RUNTIME_DIR": str(self.root / "r"),
            "XDG_DATA_HOME": str(self.root / "d"),
            "XDG_CONFIG_HOME": str(self.root / "c"),
            **TEST_SETTINGS,
            **(extra_env or {}),
        }
        (self.root / "r").mkdir(mode=0o700)

    @property
    def socket(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"]) / "tale" / "taled.sock"

    @property
    def data(self) -> Path:
        return self.root / "d" / "tale"

    @property
    def config_file(self) -> Path:
        return self.root / "c" / "tale" / "taled.toml"

    def write_config(self, text: str) -> None:
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(text)

    def cleanup(self) -> None:
        """Kill any daemon still holding this home's socket lock, then delete the home."""
        lock = self.socket.with_name(self.socket.name + ".lock")
        with contextlib.suppress(OSError), open(lock, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = f.read().decode().strip()
                if pid.isdigit():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def tale(
        self, *args: str, input: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``tale`` CLI in this home."""
        return subprocess.run(
            [sys.executable, "-m", "tale_client.cli", *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


class Daemon:
    """A taled process started by a test."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.root / "taled.log"

    def start(self, wait: bool = True) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taled"],
                env=self.home.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"taled exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                Connection(self.home.socket, timeout=2).close()
                return
            except DaemonUnreachable:
                time.sleep(0.05)
        raise RuntimeError(f"taled not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self) -> Connection:
        conn = Connection(self.home.socket)
        conn.initialize("tests")
        return conn

    def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        with self.client() as conn:
            return conn.call_tool(tool, arguments)

    def wait_for(
        self,
        task_id: str,
        states: tuple[str, ...] = ("completed", "failed", "cancelled"),
        timeout: float = 120,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as conn:
            while time.monotonic() < deadline:
                task = conn.call_tool("get_task", {"id": task_id})
                if task["state"] in states:
                    return task
                time.sleep(0.05)
        raise AssertionError(f"task {task_id} not in {states} after {timeout} s: {task}")

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_if_running(self) -> None:
        """Tear-down: make sure no daemon outlives its test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def raw_exchange(path: Path, frames: list[bytes], timeout: float = 10) -> list[dict[str, Any]]:
    """Send raw bytes on a fresh socket connection and read one JSON answer per frame."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        f = sock.makefile("rwb")
        answers = []
        for frame in frames:
            f.write(frame)
            f.flush()
            answers.append(json.loads(f.readline()))
        return answers


@contextmanager
def running_daemon(extra_env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    home = Home(extra_env)
    daemon = Daemon(home).start()
    try:
        yield daemon
    finally:
        daemon.kill_if_running()
        home.cleanup()


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """git as a person runs it in ``cwd`` (an identity given, no global config)."""
    done = subprocess.run(
        ["git", "-c", "user.name=me", "-c", "user.email=me@example.org", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"},
    )
    if check:
        assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


# A zone half an hour off UTC, without summer time: a time shown in UTC, or converted by
# whole hours, cannot pass for it.
LOCAL_ZONE = "Asia/Kolkata"


@contextlib.contextmanager
def in_zone(name: str) -> Iterator[None]:
    """This process's local time zone is ``name`` inside the block."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def local_clock(stamp: str, zone: str | None = None) -> str:
    """What the CLI should print for a daemon time: the time of day in ``zone`` (this
    process's own when None), dated when it is not today there. Worked out here with
    zoneinfo, apart from the client's code, so a test can hold the client to it."""
    tz = ZoneInfo(zone) if zone else None
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(tz)
    today = datetime.now(tz).astimezone(tz).date()
    return f"{at:%H:%M:%S}" if at.date() == today else f"{at:%Y-%m-%d %H:%M:%S}"
