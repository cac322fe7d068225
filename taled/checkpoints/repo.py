"""Task checkpoints in a bare git repository, written with dulwich.

Each task has one ref, ``refs/tale/tasks/<task id>``, pointing at a linear chain of
commits; each commit's tree holds one blob, ``state.json``, the task's state as
canonical JSON. Objects go straight into the object store (no working tree, no
``git`` subprocess) and the ref is moved with compare-and-swap: a writer that
lost a race re-reads the head and commits again on top of it, so no checkpoint
is ever dropped. Restores read the blob from the commit's tree.

Concurrency: one lock per task keeps a task's checkpoints in order while
different tasks commit in parallel worker threads. ``gc()`` repacks and prunes,
so it excludes every other operation while it runs. Cancelling a caller does
not stop a write already in its thread: the checkpoint may still land.

Crash safety: objects are fsynced before the ref that names them is written
(dulwich fsyncs ref files itself). A process killed mid-write can leave git
``*.lock`` files behind that would block that ref forever; ``open()`` holds an
``flock`` on the repository for the store's lifetime (the kernel drops it when
the process dies), so a store that gets it knows every leftover lock is stale
and removes it. A write that finds the disk full raises ``DiskFull`` (nothing was
written) and leaves a lock file behind (dulwich removes it only when the final rename
fails, not the flush): those are removed then too, while no other operation runs.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import itertools
import json
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
from dulwich.file import FileLocked
from dulwich.gc import garbage_collect
from dulwich.object_store import BaseObjectStore
from dulwich.objects import Blob, Commit, ObjectID, ShaFile, Tree
from dulwich.refs import Ref
from dulwich.repo import Repo

from taled.errors import (
    CheckpointDamaged,
    DaemonError,
    DiskFull,
    InvalidInput,
    NotFound,
    Unavailable,
    is_no_space,
)
from taled.text import count

__all__ = ["Checkpoint", "CheckpointKind", "CheckpointStore", "GcReport", "RefDamage"]

T = TypeVar("T")

STATE_FILE = b"state.json"
WORKSPACE_DIR = b"workspace"
WORKSPACE_BASE_DIR = b"workspace-base"
_DIR_MODE = 0o040000
REF_PREFIX = "refs/tale/tasks/"
IDENTITY = b"taled <taled@localhost>"
_FILE_MODE = 0o100644
_LOCK_NAME = "taled.flock"

_TASK_ID = re.compile(r"[0-9a-f]{12}")
_SHA = re.compile(rb"[0-9a-f]{40}")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
_MAX_STEP_CHARS = 200
_MAX_MESSAGE_CHARS = 500


class CheckpointKind(StrEnum):
    """What a checkpoint records, kept in its commit as a ``Kind:`` trailer.

    Decisions about checkpoints (which one ``restore`` goes back to by default) are
    taken on this, never on a message's wording.
    """

    START = "start"
    """Classified and routed; nothing produced yet."""
    PLAN = "plan"
    DECOMPOSE = "decompose"
    """Direct answers failed; the task is planned into subtasks next."""
    SUBTASKS = "subtasks"
    """Some of the plan's steps finished."""
    SUBTASKS_DONE = "subtasks-done"
    STEP_DONE = "step-done"
    """A subtask finished (in its own history, and in its parent's)."""
    ATTEMPT_PASSED = "attempt-passed"
    ATTEMPT_FAILED = "attempt-failed"
    """An answer that failed its gate."""
    BUDGET_CUT = "budget-cut"
    PARTIAL = "partial"
    """The text of an answer still being written."""
    PAUSE = "pause"
    """A call stopped by pause, cancel or shutdown, its partial text kept."""
    RESTORE = "restore"
    ACT_START = "act-start"
    """An acting task's workspace is made; its tree is the diff's left side."""
    ACT_TURN = "act-turn"
    """The model proposed tool calls (none has run)."""
    TOOL_RUNNING = "tool-running"
    """A tool call is about to run: after a crash it is reported interrupted, not rerun."""
    TOOL_DONE = "tool-done"
    """A tool call's result, with the workspace tree after it."""
    WAITING = "waiting"
    """A call waits for a person (an approval, or an answer to the model's question)."""
    DONE = "done"
    UNSPECIFIED = "unspecified"
    """Written without a kind, or by a version before kinds (no trailer)."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved state of a task."""

    commit: str
    """The commit's full hex sha."""
    task_id: str
    at: float
    """Commit time, seconds since the epoch (whole seconds: git stores no fraction)."""
    step: str
    message: str
    kind: CheckpointKind = CheckpointKind.UNSPECIFIED


@dataclass(frozen=True)
class GcReport:
    """What ``gc()`` did."""

    pruned_objects: int
    bytes_freed: int
    loose_objects_before: int
    loose_objects_after: int
    packs_after: int
    skipped: str = ""
    """Why gc did nothing this time (a workspace snapshot waits for its commit)."""


@dataclass(frozen=True)
class RefDamage:
    """A damaged ref under ``refs/tale/``, as ``verify()`` found it."""

    ref: str
    """The full ref name, e.g. ``refs/tale/tasks/0123456789ab``."""
    task_id: str | None
    """The task it belongs to (None: not a task's ref at all)."""
    problem: str
    """What is wrong, one sentence without the ref's name."""
    held: str
    """What the ref holds (a commit id, or the garbage in it)."""
    keeps: int | None
    """How many checkpoints a repair keeps (0: the ref is dropped); None when only
    the head was checked."""


class _Gate:
    """Many shared holders (checkpoint operations) or one exclusive holder (gc, close)."""

    def __init__(self) -> None:
        self._cond = anyio.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._exclusive:
                await self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            # Shielded: a cancelled holder must still give its share back.
            with anyio.CancelScope(shield=True):
                async with self._cond:
                    self._shared -= 1
                    self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._exclusive:
                await self._cond.wait()
            # Claimed before waiting, so a stream of new shared holders cannot starve us.
            self._exclusive = True
            try:
                while self._shared:
                    await self._cond.wait()
            except BaseException:
                self._exclusive = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._cond:
                    self._exclusive = False
                    self._cond.notify_all()


class CheckpointStore:
    """Checkpoints of every task in one bare repository. ``open()`` before use, ``close()`` after.

    ``fsync`` makes every object durable before its ref moves (power-loss safe);
    ``contention_timeout_seconds`` bounds how long one operation keeps retrying while
    another writer holds a git lock file or keeps moving the ref (then: Unavailable);
    ``max_state_bytes`` caps one serialized state.
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,
        contention_timeout_seconds: float = 10.0,
        max_state_bytes: int = 16 * 2**20,
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._contention_timeout = contention_timeout_seconds
        self._max_state_bytes = max_state_bytes
        self._repo: Repo | None = None
        self._flock_fd: int | None = None
        self._gate = _Gate()
        # Workspace snapshots whose objects are written and whose commit is not yet:
        # gc prunes every unreachable object, so it waits for another round meanwhile.
        self._pins = 0
        # task id -> (lock, holders + waiters); an entry lives only while in use.
        self._task_locks: dict[str, tuple[anyio.Lock, list[int]]] = {}

    # -- lifecycle ---------------------------------------------------------

    async def open(self, *, read_only: bool = False) -> None:
        """Create the repository if missing, lock it for this process, clear stale locks.

        ``read_only`` opens an existing repository beside the daemon that holds it
        (``tale doctor``'s check): no lock, no clean-up, nothing created; read only.
        """
        if self._repo is not None:
            return
        await anyio.to_thread.run_sync(self._open_read_only if read_only else self._open_sync)

    def _open_read_only(self) -> None:
        if not (self.path / "HEAD").is_file():
            raise DaemonError(f"{self.path} is not a git repository")
        self._repo = Repo(str(self.path))

    async def close(self) -> None:
        """Wait for running operations, then release the repository."""
        async with self._gate.exclusive():
            repo, self._repo = self._repo, None
            if repo is not None:
                repo.close()
            if self._flock_fd is not None:
                os.close(self._flock_fd)  # closing the descriptor drops the flock
                self._flock_fd = None

    def _open_sync(self) -> None:
        path = self.path
        # The flock file alone is what a crash between creating it and init leaves.
        foreign = path.exists() and any(p.name != _LOCK_NAME for p in path.iterdir())
        if foreign and not (path / "HEAD").is_file():
            raise DaemonError(f"{path} exists and is not a git repository; move it away")
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"checkpoint repository {path} is in use by another process"
            ) from None
        try:
            repo = Repo(str(path)) if (path / "HEAD").is_file() else Repo.init_bare(str(path))
            if not repo.bare:
                repo.close()
                raise DaemonError(f"{path} is not a bare git repository")
            _remove_stale_locks(path)
            # Objects must be on disk before a ref names them; dulwich fsyncs refs
            # but, like git, not objects unless asked.
            repo.object_store.fsync_object_files = self._fsync
        except BaseException:
            os.close(fd)
            raise
        self._repo = repo
        self._flock_fd = fd

    # -- public API --------------------------------------------------------

    async def commit(
        self,
        task_id: str,
        state: dict[str, Any],
        step: str,
        message: str,
        kind: CheckpointKind = CheckpointKind.UNSPECIFIED,
        *,
        workspace: str | None = None,
        base: str | None = None,
    ) -> Checkpoint:
        """Save ``state`` as the task's newest checkpoint, of ``kind``.

        ``step`` is one line (1..200 characters); ``message`` has its whitespace
        collapsed to single spaces and is cut at 500 characters (empty: the step).
        ``workspace`` is an acting task's workspace as a tree already in this repository
        (``with_objects``): the commit holds it beside the state, so the files and the
        state rewind together and the tree lives as long as the checkpoint. ``base`` is the
        tree the workspace started from (diff's left side), kept the same way, so compaction
        and gc never take it while a checkpoint still needs it.
        """
        _check_task_id(task_id)
        step = _clean_step(step)
        subject = _clean_message(message) or step
        kind = CheckpointKind(kind)
        trees = {
            name: _check_tree(sha)
            for name, sha in ((WORKSPACE_DIR, workspace), (WORKSPACE_BASE_DIR, base))
            if sha is not None
        }
        async with self._task_lock(task_id):
            return await self._run(
                partial(self._commit_state, task_id, state, step, subject, kind, trees)
            )

    async def with_objects(self, fn: Callable[[BaseObjectStore], T]) -> T:
        """Run ``fn`` with the repository's object store, in the store's worker thread
        (workspace snapshots write their blobs and trees here). Its ``add_object`` is this
        store's: another thread writing the same object at once is waited for, not an
        error (two tasks' workspaces often share files)."""
        store = self._open_repo().object_store
        # Duck-typed: what a snapshot, diff or apply uses of a store, writes made safe.
        return await self._run(lambda: fn(cast(BaseObjectStore, _SharedObjects(store, self))))

    async def latest(self, task_id: str) -> Checkpoint | None:
        """The task's newest checkpoint, or None when it has none."""
        _check_task_id(task_id)
        return await self._run(partial(self._latest_sync, task_id))

    async def load(self, task_id: str, commit: str | None = None) -> dict[str, Any]:
        """The state saved in ``commit`` (a sha or unique prefix of >= 7), else the newest."""
        _check_task_id(task_id)
        want = _check_commit(commit) if commit is not None else None
        return await self._run(partial(self._load_sync, task_id, want))

    async def list(self, task_id: str, limit: int | None = None) -> builtins.list[Checkpoint]:
        """The task's checkpoints, newest first (at most ``limit``)."""
        _check_task_id(task_id)
        if limit is not None and limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        return await self._run(partial(self._list_sync, task_id, limit))

    async def restore(self, task_id: str, commit: str) -> Checkpoint:
        """Add a new checkpoint whose state is ``commit``'s; history is never rewritten."""
        _check_task_id(task_id)
        want = _check_commit(commit)
        async with self._task_lock(task_id):
            return await self._run(partial(self._restore_sync, task_id, want))

    async def compact(self, task_id: str, keep: int) -> int:
        """Rewrite the task's history to its ``keep`` newest checkpoints; return how many went.

        The kept checkpoints get new commit shas (their parents change); their
        states, times, steps and messages are unchanged. ``gc()`` frees the space.
        """
        _check_task_id(task_id)
        if keep < 1:
            raise InvalidInput(f"keep must be at least 1 (use delete to drop them all), got {keep}")
        async with self._task_lock(task_id):
            return await self._run(partial(self._compact_sync, task_id, keep))

    async def delete(self, task_id: str) -> bool:
        """Remove the task's ref (all its checkpoints); False when it had none."""
        _check_task_id(task_id)
        async with self._task_lock(task_id):
            return await self._run(partial(self._delete_sync, task_id))

    async def task_ids(self) -> builtins.list[str]:
        """Ids of the tasks that have checkpoints, sorted."""
        return await self._run(self._task_ids_sync)

    async def gc(self) -> GcReport:
        """Drop unreachable objects and pack the rest; every other operation waits meanwhile.

        dulwich's repack holds all objects in memory while it writes the pack,
        so run it when idle (it is not incremental).
        """
        async with self._gate.exclusive():
            if self._pins:
                return GcReport(0, 0, 0, 0, 0, skipped="a workspace snapshot awaits its commit")
            repo = self._open_repo()
            return await anyio.to_thread.run_sync(partial(_gc_sync, repo))

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep gc off while objects written by ``with_objects`` wait for the commit that
        makes them reachable (a workspace snapshot, then its checkpoint)."""
        self._pins += 1
        try:
            yield
        finally:
            self._pins -= 1

    async def verify(self, *, deep: bool = False) -> builtins.list[RefDamage]:
        """Every ref under ``refs/tale/`` that is damaged, sorted by ref name.

        A ref is healthy when it is a task's ref and holds the id of a commit that is in
        the repository: start-up's check, cheap enough for thousands of tasks. ``deep``
        (``tale doctor``) also walks every task's whole history, reading every commit
        and its ``state.json``.
        """
        return await self._run(partial(self._verify_sync, deep))

    async def repair(self, damage: RefDamage) -> str:
        """Repair one damaged ref and say what was done (what it held, where it is now).

        The ref moves back to its newest checkpoint whose state is readable (its history
        rewritten to leave out unreadable checkpoints and to end where it broke), or
        is dropped when none is. Objects are never deleted. Every other operation
        waits meanwhile.
        """
        async with self._gate.exclusive():
            self._open_repo()
            return await anyio.to_thread.run_sync(partial(self._repair_sync, damage.ref))

    # -- helpers (event loop) ----------------------------------------------

    @contextlib.asynccontextmanager
    async def _task_lock(self, task_id: str) -> AsyncIterator[None]:
        entry = self._task_locks.get(task_id)
        if entry is None:
            entry = self._task_locks[task_id] = (anyio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._task_locks[task_id]

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            async with self._gate.shared():
                self._open_repo()
                return await anyio.to_thread.run_sync(fn)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            # A write cut short by a full disk leaves its git lock file behind (dulwich
            # removes it only when the rename fails, not the flush), and that file
            # would block its object or ref for good: clear them while nobody writes.
            await self._remove_stale_locks()
            where = f"writing {exc.filename}" if exc.filename else ""
            raise DiskFull(str(self.path), where) from None

    async def _remove_stale_locks(self) -> None:
        async with self._gate.exclusive():
            if self._repo is not None:
                await anyio.to_thread.run_sync(partial(_remove_stale_locks, self.path))

    def _open_repo(self) -> Repo:
        if self._repo is None:
            raise Unavailable("the checkpoint store is closed; the daemon is shutting down")
        return self._repo

    # -- worker-thread side ------------------------------------------------

    def _commit_state(
        self,
        task_id: str,
        state: dict[str, Any],
        step: str,
        subject: str,
        kind: CheckpointKind,
        trees: dict[bytes, ObjectID] | None = None,
    ) -> Checkpoint:
        blob = Blob.from_string(_encode_state(state, self._max_state_bytes))
        tree = Tree()
        tree.add(STATE_FILE, _FILE_MODE, blob.id)
        store = self._open_repo().object_store
        for name, sha in (trees or {}).items():
            if sha not in store:
                raise DaemonError(
                    f"workspace tree {sha.decode()} of task {task_id} is not in the "
                    "checkpoint repository"
                )
            tree.add(name, _DIR_MODE, sha)
        self._add_object(blob)
        self._add_object(tree)
        return self._append(task_id, tree.id, step, subject, kind)

    def _append(
        self, task_id: str, tree: ObjectID, step: str, subject: str, kind: CheckpointKind
    ) -> Checkpoint:
        ref = _ref(task_id)
        message = f"{subject}\n\nStep: {step}\nKind: {kind}\nTask: {task_id}\n".encode()
        deadline = time.monotonic() + self._contention_timeout
        attempt = 0
        while True:
            parent = self._head(ref)
            commit = Commit()
            commit.tree = tree
            commit.parents = [parent] if parent is not None else []
            commit.author = commit.committer = IDENTITY
            commit.author_time = commit.commit_time = int(time.time())
            commit.author_timezone = commit.commit_timezone = 0
            commit.message = message
            self._add_object(commit)
            if self._swap(ref, parent, commit.id):
                return _checkpoint(task_id, commit)
            # Another writer moved the ref between our read and our swap: go again
            # on top of its head (the loop re-reads it).
            attempt += 1
            self._back_off(deadline, attempt, f"save a checkpoint of task {task_id}")

    def _rechain(self, newest_first: builtins.list[Commit]) -> ObjectID:
        """Write ``newest_first`` again as a fresh chain (same trees, authors, times and
        messages); return its new head. Compaction and repair both rewrite history so."""
        parent: ObjectID | None = None
        for old in reversed(newest_first):
            new = Commit()
            new.tree = old.tree
            new.parents = [parent] if parent is not None else []
            new.author, new.committer = old.author, old.committer
            new.author_time, new.commit_time = old.author_time, old.commit_time
            new.author_timezone, new.commit_timezone = old.author_timezone, old.commit_timezone
            new.message = old.message
            self._add_object(new)
            parent = new.id
        assert parent is not None
        return parent

    def _latest_sync(self, task_id: str) -> Checkpoint | None:
        head = self._head(_ref(task_id))
        return None if head is None else _checkpoint(task_id, self._commit(head))

    def _load_sync(self, task_id: str, want: str | None) -> dict[str, Any]:
        commit = self._resolve(task_id, want)
        blob = self._state_blob(task_id, commit)
        try:
            state = json.loads(blob.as_raw_string())
        except ValueError as exc:
            raise self._damaged(
                f"checkpoint {_hex(commit.id)} of task {task_id} holds no valid JSON ({exc})"
            ) from exc
        if not isinstance(state, dict):
            raise self._damaged(
                f"checkpoint {_hex(commit.id)} of task {task_id} holds no JSON object"
            )
        return state

    def _list_sync(self, task_id: str, limit: int | None) -> builtins.list[Checkpoint]:
        return [_checkpoint(task_id, c) for c in self._history(task_id, limit)]

    def _restore_sync(self, task_id: str, want: str) -> Checkpoint:
        source = self._resolve(task_id, want)
        self._state_blob(task_id, source)  # refuse to restore a damaged checkpoint
        step = _checkpoint(task_id, source).step
        return self._append(
            task_id, source.tree, step, f"restored {_hex(source.id)[:7]}", CheckpointKind.RESTORE
        )

    def _compact_sync(self, task_id: str, keep: int) -> int:
        ref = _ref(task_id)
        deadline = time.monotonic() + self._contention_timeout
        attempt = 0
        while True:
            head = self._head(ref)
            chain = self._history(task_id, None, head=head)
            if head is None or len(chain) <= keep:
                return 0
            parent = self._rechain(chain[:keep])
            if self._swap(ref, head, parent):
                return len(chain) - keep
            attempt += 1
            self._back_off(deadline, attempt, f"compact task {task_id}")

    def _delete_sync(self, task_id: str) -> bool:
        ref = _ref(task_id)
        repo = self._open_repo()
        if self._head(ref) is None:
            return False
        self._retry_locked(lambda: repo.refs.remove_if_equals(ref, None))
        return True

    def _task_ids_sync(self) -> builtins.list[str]:
        names = self._open_repo().refs.keys(base=Ref(REF_PREFIX.rstrip("/").encode()))
        return sorted(n.decode() for n in names if _TASK_ID.fullmatch(n.decode()))

    def _verify_sync(self, deep: bool) -> builtins.list[RefDamage]:
        refs = self._open_repo().refs
        names = sorted(Ref(b"refs/tale/" + n) for n in refs.keys(base=Ref(b"refs/tale")))
        found = (self._survey(name, deep)[0] for name in names)
        return [d for d in found if d is not None]

    def _survey(self, name: Ref, deep: bool) -> tuple[RefDamage | None, builtins.list[Commit]]:
        """What is wrong with one ref, and its commits a repair keeps, newest first.

        ``deep`` walks first parents from the head until the history ends or a commit
        is missing, reading every state; a repair keeps the commits from the newest
        one with a readable state down to the break, leaving out unreadable ones.
        Otherwise only the head commit's presence is checked (and nothing is kept).
        """
        ref = name.decode("utf-8", "replace")
        task_id = ref.removeprefix(REF_PREFIX)
        if not ref.startswith(REF_PREFIX) or not _TASK_ID.fullmatch(task_id):
            held = _hex(self._open_repo().refs.read_ref(name) or b"")
            return RefDamage(ref, None, "is not a task's checkpoint ref", held, 0), []
        try:
            head: bytes = self._open_repo().refs[name]
        except KeyError:  # a symbolic ref to nothing
            head = self._open_repo().refs.read_ref(name) or b""
        if not _SHA.fullmatch(head):
            return RefDamage(ref, task_id, "holds no commit id", _hex(head[:60]), 0), []
        if not deep:
            # Start-up's check: a lookup in the object store, no read (about 60 µs a
            # ref); a head that is there but unreadable is named when a resume reads it.
            if ObjectID(head) in self._open_repo().object_store:
                return None, []
            problem = f"names commit {_hex(head)}, which is missing"
            return RefDamage(ref, task_id, problem, _hex(head), None), []
        walked: builtins.list[tuple[Commit, bool]] = []
        broken: str | None = None
        sha: ObjectID | None = ObjectID(head)
        while sha is not None:
            try:
                commit = self._commit(sha)
            except CheckpointDamaged:
                broken = _hex(sha)
                break
            walked.append((commit, self._state_readable(commit)))
            sha = commit.parents[0] if commit.parents else None
        newest = next((i for i, (_, ok) in enumerate(walked) if ok), len(walked))
        keep = [c for c, ok in walked[newest:] if ok]
        faults = []
        if not walked:
            faults.append(f"names commit {broken}, which is missing or unreadable")
        elif broken is not None:
            faults.append(f"has a history that breaks at commit {broken} (missing or unreadable)")
        unreadable = [_hex(c.id)[:12] for c, ok in walked if not ok]
        if unreadable:
            more = " ..." if len(unreadable) > 5 else ""
            faults.append(
                f"has {'a checkpoint' if len(unreadable) == 1 else 'checkpoints'} whose state "
                "is missing or unreadable: "
                f"{', '.join(unreadable[:5])}{more}"
            )
        if not faults:
            return None, keep
        return RefDamage(ref, task_id, "; ".join(faults), _hex(head), len(keep)), keep

    def _state_readable(self, commit: Commit) -> bool:
        """Whether the commit's state.json is there and holds a JSON object."""
        try:
            blob = self._state_blob(_hex(commit.id), commit)
            return isinstance(json.loads(blob.as_raw_string()), dict)
        except (CheckpointDamaged, ValueError):
            return False

    def _repair_sync(self, ref: str) -> str:
        name = Ref(ref.encode())
        refs = self._open_repo().refs
        damage, keep = self._survey(name, deep=True)
        if damage is None:
            return "nothing to repair"
        if not keep:
            self._retry_locked(lambda: refs.remove_if_equals(name, None))
            return f"held {damage.held}; dropped it (no readable checkpoint)"
        walked = list(self._walk_ids(keep[0].id))
        # Damage all above the newest readable checkpoint: move back to it. Else rewrite
        # the kept checkpoints as a fresh chain, so history no longer reaches the bad ones.
        target = keep[0].id if walked == [c.id for c in keep] else self._rechain(keep)
        self._retry_locked(lambda: refs.set_if_equals(name, None, target))
        return (
            f"held {damage.held}; moved it to {_hex(target)}, keeping "
            f"{count(len(keep), 'readable checkpoint', 'readable checkpoints')}"
        )

    def _walk_ids(self, head: ObjectID) -> Iterator[ObjectID]:
        """Commit ids along first parents from ``head``, stopping at a missing one."""
        sha: ObjectID | None = head
        while sha is not None:
            try:
                commit = self._commit(sha)
            except CheckpointDamaged:
                yield sha
                return
            yield commit.id
            sha = commit.parents[0] if commit.parents else None

    def _head(self, ref: Ref) -> ObjectID | None:
        try:
            return self._open_repo().refs[ref]
        except KeyError:
            return None

    def _commit(self, sha: ObjectID) -> Commit:
        obj = self._object(sha, "commit")
        if not isinstance(obj, Commit):
            raise self._damaged(f"object {_hex(sha)} is a {obj.type_name.decode()}, not a commit")
        return obj

    def _object(self, sha: ObjectID, what: str) -> ShaFile:
        """An object from the store; CheckpointDamaged when it is missing or unreadable."""
        try:
            return self._open_repo().object_store[sha]
        except KeyError:
            raise self._damaged(f"{what} {_hex(sha)} is missing") from None
        except Exception as exc:
            # A garbled name, a truncated or corrupt loose object, a bad pack: dulwich
            # raises AssertionError, zlib.error, ObjectFormatException, ChecksumMismatch...
            raise self._damaged(f"{what} {_hex(sha)} cannot be read ({exc})") from exc

    def _damaged(self, what: str) -> CheckpointDamaged:
        return CheckpointDamaged(
            f"the checkpoint repository {self.path} is damaged: {what}; "
            "run `tale doctor` (with the daemon stopped, `tale doctor --repair` repairs it)"
        )

    def _walk(self, task_id: str, head: ObjectID | None = None) -> Iterator[Commit]:
        """The task's commits, newest first, read lazily along first parents."""
        sha = head if head is not None else self._head(_ref(task_id))
        while sha is not None:
            commit = self._commit(sha)
            yield commit
            sha = commit.parents[0] if commit.parents else None

    def _history(
        self, task_id: str, limit: int | None, *, head: ObjectID | None = None
    ) -> builtins.list[Commit]:
        return builtins.list(itertools.islice(self._walk(task_id, head), limit))

    def _resolve(self, task_id: str, want: str | None) -> Commit:
        """The commit ``want`` names in the task's history (the newest when None)."""
        if want is None:
            head = self._head(_ref(task_id))
            if head is None:
                raise NotFound(f"task {task_id} has no checkpoints")
            return self._commit(head)
        # The object store finds the few objects with this prefix at once; the walk
        # then only has to reach them, not the whole history (which may be 10,000 deep),
        # and it must: a sha of another task, or one compacted away, is not this task's.
        candidates = set(self._open_repo().object_store.iter_prefix(want.encode()))
        found: builtins.list[Commit] = []
        if candidates:
            for commit in self._walk(task_id):
                if commit.id in candidates:
                    found.append(commit)
                    candidates.discard(commit.id)
                    if not candidates:
                        break
        if not found:
            raise NotFound(f"task {task_id} has no checkpoint {want}")
        if len(found) > 1:
            raise InvalidInput(
                f"{want} matches {len(found)} checkpoints of task {task_id}; give more digits"
            )
        return found[0]

    def _state_blob(self, task_id: str, commit: Commit) -> Blob:
        tree = self._object(commit.tree, f"the tree of checkpoint {_hex(commit.id)}")
        blob = None
        if isinstance(tree, Tree) and STATE_FILE in tree:
            blob = self._object(tree[STATE_FILE][1], f"the state of checkpoint {_hex(commit.id)}")
        if not isinstance(blob, Blob):
            raise self._damaged(f"checkpoint {_hex(commit.id)} of task {task_id} has no state.json")
        return blob

    def _add_object(self, obj: ShaFile) -> None:
        store = self._open_repo().object_store

        def add() -> bool:
            try:
                store.add_object(obj)
            except FileLocked:
                # Another thread is writing the same object (two tasks with equal
                # states share blobs and trees): once its file exists we are done.
                if store.contains_loose(obj.id):
                    return True
                raise
            return True

        self._retry_locked(add)

    def _swap(self, ref: Ref, old: ObjectID | None, new: ObjectID) -> bool:
        """Compare-and-swap the ref from ``old`` (None: absent) to ``new``."""
        refs = self._open_repo().refs
        if old is None:
            return self._retry_locked(lambda: refs.add_if_new(ref, new))
        return self._retry_locked(lambda: refs.set_if_equals(ref, old, new))

    def _back_off(self, deadline: float, attempt: int, what: str) -> None:
        """Pause before retrying a lost compare-and-swap; Unavailable past the deadline."""
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"could not {what}: another writer kept moving its ref for "
                f"{self._contention_timeout:g} s; try again"
            )
        # A random pause, growing with each loss, lets the other writer finish
        # instead of both re-reading the head in lockstep.
        time.sleep(random.uniform(0, min(0.0005 * 2**attempt, 0.02)))

    def _retry_locked(self, fn: Callable[[], bool]) -> bool:
        """Call ``fn`` until it gets past git lock files held by other writers."""
        deadline = time.monotonic() + self._contention_timeout
        delay = 0.001
        while True:
            try:
                return fn()
            except FileLocked as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"checkpoint repository is locked ({exc.lockfilename!r} held for over "
                        f"{self._contention_timeout:g} s); try again"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)


# -- module helpers ----------------------------------------------------------


class _SharedObjects:
    """An object store whose writes go through ``CheckpointStore._add_object``."""

    def __init__(self, store: BaseObjectStore, owner: CheckpointStore) -> None:
        self._store = store
        self._owner = owner

    def add_object(self, obj: ShaFile) -> None:
        self._owner._add_object(obj)

    def __contains__(self, sha: ObjectID) -> bool:
        return sha in self._store

    def __getitem__(self, sha: ObjectID) -> ShaFile:
        return self._store[sha]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _check_tree(sha: str) -> ObjectID:
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise InvalidInput(f"a workspace tree is 40 hex digits, not {sha!r}")
    return ObjectID(sha.encode())


def _ref(task_id: str) -> Ref:
    return Ref(f"{REF_PREFIX}{task_id}".encode())


def _hex(sha: bytes) -> str:
    # "replace": a garbage ref's bytes are shown, not raised on.
    return sha.decode("ascii", "replace")


def _checkpoint(task_id: str, commit: Commit) -> Checkpoint:
    text = commit.message.decode("utf-8", "replace")
    subject, _, rest = text.partition("\n")
    step = ""
    kind = CheckpointKind.UNSPECIFIED
    for line in rest.splitlines():
        if line.startswith("Step: "):
            step = line[len("Step: ") :]
        elif line.startswith("Kind: "):
            # A kind this version does not know (written by a newer one) reads as unspecified.
            with contextlib.suppress(ValueError):
                kind = CheckpointKind(line[len("Kind: ") :])
    return Checkpoint(
        commit=_hex(commit.id),
        task_id=task_id,
        at=float(commit.commit_time),
        step=step,
        message=subject,
        kind=kind,
    )


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise InvalidInput(f"task id must be 12 lowercase hex digits, got {task_id!r}")


def _check_commit(commit: object) -> str:
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit.lower()):
        raise InvalidInput(f"commit must be 7 to 40 hex digits, got {commit!r}")
    return commit.lower()


def _clean_step(step: object) -> str:
    if not isinstance(step, str) or not step.strip():
        raise InvalidInput(f"step must be a non-empty string, got {step!r}")
    if len(step) > _MAX_STEP_CHARS or not step.isprintable():
        raise InvalidInput(
            f"step must be one printable line of at most {_MAX_STEP_CHARS} characters"
        )
    return step.strip()


def _clean_message(message: object) -> str:
    if not isinstance(message, str):
        raise InvalidInput(f"message must be a string, got {type(message).__name__}")
    # The subject is one line of the commit message; trailers follow it.
    text = " ".join(message.split())
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + "…"


def _encode_state(state: object, max_bytes: int) -> bytes:
    """Canonical JSON (sorted keys, no spaces) or InvalidInput saying what is wrong."""
    if not isinstance(state, dict):
        raise InvalidInput(f"state must be a JSON object (a dict), got {type(state).__name__}")
    try:
        _check_json(state, "state")
        text = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise InvalidInput("state is nested too deeply to save") from None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8; \u escapes keep it exactly.
        data = json.dumps(state, sort_keys=True, separators=(",", ":")).encode("ascii")
    if len(data) > max_bytes:
        raise InvalidInput(f"state is {len(data)} bytes as JSON; the limit is {max_bytes}")
    return data


def _check_json(value: object, where: str) -> None:
    # json.dumps would quietly turn int keys into strings and write NaN, which is
    # not JSON; either breaks the exact round trip, so refuse them here.
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{where} is {value}, which JSON cannot hold")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{where} has a non-string key {key!r}; JSON keys are strings")
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise InvalidInput(f"{where} is a {type(value).__name__}, which is not a JSON value")


def _remove_stale_locks(path: Path) -> None:
    """Delete git lock files a killed writer left (only safe while holding the flock)."""
    candidates = [path / "packed-refs.lock", path / "config.lock", path / "HEAD.lock"]
    candidates += (path / "refs").rglob("*.lock")
    candidates += (path / "objects").glob("??/*.lock")
    for lock in candidates:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _gc_sync(repo: Repo) -> GcReport:
    # grace_period=0: every unreachable object may go, because the exclusive gate
    # guarantees no commit is half-written (objects stored, ref not yet moved).
    stats = garbage_collect(repo, prune=True, grace_period=0)
    return GcReport(
        pruned_objects=len(stats.pruned_objects),
        bytes_freed=stats.bytes_freed,
        loose_objects_before=stats.loose_objects_before,
        loose_objects_after=stats.loose_objects_after,
        packs_after=stats.packs_after,
    )
