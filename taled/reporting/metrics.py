"""Live metrics against the spec's targets: what the dashboard and ``metrics`` show.

Token rates and the UX model's first-token latency come from the ledger (the
backend's own counts and timings); tool-call latencies are timed by the server
and kept in memory (the last ``metrics.samples`` per tool); memory is psutil's.
A value over its target is a violation, listed newest first with its context;
the monitor (``taled/reporting/monitor.py``) records them, and ``recorded_violations``
lists the newest recorded rows, which survive restarts.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psutil

from taled.db.reporting import ReportingRecords
from taled.db.store import Store
from taled.reporting.monitor import Monitor
from taled.settings import MetricsSettings

__all__ = ["Metrics", "percentile"]


def percentile(values: list[float], pct: float) -> float | None:
    """The ``pct`` percentile by nearest rank (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Metrics:
    """Collects tool timings and answers the ``metrics`` tool."""

    def __init__(
        self,
        store: Store,
        settings: MetricsSettings,
        *,
        workers: int,
        ready_seconds: Callable[[], float | None],
        monitor: Monitor | None = None,
    ) -> None:
        self._store = store
        self._records = ReportingRecords(store)
        self._monitor = monitor
        self._settings = settings
        self._workers = workers
        self._ready_seconds = ready_seconds
        self._tools: dict[str, deque[tuple[float, float]]] = {}

    def time_tool(self, name: str, seconds: float) -> None:
        """Record how long one tool call took (the server calls this)."""
        samples = self._tools.get(name)
        if samples is None:
            samples = self._tools[name] = deque(maxlen=self._settings.samples)
        samples.append((time.time(), seconds * 1000))
        if name == "get_task" and self._monitor is not None:
            self._monitor.observe_status(seconds * 1000)

    async def snapshot(self) -> dict[str, Any]:
        """Token rates, latencies against targets, queue depth and recent violations."""
        s = self._settings
        recorded: list[dict[str, Any]] = []
        if self._monitor is not None:
            await self._monitor.flush()
            recorded = await self._monitor.recent(s.violations)
        now = time.time()
        since = now - s.window_minutes * 60
        window = await self._records.window(since)
        per_minute, first_tokens = window.tokens_per_minute, window.first_tokens
        counts = await self._store.count_by_state()
        violations: list[dict[str, Any]] = []

        ux = [r.ms for r in first_tokens]
        violations += [
            {
                "at": _iso(r.at),
                "name": "ux_first_token_ms",
                "value": round(r.ms, 1),
                "target": s.ux_first_token_ms,
                "context": f"{r.model}"
                + (f", conversation {r.conversation_id}" if r.conversation_id else ""),
            }
            for r in first_tokens
            if r.ms > s.ux_first_token_ms
        ]
        status = [(at, ms) for at, ms in self._tools.get("get_task", ()) if at >= since]
        violations += [
            {
                "at": _iso(at),
                "name": "status_ms",
                "value": round(ms, 2),
                "target": s.status_ms,
                "context": "get_task",
            }
            for at, ms in status
            if ms > s.status_ms
        ]
        ready = self._ready_seconds()
        rss_mb = psutil.Process(os.getpid()).memory_info().rss / 2**20
        latency = [
            _latency("ux_first_token_ms", ux, s.ux_first_token_ms, "p95", "ms"),
            _latency("status_ms", [ms for _, ms in status], s.status_ms, "p99", "ms"),
            _latency("ready_seconds", [ready] if ready else [], s.ready_seconds, "max", "s"),
            _latency("rss_mb", [rss_mb], s.rss_mb, "max", "MB"),
        ]
        violations.sort(key=lambda v: str(v["at"]), reverse=True)
        return {
            "at": _iso(now),
            "window_minutes": s.window_minutes,
            "tokens_per_minute": [
                {
                    "minute": _iso(r.minute),
                    "model": f"{r.backend}:{r.model}",
                    "role": r.role,
                    "tokens": r.tokens,
                }
                for r in per_minute
            ],
            "latency": latency,
            "queue": {
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
                "waiting": counts.get("waiting", 0),
                "paused": counts.get("paused", 0),
                "workers": self._workers,
            },
            "violations": violations[: s.violations],
            "recorded_violations": recorded,
        }


def _latency(name: str, values: list[float], target: float, stat: str, unit: str) -> dict[str, Any]:
    """One metric's percentiles and whether the statistic the target names meets it."""
    p50, p95, p99 = (percentile(values, p) for p in (50, 95, 99))
    judged = {"p95": p95, "p99": p99, "max": max(values) if values else None}[stat]
    return {
        "name": name,
        "p50": None if p50 is None else round(p50, 2),
        "p95": None if p95 is None else round(p95, 2),
        "p99": None if p99 is None else round(p99, 2),
        "target": target,
        "stat": stat,
        "unit": unit,
        "samples": len(values),
        "ok": None if judged is None else judged <= target,
    }
