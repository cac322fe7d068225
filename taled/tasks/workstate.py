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

__all__ = ["Attempt", "Phase", "WorkState"]

Phase = Literal["start", "answer", "plan", "subtasks", "aggregate", "done"]
_PHASES = ("start", "answer", "plan", "subtasks", "aggregate", "done")
FORMAT = 1


@dataclass
class Attempt:
    """One model attempt at a step, and what its gate said."""

    key: str
    """Ledger and checkpoint name of the attempt: ``answer``, ``answer#2``, ``s3``..."""
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
    """Output of an attempt stopped mid-answer: ``{"key": ..., "text": ...}``."""
    result: str | None = None
    decomposed: bool = False
    """The task was planned as recovery after its direct answer failed."""
    done_at: dict[str, float] = field(default_factory=dict)
    """When each attempt's checkpoint was taken (precise; git keeps whole seconds)."""
    tokens: int = 0
    """Tokens this task's own model calls generated, as far as checkpointed."""
    estimate: dict[str, Any] | None = None
    """The learning engine's assessment at the task's start (taled.learning.engine.Assessment)."""
    truncations: int = 0
    """Answers cut off by the learned budget (below runner.max_tokens) and continued."""
    cut: list[str] = field(default_factory=list)
    """Attempt keys cut by the budget: their continuation gets the rest up to the ceiling."""

    def to_json(self) -> dict[str, Any]:
        """The checkpoint document."""
        out = asdict(self)
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
                step: [Attempt(**a) for a in items] for step, items in body["attempts"].items()
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
