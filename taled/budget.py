"""Token-budget prediction: how many tokens a task will generate, and its max_tokens.

    predicted = s · knn + (1 - s) · prior(model, level)
    budget    = clamp(⌈predicted · (1 + margin)⌉, min_budget, ceiling)

``knn`` is the bm25-weighted mean of the similar past tasks' tokens; ``s`` is how
alike the nearest one is (word overlap, 0..1), so an unfamiliar task leans on the
prior and a repeat of a known one on its own history. ``prior`` is the running
mean of the tokens of past tasks on that model at that level, started from the
configured guess counted as ``prior_strength`` tasks; each distinct text counts
once (its runs averaged), so repeating a task does not drag the mean to it.
Until that mean rests on ``budget_min_history`` past tasks, the budget is the
ceiling: a guess alone does not cut answers short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from taled.memory import Neighbour
from taled.settings import LearningSettings, Level

__all__ = ["BudgetPredictor", "Prediction", "blend_neighbours", "clamp_budget"]


@dataclass(frozen=True)
class Prediction:
    """Predicted tokens, the budget derived from them, and what they rest on."""

    tokens: int
    budget: int
    prior: float
    neighbours: float | None
    """The neighbours' weighted mean, None without any."""
    similarity: float
    """Weight the neighbours got (0..1)."""
    evidence: int
    """Distinct past tasks behind the (model, level) mean."""


def blend_neighbours(neighbours: Sequence[Neighbour]) -> tuple[float | None, float]:
    """The bm25-weighted mean of neighbours' tokens, and the nearest one's similarity."""
    if not neighbours:
        return None, 0.0
    weights = [max(n.score, 1e-6) for n in neighbours]
    mean = sum(w * n.completion_tokens for w, n in zip(weights, neighbours, strict=True))
    return mean / sum(weights), min(max(neighbours[0].similarity, 0.0), 1.0)


def clamp_budget(predicted: float, margin: float, low: int, high: int) -> int:
    """``predicted`` plus the margin, within [low, high] (high wins if they cross)."""
    budget = math.ceil(max(predicted, 0.0) * (1 + margin))
    return max(min(budget, high), min(low, high))


class BudgetPredictor:
    """Per-(model, level) running means, and predictions blended with neighbours."""

    def __init__(self, settings: LearningSettings) -> None:
        self._settings = settings
        # (model, level) -> text -> (sum of tokens, runs)
        self._runs: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}

    def observe(self, model: str, level: str, text: str, tokens: float) -> None:
        """Add one finished task's tokens to its (model, level) mean."""
        per_text = self._runs.setdefault((model, level), {})
        total, runs = per_text.get(text, (0.0, 0))
        per_text[text] = (total + max(tokens, 0.0), runs + 1)

    def clear(self) -> None:
        """Forget every observation (before a refit)."""
        self._runs.clear()

    def prior(self, model: str, level: Level) -> float:
        """The mean tokens on ``model`` at ``level``, starting from the configured guess."""
        s = self._settings
        guess = float(s.prior_tokens.get(level, 1))
        per_text = self._runs.get((model, level), {})
        means = [total / runs for total, runs in per_text.values()]
        return (s.prior_strength * guess + sum(means)) / (s.prior_strength + len(means))

    def predict(
        self, model: str, level: Level, neighbours: Sequence[Neighbour], ceiling: int
    ) -> Prediction:
        """Predicted tokens and the budget for a task with these neighbours."""
        s = self._settings
        prior = self.prior(model, level)
        knn, similarity = blend_neighbours(neighbours)
        predicted = prior if knn is None else similarity * knn + (1 - similarity) * prior
        high = min(s.max_budget, ceiling) if s.max_budget else ceiling
        evidence = len(self._runs.get((model, level), {}))
        budget = clamp_budget(predicted, s.margin, s.min_budget, high)
        if evidence < s.budget_min_history:
            budget = high
        return Prediction(
            tokens=max(round(predicted), 0),
            budget=budget,
            prior=prior,
            neighbours=knn,
            similarity=similarity,
            evidence=evidence,
        )
