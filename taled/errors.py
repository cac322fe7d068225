"""The daemon's one error tree.

Every error a client can see carries a JSON-RPC code and a message a person can
act on. ``taled/daemon/server.py`` converts them to protocol errors in one place.

    TaleError                      -32603  internal error
    ├── InvalidInput               -32602  bad arguments: nothing was written
    ├── NotFound                   -32001  no such task
    ├── IllegalTransition          -32002  the task's state does not allow that
    ├── Unavailable                -32003  the daemon is shutting down or a role is down
    │   └── RoleDown               -32003  a role's model is down and nothing serves it
    ├── ModelError                 -32010  a backend failed
    │   ├── ModelTimeout           -32011  a model call ran past its deadline
    │   ├── BackendDown            -32012  the backend is unreachable, crashed or hung
    │   └── ContextOverflow        -32013  the prompt does not fit the model's context
    ├── ConfigError                -32020  the configuration is invalid
    ├── DaemonError                -32030  start-up failed (bad socket path, ...)
    │   └── AlreadyRunning         -32031  another daemon owns the socket
    ├── PlanError                  -32040  no usable plan (a model's answer, a saved plan)
    ├── Damaged                    -32050  a data file is damaged: the message names it and
    │   │                                  says to run `tale doctor`
    │   ├── StoreDamaged           -32051  the SQLite database (start-up check or a query)
    │   └── CheckpointDamaged      -32052  a checkpoint ref or object is missing or broken
    ├── DiskFull                   -32060  the disk holding a data file is full: tasks wait
    └── Conflict                   -32070  what a request would change was changed by someone
                                           else meanwhile (`tale apply`): nothing was written
"""

from __future__ import annotations

import errno

__all__ = [
    "AlreadyRunning",
    "BackendDown",
    "CheckpointDamaged",
    "ConfigError",
    "Conflict",
    "ContextOverflow",
    "DaemonError",
    "Damaged",
    "DiskFull",
    "IllegalTransition",
    "InvalidInput",
    "ModelError",
    "ModelTimeout",
    "NotFound",
    "PlanError",
    "RoleDown",
    "StoreDamaged",
    "TaleError",
    "Unavailable",
    "is_no_space",
]


class TaleError(Exception):
    """Base of every error the daemon raises on purpose."""

    code: int = -32603

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TaleError):
    """The caller's input is wrong; the message says how, and nothing was written."""

    code = -32602


class NotFound(TaleError):
    """A task id or checkpoint that is well formed but unknown."""

    code = -32001


class IllegalTransition(TaleError):
    """A state change the task state machine does not allow."""

    code = -32002


class Unavailable(TaleError):
    """The daemon cannot take this request right now (shutting down, role down)."""

    code = -32003


class RoleDown(Unavailable):
    """A role's model is down, no fallback serves it, and it did not come back in time."""


class ModelError(TaleError):
    """A model backend failed to load or to answer."""

    code = -32010


class ModelTimeout(ModelError):
    """A model call did not finish within its deadline."""

    code = -32011


class ContextOverflow(ModelError):
    """The prompt does not fit the model's context window: a shorter one may."""

    code = -32013


class BackendDown(ModelError):
    """The backend itself is broken (server gone, process crashed, probe hung).

    Unlike a plain ModelError, which is about one request, this makes the pool
    reload the model and send the role's calls to its fallback meanwhile.
    """

    code = -32012


class ConfigError(TaleError):
    """The configuration files or environment are invalid."""

    code = -32020


class DaemonError(TaleError):
    """The daemon could not start (socket in use by a live daemon, path too long, ...)."""

    code = -32030


class AlreadyRunning(DaemonError):
    """Another live daemon holds the socket's lock."""

    code = -32031


class PlanError(TaleError):
    """A task plan is unusable: a model's answer held no plan, or a saved plan is corrupt.

    The runner catches it and asks again or builds a plan itself.
    """

    code = -32040


class Damaged(TaleError):
    """A data file is damaged; the message names it, says what is wrong, and what to do.

    The daemon refuses to start on one (exit code 1) and turns one found later into
    this error instead of a driver's message; ``tale doctor`` checks and repairs.
    """

    code = -32050


class StoreDamaged(Damaged):
    """The SQLite database fails its integrity check or a query finds a damaged page."""

    code = -32051


class CheckpointDamaged(Damaged):
    """A checkpoint ref is garbage or names an object that is missing or broken."""

    code = -32052


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS saying the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskFull(TaleError):
    """A write failed because the disk (or the user's quota) holding ``path`` is full.

    Nothing is lost: the write did not happen. A task that hits it waits (parked)
    until the disk has room again, then resumes from its latest checkpoint.
    """

    code = -32060

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        """The file (or directory) whose write failed."""
        message = f"the disk holding {path} is full"
        super().__init__(f"{message} ({detail})" if detail else message)


class Conflict(TaleError):
    """What a request would change was changed meanwhile by someone else; nothing was written.

    ``tale apply`` raises it when files of the user's directory differ from what the
    task copied: ``paths`` names them (relative to that directory).
    """

    code = -32070

    def __init__(self, message: str, paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.paths = paths
