"""What a task's checkpoint holds: everything needed to carry on after any stop.

One ``WorkState`` per task, saved as ``state.json`` in each of its checkpoint
commits. The runner moves it through phases; every finished step (a model
attempt with its gate result, a plan, a subtask's output) is recorded here and
committed before the runner acts on it, so a restarted daemon continues from
the next unfinished step and never runs a checkpointed one again.

    start ──► answer ───────────────────────────────► done
      │         │ (recovery: decompose and retry)
      └───────► plan ──► subtasks ──► aggregate ──► done
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from taled.errors import DaemonError

__all__ = ["Attempt", "AttemptKey", "Phase", "WorkState"]

Phase = Literal["start", "answer", "plan", "subtasks", "aggregate", "done"]
_PHASES = ("start", "answer", "plan", "subtasks", "aggregate", "done")
FORMAT = 1


@dataclass(frozen=True)
class AttemptKey:
    """Which attempt at which step: the ledger keeps the two apart (``model_calls.step``
    and ``model_calls.attempt``); checkpoints name it by its text form, ``answer`` for
    the first attempt and ``answer#2`` for the second."""

    step: str
    """The task's step: ``answer``, ``plan``, ``aggregate``, a subtask's ``s3``..."""
    number: int = 1
    """1 for the first attempt at the step, 2 for its first retry, and so on."""

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"attempt number {self.number} of {self.step!r} is below 1")
        if not self.step or "#" in self.step:
            raise ValueError(f"a step is named, without '#' (it ends the text form): {self.step!r}")

    def __str__(self) -> str:
        return self.step if self.number == 1 else f"{self.step}#{self.number}"

    @classmethod
    def parse(cls, text: str) -> AttemptKey:
        """The key whose text form is ``text`` (the only place that form is read);
        ValueError if ``text`` is not the text form of a key."""
        step, sep, number = text.partition("#")
        key = cls(step, int(number)) if sep and number.isascii() and number.isdigit() else cls(text)
        if str(key) != text:
            raise ValueError(f"{text!r} is not an attempt key")
        return key


@dataclass
class Attempt:
    """One model attempt at a step, and what its gate said."""

    key: AttemptKey
    """Which attempt it was; checkpoints hold its text form (``answer``, ``answer#2``)."""
    stage: str
    """Recovery stage: 'first', 'more tokens', 'fallback model'."""
    model: str | None
    max_tokens: int
    output: str
    finish: str
    passed: bool
    detail: str
    """Why it failed (gate feedback or model error), empty when it passed."""
    tokens: int = 0


@dataclass
class WorkState:
    """A task's checkpointed progress."""

    task_id: str
    phase: Phase = "start"
    round: int = 0
    """Plan round: a restore starts a new one, so old subtasks are not reused."""
    complexity: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    """Finished subtasks' outputs by plan step id."""
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    """Attempts by step: 'answer', 'plan', 'aggregate', or the subtask's step id."""
    partial: dict[str, str] | None = None
    """Output of an attempt stopped mid-answer: ``{"key": ..., "text": ...}`` (the key's
    text form, see AttemptKey)."""
    result: str | None = None
    decomposed: bool = False
    """The task was planned as recovery after its direct answer failed."""
    done_at: dict[str, float] = field(default_factory=dict)
    """When each attempt's checkpoint was taken (precise; git keeps whole seconds), by
    the text form of its AttemptKey."""
    tokens: int = 0
    """Tokens this task's own model calls generated, as far as checkpointed."""
    estimate: dict[str, Any] | None = None
    """The learning engine's assessment at the task's start (taled.learning.engine.Assessment)."""
    truncations: int = 0
    """Answers cut off by the learned budget (below runner.max_tokens) and continued."""
    cut: list[str] = field(default_factory=list)
    """Attempts cut by the budget (their keys' text form): their continuation gets the
    rest up to the ceiling."""

    def to_json(self) -> dict[str, Any]:
        """The checkpoint document."""
        out = asdict(self)
        for step, items in self.attempts.items():
            for written, attempt in zip(out["attempts"][step], items, strict=True):
                written["key"] = str(attempt.key)
        out["format"] = FORMAT
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkState:
        """Read a checkpoint document; DaemonError if it is not one this tale wrote."""
        try:
            if data.get("format") != FORMAT or data.get("phase") not in _PHASES:
                raise ValueError(f"format {data.get('format')!r}, phase {data.get('phase')!r}")
            body = {k: v for k, v in data.items() if k != "format"}
            body["attempts"] = {
                step: [Attempt(**{**a, "key": AttemptKey.parse(a["key"])}) for a in items]
                for step, items in body["attempts"].items()
            }
            return cls(**body)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DaemonError(f"a checkpoint of this task is not readable: {exc}") from None

    def passed(self, step: str) -> Attempt | None:
        """The step's passing attempt, if it has one."""
        for attempt in self.attempts.get(step, []):
            if attempt.passed:
                return attempt
        return None
