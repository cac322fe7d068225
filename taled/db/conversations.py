"""What conversations with the UX agent keep in the store: each conversation's header,
its messages, and the tasks it handed off with the state it last reported.

A conversation's ``pending`` (what a yes to its clarifying question would do) is kept
as a small JSON object, ``{"kind": ..., "text": ...}``. What the agent makes of any of
it is the business of ``taled.chat``; this module stores and reads it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.engine import raw_sql
from taled.db.schema import conversation_tasks, conversations, messages
from taled.db.store import Store, new_task_id

__all__ = ["Conversation", "ConversationRecords", "Message", "NewMessage", "Pending"]


@dataclass(frozen=True)
class NewMessage:
    """A message to append to a conversation."""

    conversation_id: str
    role: str
    """'user' or 'assistant'."""
    text: str
    intent: str | None = None
    confidence: float | None = None
    action: str | None = None
    task_id: str | None = None
    """The task this message handed off (the assistant's reply carries it too)."""


@dataclass(frozen=True)
class Message:
    """One message of a conversation."""

    seq: int
    conversation_id: str
    role: str
    """'user' or 'assistant'."""
    text: str
    at: float
    intent: str | None = None
    confidence: float | None = None
    action: str | None = None
    task_id: str | None = None
    """The task this message handed off (the assistant's reply carries it too)."""


@dataclass(frozen=True)
class Pending:
    """What the agent will do if the user says yes to its clarifying question."""

    kind: str
    """'task' (queue ``text``)."""
    text: str


@dataclass(frozen=True)
class Conversation:
    """A conversation's header: no messages, their count."""

    id: str
    title: str
    created_at: float
    updated_at: float
    summary: str | None
    summary_upto: int
    """Messages up to this seq are folded into ``summary``."""
    pending: Pending | None
    messages: int
    stored: bool = True
    """False for a draft (``ConversationRecords.draft``): stored with its first message."""


def _pending(raw: str | None) -> Pending | None:
    if not raw:
        return None
    data = json.loads(raw)
    return Pending(kind=str(data["kind"]), text=str(data["text"]))


def _message(row: Any) -> Message:
    return Message(
        seq=row.seq,
        conversation_id=row.conversation_id,
        role=row.role,
        text=row.text,
        at=row.at,
        intent=row.intent,
        confidence=row.confidence,
        action=row.action,
        task_id=row.task_id,
    )


# What a conversation's row holds when it is made (the rest is filled in later).
_CONVERSATION_COLUMNS = ("id", "title", "created_at", "updated_at")


def _conversation_row(conv: Conversation) -> dict[str, Any]:
    return {column: getattr(conv, column) for column in _CONVERSATION_COLUMNS}


_INSERT_CONVERSATION = raw_sql(conversations.insert(), _CONVERSATION_COLUMNS)
_INSERT_MESSAGE = raw_sql(messages.insert(), [f.name for f in fields(NewMessage)] + ["at"])
_TOUCH = raw_sql(
    conversations.update()
    .where(conversations.c.id == sa.bindparam("conversation_id"))
    .values(updated_at=sa.bindparam("at"))
)


def _headers() -> sa.Select[Any]:
    c = conversations.c
    count = (
        sa.select(sa.func.count())
        .where(messages.c.conversation_id == c.id)
        .scalar_subquery()
        .label("messages")
    )
    return sa.select(
        c.id, c.title, c.created_at, c.updated_at, c.summary, c.summary_upto, c.pending, count
    )


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row.id,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
        summary=row.summary,
        summary_upto=row.summary_upto,
        pending=_pending(row.pending),
        messages=row.messages,
    )


class ConversationRecords:
    """Conversations, their messages and hand-offs, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def draft(self, title: str) -> Conversation:
        """A new, empty conversation, not stored yet: ``add`` stores it with its first
        message, in one transaction (a turn's first write, and the one fsync it waits
        for before the model, instead of two)."""
        now = time.time()
        return Conversation(new_task_id(), title, now, now, None, 0, None, 0, stored=False)

    async def create(self, title: str) -> Conversation:
        """A new, empty conversation, durably."""
        made = self.draft(title)

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(conversations.insert().values(**_conversation_row(made)))

        await self._store.write(apply)
        return replace(made, stored=True)

    async def get(self, conversation_id: str) -> Conversation | None:
        """One conversation's header, None if there is none by that id."""
        async with self._store.read() as conn:
            row = (
                await conn.execute(_headers().where(conversations.c.id == conversation_id))
            ).one_or_none()
        return None if row is None else _conversation(row)

    async def recent(self, limit: int) -> list[Conversation]:
        """Conversations, most recently active first."""
        c = conversations.c
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    _headers().order_by(c.updated_at.desc(), c.created_at.desc()).limit(limit)
                )
            ).all()
        return [_conversation(r) for r in rows]

    async def messages(self, conversation_id: str, after_seq: int = 0) -> list[Message]:
        """A conversation's messages after ``after_seq``, oldest first."""
        m = messages.c
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(messages)
                    .where(m.conversation_id == conversation_id, m.seq > after_seq)
                    .order_by(m.seq)
                )
            ).all()
        return [_message(r) for r in rows]

    async def add(self, new: NewMessage, *, draft: Conversation | None = None) -> Message:
        """Append a message (durably) and mark its conversation active, in one transaction;
        with ``draft`` (its conversation, not stored yet) the conversation is stored too.

        A raw write (one trip to SQLite's thread): a chat turn waits for two of these.
        """
        assert draft is None or draft.id == new.conversation_id
        now = time.time()
        values = {**asdict(new), "at": now}

        def apply(conn: sqlite3.Connection) -> int:
            if draft is not None:
                conn.execute(
                    _INSERT_CONVERSATION, _conversation_row(replace(draft, updated_at=now))
                )
            seq = conn.execute(_INSERT_MESSAGE, values).lastrowid
            if draft is None:
                conn.execute(_TOUCH, values)
            assert seq is not None
            return seq

        seq = await self._store.write_raw(apply)
        return Message(seq=seq, at=now, **asdict(new))

    async def set_pending(self, conversation_id: str, pending: Pending | None) -> None:
        """Remember (or forget, with None) what a yes to the clarifying question would do."""
        raw = None if pending is None else json.dumps({"kind": pending.kind, "text": pending.text})
        await self._update(conversation_id, pending=raw)

    async def set_summary(self, conversation_id: str, summary: str, upto: int) -> None:
        """Store the summary of every message up to seq ``upto``."""
        await self._update(conversation_id, summary=summary, summary_upto=upto)

    async def _update(self, conversation_id: str, **values: Any) -> None:
        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation_id).values(**values)
            )

        await self._store.write(apply)

    async def track_task(self, conversation_id: str, task_id: str, state: str) -> None:
        """Note that a conversation handed off ``task_id`` (or last reported it in ``state``)."""
        now = time.time()

        async def apply(conn: AsyncConnection) -> None:
            t = conversation_tasks.c
            updated = await conn.execute(
                conversation_tasks.update()
                .where(t.conversation_id == conversation_id, t.task_id == task_id)
                .values(reported_state=state)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    conversation_tasks.insert().values(
                        conversation_id=conversation_id,
                        task_id=task_id,
                        reported_state=state,
                        at=now,
                    )
                )

        await self._store.write(apply)

    async def tracked(self, conversation_id: str) -> list[tuple[str, str]]:
        """(task id, last reported state) of the tasks it handed off, in hand-off order."""
        t = conversation_tasks.c
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(t.task_id, t.reported_state)
                    .where(t.conversation_id == conversation_id)
                    .order_by(t.at, t.task_id)
                )
            ).all()
        return [(r.task_id, r.reported_state) for r in rows]

    async def last_request(
        self,
        before_seq: int,
        conversation_id: str | None = None,
        intents: Collection[str] | None = None,
    ) -> Message | None:
        """The user's last message before ``before_seq`` that was read as no action, in one
        conversation or in any; with ``intents``, the last read as one of them."""
        m = messages.c
        # A message read as an action (how is a task doing, cancel it, what did I ask)
        # asked about or for something already there: it is no request of its own.
        query = sa.select(messages).where(m.role == "user", m.seq < before_seq, m.action.is_(None))
        if intents is not None:
            query = query.where(m.intent.in_(tuple(intents)))
        if conversation_id is not None:
            query = query.where(m.conversation_id == conversation_id)
        async with self._store.read() as conn:
            row = (await conn.execute(query.order_by(m.seq.desc()).limit(1))).one_or_none()
        return None if row is None else _message(row)
