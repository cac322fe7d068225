"""The done-gate sandbox: real subprocesses running hostile code, no mocks.

Each escape is tried twice where both layers apply: with the audit hooks (the
refusal a model sees first) and with ``audit_hooks=False``, which leaves only the
kernel layers (rlimits, namespaces, Landlock, the unprivileged uid), so each test
passes because of a real mechanism. Kernel tests skip, naming the layer, where
this machine lacks it. Settings use short limits to keep the file fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import taled
from taled.errors import Unavailable
from taled.sandbox.sandbox import _UID_BASE, _UID_SPAN, SandboxResult, run_python
from taled.settings import SandboxSettings

REPO = Path(taled.__file__).resolve().parents[1]
FAST: dict[str, Any] = {"timeout_seconds": 2.0, "cpu_seconds": 1, "memory_mb": 128}
HOOKS = pytest.mark.parametrize("hooks", [True, False], ids=["audit-hook", "kernel"])
# Both ways of building the namespaces and the root: bubblewrap (when installed) and ours.
ISOLATIONS = pytest.mark.parametrize(
    "isolation",
    [
        pytest.param(
            "bwrap",
            marks=pytest.mark.skipif(
                shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"
            ),
        ),
        "builtin",
    ],
)


def run(
    code: str,
    *,
    hooks: bool = True,
    stdin: str = "",
    scratch_root: Path | None = None,
    **settings: Any,
) -> SandboxResult:
    """Run ``code`` in the sandbox with fast test limits (overridable)."""
    sandbox = SandboxSettings(**{**FAST, **settings})
    return asyncio.run(
        run_python(code, sandbox, scratch_root=scratch_root, stdin=stdin, audit_hooks=hooks)
    )


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    """The kernel layers this machine gives a sandboxed run."""
    return run("pass").kernel_layers


def need(layers: tuple[str, ...], *wanted: str) -> None:
    """Skip unless every kernel layer in ``wanted`` is available here."""
    missing = [layer for layer in wanted if layer not in layers]
    if missing:
        pytest.skip(f"kernel layer unavailable here: {', '.join(missing)}")


def refused_by(result: SandboxResult, hooks: bool, *kernel_errors: str) -> None:
    """The run failed because of the hook (with hooks) or with one of ``kernel_errors``."""
    assert not result.ok
    if hooks:
        assert "PermissionError: sandbox:" in result.stderr, result.stderr
    else:
        assert any(error in result.stderr for error in kernel_errors), result.stderr
        assert "sandbox:" not in result.stderr


# Outside the scratch dir, a path is either absent from the sandbox's root (ENOENT),
# read-only (EROFS) or denied by Landlock (EACCES).
HIDDEN_OR_DENIED = ("[Errno 2]", "[Errno 13]", "[Errno 30]")


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    """An empty directory for scratch dirs, so a test can see what is left in it."""
    path = Path(tempfile.mkdtemp(prefix="tale-test-scratch-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1: a connection to it succeeds without a sandbox."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def no_connection(server: socket.socket) -> bool:
    """Nothing connected to (or sent to) ``server``."""
    try:
        if server.type == socket.SOCK_STREAM:
            server.accept()[0].close()
        else:
            server.recv(100)
    except BlockingIOError:
        return True
    return False


def sandbox_processes() -> list[psutil.Process]:
    """Processes left by sandbox runs: children of this process or transient-uid ones."""
    strays = psutil.Process().children(recursive=True)
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids is not None and _UID_BASE <= uids.real < _UID_BASE + _UID_SPAN:
            strays.append(proc)
    return strays


# --- running code ------------------------------------------------------------------


def test_code_that_prints_runs_ok() -> None:
    """A plain program runs, its output is captured and the result says ok."""
    result = run("print('hello', 6 * 7)")
    assert result.ok
    assert result.exit_code == 0 and result.signal is None and not result.timed_out
    assert result.stdout == "hello 42\n"
    assert result.reason == "ran without error"


def test_the_standard_library_is_importable() -> None:
    """Stdlib modules (C extensions included) import and work in the sandbox."""
    code = (
        "import asyncio, decimal, json, sqlite3, tempfile\n"
        "db = sqlite3.connect(':memory:')\n"
        "print(db.execute('select 1 + 1').fetchone()[0], decimal.Decimal('1.5') * 2)\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "with tempfile.NamedTemporaryFile() as f: print(json.dumps(f.name.startswith('/')))\n"
    )
    result = run(code)
    assert result.ok, result.stderr
    assert result.stdout == "2 3.0\ntrue\n"


def test_the_daemons_own_packages_are_not_importable() -> None:
    """Code run by the daemon's interpreter cannot import the daemon's dependencies."""
    result = run("import pydantic")
    assert "ModuleNotFoundError: No module named 'pydantic'" in result.stderr


def test_stdin_is_fed_then_closed() -> None:
    """The given stdin reaches the code, and reading past it ends with EOF, not a hang."""
    code = "print(input().upper())\ntry:\n    input()\nexcept EOFError:\n    print('eof')\n"
    result = run(code, stdin="abc\n")
    assert result.ok and result.stdout == "ABC\neof\n"


def test_reading_stdin_without_input_does_not_hang() -> None:
    """input() with no stdin fails at once with EOFError instead of waiting."""
    result = run("input('name? ')")
    assert not result.timed_out
    assert "EOFError" in result.reason


def test_a_syntax_error_has_a_clear_reason() -> None:
    """Unparsable code fails with the SyntaxError and its line, without bootstrap noise."""
    result = run("x = 1\ndef f(:\n    pass\n")
    assert not result.ok and result.exit_code == 1
    assert result.reason.startswith("exited with code 1: SyntaxError:")
    assert result.reason.endswith("(line 2)")
    assert "<string>" not in result.stderr


def test_an_exception_reason_names_it_and_its_line() -> None:
    """A runtime error's reason is the exception line and where it happened."""
    result = run("y = 2\nprint(x)\n")
    assert result.reason == "exited with code 1: NameError: name 'x' is not defined (line 2)"
    assert result.stderr.startswith('Traceback (most recent call last):\n  File "main.py"')


def test_sys_exit_status_is_reported() -> None:
    """A program's own exit status is the run's exit code."""
    result = run("import sys; sys.exit(3)")
    assert not result.ok and result.exit_code == 3
    assert result.reason == "exited with code 3"


# --- limits --------------------------------------------------------------------------


def test_an_infinite_loop_is_stopped_by_the_wall_clock_timeout() -> None:
    """A program that never ends (and burns no CPU) is killed at the wall-clock limit."""
    result = run("import time\nwhile True:\n    time.sleep(0.05)\n", timeout_seconds=1.0)
    assert result.timed_out and not result.ok
    assert result.signal == "SIGKILL"
    assert result.reason == "exceeded the 1 s time limit"
    assert result.duration_seconds < 5


def test_a_cpu_burn_is_stopped_by_the_cpu_limit() -> None:
    """A busy loop is stopped by RLIMIT_CPU before the (longer) wall-clock limit."""
    result = run("while True:\n    pass\n", cpu_seconds=1, timeout_seconds=10.0)
    assert not result.timed_out
    assert result.signal in ("SIGXCPU", "SIGKILL")
    assert "CPU time limit" in result.reason
    assert result.duration_seconds < 5


def test_unbounded_allocation_is_stopped_by_the_memory_limit() -> None:
    """Allocating without end hits RLIMIT_AS (MemoryError); the daemon's own limit is untouched."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    result = run("x = []\nwhile True:\n    x.append(bytearray(10**6))\n", memory_mb=64)
    assert not result.ok
    assert result.reason == "exceeded the 64 MiB memory limit (MemoryError)"
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(256 * 2**20)) == 256 * 2**20  # this process can still allocate


def test_a_big_file_is_stopped_by_the_file_size_limit() -> None:
    """Writing past max_file_mb fails with EFBIG (RLIMIT_FSIZE)."""
    code = "with open('big', 'wb') as f:\n    f.write(b'x' * (3 * 2**20))\n"
    result = run(code, max_file_mb=1)
    assert not result.ok
    assert result.reason.startswith("exceeded the 1 MiB file size limit")


def test_huge_output_is_cut_and_the_run_still_finishes() -> None:
    """A flood of output is drained to the end but only max_output_chars are kept."""
    code = (
        "import sys\n"
        "for _ in range(400):\n"
        "    sys.stdout.write('x' * 100_000 + '\\n')\n"
        "print('END')\n"
    )
    result = run(code, max_output_chars=1000)
    assert result.ok, result.reason
    assert len(result.stdout) <= 1000
    assert "bytes cut ...]" in result.stdout
    assert result.stdout.startswith("xxx") and result.stdout.endswith("END\n")


# --- processes -------------------------------------------------------------------------


@HOOKS
def test_os_fork_is_refused(hooks: bool, layers: tuple[str, ...]) -> None:
    """os.fork fails: the hook refuses it, or RLIMIT_NPROC (max_processes=1) does."""
    if not hooks:
        need(layers, "rlimits")
    result = run("import os\nos.fork()\nprint('forked')\n", hooks=hooks)
    refused_by(result, hooks, "BlockingIOError: [Errno 11]")
    assert "forked" not in result.stdout
    assert sandbox_processes() == []


def test_a_fork_bomb_is_stopped_by_the_process_limit(layers: tuple[str, ...]) -> None:
    """A fork bomb, without the hooks, dies on its first fork: RLIMIT_NPROC holds."""
    need(layers, "rlimits")
    result = run("import os\nwhile True:\n    os.fork()\n", hooks=False)
    assert not result.ok and not result.timed_out
    assert "BlockingIOError" in result.reason
    assert sandbox_processes() == []


@HOOKS
def test_subprocess_is_refused(hooks: bool) -> None:
    """subprocess.run cannot start a program: refused by the hook, or fork fails (NPROC)."""
    code = "import subprocess\nsubprocess.run(['echo', 'escaped'])\n"
    result = run(code, hooks=hooks)
    refused_by(result, hooks, "BlockingIOError: [Errno 11]")
    assert "escaped" not in result.stdout


@HOOKS
def test_os_system_is_refused(hooks: bool) -> None:
    """os.system cannot run a shell command."""
    result = run("import os\nprint(os.system('echo escaped'))\n", hooks=hooks)
    if hooks:
        refused_by(result, hooks, "")
    else:
        # The C library could not spawn the shell: -1, or glibc's "as if it exited 127".
        assert result.stdout.strip() in ("-1", str(127 << 8))
    assert "escaped" not in result.stdout


def test_ctypes_is_refused_by_the_audit_hook() -> None:
    """ctypes, the usual way around audit hooks, cannot be loaded."""
    result = run("import ctypes\nctypes.CDLL(None).getpid()\n")
    assert "PermissionError: sandbox: ctypes is not allowed" in result.stderr


def test_the_audit_hook_cannot_be_reached_through_gc() -> None:
    """The hook's closure is out of reach: walking the heap with gc is refused."""
    result = run("import gc\nprint(len(gc.get_objects()))\n")
    assert "inspecting the interpreter's objects is not allowed (gc.get_objects)" in result.stderr


@HOOKS
def test_signalling_the_daemon_is_refused(hooks: bool, layers: tuple[str, ...]) -> None:
    """The code cannot send a signal to the daemon (its parent process)."""
    if not hooks:
        need(layers, "landlock-scope")
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n", hooks=hooks)
    refused_by(result, hooks, "PermissionError: [Errno 1] Operation not permitted")


def test_a_killed_run_leaves_no_process_behind() -> None:
    """After a timeout kill nothing of the run is left running."""
    result = run("import time\ntime.sleep(60)\n", timeout_seconds=0.5)
    assert result.timed_out
    assert sandbox_processes() == []


def test_concurrent_runs_are_independent() -> None:
    """Runs started together each get their own scratch dir and output."""

    async def many() -> list[SandboxResult]:
        settings = SandboxSettings(**FAST)
        code = "import os\nprint(len(os.listdir('.')), os.getcwd())\n"
        return await asyncio.gather(*(run_python(code, settings) for _ in range(4)))

    results = asyncio.run(many())
    assert all(r.ok for r in results)
    assert len({r.stdout for r in results}) == 4
    assert all(r.stdout.startswith("1 ") for r in results)  # only its main.py


# --- files -------------------------------------------------------------------------------


def outside_targets() -> list[Path]:
    home = Path(os.environ.get("HOME", "/root"))
    name = f"tale-escape-{uuid.uuid4().hex}"
    return [Path(tempfile.gettempdir()) / name, REPO / name, home / name]


@HOOKS
@pytest.mark.parametrize("where", ["tmp", "repo", "home"])
def test_writing_outside_the_scratch_dir_is_refused(
    hooks: bool, where: str, layers: tuple[str, ...]
) -> None:
    """Writing to /tmp, the repository or $HOME leaves no file there: the hook refuses it,
    and without the hook the repository and $HOME do not exist in the sandbox's root
    while /tmp is the run's own tmpfs."""
    if not hooks:
        need(layers, "landlock-fs", "minimal-root")
    target = dict(zip(["tmp", "repo", "home"], outside_targets(), strict=True))[where]
    result = run(f"open({str(target)!r}, 'w').write('escaped')\n", hooks=hooks)
    if hooks or where != "tmp":
        refused_by(result, hooks, *HIDDEN_OR_DENIED)
    assert not target.exists()


@HOOKS
def test_a_symlink_out_of_the_scratch_dir_cannot_be_written_through(
    hooks: bool, layers: tuple[str, ...]
) -> None:
    """A link in the scratch dir to an outside path does not make that path writable."""
    if not hooks:
        need(layers, "landlock-fs")
    target = outside_targets()[1]
    code = f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')\n"
    result = run(code, hooks=hooks)
    refused_by(result, hooks, *HIDDEN_OR_DENIED)
    assert not target.exists()


def test_creating_a_fifo_outside_the_scratch_dir_is_refused(layers: tuple[str, ...]) -> None:
    """os.mkfifo, which has no audit event, is stopped by Landlock even with the hooks on."""
    need(layers, "landlock-fs")
    target = outside_targets()[1]
    result = run(f"import os\nos.mkfifo({str(target)!r})\n")
    assert any(error in result.stderr for error in HIDDEN_OR_DENIED), result.stderr
    assert not target.exists()


def test_writing_inside_the_scratch_dir_works() -> None:
    """Relative paths, $HOME, $TMPDIR and tempfile all write into the scratch dir."""
    code = (
        "import os, pathlib, tempfile\n"
        "pathlib.Path('a.txt').write_text('a')\n"
        "os.makedirs('d/e')\n"
        "open(os.path.join(os.environ['HOME'], 'b.txt'), 'w').write('b')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f: f.write('c')\n"
        "os.rename('a.txt', 'd/e/a.txt')\n"
        "print(sorted(os.listdir('.')), open('d/e/a.txt').read())\n"
    )
    result = run(code)
    assert result.ok, result.stderr
    assert result.stdout.startswith("['b.txt', 'd', 'main.py', 'tmp")
    assert result.stdout.endswith(" a\n")


def test_the_scratch_dir_is_removed_afterwards(scratch_root: Path) -> None:
    """Whatever the code leaves (even a directory it locked itself out of) is removed."""
    code = "import os\nos.makedirs('x/y')\nopen('x/y/f', 'w').write('f')\nos.chmod('x', 0)\n"
    result = run(code, scratch_root=scratch_root)
    assert result.ok, result.stderr
    assert list(scratch_root.iterdir()) == []


def test_the_scratch_dir_is_removed_after_a_timeout(scratch_root: Path) -> None:
    """A run killed at the time limit leaves no scratch dir either."""
    code = "import time\nopen('f', 'w').write('x')\ntime.sleep(60)\n"
    result = run(code, scratch_root=scratch_root, timeout_seconds=0.5)
    assert result.timed_out
    assert list(scratch_root.iterdir()) == []


def test_a_private_scratch_root_still_works(tmp_path: Path) -> None:
    """A scratch root inside a directory others cannot enter (pytest's 0700 tmp) works."""
    result = run(
        "import os\nopen(os.environ['HOME'] + '/f', 'w').write('x')\nprint('ok')\n",
        scratch_root=tmp_path,
    )
    assert result.ok, result.stderr
    assert list(tmp_path.iterdir()) == []


# --- the daemon's secrets --------------------------------------------------------------------


def test_the_daemons_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret in the daemon's environment is neither inherited nor readable via /proc."""
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("TALE_TEST_SECRET", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "try:\n"
        "    print(open(f'/proc/{os.getppid()}/environ').read())\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    )
    result = run(code)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "refused 13" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon drops to another uid")
def test_code_from_a_root_daemon_runs_unprivileged(tmp_path: Path) -> None:
    """Started as root, the code runs as a transient uid and cannot read root's files."""
    private = tmp_path / "secret.txt"
    private.write_text("root only")
    code = f"import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nopen({str(private)!r})\n"
    result = run(code)
    uid, gid, groups = result.stdout.split(" ", 2)
    assert _UID_BASE <= int(uid) < _UID_BASE + _UID_SPAN and gid == uid and groups == "[]\n"
    assert any(error in result.stderr for error in HIDDEN_OR_DENIED), result.stderr


# --- network ---------------------------------------------------------------------------------


@HOOKS
def test_a_network_connection_is_refused(
    hooks: bool, tcp_server: socket.socket, layers: tuple[str, ...]
) -> None:
    """Connecting to a TCP server on 127.0.0.1 (which accepts without a sandbox) fails."""
    if not hooks:
        need(layers, "netns")
    port = tcp_server.getsockname()[1]
    code = (
        f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
    )
    result = run(code, hooks=hooks)
    # Kernel: Landlock refuses the connect (EACCES); without it the namespace's
    # loopback is down (ENETUNREACH).
    kernel = "[Errno 13]" if "landlock-net" in layers else "[Errno 101]"
    refused_by(result, hooks, kernel)
    assert no_connection(tcp_server)


@ISOLATIONS
def test_udp_is_blocked_by_the_network_namespace(isolation: str) -> None:
    """Without hooks (and UDP is outside Landlock), a datagram to 127.0.0.1 never arrives:
    the run's loopback is its own namespace's (down in ours, up but empty in bwrap's)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'x', ('127.0.0.1', {port}))\n"
        )
        result = run(code, hooks=False, isolation=isolation)
        assert "netns" in result.kernel_layers
        if isolation == "builtin":
            assert "OSError: [Errno 101] Network is unreachable" in result.stderr
        assert result.network_isolation == "namespace"
        assert no_connection(server)
    finally:
        server.close()


def test_network_off_falls_back_to_the_python_hook(tcp_server: socket.socket) -> None:
    """With network='off' no namespace is made and the audit hook refuses the socket."""
    port = tcp_server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    result = run(code, network="off")
    assert result.network_isolation == "python-hook"
    assert "netns" not in result.kernel_layers
    assert "PermissionError: sandbox: network access is not allowed" in result.stderr
    assert no_connection(tcp_server)


def test_name_lookups_are_refused_by_the_audit_hook() -> None:
    """DNS lookups (a data channel of their own) are refused before any packet is sent."""
    result = run("import socket\nsocket.getaddrinfo('example.com', 80)\n", network="off")
    assert "network access is not allowed (socket.getaddrinfo)" in result.stderr


# --- what the sandbox's root holds (the kernel boundary) ----------------------------------


@pytest.fixture
def reachable_socket() -> Iterator[tuple[Path, socket.socket]]:
    """A listening Unix socket anyone may connect to, as a daemon's socket would be to
    its own uid: only the sandbox's root can keep code away from it."""
    where = Path(tempfile.mkdtemp(prefix="tale-sock-"))
    where.chmod(0o755)
    path = where / "taled.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen()
    listener.setblocking(False)
    yield path, listener
    listener.close()
    shutil.rmtree(where, ignore_errors=True)


@ISOLATIONS
def test_a_subinterpreter_cannot_reach_a_unix_socket(
    isolation: str, reachable_socket: tuple[Path, socket.socket]
) -> None:
    """A subinterpreter runs without the audit hooks; the socket is still not there,
    because it is absent from the sandbox's mount namespace."""
    path, listener = reachable_socket
    inner = f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(path)!r})\nprint('in')\n"
    code = f"import _xxsubinterpreters as si\nsi.run_string(si.create(), {inner!r})\n"
    result = run(code, hooks=False, isolation=isolation)
    assert "FileNotFoundError" in result.stderr, result.stderr
    assert "in" not in result.stdout
    assert no_connection(listener)


def test_starting_a_subinterpreter_trips_the_audit_hook() -> None:
    """With the hooks on, importing the subinterpreter module is refused as a tripwire."""
    result = run("import _xxsubinterpreters\n")
    assert "sandbox: starting a subinterpreter is not allowed (import)" in result.stderr


@ISOLATIONS
def test_a_world_readable_file_outside_is_not_in_the_sandbox(isolation: str) -> None:
    """A copy of the task store in a readable directory (any file the daemon's uid could
    read) does not exist in the sandbox's root."""
    where = Path(tempfile.mkdtemp(prefix="tale-data-"))
    try:
        where.chmod(0o755)
        db = where / "tale.db"
        db.write_text("other tasks' text")
        db.chmod(0o644)
        result = run(f"print(open({str(db)!r}).read())\n", hooks=False, isolation=isolation)
        assert "FileNotFoundError" in result.stderr, result.stderr
        assert "other tasks" not in result.stdout
    finally:
        shutil.rmtree(where)


@ISOLATIONS
def test_the_sandbox_root_holds_only_the_runtime(isolation: str) -> None:
    """The root has the read-only runtime, /dev, /proc, a private /tmp and the scratch
    dir's path: no home, no runtime dir, no data dir; the PID namespace is the run's own."""
    code = (
        "import os\n"
        "print(sorted(p for p in ('/home', '/root/.ssh', '/run', '/var', '/etc/passwd', '/work')"
        " if os.path.lexists(p)))\n"
        "print(os.getpid() < 5)\n"
        "print(open('/tmp/x', 'w').write('private'))\n"
    )
    result = run(code, hooks=False, isolation=isolation)
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["[]", "True", "7"]
    assert not Path("/tmp/x").exists() or Path("/tmp/x").read_text() != "private"


@ISOLATIONS
def test_landlock_refuses_reads_outside_the_allowed_paths(isolation: str) -> None:
    """Listing the root directory, which the mount namespace shows, is refused by Landlock's
    read rules: reading is confined to the runtime, /proc, /dev's few files and scratch."""
    result = run("import os\nprint(os.listdir('/'))\n", hooks=False, isolation=isolation)
    assert "landlock-fs" in result.kernel_layers
    assert "PermissionError: [Errno 13]" in result.stderr, result.stderr


SECCOMP_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    rc = getattr(libc, name)(*args)
    print(name, rc, ctypes.get_errno())
call("unshare", 0x10000000)            # CLONE_NEWUSER: a way to regain capabilities
call("ptrace", 0, 0, 0, 0)             # PTRACE_TRACEME
call("syscall", {keyctl}, 0, 0, 0, 0)  # the kernel keyring
call("setsid")                         # leaving the process group the daemon kills
call("mount", b"none", b"/tmp", b"tmpfs", 0, None)
"""


@ISOLATIONS
def test_seccomp_denies_the_syscalls_escapes_need(isolation: str) -> None:
    """With the hooks off and ctypes in hand, namespace, ptrace, keyring, setsid and mount
    syscalls fail with EPERM."""
    keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
    if keyctl is None:
        pytest.skip(f"no seccomp filter for {os.uname().machine}")
    result = run(SECCOMP_PROBE.format(keyctl=keyctl), hooks=False, isolation=isolation)
    assert "seccomp" in result.kernel_layers
    assert result.ok, result.stderr
    for line in result.stdout.splitlines():
        _name, rc, errno = line.split()
        assert (rc, errno) == ("-1", "1"), line


def test_bwrap_required_but_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """isolation = 'bwrap' without bubblewrap on PATH refuses to run the code, saying why."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Unavailable, match="bubblewrap is not installed"):
        run("print(1)", isolation="bwrap")


# --- setup -----------------------------------------------------------------------------------


def test_a_missing_interpreter_makes_the_sandbox_unavailable() -> None:
    """A configured interpreter that does not exist is a set-up error; nothing runs."""
    with pytest.raises(Unavailable, match="'/nonexistent/python3' is not a working Python"):
        run("print(1)", python="/nonexistent/python3")


def test_a_program_that_is_not_python_makes_the_sandbox_unavailable() -> None:
    """A configured 'interpreter' that does not answer like Python is refused up front."""
    with pytest.raises(Unavailable, match="is not a working Python"):
        run("print(1)", python=shutil.which("true") or "/bin/true")


def test_a_configured_interpreter_keeps_its_site_packages() -> None:
    """A configured interpreter (here this venv's) runs with its own packages importable."""
    result = run("import pydantic, sys\nprint(sys.prefix)\n", python=sys.executable)
    assert result.ok, result.stderr
    assert result.stdout.strip() == os.path.realpath(sys.prefix)


def _non_root_runner(stage: Path) -> list[str] | None:
    """A command prefix running a process as an unprivileged uid that can still reach
    this interpreter and repository (private ancestors covered in a mount namespace)."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0 or not unshare or not setpriv:
        return None
    needed = {Path(os.path.realpath(p)) for p in (sys.base_prefix, sys.prefix, REPO)}
    script = ["set -e", "mount --make-rprivate /"]
    covers: dict[Path, list[Path]] = {}
    for path in sorted(needed):
        blocker = next((p for p in reversed(path.parents) if not p.stat().st_mode & 0o001), None)
        if blocker is not None:
            covers.setdefault(blocker, []).append(path)
    for i, path in enumerate(p for paths in covers.values() for p in paths):
        script += [f"mkdir -p {stage}/{i}", f"mount --bind '{path}' {stage}/{i}"]
    for blocker in covers:
        script.append(f"mount -t tmpfs -o mode=0755 tmpfs '{blocker}'")
    for i, path in enumerate(p for paths in covers.values() for p in paths):
        script += [f"mkdir -p '{path}'", f"mount --bind {stage}/{i} '{path}'"]
    script.append('exec "$@"')
    return [
        unshare,
        "-m",
        "sh",
        "-c",
        "\n".join(script),
        "sh",
        setpriv,
        "--reuid=61000",
        "--regid=61000",
        "--clear-groups",
    ]


@ISOLATIONS
def test_kernel_layers_hold_for_a_non_root_daemon(
    isolation: str, scratch_root: Path, tmp_path: Path
) -> None:
    """A daemon running as an ordinary user (the usual case) gives its runs a user, mount,
    PID and network namespace, NPROC and Landlock: with the hooks off, fork, outside
    writes and TCP fail; the user's own private file and the daemon's own socket, both
    reachable by that uid outside the sandbox, do not exist inside it; and the scratch
    dir goes even when the code locked its owner out of parts of it."""
    prefix = _non_root_runner(tmp_path)
    if prefix is None:
        pytest.skip("needs root, unshare and setpriv to start an unprivileged daemon")
    # The user's world: a private key in their home and the daemon's socket.
    user_home = Path(tempfile.mkdtemp(prefix="tale-user-"))
    secret = user_home / ".ssh" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    sock_path = user_home / "taled.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen()
    listener.setblocking(False)
    for path in (user_home, secret.parent, secret, sock_path):
        os.chown(path, 61000, 61000)
    user_home.chmod(0o700)
    target = outside_targets()[1]
    connect_unix = (
        f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(sock_path)!r})\nprint('in')\n"
    )
    codes = {
        "whoami": "import os\nprint(os.getuid(), os.getpid())\n",
        "fork": "import os\nos.fork()\n",
        "write": f"open({str(target)!r}, 'w')\n",
        "connect": "import socket\nsocket.socket().connect(('127.0.0.1', 9))\n",
        "secret": f"print(open({str(secret)!r}).read())\n",
        "socket": connect_unix,
        "subinterpreter": (
            f"import _xxsubinterpreters as si\nsi.run_string(si.create(), {connect_unix!r})\n"
        ),
        "lock": "import os\nos.makedirs('x/y')\nos.chmod('x/y', 0)\nos.chmod('x', 0)\n",
    }
    program = (
        "import asyncio, json, socket, sys\n"
        "from taled.sandbox.sandbox import run_python\n"
        "from taled.settings import SandboxSettings\n"
        # Outside the sandbox this uid can read its key and reach its daemon.
        "out = {'control': [open(sys.argv[3]).read(), []]}\n"
        "socket.socket(socket.AF_UNIX).connect(sys.argv[4])\n"
        "for name, code in json.loads(sys.argv[1]).items():\n"
        "    settings = SandboxSettings(timeout_seconds=5, isolation=sys.argv[5])\n"
        "    run = run_python(code, settings, scratch_root=sys.argv[2], audit_hooks=False)\n"
        "    r = asyncio.run(run)\n"
        "    out[name] = [r.stdout + r.stderr, list(r.kernel_layers)]\n"
        "print(json.dumps(out))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    scratch_root.chmod(0o777)
    argv = [json.dumps(codes), str(scratch_root), str(secret), str(sock_path), isolation]
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", program, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        listener.accept()[0].close()  # the control's connection
        assert no_connection(listener)  # and none from the sandbox
    finally:
        listener.close()
        shutil.rmtree(user_home, ignore_errors=True)
    assert "secret" in out["control"][0]
    assert out["whoami"][0].split()[0] == "61000"
    layers = set(out["whoami"][1])
    assert {"userns", "mountns", "pidns", "netns", "minimal-root", "seccomp", "rlimits"} <= layers
    assert "uid" not in layers
    assert "BlockingIOError: [Errno 11]" in out["fork"][0]
    assert any(error in out["write"][0] for error in HIDDEN_OR_DENIED), out["write"][0]
    assert not target.exists()
    assert "Errno 13" in out["connect"][0] or "Errno 101" in out["connect"][0]
    assert "FileNotFoundError" in out["secret"][0], out["secret"][0]
    assert "FileNotFoundError" in out["socket"][0], out["socket"][0]
    assert "FileNotFoundError" in out["subinterpreter"][0], out["subinterpreter"][0]
    assert out["lock"][0] == ""
    assert list(scratch_root.iterdir()) == []  # removed despite the locked directories


def test_code_runs_under_the_daemons_private_umask() -> None:
    """The daemon creates its files with umask 0077; the run can still read its code."""
    old = os.umask(0o077)
    try:
        result = run("print('read')\n")
    finally:
        os.umask(old)
    assert result.ok, result.stderr
    assert result.stdout == "read\n"


@ISOLATIONS
def test_a_daemon_running_from_a_virtualenv_can_run_code(isolation: str, tmp_path: Path) -> None:
    """The usual install (a venv whose python is a symlink outside the sandbox's root)
    still starts the sandbox: the launcher is the venv's real interpreter."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    program = (
        "import asyncio, sys\n"
        "from taled.sandbox.sandbox import run_python\n"
        "from taled.settings import SandboxSettings\n"
        "settings = SandboxSettings(timeout_seconds=5, isolation=sys.argv[1])\n"
        "r = asyncio.run(run_python('print(6 * 7)', settings))\n"
        "print(r.stdout.strip(), r.ok)\n"
    )
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([str(REPO), *site])}
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", program, isolation],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "True"]


def _old_bwrap(where: Path) -> Path:
    """A `bwrap` whose --help lists none of the options the sandbox's root needs."""
    fake = where / "bwrap"
    fake.write_text("#!/bin/sh\necho 'usage: bwrap [OPTIONS...] [--] COMMAND [ARGS...]'\n")
    fake.chmod(0o755)
    return fake


def test_auto_passes_over_a_bubblewrap_too_old_for_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """isolation = 'auto' with an old bubblewrap first on PATH builds the root itself."""
    _old_bwrap(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    result = run("print(1)\n", isolation="auto")
    assert result.ok, result.stderr
    assert "bwrap" not in result.kernel_layers and "minimal-root" in result.kernel_layers


def test_bwrap_required_but_too_old_is_refused_naming_what_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """isolation = 'bwrap' with an old bubblewrap refuses, naming the missing options."""
    fake = _old_bwrap(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    with pytest.raises(Unavailable, match=f"bubblewrap at {fake} lacks --perms, --size"):
        run("print(1)\n", isolation="bwrap")


def test_a_deep_directory_chain_is_not_slowed_by_the_audit_hook() -> None:
    """Making and entering 1,100 nested directories (each write checked by the hook)
    stays well inside the default CPU limit: the hook does not walk the cwd again."""
    code = "import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')\n"
    result = run(code, cpu_seconds=5, timeout_seconds=10)
    assert result.ok, result.reason
    assert result.stdout == "deep\n"


@ISOLATIONS
def test_a_configured_virtualenv_runs_as_that_virtualenv(isolation: str, tmp_path: Path) -> None:
    """A venv configured as the interpreter is in the sandbox's root and runs as itself."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    tmp_path.chmod(0o755)  # as a user's project directory would be
    result = run(
        "import sys\nprint(sys.prefix)\n", python=str(venv / "bin" / "python"), isolation=isolation
    )
    assert result.ok, result.stderr
    assert result.stdout.strip() == str(venv)
