"""The client's copy of ``taled/paths.py``.

The thin client must not import the daemon's package, so the path rules live
twice; ``tests/test_paths.py`` pins the two copies equal.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

__all__ = [
    "PathError",
    "config_file",
    "data_dir",
    "lock_file",
    "log_file",
    "runtime_dir",
    "socket_path",
]


# Where systemd-logind makes each logged-in user's runtime directory (XDG_RUNTIME_DIR).
_SYSTEMD_RUNTIME_ROOT = "/run/user"


class PathError(ValueError):
    """An environment variable names a path tale cannot use; the message says which."""


def _xdg(var: str, fallback: Path) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative paths are invalid and must be ignored.
    return Path(value) if value and os.path.isabs(value) else fallback


def _home() -> Path:
    """``$HOME``, or the password database's home when it is unset or relative: a
    relative one would move the data directory with the working directory (the daemon's
    platformdirs does the same)."""
    value = os.environ.get("HOME", "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def runtime_dir() -> Path:
    """The private directory that holds the socket.

    ``$XDG_RUNTIME_DIR/tale``. When that is unset, as it is for an MCP server an
    editor launches with a minimal environment, the directory systemd makes for every
    login, ``/run/user/$UID/tale``, so the editor finds the daemon the shell started;
    ``/tmp/tale-$UID`` only where there is no such directory (no systemd, a container).
    """
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base):
        return Path(base) / "tale"
    uid = os.getuid()
    login = Path(_SYSTEMD_RUNTIME_ROOT) / str(uid)
    if _is_own_directory(login, uid):
        return login / "tale"
    return Path(f"/tmp/tale-{uid}")


def _is_own_directory(path: Path, uid: int) -> bool:
    """Whether ``path`` is a directory (not a link to one) that belongs to ``uid``."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid


def socket_path() -> Path:
    """The daemon's Unix socket: ``$TALE_SOCKET`` or ``<runtime dir>/taled.sock``."""
    override = os.environ.get("TALE_SOCKET", "")
    if override:
        if not os.path.isabs(override):
            # The daemon and its clients run in different directories: a relative
            # path would name a different socket for each of them.
            raise PathError(f"TALE_SOCKET={override!r} must be an absolute path")
        return Path(override)
    return runtime_dir() / "taled.sock"


def lock_file() -> Path:
    """The lock a running daemon holds, next to its socket."""
    sock = socket_path()
    return sock.with_name(sock.name + ".lock")


def data_dir() -> Path:
    """The SQLite store, checkpoint repo and daemon log live here."""
    return _xdg("XDG_DATA_HOME", _home() / ".local" / "share") / "tale"


def config_file() -> Path:
    """The user's config file, layered over the defaults."""
    return _xdg("XDG_CONFIG_HOME", _home() / ".config") / "tale" / "taled.toml"


def log_file() -> Path:
    """Where an auto-started daemon writes its log."""
    return data_dir() / "taled.log"
