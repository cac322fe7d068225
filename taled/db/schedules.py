"""What schedules keep in the store: the schedules themselves and what became of each
time one came due.

A schedule holds the fields of the task each of its runs creates, when it runs (a
one-off ``at`` or a recurring ``every``, as given and as cron) and its next run as a
UTC epoch. Firing a due time is one transaction (``fire``): the run's task is inserted,
the time's outcome recorded and ``next_run`` advanced together, and only if the
schedule is still active with that same ``next_run`` — so a kill -9 at any moment
leaves either all of it or none of it, and a due time is never acted on twice (the
``(schedule_id, due_at)`` unique key of ``schedule_runs`` says so a second time).

When a schedule runs is the business of ``taled.schedules``; this module stores what
it decided.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.ids import IdMessages, by_prefix, normalise
from taled.db.schema import schedule_runs, schedules, tasks
from taled.db.store import Store, TaskFields, _insert_submitted, new_task_id
from taled.errors import IllegalTransition, NotFound
from taled.tasks.lifecycle import TaskState

__all__ = [
    "Firing",
    "MissedPolicy",
    "NewSchedule",
    "RunOutcome",
    "Schedule",
    "ScheduleKind",
    "ScheduleRecords",
    "ScheduleRun",
    "ScheduleState",
]

# What a person is told when a schedule id they gave names none, or several.
_SCHEDULE_IDS = IdMessages(
    invalid="schedule id {ref!r}: give at least {min} hex digits of an id `tale schedules` lists",
    missing="no schedule with id {ref}; `tale schedules` lists them",
    ambiguous="more than one schedule starts with {ref}; give more digits",
)


class ScheduleKind(StrEnum):
    AT = "at"
    """Once, at a time."""
    EVERY = "every"
    """Again and again, at the times of a cron expression."""


class ScheduleState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    DONE = "done"
    """A one-off that ran (or whose time was skipped)."""


class MissedPolicy(StrEnum):
    """What a schedule does about times that came due while the daemon was down."""

    SKIP = "skip"
    """Run none of them; wait for the next time."""
    RUN_ONCE = "run_once"
    """Run once now, standing for all of them."""


class RunOutcome(StrEnum):
    """What became of one due time."""

    RAN = "ran"
    """Its task was created on time."""
    CAUGHT_UP = "caught_up"
    """It passed while the daemon was down; one task was created late for it (and for
    any others that passed since, counted in ``missed``)."""
    SKIPPED = "skipped"
    """It passed while the daemon was down and the policy was skip: no task."""


@dataclass(frozen=True)
class NewSchedule:
    """A schedule to store, checked and with its first run computed."""

    task: TaskFields
    kind: ScheduleKind
    expression: str
    """As the person gave it (``mon-fri 08:30``, ``07:00``)."""
    cron: str | None
    """The cron expression an ``every`` stands for; None for ``at``."""
    timezone: str
    """The IANA zone its times are computed in."""
    next_run: float
    missed_policy: MissedPolicy


@dataclass(frozen=True)
class Schedule:
    """A schedule as stored."""

    id: str
    task: TaskFields
    kind: ScheduleKind
    expression: str
    cron: str | None
    timezone: str
    next_run: float | None
    """UTC epoch of the next due time; None once a one-off is done."""
    state: ScheduleState
    missed_policy: MissedPolicy
    created_at: float
    updated_at: float
    last_run: float | None
    """When its last task was created."""
    runs: int
    """Tasks it created."""
    missed_runs: int
    """Due times that passed while the daemon was down (whatever the policy did)."""
    last_task_id: str | None


@dataclass(frozen=True)
class ScheduleRun:
    """What became of one due time of a schedule."""

    schedule_id: str
    due_at: float
    at: float
    outcome: RunOutcome
    missed: int
    """Due times it stands for that got no task of their own (itself included when
    it was missed)."""
    task_id: str | None


@dataclass(frozen=True)
class Firing:
    """The scheduler's decision about one due time, for ``fire`` to carry out."""

    schedule_id: str
    due_at: float
    """The ``next_run`` the schedule must still have; otherwise nothing is done."""
    outcome: RunOutcome
    missed: int
    next_run: float | None
    """The due time after this one; None: the schedule is done."""
    reason: str
    """The first transition's reason of the task it creates (none when skipped)."""


def _fields(row: sa.Row[Any]) -> TaskFields:
    return TaskFields(
        text=row.text,
        priority=row.priority,
        model=row.model,
        criteria=tuple(json.loads(row.criteria)) if row.criteria else (),
        workspace=row.workspace,
        act=bool(row.act),
    )


def _schedule(row: sa.Row[Any]) -> Schedule:
    return Schedule(
        id=row.id,
        task=_fields(row),
        kind=ScheduleKind(row.kind),
        expression=row.expression,
        cron=row.cron,
        timezone=row.timezone,
        next_run=row.next_run,
        state=ScheduleState(row.state),
        missed_policy=MissedPolicy(row.missed_policy),
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_run=row.last_run,
        runs=row.runs,
        missed_runs=row.missed_runs,
        last_task_id=row.last_task_id,
    )


def _run(row: sa.Row[Any]) -> ScheduleRun:
    return ScheduleRun(
        schedule_id=row.schedule_id,
        due_at=row.due_at,
        at=row.at,
        outcome=RunOutcome(row.outcome),
        missed=row.missed,
        task_id=row.task_id,
    )


# The scheduler's wake-up: one lookup in the partial index schedules_due (WHERE state =
# 'active'). The state is a literal, not a parameter, so the planner can match the index's
# condition whatever the driver does with parameters.
_ACTIVE = schedules.c.state == sa.literal_column(f"'{ScheduleState.ACTIVE.value}'")
_NEXT_DUE = sa.select(sa.func.min(schedules.c.next_run)).where(_ACTIVE)
_DUE = (
    sa.select(schedules)
    .where(_ACTIVE, schedules.c.next_run <= sa.bindparam("now"))
    .order_by(schedules.c.next_run, schedules.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)


class ScheduleRecords:
    """Schedules and their runs, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(self, new: NewSchedule) -> Schedule:
        """Store a new active schedule; returns once it is committed."""
        now = time.time()
        row: dict[str, Any] = {
            "id": new_task_id(),
            "text": new.task.text,
            "priority": new.task.priority,
            "model": new.task.model,
            "criteria": json.dumps(list(new.task.criteria)) if new.task.criteria else None,
            "workspace": new.task.workspace,
            "act": new.task.act,
            "kind": new.kind.value,
            "expression": new.expression,
            "cron": new.cron,
            "timezone": new.timezone,
            "next_run": new.next_run,
            "state": ScheduleState.ACTIVE.value,
            "missed_policy": new.missed_policy.value,
            "created_at": now,
            "updated_at": now,
            "runs": 0,
            "missed_runs": 0,
        }

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(schedules.insert().values(**row))

        await self._store.write(apply)
        return await self._by_id(row["id"])

    async def _by_id(self, schedule_id: str) -> Schedule:
        async with self._store.read() as conn:
            row = (
                await conn.execute(sa.select(schedules).where(schedules.c.id == schedule_id))
            ).first()
        if row is None:
            raise NotFound(f"no schedule with id {schedule_id}; `tale schedules` lists them")
        return _schedule(row)

    async def get(self, ref: str) -> Schedule:
        """A schedule by id or unique prefix; NotFound / InvalidInput saying which."""
        ref = normalise(ref, _SCHEDULE_IDS)  # a malformed id is refused before any I/O
        async with self._store.read() as conn:
            return _schedule(await by_prefix(conn, schedules.c.id, ref, _SCHEDULE_IDS))

    async def find(self, state: ScheduleState | None, limit: int) -> list[Schedule]:
        """Schedules, active ones first by next run, then paused, then done (newest first)."""
        order = sa.case(
            (schedules.c.state == ScheduleState.ACTIVE.value, 0),
            (schedules.c.state == ScheduleState.PAUSED.value, 1),
            else_=2,
        )
        query = sa.select(schedules).order_by(
            order, schedules.c.next_run, schedules.c.created_at.desc(), schedules.c.id
        )
        if state is not None:
            query = query.where(schedules.c.state == state.value)
        async with self._store.read() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        return [_schedule(r) for r in rows]

    async def runs(self, schedule_id: str, limit: int) -> list[ScheduleRun]:
        """What became of a schedule's due times, newest first."""
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(schedule_runs)
                    .where(schedule_runs.c.schedule_id == schedule_id)
                    .order_by(schedule_runs.c.due_at.desc())
                    .limit(limit)
                )
            ).all()
        return [_run(r) for r in rows]

    async def task_ids(self, schedule_id: str) -> list[str]:
        """The tasks a schedule's runs created, oldest first."""
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.id)
                    .where(tasks.c.schedule_id == schedule_id)
                    .order_by(tasks.c.created_at, tasks.c.id)
                )
            ).all()
        return [r.id for r in rows]

    async def next_due(self) -> float | None:
        """The earliest next run of an active schedule (one index lookup), or None."""
        async with self._store.read() as conn:
            value = (await conn.execute(_NEXT_DUE)).scalar_one_or_none()
        return None if value is None else float(value)

    async def due(self, now: float, limit: int) -> list[Schedule]:
        """Active schedules whose next run is at or before ``now``, earliest first."""
        async with self._store.read() as conn:
            rows = (await conn.execute(_DUE, {"now": now, "limit": limit})).all()
        return [_schedule(r) for r in rows]

    async def fire(self, firing: Firing, at: float) -> ScheduleRun | None:
        """Carry out a decision about a due time, in one transaction: the run's task
        (unless skipped), the run's record and the schedule's next run.

        None (nothing done) when the schedule is no longer active with ``next_run ==
        firing.due_at``: it was paused, deleted or fired meanwhile.
        """

        async def apply(conn: AsyncConnection) -> ScheduleRun | None:
            row = (
                await conn.execute(sa.select(schedules).where(schedules.c.id == firing.schedule_id))
            ).first()
            if (
                row is None
                or row.state != ScheduleState.ACTIVE.value
                or row.next_run != firing.due_at
            ):
                return None
            task_id = None
            if firing.outcome != RunOutcome.SKIPPED:
                task_id = new_task_id()
                fields = _fields(row)
                await _insert_submitted(
                    conn,
                    [
                        {
                            "id": task_id,
                            "text": fields.text,
                            "state": TaskState.QUEUED.value,
                            "priority": fields.priority,
                            "attempts": 0,
                            "created_at": at,
                            "updated_at": at,
                            "model": fields.model,
                            "criteria": row.criteria,
                            "workspace": fields.workspace,
                            "act": fields.act,
                            "schedule_id": row.id,
                        }
                    ],
                    reason=firing.reason,
                )
            await conn.execute(
                schedule_runs.insert().values(
                    schedule_id=row.id,
                    due_at=firing.due_at,
                    at=at,
                    outcome=firing.outcome.value,
                    missed=firing.missed,
                    task_id=task_id,
                )
            )
            ran = task_id is not None
            await conn.execute(
                schedules.update()
                .where(schedules.c.id == row.id)
                .values(
                    next_run=firing.next_run,
                    state=(
                        ScheduleState.DONE.value
                        if firing.next_run is None
                        else ScheduleState.ACTIVE.value
                    ),
                    updated_at=at,
                    last_run=at if ran else row.last_run,
                    runs=row.runs + (1 if ran else 0),
                    missed_runs=row.missed_runs + firing.missed,
                    last_task_id=task_id if ran else row.last_task_id,
                )
            )
            return ScheduleRun(row.id, firing.due_at, at, firing.outcome, firing.missed, task_id)

        return await self._store.write(apply)

    async def move(
        self,
        schedule_id: str,
        sources: Collection[ScheduleState],
        target: ScheduleState,
        next_run: float | None = None,
    ) -> Schedule:
        """Move a schedule from one of ``sources`` to ``target`` (with a new next run,
        when given); IllegalTransition, saying its state, from any other."""

        async def apply(conn: AsyncConnection) -> None:
            state = (
                await conn.execute(
                    sa.select(schedules.c.state).where(schedules.c.id == schedule_id)
                )
            ).scalar_one_or_none()
            if state is None:
                raise NotFound(f"no schedule with id {schedule_id}; `tale schedules` lists them")
            if ScheduleState(state) not in sources:
                raise IllegalTransition(
                    f"schedule {schedule_id} is {state}; it can be {target.value} only when "
                    f"{' or '.join(sorted(s.value for s in sources))}"
                )
            values: dict[str, Any] = {"state": target.value, "updated_at": time.time()}
            if next_run is not None:
                values["next_run"] = next_run
            await conn.execute(
                schedules.update().where(schedules.c.id == schedule_id).values(**values)
            )

        await self._store.write(apply)
        return await self._by_id(schedule_id)

    async def delete(self, schedule_id: str) -> None:
        """Remove a schedule and its runs' records; the tasks it created stay, unlinked."""

        async def apply(conn: AsyncConnection) -> None:
            found = (
                await conn.execute(sa.select(schedules.c.id).where(schedules.c.id == schedule_id))
            ).first()
            if found is None:
                raise NotFound(f"no schedule with id {schedule_id}; `tale schedules` lists them")
            await conn.execute(
                tasks.update().where(tasks.c.schedule_id == schedule_id).values(schedule_id=None)
            )
            await conn.execute(
                schedule_runs.delete().where(schedule_runs.c.schedule_id == schedule_id)
            )
            await conn.execute(schedules.delete().where(schedules.c.id == schedule_id))

        await self._store.write(apply)
