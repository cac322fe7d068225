"""What the learning engine keeps in the store: each finished top-level task's outcome
(``task_outcomes``), its text for word search (the FTS5 table ``task_memory``) and its
text's embeddings (``task_embeddings``), and what it reads of the token ledger.

An outcome, its text and its vector are written in one transaction, so a task is
either remembered whole or not at all. A vector is stored as little-endian float32
bytes whatever this machine's byte order. How any of it is learned from is the
business of ``taled.learning``; this module stores and reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.schema import (
    PREDICTABLE_TOKENS_SQL,
    model_calls,
    task_embeddings,
    task_outcomes,
    tasks,
    transitions,
)
from taled.db.store import Store
from taled.settings import Level
from taled.tasks.lifecycle import TaskState

__all__ = [
    "Embedding",
    "GenerationTotals",
    "LearningRecords",
    "LedgerFacts",
    "Outcome",
    "OutcomeRecord",
    "PastTask",
    "Similar",
    "StoredVector",
    "TaskText",
    "Vector",
]

Vector = npt.NDArray[np.float32]
"""One embedding: float32, L2-normalised."""

# Stored vectors are little-endian float32, whatever this machine's byte order.
_BLOB_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class Outcome:
    """One finished top-level task, as ``task_outcomes`` stores it."""

    task_id: str
    text: str
    predicted_level: str
    confidence: float
    completion_tokens: int
    success: bool
    role: str
    backend: str | None
    model: str | None
    predicted_tokens: int | None = None
    budget_tokens: int | None = None
    prompt_tokens: int = 0
    steps: int = 1
    retries: int = 0
    truncations: int = 0
    gate_passed: bool | None = None
    thinking: bool = False
    seconds: float = 0.0
    at: float = field(default_factory=time.time)
    planned: bool | None = None
    """Planned into subtasks up front (None: not known, an older row)."""
    retried: bool | None = None
    """Its first direct answer failed and was retried on the same model."""
    retry_worked: bool | None = None
    """A retry's answer passed."""
    decomposed: bool | None = None
    """Decomposed into subtasks after its direct answers failed."""
    retry_tokens: int | None = None
    """Tokens (prompt and completion) of its direct answer's retries."""
    plan_tokens: int | None = None
    """Tokens of everything but its direct answers: a plan, subtasks, an aggregation."""
    answer_tokens: int | None = None
    """Completion tokens of its first direct answer (continuations included): what a
    budget caps. None without a direct answer (planned up front)."""


@dataclass(frozen=True)
class OutcomeRecord:
    """An outcome with what is stored beside it: the level it was labelled, and the
    features of its text the classifier learns from."""

    outcome: Outcome
    level: Level
    features: dict[str, float]


@dataclass(frozen=True)
class LedgerFacts:
    """What the token ledger says of a finished task (its subtasks' calls included)."""

    prompt_tokens: int
    completion_tokens: int
    retries: int
    """Calls that were a second or later attempt."""
    retry_tokens: int
    """Tokens of its own direct answer's retries."""
    plan_tokens: int
    """Tokens of everything in its tree but its own direct answers."""
    answer_tokens: int | None
    """Completion tokens of its first direct answer; None without one."""
    role: str | None
    """Its first call's role, backend and model: where it was routed (None: no call)."""
    backend: str | None
    model: str | None
    started: float | None
    """When it first ran (None: it never did)."""


@dataclass(frozen=True)
class Embedding:
    """A text's vector by one embedding model (``backend:model``)."""

    model: str
    vector: Vector


@dataclass(frozen=True)
class StoredVector:
    """A task's stored vector; ``dimension`` as recorded beside it."""

    task_id: str
    dimension: int
    vector: Vector


@dataclass(frozen=True)
class TaskText:
    """A remembered task's text."""

    task_id: str
    text: str


@dataclass(frozen=True)
class PastTask:
    """A remembered task a lookup found, and how it went."""

    task_id: str
    score: float
    """bm25 relevance (higher is nearer; only comparable within one lookup; 0 for a task
    asked for by id)."""
    text: str
    tokens: float
    """Tokens of its first direct answer, or the whole task's when it had none."""
    level: str
    success: bool
    role: str
    model: str | None


@dataclass(frozen=True)
class Similar:
    """What one lookup read, in one snapshot."""

    by_words: list[PastTask]
    """The word-search matches, best first."""
    by_id: list[PastTask]
    """The tasks asked for by id that the word search did not find."""


@dataclass(frozen=True)
class GenerationTotals:
    """Completion tokens and generation time one model spent over some ledger rows."""

    backend: str
    model: str
    completion_tokens: int
    generation_ms: float


_SEARCH = sa.text(
    f"""
    SELECT m.task_id AS task_id, -bm25(task_memory) AS score, o.text AS text,
           {PREDICTABLE_TOKENS_SQL} AS tokens,
           o.level AS level, o.success AS success,
           o.role AS role, o.model AS model
    FROM task_memory AS m JOIN task_outcomes AS o ON o.task_id = m.task_id
    WHERE task_memory MATCH :query
    ORDER BY bm25(task_memory)
    LIMIT :limit
    """
)


def _by_ids(ids: Sequence[str]) -> sa.Select[Any]:
    """The outcome rows of tasks asked for by id, shaped like ``_SEARCH``'s."""
    o = task_outcomes.c
    return sa.select(
        o.task_id,
        sa.literal(0.0).label("score"),
        o.text,
        sa.literal_column(PREDICTABLE_TOKENS_SQL).label("tokens"),
        o.level,
        o.success,
        o.role,
        o.model,
    ).where(o.task_id.in_(list(ids)))


def _past(row: Any) -> PastTask:
    return PastTask(
        task_id=row.task_id,
        score=float(row.score),
        text=row.text,
        tokens=float(row.tokens),
        level=row.level,
        # Raw SQL gives SQLite's 0 / 1, not a bool.
        success=bool(row.success),
        role=row.role,
        model=row.model,
    )


_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))


def _outcome_record(row: Any) -> OutcomeRecord:
    return OutcomeRecord(
        outcome=Outcome(**{name: getattr(row, name) for name in _OUTCOME_FIELDS}),
        level=cast(Level, row.level),
        features=json.loads(row.features),
    )


class LearningRecords:
    """Outcomes, the task memory and its vectors, and ledger facts, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- outcomes ------------------------------------------------------------

    async def outcomes(self, limit: int) -> list[OutcomeRecord]:
        """The newest ``limit`` stored outcomes, newest first."""
        async with self._store.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(task_outcomes).order_by(task_outcomes.c.at.desc()).limit(limit)
                )
            ).all()
        return [_outcome_record(r) for r in rows]

    async def record(
        self,
        task_id: str,
        make: Callable[[LedgerFacts], OutcomeRecord],
        embedding: Embedding | None = None,
    ) -> Outcome:
        """Store a finished task's outcome, as ``make`` builds it from the ledger's facts,
        with its text (and ``embedding``), in one transaction. The facts are read in the
        writer, after every ledger row queued before: the task's last calls count."""

        async def apply(conn: AsyncConnection) -> Outcome:
            record = make(await _ledger_facts(conn, task_id))
            await _insert(conn, record, embedding)
            return record.outcome

        return await self._store.write(apply)

    async def ingest(self, record: OutcomeRecord, embedding: Embedding | None = None) -> None:
        """Store an outcome observed elsewhere (an imported or replayed history)."""

        async def apply(conn: AsyncConnection) -> None:
            await _insert(conn, record, embedding)

        await self._store.write(apply)

    async def generation_totals(self, newest: int) -> list[GenerationTotals]:
        """Per model, the completion tokens and generation time of the ``newest`` ledger
        rows that generated anything."""
        c = model_calls.c
        recent = (
            sa.select(c.backend, c.model, c.completion_tokens, c.generation_ms)
            .where(c.completion_tokens > 0, c.generation_ms > 0)
            .order_by(c.seq.desc())
            .limit(newest)
            .subquery()
        )
        query = sa.select(
            recent.c.backend,
            recent.c.model,
            sa.func.sum(recent.c.completion_tokens),
            sa.func.sum(recent.c.generation_ms),
        ).group_by(recent.c.backend, recent.c.model)
        async with self._store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            GenerationTotals(backend, model, int(tokens or 0), float(ms or 0.0))
            for backend, model, tokens, ms in rows
        ]

    # -- the task memory -----------------------------------------------------

    async def similar(self, query: str, limit: int, also: Sequence[str] = ()) -> Similar:
        """Up to ``limit`` remembered tasks matching the FTS5 ``query`` by bm25 (none for
        ""), and those of ``also`` (ids) it did not match, read in one snapshot."""
        async with self._store.read() as conn:
            by_words: list[PastTask] = []
            if query:
                rows = (await conn.execute(_SEARCH, {"query": query, "limit": limit})).all()
                by_words = [_past(r) for r in rows]
            found = {p.task_id for p in by_words}
            extra = [task_id for task_id in also if task_id not in found]
            by_id: list[PastTask] = []
            if extra:
                by_id = [_past(r) for r in (await conn.execute(_by_ids(extra))).all()]
        return Similar(by_words, by_id)

    async def vectors(self, model: str, limit: int) -> list[StoredVector]:
        """The vectors by ``model`` of the newest ``limit`` remembered tasks, newest first."""
        e, o = task_embeddings.c, task_outcomes.c
        query = (
            sa.select(e.task_id, e.dimension, e.vector)
            .join(task_outcomes, o.task_id == e.task_id)
            .where(e.model == model)
            .order_by(o.at.desc())
            .limit(limit)
        )
        async with self._store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            StoredVector(
                row.task_id,
                int(row.dimension),
                np.frombuffer(row.vector, dtype=_BLOB_DTYPE).astype(np.float32),
            )
            for row in rows
        ]

    async def unembedded(self, model: str, limit: int) -> list[TaskText]:
        """Of the newest ``limit`` remembered tasks, those with no vector by ``model``,
        newest first."""
        e, o = task_embeddings.c, task_outcomes.c
        newest = sa.select(o.task_id, o.text, o.at).order_by(o.at.desc()).limit(limit).subquery()
        missing = (
            sa.select(newest.c.task_id, newest.c.text)
            .where(~sa.exists().where(e.task_id == newest.c.task_id, e.model == model))
            .order_by(newest.c.at.desc())
        )
        async with self._store.read() as conn:
            rows = (await conn.execute(missing)).all()
        return [TaskText(r.task_id, r.text) for r in rows]

    async def save_vectors(self, model: str, vectors: Sequence[tuple[str, Vector]]) -> None:
        """Store (or replace) tasks' vectors by ``model``, in one transaction."""

        async def apply(conn: AsyncConnection) -> None:
            for task_id, vector in vectors:
                await _save_vector(conn, task_id, Embedding(model, vector))

        await self._store.write(apply)


async def _ledger_facts(conn: AsyncConnection, task_id: str) -> LedgerFacts:
    """A task's token totals and retries (its subtasks' included), its first call's role
    and model, and when it first ran."""
    tree = sa.select(tasks.c.id).where(tasks.c.id == task_id).cte("tree", recursive=True)
    tree = tree.union_all(sa.select(tasks.c.id).where(tasks.c.parent_id == tree.c.id))
    c = model_calls.c
    spent = c.prompt_tokens + c.completion_tokens
    # The task's own direct answers: the first and its retries; everything else in the
    # tree (a plan, subtasks, an aggregation) is what planning cost.
    direct = (c.task_id == task_id) & (c.step == "answer")
    retry = direct & (c.attempt > 1)
    first = direct & (c.attempt == 1)
    sums = (
        await conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(c.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(sa.case((c.attempt > 1, 1), else_=0)), 0),
                sa.func.coalesce(sa.func.sum(sa.case((retry, spent), else_=0)), 0),
                sa.func.coalesce(sa.func.sum(sa.case((direct, 0), else_=spent)), 0),
                sa.func.sum(sa.case((first, c.completion_tokens), else_=None)),
            ).where(c.task_id.in_(sa.select(tree.c.id)))
        )
    ).one()
    # The first call's role and model are the ones the task was routed to; a failure
    # there that another model recovered must count against them, not for the rescuer.
    first_call = (
        await conn.execute(
            sa.select(c.role, c.backend, c.model)
            .where(c.task_id == task_id)
            .order_by(c.seq)
            .limit(1)
        )
    ).first()
    started = (
        await conn.execute(
            sa.select(sa.func.min(transitions.c.at)).where(
                transitions.c.task_id == task_id,
                transitions.c.to_state == TaskState.RUNNING.value,
            )
        )
    ).scalar()
    return LedgerFacts(
        prompt_tokens=int(sums[0]),
        completion_tokens=int(sums[1]),
        retries=int(sums[2]),
        retry_tokens=int(sums[3]),
        plan_tokens=int(sums[4]),
        answer_tokens=None if sums[5] is None else int(sums[5]),
        role=first_call.role if first_call else None,
        backend=first_call.backend if first_call else None,
        model=first_call.model if first_call else None,
        started=started,
    )


async def _insert(
    conn: AsyncConnection, record: OutcomeRecord, embedding: Embedding | None
) -> None:
    """Insert (or, for a task finished again after a restore, replace) an outcome, its
    text in the task memory and its vector."""
    outcome = record.outcome
    row = asdict(outcome)
    row["features"] = json.dumps(record.features)
    row["level"] = record.level
    await conn.execute(task_outcomes.delete().where(task_outcomes.c.task_id == outcome.task_id))
    await conn.execute(task_outcomes.insert().values(**row))
    await conn.execute(
        sa.text("DELETE FROM task_memory WHERE task_id = :id"), {"id": outcome.task_id}
    )
    await conn.execute(
        sa.text("INSERT INTO task_memory (task_id, text) VALUES (:id, :text)"),
        {"id": outcome.task_id, "text": outcome.text},
    )
    if embedding is not None:
        await _save_vector(conn, outcome.task_id, embedding)


async def _save_vector(conn: AsyncConnection, task_id: str, embedding: Embedding) -> None:
    """Store (or replace) a task's vector by one model, inside the caller's write."""
    vector = embedding.vector
    blob = np.ascontiguousarray(vector, dtype=_BLOB_DTYPE).tobytes()
    await conn.execute(
        task_embeddings.delete().where(
            task_embeddings.c.task_id == task_id, task_embeddings.c.model == embedding.model
        )
    )
    await conn.execute(
        task_embeddings.insert().values(
            task_id=task_id, model=embedding.model, dimension=int(vector.shape[0]), vector=blob
        )
    )
