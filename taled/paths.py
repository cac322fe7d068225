"""Where tale keeps its socket, data and config (XDG base directories).

The data and config directories are platformdirs' (``$XDG_DATA_HOME/tale``,
``$XDG_CONFIG_HOME/tale``; a relative variable is ignored, as the XDG spec says, and
so is a relative ``HOME``). The runtime directory keeps tale's own rule: platformdirs
falls back to ``/tmp/runtime-$UID`` (and warns) where tale's clients look for
``/tmp/tale-$UID``, and a socket path must not change under a running daemon.

``tale_client/paths.py`` is a standard-library copy of these rules for the thin
client (platformdirs costs it an import); ``tests/test_paths.py`` pins the two
equal, and this module to platformdirs. ``secure_data_dir`` is the daemon's alone:
it repairs the permissions of what is already on disk.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from platformdirs import PlatformDirs

from taled.text import count

__all__ = [
    "PathError",
    "config_file",
    "data_dir",
    "lock_file",
    "log_file",
    "runtime_dir",
    "secure_data_dir",
    "socket_path",
]

log = logging.getLogger(__name__)


# Where systemd-logind makes each logged-in user's runtime directory (XDG_RUNTIME_DIR).
_SYSTEMD_RUNTIME_ROOT = "/run/user"


class PathError(ValueError):
    """An environment variable names a path tale cannot use; the message says which."""


def _dirs() -> PlatformDirs:
    # Built per call: platformdirs reads the environment when a property is read, and
    # tests (and `tale` itself) change XDG_* between calls. Never creates anything.
    return PlatformDirs("tale", appauthor=False, ensure_exists=False)


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
    return _dirs().user_data_path


def config_file() -> Path:
    """The user's config file, layered over the defaults."""
    return _dirs().user_config_path / "taled.toml"


def log_file() -> Path:
    """Where an auto-started daemon writes its log."""
    return data_dir() / "taled.log"


def secure_data_dir(root: Path | None = None) -> int:
    """Make the data directory private, whatever the umask was when it was written.

    Creates it if missing. The directory and every directory under it become 0700;
    every file loses its group and other bits (so 0644 becomes 0600, and a git
    object written read-only stays read-only, 0400). Symbolic links are left alone
    and never followed: chmod would change their target, which may live anywhere.
    Returns how many entries were changed.
    """
    root = root if root is not None else data_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    changed = 0
    # The root itself may be a symlink the user made (data moved to another disk):
    # its target is what they want private.
    if stat.S_IMODE(root.stat().st_mode) != 0o700:
        root.chmod(0o700)
        changed += 1
    for top, dirs, files in os.walk(root):
        if top == str(root) and "scratch" in dirs:
            # Sandbox runs' own directories (the runner removes any left behind, however
            # deep: os.walk would recurse once per level of them). Only its top is ours.
            dirs.remove("scratch")
            files = [*files, "scratch"]
        for name in dirs + files:
            path = os.path.join(top, name)
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    continue
                private = 0o700 if stat.S_ISDIR(mode) else stat.S_IMODE(mode) & 0o700
                if stat.S_IMODE(mode) != private:
                    os.chmod(path, private)
                    changed += 1
            except FileNotFoundError:
                continue  # removed while we walked (a checkpoint repack, a scratch dir)
            except PermissionError:
                log.warning("cannot make %s private: it is not yours", path)
    if changed:
        made = count(changed, "file", "files")
        log.info("made %s under %s private to you (0700/0600)", made, root)
    return changed
