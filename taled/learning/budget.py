"""Token-budget prediction: how many tokens a task will generate, and its max_tokens.

Token counts are heavy-tailed (a one-word answer takes 7, a rescued task thousands),
so the prediction works on their logarithms:

    mu     = (k · log prior(model, level) + Σ sᵢ · log tokensᵢ) / (k + Σ sᵢ)
    spread = max(min_spread, √((k · min_spread² + Σ sᵢ · (log tokensᵢ - mu)²) / (k + Σ sᵢ)))
    predicted = e^mu
    budget    = clamp(⌈e^(mu + margin_spreads · spread)⌉, min_budget, ceiling)

``sᵢ`` is how alike neighbour i is (0..1: its word overlap, blended with its
embedding's cosine when ``learning.embeddings`` is on; see taled.learning.memory) and ``k`` is
``neighbour_shrink``: an unfamiliar task leans on the prior, a repeat of a known
one on its own history, and more agreeing neighbours weigh more. ``prior`` is the
geometric mean of the tokens of past tasks on that model at that predicted level,
started from the configured guess counted as ``prior_strength`` tasks; each
distinct text counts once (its runs averaged), so repeating a task does not drag
the mean to it. The prediction is the typical (median) value, which is what an ETA
wants; the budget sits ``margin_spreads`` spreads above it, so an answer is rarely
cut. Until the mean rests on ``budget_min_history`` past tasks, the budget is the
ceiling: a guess alone does not cut answers short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from taled.learning.memory import Neighbour
from taled.settings import LearningSettings, Level

__all__ = ["BudgetPredictor", "Prediction", "blend_neighbours", "clamp_budget"]


@dataclass(frozen=True)
class Prediction:
    """Predicted tokens, the budget derived from them, and what they rest on."""

    tokens: int
    budget: int
    prior: float
    neighbours: float | None
    """The neighbours' similarity-weighted geometric mean, None without any."""
    similarity: float
    """How alike the nearest neighbour is (0..1)."""
    evidence: int
    """Distinct past tasks behind the (model, level) mean."""
    spread: float = 0.0
    """Spread of the prediction in log tokens (the budget's margin is counted in it)."""


def _log(tokens: float) -> float:
    return math.log(max(tokens, 1.0))


def blend_neighbours(
    neighbours: Sequence[Neighbour], prior_log: float, shrink: float, min_spread: float
) -> tuple[float, float]:
    """``(mu, spread)`` in log tokens: the neighbours' similarity-weighted logs, shrunk
    toward the prior's by ``shrink`` pseudo-weight."""
    weights = [min(max(n.similarity, 0.0), 1.0) for n in neighbours]
    logs = [_log(n.tokens) for n in neighbours]
    total = shrink + sum(weights)
    mu = (shrink * prior_log + sum(w * x for w, x in zip(weights, logs, strict=True))) / total
    var = (
        shrink * min_spread**2 + sum(w * (x - mu) ** 2 for w, x in zip(weights, logs, strict=True))
    ) / total
    return mu, max(math.sqrt(var), min_spread)


def clamp_budget(predicted: float, margin: float, low: int, high: int) -> int:
    """``predicted`` times ``margin`` (≥ 1), within [low, high] (high wins if they cross)."""
    budget = math.ceil(max(predicted, 0.0) * max(margin, 1.0))
    return max(min(budget, high), min(low, high))


class BudgetPredictor:
    """Per-(model, level) geometric means, and predictions blended with neighbours."""

    def __init__(self, settings: LearningSettings) -> None:
        self._settings = settings
        # (model, level) -> text -> (sum of log tokens, runs)
        self._runs: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}

    def observe(self, model: str, level: str, text: str, tokens: float) -> None:
        """Add one finished task's tokens to its (model, level) mean."""
        per_text = self._runs.setdefault((model, level), {})
        total, runs = per_text.get(text, (0.0, 0))
        per_text[text] = (total + _log(tokens), runs + 1)

    def clear(self) -> None:
        """Forget every observation (before a refit)."""
        self._runs.clear()

    def _prior_log(self, model: str, level: Level) -> float:
        s = self._settings
        guess = _log(float(s.prior_tokens.get(level, 1)))
        per_text = self._runs.get((model, level), {})
        means = [total / runs for total, runs in per_text.values()]
        return (s.prior_strength * guess + sum(means)) / (s.prior_strength + len(means))

    def prior(self, model: str, level: Level) -> float:
        """The typical tokens on ``model`` at ``level``, starting from the configured guess."""
        return math.exp(self._prior_log(model, level))

    def predict(
        self, model: str, level: Level, neighbours: Sequence[Neighbour], ceiling: int
    ) -> Prediction:
        """Predicted tokens and the budget for a task with these neighbours."""
        s = self._settings
        prior_log = self._prior_log(model, level)
        mu, spread = blend_neighbours(neighbours, prior_log, s.neighbour_shrink, s.min_spread)
        high = min(s.max_budget, ceiling) if s.max_budget else ceiling
        evidence = len(self._runs.get((model, level), {}))
        predicted = math.exp(mu)
        budget = clamp_budget(predicted, math.exp(s.margin_spreads * spread), s.min_budget, high)
        if evidence < s.budget_min_history:
            budget = high
        weights = [min(max(n.similarity, 0.0), 1.0) for n in neighbours]
        knn = None
        if sum(weights) > 0:
            logs = [w * _log(n.tokens) for w, n in zip(weights, neighbours, strict=True)]
            knn = math.exp(sum(logs) / sum(weights))
        return Prediction(
            tokens=max(round(predicted), 0),
            budget=budget,
            prior=math.exp(prior_log),
            neighbours=knn,
            similarity=max((n.similarity for n in neighbours), default=0.0),
            evidence=evidence,
            spread=spread,
        )
