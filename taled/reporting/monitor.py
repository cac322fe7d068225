"""The performance monitor: every missed target recorded, with its context.

    metric              measured                                  recorded
    ux_first_token_ms   each chat reply's first token (ledger)    one row per call
    status_ms           each get_task the server answers          at most one row per
    rss_mb              the daemon's RSS, every check interval    record_interval_seconds,
                                                                  counting the occurrences
    ready_seconds       READY=1 after start                       once per start

Rows go to the store's ``violations`` table and survive restarts: ``metrics``
lists the newest beside its live ones, ``usage`` counts them. The service runs
``start`` (after the store opens), ``run`` (its loop: wake on news or every
``check_interval_seconds``) and ``stop`` (a last flush, before the store closes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import psutil
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.db.schema import model_calls, violations
from taled.db.store import Store
from taled.settings import MetricsSettings

__all__ = ["Monitor", "describe", "violation_json"]

log = logging.getLogger(__name__)

# Chat replies (UX calls without a step) over target, after the last call scanned.
_SLOW_FIRST_TOKENS = sa.text(
    "SELECT seq, at, load_ms, prompt_ms, backend, model, conversation_id FROM model_calls "
    "WHERE seq > :after AND seq <= :upto AND role = 'ux' AND step IS NULL AND success "
    "AND load_ms + prompt_ms > :target ORDER BY seq"
)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def describe(metric: str, context: dict[str, Any]) -> str:
    """A recorded violation's context as a person reads it."""
    parts: list[str] = []
    if "model" in context:
        parts.append(str(context["model"]))
    if context.get("conversation"):
        parts.append(f"conversation {context['conversation']}")
    if "tool" in context:
        parts.append(str(context["tool"]))
    if context.get("occurrences", 1) != 1 or metric in ("status_ms", "rss_mb"):
        since = context.get("since")
        parts.append(
            f"{context.get('occurrences', 1)} time(s)" + (f" since {since}" if since else "")
        )
    if "pid" in context:
        parts.append(f"pid {context['pid']}")
    return ", ".join(parts)


def violation_json(row: Any) -> dict[str, Any]:
    """The wire form of one recorded violation (a ``violations`` row)."""
    try:
        details = json.loads(row.context)
    except ValueError:
        details = {"text": row.context}
    if not isinstance(details, dict):
        details = {"text": row.context}
    return {
        "seq": int(row.seq),
        "at": _iso(row.at),
        "name": row.metric,
        "value": round(float(row.value), 2),
        "target": float(row.target),
        "context": describe(row.metric, details),
        "details": details,
    }


@dataclass
class _Tally:
    """Occurrences of one continuously measured metric since its last recorded row."""

    metric: str
    count: int = 0
    worst: float = 0.0
    first_at: float = 0.0
    last_recorded: float = -math.inf

    def add(self, value: float, at: float) -> None:
        if self.count == 0:
            self.first_at = at
            self.worst = value
        self.count += 1
        self.worst = max(self.worst, value)

    def due(self, now: float, interval: float) -> bool:
        return self.count > 0 and now - self.last_recorded >= interval

    def take(self, now: float, target: float, **context: Any) -> dict[str, Any]:
        row = {
            "at": now,
            "metric": self.metric,
            "value": self.worst,
            "target": target,
            "context": json.dumps(
                {**context, "occurrences": self.count, "since": _iso(self.first_at)}
            ),
        }
        self.count = 0
        self.last_recorded = now
        return row


class Monitor:
    """Records target violations in the store, rate-limited where they come in streams."""

    def __init__(self, store: Store, settings: MetricsSettings) -> None:
        self._store = store
        self._settings = settings
        self._after_seq = 0
        self._status = _Tally("status_ms")
        self._rss = _Tally("rss_mb")
        self._pending: list[dict[str, Any]] = []
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._next_rss_check = 0.0
        self._started = False

    async def start(self) -> None:
        """Begin after the ledger's current end (calls before are a past run's) and prune."""
        async with self._store.read() as conn:
            last = (await conn.execute(sa.select(sa.func.max(model_calls.c.seq)))).scalar()
        self._after_seq = int(last or 0)
        await self._store.write(self._prune)
        self._started = True

    async def run(self) -> None:
        """The loop: record what came in, check memory; until cancelled."""
        while True:
            with anyio.move_on_after(self._settings.check_interval_seconds):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.flush()
            except Exception:  # the monitor must never take the daemon down
                log.exception("the performance monitor could not record violations")

    async def stop(self) -> None:
        """Record everything still counted, whatever the rate limit says."""
        if not self._started:
            return
        try:
            await self._store.ledger_settled()  # the last replies' rows, still in flight
            await self.flush(final=True)
        except Exception:
            log.exception("the performance monitor's last violations were not recorded")
        self._started = False

    def observe_status(self, ms: float) -> None:
        """One get_task's latency (the server times every tool call)."""
        if ms > self._settings.status_ms:
            self._status.add(ms, time.time())
            if self._status.due(time.time(), self._settings.record_interval_seconds):
                self._wake.set()

    def note_ready(self, seconds: float, models: list[str]) -> None:
        """READY=1 was sent ``seconds`` after start."""
        if seconds > self._settings.ready_seconds:
            context = {"pid": os.getpid(), "models": models}
            self._pending.append(
                {
                    "at": time.time(),
                    "metric": "ready_seconds",
                    "value": seconds,
                    "target": self._settings.ready_seconds,
                    "context": json.dumps(context),
                }
            )
            self._wake.set()

    async def flush(self, *, final: bool = False) -> None:
        """Record slow chat replies in the ledger so far and whatever tallies are due."""
        if not self._started:
            return
        async with self._lock:
            s = self._settings
            now = time.time()
            if final or now >= self._next_rss_check:
                self._next_rss_check = now + s.check_interval_seconds
                rss_mb = psutil.Process(os.getpid()).memory_info().rss / 2**20
                if rss_mb > s.rss_mb:
                    self._rss.add(rss_mb, now)
            rows, self._pending = self._pending, []
            rows += await self._slow_first_tokens()
            interval = 0.0 if final else s.record_interval_seconds
            if self._status.due(now, interval):
                rows.append(self._status.take(now, s.status_ms, tool="get_task"))
            if self._rss.due(now, interval):
                rows.append(self._rss.take(now, s.rss_mb, pid=os.getpid()))
            if not rows:
                return

            async def insert(conn: AsyncConnection) -> None:
                await conn.execute(violations.insert(), rows)
                await self._prune(conn)

            await self._store.write(insert)

    async def _slow_first_tokens(self) -> list[dict[str, Any]]:
        target = self._settings.ux_first_token_ms
        async with self._store.read() as conn:
            upto = (await conn.execute(sa.select(sa.func.max(model_calls.c.seq)))).scalar()
            upto = int(upto or 0)
            if upto <= self._after_seq:
                return []
            found = (
                await conn.execute(
                    _SLOW_FIRST_TOKENS, {"after": self._after_seq, "upto": upto, "target": target}
                )
            ).all()
        self._after_seq = upto
        return [
            {
                "at": r.at,
                "metric": "ux_first_token_ms",
                "value": float(r.load_ms + r.prompt_ms),
                "target": target,
                "context": json.dumps(
                    {
                        "model": f"{r.backend}:{r.model}",
                        "conversation": r.conversation_id,
                        "call": r.seq,
                        "load_ms": round(float(r.load_ms), 1),
                        "prompt_ms": round(float(r.prompt_ms), 1),
                    }
                ),
            }
            for r in found
        ]

    async def _prune(self, conn: AsyncConnection) -> None:
        keep = self._settings.recorded_keep
        newest = (await conn.execute(sa.select(sa.func.max(violations.c.seq)))).scalar()
        if newest is not None and newest > keep:
            await conn.execute(violations.delete().where(violations.c.seq <= newest - keep))

    async def recent(self, limit: int, since: float | None = None) -> list[dict[str, Any]]:
        """The newest recorded violations (since ``since``), newest first."""
        query = sa.select(violations).order_by(violations.c.seq.desc()).limit(limit)
        if since is not None:
            query = query.where(violations.c.at >= since)
        async with self._store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [violation_json(r) for r in rows]

    async def counts(self, since: float | None = None) -> list[dict[str, Any]]:
        """Recorded violations per metric: rows, occurrences, worst value, last time."""
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
            {
                "name": r.metric,
                "rows": int(r.rows),
                "occurrences": int(r.occurrences),
                "worst": round(float(r.worst), 2),
                "target": float(r.target),
                "last_at": _iso(r.last_at),
            }
            for r in rows
        ]
