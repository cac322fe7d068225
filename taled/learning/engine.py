"""The learning engine: it assesses each task at start and learns from how it ended.

    start   load the newest outcomes from ``task_outcomes`` and fit everything
            (a restart keeps what was learned: it all lives in SQLite)
    assess  at a top-level task's start: level and confidence (taled.learning.complexity),
            similar past tasks (taled.learning.memory; by bm25, and by embedding when
            ``learning.embeddings`` is set: the task's text is embedded here), predicted
            tokens, budget and ETA (taled.learning.budget), the role and thinking mode
            (taled.learning.selection). The runner saves it in the task's checkpoint, so a
            resumed task keeps it.
    record  when a top-level task completes or fails: its tokens (its subtasks'
            included, from the ledger), steps, retries and truncations, labelled,
            inserted into ``task_outcomes`` and ``task_memory`` (and its text's
            embedding into ``task_embeddings``, reusing the one made at assess); then
            refit.

With ``learning.enabled = false`` tasks are still assessed and recorded (so the
history is there when it is turned on), but nothing assessed is acted on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from taled.db.acting import ActingRecords
from taled.db.learning import Embedding, LearningRecords, LedgerFacts, Outcome, OutcomeRecord
from taled.db.store import Store, TaskRecord
from taled.errors import TaleError
from taled.learning.assessment import Assessment
from taled.learning.budget import BudgetPredictor
from taled.learning.complexity import ComplexityModel, label_outcome
from taled.learning.embeddings import EmbeddingService
from taled.learning.memory import Neighbour, SimilarTasks, Vector
from taled.learning.selection import TACTICS, Selector, Tactics
from taled.settings import LearningSettings, Level, ModelsSettings, Role, parse_model_spec
from taled.tasks.lifecycle import TaskState
from taled.tasks.planning import planner
from taled.tasks.workstate import WorkState

__all__ = ["LearningEngine", "Outcome", "model_key", "predictable_tokens"]

log = logging.getLogger(__name__)

# Finished tasks whose estimates get_task can still show without a query.
_KEEP_ESTIMATES = 1000
# Embeddings made at assess kept for the record (running tasks; a bound for the rest).
_KEEP_VECTORS = 1000
# Ledger rows looked at for a model's generation speed.
_SPEED_ROWS = 500
# The classifier is refitted after every record while history is small, then after
# every (distinct tasks / this) records: a full fit on 5,000 tasks takes about a second.
_REFIT_SHARE = 200


def model_key(backend: str | None, model: str | None) -> str:
    """How a model is named in the engine's statistics: ``backend:model`` as the ledger has it."""
    return f"{backend or '?'}:{model or '?'}"


def _spec_key(spec: str) -> str:
    parsed = parse_model_spec(spec)
    name = f"{parsed.base_url}#{parsed.model}" if parsed.backend == "openai" else parsed.model
    return model_key(parsed.backend, name)


def _predicted_steps(neighbours: Sequence[Neighbour], calls: dict[str, int]) -> int | None:
    """The similarity-weighted mean of the tool calls of the similar past tasks that acted
    (an acting task's steps), rounded up; None when none of them acted."""
    acted = [n for n in neighbours if n.task_id in calls]
    weight = sum(max(n.similarity, 0.0) for n in acted)
    if weight <= 0:
        return None
    return math.ceil(sum(max(n.similarity, 0.0) * calls[n.task_id] for n in acted) / weight)


def predictable_tokens(answer_tokens: int | None, completion_tokens: int) -> int:
    """The tokens a prediction for a task is held to: its first direct answer's, the
    one a budget caps; the whole task's when it had none (or was recorded before). Its
    SQL twin is ``taled.db.schema.PREDICTABLE_TOKENS_SQL``.

    Not the whole task's: a one-word answer the model failed and decomposition rescued
    cost a thousand tokens, and taught as that it had similar tasks budgeted 10x over.
    """
    return answer_tokens if answer_tokens else completion_tokens


class LearningEngine:
    """Owns the classifier, the budget predictor and the selector, and their history."""

    def __init__(
        self,
        store: Store,
        settings: LearningSettings,
        models: ModelsSettings,
        ceiling: int,
        thinks: Callable[[str], bool] | None = None,
        embeddings: EmbeddingService | None = None,
    ) -> None:
        """``thinks(role)``: whether the role's model can think (recorded in outcomes);
        ``embeddings``: the embedder of ``learning.embeddings`` (None: bm25 alone)."""
        self._records = LearningRecords(store)
        # The tool ledger: how many calls similar acting tasks made (predicted steps).
        self._acting = ActingRecords(store)
        self._thinks = thinks or (lambda _role: False)
        self.settings = settings
        self._models = models
        self.ceiling = ceiling
        """The fixed max_tokens (runner.max_tokens) a budget never exceeds."""
        self._embeddings = embeddings
        self._memory = SimilarTasks(store, embeddings, settings)
        self._vectors: OrderedDict[str, Vector] = OrderedDict()
        self._classifier = ComplexityModel(settings.history_half_weight)
        self._budget = BudgetPredictor(settings)
        self._selector = Selector(settings)
        self._tactics = Tactics(settings)
        self._history: list[tuple[str, dict[str, float], Level]] = []
        self._speed: dict[str, float] = {}
        self._active: dict[str, Assessment] = {}
        self._estimates: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._refit: asyncio.Task[None] | None = None
        self._unfitted = 0
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        """Whether assessments are acted on (budgets, routing, thinking)."""
        return self.settings.enabled

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Learn everything from the stored outcomes."""
        rows = await self._outcomes()
        for row in reversed(rows):
            self._observe(row.outcome.text, row.features, _Row(row.outcome, row.level))
            self._estimates[row.outcome.task_id] = _finished(row.outcome, row.level)
        self._trim_estimates()
        await self._memory.start()
        await self._fit()
        await self._measure_speed()
        log.info(
            "learning engine: %d past tasks (%d distinct), %s",
            len(rows),
            self._classifier.distinct,
            "enabled" if self.enabled else "observing only (learning.enabled = false)",
        )

    async def _outcomes(self) -> list[OutcomeRecord]:
        """The newest ``history_limit`` stored outcomes, newest first."""
        return await self._records.outcomes(self.settings.history_limit)

    async def forget_tasks(self, task_ids: Collection[str]) -> None:
        """Forget tasks whose rows were deleted (``tale delete``, ``tale purge``): whatever
        memory holds of them goes (assessments, estimates, vectors), and everything
        learned is learned again from the outcomes that remain, so no statistic, word
        weight or budget still carries them."""
        for task_id in task_ids:
            self._active.pop(task_id, None)
            self._vectors.pop(task_id, None)
            self._estimates.pop(task_id, None)
        self._memory.drop(task_ids)
        rows = await self._outcomes()
        # Cleared and refilled with no await between: a task recorded meanwhile is either
        # in ``rows`` or observed after.
        self._history.clear()
        self._budget.clear()
        self._selector.clear()
        self._tactics.clear()
        for row in reversed(rows):
            self._observe(row.outcome.text, row.features, _Row(row.outcome, row.level))
        await self._fit()

    async def stop(self) -> None:
        """Let a refit in progress finish."""
        if self._refit is not None:
            await self._refit

    async def warm(self) -> None:
        """After READY, in the background: load the embedding model, then embed the stored
        tasks that have no vector of it yet (a no-op without embeddings)."""
        if self._embeddings is None:
            return
        await self._embeddings.warm()
        if self._embeddings.down:
            return
        try:
            await self._memory.backfill()
        except TaleError as exc:
            # The store closing under it (a shutdown), say: the next start goes on.
            log.warning("similar tasks: the embedding backfill stopped: %s", exc.message)

    def status(self) -> dict[str, Any]:
        """What ``daemon_status`` shows of the engine: history size and the embeddings'
        state, with how many lookups fell back to bm25 alone."""
        return {
            "enabled": self.enabled,
            "distinct_tasks": self._classifier.distinct,
            "embeddings": self._memory.status(),
        }

    # -- assessing -----------------------------------------------------------

    async def assess(self, task: TaskRecord, *, acts: bool = False) -> Assessment:
        """Classify a new top-level task and predict its tokens, route and thinking.

        ``acts``: the task runs the agent loop. It stays on the task model whatever its
        text looks like: ux's record is of answers, not of tool loops, and an acting task
        on ux would hold the model a person's chat replies need."""
        feats = planner.features(task.text)
        estimate = self._classifier.predict(task.text, feats)
        choice = self._selector.choose(task.text, estimate.level, _spec_key(self._models.ux))
        reason = choice.reason
        if task.model is not None:
            reason = "per-task model override"
        elif not self.enabled:
            reason = "learning disabled: tasks run on the task model"
        elif acts:
            reason = "acting tasks run on the task model"
        routed = task.model is None and self.enabled and not acts
        role: Role = choice.role if routed else "task"
        spec = task.model or (self._models.ux if role == "ux" else self._models.task)
        key = _spec_key(spec)
        found = await self._memory.lookup(task.text, self.settings.neighbours)
        if found.vector is not None:
            self._vectors[task.id] = found.vector
            while len(self._vectors) > _KEEP_VECTORS:
                self._vectors.popitem(last=False)
        neighbours = found.neighbours
        prediction = self._budget.predict(key, estimate.level, neighbours, self.ceiling)
        speed = self._speed.get(key)
        skip: list[str] = []
        tactics: dict[str, str] = {}
        # Tactics are judged on the task model, where retries and plans run; a task
        # sent to ux escalates to the task model instead.
        if self.enabled and role == "task":
            for tactic in TACTICS:
                allowed, why = self._tactics.allows(task.text, key, estimate.level, tactic)
                tactics[tactic] = why
                if not allowed:
                    skip.append(tactic)
        return Assessment(
            level=estimate.level,
            confidence=estimate.confidence,
            probabilities={k: round(v, 4) for k, v in estimate.probabilities.items()},
            history_weight=estimate.history_weight,
            predicted_tokens=prediction.tokens,
            budget=prediction.budget,
            similar=[n.task_id for n in neighbours],
            role=role,
            think=choice.think,
            reason=reason,
            model=key,
            tokens_per_second=round(speed, 2) if speed else None,
            eta_seconds=round(prediction.tokens / speed, 1) if speed else None,
            similarity=found.method,
            similar_via=[n.via for n in neighbours],
            predicted_steps=_predicted_steps(
                neighbours, await self._acting.call_counts([n.task_id for n in neighbours])
            ),
            skip=skip,
            tactics=tactics,
            rules=estimate.rules,
        )

    def remember(self, task_id: str, assessment: Assessment) -> None:
        """Hold a running task's assessment (for routing advice and get_task)."""
        self._active[task_id] = assessment
        self._estimates.pop(task_id, None)

    def forget(self, task_id: str) -> None:
        """Drop a task's assessment once it has left the runner (cancelled, say)."""
        self._active.pop(task_id, None)
        self._vectors.pop(task_id, None)

    def advise(self, task: TaskRecord) -> Role | None:
        """The RouteAdvisor hook: the role assessed for this top-level task."""
        if not self.enabled or task.parent_id is not None:
            return None
        assessment = self._active.get(task.id)
        return assessment.role if assessment is not None else None

    def think(self, task: TaskRecord) -> bool | None:
        """Thinking on or off for this task's calls; None leaves the model's default."""
        root = self._active.get(task.id if task.parent_id is None else task.parent_id)
        if not self.enabled or root is None:
            return None
        return root.think

    def estimate(self, task_id: str) -> dict[str, Any] | None:
        """What get_task shows for a task: its assessment, and its outcome once recorded."""
        active = self._active.get(task_id)
        if active is not None:
            return active.summary()
        return self._estimates.get(task_id)

    # -- learning ------------------------------------------------------------

    async def record(self, task: TaskRecord, ws: WorkState | None) -> Outcome | None:
        """Record a finished (completed or failed) top-level task and learn from it."""
        if task.parent_id is not None or task.state not in (
            TaskState.COMPLETED,
            TaskState.FAILED,
        ):
            return None
        assessment = self._active.get(task.id)
        if assessment is None and ws is not None:
            assessment = ws.estimate
        if assessment is None:
            assessment = await self.assess(task)
        steps = 1
        if ws is not None and ws.plan is not None:
            steps = max(len(ws.plan.steps), 1)
        gate_passed: bool | None = None
        if ws is not None:
            final = ws.attempts.get("aggregate" if ws.plan is not None else "answer", [])
            if final:
                gate_passed = final[-1].passed
        success = task.state == TaskState.COMPLETED
        truncations = ws.truncations if ws is not None else 0
        tactics = _tactics_used(ws)
        vector = await self._vector_for(task.id, task.text)

        def make(facts: LedgerFacts) -> OutcomeRecord:
            role = facts.role or assessment.role
            outcome = Outcome(
                task_id=task.id,
                text=task.text,
                predicted_level=assessment.level,
                confidence=assessment.confidence,
                predicted_tokens=assessment.predicted_tokens,
                budget_tokens=assessment.budget if self.enabled else None,
                completion_tokens=facts.completion_tokens,
                prompt_tokens=facts.prompt_tokens,
                steps=steps,
                retries=facts.retries,
                truncations=truncations,
                gate_passed=gate_passed if success else False,
                success=success,
                role=role,
                backend=facts.backend,
                model=facts.model,
                thinking=bool(self.enabled and assessment.think and self._thinks(role)),
                seconds=max(task.updated_at - (facts.started or task.created_at), 0.0),
                retry_tokens=facts.retry_tokens,
                plan_tokens=facts.plan_tokens,
                answer_tokens=facts.answer_tokens,
                **tactics,
            )
            return self._stored(outcome)

        outcome = await self._records.record(task.id, make, self._embedding(vector))
        if vector is not None:
            self._memory.add(task.id, vector)
        await self.add(outcome)
        finished = self._estimates.get(task.id, {})
        self._estimates[task.id] = {**assessment.summary(), **finished}
        # Only now: get_task shows the assessment until the outcome replaces it.
        self._active.pop(task.id, None)
        return outcome

    async def ingest(self, outcome: Outcome) -> None:
        """Store an outcome observed elsewhere (an imported or replayed history), and learn."""
        vector = await self._vector_for(outcome.task_id, outcome.text)
        await self._records.ingest(self._stored(outcome), self._embedding(vector))
        if vector is not None:
            self._memory.add(outcome.task_id, vector)
        await self.add(outcome)

    def _stored(self, outcome: Outcome) -> OutcomeRecord:
        """An outcome as it is stored: labelled, with its text's features."""
        return OutcomeRecord(outcome, self._label(outcome), planner.features(outcome.text))

    def _embedding(self, vector: Vector | None) -> Embedding | None:
        """A finished task's vector as stored with its outcome (None: none to store)."""
        if vector is None or self._embeddings is None:
            return None
        return Embedding(self._embeddings.key, vector)

    async def _vector_for(self, task_id: str, text: str) -> Vector | None:
        """A finished task's embedding: the one made when it was assessed, else a new one
        (None without embeddings, or when the embedder fails: counted)."""
        if self._embeddings is None:
            return None
        vector = self._vectors.pop(task_id, None)
        if vector is None:
            vector = await self._memory.embed(text)
            if vector is None:
                self._memory.unembedded += 1
        return vector

    async def add(self, outcome: Outcome) -> None:
        """Learn from one outcome already in the store (refits the classifier)."""
        feats = planner.features(outcome.text)
        level = self._label(outcome)
        self._observe(outcome.text, feats, _Row(outcome, level))
        self._estimates[outcome.task_id] = _finished(outcome, level)
        self._trim_estimates()
        self._unfitted += 1
        if self._unfitted >= max(1, self._classifier.distinct // _REFIT_SHARE):
            await self._fit()
        await self._measure_speed()

    def _label(self, outcome: Outcome) -> Level:
        return label_outcome(
            self.settings,
            completion_tokens=outcome.completion_tokens,
            steps=outcome.steps,
            retries=outcome.retries,
            success=outcome.success,
        )

    def _observe(self, text: str, feats: dict[str, float], row: Any) -> None:
        self._history.append((text, feats, row.level))
        del self._history[: -self.settings.history_limit]
        model, level = model_key(row.backend, row.model), row.predicted_level
        self._budget.observe(
            model, level, text, predictable_tokens(row.answer_tokens, row.completion_tokens)
        )
        self._selector.observe(row.role, level, bool(row.success), row.retries, model)
        if row.role == "task":
            # What a tactic cost is the tokens of its own calls (rows recorded before
            # those were kept: the whole task's).
            whole = int(row.prompt_tokens or 0) + int(row.completion_tokens or 0)
            retry = whole if row.retry_tokens is None else int(row.retry_tokens)
            planning = whole if row.plan_tokens is None else int(row.plan_tokens)
            if row.planned:
                self._tactics.observe(model, level, "plan", bool(row.success), planning)
            if row.retried:
                self._tactics.observe(model, level, "retry", bool(row.retry_worked), retry)
            if row.decomposed:
                self._tactics.observe(model, level, "decompose", bool(row.success), planning)
            if (
                row.success
                and row.planned is False
                and row.decomposed is False
                and not (row.retried or row.retries)
            ):
                # Passed on its first answer with no tactic: what a tactic is judged against.
                self._tactics.observe_pass(model, whole)

    async def _fit(self) -> None:
        """Fit a fresh classifier off the event loop, then swap it in."""
        async with self._lock:
            model = ComplexityModel(self.settings.history_half_weight)
            history = list(self._history)
            self._refit = asyncio.create_task(asyncio.to_thread(model.fit, history))
            try:
                await self._refit
            finally:
                self._refit = None
            self._classifier = model
            self._unfitted = 0

    async def _measure_speed(self) -> None:
        """Each model's generation speed (tokens/s) over its newest ledger rows."""
        self._speed = {
            model_key(t.backend, t.model): float(t.completion_tokens) * 1000 / t.generation_ms
            for t in await self._records.generation_totals(_SPEED_ROWS)
            if t.generation_ms
        }

    def _trim_estimates(self) -> None:
        while len(self._estimates) > _KEEP_ESTIMATES:
            self._estimates.popitem(last=False)


def _tactics_used(ws: WorkState | None) -> dict[str, Any]:
    """Which costly tactics carried the task, from its final state (None: unknown)."""
    if ws is None:
        return {"planned": None, "retried": None, "retry_worked": None, "decomposed": None}
    answers = ws.attempts.get("answer", [])
    # A retry is a second attempt on the same model; a ux task's second attempt is an
    # escalation to the task model, not a retry of ux.
    retries = [a for a in answers[1:] if a.stage == "more tokens"]
    retried = bool(answers) and not answers[0].passed and bool(retries)
    return {
        "planned": ws.plan is not None and not ws.decomposed,
        "retried": retried,
        "retry_worked": retried and any(a.passed for a in retries),
        "decomposed": ws.decomposed,
    }


def _finished(row: Any, level: str) -> dict[str, Any]:
    """get_task's estimate of a finished task: what was predicted, and what happened."""
    return {
        "level": row.predicted_level,
        "confidence": row.confidence,
        "predicted_tokens": row.predicted_tokens,
        "budget": row.budget_tokens,
        "role": row.role,
        "outcome": {
            "level": level,
            "completion_tokens": row.completion_tokens,
            "answer_tokens": row.answer_tokens,
            "truncations": row.truncations,
            "success": bool(row.success),
        },
    }


@dataclass(frozen=True)
class _Row:
    """An Outcome seen through the columns ``_observe`` reads."""

    outcome: Outcome
    level: Level

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outcome, name)
