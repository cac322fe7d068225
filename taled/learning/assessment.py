"""What the learning engine expects of a task when it starts: an ``Assessment``.

A value and its checkpoint form, nothing else. It lives apart from the engine because a
task's checkpoint holds one (``taled.tasks.workstate.WorkState.estimate``): the engine
imports the checkpoint's module, so that module importing the engine would be a cycle
(and would pull the store and the models into every reader of a checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, get_args

from taled.learning.selection import Tactic
from taled.settings import Level, Role
from taled.tasks.planning.planner import Complexity

__all__ = ["Assessment"]

_LEVELS: tuple[Level, ...] = get_args(Level)
_ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class Assessment:
    """What the engine expects of a task when it starts."""

    level: Level
    confidence: float
    probabilities: dict[str, float]
    history_weight: float
    predicted_tokens: int
    budget: int
    similar: list[str]
    """Ids of the similar past tasks the prediction used, nearest first."""
    role: Role
    think: bool
    reason: str
    """Why this role (for the log and get_task)."""
    model: str
    """The model the prediction was for (``backend:model``)."""
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    similarity: str = "bm25"
    """How the similar tasks were found: ``bm25``, ``bm25+embedding``, or
    ``bm25 (embedding unavailable)`` when the embedder failed and the lookup fell back."""
    similar_via: list[str] = field(default_factory=list)
    """For each similar task, how it was found: ``bm25``, ``embedding`` or both."""
    predicted_steps: int | None = None
    """Tool calls an acting task is expected to make: the similarity-weighted mean of its
    similar past acting tasks' tool calls, from the tool ledger (None without any)."""
    skip: list[str] = field(default_factory=list)
    """Costly tactics this task goes without (taled.learning.selection.Tactics): ``retry``,
    ``decompose``, ``plan``; each for the reason in ``tactics``."""
    tactics: dict[str, str] = field(default_factory=dict)
    """Why each tactic is used or skipped."""
    rules: Complexity | None = None
    """The rule classifier's verdict, made once here; the runner plans up front by its
    score. None in an assessment saved before it was kept (the runner classifies again)."""

    def allows(self, tactic: Tactic) -> bool:
        """Whether the task may be carried with ``tactic``."""
        return tactic not in self.skip

    def to_json(self) -> dict[str, Any]:
        """The checkpoint form: the fields in their order, ``rules`` as its own form."""
        out = asdict(self)
        out["rules"] = None if self.rules is None else self.rules.to_json()
        return out

    @classmethod
    def from_json(cls, data: object) -> Assessment:
        """The assessment ``to_json`` wrote; ValueError naming the first field that is not
        what it wrote. A field added since a checkpoint was written takes its default.
        Values are kept as read (an ``int`` confidence stays one), so the form written
        back is the form read."""
        if not isinstance(data, dict):
            raise ValueError("an estimate is not a JSON object")
        if unknown := set(data) - set(_CHECKS):
            raise ValueError(f"an estimate has unknown fields {sorted(unknown)}")
        if missing := _REQUIRED - set(data):
            raise ValueError(f"an estimate lacks {sorted(missing)}")
        for name, value in data.items():
            check, what = _CHECKS[name]
            if not check(value):
                raise ValueError(f"an estimate's {name} is {_shown(value)}, not {what}")
        body = dict(data)
        if body.get("rules") is not None:
            body["rules"] = Complexity.from_json(body["rules"])
        return cls(**body)

    def summary(self) -> dict[str, Any]:
        """What get_task shows as ``estimate``."""
        return {
            "level": self.level,
            "confidence": self.confidence,
            "predicted_tokens": self.predicted_tokens,
            "budget": self.budget,
            "similar": list(self.similar),
            "similar_via": list(self.similar_via),
            "similarity": self.similarity,
            "role": self.role,
            "think": self.think,
            "eta_seconds": self.eta_seconds,
            "predicted_steps": self.predicted_steps,
            "skip": list(self.skip),
        }


def _number(value: object) -> bool:
    # JSON's true and false are Python ints: a number is an int or float but no bool.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object) -> bool:
    return isinstance(value, str)


def _texts(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _by_name(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, dict) and all(check(v) for v in value.values())


def _or_none(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def _shown(value: object) -> str:
    """A value in an error message, cut short: a hostile checkpoint may hold a lot."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Each field's check, and what it says a field that fails it should have been. ``rules``
# is checked only for its kind here; Complexity.from_json reads the rest.
_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "level": (lambda v: v in _LEVELS, f"one of {list(_LEVELS)}"),
    "confidence": (_number, "a number"),
    "probabilities": (_by_name(_number), "an object of numbers"),
    "history_weight": (_number, "a number"),
    "predicted_tokens": (_integer, "an integer"),
    "budget": (_integer, "an integer"),
    "similar": (_texts, "a list of strings"),
    "role": (lambda v: v in _ROLES, f"one of {list(_ROLES)}"),
    "think": (lambda v: isinstance(v, bool), "true or false"),
    "reason": (_text, "a string"),
    "model": (_text, "a string"),
    "tokens_per_second": (_or_none(_number), "a number or null"),
    "eta_seconds": (_or_none(_number), "a number or null"),
    "similarity": (_text, "a string"),
    "similar_via": (_texts, "a list of strings"),
    "predicted_steps": (_or_none(_integer), "an integer or null"),
    "skip": (_texts, "a list of strings"),
    "tactics": (_by_name(_text), "an object of strings"),
    "rules": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
# The fields without a default: every checkpoint that holds an estimate has them.
_REQUIRED = {
    f.name for f in fields(Assessment) if f.default is MISSING and f.default_factory is MISSING
}
