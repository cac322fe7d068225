"""What acting tasks keep in the store: approvals and questions, the tool ledger, and the
permission rules people added.

An approval is the durable half of a tool call its policy says to ask about: the call
itself is in the task's checkpoint, the person's answer is here. Deciding one moves its
task from ``waiting`` back to ``queued`` in the same transaction, so an answer is never
recorded without the task being woken, nor the task woken without the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.ids import IdMessages, by_prefix, normalise
from taled.db.schema import approvals, policy_rules, tasks, tool_calls
from taled.db.store import Store, _current_state, _move, new_task_id
from taled.errors import IllegalTransition
from taled.tasks.lifecycle import FINAL_STATES, TaskState

__all__ = [
    "ActingRecords",
    "Approval",
    "ApprovalKind",
    "ApprovalState",
    "NewApproval",
    "ToolCallRecord",
]

# What a person is told when an approval id they gave names none, or several.
_APPROVAL_IDS = IdMessages(
    invalid="approval id {ref!r}: give at least {min} hex digits of an id `tale approvals` lists",
    missing="no approval with id {ref}; `tale approvals` lists the pending ones",
    ambiguous="more than one approval starts with {ref}; give more digits",
)


class ApprovalKind(StrEnum):
    """What a person is asked."""

    TOOL = "tool"
    """May this tool call run?"""
    QUESTION = "question"
    """The model's question (ask_user): the answer is text."""


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    ANSWERED = "answered"


@dataclass(frozen=True)
class NewApproval:
    """An approval to ask for."""

    task_id: str
    call_id: str
    kind: ApprovalKind
    tool: str
    arguments: dict[str, Any]
    summary: str
    """One line a person reads: ``run: pytest -q``, or the model's question."""
    rule: str | None
    """The policy key ``--always`` would allow (``run:pytest``), None when none fits."""


@dataclass(frozen=True)
class Approval:
    """An approval as stored."""

    id: str
    task_id: str
    call_id: str
    kind: ApprovalKind
    tool: str
    arguments: dict[str, Any]
    summary: str
    rule: str | None
    state: ApprovalState
    reason: str | None
    """The person's reason for a denial, or the answer to a question."""
    created_at: float
    decided_at: float | None


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call for the tool ledger (never its arguments: a digest of them)."""

    task_id: str
    call_id: str
    tool: str
    digest: str
    outcome: str
    """ok | error | denied | interrupted"""
    duration_ms: float
    detail: str | None = None
    at: float = 0.0


def _approval(row: sa.Row[Any]) -> Approval:
    return Approval(
        id=row.id,
        task_id=row.task_id,
        call_id=row.call_id,
        kind=ApprovalKind(row.kind),
        tool=row.tool,
        arguments=json.loads(row.arguments),
        summary=row.summary,
        rule=row.rule,
        state=ApprovalState(row.state),
        reason=row.reason,
        created_at=row.created_at,
        decided_at=row.decided_at,
    )


class ActingRecords:
    """Approvals, the tool ledger and added rules, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def mark_acting(self, task_id: str) -> None:
        """Record that a task acts (the classifier gave it tools it did not ask for)."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(tasks.update().where(tasks.c.id == task_id).values(act=True))

        await self._store.write(apply)

    # -- approvals ---------------------------------------------------------

    async def ask(self, new: NewApproval, reason: str) -> Approval:
        """Record ``new`` as pending and move its task running → waiting, in one
        transaction. Asking again for the same call returns the existing approval (a task
        resumed after a crash asks for the call it had already asked about)."""

        async def apply(conn: AsyncConnection) -> Approval:
            found = await self._for_call(conn, new.task_id, new.call_id)
            if found is None:
                await conn.execute(
                    approvals.insert().values(
                        id=new_task_id(),
                        task_id=new.task_id,
                        call_id=new.call_id,
                        kind=new.kind.value,
                        tool=new.tool,
                        arguments=json.dumps(new.arguments, ensure_ascii=False),
                        summary=new.summary,
                        rule=new.rule,
                        state=ApprovalState.PENDING.value,
                        created_at=time.time(),
                    )
                )
                found = await self._for_call(conn, new.task_id, new.call_id)
                assert found is not None
            if found.state == ApprovalState.PENDING:
                current = await _current_state(conn, new.task_id)
                if current != TaskState.RUNNING:
                    raise IllegalTransition(
                        f"task {new.task_id} is {current}, no longer running; it was not "
                        "moved to waiting"
                    )
                await _move(conn, new.task_id, current, TaskState.WAITING, reason)
            return found

        return await self._store.write(apply)

    @staticmethod
    async def _for_call(conn: AsyncConnection, task_id: str, call_id: str) -> Approval | None:
        row = (
            await conn.execute(
                sa.select(approvals).where(
                    approvals.c.task_id == task_id, approvals.c.call_id == call_id
                )
            )
        ).first()
        return None if row is None else _approval(row)

    async def for_call(self, task_id: str, call_id: str) -> Approval | None:
        """The approval asked for one call of a task, if any."""
        async with self._store.read() as conn:
            return await self._for_call(conn, task_id, call_id)

    async def pending(self, task_id: str | None = None) -> list[Approval]:
        """Approvals and questions waiting for a person, oldest first; ``task_id``: that
        task's and its planned steps' (a person following a task answers for its steps)."""
        live = sa.select(tasks.c.id).where(tasks.c.state.notin_([s.value for s in FINAL_STATES]))
        if task_id is not None:
            live = live.where(sa.or_(tasks.c.id == task_id, tasks.c.parent_id == task_id))
        query = sa.select(approvals).where(
            approvals.c.state == ApprovalState.PENDING.value, approvals.c.task_id.in_(live)
        )
        async with self._store.read() as conn:
            rows = (await conn.execute(query.order_by(approvals.c.created_at))).all()
        return [_approval(r) for r in rows]

    async def get(self, ref: str) -> Approval:
        """An approval by id or unique prefix; NotFound / InvalidInput saying which."""
        ref = normalise(ref, _APPROVAL_IDS)  # a malformed id is refused before any I/O
        async with self._store.read() as conn:
            return _approval(await by_prefix(conn, approvals.c.id, ref, _APPROVAL_IDS))

    async def decide(self, ref: str, state: ApprovalState, reason: str | None) -> Approval:
        """Answer a pending approval and queue its task again, in one transaction."""
        approval = await self.get(ref)

        async def apply(conn: AsyncConnection) -> Approval:
            row = (
                await conn.execute(sa.select(approvals).where(approvals.c.id == approval.id))
            ).first()
            assert row is not None
            current = _approval(row)
            if current.state != ApprovalState.PENDING:
                raise IllegalTransition(
                    f"approval {current.id} was already {current.state.value}"
                    + (f" ({current.reason})" if current.reason else "")
                )
            now = time.time()
            await conn.execute(
                approvals.update()
                .where(approvals.c.id == current.id)
                .values(state=state.value, reason=reason, decided_at=now)
            )
            task_state = await _current_state(conn, current.task_id)
            if task_state == TaskState.WAITING:
                what = {
                    ApprovalState.APPROVED: "approved",
                    ApprovalState.DENIED: "denied",
                    ApprovalState.ANSWERED: "answered",
                }.get(state, state.value)
                await _move(
                    conn,
                    current.task_id,
                    task_state,
                    TaskState.QUEUED,
                    f"{current.summary[:120]}: {what}",
                )
            return _replace_state(current, state, reason, now)

        return await self._store.write(apply)

    async def close_for_task(self, task_id: str, why: str) -> None:
        """Deny every pending approval of a task that ended (cancelled, restored)."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(
                approvals.update()
                .where(
                    approvals.c.task_id == task_id,
                    approvals.c.state == ApprovalState.PENDING.value,
                )
                .values(state=ApprovalState.DENIED.value, reason=why, decided_at=time.time())
            )

        await self._store.write(apply)

    async def forget_except(self, task_id: str, keep: Sequence[str]) -> None:
        """Drop a task's approvals except those of calls in ``keep`` (a restore rewound
        past the others: they are asked afresh)."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(
                approvals.delete().where(
                    approvals.c.task_id == task_id, approvals.c.call_id.notin_(list(keep))
                )
            )

        await self._store.write(apply)

    # -- the tool ledger ---------------------------------------------------

    async def record_call(self, record: ToolCallRecord) -> None:
        """Append one tool call to the ledger (once: a call already there is kept)."""
        row = {**record.__dict__, "at": record.at or time.time()}

        async def apply(conn: AsyncConnection) -> None:
            # Once per call: a task resumed after a crash may record a call again.
            seen = (
                await conn.execute(
                    sa.select(tool_calls.c.seq).where(
                        tool_calls.c.task_id == record.task_id,
                        tool_calls.c.call_id == record.call_id,
                    )
                )
            ).first()
            if seen is None:
                await conn.execute(tool_calls.insert().values(**row))

        await self._store.write(apply)

    async def calls(self, task_id: str) -> list[ToolCallRecord]:
        """A task's tool calls, in order."""
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tool_calls)
                    .where(tool_calls.c.task_id == task_id)
                    .order_by(tool_calls.c.seq)
                )
            ).all()
        return [
            ToolCallRecord(
                task_id=r.task_id,
                call_id=r.call_id,
                tool=r.tool,
                digest=r.digest,
                outcome=r.outcome,
                duration_ms=r.duration_ms,
                detail=r.detail,
                at=r.at,
            )
            for r in rows
        ]

    async def call_counts(self, task_ids: Sequence[str]) -> dict[str, int]:
        """Tool calls per task, for those of ``task_ids`` that made any."""
        if not task_ids:
            return {}
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tool_calls.c.task_id, sa.func.count())
                    .where(tool_calls.c.task_id.in_(list(task_ids)))
                    .group_by(tool_calls.c.task_id)
                )
            ).all()
        return {str(task_id): int(n) for task_id, n in rows}

    # -- rules -------------------------------------------------------------

    async def add_rule(self, key: str, decision: str, source: str) -> None:
        """Add (or replace) a permission rule people chose."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(policy_rules.delete().where(policy_rules.c.key == key))
            await conn.execute(
                policy_rules.insert().values(
                    key=key, decision=decision, created_at=time.time(), source=source
                )
            )

        await self._store.write(apply)

    async def rules(self) -> dict[str, str]:
        """The rules people added, by key."""
        async with self._store.read() as conn:
            rows = (await conn.execute(sa.select(policy_rules))).all()
        return {r.key: r.decision for r in rows}


def _replace_state(
    approval: Approval, state: ApprovalState, reason: str | None, at: float
) -> Approval:
    return replace(approval, state=state, reason=reason, decided_at=at)
