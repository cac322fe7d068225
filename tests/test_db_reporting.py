"""The reporting repository (taled/db/reporting.py) over a real store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from taled.db.reporting import NewViolation, ReportingRecords
from taled.db.store import CallRecord, Store
from taled.settings import StoreSettings
from taled.tasks.workstate import AttemptKey

T = TypeVar("T")


def _run(tmp_path: Path, body: Callable[[Store, ReportingRecords], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        try:
            return await body(store, ReportingRecords(store))
        finally:
            await store.close()

    return asyncio.run(main())


def _call(at: float, first_token_ms: float, *, step: str | None = None) -> CallRecord:
    return CallRecord(
        role="ux",
        backend="llamacpp",
        model="m",
        task_id=None,
        prompt_tokens=10,
        completion_tokens=5,
        load_ms=first_token_ms / 2,
        prompt_ms=first_token_ms / 2,
        generation_ms=50.0,
        total_ms=first_token_ms + 50,
        success=True,
        key=None if step is None else AttemptKey(step),
        conversation_id="c1",
        at=at,
    )


def _violation(at: float, metric: str, value: float, **context: object) -> NewViolation:
    return NewViolation(at, metric, value, 1.0, json.dumps(context))


def test_slow_replies_are_the_chat_calls_over_target_after_a_seq(tmp_path: Path) -> None:
    """Only chat replies (UX calls without a step) over the target count, after the seq
    given; None when the ledger has nothing after it."""

    async def body(store: Store, records: ReportingRecords) -> None:
        assert await records.last_call() == 0
        assert await records.slow_replies(0, 250.0) is None
        store.record_call(_call(100.0, 400.0))
        store.record_call(_call(101.0, 100.0))
        store.record_call(_call(102.0, 900.0, step="intent"))
        await store.ledger_settled()
        found = await records.slow_replies(0, 250.0)
        assert found is not None and found.upto == 3 == await records.last_call()
        assert [(r.seq, r.load_ms + r.prompt_ms) for r in found.replies] == [(1, 400.0)]
        assert await records.slow_replies(3, 250.0) is None

    _run(tmp_path, body)


def test_the_window_sums_tokens_per_minute_and_lists_first_tokens(tmp_path: Path) -> None:
    """Tokens are summed per minute and model since the time given; chat replies' first
    tokens are listed oldest first."""

    async def body(store: Store, records: ReportingRecords) -> None:
        for at, ms in ((50.0, 300.0), (130.0, 200.0), (170.0, 100.0)):
            store.record_call(_call(at, ms))
        await store.ledger_settled()
        window = await records.window(100.0)
        assert [(m.minute, m.tokens) for m in window.tokens_per_minute] == [(120, 30)]
        assert [(f.at, f.ms) for f in window.first_tokens] == [(130.0, 200.0), (170.0, 100.0)]

    _run(tmp_path, body)


def test_recorded_violations_keep_the_newest_and_count_occurrences(tmp_path: Path) -> None:
    """Recording prunes to the newest ``keep``; counts add up a row's occurrences."""

    async def body(store: Store, records: ReportingRecords) -> None:
        await records.record(
            [
                _violation(1.0, "rss_mb", 5.0, occurrences=3),
                _violation(2.0, "status_ms", 7.0),
                _violation(3.0, "rss_mb", 9.0),
            ],
            keep=2,
        )
        recent = await records.recent(10)
        assert [(v.seq, v.metric) for v in recent] == [(3, "rss_mb"), (2, "status_ms")]
        assert [v.seq for v in await records.recent(10, since=2.5)] == [3]
        counts = {c.metric: (c.rows, c.occurrences, c.worst) for c in await records.counts()}
        assert counts == {"rss_mb": (1, 1, 9.0), "status_ms": (1, 1, 7.0)}
        await records.record([_violation(4.0, "rss_mb", 2.0, occurrences=4)], keep=10)
        rss = [c for c in await records.counts() if c.metric == "rss_mb"]
        assert (rss[0].rows, rss[0].occurrences, rss[0].last_at) == (2, 5, 4.0)
        await records.prune(1)
        assert [v.seq for v in await records.recent(10)] == [4]

    _run(tmp_path, body)
