"""Complexity classification (simple / medium / complex) learned from task outcomes.

The prior is ``planner.classify``: rules over cheap text features. Every finished
task is labelled from what actually happened (``label_outcome``: tokens, steps,
retries, failure), and a small multinomial logistic regression is fitted on
(features → label), the features being the planner's counts plus the task's
words, hashed into a fixed number of presence buckets. A prediction blends the
two by how much history there is:

    p = w · p_learned + (1 - w) · p_rules,   w = n / (n + history_half_weight)

where n counts *distinct* task texts, so submitting the same task again does not
inflate the evidence (and the fit, a mean loss over distinct texts, ignores
duplicates too). Pure computation: the learning engine owns the I/O.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from taled.settings import LearningSettings, Level
from taled.tasks.planning import planner

__all__ = [
    "LEVELS",
    "ComplexityModel",
    "Estimate",
    "history_weight",
    "label_outcome",
    "prior_probabilities",
]

LEVELS: tuple[Level, ...] = ("simple", "medium", "complex")
_FEATURES = tuple(planner.features("x"))
# L2 strength (on the mean loss) and gradient-descent schedule of the fit: enough
# to converge on a few thousand rows of 12 features in milliseconds.
_L2 = 0.01
_STEPS = 300
# Hashed word-presence features beside the counts.
_WORD_BUCKETS = 128
_WORD = re.compile(r"[^\W\d_]{2,}")
_RATE = 0.5


@dataclass(frozen=True)
class Estimate:
    """A classification: the likeliest level, its probability, and all three."""

    level: Level
    confidence: float
    probabilities: dict[Level, float]
    history_weight: float
    """How much the learned model counted (0: rules only)."""
    rules: planner.Complexity
    """The rule classifier's verdict, the prior (its score decides up-front planning)."""


def label_outcome(
    settings: LearningSettings,
    *,
    completion_tokens: int,
    steps: int,
    retries: int,
    success: bool,
) -> Level:
    """The level a finished task turned out to be, from what it took.

    Tokens are counted per attempt, and steps only when nothing was retried: a task
    decomposed after its direct answers failed was hard for the model, not
    necessarily complex, and learning it as complex would plan its like up front.
    """
    per_attempt = completion_tokens / (1 + max(retries, 0))
    planned = steps >= settings.complex_min_steps and retries == 0
    if planned or per_attempt >= settings.complex_min_tokens:
        return "complex"
    if (
        completion_tokens >= settings.medium_min_tokens
        or retries >= settings.medium_min_retries
        or not success
    ):
        return "medium"
    return "simple"


def history_weight(distinct: int, half_weight: int) -> float:
    """The learned model's share of a prediction after ``distinct`` past tasks."""
    n = max(distinct, 0)
    return n / (n + half_weight)


def prior_probabilities(rule: planner.Complexity) -> dict[Level, float]:
    """The rule classifier's verdict as a distribution: its confidence on its level,
    the rest to the other two, more to the adjacent one."""
    c = min(max(rule.confidence, 0.0), 1.0)
    rest = 1.0 - c
    i = LEVELS.index(rule.level)
    probs = dict.fromkeys(LEVELS, 0.0)
    probs[rule.level] = c
    others = [j for j in range(3) if j != i]
    near = [1.0 / abs(j - i) for j in others]
    for j, closeness in zip(others, near, strict=True):
        probs[LEVELS[j]] = rest * closeness / sum(near)
    return probs


def _vector(text: str, features: Mapping[str, float]) -> np.ndarray:
    """The model's input: the text features, and which words the text has (hashed)."""
    # Counts are skewed (a long task has hundreds of words): log1p evens them out.
    counts = np.array([max(float(features.get(k, 0.0)), 0.0) for k in _FEATURES])
    # Words say what kind of work it is ("haiku" vs "web app") where counts cannot;
    # crc32, unlike hash(), is the same in every process.
    present = np.zeros(_WORD_BUCKETS)
    for word in set(_WORD.findall(text.casefold())):
        present[zlib.crc32(word.encode()) % _WORD_BUCKETS] = 1.0
    out: np.ndarray = np.concatenate([np.log1p(counts), present])
    return out


class ComplexityModel:
    """Rules as the prior, a logistic regression learned from labelled outcomes."""

    def __init__(self, half_weight: int) -> None:
        self._half_weight = half_weight
        self._weights: np.ndarray | None = None
        self._mean = np.zeros(len(_FEATURES) + _WORD_BUCKETS)
        self._scale = np.ones(len(_FEATURES) + _WORD_BUCKETS)
        self.distinct = 0
        """Distinct task texts the model was fitted on."""

    def fit(self, history: Sequence[tuple[str, Mapping[str, float], Level]]) -> None:
        """Fit on (text, features, label) rows; duplicates of a (text, label) count once."""
        unique: dict[tuple[str, Level], Mapping[str, float]] = {}
        for text, feats, label in history:
            unique[(text, label)] = feats
        self.distinct = len({text for text, _ in unique})
        if not unique:
            self._weights = None
            return
        x = np.stack([_vector(text, f) for (text, _), f in unique.items()])
        y = np.array([LEVELS.index(label) for _, label in unique])
        self._mean = x.mean(axis=0)
        self._scale = x.std(axis=0)
        self._scale[self._scale < 1e-9] = 1.0
        z = np.hstack([(x - self._mean) / self._scale, np.ones((len(x), 1))])
        onehot = np.eye(3)[y]
        w = np.zeros((z.shape[1], 3))
        for _ in range(_STEPS):
            p = _softmax(z @ w)
            grad = z.T @ (p - onehot) / len(z)
            grad[:-1] += _L2 * w[:-1]
            w -= _RATE * grad
        self._weights = w

    def learned(self, text: str, features: Mapping[str, float]) -> dict[Level, float] | None:
        """The fitted model's distribution alone (None before any history)."""
        if self._weights is None:
            return None
        z = np.append((_vector(text, features) - self._mean) / self._scale, 1.0)
        p = _softmax(z @ self._weights)
        return {level: float(p[i]) for i, level in enumerate(LEVELS)}

    def predict(self, text: str, features: Mapping[str, float] | None = None) -> Estimate:
        """The blended classification of a task's text."""
        feats = features if features is not None else planner.features(text)
        rules = planner.classify(text, dict(feats))
        prior = prior_probabilities(rules)
        learned = self.learned(text, feats)
        w = history_weight(self.distinct, self._half_weight) if learned is not None else 0.0
        probs = {
            level: w * (learned[level] if learned else 0.0) + (1 - w) * prior[level]
            for level in LEVELS
        }
        total = sum(probs.values())
        probs = {level: p / total for level, p in probs.items()}
        level = max(LEVELS, key=lambda lv: (probs[lv], -LEVELS.index(lv)))
        confidence = min(max(probs[level], 0.0), 1.0)
        return Estimate(level, round(confidence, 4), probs, round(w, 4), rules)


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out
