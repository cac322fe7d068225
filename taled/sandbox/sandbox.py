"""The done-gate sandbox: run a model's Python code in a separate, fenced-in process.

A result's code is hostile input: it can loop forever, eat memory, fork, write
where it should not, phone home, read the user's secrets or talk to the daemon
over its socket. The daemon never imports or execs it. The boundary is the
kernel, in layers, failing closed (``Unavailable`` when a layer cannot be built,
never a run without it):

* namespaces — user (unless root), mount, PID, IPC, UTS, network — made by
  bubblewrap when installed, by ``taled/sandbox/child.py`` otherwise;
* a minimal root: the runtime read-only, the scratch directory read-write, a
  private /tmp, a minimal /dev, the run's own /proc; no home, no runtime dir, no
  data dir — nothing of the daemon's;
* Landlock over reads and writes, TCP and signal/abstract-socket scopes;
* a transient unprivileged uid when the daemon is root;
* rlimits (CPU, address space, file size, processes, no core dumps, few fds) and
  a wall clock that kills the process group;
* a seccomp filter denying the syscalls escapes need.

Python audit hooks (``taled/sandbox/bootstrap.py``) run on top as a tripwire that
refuses early with a message a model can act on; they are not the boundary.
``docs/sandbox.md`` has the threat model, every layer, and the escapes tested.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from taled.errors import Unavailable

if TYPE_CHECKING:
    from taled.settings import SandboxSettings

__all__ = ["NetworkIsolation", "SandboxResult", "remove_leftovers", "run_python"]

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
            # The run's own files: the daemon's umask (0077) would keep them from it.
            for path in (scratch, scratch / _MAIN):
                os.chown(path, uid, uid)
        isolation, bwrap = _isolation(settings)
        run = _Run(
            settings=settings,
            scratch=scratch,
            uid=uid,
            python=await _interpreter(settings.python),
            audit_hooks=audit_hooks,
            isolation=isolation,
            bwrap=bwrap,
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
    isolation: Isolation
    bwrap: str
    """bubblewrap's path when ``isolation`` is ``bwrap``."""

    async def execute(self, stdin: str) -> _Outcome:
        env = _environment(self.scratch)
        status_r, status_w = os.pipe()
        try:
            config = self._launcher_config(status_w, env)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(config),
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
        args += ["-c", _child_source("bootstrap.py"), json.dumps(bootstrap)]
        runtime = _runtime_paths(self.python)
        mounts = _mounts(runtime, self.scratch, s)
        nproc = s.max_processes
        if nproc > 1 and self.uid is None:
            # Without a uid of its own the run's helpers (launcher, PID 1) count too.
            nproc += _HELPER_PROCESSES
        return {
            "status_fd": status_fd,
            "isolation": self.isolation,
            "given_layers": (
                _bwrap_layers(self.uid is not None, s.network == "namespace")
                if self.isolation == "bwrap"
                else []
            ),
            "scratch": str(self.scratch),
            "uid": self.uid,
            "unshare_net": s.network == "namespace",
            "mounts": [m.as_json() for m in mounts],
            "landlock": {
                "read": [m.dst for m in mounts if m.kind == "ro"],
                "proc": ["/proc"],
                "write": [str(self.scratch), "/tmp"],
                "device": [f"/dev/{name}" for name in _DEVICES],
            },
            "argv": args,
            "env": env,
            "limits": {
                "cpu": s.cpu_seconds,
                "as": s.memory_mb * _MIB,
                "fsize": s.max_file_mb * _MIB,
                "nproc": nproc,
                "nofile": _MAX_OPEN_FILES,
            },
        }

    def _command(self, config: dict[str, Any]) -> list[str]:
        """The launcher's argv: the child script, behind bubblewrap when that isolates."""
        # The real binary, not a venv's symlink to it: the venv is not in the sandbox's
        # root, the interpreter's own installation is.
        launcher = os.path.realpath(sys.executable)
        script = [launcher, "-I", "-S", "-B", "-c", _child_source("child.py")]
        script.append(json.dumps(config))
        if self.isolation == "builtin":
            return script
        mounts = [_Mount(**m) for m in config["mounts"]]
        return [*_bwrap_args(self.bwrap, mounts, config), "--", *script]

    def _outcome(
        self,
        proc: asyncio.subprocess.Process,
        timed_out: bool,
        status: dict[str, Any],
        stdout: str,
        stderr: str,
    ) -> _Outcome:
        returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        # How the code ended, as its supervisor saw it (the launcher's own status is
        # only a fallback: bubblewrap and a PID namespace fold a signal into 128+N).
        if "signal" in status:
            returncode = -int(status["signal"])
        elif "exit" in status:
            returncode = int(status["exit"])
        if "error" in status or "network" not in status:
            if timed_out:
                raise Unavailable("the sandbox could not start: its set-up timed out")
            detail = status.get("error") or _tail(stderr, 500) or f"code {returncode}"
            raise Unavailable(f"the sandbox could not start: {detail}")
        network: NetworkIsolation = status["network"]
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


def _runtime_paths(python: _Interpreter) -> list[_Mount]:
    """The read-only runtime: system directories, the interpreter, two files of /etc."""
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
    return mounts


def _mounts(runtime: list[_Mount], scratch: Path, settings: SandboxSettings) -> list[_Mount]:
    """The whole root, parents before what is mounted beneath them."""
    mounts = [
        *runtime,
        _Mount("dev", "/dev"),
        _Mount("proc", "/proc"),
        _Mount("tmpfs", "/tmp", size=f"{settings.tmp_mb}m"),
        _Mount("rw", str(scratch), str(scratch)),
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
    return [*args, "--remount-ro", "/", "--chdir", config["scratch"]]


@functools.cache
def _child_source(name: str) -> str:
    """The text of a stdlib-only script beside this module, sent to a child with ``-c``."""
    return Path(__file__).with_name(name).read_text(encoding="utf-8")


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


def remove_leftovers(scratch_root: Path) -> int:
    """Remove the scratch directories a killed daemon left under ``scratch_root``
    (however deep their code nested them); return how many there were."""
    found = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(scratch_root) as entries:
        for entry in list(entries):
            if entry.name.startswith("tale-sandbox-") and entry.is_dir(follow_symlinks=False):
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
