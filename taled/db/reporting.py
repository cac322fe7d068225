"""What reporting reads and keeps in the store: the token ledger's calls as the live
metrics and the monitor see them, and the monitor's recorded ``violations``.

Violations are kept to the newest ``metrics.recorded_keep`` rows: each write prunes
the older ones in its own transaction. Which values miss their targets is the business
of ``taled.reporting``; this module stores and reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.schema import model_calls, violations
from taled.db.store import Store

__all__ = [
    "FirstToken",
    "LedgerWindow",
    "MinuteTokens",
    "NewViolation",
    "ReportingRecords",
    "SlowReplies",
    "SlowReply",
    "Violation",
    "ViolationCount",
]


@dataclass(frozen=True)
class NewViolation:
    """A missed target to record."""

    at: float
    metric: str
    value: float
    target: float
    context: str
    """JSON: what the value was measured on (a model, a tool, how many times)."""


@dataclass(frozen=True)
class Violation:
    """A recorded missed target."""

    seq: int
    at: float
    metric: str
    value: float
    target: float
    context: str
    """JSON, as recorded (older rows may hold plain text)."""


@dataclass(frozen=True)
class ViolationCount:
    """The recorded violations of one metric, together."""

    metric: str
    rows: int
    occurrences: int
    """Rows count their tallies' occurrences (``$.occurrences`` of the context), else one."""
    worst: float
    target: float
    last_at: float


@dataclass(frozen=True)
class SlowReply:
    """A chat reply (a UX call without a step) whose first token came late."""

    seq: int
    at: float
    load_ms: float
    prompt_ms: float
    backend: str
    model: str
    conversation_id: str | None


@dataclass(frozen=True)
class SlowReplies:
    """The slow chat replies among the ledger's calls up to ``upto`` (a ``seq``)."""

    upto: int
    replies: list[SlowReply]


@dataclass(frozen=True)
class MinuteTokens:
    """Tokens one model spent in one role in one minute."""

    minute: int
    """The minute's start, epoch seconds."""
    backend: str
    model: str
    role: str
    tokens: int


@dataclass(frozen=True)
class FirstToken:
    """How long a chat reply took to its first token (the ledger's load and prompt time)."""

    at: float
    ms: float
    model: str
    conversation_id: str | None


@dataclass(frozen=True)
class LedgerWindow:
    """What the live metrics read of the ledger's calls since a time, in one snapshot."""

    tokens_per_minute: list[MinuteTokens]
    first_tokens: list[FirstToken]
    """Oldest first."""


# Chat replies (UX calls without a step) over target, after the last call scanned.
_SLOW_FIRST_TOKENS = sa.text(
    "SELECT seq, at, load_ms, prompt_ms, backend, model, conversation_id FROM model_calls "
    "WHERE seq > :after AND seq <= :upto AND role = 'ux' AND step IS NULL AND success "
    "AND load_ms + prompt_ms > :target ORDER BY seq"
)
_TOKENS_PER_MINUTE = sa.text(
    "SELECT CAST(at / 60 AS INTEGER) * 60 AS minute, backend, model, role, "
    "SUM(prompt_tokens + completion_tokens) AS tokens FROM model_calls WHERE at >= :since "
    "GROUP BY minute, backend, model, role ORDER BY minute, backend, model, role"
)
# A chat reply's first token: the ledger's load and prompt time of UX calls that
# streamed to a person (intent judgements and summaries carry a step).
_UX_FIRST_TOKEN = sa.text(
    "SELECT at, load_ms + prompt_ms AS ms, model, conversation_id FROM model_calls "
    "WHERE role = 'ux' AND step IS NULL AND success AND at >= :since ORDER BY at"
)


def _violation(row: sa.Row[Any]) -> Violation:
    return Violation(
        seq=int(row.seq),
        at=float(row.at),
        metric=row.metric,
        value=float(row.value),
        target=float(row.target),
        context=row.context,
    )


class ReportingRecords:
    """The ledger as reporting reads it, and recorded violations, over the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- the ledger ----------------------------------------------------------

    async def last_call(self) -> int:
        """The ledger's newest call's ``seq`` (0 when it is empty)."""
        async with self._store.read() as conn:
            last = (await conn.execute(sa.select(sa.func.max(model_calls.c.seq)))).scalar()
        return int(last or 0)

    async def slow_replies(self, after: int, target_ms: float) -> SlowReplies | None:
        """The chat replies after call ``after`` whose first token took more than
        ``target_ms``; None when the ledger has no call after ``after``."""
        async with self._store.read() as conn:
            last = (await conn.execute(sa.select(sa.func.max(model_calls.c.seq)))).scalar()
            upto = int(last or 0)
            if upto <= after:
                return None
            rows = (
                await conn.execute(
                    _SLOW_FIRST_TOKENS, {"after": after, "upto": upto, "target": target_ms}
                )
            ).all()
        return SlowReplies(
            upto,
            [
                SlowReply(
                    seq=int(r.seq),
                    at=float(r.at),
                    load_ms=float(r.load_ms),
                    prompt_ms=float(r.prompt_ms),
                    backend=r.backend,
                    model=r.model,
                    conversation_id=r.conversation_id,
                )
                for r in rows
            ],
        )

    async def window(self, since: float) -> LedgerWindow:
        """Tokens per minute, and chat replies' first-token times, since ``since``."""
        async with self._store.read() as conn:
            per_minute = (await conn.execute(_TOKENS_PER_MINUTE, {"since": since})).all()
            first_tokens = (await conn.execute(_UX_FIRST_TOKEN, {"since": since})).all()
        return LedgerWindow(
            [
                MinuteTokens(int(r.minute), r.backend, r.model, r.role, int(r.tokens))
                for r in per_minute
            ],
            [
                FirstToken(float(r.at), float(r.ms), r.model, r.conversation_id)
                for r in first_tokens
            ],
        )

    # -- violations ----------------------------------------------------------

    async def record(self, rows: Sequence[NewViolation], keep: int) -> None:
        """Record violations and keep the newest ``keep``, in one transaction."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(violations.insert(), [asdict(r) for r in rows])
            await _prune(conn, keep)

        await self._store.write(apply)

    async def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` recorded violations."""

        async def apply(conn: AsyncConnection) -> None:
            await _prune(conn, keep)

        await self._store.write(apply)

    async def recent(self, limit: int, since: float | None = None) -> list[Violation]:
        """The newest recorded violations (since ``since``), newest first."""
        query = sa.select(violations).order_by(violations.c.seq.desc()).limit(limit)
        if since is not None:
            query = query.where(violations.c.at >= since)
        async with self._store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_violation(r) for r in rows]

    async def counts(self, since: float | None = None) -> list[ViolationCount]:
        """Recorded violations per metric (since ``since``), by metric's name."""
        v = violations.c
        occurrences = sa.func.coalesce(
            sa.func.json_extract(v.context, "$.occurrences"), 1
        )  # rows written by the tallies stand for several occurrences
        query = (
            sa.select(
                v.metric,
                sa.func.count().label("rows"),
                sa.func.sum(occurrences).label("occurrences"),
                sa.func.max(v.value).label("worst"),
                sa.func.max(v.target).label("target"),
                sa.func.max(v.at).label("last_at"),
            )
            .group_by(v.metric)
            .order_by(v.metric)
        )
        if since is not None:
            query = query.where(v.at >= since)
        async with self._store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            ViolationCount(
                metric=r.metric,
                rows=int(r.rows),
                occurrences=int(r.occurrences),
                worst=float(r.worst),
                target=float(r.target),
                last_at=float(r.last_at),
            )
            for r in rows
        ]


async def _prune(conn: AsyncConnection, keep: int) -> None:
    newest = (await conn.execute(sa.select(sa.func.max(violations.c.seq)))).scalar()
    if newest is not None and newest > keep:
        await conn.execute(violations.delete().where(violations.c.seq <= newest - keep))
