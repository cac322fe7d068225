"""The done-gate sandbox: run a model's Python code in a separate, fenced-in process.

A result's code is untrusted: it can loop forever, eat memory, fork, write where
it should not, phone home or read the daemon's secrets. The daemon therefore
never imports or execs it; it runs it in a child process and layers kernel
mechanisms (which hold whatever the code does) under Python audit hooks (which
refuse early, with a message a model can act on):

* a fresh scratch directory (the code's cwd, ``HOME`` and ``TMPDIR``), removed
  afterwards; a minimal environment, nothing inherited from the daemon;
* a wall-clock timeout that kills the whole process group;
* rlimits: CPU time, address space, file size, processes, no core dumps, few fds;
* no network: a new network namespace where the kernel allows it, else (and in
  any case) audit hooks that refuse sockets, name lookups and connections;
* Landlock, where the kernel has it: writes only beneath the scratch directory,
  no TCP connect/bind, no signals out of the sandbox;
* as root: a private mount namespace that makes the interpreter and the scratch
  directory reachable, then a transient unprivileged uid/gid for the run (root
  is exempt from RLIMIT_NPROC and may write anywhere);
* audit hooks in the child refusing fork/exec/subprocess, ctypes, sockets,
  signals to other processes and file writes outside the scratch directory.

Set-up happens in a small launcher (a fresh ``python -I -S`` process, so no
``preexec_fn`` runs in the threaded daemon), which then execs the target
interpreter with a bootstrap that installs the hooks and runs the code.
``docs/sandbox.md`` lists every layer, its setting, and the escapes tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from taled.errors import Unavailable

if TYPE_CHECKING:
    from taled.settings import SandboxSettings

__all__ = ["NetworkIsolation", "SandboxResult", "run_python"]

log = logging.getLogger(__name__)

NetworkIsolation = Literal["namespace", "python-hook"]

_MIB = 1024 * 1024
# Open files the sandboxed process may hold (stdio, a few files, the stdlib's own).
_MAX_OPEN_FILES = 64
# Transient uids/gids for runs started as root: far above real accounts and the
# usual subordinate-id ranges, below 2**31 (some tools treat uids as signed).
_UID_BASE = 2_000_000_000
_UID_SPAN = 100_000_000
# How long the pipes may stay open after the process is gone (a stray holder is killed).
_DRAIN_SECONDS = 2.0
_READ_CHUNK = 65536
_CUT_MARK = "\n[... {} bytes cut ...]\n"
_MAIN = "main.py"

_uids_in_use: set[int] = set()
_warned_no_namespace = False


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
    """``namespace``: no network device but a down loopback; ``python-hook``: sockets
    refused by the audit hooks (and by Landlock for TCP where available)."""
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
    root = Path(scratch_root) if scratch_root is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tale-sandbox-", dir=root)).resolve()
    uid = _take_uid() if os.geteuid() == 0 else None
    try:
        (scratch / _MAIN).write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(scratch, uid, uid)
        run = _Run(
            settings=settings,
            scratch=scratch,
            uid=uid,
            python=await _interpreter(settings.python),
            audit_hooks=audit_hooks,
        )
        outcome = await run.execute(stdin)
    finally:
        if uid is not None:
            _kill_uid(uid)
            _uids_in_use.discard(uid)
        _remove_tree(scratch)
    return _result(outcome, settings, time.monotonic() - started)


# --- the parent side ------------------------------------------------------------------


@dataclass
class _Outcome:
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    network: NetworkIsolation
    layers: tuple[str, ...]


@dataclass
class _Run:
    settings: SandboxSettings
    scratch: Path
    uid: int | None
    python: _Interpreter
    audit_hooks: bool

    async def execute(self, stdin: str) -> _Outcome:
        env = _environment(self.scratch)
        status_r, status_w = os.pipe()
        try:
            config = self._launcher_config(status_w, env)
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    "-S",
                    "-B",
                    "-c",
                    _launcher_source(),
                    json.dumps(config),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=self.scratch,
                    env=env,
                    start_new_session=True,
                    pass_fds=(status_w,),
                )
            finally:
                os.close(status_w)
            out = _Capture(self.settings.max_output_chars)
            err = _Capture(self.settings.max_output_chars)
            try:
                timed_out = await self._wait(proc, stdin, out, err)
            finally:
                _kill_group(proc)
            status = _read_status(status_r)
        finally:
            os.close(status_r)
        return self._outcome(proc, timed_out, status, out.text(), err.text())

    async def _wait(
        self, proc: asyncio.subprocess.Process, stdin: str, out: _Capture, err: _Capture
    ) -> bool:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(out.drain(proc.stdout)),
            asyncio.create_task(err.drain(proc.stderr)),
            asyncio.create_task(_feed(proc, stdin)),
        ]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), self.settings.timeout_seconds)
            except TimeoutError:
                timed_out = True
                _kill_group(proc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), _DRAIN_SECONDS)
            # The process is gone; anything still holding its pipes is a stray.
            _kill_group(proc)
            if self.uid is not None:
                _kill_uid(self.uid)
            await asyncio.wait(readers, timeout=_DRAIN_SECONDS)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return timed_out

    def _launcher_config(self, status_fd: int, env: dict[str, str]) -> dict[str, Any]:
        s = self.settings
        args = [self.python.executable, "-I", "-B", "-X", "utf8"]
        if self.python.own:
            # The daemon's own interpreter: no site-packages, so none of the
            # daemon's dependencies are importable by the code.
            args.append("-S")
        bootstrap = {"scratch": str(self.scratch), "hooks": self.audit_hooks, "main": _MAIN}
        args += ["-c", _bootstrap_source(), json.dumps(bootstrap)]
        needed = [(path, False) for path in self.python.paths] + [(str(self.scratch), True)]
        binds = []
        if self.uid is not None:
            for path, writable in needed:
                blocker = _unsearchable_ancestor(Path(path))
                if blocker is not None:
                    binds.append([path, str(blocker), writable])
        return {
            "status_fd": status_fd,
            "scratch": str(self.scratch),
            "uid": self.uid,
            "network": s.network == "namespace",
            "binds": binds,
            "argv": args,
            "env": env,
            "limits": {
                "cpu": s.cpu_seconds,
                "as": s.memory_mb * _MIB,
                "fsize": s.max_file_mb * _MIB,
                "nproc": s.max_processes,
                "nofile": _MAX_OPEN_FILES,
            },
        }

    def _outcome(
        self,
        proc: asyncio.subprocess.Process,
        timed_out: bool,
        status: dict[str, Any],
        stdout: str,
        stderr: str,
    ) -> _Outcome:
        returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        if "error" in status or "network" not in status:
            if timed_out:
                raise Unavailable("the sandbox could not start: its set-up timed out")
            detail = status.get("error") or _tail(stderr, 500) or f"code {returncode}"
            raise Unavailable(f"the sandbox could not start: {detail}")
        network: NetworkIsolation = status["network"]
        global _warned_no_namespace
        wanted = self.settings.network == "namespace"
        if wanted and network != "namespace" and not _warned_no_namespace:
            _warned_no_namespace = True
            log.warning(
                "sandbox: network namespaces are unavailable here; "
                "sockets are refused by audit hooks (and Landlock, if present) only"
            )
        return _Outcome(
            returncode=returncode,
            timed_out=timed_out,
            stdout=stdout,
            stderr=stderr,
            network=network,
            layers=tuple(status.get("layers", ())),
        )


class _Capture:
    """Keeps the head and the tail of a stream, at most ``limit`` characters in all.

    The pipe is drained to the end whatever the volume, so the writer never blocks
    and memory stays bounded.
    """

    def __init__(self, limit: int) -> None:
        budget = max(limit - len(_CUT_MARK.format(10**12)), 2)
        self._limit = limit
        self._head_max = budget // 2
        self._tail_max = budget - self._head_max
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        self._total += len(chunk)
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
        kept = len(self._head) + len(self._tail)
        if kept == self._total:
            return (self._head + self._tail).decode("utf-8", "replace")
        head = self._head.decode("utf-8", "replace")
        tail = self._tail.decode("utf-8", "replace")
        return head + _CUT_MARK.format(self._total - kept) + tail


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
            configured,
            "-I",
            "-S",
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


def _unsearchable_ancestor(path: Path) -> Path | None:
    """The topmost ancestor of ``path`` that other users cannot enter (e.g. a 0700 home)."""
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return parent
    return None


def _environment(scratch: Path) -> dict[str, str]:
    """The whole environment of the sandboxed process: nothing from the daemon's."""
    home = str(scratch)
    return {
        "PATH": "/usr/bin:/bin",
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


def _remove_tree(path: Path) -> None:
    """Remove the scratch directory, even parts the code made unreadable to its owner.

    Runs after every process of the run is dead, so nothing changes underneath.
    """
    if os.geteuid() != 0:  # root needs no permission; others first restore their own
        with contextlib.suppress(OSError):
            path.chmod(stat.S_IRWXU)
        for dirpath, dirnames, _files in os.walk(path):
            for name in dirnames:
                child = os.path.join(dirpath, name)
                if not os.path.islink(child):
                    with contextlib.suppress(OSError):
                        os.chmod(child, stat.S_IRWXU)

    def report(_func: Any, target: str, _exc: Any) -> None:
        log.warning("sandbox: could not remove %s", target)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=report)  # pragma: no cover - 3.12+
    else:
        shutil.rmtree(path, onerror=report)


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


# --- code that runs in the child --------------------------------------------------
#
# The two functions below are not called in the daemon: their source is sent to
# fresh interpreters with ``-c``. They import what they use and touch no module
# globals.


@functools.cache
def _launcher_source() -> str:
    return "\n".join(
        [
            "from __future__ import annotations",
            inspect.getsource(_launch),
            "_launch()",
        ]
    )


@functools.cache
def _bootstrap_source() -> str:
    return "\n".join(
        [
            "from __future__ import annotations",
            inspect.getsource(_bootstrap),
            "_bootstrap()",
        ]
    )


def _launch() -> None:  # pragma: no cover - runs in the launcher process
    """Set up the kernel layers, then exec the target interpreter with the bootstrap.

    Runs as ``python -I -S -c`` in a fresh single-threaded process, in the
    scratch directory. Reports on the status fd (close-on-exec, so a successful
    exec closes it): ``{"network": ..., "layers": [...]}`` just before exec,
    ``{"error": ...}`` if anything fails — the code then never runs.
    """
    import ctypes
    import json
    import os
    import resource
    import sys

    cfg = json.loads(sys.argv[1])
    status_fd: int = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    layers: list[str] = []

    def report(**fields: object) -> None:
        os.write(status_fd, json.dumps(fields).encode() + b"\n")

    def fail(message: str) -> NoReturn:
        report(error=message)
        os._exit(125)

    def check(rc: int, what: str) -> None:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    clone_newns, clone_newuser, clone_newnet = 0x00020000, 0x10000000, 0x40000000
    ms_rdonly, ms_nosuid, ms_nodev, ms_remount = 1, 2, 4, 32
    ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18

    def namespaces(uid: int | None, want_net: bool, binds: list[list[Any]]) -> str:
        """Enter new namespaces; return the network isolation obtained."""
        if uid is not None:  # root: no user namespace needed
            base = clone_newns if binds else 0
            if want_net and libc.unshare(base | clone_newnet) == 0:
                layers.append("netns")
                if base:
                    layers.append("mountns")
                return "namespace"
            if base:
                check(libc.unshare(base), "unshare(CLONE_NEWNS)")
                layers.append("mountns")
            return "python-hook"
        if not want_net:
            return "python-hook"
        real_uid, real_gid = os.getuid(), os.getgid()
        if libc.unshare(clone_newuser | clone_newnet) != 0:
            return "python-hook"
        # Map our own ids, so the code keeps its ordinary, capability-less identity.
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{real_uid} {real_uid} 1"),
            ("gid_map", f"{real_gid} {real_gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        layers.extend(["userns", "netns"])
        return "namespace"

    def reach(binds: list[list[Any]]) -> None:
        """Make paths under private directories (a 0700 home) reachable by the run's uid.

        A tmpfs hides each blocking directory in this mount namespace only; the
        needed paths are bind-mounted back at their own place (read-only, except
        the scratch directory), so nothing else of that directory is visible.
        """
        check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make / private")
        fds = [(os.open(p, os.O_PATH | os.O_DIRECTORY), p, w) for p, _b, w in binds]
        os.umask(0o022)
        for blocker in dict.fromkeys(b for _p, b, _w in binds):
            opts = b"mode=0755,size=1m"
            check(
                libc.mount(b"tmpfs", blocker.encode(), b"tmpfs", ms_nosuid | ms_nodev, opts),
                blocker,
            )
        for fd, path, writable in fds:
            os.makedirs(path, exist_ok=True)
            check(
                libc.mount(
                    f"/proc/self/fd/{fd}".encode(), path.encode(), None, ms_bind | ms_rec, None
                ),
                path,
            )
            if not writable:
                flags = ms_bind | ms_remount | ms_rdonly
                check(libc.mount(None, path.encode(), None, flags, None), f"read-only {path}")
            os.close(fd)

    def landlock(scratch: str, want_net: bool) -> None:
        """Writes only beneath the scratch dir; no TCP; no signals out (as the ABI allows)."""

        def syscall(*args: int | None) -> int:
            return int(libc.syscall(*[ctypes.c_long(a or 0) for a in args]))

        create, add_rule, restrict = 444, 445, 446
        abi = syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
        if abi < 1:
            return
        write_file, remove_dir, remove_file = 1 << 1, 1 << 4, 1 << 5
        make = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
        refer, truncate = 1 << 13, 1 << 14
        handled = write_file | remove_dir | remove_file | make
        file_rights = write_file
        if abi >= 2:
            handled |= refer
        if abi >= 3:
            handled |= truncate
            file_rights |= truncate

        class RulesetAttr(ctypes.Structure):
            _fields_ = [
                ("fs", ctypes.c_uint64),
                ("net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64),
            ]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        attr = RulesetAttr(fs=handled)
        size = 8
        if abi >= 4 and want_net:
            attr.net = (1 << 0) | (1 << 1)  # bind_tcp, connect_tcp: no rule allows either
            size = 16
        if abi >= 6:
            attr.scoped = (1 << 0) | (1 << 1)  # abstract unix sockets, signals
            size = 24
        ruleset = syscall(create, ctypes.addressof(attr), size, 0)
        check(ruleset, "landlock_create_ruleset")
        for path, rights in ((scratch, handled), ("/dev/null", file_rights)):
            fd = os.open(path, os.O_PATH)
            rule = PathBeneath(allowed=rights, parent_fd=fd)
            check(syscall(add_rule, ruleset, 1, ctypes.addressof(rule), 0), f"landlock {path}")
            os.close(fd)
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
        check(syscall(restrict, ruleset, 0), "landlock_restrict_self")
        os.close(ruleset)
        layers.append("landlock-fs")
        if attr.net:
            layers.append("landlock-net")
        if attr.scoped:
            layers.append("landlock-scope")

    def limit(res: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        _cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(res, (soft, hard))

    try:
        uid: int | None = cfg["uid"]
        network = namespaces(uid, cfg["network"], cfg["binds"])
        if cfg["binds"]:
            reach(cfg["binds"])
        os.chdir(cfg["scratch"])
        landlock(cfg["scratch"], cfg["network"])
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            layers.append("uid")
        lim = cfg["limits"]
        limit(resource.RLIMIT_CORE, 0)
        limit(resource.RLIMIT_NOFILE, lim["nofile"])
        limit(resource.RLIMIT_FSIZE, lim["fsize"])
        limit(resource.RLIMIT_NPROC, lim["nproc"])
        limit(resource.RLIMIT_CPU, lim["cpu"], lim["cpu"] + 1)
        limit(resource.RLIMIT_AS, lim["as"])
        layers.append("rlimits")
    except OSError as exc:
        fail(f"set-up failed: {exc}")
    report(network=network, layers=layers)
    argv: list[str] = cfg["argv"]
    try:
        os.execve(argv[0], argv, cfg["env"])
    except OSError as exc:
        fail(f"cannot run {argv[0]}: {exc.strerror}")


def _bootstrap() -> None:  # pragma: no cover - runs in the sandboxed interpreter
    """Install the audit hooks, then run ``main.py`` as ``__main__``.

    Runs with ``-c`` in the target interpreter, after the kernel layers are in
    place. The hook closes over private copies of the functions it uses, and the
    only reference to it is the interpreter's hook list (``gc`` inspection is
    refused), so the code cannot reach it to change its mind.
    """
    import builtins
    import json
    import os
    import sys
    import traceback
    import types

    cfg = json.loads(sys.argv[1])

    def install(scratch: str) -> None:
        lstat, readlink, getcwd, getpid = os.lstat, os.readlink, os.getcwd, os.getpid
        fspath, fsdecode = os.fspath, os.fsdecode
        is_link = __import__("stat").S_ISLNK
        pid = getpid()
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        devices = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
        processes = "starting processes"
        network = "network access"
        # event -> what it does, for the refusal message
        refused = {
            "os.fork": processes,
            "os.forkpty": processes,
            "os.exec": processes,
            "os.posix_spawn": processes,
            "os.spawn": processes,
            "os.system": processes,
            "os.startfile": processes,
            "subprocess.Popen": processes,
            "pty.spawn": processes,
            "webbrowser.open": processes,
            "os.killpg": "signalling other processes",
            "socket.bind": network,
            "socket.connect": network,
            "socket.sendto": network,
            "socket.sendmsg": network,
            "socket.getaddrinfo": network,
            "socket.gethostbyname": network,
            "socket.gethostbyname_ex": network,
            "socket.gethostbyaddr": network,
            "socket.getnameinfo": network,
            "socket.sethostname": network,
            "resource.setrlimit": "changing resource limits",
            "resource.prlimit": "changing resource limits",
            "gc.get_objects": "inspecting the interpreter's objects",
            "gc.get_referrers": "inspecting the interpreter's objects",
            "gc.get_referents": "inspecting the interpreter's objects",
        }
        # event -> positions of (path, dir_fd) pairs it writes to
        writes: dict[str, tuple[tuple[int, int | None], ...]] = {
            "os.mkdir": ((0, 2),),
            "os.rmdir": ((0, 1),),
            "os.remove": ((0, 1),),
            "os.rename": ((0, 2), (1, 3)),
            "os.link": ((0, 2), (1, 3)),
            "os.symlink": ((1, 2),),
            "os.truncate": ((0, None),),
            "os.chmod": ((0, 2),),
            "os.chown": ((0, 3),),
            "os.utime": ((0, 3),),
            "os.chflags": ((0, None),),
            "os.setxattr": ((0, None),),
            "os.removexattr": ((0, None),),
        }

        def resolve(path: str, depth: int = 0) -> str:
            """Like os.path.realpath, on private copies of the primitives."""
            if not path.startswith("/"):
                path = getcwd() + "/" + path
            out = ""
            for part in path.split("/"):
                if part in ("", "."):
                    continue
                if part == "..":
                    out = out.rsplit("/", 1)[0]
                    continue
                candidate = out + "/" + part
                try:
                    link = is_link(lstat(candidate).st_mode)
                except OSError:
                    link = False
                if link and depth < 40:
                    target = readlink(candidate)
                    out = resolve(
                        target if target.startswith("/") else out + "/" + target, depth + 1
                    )
                else:
                    out = candidate
            return out or "/"

        root = resolve(scratch)

        def allowed(target: Any, dir_fd: object = None) -> bool:
            if isinstance(target, int):
                return True  # an fd already open
            path = fsdecode(fspath(target))
            if isinstance(dir_fd, int) and dir_fd >= 0 and not path.startswith("/"):
                path = readlink(f"/proc/self/fd/{dir_fd}") + "/" + path
            real = resolve(path)
            return real == root or real.startswith(root + "/") or path in devices

        def refuse(what: str, event: str) -> NoReturn:
            raise PermissionError(f"sandbox: {what} is not allowed ({event})")

        def hook(event: str, args: tuple[Any, ...]) -> None:
            if event in refused:
                refuse(refused[event], event)
            if event.startswith("ctypes."):
                refuse("ctypes", event)
            if event == "open":
                target, mode, flags = args
                writing = bool(flags & write_flags) or any(c in (mode or "") for c in "wax+")
                if writing and not allowed(target):
                    refuse(f"writing {target!r} outside the scratch directory", event)
            elif event in writes:
                for at, fd_at in writes[event]:
                    if not allowed(args[at], args[fd_at] if fd_at is not None else None):
                        refuse(f"changing {args[at]!r} outside the scratch directory", event)
            elif event == "socket.__new__":
                if args[1] != 1:  # AF_UNIX only (socketpair, asyncio's self-pipe)
                    refuse(network, event)
            elif event == "os.kill":
                if args[0] != pid:
                    refuse("signalling other processes", event)
            elif event == "sqlite3.connect":
                db = args[0]
                if isinstance(db, str) and db.startswith("file:"):
                    db = db[5:].split("?", 1)[0]
                if db not in (":memory:", "", b"", b":memory:") and not allowed(db):
                    refuse(f"a database at {args[0]!r} outside the scratch directory", event)

        sys.addaudithook(hook)

    if cfg["hooks"]:
        install(cfg["scratch"])
    del install

    with open(cfg["main"], encoding="utf-8") as f:
        source = f.read()
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=cfg["main"], __builtins__=builtins)
    sys.modules["__main__"] = main
    sys.argv[:] = [cfg["main"]]

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        # Drop the bootstrap's and the hook's frames ("<string>"): noise to a model.
        report = traceback.TracebackException(kind, exc, tb)
        pending, seen = [report], set()
        while pending:
            te = pending.pop()
            if id(te) in seen:
                continue
            seen.add(id(te))
            kept = [frame for frame in te.stack if frame.filename != "<string>"]
            te.stack = traceback.StackSummary.from_list(kept)
            pending.extend(t for t in (te.__cause__, te.__context__) if t is not None)
            pending.extend(getattr(te, "exceptions", None) or ())
        sys.stderr.write("".join(report.format()))

    sys.excepthook = excepthook
    exec(compile(source, cfg["main"], "exec", dont_inherit=True), main.__dict__)
