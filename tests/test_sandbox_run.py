"""The run tool's sandbox: real shell commands in a workspace, no mocks.

Every test runs twice, with the namespaces and the root built by bubblewrap and by
the built-in path (``taled/sandbox/child.py``). The escapes the two share with
``run_python`` (seccomp, Landlock reads, UDP, subinterpreters...) are tried in
``tests/test_sandbox.py``; these are what a command in a workspace adds: the
workspace writable and nothing else, shell pipelines, forks, floods, the limits of
``[tools.run]`` named in the reason, and dying with the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from taled.errors import Unavailable
from taled.sandbox.sandbox import _UID_BASE, _UID_SPAN, CommandResult, run_command
from taled.settings import RunToolSettings, SandboxSettings
from tests.test_sandbox import (
    ISOLATIONS,
    REPO,
    _non_root_runner,
    no_connection,
    sandbox_processes,
)

# Short limits keep the file fast; a test that needs another sets it.
FAST: dict[str, Any] = {"timeout_seconds": 20.0, "cpu_seconds": 10, "max_processes": 32}


@dataclass
class Sandboxed:
    """Runs commands in one workspace with one way of isolating, as the run tool would."""

    workspace: Path
    scratch_root: Path
    isolation: Literal["auto", "bwrap", "builtin"]

    def __call__(
        self, command: str, *, output_file: Path | None = None, stdin: str = "", **limits: Any
    ) -> CommandResult:
        """Run ``command`` with the fast test limits (overridable) and return its result."""
        return asyncio.run(self.start(command, output_file=output_file, stdin=stdin, **limits))

    async def start(
        self, command: str, *, output_file: Path | None = None, stdin: str = "", **limits: Any
    ) -> CommandResult:
        return await run_command(
            command,
            workspace=self.workspace,
            limits=RunToolSettings(**{**FAST, **limits}),
            sandbox=SandboxSettings(isolation=self.isolation),
            scratch_root=self.scratch_root,
            output_file=output_file,
            stdin=stdin,
        )


@pytest.fixture(params=ISOLATIONS.args[1])
def sh(request: pytest.FixtureRequest, tmp_path: Path) -> Sandboxed:
    """A fresh workspace and scratch root, and the command runner for them."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (tmp_path / "scratch").mkdir()
    return Sandboxed(workspace, tmp_path / "scratch", request.param)


@dataclass
class DaemonDirs:
    """Where a daemon keeps its data (``tale.db``) and its socket, outside /tmp."""

    data: Path
    runtime: Path
    socket_path: Path
    listener: socket.socket


@pytest.fixture
def daemon_dirs() -> Iterator[DaemonDirs]:
    """A data dir holding a task store and a runtime dir with a listening socket, under
    the home directory as a real daemon's are (readable and writable by the daemon's uid)."""
    root = Path(tempfile.mkdtemp(prefix=".tale-test-", dir=Path.home()))
    root.chmod(0o755)
    data, runtime = root / "data", root / "run"
    data.mkdir(mode=0o755)
    runtime.mkdir(mode=0o755)
    (data / "tale.db").write_text("other tasks' text")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(runtime / "taled.sock"))
    (runtime / "taled.sock").chmod(0o777)
    listener.listen()
    listener.setblocking(False)
    yield DaemonDirs(data, runtime, runtime / "taled.sock", listener)
    listener.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that any local process may connect to."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def marked_sleep(workspace: Path) -> str:
    """A link to ``sleep`` in the workspace with a unique name: its processes can be told
    apart from any other's by their argv[0]."""
    name = f"sleep-{uuid.uuid4().hex}"
    (workspace / name).symlink_to(os.path.realpath(shutil.which("sleep") or "/bin/sleep"))
    return name


def processes_named(name: str) -> list[int]:
    """The pids of the processes whose argv[0] ends with ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(name.encode()):
            found.append(int(entry.name))
    return found


def wait_until(condition: Any, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- running commands ------------------------------------------------------------------


def test_a_command_runs_in_the_workspace(sh: Sandboxed) -> None:
    """The command starts in the workspace, at its own absolute path, and succeeds."""
    result = sh("pwd")
    assert result.exit_code == 0 and result.signal is None and not result.timed_out
    assert result.output == f"{sh.workspace}\n"
    assert result.reason == ""


def test_stdout_and_stderr_are_interleaved_as_written(sh: Sandboxed) -> None:
    """Output to stdout and stderr comes back in one stream, in the order it was written."""
    result = sh("echo one; echo two >&2; echo three; echo four >&2")
    assert result.output == "one\ntwo\nthree\nfour\n"
    assert result.output_bytes == len(result.output)


def test_stdin_is_fed_then_closed(sh: Sandboxed) -> None:
    """The given stdin reaches the command, and reading past it ends instead of hanging."""
    result = sh("tr a-z A-Z; cat", stdin="abc\n")
    assert result.exit_code == 0 and result.output == "ABC\n"


def test_a_non_zero_exit_status_is_reported(sh: Sandboxed) -> None:
    """The shell's exit status comes back, and the reason says it."""
    result = sh("echo failing; exit 3")
    assert result.exit_code == 3 and result.signal is None and not result.timed_out
    assert result.reason == "exited with status 3"


def test_pytest_runs_in_the_workspace_and_its_status_comes_back(sh: Sandboxed) -> None:
    """``python -m pytest -q`` finds the interpreter on PATH, runs the workspace's tests
    and its exit status (1: a test failed) is the command's."""
    (sh.workspace / "test_small.py").write_text(
        "def test_passes():\n    assert 1 + 1 == 2\n\ndef test_fails():\n    assert 1 + 1 == 3\n"
    )
    result = sh("python -m pytest -q")
    assert result.exit_code == 1, result.output
    assert "1 failed, 1 passed" in result.output
    assert result.reason == "exited with status 1"


def test_the_configured_interpreter_is_first_on_path(sh: Sandboxed) -> None:
    """``python`` is the interpreter the sandbox is configured with (here the daemon's)."""
    result = sh("command -v python; python -c 'import sys; print(sys.base_prefix)'")
    assert result.exit_code == 0, result.output
    where, prefix = result.output.splitlines()
    assert where == os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "python")
    assert prefix == os.path.realpath(sys.base_prefix)


def test_the_daemons_environment_is_not_visible(
    sh: Sandboxed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's environment is the sandbox's own: none of the daemon's variables."""
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("TALE_TEST_SECRET", secret)
    result = sh("env")
    assert secret not in result.output
    names = {line.split("=", 1)[0] for line in result.output.splitlines()}
    assert {"PATH", "HOME", "TMPDIR", "LANG"} <= names and "TALE_TEST_SECRET" not in names


def test_the_kernel_layers_are_in_force(sh: Sandboxed) -> None:
    """A command gets the namespaces, the minimal root, Landlock, rlimits and seccomp."""
    result = sh("true")
    wanted = {"mountns", "pidns", "ipcns", "netns", "minimal-root", "landlock-fs", "rlimits"}
    assert wanted | {"seccomp"} <= set(result.kernel_layers)


# --- the workspace and nothing else ------------------------------------------------------


def test_writes_in_the_workspace_persist_for_the_daemon(sh: Sandboxed) -> None:
    """Files the command makes or changes in the workspace are there afterwards, owned by
    the daemon's uid, so its own tools can go on with them."""
    (sh.workspace / "notes.txt").write_text("first\n")
    result = sh("echo second >> notes.txt && mkdir -p src/pkg && echo made > src/pkg/new.txt")
    assert result.exit_code == 0, result.output
    assert (sh.workspace / "notes.txt").read_text() == "first\nsecond\n"
    assert (sh.workspace / "src" / "pkg" / "new.txt").read_text() == "made\n"
    owners = {p.lstat().st_uid for p in [sh.workspace, *sh.workspace.rglob("*")]}
    assert owners == {os.geteuid()}


@pytest.mark.parametrize("where", ["home", "tmp", "data", "socket"])
def test_a_write_outside_the_workspace_fails(
    sh: Sandboxed, where: str, daemon_dirs: DaemonDirs
) -> None:
    """Writing to $HOME, the host's /tmp, the data dir or the socket's dir leaves nothing
    there: they are absent from the sandbox's root or read-only (the /tmp the command
    writes to is its own tmpfs)."""
    name = f"tale-escape-{uuid.uuid4().hex}"
    target = {
        "home": Path.home() / name,
        "tmp": Path(tempfile.gettempdir()) / name,
        "data": daemon_dirs.data / name,
        "socket": daemon_dirs.runtime / name,
    }[where]
    result = sh(f"echo escaped > {target}")
    if where != "tmp":
        assert result.exit_code != 0, result.output
    assert not target.exists()


def test_the_daemons_data_dir_and_socket_cannot_be_reached(
    sh: Sandboxed, daemon_dirs: DaemonDirs
) -> None:
    """The task store cannot be read, the data dir listed or the daemon's socket
    connected to: none of them exists in the sandbox's root."""
    connect = (
        f"import socket; socket.socket(socket.AF_UNIX).connect({str(daemon_dirs.socket_path)!r})"
    )
    for command in (
        f"cat {daemon_dirs.data / 'tale.db'}",
        f"ls {daemon_dirs.data} {daemon_dirs.runtime}",
        f'python -c "{connect}"',
    ):
        result = sh(command)
        assert result.exit_code != 0, (command, result.output)
        assert "No such file or directory" in result.output or "FileNotFoundError" in result.output
        assert "other tasks" not in result.output
    assert no_connection(daemon_dirs.listener)


def test_the_sandbox_root_holds_only_the_runtime(sh: Sandboxed) -> None:
    """No home, runtime dir, /var or user database in the root; the PID namespace is the
    command's own; /tmp is a private tmpfs the host never sees."""
    name = f"tale-private-{uuid.uuid4().hex}"
    result = sh(
        "for p in /home /root/.ssh /run /var /etc/passwd /work; do"
        ' [ -e "$p" ] && echo "$p"; done;'
        f" echo private > /tmp/{name} && cat /tmp/{name}; echo $$"
    )
    lines = result.output.splitlines()
    assert lines[:-1] == ["private"], result.output
    assert int(lines[-1]) < 10
    assert not (Path(tempfile.gettempdir()) / name).exists()


# --- the network ----------------------------------------------------------------------------


def test_the_network_is_unreachable_by_default(sh: Sandboxed, tcp_server: socket.socket) -> None:
    """A TCP connection to a listener on the host's loopback fails: the command has a
    network namespace of its own (and Landlock refuses TCP)."""
    port = tcp_server.getsockname()[1]
    result = sh(f"python -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\"")
    assert result.exit_code == 1
    assert "[Errno 13]" in result.output or "[Errno 101]" in result.output, result.output
    assert no_connection(tcp_server)


def test_the_network_is_reachable_when_allowed(sh: Sandboxed, tcp_server: socket.socket) -> None:
    """With tools.run.network = true the command shares the host's network and reaches a
    local listener."""
    port = tcp_server.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2).send(b'hi')"
    result = sh(f'python -c "{code}"', network=True)
    assert result.exit_code == 0, result.output
    assert "netns" not in result.kernel_layers
    assert not no_connection(tcp_server)


# --- limits -------------------------------------------------------------------------------


def test_a_timeout_kills_the_process_group_and_says_so(sh: Sandboxed) -> None:
    """At the wall-clock limit the command and what it started in the background are
    killed, and the reason names the limit and its setting."""
    sleep = marked_sleep(sh.workspace)
    result = sh(f"./{sleep} 60 & ./{sleep} 61", timeout_seconds=1.0)
    assert result.timed_out and result.exit_code is None and result.signal == "SIGKILL"
    assert result.reason == "did not finish within 1 s (tools.run.timeout_seconds)"
    assert result.duration < 10
    assert processes_named(sleep) == []


def test_a_fork_bomb_is_contained_by_the_process_limit(sh: Sandboxed) -> None:
    """A shell fork bomb cannot grow past max_processes; the reason says so, and nothing
    of it is left afterwards."""
    result = sh("bomb() { bomb | bomb & }; bomb; sleep 30", timeout_seconds=2.0, max_processes=16)
    assert result.timed_out
    assert "it reached the limit of 16 processes (tools.run.max_processes)" in result.reason
    assert sandbox_processes() == []
    assert subprocess.run(["true"], check=False).returncode == 0  # the daemon still forks


def test_a_cpu_burn_is_stopped_by_the_cpu_limit(sh: Sandboxed) -> None:
    """A busy loop is killed by RLIMIT_CPU before the (longer) wall clock."""
    result = sh("while :; do :; done", cpu_seconds=1, timeout_seconds=15.0)
    assert not result.timed_out and result.signal in ("SIGXCPU", "SIGKILL")
    assert "(tools.run.cpu_seconds)" in result.reason
    assert result.duration < 10


def test_running_out_of_memory_is_reported(sh: Sandboxed) -> None:
    """Allocating past memory_mb fails (RLIMIT_AS) and the reason names the setting."""
    result = sh("python -c 'bytearray(2**30)'", memory_mb=256)
    assert result.exit_code == 1
    assert result.reason == (
        "exited with status 1; it ran out of memory (256 MiB, tools.run.memory_mb)"
    )


def test_a_file_past_the_size_limit_is_stopped(sh: Sandboxed) -> None:
    """A file is cut at max_file_mb: the writer gets SIGXFSZ, and the reason says so."""
    result = sh("head -c 3000000 /dev/zero > big", max_file_mb=1)
    assert "SIGXFSZ" in result.reason
    assert "it wrote a file larger than 1 MiB (tools.run.max_file_mb)" in result.reason
    assert (sh.workspace / "big").stat().st_size == 2**20


def test_an_output_flood_is_cut_and_the_daemon_stays_small(sh: Sandboxed) -> None:
    """``yes`` until the time limit: only the head and tail are kept, the cut is reported,
    and the daemon's memory does not grow with the flood."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = sh("yes", timeout_seconds=1.0, max_output_chars=1000)
    assert result.timed_out
    assert result.output_bytes > 10 * 2**20
    assert len(result.output) <= 1000 and "bytes cut ...]" in result.output
    assert result.output.startswith("y\ny\n") and result.output.endswith("y\n")
    assert "(tools.run.max_output_chars)" in result.reason
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


def test_the_output_file_holds_the_whole_stream(sh: Sandboxed, tmp_path: Path) -> None:
    """output_file gets every byte, stdout and stderr in order, while the result keeps
    only the head and the tail."""
    log = tmp_path / "run.log"
    result = sh("seq 1 50000; echo done >&2", output_file=log, max_output_chars=200)
    expected = "".join(f"{n}\n" for n in range(1, 50001)) + "done\n"
    assert log.read_text() == expected
    assert result.output_bytes == len(expected)
    assert len(result.output) <= 200 and result.output.endswith("50000\ndone\n")


def test_the_output_file_is_written_as_output_arrives(sh: Sandboxed, tmp_path: Path) -> None:
    """What the command has printed is in output_file while it is still running (so it
    survives a daemon that is killed)."""
    log = tmp_path / "run.log"

    async def watch() -> bool:
        run = asyncio.create_task(sh.start("echo first; sleep 30", output_file=log))
        deadline = time.monotonic() + 15
        while not (log.exists() and log.read_text() == "first\n"):
            if run.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        seen_while_running = not run.done() and log.read_text() == "first\n"
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return seen_while_running

    assert asyncio.run(watch())
    assert sandbox_processes() == []


# --- dying with the daemon ----------------------------------------------------------------

_DAEMON = """
import asyncio, pathlib, sys
from taled.sandbox.sandbox import run_command
from taled.settings import RunToolSettings, SandboxSettings
command, workspace, scratch, isolation = sys.argv[1:]
asyncio.run(run_command(
    command,
    workspace=pathlib.Path(workspace),
    limits=RunToolSettings(),
    sandbox=SandboxSettings(isolation=isolation),
    scratch_root=pathlib.Path(scratch),
))
"""


def test_killing_the_daemon_kills_the_command(sh: Sandboxed) -> None:
    """When the process that runs the command is killed with SIGKILL (no clean-up of its
    own), the command and the process it left in the background die too."""
    sleep = marked_sleep(sh.workspace)
    command = f"(./{sleep} 300 &) ; ./{sleep} 301"
    args = [command, str(sh.workspace), str(sh.scratch_root), sh.isolation]
    daemon = subprocess.Popen(
        [sys.executable, "-c", _DAEMON, *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
    )
    try:
        assert wait_until(lambda: len(processes_named(sleep)) == 2, 30), "did not start"
        daemon.kill()
        daemon.wait()
        assert wait_until(lambda: processes_named(sleep) == [], 5), processes_named(sleep)
    finally:
        daemon.kill()
        daemon.wait()
        for pid in processes_named(sleep):  # what a failure left behind
            os.kill(pid, signal.SIGKILL)


# --- set-up -------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon drops to another uid")
def test_a_root_daemons_command_runs_as_a_transient_uid(sh: Sandboxed) -> None:
    """Started as root, the command runs as an unprivileged, transient uid that owns the
    workspace only while it runs."""
    result = sh("id -u; id -G; stat -c %u .")
    uid, groups, owner = result.output.split()
    assert _UID_BASE <= int(uid) < _UID_BASE + _UID_SPAN
    assert groups == uid and owner == uid
    assert sh.workspace.stat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon lends the workspace")
def test_lending_the_workspace_does_not_follow_links(sh: Sandboxed, tmp_path: Path) -> None:
    """While the transient uid owns the workspace, a link in it to a file outside still
    points at a file the daemon owns: links are handed over, never followed."""
    outside = tmp_path / "outside.txt"
    outside.write_text("the daemon's")
    (sh.workspace / "link").symlink_to(outside)

    async def owner_while_running() -> tuple[int, int]:
        run = asyncio.create_task(sh.start("sleep 30"))
        while sh.workspace.stat().st_uid == 0 and not run.done():
            await asyncio.sleep(0.01)
        owners = (outside.stat().st_uid, (sh.workspace / "link").lstat().st_uid)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return owners

    target_owner, link_owner = asyncio.run(owner_while_running())
    assert target_owner == 0 and _UID_BASE <= link_owner < _UID_BASE + _UID_SPAN
    assert (sh.workspace / "link").lstat().st_uid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon lends the workspace")
def test_a_hard_link_to_a_file_outside_is_not_lent(sh: Sandboxed, tmp_path: Path) -> None:
    """A file in the workspace that is also linked from outside it stays the daemon's:
    the command cannot write through it to the outside file."""
    outside = tmp_path / "outside.txt"
    outside.write_text("the daemon's\n")
    outside.chmod(0o644)
    os.link(outside, sh.workspace / "linked.txt")
    result = sh("cat linked.txt && echo changed >> linked.txt")
    assert result.exit_code != 0 and "Permission denied" in result.output, result.output
    assert outside.read_text() == "the daemon's\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon lends the workspace")
def test_a_deep_directory_chain_is_handed_back(sh: Sandboxed) -> None:
    """A chain of 1,500 nested directories the command made is the daemon's afterwards:
    handing the workspace back does not recurse."""
    chain = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    try:
        result = sh(f'python -c "{chain}" && echo made')
        assert result.output == "made\n"
        others = subprocess.run(
            ["find", str(sh.workspace), "!", "-uid", str(os.geteuid())],
            capture_output=True,
            text=True,
            check=True,
        )
        assert others.stdout == ""
    finally:  # pytest's own clean-up of tmp_path recurses once per level
        subprocess.run(["rm", "-rf", str(sh.workspace / "d")], check=True)


_NON_ROOT_DAEMON = """
import asyncio, json, pathlib, sys
from taled.sandbox.sandbox import run_command
from taled.settings import RunToolSettings, SandboxSettings
commands, workspace, scratch, isolation = sys.argv[1:]
out = {}
for name, command in json.loads(commands).items():
    result = asyncio.run(run_command(
        command,
        workspace=pathlib.Path(workspace),
        limits=RunToolSettings(timeout_seconds=10),
        sandbox=SandboxSettings(isolation=isolation),
        scratch_root=pathlib.Path(scratch),
    ))
    out[name] = [result.exit_code, result.output, list(result.kernel_layers)]
print(json.dumps(out))
"""


@ISOLATIONS
def test_a_non_root_daemons_command_writes_only_its_workspace(
    isolation: str, tmp_path: Path
) -> None:
    """A daemon running as an ordinary user (the usual case) runs commands in a user
    namespace as its own uid: they write the workspace, files the user owns afterwards,
    and nothing outside it; /dev/null works there too."""
    prefix = _non_root_runner(tmp_path)
    if prefix is None:
        pytest.skip("needs root, unshare and setpriv to start an unprivileged daemon")
    workspace = Path(tempfile.mkdtemp(prefix="tale-ws-"))
    scratch = Path(tempfile.mkdtemp(prefix="tale-scratch-"))
    target = Path(tempfile.gettempdir()) / f"tale-escape-{uuid.uuid4().hex}"
    commands = {
        "write": "id -u; mkdir -p a/b && echo made > a/b/c && echo x > /dev/null",
        "outside": f"echo escaped > {target}; echo escaped > {REPO}/tale-escape",
    }
    try:
        for path in (workspace, scratch):
            os.chown(path, 61000, 61000)
        argv = [json.dumps(commands), str(workspace), str(scratch), isolation]
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", _NON_ROOT_DAEMON, *argv],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["write"][:2] == [0, "61000\n"]
        assert "userns" in out["write"][2]
        assert (workspace / "a" / "b" / "c").read_text() == "made\n"
        assert {p.stat().st_uid for p in workspace.rglob("*")} == {61000}
        assert out["outside"][0] != 0
        assert not target.exists() and not (REPO / "tale-escape").exists()
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def test_bwrap_required_but_missing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """isolation = 'bwrap' without bubblewrap refuses to run the command, saying why."""
    monkeypatch.setenv("PATH", "/nonexistent")
    marker = tmp_path / "ran"
    with pytest.raises(Unavailable, match="bubblewrap is not installed"):
        Sandboxed(tmp_path, tmp_path, "bwrap")(f"touch {marker}")
    assert not marker.exists()


def test_a_workspace_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    """A workspace that does not exist is the caller's mistake: ValueError, nothing runs."""
    with pytest.raises(ValueError, match="is not a directory"):
        Sandboxed(tmp_path / "missing", tmp_path, "builtin")("true")
