"""Forgetting tasks in the store: every row that holds a task's text, or text made from
it, goes; the token ledger keeps its counts.

One transaction forgets a task with its planned subtasks. Table by table, what goes and
why (what keeps the usage totals right and every foreign key valid):

    tasks, transitions, task_deps   deleted. A tombstone would have to be hidden from
                                    every reader of tasks (list, status, chat, the TUI);
                                    deleted, the task is simply unknown (NotFound), and
                                    the rows below that reference it go first
    model_calls                     KEPT, ``error`` and ``note`` blanked: the token ledger.
                                    Every usage total (overall, by model, role, route, day,
                                    task) is summed from it, so tokens stay counted. Its
                                    ``task_id`` stays, a random id that now names nothing
                                    (it has no foreign key); no prompt or answer is stored
    approvals, tool_calls           deleted: arguments, summaries, answers, details
    task_outcomes, task_embeddings  deleted: the learning engine's copy of the text and a
                                    vector made from it (it relearns without them)
    task_memory (FTS5)              deleted; ``merge_index`` (FTS5 ``optimize``) afterwards,
                                    so no older segment of the index still holds the words
    conversation_tasks              deleted (the chat no longer reports on the task)
    messages                        the turns that submitted or named the task, deleted
                                    (``_doomed``); the conversation's summary goes when it
                                    covered one of them, its title is made again when it
                                    came from one, and a conversation left empty goes

What SQLite leaves of deleted rows in free space and in its write-ahead log is the
engine's business (``secure_delete``, ``Store.scrub``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.schema import (
    approvals,
    conversation_tasks,
    conversations,
    messages,
    model_calls,
    task_deps,
    task_embeddings,
    task_outcomes,
    tasks,
    tool_calls,
    transitions,
)
from taled.db.store import Store, _subtree
from taled.errors import IllegalTransition, InvalidInput, NotFound
from taled.tasks.lifecycle import FINAL_STATES
from taled.text import one_line

__all__ = ["ForgetRecords", "Forgettable"]

_FINAL = frozenset(s.value for s in FINAL_STATES)


@dataclass(frozen=True)
class Forgettable:
    """A finished top-level task that may be forgotten, with its subtasks."""

    id: str
    state: str
    updated_at: float
    text: str
    ids: tuple[str, ...]
    """The task's id first, then its subtasks' (every plan round's)."""


class ForgetRecords:
    """Finds what may be forgotten and deletes it, over the daemon's store."""

    def __init__(self, store: Store, *, title_chars: int) -> None:
        self._store = store
        self._title_chars = title_chars

    async def check(self, task_id: str) -> Forgettable:
        """The task with its subtasks, if it may be forgotten now; else NotFound (no such
        task), InvalidInput (a subtask: its task is what is forgotten) or
        IllegalTransition (it has not finished, is being restored, or a live task waits
        for it), each saying what to do."""
        async with self._store.read() as conn:
            return await _check(conn, task_id)

    async def finished_before(
        self, cutoff: float
    ) -> tuple[list[Forgettable], list[tuple[str, str]]]:
        """Finished top-level tasks last updated before ``cutoff``, oldest first; and
        (id, why) of those among them that may not be forgotten now (being restored,
        waited for)."""
        query = (
            sa.select(tasks.c.id)
            .where(
                tasks.c.parent_id.is_(None),
                tasks.c.state.in_(_FINAL),
                tasks.c.updated_at < cutoff,
            )
            .order_by(tasks.c.updated_at, tasks.c.id)
        )
        found = []
        kept: list[tuple[str, str]] = []
        async with self._store.read() as conn:
            for (task_id,) in (await conn.execute(query)).all():
                try:
                    found.append(await _check(conn, task_id))
                except IllegalTransition as exc:
                    kept.append((task_id, exc.message))
        return found, kept

    async def forget(self, task_id: str) -> dict[str, int]:
        """Delete a task, its subtasks and everything made from their text, in one
        transaction (checked again in it); rows deleted (or blanked) per table."""

        async def apply(conn: AsyncConnection) -> dict[str, int]:
            found = await _check(conn, task_id)
            return await _delete(conn, found, self._title_chars)

        return await self._store.write(apply)

    async def merge_index(self) -> None:
        """Merge the full-text index into one segment (FTS5 ``optimize``). A delete from
        it only adds "deleted" marks; the merge drops the forgotten words themselves.
        Once after a batch of forgettings: it rewrites the whole index."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(sa.text("INSERT INTO task_memory (task_memory) VALUES ('optimize')"))

        await self._store.write(apply)

    async def existing(self, task_ids: Collection[str]) -> set[str]:
        """Those of ``task_ids`` that still have a row."""
        if not task_ids:
            return set()
        async with self._store.read() as conn:
            rows = await conn.execute(sa.select(tasks.c.id).where(tasks.c.id.in_(list(task_ids))))
            return {r.id for r in rows}


async def _check(conn: AsyncConnection, task_id: str) -> Forgettable:
    row = (
        await conn.execute(
            sa.select(
                tasks.c.id,
                tasks.c.state,
                tasks.c.parent_id,
                tasks.c.restore_to,
                tasks.c.updated_at,
                tasks.c.text,
            ).where(tasks.c.id == task_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
    if row.parent_id is not None:
        raise InvalidInput(
            f"task {task_id} is a step of task {row.parent_id}; delete its task: "
            f"`tale delete {row.parent_id}`"
        )
    if row.state not in _FINAL:
        raise IllegalTransition(
            f"task {task_id} is {row.state}; only a finished task can be deleted: "
            f"`tale cancel {task_id}` first"
        )
    below = await _subtree(conn, task_id)
    live = [r for r in below if r.state not in _FINAL]
    if live:
        raise IllegalTransition(
            f"task {task_id} has a step still {live[0].state} ({live[0].id}); "
            f"`tale cancel {task_id}` first"
        )
    if row.restore_to is not None or any(r.restore_to is not None for r in below):
        raise IllegalTransition(f"task {task_id} is being restored; delete it once that is done")
    ids = (task_id, *(r.id for r in below))
    waiting = (
        await conn.execute(
            sa.select(task_deps.c.task_id)
            .join(tasks, tasks.c.id == task_deps.c.task_id)
            .where(
                task_deps.c.needs_id.in_(ids),
                task_deps.c.task_id.notin_(ids),
                tasks.c.state.notin_(_FINAL),
            )
            .limit(1)
        )
    ).first()
    if waiting is not None:
        raise IllegalTransition(
            f"task {waiting.task_id} waits for task {task_id}; cancel it or let it finish first"
        )
    return Forgettable(task_id, row.state, row.updated_at, row.text, ids)


async def _delete(conn: AsyncConnection, found: Forgettable, title_chars: int) -> dict[str, int]:
    ids = list(found.ids)
    texts = {" ".join(t.split()) for (t,) in await conn.execute(_texts(ids))}
    counts: dict[str, int] = {}

    async def run(name: str, statement: Any) -> None:
        result = await conn.execute(statement)
        counts[name] = counts.get(name, 0) + max(result.rowcount, 0)

    counts.update(await _forget_turns(conn, ids, texts, title_chars))
    await run("conversation_tasks", conversation_tasks.delete().where(_in(conversation_tasks, ids)))
    await run("approvals", approvals.delete().where(_in(approvals, ids)))
    await run("tool_calls", tool_calls.delete().where(_in(tool_calls, ids)))
    await run("task_embeddings", task_embeddings.delete().where(_in(task_embeddings, ids)))
    await run("task_outcomes", task_outcomes.delete().where(_in(task_outcomes, ids)))
    for task_id in ids:
        # FTS5's own delete (it reads the row to remove its words from the index; the
        # words stay in the index's older segments until merge_index).
        await run(
            "task_memory",
            sa.text("DELETE FROM task_memory WHERE task_id = :id").bindparams(id=task_id),
        )
    await run(
        "task_deps",
        task_deps.delete().where(
            sa.or_(task_deps.c.task_id.in_(ids), task_deps.c.needs_id.in_(ids))
        ),
    )
    await run("transitions", transitions.delete().where(_in(transitions, ids)))
    # The ledger keeps every count and time; only its free text goes.
    await run(
        "model_calls",
        model_calls.update()
        .where(
            model_calls.c.task_id.in_(ids),
            sa.or_(model_calls.c.error.is_not(None), model_calls.c.note.is_not(None)),
        )
        .values(error=None, note=None),
    )
    # One statement: a parent and its subtasks go together (tasks.parent_id's foreign key
    # is checked at the statement's end).
    await run("tasks", tasks.delete().where(tasks.c.id.in_(ids)))
    return counts


def _in(table: sa.Table, ids: Sequence[str]) -> Any:
    return table.c.task_id.in_(list(ids))


def _texts(ids: Sequence[str]) -> sa.Select[Any]:
    return sa.select(tasks.c.text).where(tasks.c.id.in_(list(ids)))


@dataclass(frozen=True)
class _Turn:
    seq: int
    role: str
    text: str
    task_id: str | None


async def _forget_turns(
    conn: AsyncConnection, ids: Sequence[str], texts: set[str], title_chars: int
) -> dict[str, int]:
    """Delete the messages that submitted or named the tasks ``ids`` (see ``_doomed``), in
    every conversation that handed one off or named one; fix up each conversation."""
    m = messages.c
    linked = set(
        (
            await conn.execute(
                sa.select(conversation_tasks.c.conversation_id).where(_in(conversation_tasks, ids))
            )
        ).scalars()
    )
    linked |= set(
        (await conn.execute(sa.select(m.conversation_id).where(m.task_id.in_(list(ids))))).scalars()
    )
    named = set(
        (
            await conn.execute(
                sa.select(m.conversation_id).where(
                    sa.or_(*(sa.func.instr(m.text, task_id) > 0 for task_id in ids))
                )
            )
        ).scalars()
    )
    deleted = touched = dropped = 0
    for cid in sorted(linked | named):
        rows = (
            await conn.execute(
                sa.select(m.seq, m.role, m.text, m.task_id)
                .where(m.conversation_id == cid)
                .order_by(m.seq)
            )
        ).all()
        turns = [_Turn(r.seq, r.role, r.text, r.task_id) for r in rows]
        doomed = _doomed(turns, set(ids), texts if cid in linked else set())
        if doomed:
            await conn.execute(messages.delete().where(m.seq.in_(sorted(doomed))))
            deleted += len(doomed)
        kept = [t for t in turns if t.seq not in doomed]
        if not kept:
            await conn.execute(
                conversation_tasks.delete().where(conversation_tasks.c.conversation_id == cid)
            )
            await conn.execute(conversations.delete().where(conversations.c.id == cid))
            dropped += 1
            continue
        values = await _repair(conn, cid, turns, kept, doomed, texts, title_chars)
        if values:
            await conn.execute(
                conversations.update().where(conversations.c.id == cid).values(values)
            )
            touched += 1
    return {"messages": deleted, "conversations": touched, "conversations_dropped": dropped}


def _doomed(turns: Sequence[_Turn], ids: set[str], texts: set[str]) -> set[int]:
    """The seqs of a conversation's messages that submitted or named a forgotten task.

    A message names it when it handed it off (its ``task_id``) or its text holds one of
    the ids (every answer tale words from the store about a task names its id: status,
    result, updates, "your last request was"); a user message submitted it when its text
    is the task's text (``texts``, whitespace-normalised; given only for conversations
    linked to the task). The other half of each such exchange goes with it: the reply to
    a user message, the user message a reply answered (the request, or the "yes" to a
    clarifying question). What a person or the model wrote about the task in other
    words, without its id, cannot be told apart and stays.
    """
    doomed: set[int] = set()
    for i, turn in enumerate(turns):
        names = turn.task_id in ids or any(task_id in turn.text for task_id in ids)
        submits = turn.role == "user" and " ".join(turn.text.split()) in texts
        if not (names or submits):
            continue
        doomed.add(turn.seq)
        if turn.role == "assistant" and i > 0 and turns[i - 1].role == "user":
            doomed.add(turns[i - 1].seq)
        if turn.role == "user" and i + 1 < len(turns) and turns[i + 1].role == "assistant":
            doomed.add(turns[i + 1].seq)
    return doomed


async def _repair(
    conn: AsyncConnection,
    cid: str,
    turns: Sequence[_Turn],
    kept: Sequence[_Turn],
    doomed: set[int],
    texts: set[str],
    title_chars: int,
) -> dict[str, Any]:
    """What changes in a conversation's header once ``doomed`` messages are gone."""
    c = conversations.c
    header = (
        await conn.execute(sa.select(c.summary, c.summary_upto, c.pending).where(c.id == cid))
    ).first()
    if header is None:
        return {}
    values: dict[str, Any] = {}
    if doomed and header.summary is not None and min(doomed) <= header.summary_upto:
        # Folded from the forgotten turns among others: the next turn folds afresh.
        values.update(summary=None, summary_upto=0)
    if turns and turns[0].seq in doomed:
        # The title was made from the conversation's first message.
        first = next((t for t in kept if t.role == "user"), kept[0])
        values["title"] = one_line(first.text, title_chars)
    if header.pending:
        pending = json.loads(header.pending)
        if " ".join(str(pending.get("text", "")).split()) in texts:
            values["pending"] = None
    return values
