"""The shapes of the daemon's answers the TUI relies on, parsed leniently from dicts.

Every shape the screens read is here, in one place: a field the daemon does not
send (an older daemon) gets a default, and a field the TUI does not know is
ignored. Screens render from these objects, so tests can feed them fixed data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from tale_client import protocol
from tale_client.human import parse
from tale_client.sanitize import printable, printable_doc

__all__ = [
    "BOARD_COLUMNS",
    "FINAL_STATES",
    "Approval",
    "ApprovalKind",
    "ChatMessage",
    "ChatReply",
    "Checkpoint",
    "Conversation",
    "ConversationInfo",
    "DaemonStatus",
    "Intent",
    "LatencyStat",
    "Metrics",
    "ModelInfo",
    "Progress",
    "Task",
    "TaskDiff",
    "TaskRef",
    "TokensPoint",
    "ToolCall",
    "Transition",
    "Usage",
    "UsageRow",
    "Violation",
    "board_column",
]

FINAL_STATES = frozenset(protocol.FINAL_STATES)

# The board's columns, left to right, and the states each one holds: a cancelled
# task sits with the failed ones (marked), since both ended without a result.
BOARD_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("queued", ("queued",)),
    ("running", ("running",)),
    ("waiting", ("waiting",)),
    ("paused", ("paused",)),
    ("done", ("completed",)),
    ("failed", ("failed", "cancelled")),
)


def board_column(state: str) -> str:
    """The board column a task in ``state`` belongs to."""
    for column, states in BOARD_COLUMNS:
        if state in states:
            return column
    return "failed"


# Every string the screens show passes through these two: a model's answer must not
# reach the terminal with its escape sequences (Textual passes them through).
def _str(d: dict[str, Any], key: str, default: str = "") -> str:
    value = d.get(key)
    return default if value is None else printable(str(value))


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    return None if value is None else printable(str(value))


def _int(d: dict[str, Any], key: str, default: int = 0) -> int:
    value = d.get(key)
    return int(value) if isinstance(value, int | float) else default


def _float(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    return float(value) if isinstance(value, int | float) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


@dataclass(frozen=True)
class Transition:
    """One step of a task's history."""

    from_state: str | None
    to_state: str
    at: str
    reason: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transition:
        return cls(_opt_str(d, "from"), _str(d, "to"), _str(d, "at"), _str(d, "reason"))


@dataclass(frozen=True)
class Progress:
    """Where a running task's work is (step i of n, tokens so far)."""

    step: int
    steps: int
    doing: str
    tokens: int
    elapsed_seconds: float | None = None
    eta_seconds: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(
            _int(d, "step"),
            _int(d, "steps", 1),
            _str(d, "doing"),
            _int(d, "tokens"),
            _float(d, "elapsed_seconds"),
            _float(d, "eta_seconds"),
        )

    def short(self) -> str:
        """``step 2/4 · 130 tok``: what fits on a card."""
        return f"step {min(self.step + 1, self.steps)}/{self.steps} · {self.tokens} tok"

    def line(self) -> str:
        """The whole line: step, what it does, tokens, elapsed, ETA."""
        parts = [f"step {min(self.step + 1, self.steps)}/{self.steps}"]
        if self.doing:
            parts.append(self.doing)
        parts.append(f"{self.tokens} tokens")
        if self.elapsed_seconds is not None:
            parts.append(f"{self.elapsed_seconds:.0f} s")
        if self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds:.0f} s")
        return " · ".join(parts)


class ApprovalKind(StrEnum):
    """What a waiting task asks a person: to let a tool call run, or a question."""

    TOOL = "tool"
    QUESTION = "question"


@dataclass(frozen=True)
class Approval:
    """A tool call waiting for a person's yes or no, or a model's question (``list_approvals``)."""

    id: str
    task_id: str
    kind: ApprovalKind
    summary: str
    tool: str = ""
    call_id: str = ""
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    rule: str | None = None
    state: str = "pending"
    reason: str | None = None
    created_at: str = ""
    decided_at: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Approval:
        kind = d.get("kind")
        arguments = d.get("arguments")
        return cls(
            id=_str(d, "id"),
            task_id=_str(d, "task_id"),
            # An unknown kind (a newer daemon) is a yes-or-no: answering it is refused.
            kind=ApprovalKind.QUESTION if kind == "question" else ApprovalKind.TOOL,
            summary=_str(d, "summary"),
            tool=_str(d, "tool"),
            call_id=_str(d, "call_id"),
            arguments=printable_doc(arguments) if isinstance(arguments, dict) else {},
            rule=_opt_str(d, "rule"),
            state=_str(d, "state", "pending"),
            reason=_opt_str(d, "reason"),
            created_at=_str(d, "created_at"),
            decided_at=_opt_str(d, "decided_at"),
        )

    @property
    def short_id(self) -> str:
        """The first 8 hex digits: what the CLI prints and accepts."""
        return self.id[:8]

    @property
    def is_question(self) -> bool:
        """Whether it wants an answer rather than a yes or no."""
        return self.kind is ApprovalKind.QUESTION


@dataclass(frozen=True)
class ToolCall:
    """One tool call an acting task made (``get_task``'s ``tool_calls``)."""

    call_id: str
    tool: str
    outcome: str
    duration_ms: float | None = None
    detail: str | None = None
    at: str = ""
    digest: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolCall:
        return cls(
            call_id=_str(d, "call_id"),
            tool=_str(d, "tool"),
            outcome=_str(d, "outcome"),
            duration_ms=_float(d, "duration_ms"),
            detail=_opt_str(d, "detail"),
            at=_str(d, "at"),
            digest=_str(d, "digest"),
        )

    def took(self) -> str:
        """``1.2 s``, ``35 ms`` or ``-``."""
        if self.duration_ms is None:
            return "-"
        if self.duration_ms >= 1000:
            return f"{self.duration_ms / 1000:.1f} s"
        return f"{self.duration_ms:.0f} ms"


@dataclass(frozen=True)
class TaskDiff:
    """What an acting task changed in its workspace (``task_diff``)."""

    task_id: str
    state: str
    diff: str
    workspace: str = ""
    source: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskDiff:
        # The diff keeps its tabs and newlines; only escape sequences are dropped.
        diff = d.get("diff")
        return cls(
            task_id=_str(d, "task_id"),
            state=_str(d, "state"),
            diff="" if diff is None else printable(str(diff)),
            workspace=_str(d, "workspace"),
            source=_opt_str(d, "source"),
        )


@dataclass(frozen=True)
class Task:
    """A task as ``get_task`` / ``list_tasks`` describe it."""

    id: str
    state: str
    priority: int
    text: str
    title: str | None = None
    step: str | None = None
    model: str | None = None
    result: str | None = None
    error: str | None = None
    attempts: int = 0
    created_at: str = ""
    updated_at: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    transitions: tuple[Transition, ...] = ()
    progress: Progress | None = None
    subtasks: tuple[Task, ...] = ()
    needs: tuple[str, ...] = ()
    criteria: tuple[str, ...] = ()
    act: bool = False
    workspace: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    approvals: tuple[Approval, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        tokens = d.get("tokens") if isinstance(d.get("tokens"), dict) else {}
        progress = d.get("progress")
        return cls(
            id=_str(d, "id"),
            state=_str(d, "state", "queued"),
            priority=_int(d, "priority", 50),
            text=_str(d, "text"),
            title=_opt_str(d, "title"),
            step=_opt_str(d, "step"),
            model=_opt_str(d, "model"),
            result=_opt_str(d, "result"),
            error=_opt_str(d, "error"),
            attempts=_int(d, "attempts"),
            created_at=_str(d, "created_at"),
            updated_at=_str(d, "updated_at"),
            prompt_tokens=_int(tokens or {}, "prompt"),
            completion_tokens=_int(tokens or {}, "completion"),
            transitions=tuple(Transition.from_dict(t) for t in _dicts(d.get("transitions"))),
            progress=Progress.from_dict(progress) if isinstance(progress, dict) else None,
            subtasks=tuple(Task.from_dict(t) for t in _dicts(d.get("subtasks"))),
            needs=tuple(str(n) for n in d.get("needs") or ()),
            criteria=tuple(printable(str(c)) for c in d.get("criteria") or ()),
            act=bool(d.get("act")),
            workspace=_opt_str(d, "workspace"),
            tool_calls=tuple(ToolCall.from_dict(c) for c in _dicts(d.get("tool_calls"))),
            approvals=tuple(Approval.from_dict(a) for a in _dicts(d.get("approvals"))),
        )

    @property
    def final(self) -> bool:
        """Whether the task has ended."""
        return self.state in FINAL_STATES

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def took_seconds(self) -> float | None:
        """From creation to the last update (the whole run, for a finished task)."""
        start, end = parse(self.created_at), parse(self.updated_at)
        if start is None or end is None:
            return None
        return (end - start).total_seconds()


@dataclass(frozen=True)
class Checkpoint:
    """One saved state of a task (``list_checkpoints``)."""

    commit: str
    at: str
    step: str
    message: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Checkpoint:
        return cls(_str(d, "commit"), _str(d, "at"), _str(d, "step"), _str(d, "message"))


@dataclass(frozen=True)
class ModelInfo:
    """One model of the pool (``models_status``)."""

    role: str
    backend: str
    model: str
    pinned: bool = False
    loaded: bool = False
    health: str = "unknown"
    serving: str | None = None
    memory_bytes: int | None = None
    memory_local: bool = True
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_error: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        memory = d.get("memory_bytes")
        return cls(
            role=_str(d, "role"),
            backend=_str(d, "backend"),
            model=_str(d, "model"),
            pinned=bool(d.get("pinned")),
            loaded=bool(d.get("loaded")),
            health=_str(d, "health", "ok" if d.get("loaded") else "not loaded"),
            serving=_opt_str(d, "serving"),
            memory_bytes=int(memory) if isinstance(memory, int | float) else None,
            memory_local=bool(d.get("memory_local", True)),
            calls=_int(d, "calls"),
            prompt_tokens=_int(d, "prompt_tokens"),
            completion_tokens=_int(d, "completion_tokens"),
            last_error=_opt_str(d, "last_error"),
        )

    @property
    def spec(self) -> str:
        """``backend:model``."""
        return f"{self.backend}:{self.model}"

    def memory(self) -> str:
        """Resident memory for people: ``98 MiB``, ``-`` or ``remote``."""
        if not self.memory_bytes:
            return "-" if self.memory_local else "remote"
        size = f"{self.memory_bytes / 2**20:.0f} MiB"
        return size if self.memory_local else f"{size} (remote)"


@dataclass(frozen=True)
class DaemonStatus:
    """``daemon_status``: workers and tasks by state."""

    version: str = ""
    pid: int = 0
    uptime_seconds: float = 0.0
    workers_busy: int = 0
    workers_limit: int = 0
    tasks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DaemonStatus:
        workers = d.get("workers") if isinstance(d.get("workers"), dict) else {}
        tasks = d.get("tasks") if isinstance(d.get("tasks"), dict) else {}
        return cls(
            version=_str(d, "version"),
            pid=_int(d, "pid"),
            uptime_seconds=_float(d, "uptime_seconds") or 0.0,
            workers_busy=_int(workers or {}, "busy"),
            workers_limit=_int(workers or {}, "limit"),
            tasks={str(k): int(v) for k, v in (tasks or {}).items() if isinstance(v, int)},
        )


@dataclass(frozen=True)
class Intent:
    """What the conversation agent made of a message."""

    kind: str
    confidence: float | None = None
    action: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intent:
        return cls(_str(d, "kind", "chat"), _float(d, "confidence"), _opt_str(d, "action"))


@dataclass(frozen=True)
class TaskRef:
    """A task a chat message was handed off as."""

    id: str
    state: str = "queued"
    text: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRef:
        return cls(_str(d, "id"), _str(d, "state", "queued"), _str(d, "text"))


@dataclass(frozen=True)
class ChatReply:
    """The result of one ``chat`` turn."""

    text: str
    conversation: str | None = None
    intent: Intent | None = None
    task: TaskRef | None = None
    finish_reason: str = ""
    completion_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatReply:
        intent, task = d.get("intent"), d.get("task")
        tokens = d.get("tokens") if isinstance(d.get("tokens"), dict) else {}
        return cls(
            text=_str(d, "text"),
            conversation=_opt_str(d, "conversation"),
            intent=Intent.from_dict(intent) if isinstance(intent, dict) else None,
            task=TaskRef.from_dict(task) if isinstance(task, dict) and task.get("id") else None,
            finish_reason=_str(d, "finish_reason"),
            completion_tokens=_int(tokens or {}, "completion"),
        )


@dataclass(frozen=True)
class ConversationInfo:
    """One entry of ``list_conversations``."""

    id: str
    title: str
    created_at: str = ""
    updated_at: str = ""
    messages: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversationInfo:
        return cls(
            _str(d, "id"),
            _str(d, "title") or "(untitled)",
            _str(d, "created_at"),
            _str(d, "updated_at"),
            _int(d, "messages"),
        )


@dataclass(frozen=True)
class ChatMessage:
    """One message of a stored conversation."""

    role: str
    text: str
    seq: int = 0
    at: str = ""
    task: str | None = None
    intent: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatMessage:
        return cls(
            role=_str(d, "role", "assistant"),
            text=_str(d, "text"),
            seq=_int(d, "seq"),
            at=_str(d, "at"),
            task=_opt_str(d, "task"),
            intent=_opt_str(d, "intent"),
        )


@dataclass(frozen=True)
class Conversation:
    """A stored conversation (``get_conversation``)."""

    id: str
    title: str
    summary: str | None = None
    messages: tuple[ChatMessage, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conversation:
        return cls(
            _str(d, "id"),
            _str(d, "title") or "(untitled)",
            _opt_str(d, "summary"),
            tuple(ChatMessage.from_dict(m) for m in _dicts(d.get("messages"))),
        )


@dataclass(frozen=True)
class TokensPoint:
    """Tokens one model generated in one minute (``metrics``)."""

    minute: str
    model: str
    role: str
    tokens: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokensPoint:
        return cls(_str(d, "minute"), _str(d, "model"), _str(d, "role"), _int(d, "tokens"))


@dataclass(frozen=True)
class LatencyStat:
    """A latency against its target (``metrics``)."""

    name: str
    p50: float | None
    p95: float | None
    target: float | None
    unit: str = "ms"
    samples: int = 0
    ok: bool | None = None
    p99: float | None = None
    stat: str = "p95"
    """Which statistic the target bounds: p95, p99 or max."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStat:
        ok = d.get("ok")
        return cls(
            _str(d, "name"),
            _float(d, "p50"),
            _float(d, "p95"),
            _float(d, "target"),
            _str(d, "unit", "ms"),
            _int(d, "samples"),
            ok if isinstance(ok, bool) else None,
            _float(d, "p99"),
            _str(d, "stat", "p95"),
        )


@dataclass(frozen=True)
class Violation:
    """A measurement that missed its target (``metrics``)."""

    at: str
    name: str
    value: float | None
    target: float | None
    context: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Violation:
        return cls(
            _str(d, "at"),
            _str(d, "name"),
            _float(d, "value"),
            _float(d, "target"),
            _str(d, "context"),
        )


@dataclass(frozen=True)
class Metrics:
    """The ``metrics`` tool: tokens per minute, latencies, queue, violations."""

    at: str = ""
    window_minutes: int = 0
    tokens_per_minute: tuple[TokensPoint, ...] = ()
    latency: tuple[LatencyStat, ...] = ()
    queue: dict[str, int] = field(default_factory=dict)
    violations: tuple[Violation, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        queue = d.get("queue") if isinstance(d.get("queue"), dict) else {}
        return cls(
            at=_str(d, "at"),
            window_minutes=_int(d, "window_minutes"),
            tokens_per_minute=tuple(
                TokensPoint.from_dict(p) for p in _dicts(d.get("tokens_per_minute"))
            ),
            latency=tuple(LatencyStat.from_dict(x) for x in _dicts(d.get("latency"))),
            queue={str(k): int(v) for k, v in (queue or {}).items() if isinstance(v, int)},
            violations=tuple(Violation.from_dict(v) for v in _dicts(d.get("violations"))),
        )

    def minutes(self) -> list[int]:
        """Total tokens per minute over the window, oldest first, 0 for quiet minutes."""
        totals: dict[datetime, int] = {}
        for p in self.tokens_per_minute:
            minute = parse(p.minute)
            if minute is not None:
                minute = minute.replace(second=0, microsecond=0)
                totals[minute] = totals.get(minute, 0) + p.tokens
        end = parse(self.at) or max(totals, default=None)
        if end is None:
            return []
        end = end.replace(second=0, microsecond=0)
        span = max(self.window_minutes, 1)
        return [totals.get(end - timedelta(minutes=span - 1 - i), 0) for i in range(span)]

    def by_model(self) -> list[tuple[str, str, int, int]]:
        """Per model: (model, role, tokens in the latest minute, tokens in the window)."""
        latest = max((p.minute for p in self.tokens_per_minute), default="")
        rows: dict[tuple[str, str], list[int]] = {}
        for p in self.tokens_per_minute:
            row = rows.setdefault((p.model, p.role), [0, 0])
            row[1] += p.tokens
            if p.minute == latest:
                row[0] += p.tokens
        return [(m, r, last, total) for (m, r), (last, total) in sorted(rows.items())]


@dataclass(frozen=True)
class UsageRow:
    """Ledger totals of one model (``usage``)."""

    model: str
    calls: int
    tokens: int


@dataclass(frozen=True)
class Usage:
    """The token ledger totals (``usage``), what the dashboard falls back on."""

    total_tokens: int = 0
    calls: int = 0
    by_model: tuple[UsageRow, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        total = d.get("total") if isinstance(d.get("total"), dict) else {}
        rows = tuple(
            UsageRow(
                f"{_str(r, 'backend')}:{_str(r, 'model')}",
                _int(r, "calls"),
                _int(r, "prompt_tokens") + _int(r, "completion_tokens"),
            )
            for r in _dicts(d.get("by_model"))
        )
        return cls(_int(total or {}, "total_tokens"), _int(total or {}, "calls"), rows)
