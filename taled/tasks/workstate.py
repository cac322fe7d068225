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

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from taled.errors import DaemonError, PlanError
from taled.learning.assessment import Assessment
from taled.tasks.planning.planner import Complexity, Plan

__all__ = [
    "AgentState",
    "Attempt",
    "AttemptKey",
    "Partial",
    "Phase",
    "StepStatus",
    "ToolStep",
    "WorkState",
]

log = logging.getLogger(__name__)

Phase = Literal["start", "answer", "plan", "subtasks", "aggregate", "act", "done"]
_PHASES = ("start", "answer", "plan", "subtasks", "aggregate", "act", "done")
FORMAT = 1
# A git worktree's AgentState fields, left out of a checkpoint when None.
_AGENT_GIT = ("git_dir", "branch", "git_base")


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


@dataclass(frozen=True)
class Partial:
    """What an attempt stopped mid-answer had written: its continuation starts there."""

    key: AttemptKey
    """The attempt it belongs to; checkpoints hold the key's text form."""
    text: str

    def to_json(self) -> dict[str, str]:
        """The checkpoint form, ``{"key": ..., "text": ...}``."""
        return {"key": str(self.key), "text": self.text}

    @classmethod
    def from_json(cls, data: object) -> Partial:
        """The partial ``to_json`` wrote; ValueError if ``data`` is not exactly that."""
        if not isinstance(data, dict) or set(data) != {"key", "text"}:
            raise ValueError("a partial answer is an object of key and text")
        key, text = data["key"], data["text"]
        if not isinstance(key, str) or not isinstance(text, str):
            raise ValueError("a partial answer's key and text are strings")
        return cls(AttemptKey.parse(key), text)


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


StepStatus = Literal["proposed", "awaiting", "running", "done", "denied", "interrupted"]
"""Where one tool call is. ``running`` is checkpointed before the tool starts: found in
the newest checkpoint after a restart, it means the daemon died during the call, which
is then reported as interrupted, never run again."""


@dataclass
class ToolStep:
    """One tool call of an acting task and what came of it."""

    call: dict[str, Any]
    """The call (``ToolCall.as_json()``); its id is the loop's own, unique in the task."""
    turn: int
    """The model turn that proposed it (1, 2, ...)."""
    status: StepStatus = "proposed"
    result: str = ""
    """What the model is told (cut to tools.agent.result_chars)."""
    is_error: bool = False
    approval: str | None = None
    """The approval asked for it, if its policy said ask."""
    rule: str = ""
    """The policy key that decided it."""
    duration_ms: float = 0.0
    output_file: str | None = None
    """Where a ``run`` call's output streams (kept for an interrupted call)."""


@dataclass
class AgentState:
    """An acting task's loop: its workspace, its model turns and tool calls."""

    workspace: str
    """The managed directory the task works in."""
    base_tree: str
    """The workspace as it started (a git tree in the checkpoint repo): diff's left side."""
    tree: str
    """The workspace after the newest finished call (the tree the checkpoint holds)."""
    source: str | None = None
    """The user's directory it is a copy of (None: a scratch workspace)."""
    steps: list[ToolStep] = field(default_factory=list)
    turns: int = 0
    texts: dict[str, str] = field(default_factory=dict)
    """What the model wrote beside its calls, by turn (as text: JSON keys)."""
    seconds: float = 0.0
    """Wall time spent in the loop so far (not counting waits for a person)."""
    gate_failures: int = 0
    brief: str | None = None
    """What the model reads after the task's text when the loop is part of a plan: for a
    step, the whole task and the earlier steps' results; for the planned task itself, the
    steps' results to check before it finishes."""
    git_dir: str | None = None
    """A git worktree's administrative directory in the user's repository, read when the
    worktree was made (None: not a worktree). Trusted, unlike the workspace's own ``.git``
    file, which a command in the sandbox can rewrite."""
    branch: str | None = None
    """The worktree's branch, ``tale/<task id>``, where the result is committed."""
    git_base: str | None = None
    """The commit the task's work starts from on that branch (the user's HEAD, or a commit
    of their uncommitted changes on top of it)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        body = dict(data)
        body["steps"] = [ToolStep(**step) for step in body.get("steps", [])]
        return cls(**body)


# The typed fields' readers, by the field's name in the checkpoint document: each raises
# ValueError (PlanError for a plan) naming what is wrong.
_TYPED: dict[str, Callable[[object], object]] = {
    "complexity": Complexity.from_json,
    "plan": Plan.from_json,
    "partial": Partial.from_json,
    "estimate": Assessment.from_json,
}

# Fields the runner can make again, so a checkpoint is not refused for them: the
# estimate is the learning engine's advice at the task's start (a downgraded tale
# meets fields it does not know), and a task whose estimate is unreadable is assessed
# again, as one that never had one.
_ADVICE = frozenset({"estimate"})


@dataclass
class WorkState:
    """A task's checkpointed progress."""

    task_id: str
    phase: Phase = "start"
    round: int = 0
    """Plan round: a restore starts a new one, so old subtasks are not reused."""
    complexity: Complexity | None = None
    """The rules' verdict on the task when it started (None for a subtask)."""
    plan: Plan | None = None
    """The task's plan once it is planned (up front or after failed answers)."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Finished subtasks' outputs by plan step id."""
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    """Attempts by step: 'answer', 'plan', 'aggregate', or the subtask's step id."""
    partial: Partial | None = None
    """Output of an attempt stopped mid-answer."""
    result: str | None = None
    decomposed: bool = False
    """The task was planned as recovery after its direct answer failed."""
    done_at: dict[str, float] = field(default_factory=dict)
    """When each attempt's checkpoint was taken (precise; git keeps whole seconds), by
    the text form of its AttemptKey."""
    tokens: int = 0
    """Tokens this task's own model calls generated, as far as checkpointed."""
    estimate: Assessment | None = None
    """The learning engine's assessment at the task's start (None without an engine,
    and for a subtask)."""
    truncations: int = 0
    """Answers cut off by the learned budget (below runner.max_tokens) and continued."""
    cut: list[str] = field(default_factory=list)
    """Attempts cut by the budget (their keys' text form): their continuation gets the
    rest up to the ceiling."""
    agent: AgentState | None = None
    """An acting task's loop (None for a task that only answers)."""

    def to_json(self) -> dict[str, Any]:
        """The checkpoint document."""
        out = asdict(self)
        # The typed values write their own forms (lists, not tuples; a key's text form),
        # each in its field's place, so the document is the one tale always wrote.
        for name in _TYPED:
            value = getattr(self, name)
            out[name] = None if value is None else value.to_json()
        for step, items in self.attempts.items():
            for written, attempt in zip(out["attempts"][step], items, strict=True):
                written["key"] = str(attempt.key)
        if out["agent"] is None:
            del out["agent"]  # a task that only answers writes what it always wrote
        else:
            for key in _AGENT_GIT:
                if out["agent"][key] is None:
                    del out["agent"][key]  # nor does one in a managed copy
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
            if body.get("agent") is not None:
                body["agent"] = AgentState.from_json(body["agent"])
            for name, read in _TYPED.items():
                if body.get(name) is not None:
                    try:
                        body[name] = read(body[name])
                    except (ValueError, PlanError) as exc:
                        if name not in _ADVICE:
                            raise ValueError(f"{name}: {exc}") from None
                        log.warning(
                            "task %s: its saved %s is unreadable (%s); made again",
                            data.get("task_id"),
                            name,
                            exc,
                        )
                        body[name] = None
            return cls(**body)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DaemonError(f"a checkpoint of this task is not readable: {exc}") from None

    def passed(self, step: str) -> Attempt | None:
        """The step's passing attempt, if it has one."""
        for attempt in self.attempts.get(step, []):
            if attempt.passed:
                return attempt
        return None
