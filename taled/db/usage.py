"""What the usage report reads of the store: the token ledger (``model_calls``) summed
by model, role, route, day, top-level task, complexity and conversation; the chat's
``messages`` as a naive design would have sent them; and the learning engine's
``task_outcomes`` as predictions against what the tasks spent.

Every method is one aggregate statement over a reader connection, so each is its own
consistent snapshot (see ``taled.db.engine``). Sums over no rows come back as 0, never
None. What the numbers mean, and the estimates made from them, are the business of
``taled.reporting.usage``; this module reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from taled.db.schema import PREDICTABLE_TOKENS_SQL
from taled.db.store import Store

__all__ = [
    "CallTotals",
    "ChatTurns",
    "ConversationUsage",
    "LedgerGroup",
    "LevelUsage",
    "OutcomeDay",
    "Prediction",
    "ReplyChars",
    "RoutedToUx",
    "StatelessTotals",
    "TaskUsage",
    "UsageRecords",
]


@dataclass(frozen=True)
class CallTotals:
    """The ledger's sums over a group of calls."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    failures: int
    """Calls that did not succeed."""
    total_ms: float


@dataclass(frozen=True)
class LedgerGroup:
    """The calls of one local day, backend, model, role and route, for tasks or not."""

    day: str
    """The local date, ``YYYY-MM-DD``."""
    backend: str
    model: str
    role: str
    route: str
    """How the call's model was chosen: the role's own ('role'), an override, a fallback."""
    for_task: bool
    """The calls were made for a task (any role)."""
    totals: CallTotals
    saved_tokens: int
    """Prompt tokens summaries kept out of these calls."""
    summarised_calls: int
    """Calls that saved any tokens by a summary."""


@dataclass(frozen=True)
class TaskUsage:
    """One top-level task's calls, its subtasks' included."""

    id: str
    tasks: int
    """The tasks of its tree with calls in the period, itself included."""
    totals: CallTotals
    text: str | None
    """The task's first 400 characters; None when the task is gone."""
    state: str | None
    level: str | None
    """Its complexity, from its outcome; None without one."""
    predicted_level: str | None
    confidence: float | None


@dataclass(frozen=True)
class LevelUsage:
    """The top-level tasks of one complexity ('unknown' without an outcome), together."""

    level: str
    tasks: int
    totals: CallTotals
    outcomes: int
    """Tasks with a recorded outcome."""
    successes: int
    predicted_right: int
    """Outcomes whose predicted level was the level."""


@dataclass(frozen=True)
class ConversationUsage:
    """One conversation's calls and the user's turns in the period."""

    id: str
    title: str | None
    """None when the conversation is gone."""
    turns: int
    from_store: int
    """Turns answered from the store (the user message carries an action)."""
    totals: CallTotals
    saved_tokens: int


@dataclass(frozen=True)
class RoutedToUx:
    """Calls for tasks made on the UX model instead of the task model."""

    tasks: int
    calls: int
    tokens: int


@dataclass(frozen=True)
class StatelessTotals:
    """Top-level tasks against one fresh call each (their first direct answer)."""

    tasks: int
    direct: int
    """Tasks with a first direct answer."""
    tale_tokens: int
    """Every call's tokens of the tasks with a direct answer, subtasks included."""
    first_tokens: int
    """The first direct answers' tokens."""
    first_passed: int
    """Tasks whose first answer passed: no retry, decomposition or plan."""
    rescued: int
    """Tasks that succeeded only after a retry, decomposition or plan."""


@dataclass(frozen=True)
class ReplyChars:
    """Characters of the chat replies the model wrote and their completion tokens, over
    all history: the measured characters per token."""

    chars: int
    tokens: int


@dataclass(frozen=True)
class ChatTurns:
    """The chat's turns in the period, in characters as a naive design would send them."""

    turns: int
    """User messages."""
    from_store: int
    """User messages answered from the store."""
    handed_off: int
    """Replies that handed a task off."""
    prompt_chars: int
    """Each user message's conversation up to and including it, summed."""
    completion_chars: int
    """Replies' characters, each capped."""
    store_prompt_chars: int
    """``prompt_chars`` of the turns answered from the store."""
    store_completion_chars: int
    """``completion_chars`` of the replies answered from the store."""


@dataclass(frozen=True)
class OutcomeDay:
    """One local day's task outcomes."""

    day: str
    outcomes: int
    predicted: int
    """Outcomes with a token prediction and tokens to hold it to."""
    ape_sum: float
    """Sum of the predicted outcomes' |predicted - actual| / actual."""
    truncated: int
    """Outcomes truncated at least once."""
    truncations: int
    retries: int
    level_right: int
    """Outcomes whose predicted level was the level."""
    successes: int


@dataclass(frozen=True)
class Prediction:
    """One outcome's token prediction and the tokens it is held to."""

    at: float
    predicted_tokens: int
    actual_tokens: int


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


def _int(value: Any) -> int:
    """An aggregate as an int: SQL's SUM over no rows is NULL, which counts as 0 here."""
    return int(value or 0)


def _totals(r: sa.Row[Any]) -> CallTotals:
    return CallTotals(
        calls=_int(r.calls),
        prompt_tokens=_int(r.prompt_tokens),
        completion_tokens=_int(r.completion_tokens),
        failures=_int(r.failures),
        total_ms=float(r.total_ms or 0.0),
    )


class UsageRecords:
    """The ledger, the chat's messages and the task outcomes as the usage report reads
    them, over the daemon's store. ``since`` is epoch seconds (0 for all history)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def _all(self, query: sa.TextClause, **params: Any) -> list[sa.Row[Any]]:
        async with self._store.read() as conn:
            return list((await conn.execute(query, params)).all())

    async def _one(self, query: sa.TextClause, **params: Any) -> sa.Row[Any]:
        async with self._store.read() as conn:
            return (await conn.execute(query, params)).one()

    async def ledger(self, since: float) -> list[LedgerGroup]:
        """The calls since ``since`` per local day, backend, model, role, route and
        whether they were for a task."""
        return [
            LedgerGroup(
                day=r.day,
                backend=r.backend,
                model=r.model,
                role=r.role,
                route=r.route,
                for_task=bool(r.for_task),
                totals=_totals(r),
                saved_tokens=_int(r.saved_tokens),
                summarised_calls=_int(r.summarised_calls),
            )
            for r in await self._all(_LEDGER, since=since)
        ]

    async def top_tasks(self, since: float, top: int) -> list[TaskUsage]:
        """The ``top`` top-level tasks that spent the most tokens since ``since`` (their
        subtasks' calls included), most first; a call whose task is gone counts as its own."""
        return [
            TaskUsage(
                id=r.root,
                tasks=int(r.tasks),
                totals=_totals(r),
                text=r.text,
                state=r.state,
                level=r.level,
                predicted_level=r.predicted_level,
                confidence=None if r.confidence is None else float(r.confidence),
            )
            for r in await self._all(_TOP_TASKS, since=since, top=top)
        ]

    async def by_complexity(self, since: float) -> list[LevelUsage]:
        """The top-level tasks with calls since ``since``, per complexity, in no order."""
        return [
            LevelUsage(
                level=r.level,
                tasks=int(r.tasks),
                totals=_totals(r),
                outcomes=int(r.outcomes),
                successes=_int(r.successes),
                predicted_right=_int(r.predicted_right),
            )
            for r in await self._all(_BY_COMPLEXITY, since=since)
        ]

    async def top_conversations(self, since: float, top: int) -> list[ConversationUsage]:
        """The ``top`` conversations whose calls spent the most tokens since ``since``."""
        return [
            ConversationUsage(
                id=r.id,
                title=r.title,
                turns=_int(r.turns),
                from_store=_int(r.from_store),
                totals=_totals(r),
                saved_tokens=_int(r.saved_tokens),
            )
            for r in await self._all(_TOP_CONVERSATIONS, since=since, top=top)
        ]

    async def routed_to_ux(self, since: float) -> RoutedToUx:
        """The calls for tasks made on the UX model since ``since``."""
        r = await self._one(_ROUTED_TO_UX, since=since)
        return RoutedToUx(tasks=int(r.tasks), calls=int(r.calls), tokens=int(r.tokens))

    async def stateless(self, since: float) -> StatelessTotals:
        """The top-level tasks with calls since ``since`` against their first direct answers."""
        r = await self._one(_STATELESS, since=since)
        return StatelessTotals(
            tasks=int(r.tasks),
            direct=int(r.direct),
            tale_tokens=int(r.tale_tokens),
            first_tokens=int(r.first_tokens),
            first_passed=_int(r.first_passed),
            rescued=_int(r.rescued),
        )

    async def loops_stopped(self, since: float) -> int:
        """Calls since ``since`` stopped because the answer had started repeating itself."""
        return int((await self._one(_LOOPS_STOPPED, since=since)).calls)

    async def reply_chars(self) -> ReplyChars:
        """The model-written chat replies' characters and completion tokens, all history."""
        r = await self._one(_CHARS_PER_TOKEN)
        return ReplyChars(chars=_int(r.chars), tokens=_int(r.tokens))

    async def chat_turns(self, since: float, cap: int) -> ChatTurns:
        """The chat's turns since ``since``, each reply counted up to ``cap`` characters."""
        r = await self._one(_TURNS, since=since, cap=cap)
        return ChatTurns(
            turns=_int(r.turns),
            from_store=_int(r.from_store),
            handed_off=_int(r.handed_off),
            prompt_chars=_int(r.prompt_chars),
            completion_chars=_int(r.completion_chars),
            store_prompt_chars=_int(r.store_prompt_chars),
            store_completion_chars=_int(r.store_completion_chars),
        )

    async def outcomes_by_day(self, since: float) -> list[OutcomeDay]:
        """The task outcomes since ``since`` per local day, oldest first."""
        return [
            OutcomeDay(
                day=r.day,
                outcomes=int(r.outcomes),
                predicted=_int(r.predicted),
                ape_sum=float(r.ape_sum or 0.0),
                truncated=_int(r.truncated),
                truncations=_int(r.truncations),
                retries=_int(r.retries),
                level_right=_int(r.level_right),
                successes=_int(r.successes),
            )
            for r in await self._all(_OUTCOMES_BY_DAY, since=since)
        ]

    async def last_predictions(self, since: float, limit: int) -> list[Prediction]:
        """The newest ``limit`` outcomes since ``since`` with a prediction and tokens to
        hold it to, newest first."""
        return [
            Prediction(
                at=float(r.at),
                predicted_tokens=int(r.predicted_tokens),
                actual_tokens=int(r.actual_tokens),
            )
            for r in await self._all(_LAST_PREDICTIONS, since=since, limit=limit)
        ]
