"""The sandbox: hostile code and commands run in a separate, fenced-in process.

Two entry points share one sandbox. ``run_python`` runs a model's Python code for the
done-gates, in an empty scratch directory. ``run_command`` runs a shell command for
the agent's ``run`` tool, in a task's workspace. Either is hostile input: it can loop
forever, eat memory, fork, write where it should not, phone home, read the user's
secrets or talk to the daemon over its socket. The daemon never imports or execs it.
The boundary is the kernel, in layers, failing closed (``Unavailable`` when a layer
cannot be built, never a run without it):

* namespaces — user (unless root), mount, PID, IPC, UTS, network — made by
  bubblewrap when installed, by ``taled/sandbox/child.py`` otherwise;
* a minimal root: the runtime read-only, the scratch directory (and a command's
  workspace) read-write, a private /tmp, a minimal /dev, the run's own /proc; no
  home, no runtime dir, no data dir — nothing of the daemon's;
* Landlock over reads and writes, TCP and signal/abstract-socket scopes;
* a transient unprivileged uid when the daemon is root;
* rlimits (CPU, address space, file size, processes, no core dumps, few fds) and
  a wall clock that kills the process group; the run dies with the daemon;
* a seccomp filter denying the syscalls escapes need.

Python audit hooks (``taled/sandbox/bootstrap.py``) run on top of ``run_python`` as a
tripwire that refuses early with a message a model can act on; they are not the
boundary. ``docs/sandbox.md`` has the threat model, every layer, and the escapes tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from taled.errors import Unavailable

if TYPE_CHECKING:
    from taled.settings import RunToolSettings, SandboxSettings

__all__ = [
    "CommandResult",
    "NetworkIsolation",
    "SandboxResult",
    "remove_leftovers",
    "run_command",
    "run_python",
]

log = logging.getLogger(__name__)

NetworkIsolation = Literal["namespace", "python-hook"]

_MIB = 1024 * 1024
# Open files a gated program may hold (stdio, a few files, the stdlib's own); a
# command's tools (a compiler, git, pytest) get more.
_MAX_OPEN_FILES = 64
_COMMAND_OPEN_FILES = 1024
# Transient uids/gids for runs started as root: far above real accounts and the
# usual subordinate-id ranges, below 2**31 (some tools treat uids as signed).
_UID_BASE = 2_000_000_000
_UID_SPAN = 100_000_000
# How long the pipes may stay open after the process is gone (a stray holder is killed).
_DRAIN_SECONDS = 2.0
_READ_CHUNK = 65536
_CUT_MARK = "\n[... {} bytes cut ...]\n"
_MAIN = "main.py"
_SCRATCH_PREFIX = "tale-sandbox-"
_SHELL = "/bin/sh"
# Where a command finds programs, after the configured interpreter's own directory.
_COMMAND_PATH = "/usr/local/bin:/usr/bin:/bin"

_uids_in_use: set[int] = set()


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did."""

    ok: bool
    """The code exited with status 0 and was not killed."""
    exit_code: int | None
    """The exit status, or None when a signal ended the process."""
    signal: str | None
    """The name of the signal that ended the process (``SIGKILL``, ``SIGXCPU``...)."""
    timed_out: bool
    """The wall-clock limit ran out and the sandbox killed the process group."""
    stdout: str
    """Standard output, cut to ``max_output_chars`` (head and tail kept)."""
    stderr: str
    """Standard error, cut the same way."""
    reason: str
    """One sentence for a person or a model: what happened and why."""
    duration_seconds: float
    network_isolation: NetworkIsolation
    """``namespace``: a network namespace of the run's own (no way out, loopback
    included); ``python-hook`` (``network = "off"``): the host's network, sockets
    refused by the audit hooks only."""
    kernel_layers: tuple[str, ...] = ()
    """The kernel mechanisms in force for the run (``netns``, ``landlock-fs``, ...)."""


@dataclass(frozen=True)
class CommandResult:
    """What one command of the ``run`` tool did."""

    exit_code: int | None
    """The shell's exit status; None when a signal ended it (a timeout included)."""
    output: str
    """Stdout and stderr interleaved as written, cut to ``max_output_chars`` (the
    head and the tail kept, the middle replaced by a marker)."""
    timed_out: bool
    """The wall-clock limit ran out and the sandbox killed the process group."""
    signal: str | None
    """The name of the signal that ended the shell (``SIGKILL``, ``SIGXFSZ``...)."""
    reason: str
    """One line a model can act on: how it failed, and the limit it ran into with
    its setting (``did not finish within 120 s (tools.run.timeout_seconds)``). Empty
    when it exited with status 0 and its output was kept whole."""
    duration: float
    """Wall time in seconds, set-up included."""
    output_bytes: int
    """Bytes of output produced in all, before cutting."""
    kernel_layers: tuple[str, ...] = ()
    """The kernel mechanisms in force for the run (``netns``, ``landlock-fs``, ...)."""


async def run_python(
    code: str,
    settings: SandboxSettings,
    *,
    scratch_root: Path | None = None,
    stdin: str = "",
    audit_hooks: bool = True,
) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox and report what happened.

    ``scratch_root`` is where the run's scratch directory is made (the system
    temp dir by default); ``stdin`` is fed to the program, then closed, so code
    that reads input never hangs. ``audit_hooks=False`` leaves only the kernel
    layers; the tests use it to show that each one holds on its own.

    Raises ``Unavailable`` if the sandbox itself cannot be set up (the code is
    never run without it).
    """
    started = time.monotonic()
    with _scratch_dir(scratch_root) as (scratch, uid):
        (scratch / _MAIN).write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(scratch / _MAIN, uid, uid)
        box = await _Sandbox.of(settings)
        args = [box.python.executable, "-I", "-B", "-X", "utf8"]
        if box.python.own:
            # The daemon's own interpreter: no site-packages, so none of the
            # daemon's dependencies are importable by the code.
            args.append("-S")
        bootstrap = {"scratch": str(scratch), "hooks": audit_hooks, "main": _MAIN}
        args += ["-c", _child_source("bootstrap.py"), json.dumps(bootstrap)]
        run = _Run(
            box=box,
            argv=args,
            env=_environment(scratch, "/usr/bin:/bin"),
            scratch=scratch,
            uid=uid,
            limits=_Limits.of_gates(settings),
        )
        outcome = await run.execute(stdin)
    return _result(outcome, settings, time.monotonic() - started)


async def run_command(
    command: str,
    *,
    workspace: Path,
    limits: RunToolSettings,
    sandbox: SandboxSettings,
    scratch_root: Path,
    output_file: Path | None = None,
    stdin: str = "",
) -> CommandResult:
    """Run ``command`` with ``/bin/sh -c`` in the sandbox, in ``workspace``, and report.

    The workspace is bound read-write at its own path and is the command's cwd; it
    is the only host directory the command can change. ``limits`` (``[tools.run]``)
    bound it; ``sandbox`` says who isolates and which Python is on ``PATH`` first.
    Its HOME and TMPDIR are a scratch directory made under ``scratch_root`` and
    removed afterwards. Each piece of output is appended to ``output_file`` (when
    given) as it arrives, so it survives the daemon; the command itself dies with
    the daemon. ``stdin`` is fed to the command, then closed.

    Raises ``Unavailable`` if the sandbox cannot be set up (the command never runs
    without it), ``ValueError`` if ``workspace`` is not a directory.
    """
    started = time.monotonic()
    where = Path(workspace).resolve()
    if not where.is_dir() or where == Path(where.anchor):
        raise ValueError(f"the run tool's workspace {str(workspace)!r} is not a directory")
    with _scratch_dir(scratch_root) as (scratch, uid):
        box = await _Sandbox.of(sandbox)
        # The interpreter's own directory first: `python`, `pip`, `pytest` are its.
        path = f"{os.path.dirname(box.python.executable)}:{_COMMAND_PATH}"
        run = _Run(
            box=box,
            argv=[_SHELL, "-c", command],
            env=_environment(scratch, path),
            scratch=scratch,
            uid=uid,
            limits=_Limits.of_run_tool(limits, sandbox),
            workspace=where,
            etc=_NETWORK_ETC if limits.network else (),
            merge_output=True,
        )
        sink = _OutputFile(output_file, limits.max_file_mb * _MIB) if output_file else None
        try:
            if uid is not None:
                await _to_thread_to_the_end(_lend_workspace, where, uid)
            outcome = await run.execute(stdin, sink)
        finally:
            if sink is not None:
                sink.close()
            if uid is not None:
                _kill_uid(uid)
                await _to_thread_to_the_end(_return_workspace, where)
    return _command_result(outcome, limits, time.monotonic() - started)


# --- the parent side ------------------------------------------------------------------


@contextlib.contextmanager
def _scratch_dir(scratch_root: Path | None) -> Iterator[tuple[Path, int | None]]:
    """A fresh scratch directory and, for a root daemon, the run's transient uid (which
    owns it); afterwards every process of that uid is killed and the directory removed."""
    root = Path(scratch_root) if scratch_root is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=root)).resolve()
    uid = _take_uid() if os.geteuid() == 0 else None
    try:
        if uid is not None:
            # The run's own directory: the daemon's umask (0077) would keep it out.
            os.chown(scratch, uid, uid)
        yield scratch, uid
    finally:
        if uid is not None:
            _kill_uid(uid)
            _uids_in_use.discard(uid)
        _remove_tree(scratch)


@dataclass(frozen=True)
class _Limits:
    """One run's limits, from ``[gates.sandbox]`` or from ``[tools.run]``."""

    timeout_seconds: float
    cpu_seconds: int
    memory_mb: int
    max_processes: int
    max_file_mb: int
    max_output_chars: int
    max_open_files: int
    tmp_mb: int
    unshare_net: bool
    """A network namespace of the run's own (and no TCP under Landlock)."""

    @classmethod
    def of_gates(cls, s: SandboxSettings) -> _Limits:
        return cls(
            timeout_seconds=s.timeout_seconds,
            cpu_seconds=s.cpu_seconds,
            memory_mb=s.memory_mb,
            max_processes=s.max_processes,
            max_file_mb=s.max_file_mb,
            max_output_chars=s.max_output_chars,
            max_open_files=_MAX_OPEN_FILES,
            tmp_mb=s.tmp_mb,
            unshare_net=s.network == "namespace",
        )

    @classmethod
    def of_run_tool(cls, run: RunToolSettings, sandbox: SandboxSettings) -> _Limits:
        return cls(
            timeout_seconds=run.timeout_seconds,
            cpu_seconds=run.cpu_seconds,
            memory_mb=run.memory_mb,
            max_processes=run.max_processes,
            max_file_mb=run.max_file_mb,
            max_output_chars=run.max_output_chars,
            max_open_files=_COMMAND_OPEN_FILES,
            tmp_mb=sandbox.tmp_mb,
            unshare_net=not run.network,
        )


@dataclass
class _Outcome:
    returncode: int
    timed_out: bool
    stdout: str
    """Standard output (with stderr too when the run merged them), head and tail."""
    stderr: str
    output_bytes: int
    """Bytes written to stdout in all (and stderr when merged)."""
    output_cut: bool
    network: NetworkIsolation
    layers: tuple[str, ...]


@dataclass(frozen=True)
class _Sandbox:
    """Who builds the namespaces and the root, and the interpreter the run may use."""

    isolation: Isolation
    bwrap: str
    """bubblewrap's path when ``isolation`` is ``bwrap``."""
    python: _Interpreter

    @classmethod
    async def of(cls, settings: SandboxSettings) -> _Sandbox:
        isolation, bwrap = _isolation(settings)
        return cls(isolation, bwrap, await _interpreter(settings.python))


@dataclass
class _Run:
    """One sandboxed process: what it execs, where, under which limits."""

    box: _Sandbox
    argv: list[str]
    """What the confined process execs, inside the sandbox's root."""
    env: dict[str, str]
    """Its whole environment."""
    scratch: Path
    uid: int | None
    """The run's transient uid (a root daemon's run)."""
    limits: _Limits
    workspace: Path | None = None
    """A host directory bound read-write besides scratch, and the cwd (a command's)."""
    etc: tuple[str, ...] = ()
    """Entries of /etc the root gets besides the loader's cache and the time zone."""
    merge_output: bool = False
    """Stderr goes to the stdout pipe, interleaved as written."""

    @property
    def writable(self) -> list[Path]:
        return [self.scratch, *([self.workspace] if self.workspace else [])]

    async def execute(self, stdin: str, sink: _OutputFile | None = None) -> _Outcome:
        status_r, status_w = os.pipe()
        try:
            config = self._launcher_config(status_w)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(config),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT
                    if self.merge_output
                    else asyncio.subprocess.PIPE,
                    cwd=self.scratch,
                    env=self.env,
                    start_new_session=True,
                    pass_fds=(status_w,),
                )
            finally:
                os.close(status_w)
            out = _Capture(self.limits.max_output_chars, sink)
            err = _Capture(self.limits.max_output_chars)
            try:
                timed_out = await self._wait(proc, stdin, out, err)
            finally:
                _kill_group(proc)
            status = _read_status(status_r)
        finally:
            os.close(status_r)
        return self._outcome(proc, timed_out, status, out, err)

    async def _wait(
        self, proc: asyncio.subprocess.Process, stdin: str, out: _Capture, err: _Capture
    ) -> bool:
        assert proc.stdout is not None
        readers = [
            asyncio.create_task(out.drain(proc.stdout)),
            asyncio.create_task(_feed(proc, stdin)),
        ]
        if proc.stderr is not None:
            readers.append(asyncio.create_task(err.drain(proc.stderr)))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), self.limits.timeout_seconds)
        except TimeoutError:
            timed_out = True
        finally:
            # Ended, timed out or cancelled by the caller: nothing of the run outlives
            # it (anything still holding its pipes is a stray), and its pipes are read
            # to their end, so no transport is left open.
            _kill_group(proc)
            if self.uid is not None:
                _kill_uid(self.uid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), _DRAIN_SECONDS)
            await asyncio.wait(readers, timeout=_DRAIN_SECONDS)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return timed_out

    def _launcher_config(self, status_fd: int) -> dict[str, Any]:
        lim = self.limits
        writable = [str(p) for p in self.writable]
        mounts = _mounts(_runtime_paths(self.box.python, self.etc), writable, lim.tmp_mb)
        nproc = lim.max_processes
        if nproc > 1 and self.uid is None:
            # Without a uid of its own the run's helpers (launcher, PID 1) count too.
            nproc += _HELPER_PROCESSES
        return {
            "status_fd": status_fd,
            "parent": os.getpid(),
            "isolation": self.box.isolation,
            "given_layers": (
                _bwrap_layers(self.uid is not None, lim.unshare_net)
                if self.box.isolation == "bwrap"
                else []
            ),
            "cwd": str(self.workspace or self.scratch),
            "uid": self.uid,
            "unshare_net": lim.unshare_net,
            "mounts": [m.as_json() for m in mounts],
            "landlock": {
                "read": [m.dst for m in mounts if m.kind == "ro"],
                "proc": ["/proc"],
                "write": [*writable, "/tmp"],
                "device": [f"/dev/{name}" for name in _DEVICES],
            },
            "argv": self.argv,
            "env": self.env,
            "limits": {
                "cpu": lim.cpu_seconds,
                "as": lim.memory_mb * _MIB,
                "fsize": lim.max_file_mb * _MIB,
                "nproc": nproc,
                "nofile": lim.max_open_files,
            },
        }

    def _command(self, config: dict[str, Any]) -> list[str]:
        """The launcher's argv: the child script, behind bubblewrap when that isolates."""
        # The real binary, not a venv's symlink to it: the venv is not in the sandbox's
        # root, the interpreter's own installation is.
        launcher = os.path.realpath(sys.executable)
        script = [launcher, "-I", "-S", "-B", "-c", _child_source("child.py")]
        script.append(json.dumps(config))
        if self.box.isolation == "builtin":
            return script
        mounts = [_Mount(**m) for m in config["mounts"]]
        return [*_bwrap_args(self.box.bwrap, mounts, config), "--", *script]

    def _outcome(
        self,
        proc: asyncio.subprocess.Process,
        timed_out: bool,
        status: dict[str, Any],
        out: _Capture,
        err: _Capture,
    ) -> _Outcome:
        returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        # How the code ended, as its supervisor saw it (the launcher's own status is
        # only a fallback: bubblewrap and a PID namespace fold a signal into 128+N).
        if "signal" in status:
            returncode = -int(status["signal"])
        elif "exit" in status:
            returncode = int(status["exit"])
        stdout, stderr = out.text(), err.text()
        if "error" in status or "network" not in status:
            if timed_out:
                raise Unavailable("the sandbox could not start: its set-up timed out")
            said = stdout if self.merge_output else stderr
            detail = status.get("error") or _tail(said, 500) or f"code {returncode}"
            raise Unavailable(f"the sandbox could not start: {detail}")
        network: NetworkIsolation = status["network"]
        return _Outcome(
            returncode=returncode,
            timed_out=timed_out,
            stdout=stdout,
            stderr=stderr,
            output_bytes=out.total,
            output_cut=out.cut,
            network=network,
            layers=tuple(status.get("layers", ())),
        )


async def _to_thread_to_the_end(func: Callable[..., None], *args: Any) -> None:
    """Run ``func`` in a thread; a caller cancelled meanwhile still waits for its end
    (lending the workspace must be over before it is handed back)."""
    done = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await done
        raise


class _OutputFile:
    """Output appended to a file as it arrives (unbuffered: each piece is written at
    once, so a killed daemon leaves what was said), up to ``limit`` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        self._path = path
        self._file: BinaryIO | None = open(path, "ab", buffering=0)  # noqa: SIM115
        self._left = limit
        self._limit = limit

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            return
        try:
            if len(chunk) <= self._left:
                self._file.write(chunk)
                self._left -= len(chunk)
                return
            self._file.write(chunk[: self._left])
            note = (
                f"\n[... output past {self._limit // _MIB} MiB not kept in this file "
                "(tools.run.max_file_mb) ...]\n"
            )
            self._file.write(note.encode())
        except OSError as exc:
            log.warning("run: could not write the output to %s: %s", self._path, exc)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Capture:
    """Keeps the head and the tail of a stream, at most ``limit`` characters in all
    (passing every piece on to ``sink`` first, when there is one).

    The pipe is drained to the end whatever the volume, so the writer never blocks
    and memory stays bounded.
    """

    def __init__(self, limit: int, sink: _OutputFile | None = None) -> None:
        budget = max(limit - len(_CUT_MARK.format(10**12)), 2)
        self._sink = sink
        self._head_max = budget // 2
        self._tail_max = budget - self._head_max
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0
        """Bytes read in all."""

    @property
    def cut(self) -> bool:
        return len(self._head) + len(self._tail) < self.total

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            if self._sink is not None:
                self._sink.write(chunk)
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._head_max - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            excess = len(self._tail) - self._tail_max
            if excess > 0:
                del self._tail[:excess]

    def text(self) -> str:
        if not self.cut:
            return (self._head + self._tail).decode("utf-8", "replace")
        head = self._head.decode("utf-8", "replace")
        tail = self._tail.decode("utf-8", "replace")
        kept = len(self._head) + len(self._tail)
        return head + _CUT_MARK.format(self.total - kept) + tail


async def _feed(proc: asyncio.subprocess.Process, data: str) -> None:
    """Write ``data`` to the code's stdin, then close it (EOF), whether or not it reads."""
    stdin = proc.stdin
    assert stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        try:
            if data:
                stdin.write(data.encode("utf-8", "replace"))
                await stdin.drain()
        finally:
            stdin.close()
        await stdin.wait_closed()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # start_new_session made the child a group leader: its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is the run's transient one (strays out of the group)."""
    wanted = f"Uid:\t{uid}\t"
    for _ in range(10):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                    owned = any(line.startswith(wanted) for line in f)
            except OSError:
                continue
            if owned:
                found = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.01)


def _read_status(fd: int) -> dict[str, Any]:
    # The launcher's copy closed on exec (or exit) and ours is closed, so this sees
    # EOF; non-blocking all the same, in case a launcher that would not die holds it.
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    status: dict[str, Any] = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            status.update(json.loads(line))
    return status


def _take_uid() -> int:
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if uid not in _uids_in_use:
            _uids_in_use.add(uid)
            return uid


@dataclass(frozen=True)
class _Interpreter:
    executable: str
    """What the launcher execs."""
    paths: tuple[str, ...]
    """Directories it needs to reach (its installation, a venv's base)."""
    own: bool
    """The daemon's own interpreter (run with -S: no site-packages)."""


_PROBE = (
    "import os, sys; print(sys.executable); "
    "print(os.path.realpath(sys.executable), os.path.realpath(sys.prefix), "
    "os.path.realpath(sys.base_prefix), sep='\\n')"
)
_PROBE_SECONDS = 30.0
_interpreters: dict[str, _Interpreter] = {}


async def _interpreter(configured: str) -> _Interpreter:
    """The interpreter to run: the daemon's own, or the configured one as it reports itself.

    A configured one is asked (once, as the daemon) where it lives, so a wrapper
    such as a pyenv shim resolves to the real binary, and a venv keeps its
    site-packages.
    """
    if not configured:
        real = os.path.realpath(sys.executable)
        base = os.path.realpath(sys.base_prefix)
        return _Interpreter(real, _outermost([base, os.path.dirname(real)]), own=True)
    if configured in _interpreters:
        return _interpreters[configured]
    problem = f"the sandbox could not start: {configured!r} is not a working Python"
    try:
        proc = await asyncio.create_subprocess_exec(
            # Without -S: in 3.11 site.py is what makes sys.prefix a venv's, and the
            # venv must be in the sandbox's root (the code runs with site, too).
            configured,
            "-I",
            "-c",
            _PROBE,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise Unavailable(f"{problem} ({exc.strerror})") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _PROBE_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Unavailable(f"{problem} (it did not answer in {_PROBE_SECONDS:g} s)") from None
    lines = out.decode("utf-8", "replace").splitlines()
    if proc.returncode != 0 or len(lines) != 4:
        said = _tail(err.decode("utf-8", "replace"), 300) or f"exit code {proc.returncode}"
        raise Unavailable(f"{problem} ({said})")
    executable, real, prefix, base = lines
    paths = _outermost([prefix, base, os.path.dirname(real)])
    found = _interpreters[configured] = _Interpreter(executable, paths, own=False)
    return found


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """``paths`` without duplicates and without any that lie inside another."""
    unique = sorted(set(paths))
    return tuple(p for p in unique if not any(p.startswith(q.rstrip("/") + "/") for q in unique))


Isolation = Literal["bwrap", "builtin"]
# The run's own helper processes beside the code: the launcher and the PID 1 that
# supervises it (bubblewrap: its own init and the supervisor).
_HELPER_PROCESSES = 2
_DEVICES = ("null", "zero", "full", "random", "urandom")
# Top-level system directories the runtime may need (merged-/usr systems make all
# but /usr symlinks, which are recreated as symlinks).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Single files from /etc: the loader's cache and the local time zone, nothing else.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# What a command with the network needs to resolve names and check certificates.
_NETWORK_ETC = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
)


def _isolation(settings: SandboxSettings) -> tuple[Isolation, str]:
    """Who builds the namespaces and the minimal root: bubblewrap when installed (and new
    enough for the options the root needs), else us."""
    if settings.isolation == "builtin":
        return "builtin", ""
    found = shutil.which("bwrap") or ""
    missing = _bwrap_missing(found) if found else ()
    if found and not missing:
        return "bwrap", found
    if settings.isolation == "bwrap":
        why = (
            f"bubblewrap at {found} lacks {', '.join(missing)} (0.8 or newer has them)"
            if found
            else "bubblewrap is not installed (install the bubblewrap package"
        )
        raise Unavailable(
            f"the sandbox could not start: gates.sandbox.isolation is 'bwrap' but {why}"
            + ("" if found else ", or set isolation = 'auto')")
        )
    return "builtin", ""


# Options of bubblewrap the sandbox's root is built with that older releases lack.
_BWRAP_NEEDS = ("--perms", "--size", "--remount-ro", "--die-with-parent")


@functools.cache
def _bwrap_missing(path: str) -> tuple[str, ...]:
    """The options in _BWRAP_NEEDS that ``path --help`` does not list (asked once)."""
    try:
        done = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return _BWRAP_NEEDS
    listed = done.stdout + done.stderr
    return tuple(option for option in _BWRAP_NEEDS if option not in listed)


@dataclass(frozen=True)
class _Mount:
    """One entry of the sandbox's root: what appears at ``dst`` and from where."""

    kind: Literal["ro", "rw", "tmpfs", "dev", "proc", "symlink"]
    dst: str
    src: str = ""
    """The host path bound (``ro``/``rw``) or the symlink's target."""
    size: str = ""
    """A tmpfs's size, e.g. ``64m``."""

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "dst": self.dst, "src": self.src, "size": self.size}


def _runtime_paths(python: _Interpreter, etc: tuple[str, ...]) -> list[_Mount]:
    """The read-only runtime: system directories, the interpreter, two files of /etc
    (and the entries of ``etc`` this host has)."""
    mounts: list[_Mount] = []
    dirs: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            mounts.append(_Mount("symlink", path, os.readlink(path)))
        elif os.path.isdir(path):
            dirs.append(path)
    for path in python.paths:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            dirs.append(real)
    mounts += [_Mount("ro", path, path) for path in _outermost(dirs)]
    mounts += [_Mount("ro", f, os.path.realpath(f)) for f in _ETC_FILES if os.path.isfile(f)]
    mounts += [_Mount("ro", f, os.path.realpath(f)) for f in etc if os.path.exists(f)]
    return mounts


def _mounts(runtime: list[_Mount], writable: list[str], tmp_mb: int) -> list[_Mount]:
    """The whole root, parents before what is mounted beneath them."""
    mounts = [
        *runtime,
        _Mount("dev", "/dev"),
        _Mount("proc", "/proc"),
        _Mount("tmpfs", "/tmp", size=f"{tmp_mb}m"),
        *(_Mount("rw", path, path) for path in writable),
    ]
    return sorted(mounts, key=lambda m: len(Path(m.dst).parts))


def _bwrap_layers(root: bool, network: bool) -> list[str]:
    return [
        "bwrap",
        *([] if root else ["userns"]),
        "mountns",
        "pidns",
        "ipcns",
        *(["netns"] if network else []),
        "minimal-root",
    ]


def _bwrap_args(bwrap: str, mounts: list[_Mount], config: dict[str, Any]) -> list[str]:
    """bubblewrap's options for the same namespaces and root the built-in path makes."""
    root = config["uid"] is not None
    args = [bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    if config["unshare_net"]:
        args.append("--unshare-net")
    if root:
        # The supervisor switches the code to the run's transient uid itself.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args.append("--unshare-user")
    made: set[str] = set()
    for m in mounts:
        # bubblewrap gives the directories it makes on the way the source's parents'
        # modes (a 0700 home would lock the transient uid out): make them 0755 first.
        for parent in reversed(Path(m.dst).parents[:-1]):
            if str(parent) not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
        made.update(str(p) for p in Path(m.dst).parents)
        made.add(m.dst)
        if m.kind == "ro":
            args += ["--ro-bind", m.src, m.dst]
        elif m.kind == "rw":
            args += ["--bind", m.src, m.dst]
        elif m.kind == "tmpfs":
            size = int(m.size.rstrip("m")) * _MIB
            args += ["--perms", "1777", "--size", str(size), "--tmpfs", m.dst]
        elif m.kind == "dev":
            args += ["--dev", m.dst]
        elif m.kind == "proc":
            args += ["--proc", m.dst]
        else:
            args += ["--symlink", m.src, m.dst]
    return [*args, "--remount-ro", "/", "--chdir", config["cwd"]]


@functools.cache
def _child_source(name: str) -> str:
    """The text of a stdlib-only script beside this module, sent to a child with ``-c``."""
    return Path(__file__).with_name(name).read_text(encoding="utf-8")


def _environment(scratch: Path, path: str) -> dict[str, str]:
    """The whole environment of the sandboxed process: nothing from the daemon's."""
    home = str(scratch)
    return {
        "PATH": path,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONIOENCODING": "utf-8",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }


def remove_leftovers(scratch_root: Path) -> int:
    """Remove the scratch directories a killed daemon left under ``scratch_root``
    (however deep their code nested them); return how many there were."""
    found = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(scratch_root) as entries:
        for entry in list(entries):
            if entry.name.startswith(_SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False):
                _remove_tree(Path(entry.path))
                found += 1
    return found


def _remove_tree(path: Path) -> None:
    """Remove the scratch directory, however deep, even parts the code made unreadable.

    Runs after every process of the run is dead, so nothing changes underneath. Not
    recursive: on 3.11 ``shutil.rmtree`` and ``os.walk`` recurse once per level, and
    code can nest directories thousands deep (a RecursionError here once stopped every
    worker). Each subdirectory found is moved up to the top of the scratch directory
    and emptied from there, so no path is longer than two names (PATH_MAX never
    matters) and at most two directories are open at once.
    """
    owner = os.geteuid() != 0  # root needs no permission; others first restore their own
    if owner:
        with contextlib.suppress(OSError):
            path.chmod(stat.S_IRWXU)
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("sandbox: could not remove %s: %s", path, exc)
        return
    failures: list[str] = []
    fresh = 0

    def empty(fd: int, pending: list[str]) -> None:
        """Unlink the directory's files; move its subdirectories to the top, to do later."""
        nonlocal fresh
        with os.scandir(fd) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in found:
            try:
                if not is_dir:
                    os.unlink(name, dir_fd=fd)
                    continue
                if owner:  # moving a directory rewrites its ".." entry: it must be writable
                    os.chmod(name, stat.S_IRWXU, dir_fd=fd)
                if fd == top:
                    pending.append(name)
                    continue
                while True:
                    fresh += 1
                    moved = f".tale-rm-{fresh}"
                    try:
                        os.rename(name, moved, src_dir_fd=fd, dst_dir_fd=top)
                        break
                    except (FileExistsError, IsADirectoryError, NotADirectoryError):
                        continue
                    except OSError as exc:
                        if exc.errno != errno.ENOTEMPTY:
                            raise
                pending.append(moved)
            except OSError as exc:
                failures.append(f"{name}: {exc.strerror}")

    try:
        pending: list[str] = []
        empty(top, pending)
        while pending:
            name = pending.pop()
            try:
                if owner:
                    os.chmod(name, stat.S_IRWXU, dir_fd=top)
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
            except FileNotFoundError:
                continue  # replaced by a moved directory of the same name, itself pending
            except OSError as exc:
                failures.append(f"{name}: {exc.strerror}")
                continue
            try:
                empty(fd, pending)
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=top)
            except OSError as exc:
                failures.append(f"{name}: {exc.strerror}")
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError as exc:
        failures.append(f"{path}: {exc.strerror}")
    if failures:
        log.warning(
            "sandbox: could not remove all of %s (%d left, first: %s)",
            path,
            len(failures),
            failures[0],
        )


def _lend_workspace(workspace: Path, uid: int) -> None:
    """Give the workspace to the run's transient uid (a root daemon's run): every entry
    the daemon owns, or a run it lost track of (a killed daemon) owns, becomes the run's.

    A file with other links is not lent: one may be outside the workspace (a copy made
    with hard links), and lending it would let the command write there.
    """
    daemon = os.geteuid()

    def lent(st: os.stat_result) -> bool:
        if st.st_uid != daemon and not _transient(st.st_uid):
            return False
        return stat.S_ISDIR(st.st_mode) or st.st_nlink == 1

    _chown_tree(workspace, lent, uid, uid)


def _return_workspace(workspace: Path) -> None:
    """Give the daemon back every entry of the workspace a run owns (all it made)."""
    _chown_tree(workspace, lambda st: _transient(st.st_uid), os.geteuid(), os.getegid())


def _transient(owner: int) -> bool:
    return _UID_BASE <= owner < _UID_BASE + _UID_SPAN


def _chown_tree(top: Path, chosen: Callable[[os.stat_result], bool], uid: int, gid: int) -> None:
    """Change to ``uid:gid`` the owner of every entry beneath ``top`` (and of ``top``)
    that ``chosen`` accepts; symlinks are changed, never followed.

    Runs while no process of the run is alive. Not recursive and one directory open
    at a time, as ``_remove_tree``: a command can nest directories thousands deep.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(top, flags)
    except OSError as exc:
        log.warning("sandbox: could not hand over %s: %s", top, exc)
        return
    failures: list[str] = []
    try:
        if chosen(os.fstat(fd)):
            os.fchown(fd, uid, gid)
        # Per level of the walk, the subdirectories still to visit.
        pending: list[list[str]] = []
        while True:
            subdirs: list[str] = []
            with os.scandir(fd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in found:
                try:
                    if chosen(os.stat(name, dir_fd=fd, follow_symlinks=False)):
                        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                except OSError as exc:
                    failures.append(f"{name}: {exc.strerror}")
                if is_dir:
                    subdirs.append(name)
            pending.append(subdirs)
            down = -1
            while down < 0:
                while not pending[-1]:  # this level is done: climb back to its parent
                    pending.pop()
                    if not pending:
                        return
                    up = os.open("..", flags, dir_fd=fd)
                    os.close(fd)
                    fd = up
                name = pending[-1].pop()
                try:
                    down = os.open(name, flags, dir_fd=fd)
                except OSError as exc:
                    failures.append(f"{name}: {exc.strerror}")
            os.close(fd)
            fd = down
    except OSError as exc:
        failures.append(f"{exc.filename or top}: {exc.strerror}")
    finally:
        os.close(fd)
        if failures:
            log.warning(
                "sandbox: could not hand over all of %s (%d left, first: %s)",
                top,
                len(failures),
                failures[0],
            )


# --- the verdict ------------------------------------------------------------------


def _result(outcome: _Outcome, settings: SandboxSettings, duration: float) -> SandboxResult:
    code = outcome.returncode
    signame = _signal_name(-code) if code < 0 else None
    ok = code == 0 and not outcome.timed_out
    return SandboxResult(
        ok=ok,
        exit_code=code if code >= 0 else None,
        signal=signame,
        timed_out=outcome.timed_out,
        stdout=outcome.stdout,
        stderr=outcome.stderr,
        reason=_reason(outcome, settings),
        duration_seconds=round(duration, 3),
        network_isolation=outcome.network,
        kernel_layers=outcome.layers,
    )


def _reason(outcome: _Outcome, settings: SandboxSettings) -> str:
    code = outcome.returncode
    if outcome.timed_out:
        return f"exceeded the {settings.timeout_seconds:g} s time limit"
    if code == -signal.SIGXCPU:
        return f"exceeded the {settings.cpu_seconds} s CPU time limit"
    if code == 0:
        return "ran without error"
    last = _last_error_line(outcome.stderr)
    if "MemoryError" in last or (code < 0 and "MemoryError" in outcome.stderr):
        return f"exceeded the {settings.memory_mb} MiB memory limit (MemoryError)"
    if "File too large" in last:
        return f"exceeded the {settings.max_file_mb} MiB file size limit ({last})"
    if code < 0:
        name = _signal_name(-code)
        if -code == signal.SIGKILL:
            return f"was killed by {name} (CPU time or memory limit)"
        return f"was killed by {name}"
    line = _error_line(outcome.stderr)
    where = f" (line {line})" if line else ""
    return f"exited with code {code}: {last}{where}" if last else f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_error_line(stderr: str) -> str:
    """The exception line of a traceback (or the last line of other error output)."""
    for line in reversed(stderr.splitlines()):
        text = line.strip()
        if text and not text.startswith("[... "):
            return text if len(text) <= 300 else text[:297] + "..."
    return ""


_LINE_RE = re.compile(r'File "main\.py", line (\d+)')


def _error_line(stderr: str) -> int | None:
    found = _LINE_RE.findall(stderr)
    return int(found[-1]) if found else None


def _tail(text: str, chars: int) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def _command_result(outcome: _Outcome, limits: RunToolSettings, duration: float) -> CommandResult:
    code = outcome.returncode
    return CommandResult(
        exit_code=code if code >= 0 else None,
        output=outcome.stdout,
        timed_out=outcome.timed_out,
        signal=_signal_name(-code) if code < 0 else None,
        reason=_command_reason(outcome, limits),
        duration=round(duration, 3),
        output_bytes=outcome.output_bytes,
        kernel_layers=outcome.layers,
    )


# What a program's own message says when it ran into a limit (checked only when the
# command failed): the memory (RLIMIT_AS), the processes (RLIMIT_NPROC, EAGAIN from
# fork or thread creation) and the file size (EFBIG, for programs that ignore SIGXFSZ).
_HINTS = {
    "memory": re.compile(
        r"MemoryError|Cannot allocate memory|[Oo]ut of memory|bad_alloc|memory exhausted"
    ),
    "processes": re.compile(
        r"[Cc]annot fork|can't fork|fork: (?:retry: )?Resource temporarily unavailable"
        r"|fork failed|BlockingIOError: \[Errno 11\]|can't start new thread"
    ),
    "file": re.compile(r"File too large"),
}


def _command_reason(outcome: _Outcome, limits: RunToolSettings) -> str:
    """One line: how the command failed, and each limit it met with its setting."""
    code = outcome.returncode
    # A shell reports a child that a limit's signal ended as 128 + the signal's number.
    shell_signal = code - 128 if code - 128 in _SIGNAL_LIMITS else 0
    notes: list[str] = []
    met: list[str] = []
    if outcome.timed_out:
        notes.append(
            f"did not finish within {limits.timeout_seconds:g} s (tools.run.timeout_seconds)"
        )
    elif code < 0:
        notes.append(f"was killed by {_signal_name(-code)}")
        met += [_SIGNAL_LIMITS[-code]] if -code in _SIGNAL_LIMITS else []
    elif shell_signal:
        notes.append(
            f"exited with status {code} (a process was killed by {_signal_name(shell_signal)})"
        )
        met.append(_SIGNAL_LIMITS[shell_signal])
    elif code > 0:
        notes.append(f"exited with status {code}")
    if notes:
        met += [kind for kind, said in _HINTS.items() if said.search(outcome.stdout)]
    notes += [_limit_note(kind, limits) for kind in dict.fromkeys(met)]
    if outcome.output_cut:
        notes.append(
            f"output cut to its head and tail, {limits.max_output_chars} characters of "
            f"{outcome.output_bytes} bytes (tools.run.max_output_chars)"
        )
    return "; ".join(notes)


# The signals limits send: RLIMIT_CPU (SIGXCPU, then SIGKILL at the hard limit; SIGKILL
# is also the kernel's out-of-memory killer's) and RLIMIT_FSIZE.
_SIGNAL_LIMITS: dict[int, str] = {
    signal.SIGXCPU: "cpu",
    signal.SIGKILL: "killed",
    signal.SIGXFSZ: "file",
}


def _limit_note(kind: str, limits: RunToolSettings) -> str:
    cpu = f"it used its {limits.cpu_seconds} s of CPU time (tools.run.cpu_seconds)"
    return {
        "cpu": cpu,
        "killed": f"{cpu} or the machine ran out of memory",
        "memory": f"it ran out of memory ({limits.memory_mb} MiB, tools.run.memory_mb)",
        "processes": (
            f"it reached the limit of {limits.max_processes} processes (tools.run.max_processes)"
        ),
        "file": f"it wrote a file larger than {limits.max_file_mb} MiB (tools.run.max_file_mb)",
    }[kind]
