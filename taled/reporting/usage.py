"""The usage report: what the tokens went to, how well budgets predict, what tale saved.

Everything comes from the store in a handful of SQL aggregates (the ledger
``model_calls``, ``messages``, ``task_outcomes`` and the monitor's
``violations``); ``docs/usage.md`` explains each number. The savings against
a naive single-model design are an *estimate* from the ledger and the
conversations, labelled so, with the formula in the report's ``method``;
``tests/bench/bench_savings.py`` measures the real thing on a replayed workload.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from taled.db.schema import PREDICTABLE_TOKENS_SQL
from taled.db.store import Store
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

_LEDGER = sa.text(
    "SELECT date(at, 'unixepoch', 'localtime') AS day, backend, model, role, route, "
    "task_id IS NOT NULL AS for_task, COUNT(*) AS calls, "
    "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, "
    "SUM(CASE WHEN success THEN 0 ELSE 1 END) AS failures, SUM(total_ms) AS total_ms, "
    "SUM(saved_tokens) AS saved_tokens, SUM(CASE WHEN saved_tokens > 0 THEN 1 ELSE 0 END) "
    "AS summarised_calls "
    "FROM model_calls WHERE at >= :since "
    "GROUP BY day, backend, model, role, route, for_task"
)

_SUMS = (
    "COUNT(*) AS calls, SUM(prompt_tokens) AS prompt_tokens, "
    "SUM(completion_tokens) AS completion_tokens, "
    "SUM(CASE WHEN success THEN 0 ELSE 1 END) AS failures, SUM(total_ms) AS total_ms"
)

# Ledger sums per top-level task: each call's task is walked up to its root.
_BY_ROOT = (
    "WITH RECURSIVE per AS ("
    f"  SELECT task_id, {_SUMS} FROM model_calls"
    "   WHERE task_id IS NOT NULL AND at >= :since GROUP BY task_id),"
    " up(task_id, id, parent_id) AS ("
    "  SELECT per.task_id, t.id, t.parent_id FROM per JOIN tasks t ON t.id = per.task_id"
    "  UNION ALL"
    "  SELECT up.task_id, t.id, t.parent_id FROM up JOIN tasks t ON t.id = up.parent_id),"
    " roots AS (SELECT task_id, id AS root FROM up WHERE parent_id IS NULL),"
    " by_root AS ("
    "  SELECT COALESCE(roots.root, per.task_id) AS root, COUNT(*) AS tasks,"
    "   SUM(per.calls) AS calls, SUM(per.prompt_tokens) AS prompt_tokens,"
    "   SUM(per.completion_tokens) AS completion_tokens, SUM(per.failures) AS failures,"
    "   SUM(per.total_ms) AS total_ms"
    "  FROM per LEFT JOIN roots ON roots.task_id = per.task_id"
    "  GROUP BY COALESCE(roots.root, per.task_id)) "
)
_TOP_TASKS = sa.text(
    _BY_ROOT + "SELECT b.*, substr(t.text, 1, 400) AS text, t.state, o.level, "
    "o.predicted_level, o.confidence FROM by_root b "
    "LEFT JOIN tasks t ON t.id = b.root LEFT JOIN task_outcomes o ON o.task_id = b.root "
    "ORDER BY b.prompt_tokens + b.completion_tokens DESC, b.root LIMIT :top"
)
_BY_COMPLEXITY = sa.text(
    _BY_ROOT + "SELECT COALESCE(o.level, 'unknown') AS level, COUNT(*) AS tasks, "
    "SUM(b.calls) AS calls, SUM(b.prompt_tokens) AS prompt_tokens, "
    "SUM(b.completion_tokens) AS completion_tokens, SUM(b.failures) AS failures, "
    "SUM(b.total_ms) AS total_ms, COUNT(o.task_id) AS outcomes, "
    "SUM(CASE WHEN o.success THEN 1 ELSE 0 END) AS successes, "
    "SUM(CASE WHEN o.predicted_level = o.level THEN 1 ELSE 0 END) AS predicted_right "
    "FROM by_root b LEFT JOIN task_outcomes o ON o.task_id = b.root "
    "GROUP BY COALESCE(o.level, 'unknown')"
)
_TOP_CONVERSATIONS = sa.text(
    f"SELECT c.conversation_id AS id, {_SUMS}, SUM(saved_tokens) AS saved_tokens, "
    "(SELECT title FROM conversations WHERE id = c.conversation_id) AS title, "
    "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.conversation_id "
    " AND m.role = 'user' AND m.at >= :since) AS turns, "
    "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.conversation_id "
    " AND m.role = 'user' AND m.action IS NOT NULL AND m.at >= :since) AS from_store "
    "FROM model_calls c WHERE c.conversation_id IS NOT NULL AND c.at >= :since "
    "GROUP BY c.conversation_id "
    "ORDER BY SUM(prompt_tokens) + SUM(completion_tokens) DESC, c.conversation_id LIMIT :top"
)
_ROUTED_TO_UX = sa.text(
    "SELECT COUNT(DISTINCT task_id) AS tasks, COUNT(*) AS calls, "
    "COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS tokens "
    "FROM model_calls WHERE role = 'ux' AND task_id IS NOT NULL AND at >= :since"
)
# Top-level tasks against one fresh call each: what tale spent on each, what its first
# direct answer cost (that call is the fresh call a user would have made: the runner's
# system prompt and the task's text), and whether the first answer passed or tale's
# retries, fallback, decomposition or planning carried it.
_STATELESS = sa.text(
    _BY_ROOT + ", first AS (SELECT task_id, SUM(prompt_tokens + completion_tokens) AS tokens "
    " FROM model_calls WHERE step = 'answer' AND attempt = 1 AND at >= :since GROUP BY task_id) "
    "SELECT COUNT(*) AS tasks, COUNT(f.task_id) AS direct, "
    "COALESCE(SUM(CASE WHEN f.task_id IS NOT NULL "
    " THEN b.prompt_tokens + b.completion_tokens END), 0) AS tale_tokens, "
    "COALESCE(SUM(f.tokens), 0) AS first_tokens, "
    "SUM(CASE WHEN f.task_id IS NOT NULL AND o.success AND COALESCE(o.retries, 0) = 0 "
    " AND NOT COALESCE(o.decomposed, 0) AND NOT COALESCE(o.planned, 0) THEN 1 ELSE 0 END)"
    " AS first_passed, "
    "SUM(CASE WHEN f.task_id IS NOT NULL AND o.success AND (COALESCE(o.retries, 0) > 0 "
    " OR COALESCE(o.decomposed, 0) OR COALESCE(o.planned, 0)) THEN 1 ELSE 0 END) AS rescued "
    "FROM by_root b JOIN tasks t ON t.id = b.root AND t.parent_id IS NULL "
    "LEFT JOIN first f ON f.task_id = b.root "
    "LEFT JOIN task_outcomes o ON o.task_id = b.root"
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

# Calls the pool stopped because the answer had started repeating itself (taled.models.repetition).
_LOOPS_STOPPED = sa.text("SELECT COUNT(*) AS calls FROM model_calls WHERE looped AND at >= :since")
# Each message with its conversation's running length and the user message it answers.
_MESSAGES = (
    "WITH m AS (SELECT role, at, action, task_id, length(text) AS n, "
    " SUM(length(text)) OVER w AS upto, LAG(role) OVER w AS prev_role, "
    " LAG(intent) OVER w AS prev_intent, LAG(action) OVER w AS prev_action "
    " FROM messages WINDOW w AS (PARTITION BY conversation_id ORDER BY seq)) "
)
# Characters of replies the model wrote (chat turns not answered by tale itself)
# and the completion tokens of those replies: the measured characters per token.
_CHARS_PER_TOKEN = sa.text(
    _MESSAGES + "SELECT (SELECT SUM(n) FROM m WHERE role = 'assistant' AND prev_role = 'user' "
    " AND prev_intent = 'chat' AND prev_action IS NULL) AS chars, "
    "(SELECT SUM(completion_tokens) FROM model_calls WHERE role = 'ux' AND step IS NULL "
    " AND task_id IS NULL AND conversation_id IS NOT NULL AND success) AS tokens"
)
_TURNS = sa.text(
    _MESSAGES + "SELECT "
    "SUM(CASE WHEN role = 'user' THEN 1 ELSE 0 END) AS turns, "
    "SUM(CASE WHEN role = 'user' AND action IS NOT NULL THEN 1 ELSE 0 END) AS from_store, "
    "SUM(CASE WHEN role = 'assistant' AND task_id IS NOT NULL THEN 1 ELSE 0 END) AS handed_off, "
    "SUM(CASE WHEN role = 'user' THEN upto ELSE 0 END) AS prompt_chars, "
    "SUM(CASE WHEN role = 'assistant' THEN min(n, :cap) ELSE 0 END) AS completion_chars, "
    "SUM(CASE WHEN role = 'user' AND action IS NOT NULL THEN upto ELSE 0 END) "
    " AS store_prompt_chars, "
    "SUM(CASE WHEN role = 'assistant' AND prev_action IS NOT NULL THEN min(n, :cap) ELSE 0 END) "
    " AS store_completion_chars "
    "FROM m WHERE at >= :since"
)
_ACTUAL = PREDICTABLE_TOKENS_SQL
_OUTCOMES_BY_DAY = sa.text(
    "SELECT date(at, 'unixepoch', 'localtime') AS day, COUNT(*) AS outcomes, "
    f"SUM(CASE WHEN predicted_tokens IS NOT NULL AND {_ACTUAL} > 0 THEN 1 ELSE 0 END) "
    " AS predicted, "
    f"SUM(CASE WHEN predicted_tokens IS NOT NULL AND {_ACTUAL} > 0 "
    f" THEN ABS(predicted_tokens - {_ACTUAL}) * 1.0 / {_ACTUAL} ELSE 0 END) "
    " AS ape_sum, "
    "SUM(CASE WHEN truncations > 0 THEN 1 ELSE 0 END) AS truncated, "
    "SUM(truncations) AS truncations, SUM(retries) AS retries, "
    "SUM(CASE WHEN predicted_level = level THEN 1 ELSE 0 END) AS level_right, "
    "SUM(CASE WHEN success THEN 1 ELSE 0 END) AS successes "
    "FROM task_outcomes WHERE at >= :since GROUP BY day ORDER BY day"
)
_LAST_PREDICTIONS = sa.text(
    f"SELECT at, predicted_tokens, {_ACTUAL} AS actual_tokens FROM task_outcomes "
    f"WHERE at >= :since AND predicted_tokens IS NOT NULL AND {_ACTUAL} > 0 "
    "ORDER BY at DESC, task_id DESC LIMIT :limit"
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


def _row_totals(r: Any) -> dict[str, Any]:
    return _totals(
        r.calls or 0,
        r.prompt_tokens or 0,
        r.completion_tokens or 0,
        r.failures or 0,
        r.total_ms or 0.0,
    )


def _excerpt(text: str | None, limit: int = 80) -> str:
    short = " ".join((text or "").split())
    return short if len(short) <= limit else short[: limit - 1].rstrip() + "…"


class _Sum:
    """Ledger totals rolled up under one key (a model, a role, a day)."""

    def __init__(self) -> None:
        self.calls = self.prompt = self.completion = self.failures = 0
        self.ms = 0.0

    def add(self, r: Any) -> None:
        self.calls += int(r.calls)
        self.prompt += int(r.prompt_tokens or 0)
        self.completion += int(r.completion_tokens or 0)
        self.failures += int(r.failures or 0)
        self.ms += float(r.total_ms or 0.0)

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion

    def json(self) -> dict[str, Any]:
        return _totals(self.calls, self.prompt, self.completion, self.failures, self.ms)


def _roll(rows: Iterable[Any], key: Any) -> dict[Any, _Sum]:
    out: dict[Any, _Sum] = {}
    for r in rows:
        out.setdefault(key(r), _Sum()).add(r)
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
        self._monitor = monitor
        self._settings = settings
        self._chat = chat

    async def report(self, days: int | None = None, top: int | None = None) -> dict[str, Any]:
        """The whole report over today and the ``days - 1`` before (default: all history)."""
        s = self._settings
        top = top or s.top
        since = since_days(days) if days is not None else 0.0
        p = {"since": since, "top": top}
        # Rows still on their way to the ledger are part of what was used.
        await self._store.ledger_settled()
        await self._monitor.flush()
        async with self._store.read() as conn:
            ledger = (await conn.execute(_LEDGER, p)).all()
            tasks = (await conn.execute(_TOP_TASKS, p)).all()
            levels = (await conn.execute(_BY_COMPLEXITY, p)).all()
            conversations = (await conn.execute(_TOP_CONVERSATIONS, p)).all()
            routed = (await conn.execute(_ROUTED_TO_UX, p)).one()
            stateless = (await conn.execute(_STATELESS, p)).one()
            loops = (await conn.execute(_LOOPS_STOPPED, p)).one()
            ratio_row = (await conn.execute(_CHARS_PER_TOKEN)).one()
            measured = bool(ratio_row.tokens) and bool(ratio_row.chars)
            ratio = (
                min(20.0, max(1.0, ratio_row.chars / ratio_row.tokens))
                if measured
                else self._chat.chars_per_token
            )
            turns = (
                await conn.execute(_TURNS, {**p, "cap": round(s.naive_max_tokens * ratio)})
            ).one()
            by_day_outcomes = (await conn.execute(_OUTCOMES_BY_DAY, p)).all()
            last = (await conn.execute(_LAST_PREDICTIONS, {**p, "limit": s.curve_outcomes})).all()
        total = _Sum()
        for r in ledger:
            total.add(r)
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
        report["savings"]["loops_stopped"] = {"calls": int(loops.calls)}
        report["savings"]["stateless"] = _stateless(stateless)
        report["violations"] = {
            "counts": await self._monitor.counts(since if days is not None else None),
            "recent": await self._monitor.recent(top, since if days is not None else None),
        }
        return report

    def _savings(
        self, ledger: Sequence[Any], routed: Any, turns: Any, ratio: float, measured: bool
    ) -> dict[str, Any]:
        s = self._settings

        def tokens(chars: Any) -> int:
            return round((chars or 0) / ratio)

        chat_turns = int(turns.turns or 0)
        system = len(self._chat.system_prompt)
        naive_prompt = tokens((turns.prompt_chars or 0) + system * chat_turns)
        naive_completion = tokens(turns.completion_chars)
        from_store = int(turns.from_store or 0)
        store_tokens = tokens((turns.store_prompt_chars or 0) + system * from_store) + tokens(
            turns.store_completion_chars
        )
        task_calls = _Sum()
        for r in ledger:
            if r.for_task:
                task_calls.add(r)
        task_model = sum(
            int(r.prompt_tokens) + int(r.completion_tokens) for r in ledger if r.role == "task"
        )
        total = sum(int(r.prompt_tokens) + int(r.completion_tokens) for r in ledger)
        naive_total = task_calls.tokens + naive_prompt + naive_completion
        return {
            "summaries": {
                "saved_prompt_tokens": sum(int(r.saved_tokens or 0) for r in ledger),
                "calls": sum(int(r.summarised_calls or 0) for r in ledger),
            },
            "answered_from_store": {"turns": from_store, "estimated_tokens": store_tokens},
            "handed_off": {"turns": int(turns.handed_off or 0)},
            "routed_to_ux": {
                "tasks": int(routed.tasks),
                "calls": int(routed.calls),
                "task_model_tokens_saved": int(routed.tokens),
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


def _stateless(r: Any) -> dict[str, Any]:
    """tale against one fresh call per task: what its extra work cost and what it bought."""
    tale, fresh, rescued = int(r.tale_tokens), int(r.first_tokens), int(r.rescued or 0)
    extra = tale - fresh
    return {
        "kind": "estimate",
        "method": STATELESS_METHOD,
        "tasks": int(r.tasks),
        "direct": int(r.direct),
        "stateless_tokens": fresh,
        "tale_tokens": tale,
        "extra_tokens": extra,
        "ratio": round(tale / fresh, 2) if fresh else None,
        "first_passed": int(r.first_passed or 0),
        "rescued": rescued,
        "extra_tokens_per_rescue": round(extra / rescued) if rescued else None,
    }


_LEVELS = ("simple", "medium", "complex")


def _level_order(rows: Sequence[Any]) -> list[Any]:
    def rank(r: Any) -> int:
        return _LEVELS.index(r.level) if r.level in _LEVELS else len(_LEVELS)

    return sorted(rows, key=lambda r: (rank(r), str(r.level)))


def _task_json(r: Any) -> dict[str, Any]:
    return {
        "id": r.root,
        "text": _excerpt(r.text),
        "state": r.state,
        "complexity": r.level,
        "predicted_complexity": r.predicted_level,
        "confidence": None if r.confidence is None else round(float(r.confidence), 2),
        "subtasks": max(0, int(r.tasks) - 1),
        **_row_totals(r),
    }


def _level_json(r: Any) -> dict[str, Any]:
    tasks, outcomes = int(r.tasks), int(r.outcomes)
    totals = _row_totals(r)
    return {
        "complexity": r.level,
        "tasks": tasks,
        **totals,
        "tokens_per_task": round(totals["total_tokens"] / tasks) if tasks else 0,
        "success_pct": _pct(int(r.successes or 0), outcomes),
        "classified_right_pct": _pct(int(r.predicted_right or 0), outcomes),
    }


def _conversation_json(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "title": _excerpt(r.title, 60),
        "turns": int(r.turns or 0),
        "answered_from_store": int(r.from_store or 0),
        **_row_totals(r),
        "saved_tokens": int(r.saved_tokens or 0),
    }


def _prediction(days: Sequence[Any], last: Sequence[Any], points: int) -> dict[str, Any]:
    predicted = sum(int(r.predicted or 0) for r in days)
    ape = sum(float(r.ape_sum or 0.0) for r in days)
    outcomes = sum(int(r.outcomes) for r in days)
    curve = learning_curve(
        [(float(r.at), int(r.predicted_tokens), int(r.actual_tokens)) for r in reversed(last)],
        points,
    )
    first, newest = (curve[0], curve[-1]) if len(curve) >= 2 else (None, None)
    return {
        "outcomes": outcomes,
        "predicted": predicted,
        "mape_pct": None if not predicted else round(100.0 * ape / predicted, 1),
        "classified_right_pct": _pct(sum(int(r.level_right or 0) for r in days), outcomes),
        "by_day": [
            {
                "day": r.day,
                "outcomes": int(r.outcomes),
                "predicted": int(r.predicted or 0),
                "mape_pct": None
                if not r.predicted
                else round(100.0 * float(r.ape_sum) / int(r.predicted), 1),
            }
            for r in days
        ],
        "curve": curve,
        "falling": None
        if first is None or newest is None
        else bool(newest["mape_pct"] < first["mape_pct"]),
    }


def _truncation(days: Sequence[Any]) -> dict[str, Any]:
    tasks = sum(int(r.outcomes) for r in days)
    truncated = sum(int(r.truncated or 0) for r in days)
    return {
        "tasks": tasks,
        "truncated": truncated,
        "rate_pct": _pct(truncated, tasks),
        "truncations": sum(int(r.truncations or 0) for r in days),
        "retries": sum(int(r.retries or 0) for r in days),
    }
