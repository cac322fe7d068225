"""The usage report: what the tokens went to, how well budgets predict, what tale saved.

Everything comes from the store in a handful of aggregates read through
``taled.db.usage`` (the ledger ``model_calls``, ``messages``, ``task_outcomes``)
and the monitor's ``violations``; ``docs/usage.md`` explains each number. The
savings against a naive single-model design are an *estimate* from the ledger and
the conversations, labelled so, with the formula in the report's ``method``;
``tests/bench/bench_savings.py`` measures the real thing on a replayed workload.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from taled.db.store import Store
from taled.db.usage import (
    CallTotals,
    ChatTurns,
    ConversationUsage,
    LedgerGroup,
    LevelUsage,
    OutcomeDay,
    Prediction,
    RoutedToUx,
    StatelessTotals,
    TaskUsage,
    UsageRecords,
)
from taled.reporting.monitor import Monitor
from taled.settings import ChatSettings, UsageSettings

__all__ = ["METHOD", "UsageReport", "learning_curve", "since_days"]

METHOD = (
    "Estimate, not a measurement. Naive design: every call on the task model, each chat "
    "turn sent with the system prompt and the conversation's full history, replies capped "
    "at a fixed max_tokens (N = usage.naive_max_tokens). With r = characters per token "
    "(measured: characters of model-written chat replies / their completion tokens; "
    "chat.chars_per_token until there are any), for every chat turn in the period: "
    "naive prompt = (system prompt chars + chars of all the conversation's messages up to "
    "and including this one) / r; naive completion = min(reply chars / r, N). "
    "naive task-model tokens = naive total = tokens of the ledger's task calls (any role: "
    "the work is assumed to cost the same) + naive chat tokens. tale task-model tokens = "
    "ledger tokens of role 'task'; tale total = all ledger tokens. saved = naive - tale, "
    "and saved / naive as a percentage."
)

STATELESS_METHOD = (
    "Estimate from the ledger. For every top-level task with a direct answer, a fresh single "
    "call is the task's first direct answer (the runner's system prompt and the task's "
    "text, on the model it ran on): stateless tokens = that call's tokens; tale tokens = "
    "every call of the task and its subtasks; extra = tale - stateless. first_passed: tasks "
    "whose first answer passed its gate; rescued: tasks that completed only after a retry, "
    "a fallback, decomposition or planning, which a single call would have failed. Tasks "
    "planned up front or acting in a workspace have no direct answer and are left out. "
    "The benchmark (tests/bench/bench_savings.py) measures the same baseline for real."
)


def since_days(days: int, today: date | None = None) -> float:
    """The start (local midnight) of the period made of today and the ``days - 1`` before."""
    first = (today or date.today()) - timedelta(days=days - 1)
    return time.mktime((first.year, first.month, first.day, 0, 0, 0, 0, 0, -1))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _pct(part: float, whole: float) -> float | None:
    return None if whole <= 0 else round(100.0 * part / whole, 1)


def _totals(calls: int, prompt: int, completion: int, failures: int, ms: float) -> dict[str, Any]:
    return {
        "calls": int(calls),
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
        "total_tokens": int(prompt) + int(completion),
        "failures": int(failures),
        "total_ms": round(float(ms), 1),
    }


def _row_totals(t: CallTotals) -> dict[str, Any]:
    return _totals(t.calls, t.prompt_tokens, t.completion_tokens, t.failures, t.total_ms)


def _excerpt(text: str | None, limit: int = 80) -> str:
    short = " ".join((text or "").split())
    return short if len(short) <= limit else short[: limit - 1].rstrip() + "…"


class _Sum:
    """Ledger totals rolled up under one key (a model, a role, a day)."""

    def __init__(self) -> None:
        self.calls = self.prompt = self.completion = self.failures = 0
        self.ms = 0.0

    def add(self, t: CallTotals) -> None:
        self.calls += t.calls
        self.prompt += t.prompt_tokens
        self.completion += t.completion_tokens
        self.failures += t.failures
        self.ms += t.total_ms

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion

    def json(self) -> dict[str, Any]:
        return _totals(self.calls, self.prompt, self.completion, self.failures, self.ms)


def _roll(rows: Iterable[LedgerGroup], key: Callable[[LedgerGroup], Any]) -> dict[Any, _Sum]:
    out: dict[Any, _Sum] = {}
    for r in rows:
        out.setdefault(key(r), _Sum()).add(r.totals)
    return dict(sorted(out.items()))


def _mape(pairs: list[tuple[int, int]]) -> float | None:
    """Mean absolute percentage error of (predicted, actual) pairs, actual > 0."""
    if not pairs:
        return None
    return round(100.0 * sum(abs(p - a) / a for p, a in pairs) / len(pairs), 1)


def learning_curve(rows: list[tuple[float, int, int]], points: int) -> list[dict[str, Any]]:
    """MAPE over consecutive groups of (at, predicted, actual), oldest first.

    The rows are split into at most ``points`` groups of equal size (the newest
    group may be smaller); each point says how many outcomes it covers.
    """
    if not rows:
        return []
    size = max(1, math.ceil(len(rows) / points))
    curve = []
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        curve.append(
            {
                "outcomes": start + len(group),
                "count": len(group),
                "at": _iso(group[-1][0]),
                "mape_pct": _mape([(p, a) for _, p, a in group]),
            }
        )
    return curve


class UsageReport:
    """Answers the ``usage`` tool."""

    def __init__(
        self, store: Store, monitor: Monitor, settings: UsageSettings, chat: ChatSettings
    ) -> None:
        self._store = store
        self._records = UsageRecords(store)
        self._monitor = monitor
        self._settings = settings
        self._chat = chat

    async def report(self, days: int | None = None, top: int | None = None) -> dict[str, Any]:
        """The whole report over today and the ``days - 1`` before (default: all history)."""
        s = self._settings
        top = top or s.top
        since = since_days(days) if days is not None else 0.0
        # Rows still on their way to the ledger are part of what was used.
        await self._store.ledger_settled()
        await self._monitor.flush()
        records = self._records
        ledger = await records.ledger(since)
        tasks = await records.top_tasks(since, top)
        levels = await records.by_complexity(since)
        conversations = await records.top_conversations(since, top)
        routed = await records.routed_to_ux(since)
        stateless = await records.stateless(since)
        loops = await records.loops_stopped(since)
        replies = await records.reply_chars()
        measured = bool(replies.tokens) and bool(replies.chars)
        ratio = (
            min(20.0, max(1.0, replies.chars / replies.tokens))
            if measured
            else self._chat.chars_per_token
        )
        # A naive design's replies stop at its max_tokens: cap each reply's characters.
        turns = await records.chat_turns(since, round(s.naive_max_tokens * ratio))
        by_day_outcomes = await records.outcomes_by_day(since)
        last = await records.last_predictions(since, s.curve_outcomes)
        total = _Sum()
        for r in ledger:
            total.add(r.totals)
        report: dict[str, Any] = {
            "at": _iso(time.time()),
            "days": days,
            "since": _iso(since) if days is not None else None,
            "top": top,
            "total": total.json(),
            "by_model": [
                {"backend": b, "model": m, **v.json()}
                for (b, m), v in _roll(ledger, lambda r: (r.backend, r.model)).items()
            ],
            "by_role": [
                {"role": k, **v.json()} for k, v in _roll(ledger, lambda r: r.role).items()
            ],
            "by_route": [
                {"role": role, "route": route, **v.json()}
                for (role, route), v in _roll(ledger, lambda r: (r.role, r.route)).items()
            ],
            "by_day": [{"day": k, **v.json()} for k, v in _roll(ledger, lambda r: r.day).items()],
            "by_task": [_task_json(r) for r in tasks],
            "by_complexity": [_level_json(r) for r in _level_order(levels)],
            "by_conversation": [_conversation_json(r) for r in conversations],
        }
        report["prediction"] = _prediction(by_day_outcomes, last, s.curve_points)
        report["truncation"] = _truncation(by_day_outcomes)
        report["savings"] = self._savings(ledger, routed, turns, ratio, measured)
        report["savings"]["loops_stopped"] = {"calls": loops}
        report["savings"]["stateless"] = _stateless(stateless)
        report["violations"] = {
            "counts": await self._monitor.counts(since if days is not None else None),
            "recent": await self._monitor.recent(top, since if days is not None else None),
        }
        return report

    def _savings(
        self,
        ledger: Sequence[LedgerGroup],
        routed: RoutedToUx,
        turns: ChatTurns,
        ratio: float,
        measured: bool,
    ) -> dict[str, Any]:
        s = self._settings

        def tokens(chars: int) -> int:
            return round(chars / ratio)

        chat_turns = turns.turns
        system = len(self._chat.system_prompt)
        naive_prompt = tokens(turns.prompt_chars + system * chat_turns)
        naive_completion = tokens(turns.completion_chars)
        from_store = turns.from_store
        store_tokens = tokens(turns.store_prompt_chars + system * from_store) + tokens(
            turns.store_completion_chars
        )
        task_calls = _Sum()
        for r in ledger:
            if r.for_task:
                task_calls.add(r.totals)
        task_model = sum(
            r.totals.prompt_tokens + r.totals.completion_tokens for r in ledger if r.role == "task"
        )
        total = sum(r.totals.prompt_tokens + r.totals.completion_tokens for r in ledger)
        naive_total = task_calls.tokens + naive_prompt + naive_completion
        return {
            "summaries": {
                "saved_prompt_tokens": sum(r.saved_tokens for r in ledger),
                "calls": sum(r.summarised_calls for r in ledger),
            },
            "answered_from_store": {"turns": from_store, "estimated_tokens": store_tokens},
            "handed_off": {"turns": turns.handed_off},
            "routed_to_ux": {
                "tasks": routed.tasks,
                "calls": routed.calls,
                "task_model_tokens_saved": routed.tokens,
            },
            "estimate": {
                "kind": "estimate",
                "method": METHOD,
                "chars_per_token": round(ratio, 2),
                "chars_per_token_measured": measured,
                "naive_max_tokens": s.naive_max_tokens,
                "chat_turns": chat_turns,
                "naive": {
                    "chat_prompt_tokens": naive_prompt,
                    "chat_completion_tokens": naive_completion,
                    "task_tokens": task_calls.tokens,
                    "task_model_tokens": naive_total,
                    "total_tokens": naive_total,
                },
                "tale": {
                    "task_model_tokens": task_model,
                    "ux_model_tokens": total - task_model,
                    "total_tokens": total,
                },
                "saved": {
                    "task_model_tokens": naive_total - task_model,
                    "task_model_pct": _pct(naive_total - task_model, naive_total),
                    "total_tokens": naive_total - total,
                    "total_pct": _pct(naive_total - total, naive_total),
                },
            },
        }


def _stateless(r: StatelessTotals) -> dict[str, Any]:
    """tale against one fresh call per task: what its extra work cost and what it bought."""
    tale, fresh, rescued = r.tale_tokens, r.first_tokens, r.rescued
    extra = tale - fresh
    return {
        "kind": "estimate",
        "method": STATELESS_METHOD,
        "tasks": r.tasks,
        "direct": r.direct,
        "stateless_tokens": fresh,
        "tale_tokens": tale,
        "extra_tokens": extra,
        "ratio": round(tale / fresh, 2) if fresh else None,
        "first_passed": r.first_passed,
        "rescued": rescued,
        "extra_tokens_per_rescue": round(extra / rescued) if rescued else None,
    }


_LEVELS = ("simple", "medium", "complex")


def _level_order(rows: Sequence[LevelUsage]) -> list[LevelUsage]:
    def rank(r: LevelUsage) -> int:
        return _LEVELS.index(r.level) if r.level in _LEVELS else len(_LEVELS)

    return sorted(rows, key=lambda r: (rank(r), r.level))


def _task_json(r: TaskUsage) -> dict[str, Any]:
    return {
        "id": r.id,
        "text": _excerpt(r.text),
        "state": r.state,
        "complexity": r.level,
        "predicted_complexity": r.predicted_level,
        "confidence": None if r.confidence is None else round(r.confidence, 2),
        "subtasks": max(0, r.tasks - 1),
        **_row_totals(r.totals),
    }


def _level_json(r: LevelUsage) -> dict[str, Any]:
    tasks, outcomes = r.tasks, r.outcomes
    totals = _row_totals(r.totals)
    return {
        "complexity": r.level,
        "tasks": tasks,
        **totals,
        "tokens_per_task": round(totals["total_tokens"] / tasks) if tasks else 0,
        "success_pct": _pct(r.successes, outcomes),
        "classified_right_pct": _pct(r.predicted_right, outcomes),
    }


def _conversation_json(r: ConversationUsage) -> dict[str, Any]:
    return {
        "id": r.id,
        "title": _excerpt(r.title, 60),
        "turns": r.turns,
        "answered_from_store": r.from_store,
        **_row_totals(r.totals),
        "saved_tokens": r.saved_tokens,
    }


def _prediction(
    days: Sequence[OutcomeDay], last: Sequence[Prediction], points: int
) -> dict[str, Any]:
    predicted = sum(r.predicted for r in days)
    ape = sum(r.ape_sum for r in days)
    outcomes = sum(r.outcomes for r in days)
    curve = learning_curve(
        [(r.at, r.predicted_tokens, r.actual_tokens) for r in reversed(last)],
        points,
    )
    first, newest = (curve[0], curve[-1]) if len(curve) >= 2 else (None, None)
    return {
        "outcomes": outcomes,
        "predicted": predicted,
        "mape_pct": None if not predicted else round(100.0 * ape / predicted, 1),
        "classified_right_pct": _pct(sum(r.level_right for r in days), outcomes),
        "by_day": [
            {
                "day": r.day,
                "outcomes": r.outcomes,
                "predicted": r.predicted,
                "mape_pct": None if not r.predicted else round(100.0 * r.ape_sum / r.predicted, 1),
            }
            for r in days
        ],
        "curve": curve,
        "falling": None
        if first is None or newest is None
        else bool(newest["mape_pct"] < first["mape_pct"]),
    }


def _truncation(days: Sequence[OutcomeDay]) -> dict[str, Any]:
    tasks = sum(r.outcomes for r in days)
    truncated = sum(r.truncated for r in days)
    return {
        "tasks": tasks,
        "truncated": truncated,
        "rate_pct": _pct(truncated, tasks),
        "truncations": sum(r.truncations for r in days),
        "retries": sum(r.retries for r in days),
    }
