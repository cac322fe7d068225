"""The sandbox's child side: build the fence, then exec the interpreter that runs the code.

This file is not imported by the daemon to be run: its text is sent to a fresh
``python -I -S -B -c`` process (standard library only, no ``taled`` on its path),
with one JSON argument from ``taled.sandbox.sandbox``. Its stages, in the order they run:

``isolate`` (the built-in path; bubblewrap does the same when installed)
    the launcher dies with the daemon (``PR_SET_PDEATHSIG``, as bubblewrap's
    ``--die-with-parent``); new user (unless root), mount, PID, IPC, UTS and
    network namespaces; a fresh root on a tmpfs holding only the read-only
    runtime, the read-write scratch directory (and a command's workspace), a
    private ``/tmp``, a minimal ``/dev`` and the namespace's own ``/proc``;
    ``pivot_root`` into it and detach the old root. Nothing else of the host
    (``$HOME``, the runtime dir with the daemon's socket, the data dir) exists in
    that mount namespace.
``supervise``
    forks the process that runs the code and waits for it, reporting its exit
    status (or signal) on the status pipe. In the built-in path it is PID 1 of
    the new PID namespace, so every process of the run dies with it.
``confine`` (in the process that becomes the code)
    no_new_privs; Landlock over reads as well as writes (ABI >= 1), TCP
    (ABI >= 4) and signals/abstract sockets (ABI >= 6); a transient uid when the
    daemon is root; rlimits; a seccomp filter denying the syscalls a sandbox
    escape needs (ptrace, process_vm_*, keyctl, mount and namespace calls,
    bpf, io_uring, setsid ...); then ``execve`` of the target interpreter (or of
    ``/bin/sh`` for a command).

Every step that fails reports ``{"error": ...}`` on the status pipe and exits
125: the code never runs with a layer missing by accident.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any, NoReturn

__all__ = ["main"]

# The status pipe; set by main() before any stage runs.
_status_fd = -1
_layers: list[str] = []

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEWCGROUP, CLONE_NEWTIME = 0x02000000, 0x00000080
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
SECCOMP_MODE_FILTER = 2

# statvfs flags -> the mount flags a remount must keep (locked in a user namespace).
_KEPT_FLAGS = {
    os.ST_RDONLY: MS_RDONLY,
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}


def _report(**fields: object) -> None:
    os.write(_status_fd, json.dumps(fields).encode() + b"\n")


def _fail(message: str) -> NoReturn:
    _report(error=message)
    os._exit(125)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    rc = _libc.mount(
        src.encode() if src else None,
        dst.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(rc, f"mount {dst}")


# --- isolate: namespaces and a minimal root (the built-in path) ------------------------


def isolate(cfg: dict[str, Any]) -> None:
    """Enter new namespaces and a minimal root; return in PID 1 of the new PID namespace."""
    root = cfg["uid"] is not None
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg["unshare_net"]:
        flags |= CLONE_NEWNET
    if not root:
        flags |= CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        hint = (
            " (unprivileged user namespaces are disabled: allow them, e.g. "
            "sysctl kernel.unprivileged_userns_clone=1, or install bubblewrap)"
            if not root
            else ""
        )
        _fail(f"cannot create the sandbox's namespaces: {os.strerror(err)}{hint}")
    if not root:
        # Map our own ids, so the code keeps its ordinary, capability-less identity.
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        _layers.append("userns")
    _layers.extend(["mountns", "pidns", "ipcns"])
    if cfg["unshare_net"]:
        _layers.append("netns")
    pid = os.fork()
    if pid:
        _relay(pid)
    # PID 1 of the new namespace: die with the launcher (the daemon kills its group).
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    _build_root(cfg["mounts"])
    _layers.append("minimal-root")


def _relay(pid: int) -> NoReturn:
    """The launcher, outside the PID namespace: wait for its PID 1 and exit as it did."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def _build_root(mounts: list[dict[str, str]]) -> None:
    """Make a tmpfs root holding only ``mounts``, then pivot into it (old root detached)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    # Sources are opened before anything is covered: a scratch dir under /tmp stays
    # reachable through its descriptor after the new root's tmpfs hides /tmp.
    sources = {
        i: os.open(m["src"], os.O_PATH | os.O_CLOEXEC)
        for i, m in enumerate(mounts)
        if m["kind"] in ("ro", "rw")
    }
    dev_sources = {
        name: os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
        for name in ("null", "zero", "full", "random", "urandom")
    }
    new = "/tmp"
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    os.umask(0o022)
    for i, m in enumerate(mounts):
        dst = new + m["dst"]
        kind = m["kind"]
        if kind in ("ro", "rw"):
            _bind(f"/proc/self/fd/{sources[i]}", dst, readonly=kind == "ro")
        elif kind == "tmpfs":
            os.makedirs(dst, exist_ok=True)
            size = m.get("size", "16m")
            _mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={size}")
        elif kind == "dev":
            os.makedirs(dst, exist_ok=True)
            _mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
            for name, fd in dev_sources.items():
                _bind(f"/proc/self/fd/{fd}", f"{dst}/{name}", readonly=False, device=True)
            for name, target in (
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
            ):
                os.symlink(target, f"{dst}/{name}")
        elif kind == "proc":
            os.makedirs(dst, exist_ok=True)
            _mount("proc", dst, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        elif kind == "symlink":
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(m["src"], dst)
    for fd in [*sources.values(), *dev_sources.values()]:
        os.close(fd)
    # The root itself read-only: the code creates nothing outside scratch and /tmp.
    _mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(new)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    # the new root alone, with no directory needed to hold the old one.
    _check(int(_libc.syscall(_PIVOT_ROOT[_arch()], b".", b".")), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _bind(src: str, dst: str, *, readonly: bool, device: bool = False) -> None:
    """Bind ``src`` at ``dst``, nosuid, and nodev unless it is one of /dev's few devices
    (on a nodev mount even /dev/null cannot be opened)."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
    _mount(src, dst, None, MS_BIND | MS_REC, None)
    kept = os.statvfs(dst).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if device else MS_NODEV)
    for st_flag, ms_flag in _KEPT_FLAGS.items():
        if kept & st_flag:
            flags |= ms_flag
    if readonly:
        flags |= MS_RDONLY
    _mount(None, dst, None, flags, None)


def _die_with(parent: int) -> None:
    """The launcher (the daemon's child) gets SIGKILL when the daemon dies, even by
    SIGKILL; its PID 1 dies with it, and every process of the run with that."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent:
        _fail("the daemon is gone")  # it died before the line above took effect


# --- supervise: PID 1 (or bubblewrap's child) waits for the code ------------------------


def supervise(cfg: dict[str, Any]) -> NoReturn:
    """Fork the process that runs the code; report how it ended; exit the same way."""
    child = os.fork()
    if child == 0:
        confine(cfg)
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        _report(signal=os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    _report(exit=code)
    os._exit(code)


# --- confine: the process that becomes the code -------------------------------------------


def confine(cfg: dict[str, Any]) -> NoReturn:
    """Landlock, uid, rlimits and seccomp on this process, then exec the interpreter."""
    try:
        os.chdir(cfg["cwd"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _landlock(cfg["landlock"], cfg["unshare_net"])
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            _layers.append("uid")
        lim = cfg["limits"]
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NOFILE, lim["nofile"])
        _limit(resource.RLIMIT_FSIZE, lim["fsize"])
        _limit(resource.RLIMIT_NPROC, lim["nproc"])
        _limit(resource.RLIMIT_CPU, lim["cpu"], lim["cpu"] + 1)
        _limit(resource.RLIMIT_AS, lim["as"])
        _layers.append("rlimits")
        _seccomp()
    except OSError as exc:
        _fail(f"set-up failed: {exc}")
    _report(network="namespace" if cfg["unshare_net"] else "python-hook", layers=_layers)
    argv: list[str] = cfg["argv"]
    # This interpreter ignores SIGPIPE and SIGXFSZ, and exec keeps what is ignored:
    # restore them, so `yes | head` ends quietly and a file past the limit is SIGXFSZ.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execve(argv[0], argv, cfg["env"])
    except OSError as exc:
        _fail(f"cannot run {argv[0]}: {exc.strerror}")


def _limit(res: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _cur_soft, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


# Landlock access rights (include/uapi/linux/landlock.h).
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 1 << 1, 1 << 2, 1 << 3
_LL_REMOVE_DIR, _LL_REMOVE_FILE = 1 << 4, 1 << 5
_LL_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_LL_FILE_ONLY = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV


def _landlock(rules: dict[str, list[str]], deny_tcp: bool) -> None:
    """Reads only beneath the runtime; writes only beneath scratch (and a command's
    workspace) and /tmp; no TCP; no signals or abstract sockets out of the sandbox (each
    as far as the kernel's ABI goes)."""

    def syscall(*args: int | None) -> int:
        return int(_libc.syscall(*[ctypes.c_long(a or 0) for a in args]))

    create, add_rule, restrict = 444, 445, 446
    abi = syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise OSError(0, "Landlock is not available in this kernel")
    handled = (_LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_READ_DIR) | (
        _LL_REMOVE_DIR | _LL_REMOVE_FILE | _LL_MAKE
    )
    if abi >= 2:
        handled |= _LL_REFER
    if abi >= 3:
        handled |= _LL_TRUNCATE
    if abi >= 5:
        handled |= _LL_IOCTL_DEV
    read = _LL_READ_FILE | _LL_READ_DIR
    grants = {
        "read": (read | _LL_EXECUTE) & handled,
        "proc": read,
        "write": handled,
        "device": (_LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV) & handled,
    }

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
    if abi >= 4 and deny_tcp:
        attr.net = (1 << 0) | (1 << 1)  # bind_tcp, connect_tcp: no rule allows either
        size = 16
    if abi >= 6:
        attr.scoped = (1 << 0) | (1 << 1)  # abstract unix sockets, signals
        size = 24
    ruleset = syscall(create, ctypes.addressof(attr), size, 0)
    _check(ruleset, "landlock_create_ruleset")
    for kind, paths in rules.items():
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # e.g. no /proc: nothing to allow
            allowed = grants[kind]
            if not os.path.isdir(path):
                allowed &= _LL_FILE_ONLY
            rule = PathBeneath(allowed=allowed, parent_fd=fd)
            _check(syscall(add_rule, ruleset, 1, ctypes.addressof(rule), 0), f"landlock {path}")
            os.close(fd)
    _check(syscall(restrict, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    _layers.append("landlock-fs")
    if attr.net:
        _layers.append("landlock-net")
    if attr.scoped:
        _layers.append("landlock-scope")


# --- seccomp ------------------------------------------------------------------------------

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# Syscalls no gated program needs and every escape through the kernel does: tracing and
# reading other processes, the kernel keyring, mounts and namespaces, loading code into
# the kernel (modules, bpf), io_uring (its operations bypass seccomp), leaving the
# process group (the daemon kills the run by group), and changing the machine.
_DENIED: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "unshare": 272,
        "setns": 308,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "setsid": 112,
        "setpgid": 109,
        "personality": 135,
        "acct": 163,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        "syslog": 103,
        "quotactl": 179,
        "kcmp": 312,
        "vhangup": 153,
        "iopl": 172,
        "ioperm": 173,
        "settimeofday": 164,
        "clock_settime": 227,
        "adjtimex": 159,
        "clock_adjtime": 305,
        "sethostname": 170,
        "setdomainname": 171,
        "lookup_dcookie": 212,
        "uselib": 134,
        "fanotify_init": 300,
    },
    "aarch64": {
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "unshare": 97,
        "setns": 268,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "setsid": 157,
        "setpgid": 154,
        "personality": 92,
        "acct": 89,
        "swapon": 224,
        "swapoff": 225,
        "reboot": 142,
        "syslog": 116,
        "quotactl": 60,
        "kcmp": 272,
        "vhangup": 58,
        "settimeofday": 170,
        "clock_settime": 112,
        "adjtimex": 171,
        "clock_adjtime": 266,
        "sethostname": 161,
        "setdomainname": 162,
        "lookup_dcookie": 18,
        "fanotify_init": 262,
    },
}
# Numbered alike on every architecture (the unified table from 403 on).
_DENIED_COMMON = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_NS_FLAGS = (
    CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
) | (CLONE_NEWCGROUP | CLONE_NEWTIME)
_EPERM, _ENOSYS = 1, 38


def _arch() -> str:
    machine = os.uname().machine
    if machine not in _AUDIT_ARCH:
        raise OSError(0, f"the sandbox has no seccomp filter for {machine}")
    return machine


def _seccomp() -> None:
    """Install the deny-list filter (the process already has no_new_privs)."""
    arch = _arch()
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def errno(value: int) -> int:
        return 0x00050000 | value

    prog: list[tuple[int, int, int, int]] = [
        (ld_w_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH[arch]),
        (ret, 0, 0, kill),  # another ABI (e.g. int 0x80 on x86_64): not ours to allow
        (ld_w_abs, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, errno(_EPERM))]  # the x32 ABI
    for nr in sorted({*_DENIED[arch].values(), *_DENIED_COMMON.values()}):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, errno(_EPERM))]
    # clone3 passes its flags in memory seccomp cannot read: ENOSYS makes libc use clone.
    prog += [(jeq, 0, 1, _CLONE3), (ret, 0, 0, errno(_ENOSYS))]
    prog += [
        (jeq, 0, 4, _CLONE[arch]),
        (ld_w_abs, 0, 0, 16),  # args[0] (the flags), low 32 bits
        (jset, 0, 1, _NS_FLAGS),
        (ret, 0, 0, errno(_EPERM)),
        (ret, 0, 0, allow),
        (ret, 0, 0, allow),
    ]

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*insn) for insn in prog])
    fprog = SockFprog(len(prog), filters)
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "seccomp",
    )
    _layers.append("seccomp")


# --- entry --------------------------------------------------------------------------------


def main() -> NoReturn:
    global _status_fd
    cfg = json.loads(sys.argv[1])
    _status_fd = cfg["status_fd"]
    os.set_inheritable(_status_fd, False)
    _layers.extend(cfg["given_layers"])
    try:
        if cfg["isolation"] == "builtin":
            _die_with(cfg["parent"])
        _arch()
        if cfg["isolation"] == "builtin":
            isolate(cfg)
    except OSError as exc:
        _fail(f"set-up failed: {exc}")
    supervise(cfg)


if __name__ == "__main__":
    main()
