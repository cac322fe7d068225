"""The task repository: tasks, their transitions and the token ledger.

``Store`` is what the other services hold: it submits, claims and moves tasks (every
move checked by ``taled.tasks.lifecycle``), creates a planned task's subtasks, and
appends model calls to the ledger without waiting for their commit. Its values are
``TaskRecord``, ``SubtaskSpec`` and ``CallRecord``. Every state change, whichever
repository of ``taled.db`` made it, is told to the store's watchers (``watch``) as a
``Moved`` once its transaction has committed: that is how other services (the
notifications) learn of them without the runner knowing they exist.

How it talks to SQLite (the group-committing writer, the readers, the migrations)
is ``taled.db.engine``; the tables it reads and writes are ``taled.db.schema``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.engine import Database, fetch, raw_sql
from taled.db.ids import IdMessages, by_prefix, normalise
from taled.db.schema import approvals, model_calls, task_deps, tasks, transitions
from taled.errors import IllegalTransition, InvalidInput, NotFound
from taled.settings import StoreSettings
from taled.tasks.lifecycle import FINAL_STATES, RESTORE_TRANSITIONS, TaskState, check_transition
from taled.tasks.workstate import AttemptKey
from taled.text import one_line

__all__ = [
    "TASK_ID_DIGITS",
    "AttemptKey",  # a ledger row's key, for services that see the ledger but not tasks
    "CallRecord",
    "Moved",
    "Store",
    "SubtaskSpec",
    "TaskFields",
    "TaskRecord",
    "Transition",
    "new_task_id",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_FINAL = frozenset(s.value for s in FINAL_STATES)


@dataclass(frozen=True)
class Moved:
    """One state change of a task, as its watchers are told of it (once committed)."""

    task_id: str
    from_state: TaskState
    to_state: TaskState
    at: float
    reason: str


# The moves the write running now has made (``_move`` appends; ``Store.write`` sets it).
_MOVES: contextvars.ContextVar[list[Moved] | None] = contextvars.ContextVar(
    "tale_moves", default=None
)


TASK_ID_DIGITS = 12
"""How many lowercase hex digits a task id has."""


def new_task_id() -> str:
    """A short random task id: ``TASK_ID_DIGITS`` lowercase hex digits."""
    return secrets.token_hex(TASK_ID_DIGITS // 2)


@dataclass(frozen=True)
class Transition:
    """One recorded state change."""

    from_state: str | None
    to_state: str
    at: float
    reason: str


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored, with its history and token totals."""

    id: str
    text: str
    state: TaskState
    priority: int
    result: str | None
    error: str | None
    attempts: int
    created_at: float
    updated_at: float
    transitions: tuple[Transition, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    """A per-task model override (``backend:model``); None runs on the routed role."""
    parent_id: str | None = None
    """The planned task this is a subtask of."""
    step: str | None = None
    """A subtask's step id in its parent's plan (``s1``, ``s2``...)."""
    title: str | None = None
    criteria: tuple[str, ...] = ()
    """Done criteria the result must pass (see taled.tasks.gates.gates)."""
    round: int = 0
    """Which plan round of its parent a subtask belongs to (a restore starts a new one)."""
    needs: tuple[str, ...] = ()
    """Ids of the tasks this one waits for: a subtask's siblings, or for a top-level task
    the tasks it was submitted to run after (``--after``)."""
    after_any: bool = False
    """A top-level task with ``needs`` runs once they all finished, whatever became of
    them (``--after-any``); otherwise it fails when one of them fails or is cancelled."""
    waiting_for: tuple[str, ...] = ()
    """Those of ``needs`` not finished yet."""
    crashes: int = 0
    """Times the daemon crashed (a fatal error, not a kill) while running this task."""
    restore_to: str | None = None
    """The checkpoint commit a restore in progress rewinds to (None: no restore pending)."""
    workspace: str | None = None
    """The user's directory the task works on a copy of (None: a scratch one, or none)."""
    act: bool = False
    """The task acts: its model calls tools in a workspace (the agent loop)."""
    schedule_id: str | None = None
    """The schedule this task is a run of (taled.db.schedules), if any."""


@dataclass(frozen=True)
class TaskFields:
    """What a task is made of when it is asked for, checked (``TaskQueue.check``): the
    fields ``submit`` stores, and those a schedule keeps for each of its runs."""

    text: str
    priority: int
    model: str | None = None
    criteria: tuple[str, ...] = ()
    workspace: str | None = None
    act: bool = False


@dataclass(frozen=True)
class CallRecord:
    """One model call for the token ledger."""

    role: str
    backend: str
    model: str
    task_id: str | None
    prompt_tokens: int
    completion_tokens: int
    load_ms: float
    prompt_ms: float
    generation_ms: float
    total_ms: float
    success: bool
    error: str | None = None
    route: str = "role"
    """How the model was chosen: 'role', 'override' or 'fallback'."""
    note: str | None = None
    counts_exact: bool = True
    key: AttemptKey | None = None
    """The step this call served and which attempt at it (``answer``, ``plan``, ``s2``...;
    ``intent`` and ``summary`` for chat's own calls); the ledger's ``step`` and
    ``attempt`` columns."""
    conversation_id: str | None = None
    saved_tokens: int = 0
    """Prompt tokens a conversation summary kept out of this call (an estimate)."""
    looped: bool = False
    """The pool stopped the answer where it started repeating itself (taled.models.repetition)."""
    cached_tokens: int = 0
    """Of prompt_tokens, those the backend did not read again (a prefix it kept cached)."""
    at: float = field(default_factory=time.time)
    """When the call ended (it started ``total_ms`` earlier)."""


def _row_to_task(row: Any) -> TaskRecord:
    # A SQLAlchemy row or a raw read's (taled.db.engine.fetch): both name their columns.
    return TaskRecord(
        id=row.id,
        text=row.text,
        state=TaskState(row.state),
        priority=row.priority,
        result=row.result,
        error=row.error,
        attempts=row.attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        model=row.model,
        parent_id=row.parent_id,
        step=row.step,
        title=row.title,
        criteria=tuple(json.loads(row.criteria)) if row.criteria else (),
        round=row.round,
        crashes=row.crashes,
        restore_to=row.restore_to,
        workspace=row.workspace,
        act=bool(row.act),
        schedule_id=row.schedule_id,
        after_any=bool(row.after_any),
    )


@dataclass(frozen=True)
class SubtaskSpec:
    """One subtask to create from a plan step."""

    step: str
    title: str
    text: str
    needs: tuple[str, ...]
    """Step ids (of the same plan) this one waits for."""
    act: bool = False
    """The step acts in its parent's workspace (the parent is an acting task)."""


class Store:
    """The daemon's persistent state. ``open()`` before use, ``close()`` after.

    The repository of tasks, their transitions and the token ledger, over one
    ``taled.db.engine.Database`` (which other repositories of ``taled.db`` share
    through ``read()`` and ``write()``).
    """

    def __init__(self, path: Path, settings: StoreSettings, write_batch_max: int) -> None:
        self.path = path
        self._db = Database(path, settings, write_batch_max, on_settled=self._settled)
        self._ledger_pending: set[asyncio.Future[Any]] = set()
        self._watchers: list[Callable[[Moved], None]] = []
        # Moves made in the group commit under way; told to the watchers once it commits.
        self._uncommitted: list[Moved] = []

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and start the writer."""
        await self._db.open()

    async def close(self) -> None:
        """Flush pending writes, stop the writer and close every connection."""
        await self._db.close()

    async def schema_version(self) -> int:
        """The schema version recorded in the database file."""
        return await self._db.schema_version()

    # -- the writer --------------------------------------------------------

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` inside the next group commit; if it fails, none of it is kept and
        the batch's other writes are."""
        if not self._watchers:
            return await self._db.write(fn)

        async def tracked(conn: AsyncConnection) -> T:
            moves: list[Moved] = []
            token = _MOVES.set(moves)
            try:
                value = await fn(conn)
            finally:
                _MOVES.reset(token)
            # Only a write that succeeded keeps its moves (a failed one's savepoint is undone).
            self._uncommitted.extend(moves)
            return value

        return await self._db.write(tracked)

    async def write_raw(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with SQLite's own connection inside the next group commit, in one
        trip to its thread (``Database.write_raw``): for writes a person waits for."""
        return await self._db.write_raw(fn)

    # -- watching state changes ------------------------------------------

    def watch(self, fn: Callable[[Moved], None]) -> None:
        """Call ``fn`` with every task's state change once its transaction commits, in
        commit order (a caller that stopped waiting for its write does not stop that).
        ``fn`` runs in the writer's turn: it must return at once (put the change in a
        queue); an exception it raises is logged and goes no further."""
        self._watchers.append(fn)

    def _settled(self, committed: bool) -> None:
        moves, self._uncommitted = self._uncommitted, []
        if not committed:
            return
        for moved in moves:
            for fn in self._watchers:
                try:
                    fn(moved)
                except Exception:
                    log.exception(
                        "a watcher of task %s's move to %s failed", moved.task_id, moved.to_state
                    )

    # -- tasks -------------------------------------------------------------

    async def submit(
        self,
        text: str,
        priority: int,
        model: str | None = None,
        criteria: Sequence[str] = (),
        *,
        workspace: str | None = None,
        act: bool = False,
        after: Sequence[str] = (),
        after_any: bool = False,
    ) -> TaskRecord:
        """Persist a new queued task; returns once it is committed to disk.

        ``after`` are ids, or unique prefixes, of top-level tasks it waits for
        (``--after``): each resolved and checked in the transaction that writes the task,
        so nothing is written when one is unknown, ambiguous, a subtask, or already
        failed or cancelled (unless ``after_any``).
        """
        now = time.time()
        task_id = new_task_id()
        row: dict[str, Any] = {
            "id": task_id,
            "text": text,
            "state": TaskState.QUEUED.value,
            "priority": priority,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "model": model,
            "criteria": json.dumps(list(criteria)) if criteria else None,
            "workspace": workspace,
            "act": act,
            "after_any": after_any,
        }
        if after:

            async def apply(conn: AsyncConnection) -> None:
                found = await _resolve_after(conn, task_id, after, after_any)
                await _insert_submitted(conn, [row])
                await conn.execute(
                    task_deps.insert(), [{"task_id": task_id, "needs_id": n} for n in found]
                )

            await self.write(apply)
            return await self.get_task(task_id)  # with what it waits for
        await self._db.write_row(_insert_submitted, row)
        return TaskRecord(
            id=task_id,
            text=text,
            state=TaskState.QUEUED,
            priority=priority,
            result=None,
            error=None,
            attempts=0,
            created_at=now,
            updated_at=now,
            transitions=(Transition(None, TaskState.QUEUED.value, now, "submitted"),),
            model=model,
            criteria=tuple(criteria),
            workspace=workspace,
            act=act,
        )

    async def transition(
        self,
        task_id: str,
        target: TaskState,
        reason: str,
        *,
        expect: TaskState | None = None,
        restoring: bool = False,
        **fields: Any,
    ) -> TaskState:
        """Move a task to ``target`` (checked by the state machine); returns the old state.

        ``expect`` makes the change conditional: if the task is no longer in that
        state (say it was cancelled meanwhile), IllegalTransition is raised.
        """

        async def apply(conn: AsyncConnection) -> TaskState:
            current = await _current_state(conn, task_id)
            if expect is not None and current != expect:
                raise IllegalTransition(
                    f"task {task_id} is {current}, no longer {expect}; it was not moved to {target}"
                )
            check_transition(task_id, current, target, restoring=restoring)
            await _move(conn, task_id, current, target, reason, **fields)
            return current

        return await self.write(apply)

    async def set_priority(self, task_id: str, priority: int) -> None:
        """Change the priority of a task and its unfinished subtasks; NotFound if unknown."""

        async def apply(conn: AsyncConnection) -> None:
            await _current_state(conn, task_id)
            below = [r.id for r in await _subtree(conn, task_id) if r.state not in _FINAL]
            await conn.execute(
                tasks.update()
                .where(tasks.c.id.in_([task_id, *below]))
                .values(priority=priority, updated_at=time.time())
            )

        await self.write(apply)

    async def claim_next(self) -> TaskRecord | None:
        """Move the most urgent queued task to running and return it, or None."""

        async def apply(conn: AsyncConnection) -> TaskRecord | None:
            while True:
                row = (await conn.execute(_NEXT_READY)).first()
                if row is None:
                    return None
                try:
                    task = _row_to_task(row)
                except (ValueError, TypeError) as exc:
                    # Claimed again and again, a row that cannot be read would stop
                    # the whole queue: it fails, and the next one is claimed.
                    why = f"its record in {self.path} is damaged ({exc}); it cannot run"
                    log.error("task %s %s", row.id, why)
                    await _move(conn, row.id, TaskState.QUEUED, TaskState.FAILED, why, error=why)
                    continue
                await _move(
                    conn,
                    row.id,
                    TaskState.QUEUED,
                    TaskState.RUNNING,
                    "picked up by a worker",
                    attempts=row.attempts + 1,
                )
                return task

        return await self.write(apply)

    async def requeue_running(
        self, reason: str, *, crash: str | None = None, quarantine_after: int = 0
    ) -> list[str]:
        """Put every running task back in the queue (crash recovery); return their ids.

        So are waiting ones, except a planned task whose subtasks are still
        unfinished (it goes on waiting for them) and an acting task waiting for a
        person's answer (it goes on waiting for that).

        ``crash`` says what the previous run died of when it died of a fatal error
        of its own (not a kill): each task that was running has one crash counted,
        and one that reaches ``quarantine_after`` crashes (0: never) is failed
        instead of run again: quarantined.
        """

        async def apply(conn: AsyncConnection) -> list[str]:
            rows = (await conn.execute(_INTERRUPTED)).all()
            moved = []
            for row in rows:
                current = TaskState(row.state)
                if crash is not None and current == TaskState.RUNNING:
                    crashes = row.crashes + 1
                    if quarantine_after and crashes >= quarantine_after:
                        why = (
                            f"quarantined: the daemon crashed {crashes} times while running "
                            f"this task (last: {crash}); it is not run again by itself. "
                            f"`tale restore {row.id}` runs it again"
                        )
                        await _move(
                            conn, row.id, current, TaskState.FAILED, why, error=why, crashes=crashes
                        )
                        log.error("task %s %s", row.id, why)
                        continue
                    await _move(conn, row.id, current, TaskState.QUEUED, reason, crashes=crashes)
                    moved.append(row.id)
                    continue
                if current == TaskState.WAITING:
                    await _move(conn, row.id, current, TaskState.RUNNING, reason)
                    current = TaskState.RUNNING
                await _move(conn, row.id, current, TaskState.QUEUED, reason)
                moved.append(row.id)
            return moved

        return await self.write(apply)

    async def mark_restore(self, task_id: str, commit: str, expect: TaskState) -> None:
        """Record that a restore to ``commit`` begins, before its checkpoint is written.

        IllegalTransition if the task left ``expect`` or another restore of it is
        under way. A daemon that dies before ``finish_restore`` finishes it on start.
        """

        async def apply(conn: AsyncConnection) -> None:
            row = (
                await conn.execute(
                    sa.select(tasks.c.state, tasks.c.restore_to).where(tasks.c.id == task_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
            if row.state != expect.value:
                raise IllegalTransition(
                    f"task {task_id} is {row.state}, no longer {expect}; it was not restored"
                )
            if row.restore_to is not None:
                raise IllegalTransition(f"task {task_id} is being restored already")
            await conn.execute(
                tasks.update().where(tasks.c.id == task_id).values(restore_to=commit)
            )

        await self.write(apply)

    async def finish_restore(self, task_id: str, reason: str, plan_round: int) -> bool:
        """Queue a task whose restore checkpoint is written, clearing its restore mark.

        One transaction. False (the mark cleared, the task left as it is) when it is no
        longer paused or failed, say cancelled while being restored.
        """

        async def apply(conn: AsyncConnection) -> bool:
            current = await _current_state(conn, task_id)
            await conn.execute(tasks.update().where(tasks.c.id == task_id).values(restore_to=None))
            if current not in RESTORE_TRANSITIONS:
                return False
            check_transition(task_id, current, TaskState.QUEUED, restoring=True)
            await _move(
                conn,
                task_id,
                current,
                TaskState.QUEUED,
                reason,
                error=None,
                result=None,
                round=plan_round,
                crashes=0,
            )
            return True

        return await self.write(apply)

    async def unmark_restore(self, task_id: str) -> None:
        """Forget a restore that did not happen (its checkpoint was never written)."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(tasks.update().where(tasks.c.id == task_id).values(restore_to=None))

        await self.write(apply)

    async def pending_restores(self) -> list[TaskRecord]:
        """Tasks whose restore was begun and not finished (a crash cut it off)."""
        async with self.read() as conn:
            rows = (
                await conn.execute(sa.select(tasks).where(tasks.c.restore_to.is_not(None)))
            ).all()
        return [_row_to_task(r) for r in rows]

    async def get_task(self, task_id: str) -> TaskRecord:
        """One task with its transitions and token totals; NotFound if unknown.

        A point read on the event loop's thread (``Database.read_now``): `tale status`
        and watchers poll it while llama.cpp holds the cores."""
        rows = await self._db.read_now(
            functools.partial(fetch, sql=_TASK_BY_ID_SQL, params={"task_id": task_id})
        )
        row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
        return _full_row_to_task(row)

    async def task_id(self, given: str) -> str:
        """The id of the one task whose id starts with ``given`` (a full id, or at least
        ``MIN_PREFIX`` of its hex digits); NotFound / InvalidInput saying which."""
        ref = normalise(given, _TASK_IDS)
        if len(ref) == TASK_ID_DIGITS:
            return ref  # whole: the caller's read says whether it exists
        async with self.read() as conn:
            return str((await by_prefix(conn, tasks.c.id, ref, _TASK_IDS)).id)

    async def dependencies(self, task_id: str) -> list[TaskRecord]:
        """The tasks a task waits for (``needs``), oldest first."""
        query = (
            sa.select(tasks)
            .join(task_deps, task_deps.c.needs_id == tasks.c.id)
            .where(task_deps.c.task_id == task_id)
            .order_by(tasks.c.created_at, tasks.c.id)
        )
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_task(r) for r in rows]

    async def add_subtasks(
        self, parent: TaskRecord, plan_round: int, specs: Sequence[SubtaskSpec], reason: str
    ) -> bool:
        """Create a planned task's subtasks and move it to ``waiting``, in one transaction.

        Steps that already have a live (or completed) subtask in this round are
        not created again, so a parent resumed after a crash reuses them. If every
        subtask has already finished, the parent stays running and False is
        returned (nobody would wake it otherwise).
        """

        async def apply(conn: AsyncConnection) -> bool:
            current = await _current_state(conn, parent.id)
            if current != TaskState.RUNNING:
                raise IllegalTransition(
                    f"task {parent.id} is {current}, no longer running; its subtasks "
                    "were not created"
                )
            existing = {
                r.step: r.id
                for r in (
                    await conn.execute(
                        sa.select(tasks.c.id, tasks.c.step).where(
                            tasks.c.parent_id == parent.id,
                            tasks.c.round == plan_round,
                            tasks.c.state.notin_(
                                [TaskState.CANCELLED.value, TaskState.FAILED.value]
                            ),
                        )
                    )
                ).all()
            }
            now = time.time()
            ids = dict(existing)
            rows: list[dict[str, Any]] = []
            for spec in specs:
                if spec.step in ids:
                    continue
                ids[spec.step] = new_task_id()
                rows.append(
                    {
                        "id": ids[spec.step],
                        "text": spec.text,
                        "state": TaskState.QUEUED.value,
                        "priority": parent.priority,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                        "model": parent.model,
                        "parent_id": parent.id,
                        "step": spec.step,
                        "title": spec.title,
                        "criteria": None,
                        "round": plan_round,
                        "act": spec.act,
                    }
                )
            if rows:
                await _insert_submitted(conn, rows, reason=f"planned as a step of {parent.id}")
                created = {r["step"] for r in rows}
                deps = [
                    {"task_id": ids[s.step], "needs_id": ids[n]}
                    for s in specs
                    if s.step in created
                    for n in s.needs
                    if n in ids
                ]
                if deps:
                    await conn.execute(task_deps.insert(), deps)
            await conn.execute(
                tasks.update().where(tasks.c.id == parent.id).values(round=plan_round)
            )
            unfinished = (
                await conn.execute(sa.select(_has_unfinished_children(sa.literal(parent.id))))
            ).scalar_one()
            if not unfinished:
                return False
            await _move(conn, parent.id, current, TaskState.WAITING, reason)
            return True

        return await self.write(apply)

    async def children(self, parent_id: str, plan_round: int | None = None) -> list[TaskRecord]:
        """A task's subtasks in plan order, each with the ids it needs."""
        params: dict[str, Any] = {"parent_id": parent_id, "round": plan_round}
        rows = await self._db.read_now(functools.partial(fetch, sql=_CHILDREN_SQL, params=params))
        return [_full_row_to_task(r) for r in rows]

    async def subtree(self, task: TaskRecord) -> dict[str, list[TaskRecord]]:
        """Every subtask under ``task``, at every depth, each of its own parent's current
        plan round: ``{parent id: its subtasks in plan order}`` (``children`` for each,
        in one point read on the event loop's thread rather than one per level)."""
        rows = await self._db.read_now(
            functools.partial(fetch, sql=_SUBTREE_SQL, params={"root": task.id})
        )
        out: dict[str, list[TaskRecord]] = {}
        for row in rows:
            child = _full_row_to_task(row)
            assert child.parent_id is not None, "the subtree holds subtasks only"
            out.setdefault(child.parent_id, []).append(child)
        return out

    async def wake_parent(self, parent_id: str, reason: str) -> bool:
        """Queue a waiting parent whose subtasks of its round all finished; True if moved."""

        async def apply(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(
                    sa.select(tasks.c.state).where(
                        tasks.c.id == parent_id, ~_has_unfinished_children(tasks.c.id)
                    )
                )
            ).first()
            if row is None or row.state != TaskState.WAITING.value:
                return False
            await _move(conn, parent_id, TaskState.WAITING, TaskState.QUEUED, reason)
            return True

        return await self.write(apply)

    async def move_descendants(
        self, task_id: str, target: TaskState, sources: Sequence[TaskState], reason: str
    ) -> list[TaskRecord]:
        """Move every subtask below a task that is in one of ``sources`` to ``target``.

        One transaction, so a worker cannot claim a subtask halfway through (a
        cascade read first and moved later could miss one). Returns the subtasks
        as they were before the move.
        """

        async def apply(conn: AsyncConnection) -> list[TaskRecord]:
            moved = [r for r in await _subtree(conn, task_id) if TaskState(r.state) in sources]
            for row in moved:
                await _move(conn, row.id, TaskState(row.state), target, reason)
            return [_row_to_task(r) for r in moved]

        return await self.write(apply)

    async def finished_before(self, task_ids: Sequence[str], cutoff: float) -> list[str]:
        """Those of ``task_ids`` that are completed, failed or cancelled since before ``cutoff``."""
        async with self.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.id).where(
                        tasks.c.id.in_(list(task_ids)),
                        tasks.c.state.in_(_FINAL),
                        tasks.c.updated_at < cutoff,
                    )
                )
            ).all()
        return [r.id for r in rows]

    async def list_tasks(self, state: TaskState | None, limit: int) -> list[TaskRecord]:
        """Top-level tasks newest first, optionally only those in ``state``."""
        params: dict[str, Any] = {"limit": limit}
        query = _TASKS_NEWEST
        if state is not None:
            query, params["state"] = _TASKS_NEWEST_IN_STATE, state.value
        async with self.read() as conn:
            rows = (await conn.execute(query, params)).all()
        return [_full_row_to_task(r) for r in rows]

    async def count_by_state(self) -> dict[str, int]:
        """How many tasks are in each state."""
        async with self.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # -- the token ledger --------------------------------------------------

    def record_call(self, call: CallRecord) -> None:
        """Append one model call to the ledger, without waiting for the commit.

        A reply must not wait for the ledger's fsync. Nothing is lost by not
        waiting: the writer is FIFO, so the row commits before any later write
        (a task's completion, say), ``close()`` drains it, and the ledger's own
        read (``usage``) waits for rows still in flight.
        """

        row = {k: v for k, v in call.__dict__.items() if k != "key"}
        row["step"] = call.key.step if call.key is not None else None
        row["attempt"] = call.key.number if call.key is not None else 1

        future = self._db.write_raw_nowait(functools.partial(_insert_call, row))
        if future is None:
            log.error("ledger row for %s:%s dropped: the store is closed", call.backend, call.model)
            return
        self._ledger_pending.add(future)
        future.add_done_callback(self._ledger_done)

    def _ledger_done(self, future: asyncio.Future[Any]) -> None:
        self._ledger_pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("a ledger row could not be written: %s", future.exception())

    async def ledger_settled(self) -> None:
        """Wait until every ledger row appended so far is committed (or has failed)."""
        await self._ledger_settled()

    async def _ledger_settled(self) -> None:
        if self._ledger_pending:
            await asyncio.wait(set(self._ledger_pending))

    async def usage(self) -> dict[str, Any]:
        """Ledger totals overall, by model, by role, and by role and route.

        The route says how a call's model was chosen: the role's own ('role'),
        a per-task override, or the fallback while the role was down.
        """
        await self._ledger_settled()
        c = model_calls.c
        cols = (
            sa.func.count().label("calls"),
            sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(c.completion_tokens), 0).label("completion_tokens"),
            sa.func.coalesce(sa.func.sum(sa.case((c.success, 0), else_=1)), 0).label("failures"),
            sa.func.coalesce(sa.func.sum(c.total_ms), 0.0).label("total_ms"),
        )
        async with self.read() as conn:
            total = (await conn.execute(sa.select(*cols))).one()
            by_model = (
                await conn.execute(
                    sa.select(c.backend, c.model, *cols)
                    .group_by(c.backend, c.model)
                    .order_by(c.backend, c.model)
                )
            ).all()
            by_role = (
                await conn.execute(sa.select(c.role, *cols).group_by(c.role).order_by(c.role))
            ).all()
            by_route = (
                await conn.execute(
                    sa.select(c.role, c.route, *cols)
                    .group_by(c.role, c.route)
                    .order_by(c.role, c.route)
                )
            ).all()
        return {
            "total": _totals(total),
            "by_model": [{"backend": r.backend, "model": r.model, **_totals(r)} for r in by_model],
            "by_role": [{"role": r.role, **_totals(r)} for r in by_role],
            "by_route": [{"role": r.role, "route": r.route, **_totals(r)} for r in by_route],
        }

    # -- helpers -----------------------------------------------------------

    def read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A reader connection (``async with store.read() as conn``)."""
        return self._db.read()

    async def backup(self, directory: Path, keep: int) -> Path | None:
        """Back the database up into ``directory``, keeping the newest ``keep`` backups.

        None when nothing changed since the newest backup. Runs in a thread with one
        read snapshot (see ``taled.doctor.take_backup``): the writer never waits for it.
        """
        return await self._db.backup(directory, keep)

    async def scrub(self) -> bool:
        """Rewrite the database without free space and empty its write-ahead log, in the
        writer's turn (``taled.db.engine.Database.scrub``); False if the log stayed busy."""
        return await self._db.scrub()

    async def replace_backups(self, directory: Path, *, take: bool) -> Path | None:
        """Replace the backups in ``directory`` by one taken now (``take``) or by none."""
        return await self._db.replace_backups(directory, take=take)


_INSERT_CALL = raw_sql(
    model_calls.insert(),
    [f.name for f in fields(CallRecord) if f.name != "key"] + ["step", "attempt"],
)


def _insert_call(row: dict[str, Any], conn: sqlite3.Connection) -> None:
    conn.execute(_INSERT_CALL, row)


async def _insert_submitted(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], reason: str = "submitted"
) -> None:
    """New queued tasks, each with its first transition (one executemany for each)."""
    await conn.execute(tasks.insert(), list(rows))
    await conn.execute(
        transitions.insert(),
        [
            {
                "task_id": r["id"],
                "from_state": None,
                "to_state": TaskState.QUEUED.value,
                "at": r["created_at"],
                "reason": reason,
            }
            for r in rows
        ],
    )


def _full_tasks() -> sa.Select[Any]:
    """Tasks with their history and token totals in one statement.

    One statement rather than one per part: a task's transitions (as a JSON array)
    and ledger sums come back in the same row. Every part is an index search
    (tests/test_store.py pins it), which ``get_task`` needs: it reads on the event
    loop's thread (``Database.read_now``).
    """
    history = (
        sa.select(
            sa.func.json_group_array(
                sa.func.json_array(
                    transitions.c.seq,
                    transitions.c.from_state,
                    transitions.c.to_state,
                    transitions.c.at,
                    transitions.c.reason,
                )
            )
        )
        .where(transitions.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    prompt = (
        sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.prompt_tokens), 0))
        .where(model_calls.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    completion = (
        sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.completion_tokens), 0))
        .where(model_calls.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    needs = (
        sa.select(sa.func.json_group_array(task_deps.c.needs_id))
        .where(task_deps.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    dep = tasks.alias("dep")
    waiting = (
        sa.select(sa.func.json_group_array(task_deps.c.needs_id))
        .where(
            task_deps.c.task_id == tasks.c.id,
            dep.c.id == task_deps.c.needs_id,
            dep.c.state.notin_(_FINAL),
        )
        .scalar_subquery()
    )
    return sa.select(
        tasks,
        history.label("history"),
        prompt.label("prompt_total"),
        completion.label("completion_total"),
        needs.label("needs"),
        waiting.label("waiting_for"),
    )


def _has_unfinished_children(parent: Any) -> Any:
    """EXISTS a subtask of ``parent``, in its parent's current round, not yet final."""
    child = tasks.alias("child")
    me = tasks.alias("me")
    return sa.exists().where(
        child.c.parent_id == parent,
        me.c.id == parent,
        child.c.round == me.c.round,
        child.c.state.notin_(_FINAL),
    )


def _unmet_needs() -> Any:
    """EXISTS a dependency of the outer task that has not completed (for a task that runs
    after its dependencies whatever became of them, one that has not finished)."""
    dep = tasks.alias("dep")
    return sa.exists().where(
        task_deps.c.task_id == tasks.c.id,
        dep.c.id == task_deps.c.needs_id,
        dep.c.state != TaskState.COMPLETED.value,
        sa.or_(~tasks.c.after_any, dep.c.state.notin_(_FINAL)),
    )


# Built once: constructing and cache-keying these statements per call cost more
# than running them (profiled on get_task).
_TASK_BY_ID = _full_tasks().where(tasks.c.id == sa.bindparam("task_id"))
_TASKS_NEWEST = (
    _full_tasks()
    .where(tasks.c.parent_id.is_(None))
    .order_by(tasks.c.created_at.desc(), tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_CHILDREN = (
    _full_tasks()
    .where(
        tasks.c.parent_id == sa.bindparam("parent_id"),
        sa.or_(sa.bindparam("round").is_(None), tasks.c.round == sa.bindparam("round")),
    )
    .order_by(tasks.c.round, tasks.c.created_at, tasks.c.step, tasks.c.id)
)


def _current_subtree() -> sa.Select[Any]:
    """Every subtask under the task ``root``, each of its parent's current round, in
    ``_CHILDREN``'s order within a parent. Each level is an index search on parent_id."""
    parent = tasks.alias("parent")
    anchor = sa.select(tasks.c.id).where(tasks.c.id == sa.bindparam("root"))
    under = anchor.cte("under", recursive=True)
    child = tasks.alias("child")
    under = under.union_all(
        sa.select(child.c.id)
        .join(under, child.c.parent_id == under.c.id)
        .join(parent, parent.c.id == under.c.id)
        .where(child.c.round == parent.c.round)
    )
    return (
        _full_tasks()
        .where(tasks.c.id.in_(sa.select(under.c.id)), tasks.c.id != sa.bindparam("root"))
        .order_by(tasks.c.parent_id, tasks.c.round, tasks.c.created_at, tasks.c.step, tasks.c.id)
    )


_SUBTREE = _current_subtree()
# The most urgent queued task whose dependencies have all completed.
_NEXT_READY = (
    sa.select(tasks)
    .where(tasks.c.state == TaskState.QUEUED.value, ~_unmet_needs())
    .order_by(tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id)
    .limit(1)
)
# A task waiting for a person (a pending approval or question) goes on waiting: the
# answer, not a restart, is what moves it.
_WAITS_FOR_A_PERSON = sa.exists().where(
    approvals.c.task_id == tasks.c.id, approvals.c.state == "pending"
)
_INTERRUPTED = sa.select(tasks.c.id, tasks.c.state, tasks.c.crashes).where(
    sa.or_(
        tasks.c.state == TaskState.RUNNING.value,
        sa.and_(
            tasks.c.state == TaskState.WAITING.value,
            ~_has_unfinished_children(tasks.c.id),
            ~_WAITS_FOR_A_PERSON,
        ),
    )
)
_TASKS_NEWEST_IN_STATE = _TASKS_NEWEST.where(tasks.c.state == sa.bindparam("state"))
# The point reads get_task polls, as SQL for Database.read_now.
_TASK_BY_ID_SQL = raw_sql(_TASK_BY_ID)
_CHILDREN_SQL = raw_sql(_CHILDREN)
_SUBTREE_SQL = raw_sql(_SUBTREE)


def _full_row_to_task(row: Any) -> TaskRecord:
    # SQLite 3.40 has no ORDER BY inside aggregates: sort by seq here.
    history = sorted(json.loads(row.history)) if row.history else []
    return replace(
        _row_to_task(row),
        transitions=tuple(Transition(f, t, at, reason) for _seq, f, t, at, reason in history),
        prompt_tokens=int(row.prompt_total),
        completion_tokens=int(row.completion_total),
        needs=tuple(json.loads(row.needs)) if row.needs else (),
        waiting_for=tuple(json.loads(row.waiting_for)) if row.waiting_for else (),
    )


def _totals(row: Any) -> dict[str, Any]:
    return {
        "calls": int(row.calls),
        "prompt_tokens": int(row.prompt_tokens),
        "completion_tokens": int(row.completion_tokens),
        "total_tokens": int(row.prompt_tokens) + int(row.completion_tokens),
        "failures": int(row.failures),
        "total_ms": round(float(row.total_ms), 1),
    }


async def _subtree(conn: AsyncConnection, task_id: str) -> list[sa.Row[Any]]:
    """Every subtask below a task (all columns), parents before their children."""
    out: list[sa.Row[Any]] = []
    frontier = [task_id]
    while frontier:
        rows = (await conn.execute(sa.select(tasks).where(tasks.c.parent_id.in_(frontier)))).all()
        out.extend(rows)
        frontier = [r.id for r in rows]
    return out


async def _current_state(conn: AsyncConnection, task_id: str) -> TaskState:
    state = (
        await conn.execute(sa.select(tasks.c.state).where(tasks.c.id == task_id))
    ).scalar_one_or_none()
    if state is None:
        raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
    return TaskState(state)


async def _move(
    conn: AsyncConnection,
    task_id: str,
    current: TaskState,
    target: TaskState,
    reason: str,
    **fields: Any,
) -> None:
    now = time.time()
    await conn.execute(
        tasks.update()
        .where(tasks.c.id == task_id)
        .values(state=target.value, updated_at=now, **fields)
    )
    await conn.execute(
        transitions.insert().values(
            task_id=task_id, from_state=current.value, to_state=target.value, at=now, reason=reason
        )
    )
    moves = _MOVES.get()
    if moves is not None:
        moves.append(Moved(task_id, current, target, now, reason))
    if target in (TaskState.FAILED, TaskState.CANCELLED):
        await _fail_dependents(conn, task_id, target, fields.get("error") or reason)


# What a task named by a prefix of its id (`tale status 403e`) is told when it names
# none, or several.
_TASK_IDS = IdMessages(
    invalid="{given!r} is not a task id: give it, or at least {min} of its hex digits "
    "(`tale list` shows the ids)",
    missing="no task id starts with {ref}; `tale list` shows the ids",
    ambiguous="more than one task id starts with {ref} ({first}, {second}, ...); give more digits",
)
# What ``--after`` says when a task id it was given names none, or several.
_AFTER_IDS = IdMessages(
    invalid="after {given!r}: give a task id, or at least {min} of its hex digits "
    "(`tale list` shows the ids)",
    missing="after {ref}: no task with that id; `tale list` shows the ids",
    ambiguous="after {ref}: more than one task starts with {ref} ({first}, {second}, ...); "
    "give more digits",
)
# Characters of a failed dependency's reason quoted in its dependents' reasons.
_CAUSE_CHARS = 300
_DEPENDENT_STATES = (TaskState.QUEUED.value, TaskState.PAUSED.value)


async def _fail_dependents(conn: AsyncConnection, task_id: str, state: TaskState, why: str) -> None:
    """Fail the top-level tasks waiting to run after ``task_id``, which just ended ``state``
    (failed or cancelled), unless they run whatever became of it; theirs in turn, and so
    on: in the transaction that ended it, so no crash leaves one waiting for nothing."""
    dependents = (
        await conn.execute(
            sa.select(tasks.c.id, tasks.c.state)
            .join(task_deps, task_deps.c.task_id == tasks.c.id)
            .where(
                task_deps.c.needs_id == task_id,
                tasks.c.parent_id.is_(None),
                ~tasks.c.after_any,
                tasks.c.state.in_(_DEPENDENT_STATES),
            )
        )
    ).all()
    what = "failed" if state == TaskState.FAILED else "was cancelled"
    reason = f"it was to run after task {task_id}, which {what}: {one_line(why, _CAUSE_CHARS)}"
    for row in dependents:
        await _move(conn, row.id, TaskState(row.state), TaskState.FAILED, reason, error=reason)


async def _resolve_after(
    conn: AsyncConnection, task_id: str, refs: Sequence[str], after_any: bool
) -> tuple[str, ...]:
    """The ids of the tasks a new task ``task_id`` is to run after, from ids or unique
    prefixes, in the order given; InvalidInput / NotFound naming the one that is wrong."""
    found: list[str] = []
    for given in refs:
        ref = normalise(given, _AFTER_IDS)
        dep = await by_prefix(conn, tasks.c.id, ref, _AFTER_IDS)
        if dep.id == task_id:
            raise InvalidInput(f"after {ref}: a task cannot run after itself")
        if dep.parent_id is not None:
            raise InvalidInput(
                f"after {ref}: task {dep.id} is a step of task {dep.parent_id}; run after "
                f"the whole task instead: after {dep.parent_id}"
            )
        if dep.state in (TaskState.FAILED.value, TaskState.CANCELLED.value) and not after_any:
            why = one_line(dep.error or "no reason recorded", _CAUSE_CHARS)
            again = (
                f"restore it first (`tale restore {dep.id}`)"
                if dep.state == TaskState.FAILED.value
                else "submit it again"
            )
            raise InvalidInput(
                f"after {ref}: task {dep.id} already {dep.state} ({why}), so a task after it "
                f"would never run; {again}, or run regardless of it with --after-any"
            )
        if dep.id not in found:
            found.append(dep.id)
    cycle = await _path_to(conn, found, task_id)
    if cycle:
        chain = " → ".join([task_id, *cycle, task_id])
        raise InvalidInput(f"after: that would make a cycle of dependencies: {chain}")
    return tuple(found)


async def _path_to(conn: AsyncConnection, starts: Sequence[str], target: str) -> list[str]:
    """A chain of dependencies from one of ``starts`` to ``target`` (empty if none): the
    cycle a new edge ``target → starts`` would close. A new task has no dependents, so
    this finds one only if ids resolve oddly; it is checked all the same."""
    came_from: dict[str, str | None] = {s: None for s in starts}
    frontier = list(starts)
    while frontier:
        if target in came_from:
            chain: list[str] = []
            at = came_from[target]
            while at is not None:
                chain.append(at)
                at = came_from[at]
            return chain[::-1]
        rows = (
            await conn.execute(
                sa.select(task_deps.c.task_id, task_deps.c.needs_id).where(
                    task_deps.c.task_id.in_(frontier)
                )
            )
        ).all()
        frontier = []
        for r in rows:
            if r.needs_id not in came_from:
                came_from[r.needs_id] = r.task_id
                frontier.append(r.needs_id)
    return []
