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

from taled.db.reporting import NewViolation, ReportingRecords, Violation
from taled.db.store import Store
from taled.settings import MetricsSettings

__all__ = ["Monitor", "describe", "violation_json"]

log = logging.getLogger(__name__)


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
        count = context.get("occurrences", 1)
        parts.append(("once" if count == 1 else f"{count} times") + _since(context.get("since")))
    if "pid" in context:
        parts.append(f"pid {context['pid']}")
    return ", ".join(parts)


def _since(stamp: object) -> str:
    """An interval's start as words to append: since HH:MM:SS in this machine's zone,
    the one `tale usage` prints the row's own time in (that time gives the day); nothing
    without one."""
    if not isinstance(stamp, str):
        return ""
    try:
        return f" since {datetime.fromisoformat(stamp).astimezone():%H:%M:%S %Z}"
    except ValueError:
        return f" since {stamp}"  # written by another version: shown as it is


def violation_json(row: Violation) -> dict[str, Any]:
    """The wire form of one recorded violation."""
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

    def take(self, now: float, target: float, **context: Any) -> NewViolation:
        row = NewViolation(
            at=now,
            metric=self.metric,
            value=self.worst,
            target=target,
            context=json.dumps(
                {**context, "occurrences": self.count, "since": _iso(self.first_at)}
            ),
        )
        self.count = 0
        self.last_recorded = now
        return row


class Monitor:
    """Records target violations in the store, rate-limited where they come in streams."""

    def __init__(self, store: Store, settings: MetricsSettings) -> None:
        self._store = store
        self._records = ReportingRecords(store)
        self._settings = settings
        self._after_seq = 0
        self._status = _Tally("status_ms")
        self._rss = _Tally("rss_mb")
        self._pending: list[NewViolation] = []
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._next_rss_check = 0.0
        self._started = False

    async def start(self) -> None:
        """Begin after the ledger's current end (calls before are a past run's) and prune."""
        self._after_seq = await self._records.last_call()
        await self._records.prune(self._settings.recorded_keep)
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
                NewViolation(
                    at=time.time(),
                    metric="ready_seconds",
                    value=seconds,
                    target=self._settings.ready_seconds,
                    context=json.dumps(context),
                )
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
            await self._records.record(rows, s.recorded_keep)

    async def _slow_first_tokens(self) -> list[NewViolation]:
        target = self._settings.ux_first_token_ms
        found = await self._records.slow_replies(self._after_seq, target)
        if found is None:
            return []
        self._after_seq = found.upto
        return [
            NewViolation(
                at=r.at,
                metric="ux_first_token_ms",
                value=r.load_ms + r.prompt_ms,
                target=target,
                context=json.dumps(
                    {
                        "model": f"{r.backend}:{r.model}",
                        "conversation": r.conversation_id,
                        "call": r.seq,
                        "load_ms": round(r.load_ms, 1),
                        "prompt_ms": round(r.prompt_ms, 1),
                    }
                ),
            )
            for r in found.replies
        ]

    async def recent(self, limit: int, since: float | None = None) -> list[dict[str, Any]]:
        """The newest recorded violations (since ``since``), newest first."""
        return [violation_json(r) for r in await self._records.recent(limit, since)]

    async def counts(self, since: float | None = None) -> list[dict[str, Any]]:
        """Recorded violations per metric: rows, occurrences, worst value, last time."""
        return [
            {
                "name": c.metric,
                "rows": c.rows,
                "occurrences": c.occurrences,
                "worst": round(c.worst, 2),
                "target": c.target,
                "last_at": _iso(c.last_at),
            }
            for c in await self._records.counts(since)
        ]
