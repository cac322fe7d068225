"""The sandboxed interpreter's first code: install the audit hooks, then run ``main.py``.

Sent as text to the target interpreter with ``-c`` (after every kernel layer is in
place; see ``taled/sandbox/child.py``), with one JSON argument. The hooks are a
tripwire that refuses early with a message a model can act on; they are not the
boundary (a subinterpreter has none of them, native code ignores them): the
kernel layers are.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["main"]


def main() -> None:  # pragma: no cover - runs in the sandboxed interpreter
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
        subinterpreters = frozenset(
            ("_xxsubinterpreters", "_interpreters", "_xxinterpchannels", "_interpchannels")
        )
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
            out = ""
            if not path.startswith("/"):
                # The kernel's cwd has no symlinks in it: start there rather than walk it
                # again (a cwd thousands of directories deep made every write cost as many
                # lstat calls, and a deep mkdir chain quadratic time).
                out = getcwd().rstrip("/")
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
            if event == "import" and args[0] in subinterpreters:
                # A subinterpreter starts with no hooks: refused here as a tripwire,
                # and held by the kernel layers when this is got round.
                refuse("starting a subinterpreter", event)
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


if __name__ == "__main__":
    main()
