"""The SQLite store: tasks, their transitions and the token ledger.

SQLAlchemy 2 (async, Core) over aiosqlite, in WAL mode. All writes go through
one writer task that group-commits whatever is waiting in a single
``BEGIN IMMEDIATE`` transaction, each operation inside its own savepoint, so a
burst of submits costs one fsync instead of one each. Reads use a small pool of
separate connections and never wait behind the writer.

The schema is versioned with ``PRAGMA user_version``; ``_MIGRATIONS`` holds one
entry per version, applied in order at open, so later versions migrate old data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from taled.doctor import DOCTOR_HINT, is_damage, take_backup
from taled.errors import (
    DiskFull,
    IllegalTransition,
    NotFound,
    StoreDamaged,
    TaleError,
    Unavailable,
    is_no_space,
)
from taled.settings import StoreSettings
from taled.tasks.lifecycle import FINAL_STATES, RESTORE_TRANSITIONS, TaskState, check_transition
from taled.tasks.workstate import AttemptKey

__all__ = [
    "PREDICTABLE_TOKENS_SQL",
    "SCHEMA_VERSION",
    "AttemptKey",  # a ledger row's key, for services that see the ledger but not tasks
    "CallRecord",
    "Store",
    "SubtaskSpec",
    "TaskRecord",
    "Transition",
    "new_task_id",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_FINAL = frozenset(s.value for s in FINAL_STATES)

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("parent_id", sa.Text, sa.ForeignKey("tasks.id")),
    sa.Column("step", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("criteria", sa.Text),
    sa.Column("round", sa.Integer, nullable=False, server_default="0"),
    sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("restore_to", sa.Text),
    sa.Column("workspace", sa.Text),
    sa.Column("act", sa.Boolean, nullable=False, server_default="0"),
)

task_deps = sa.Table(
    "task_deps",
    metadata,
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("needs_id", sa.Text, sa.ForeignKey("tasks.id"), primary_key=True),
)

transitions = sa.Table(
    "transitions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("from_state", sa.Text),
    sa.Column("to_state", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

model_calls = sa.Table(
    "model_calls",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("task_id", sa.Text),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("load_ms", sa.Float, nullable=False),
    sa.Column("prompt_ms", sa.Float, nullable=False),
    sa.Column("generation_ms", sa.Float, nullable=False),
    sa.Column("total_ms", sa.Float, nullable=False),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("route", sa.Text, nullable=False, server_default="role"),
    sa.Column("note", sa.Text),
    sa.Column("counts_exact", sa.Boolean, nullable=False, server_default="1"),
    sa.Column("step", sa.Text),
    sa.Column("conversation_id", sa.Text),
    sa.Column("saved_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("looped", sa.Boolean, nullable=False, server_default="0"),
)

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("summary", sa.Text),
    sa.Column("summary_upto", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pending", sa.Text),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("conversation_id", sa.Text, sa.ForeignKey("conversations.id"), nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("intent", sa.Text),
    sa.Column("confidence", sa.Float),
    sa.Column("action", sa.Text),
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id")),
)

conversation_tasks = sa.Table(
    "conversation_tasks",
    metadata,
    sa.Column("conversation_id", sa.Text, sa.ForeignKey("conversations.id"), primary_key=True),
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("reported_state", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

# One row per finished top-level task: what the learning engine predicted when it
# started, and what happened. The engine learns from these rows; `usage` reports
# prediction error and complexity breakdowns from them.
task_outcomes = sa.Table(
    "task_outcomes",
    metadata,
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("features", sa.Text, nullable=False),
    sa.Column("predicted_level", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("level", sa.Text, nullable=False),
    sa.Column("predicted_tokens", sa.Integer),
    sa.Column("budget_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("steps", sa.Integer, nullable=False, server_default="1"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("truncations", sa.Integer, nullable=False, server_default="0"),
    sa.Column("gate_passed", sa.Boolean),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("backend", sa.Text),
    sa.Column("model", sa.Text),
    sa.Column("thinking", sa.Boolean, nullable=False, server_default="0"),
    sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
    # The costly tactics the task was carried with (taled.learning.selection.Tactics); NULL in
    # rows recorded before they were kept.
    sa.Column("planned", sa.Boolean),
    sa.Column("retried", sa.Boolean),
    sa.Column("retry_worked", sa.Boolean),
    sa.Column("decomposed", sa.Boolean),
    # What they cost: tokens of the direct answer's retries, and of the rest (plan,
    # subtasks, aggregation).
    sa.Column("retry_tokens", sa.Integer),
    sa.Column("plan_tokens", sa.Integer),
    # Completion tokens of the first direct answer (with its continuations): what a
    # budget caps, and what the engine predicts. NULL with no direct answer (a task
    # planned up front) and in rows recorded before it was kept.
    sa.Column("answer_tokens", sa.Integer),
)
# The tokens a prediction is held to, in SQL (taled.learning.engine.predictable_tokens): the
# first direct answer's, the whole task's when it had none or was recorded before v8.
PREDICTABLE_TOKENS_SQL = "COALESCE(NULLIF(answer_tokens, 0), completion_tokens)"

# The embedding of a finished top-level task's text, one per embedding model (the
# ``learning.embeddings`` spec as ``backend:model``): a little-endian float32 vector,
# L2-normalised, ``dimension`` long. Similar-task lookups compare a new task's vector
# with those of the same model.
task_embeddings = sa.Table(
    "task_embeddings",
    metadata,
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("dimension", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),
)

# Every performance-target violation the monitor saw, with its context.
violations = sa.Table(
    "violations",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("metric", sa.Text, nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("target", sa.Float, nullable=False),
    sa.Column("context", sa.Text, nullable=False),
)

# What an acting task asks a person: a tool call its policy says to ask about, or a
# question of the model's (ask_user). Durable: a restart loses none, and the task
# waits in ``waiting`` until it is answered.
approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("task_id", sa.Text, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("call_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("tool", sa.Text, nullable=False),
    sa.Column("arguments", sa.Text, nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("rule", sa.Text),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("decided_at", sa.Float),
    sa.UniqueConstraint("task_id", "call_id"),
)

# Every tool call an acting task made: the tool ledger beside the model ledger.
tool_calls = sa.Table(
    "tool_calls",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("task_id", sa.Text, nullable=False),
    sa.Column("call_id", sa.Text, nullable=False),
    sa.Column("tool", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("detail", sa.Text),
)

# Permission rules people added (``tale approve --always``), over the configured policy.
policy_rules = sa.Table(
    "policy_rules",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("source", sa.Text),
)

_V1 = [
    """CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX tasks_by_queue ON tasks (state, priority DESC, created_at)",
    "CREATE INDEX tasks_by_created ON tasks (created_at DESC)",
    """CREATE TABLE transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        from_state TEXT,
        to_state TEXT NOT NULL,
        at REAL NOT NULL,
        reason TEXT NOT NULL
    )""",
    "CREATE INDEX transitions_by_task ON transitions (task_id, seq)",
    """CREATE TABLE model_calls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        task_id TEXT,
        role TEXT NOT NULL,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        load_ms REAL NOT NULL,
        prompt_ms REAL NOT NULL,
        generation_ms REAL NOT NULL,
        total_ms REAL NOT NULL,
        success BOOLEAN NOT NULL,
        error TEXT
    )""",
    "CREATE INDEX model_calls_by_task ON model_calls (task_id)",
]

# Version 2 (the dual-model pool): a task may name its model; a ledger row says how
# its model was chosen (the role's own, a per-task override, the fallback while the
# role was down), notes events such as an unexpected reload, and whether its
# counts are exact (a remote server may report no usage).
_V2 = [
    "ALTER TABLE tasks ADD COLUMN model TEXT",
    "ALTER TABLE model_calls ADD COLUMN route TEXT NOT NULL DEFAULT 'role'",
    "ALTER TABLE model_calls ADD COLUMN note TEXT",
    "ALTER TABLE model_calls ADD COLUMN counts_exact BOOLEAN NOT NULL DEFAULT 1",
]

# Version 3 (long-running tasks): subtasks of a planned task (parent, plan step,
# title, the plan round they belong to) with their dependencies, done criteria
# as a JSON list, and the plan step of each ledger row.
_V3 = [
    "ALTER TABLE tasks ADD COLUMN parent_id TEXT REFERENCES tasks(id)",
    "ALTER TABLE tasks ADD COLUMN step TEXT",
    "ALTER TABLE tasks ADD COLUMN title TEXT",
    "ALTER TABLE tasks ADD COLUMN criteria TEXT",
    "ALTER TABLE tasks ADD COLUMN round INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX tasks_by_parent ON tasks (parent_id)",
    """CREATE TABLE task_deps (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        needs_id TEXT NOT NULL REFERENCES tasks(id),
        PRIMARY KEY (task_id, needs_id)
    )""",
    "ALTER TABLE model_calls ADD COLUMN step TEXT",
    "CREATE INDEX model_calls_by_task_step ON model_calls (task_id, step)",
]

# Version 4 (the conversation agent): conversations with their messages, the
# running summary of their older part and a request awaiting a clarifying answer;
# the tasks each handed off with the last state it reported back; and ledger rows
# that name their conversation and the prompt tokens a summary saved.
_V4 = [
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        summary TEXT,
        summary_upto INTEGER NOT NULL DEFAULT 0,
        pending TEXT
    )""",
    "CREATE INDEX conversations_by_updated ON conversations (updated_at DESC)",
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        at REAL NOT NULL,
        intent TEXT,
        confidence REAL,
        action TEXT,
        task_id TEXT REFERENCES tasks(id)
    )""",
    "CREATE INDEX messages_by_conversation ON messages (conversation_id, seq)",
    """CREATE TABLE conversation_tasks (
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        task_id TEXT NOT NULL REFERENCES tasks(id),
        reported_state TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (conversation_id, task_id)
    )""",
    "ALTER TABLE model_calls ADD COLUMN conversation_id TEXT",
    "ALTER TABLE model_calls ADD COLUMN saved_tokens INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX model_calls_by_conversation ON model_calls (conversation_id)",
]

# Version 5 (the learning engine): the outcome of every finished top-level task
# (the engine's predictions beside what happened); an FTS5 index over their text
# for similar-task lookups (bm25), keyed by task id; and the performance
# monitor's recorded violations.
_V5 = [
    """CREATE TABLE task_outcomes (
        task_id TEXT PRIMARY KEY REFERENCES tasks(id),
        at REAL NOT NULL,
        text TEXT NOT NULL,
        features TEXT NOT NULL,
        predicted_level TEXT NOT NULL,
        confidence REAL NOT NULL,
        level TEXT NOT NULL,
        predicted_tokens INTEGER,
        budget_tokens INTEGER,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        steps INTEGER NOT NULL DEFAULT 1,
        retries INTEGER NOT NULL DEFAULT 0,
        truncations INTEGER NOT NULL DEFAULT 0,
        gate_passed BOOLEAN,
        success BOOLEAN NOT NULL,
        role TEXT NOT NULL,
        backend TEXT,
        model TEXT,
        thinking BOOLEAN NOT NULL DEFAULT 0,
        seconds REAL NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX task_outcomes_by_at ON task_outcomes (at)",
    "CREATE VIRTUAL TABLE task_memory USING fts5(task_id UNINDEXED, text)",
    """CREATE TABLE violations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        metric TEXT NOT NULL,
        value REAL NOT NULL,
        target REAL NOT NULL,
        context TEXT NOT NULL
    )""",
    "CREATE INDEX violations_by_at ON violations (at)",
]

# Version 6 (similar tasks by meaning): the embeddings of finished tasks' texts,
# keyed by task and embedding model (see ``task_embeddings`` above).
_V6 = [
    """CREATE TABLE task_embeddings (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (task_id, model)
    )""",
    "CREATE INDEX task_embeddings_by_model ON task_embeddings (model)",
]

_V7 = [
    "ALTER TABLE task_outcomes ADD COLUMN planned BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retried BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retry_worked BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN decomposed BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retry_tokens INTEGER",
    "ALTER TABLE task_outcomes ADD COLUMN plan_tokens INTEGER",
]

# Version 8: the tokens of a task's first direct answer, apart from what retries and
# decomposition spent on it.
_V8 = ["ALTER TABLE task_outcomes ADD COLUMN answer_tokens INTEGER"]

# Version 9 (reliability): how many times the daemon crashed while running a task
# (a task that keeps crashing it is quarantined), and the checkpoint a restore in
# progress rewinds to (set before the checkpoint is written, cleared with the
# restore's transition, so a restore cut off by a crash is finished on start).
_V9 = [
    "ALTER TABLE tasks ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN restore_to TEXT",
    "CREATE INDEX tasks_restoring ON tasks (id) WHERE restore_to IS NOT NULL",
]

# Version 10 (decisions on columns, not on words): which attempt at its step a call
# was, and whether the pool stopped it for repeating itself, each in a column of its
# own. Rows written before named a retry in the step itself ('answer#2') and a stopped
# loop only in the note; both are read back here, once, and nowhere else.
_V10 = [
    "ALTER TABLE model_calls ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
    """UPDATE model_calls
        SET attempt = CAST(substr(step, instr(step, '#') + 1) AS INTEGER),
            step = substr(step, 1, instr(step, '#') - 1)
        WHERE instr(step, '#') > 1
          AND substr(step, instr(step, '#') + 1) GLOB '[1-9]*'
          AND substr(step, instr(step, '#') + 1) NOT GLOB '*[^0-9]*'""",
    "ALTER TABLE model_calls ADD COLUMN looped BOOLEAN NOT NULL DEFAULT 0",
    "UPDATE model_calls SET looped = 1 WHERE instr(note, 'stopped repeating itself') > 0",
]

# Version 11 (acting): a task's workspace (the user's directory it works on a copy of)
# and whether it acts (runs the agent loop); approvals and questions waiting for a
# person; the tool ledger; the permission rules people added.
_V11 = [
    "ALTER TABLE tasks ADD COLUMN workspace TEXT",
    "ALTER TABLE tasks ADD COLUMN act BOOLEAN NOT NULL DEFAULT 0",
    """CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        call_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        tool TEXT NOT NULL,
        arguments TEXT NOT NULL,
        summary TEXT NOT NULL,
        rule TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        created_at REAL NOT NULL,
        decided_at REAL,
        UNIQUE (task_id, call_id)
    )""",
    "CREATE INDEX approvals_pending ON approvals (created_at) WHERE state = 'pending'",
    """CREATE TABLE tool_calls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        task_id TEXT NOT NULL,
        call_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        digest TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration_ms REAL NOT NULL,
        detail TEXT
    )""",
    "CREATE INDEX tool_calls_task ON tool_calls (task_id, seq)",
    """CREATE TABLE policy_rules (
        key TEXT PRIMARY KEY,
        decision TEXT NOT NULL,
        created_at REAL NOT NULL,
        source TEXT
    )""",
]

# Index i holds the statements that take the schema from version i to i + 1.
_MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10, _V11]
SCHEMA_VERSION = len(_MIGRATIONS)


def new_task_id() -> str:
    """A short random task id: 12 lowercase hex digits."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Transition:
    """One recorded state change."""

    from_state: str | None
    to_state: str
    at: float
    reason: str


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored, with its history and token totals."""

    id: str
    text: str
    state: TaskState
    priority: int
    result: str | None
    error: str | None
    attempts: int
    created_at: float
    updated_at: float
    transitions: tuple[Transition, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    """A per-task model override (``backend:model``); None runs on the routed role."""
    parent_id: str | None = None
    """The planned task this is a subtask of."""
    step: str | None = None
    """A subtask's step id in its parent's plan (``s1``, ``s2``...)."""
    title: str | None = None
    criteria: tuple[str, ...] = ()
    """Done criteria the result must pass (see taled.tasks.gates.gates)."""
    round: int = 0
    """Which plan round of its parent a subtask belongs to (a restore starts a new one)."""
    needs: tuple[str, ...] = ()
    """Ids of the sibling subtasks this one waits for."""
    crashes: int = 0
    """Times the daemon crashed (a fatal error, not a kill) while running this task."""
    restore_to: str | None = None
    """The checkpoint commit a restore in progress rewinds to (None: no restore pending)."""
    workspace: str | None = None
    """The user's directory the task works on a copy of (None: a scratch one, or none)."""
    act: bool = False
    """The task acts: its model calls tools in a workspace (the agent loop)."""


@dataclass(frozen=True)
class CallRecord:
    """One model call for the token ledger."""

    role: str
    backend: str
    model: str
    task_id: str | None
    prompt_tokens: int
    completion_tokens: int
    load_ms: float
    prompt_ms: float
    generation_ms: float
    total_ms: float
    success: bool
    error: str | None = None
    route: str = "role"
    """How the model was chosen: 'role', 'override' or 'fallback'."""
    note: str | None = None
    counts_exact: bool = True
    key: AttemptKey | None = None
    """The step this call served and which attempt at it (``answer``, ``plan``, ``s2``...;
    ``intent`` and ``summary`` for chat's own calls); the ledger's ``step`` and
    ``attempt`` columns."""
    conversation_id: str | None = None
    saved_tokens: int = 0
    """Prompt tokens a conversation summary kept out of this call (an estimate)."""
    looped: bool = False
    """The pool stopped the answer where it started repeating itself (taled.models.repetition)."""
    at: float = field(default_factory=time.time)
    """When the call ended (it started ``total_ms`` earlier)."""


@dataclass
class _WriteOp:
    future: asyncio.Future[Any]
    fn: Callable[[AsyncConnection], Awaitable[Any]] | None = None
    # Submits are batched into one executemany instead of a savepoint each.
    submit: dict[str, Any] | None = None


def _row_to_task(row: sa.Row[Any]) -> TaskRecord:
    return TaskRecord(
        id=row.id,
        text=row.text,
        state=TaskState(row.state),
        priority=row.priority,
        result=row.result,
        error=row.error,
        attempts=row.attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        model=row.model,
        parent_id=row.parent_id,
        step=row.step,
        title=row.title,
        criteria=tuple(json.loads(row.criteria)) if row.criteria else (),
        round=row.round,
        crashes=row.crashes,
        restore_to=row.restore_to,
        workspace=row.workspace,
        act=bool(row.act),
    )


@dataclass(frozen=True)
class SubtaskSpec:
    """One subtask to create from a plan step."""

    step: str
    title: str
    text: str
    needs: tuple[str, ...]
    """Step ids (of the same plan) this one waits for."""


class Store:
    """The daemon's persistent state. ``open()`` before use, ``close()`` after."""

    def __init__(self, path: Path, settings: StoreSettings, write_batch_max: int) -> None:
        self.path = path
        self._settings = settings
        self._batch_max = write_batch_max
        self._writer_engine: AsyncEngine | None = None
        self._reader_engine: AsyncEngine | None = None
        self._wconn: AsyncConnection | None = None
        self._queue: asyncio.Queue[_WriteOp] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._ledger_pending: set[asyncio.Future[Any]] = set()
        self._damage_logged = False

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite+aiosqlite:///{self.path}"
        self._writer_engine = self._engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
        # Reads are single statements, so they need no BEGIN (and no ROLLBACK on
        # return to the pool): each is its own consistent snapshot under WAL.
        self._reader_engine = self._engine(
            url, begin=None, pool_size=self._settings.read_connections
        )
        try:
            self._wconn = await self._writer_engine.connect()
            await self._migrate(self._wconn)
        except SQLAlchemyError as exc:
            # Start-up's check (taled.doctor) catches most damage first; this is the rest.
            damaged = self._damaged(exc)
            if damaged is None:
                raise
            raise damaged from None
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        """Flush pending writes, stop the writer and close every connection."""
        self._closing = True
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._wconn is not None:
            await self._wconn.close()
            self._wconn = None
        for engine in (self._writer_engine, self._reader_engine):
            if engine is not None:
                await engine.dispose()

    def _engine(self, url: str, *, begin: str | None, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_reset_on_return="rollback" if begin else None,
        )
        pragmas = (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA synchronous={self._settings.synchronous.upper()}",
            f"PRAGMA busy_timeout={self._settings.busy_timeout_ms}",
            "PRAGMA foreign_keys=ON",
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver so BEGIN IMMEDIATE and
            # SAVEPOINT behave as written (the pysqlite recipe in SQLAlchemy's docs).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            for pragma in pragmas:
                cursor.execute(pragma)
            cursor.close()

        if begin is not None:

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql(begin)

        return engine

    async def _migrate(self, conn: AsyncConnection) -> None:
        async with conn.begin():
            version = (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()
            if version > SCHEMA_VERSION:
                raise TaleError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"tale understands ({SCHEMA_VERSION}); upgrade tale"
                )
            for target in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[target]:
                    await conn.exec_driver_sql(statement)
                log.info("store migrated to schema version %d", target + 1)
            await conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def schema_version(self) -> int:
        """The schema version recorded in the database file."""
        async with self._read() as conn:
            return int((await conn.exec_driver_sql("PRAGMA user_version")).scalar_one())

    # -- the writer --------------------------------------------------------

    async def _enqueue(self, op: _WriteOp) -> Any:
        if self._closing or self._writer is None:
            raise Unavailable("the store is closed; the daemon is shutting down")
        self._queue.put_nowait(op)
        return await op.future

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` inside the next group commit, in its own savepoint."""
        loop = asyncio.get_running_loop()
        result: T = await self._enqueue(_WriteOp(future=loop.create_future(), fn=fn))
        return result

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_batch(batch)
            except Exception as exc:
                # A bug in one write must not stop every later write: its callers
                # get the error, the batch is rolled back, the writer goes on.
                log.exception("a batch of %d writes failed", len(batch))
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(TaleError(f"internal error while writing: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_batch(self, batch: list[_WriteOp]) -> None:
        conn = self._wconn
        assert conn is not None
        results: list[tuple[_WriteOp, Any, BaseException | None]] = []
        try:
            async with conn.begin():
                submits = [op for op in batch if op.submit is not None]
                if submits:
                    await self._insert_submits(conn, [op.submit for op in submits if op.submit])
                    results.extend((op, None, None) for op in submits)
                for op in batch:
                    if op.fn is None:
                        continue
                    savepoint = await conn.begin_nested()
                    try:
                        value = await op.fn(conn)
                    except (TaleError, SQLAlchemyError) as exc:
                        await savepoint.rollback()
                        results.append((op, None, self._write_error(exc)))
                    else:
                        await savepoint.commit()
                        results.append((op, value, None))
        except SQLAlchemyError as exc:
            failure = self._write_error(exc)
            if isinstance(failure, DiskFull | StoreDamaged):
                # Expected, and said once per batch: a traceback would say nothing more.
                log.warning("%d writes not committed: %s", len(batch), failure.message)
            else:
                log.exception("group commit of %d writes failed", len(batch))
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(failure)
            return
        # Only now is everything durable: answer the callers.
        for op, value, error in results:
            if op.future.done():
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)

    def _write_error(self, exc: BaseException) -> BaseException:
        """A driver's error as the store's own: DiskFull when the disk is full, else
        a TaleError with the database's message (never SQLAlchemy's URL)."""
        if not isinstance(exc, SQLAlchemyError):
            return exc
        cause = getattr(exc, "orig", None) or exc
        if _disk_full(cause):
            return DiskFull(str(self.path))
        damaged = self._damaged(exc)
        if damaged is not None:
            return damaged
        return TaleError(f"the store could not write to {self.path}: {cause}")

    @staticmethod
    async def _insert_submits(
        conn: AsyncConnection, rows: Sequence[dict[str, Any]], reason: str = "submitted"
    ) -> None:
        await conn.execute(tasks.insert(), list(rows))
        await conn.execute(
            transitions.insert(),
            [
                {
                    "task_id": r["id"],
                    "from_state": None,
                    "to_state": TaskState.QUEUED.value,
                    "at": r["created_at"],
                    "reason": reason,
                }
                for r in rows
            ],
        )

    # -- tasks -------------------------------------------------------------

    async def submit(
        self,
        text: str,
        priority: int,
        model: str | None = None,
        criteria: Sequence[str] = (),
        *,
        workspace: str | None = None,
        act: bool = False,
    ) -> TaskRecord:
        """Persist a new queued task; returns once it is committed to disk."""
        now = time.time()
        task_id = new_task_id()
        row: dict[str, Any] = {
            "id": task_id,
            "text": text,
            "state": TaskState.QUEUED.value,
            "priority": priority,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "model": model,
            "criteria": json.dumps(list(criteria)) if criteria else None,
            "workspace": workspace,
            "act": act,
        }
        loop = asyncio.get_running_loop()
        await self._enqueue(_WriteOp(future=loop.create_future(), submit=row))
        return TaskRecord(
            id=task_id,
            text=text,
            state=TaskState.QUEUED,
            priority=priority,
            result=None,
            error=None,
            attempts=0,
            created_at=now,
            updated_at=now,
            transitions=(Transition(None, TaskState.QUEUED.value, now, "submitted"),),
            model=model,
            criteria=tuple(criteria),
            workspace=workspace,
            act=act,
        )

    async def transition(
        self,
        task_id: str,
        target: TaskState,
        reason: str,
        *,
        expect: TaskState | None = None,
        restoring: bool = False,
        **fields: Any,
    ) -> TaskState:
        """Move a task to ``target`` (checked by the state machine); returns the old state.

        ``expect`` makes the change conditional: if the task is no longer in that
        state (say it was cancelled meanwhile), IllegalTransition is raised.
        """

        async def apply(conn: AsyncConnection) -> TaskState:
            current = await _current_state(conn, task_id)
            if expect is not None and current != expect:
                raise IllegalTransition(
                    f"task {task_id} is {current}, no longer {expect}; it was not moved to {target}"
                )
            check_transition(task_id, current, target, restoring=restoring)
            await _move(conn, task_id, current, target, reason, **fields)
            return current

        return await self.write(apply)

    async def set_priority(self, task_id: str, priority: int) -> None:
        """Change the priority of a task and its unfinished subtasks; NotFound if unknown."""

        async def apply(conn: AsyncConnection) -> None:
            await _current_state(conn, task_id)
            below = [r.id for r in await _subtree(conn, task_id) if r.state not in _FINAL]
            await conn.execute(
                tasks.update()
                .where(tasks.c.id.in_([task_id, *below]))
                .values(priority=priority, updated_at=time.time())
            )

        await self.write(apply)

    async def claim_next(self) -> TaskRecord | None:
        """Move the most urgent queued task to running and return it, or None."""

        async def apply(conn: AsyncConnection) -> TaskRecord | None:
            while True:
                row = (await conn.execute(_NEXT_READY)).first()
                if row is None:
                    return None
                try:
                    task = _row_to_task(row)
                except (ValueError, TypeError) as exc:
                    # Claimed again and again, a row that cannot be read would stop
                    # the whole queue: it fails, and the next one is claimed.
                    why = f"its record in {self.path} is damaged ({exc}); it cannot run"
                    log.error("task %s %s", row.id, why)
                    await _move(conn, row.id, TaskState.QUEUED, TaskState.FAILED, why, error=why)
                    continue
                await _move(
                    conn,
                    row.id,
                    TaskState.QUEUED,
                    TaskState.RUNNING,
                    "picked up by a worker",
                    attempts=row.attempts + 1,
                )
                return task

        return await self.write(apply)

    async def requeue_running(
        self, reason: str, *, crash: str | None = None, quarantine_after: int = 0
    ) -> list[str]:
        """Put every running task back in the queue (crash recovery); return their ids.

        So are waiting ones, except a planned task whose subtasks are still
        unfinished (it goes on waiting for them) and an acting task waiting for a
        person's answer (it goes on waiting for that).

        ``crash`` says what the previous run died of when it died of a fatal error
        of its own (not a kill): each task that was running has one crash counted,
        and one that reaches ``quarantine_after`` crashes (0: never) is failed
        instead of run again: quarantined.
        """

        async def apply(conn: AsyncConnection) -> list[str]:
            rows = (await conn.execute(_INTERRUPTED)).all()
            moved = []
            for row in rows:
                current = TaskState(row.state)
                if crash is not None and current == TaskState.RUNNING:
                    crashes = row.crashes + 1
                    if quarantine_after and crashes >= quarantine_after:
                        why = (
                            f"quarantined: the daemon crashed {crashes} times while running "
                            f"this task (last: {crash}); it is not run again by itself. "
                            f"`tale restore {row.id}` runs it again"
                        )
                        await _move(
                            conn, row.id, current, TaskState.FAILED, why, error=why, crashes=crashes
                        )
                        log.error("task %s %s", row.id, why)
                        continue
                    await _move(conn, row.id, current, TaskState.QUEUED, reason, crashes=crashes)
                    moved.append(row.id)
                    continue
                if current == TaskState.WAITING:
                    await _move(conn, row.id, current, TaskState.RUNNING, reason)
                    current = TaskState.RUNNING
                await _move(conn, row.id, current, TaskState.QUEUED, reason)
                moved.append(row.id)
            return moved

        return await self.write(apply)

    async def mark_restore(self, task_id: str, commit: str, expect: TaskState) -> None:
        """Record that a restore to ``commit`` begins, before its checkpoint is written.

        IllegalTransition if the task left ``expect`` or another restore of it is
        under way. A daemon that dies before ``finish_restore`` finishes it on start.
        """

        async def apply(conn: AsyncConnection) -> None:
            row = (
                await conn.execute(
                    sa.select(tasks.c.state, tasks.c.restore_to).where(tasks.c.id == task_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
            if row.state != expect.value:
                raise IllegalTransition(
                    f"task {task_id} is {row.state}, no longer {expect}; it was not restored"
                )
            if row.restore_to is not None:
                raise IllegalTransition(f"task {task_id} is being restored already")
            await conn.execute(
                tasks.update().where(tasks.c.id == task_id).values(restore_to=commit)
            )

        await self.write(apply)

    async def finish_restore(self, task_id: str, reason: str, plan_round: int) -> bool:
        """Queue a task whose restore checkpoint is written, clearing its restore mark.

        One transaction. False (the mark cleared, the task left as it is) when it is no
        longer paused or failed, say cancelled while being restored.
        """

        async def apply(conn: AsyncConnection) -> bool:
            current = await _current_state(conn, task_id)
            await conn.execute(tasks.update().where(tasks.c.id == task_id).values(restore_to=None))
            if current not in RESTORE_TRANSITIONS:
                return False
            check_transition(task_id, current, TaskState.QUEUED, restoring=True)
            await _move(
                conn,
                task_id,
                current,
                TaskState.QUEUED,
                reason,
                error=None,
                result=None,
                round=plan_round,
                crashes=0,
            )
            return True

        return await self.write(apply)

    async def unmark_restore(self, task_id: str) -> None:
        """Forget a restore that did not happen (its checkpoint was never written)."""

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(tasks.update().where(tasks.c.id == task_id).values(restore_to=None))

        await self.write(apply)

    async def pending_restores(self) -> list[TaskRecord]:
        """Tasks whose restore was begun and not finished (a crash cut it off)."""
        async with self._read() as conn:
            rows = (
                await conn.execute(sa.select(tasks).where(tasks.c.restore_to.is_not(None)))
            ).all()
        return [_row_to_task(r) for r in rows]

    async def get_task(self, task_id: str) -> TaskRecord:
        """One task with its transitions and token totals; NotFound if unknown."""
        async with self._read() as conn:
            row = (await conn.execute(_TASK_BY_ID, {"task_id": task_id})).first()
        if row is None:
            raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
        return _full_row_to_task(row)

    async def add_subtasks(
        self, parent: TaskRecord, plan_round: int, specs: Sequence[SubtaskSpec], reason: str
    ) -> bool:
        """Create a planned task's subtasks and move it to ``waiting``, in one transaction.

        Steps that already have a live (or completed) subtask in this round are
        not created again, so a parent resumed after a crash reuses them. If every
        subtask has already finished, the parent stays running and False is
        returned (nobody would wake it otherwise).
        """

        async def apply(conn: AsyncConnection) -> bool:
            current = await _current_state(conn, parent.id)
            if current != TaskState.RUNNING:
                raise IllegalTransition(
                    f"task {parent.id} is {current}, no longer running; its subtasks "
                    "were not created"
                )
            existing = {
                r.step: r.id
                for r in (
                    await conn.execute(
                        sa.select(tasks.c.id, tasks.c.step).where(
                            tasks.c.parent_id == parent.id,
                            tasks.c.round == plan_round,
                            tasks.c.state.notin_(
                                [TaskState.CANCELLED.value, TaskState.FAILED.value]
                            ),
                        )
                    )
                ).all()
            }
            now = time.time()
            ids = dict(existing)
            rows: list[dict[str, Any]] = []
            for spec in specs:
                if spec.step in ids:
                    continue
                ids[spec.step] = new_task_id()
                rows.append(
                    {
                        "id": ids[spec.step],
                        "text": spec.text,
                        "state": TaskState.QUEUED.value,
                        "priority": parent.priority,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                        "model": parent.model,
                        "parent_id": parent.id,
                        "step": spec.step,
                        "title": spec.title,
                        "criteria": None,
                        "round": plan_round,
                    }
                )
            if rows:
                await self._insert_submits(conn, rows, reason=f"planned as a step of {parent.id}")
                created = {r["step"] for r in rows}
                deps = [
                    {"task_id": ids[s.step], "needs_id": ids[n]}
                    for s in specs
                    if s.step in created
                    for n in s.needs
                    if n in ids
                ]
                if deps:
                    await conn.execute(task_deps.insert(), deps)
            await conn.execute(
                tasks.update().where(tasks.c.id == parent.id).values(round=plan_round)
            )
            unfinished = (
                await conn.execute(sa.select(_has_unfinished_children(sa.literal(parent.id))))
            ).scalar_one()
            if not unfinished:
                return False
            await _move(conn, parent.id, current, TaskState.WAITING, reason)
            return True

        return await self.write(apply)

    async def children(self, parent_id: str, plan_round: int | None = None) -> list[TaskRecord]:
        """A task's subtasks in plan order, each with the ids it needs."""
        params: dict[str, Any] = {"parent_id": parent_id, "round": plan_round}
        async with self._read() as conn:
            rows = (await conn.execute(_CHILDREN, params)).all()
        return [_full_row_to_task(r) for r in rows]

    async def wake_parent(self, parent_id: str, reason: str) -> bool:
        """Queue a waiting parent whose subtasks of its round all finished; True if moved."""

        async def apply(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(
                    sa.select(tasks.c.state).where(
                        tasks.c.id == parent_id, ~_has_unfinished_children(tasks.c.id)
                    )
                )
            ).first()
            if row is None or row.state != TaskState.WAITING.value:
                return False
            await _move(conn, parent_id, TaskState.WAITING, TaskState.QUEUED, reason)
            return True

        return await self.write(apply)

    async def move_descendants(
        self, task_id: str, target: TaskState, sources: Sequence[TaskState], reason: str
    ) -> list[TaskRecord]:
        """Move every subtask below a task that is in one of ``sources`` to ``target``.

        One transaction, so a worker cannot claim a subtask halfway through (a
        cascade read first and moved later could miss one). Returns the subtasks
        as they were before the move.
        """

        async def apply(conn: AsyncConnection) -> list[TaskRecord]:
            moved = [r for r in await _subtree(conn, task_id) if TaskState(r.state) in sources]
            for row in moved:
                await _move(conn, row.id, TaskState(row.state), target, reason)
            return [_row_to_task(r) for r in moved]

        return await self.write(apply)

    async def finished_before(self, task_ids: Sequence[str], cutoff: float) -> list[str]:
        """Those of ``task_ids`` that are completed, failed or cancelled since before ``cutoff``."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.id).where(
                        tasks.c.id.in_(list(task_ids)),
                        tasks.c.state.in_(_FINAL),
                        tasks.c.updated_at < cutoff,
                    )
                )
            ).all()
        return [r.id for r in rows]

    async def list_tasks(self, state: TaskState | None, limit: int) -> list[TaskRecord]:
        """Top-level tasks newest first, optionally only those in ``state``."""
        params: dict[str, Any] = {"limit": limit}
        query = _TASKS_NEWEST
        if state is not None:
            query, params["state"] = _TASKS_NEWEST_IN_STATE, state.value
        async with self._read() as conn:
            rows = (await conn.execute(query, params)).all()
        return [_full_row_to_task(r) for r in rows]

    async def count_by_state(self) -> dict[str, int]:
        """How many tasks are in each state."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.state, sa.func.count()).group_by(tasks.c.state)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # -- the token ledger --------------------------------------------------

    def record_call(self, call: CallRecord) -> None:
        """Append one model call to the ledger, without waiting for the commit.

        A reply must not wait for the ledger's fsync. Nothing is lost by not
        waiting: the writer is FIFO, so the row commits before any later write
        (a task's completion, say), ``close()`` drains it, and the ledger's own
        read (``usage``) waits for rows still in flight.
        """

        row = {k: v for k, v in call.__dict__.items() if k != "key"}
        row["step"] = call.key.step if call.key is not None else None
        row["attempt"] = call.key.number if call.key is not None else 1

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(model_calls.insert().values(**row))

        loop = asyncio.get_running_loop()
        op = _WriteOp(future=loop.create_future(), fn=apply)
        if self._closing or self._writer is None:
            log.error("ledger row for %s:%s dropped: the store is closed", call.backend, call.model)
            return
        self._queue.put_nowait(op)
        self._ledger_pending.add(op.future)
        op.future.add_done_callback(self._ledger_done)

    def _ledger_done(self, future: asyncio.Future[Any]) -> None:
        self._ledger_pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("a ledger row could not be written: %s", future.exception())

    async def ledger_settled(self) -> None:
        """Wait until every ledger row appended so far is committed (or has failed)."""
        await self._ledger_settled()

    async def _ledger_settled(self) -> None:
        if self._ledger_pending:
            await asyncio.wait(set(self._ledger_pending))

    async def usage(self) -> dict[str, Any]:
        """Ledger totals overall, by model, by role, and by role and route.

        The route says how a call's model was chosen: the role's own ('role'),
        a per-task override, or the fallback while the role was down.
        """
        await self._ledger_settled()
        c = model_calls.c
        cols = (
            sa.func.count().label("calls"),
            sa.func.coalesce(sa.func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(c.completion_tokens), 0).label("completion_tokens"),
            sa.func.coalesce(sa.func.sum(sa.case((c.success, 0), else_=1)), 0).label("failures"),
            sa.func.coalesce(sa.func.sum(c.total_ms), 0.0).label("total_ms"),
        )
        async with self._read() as conn:
            total = (await conn.execute(sa.select(*cols))).one()
            by_model = (
                await conn.execute(
                    sa.select(c.backend, c.model, *cols)
                    .group_by(c.backend, c.model)
                    .order_by(c.backend, c.model)
                )
            ).all()
            by_role = (
                await conn.execute(sa.select(c.role, *cols).group_by(c.role).order_by(c.role))
            ).all()
            by_route = (
                await conn.execute(
                    sa.select(c.role, c.route, *cols)
                    .group_by(c.role, c.route)
                    .order_by(c.role, c.route)
                )
            ).all()
        return {
            "total": _totals(total),
            "by_model": [{"backend": r.backend, "model": r.model, **_totals(r)} for r in by_model],
            "by_role": [{"role": r.role, **_totals(r)} for r in by_role],
            "by_route": [{"role": r.role, "route": r.route, **_totals(r)} for r in by_route],
        }

    # -- helpers -----------------------------------------------------------

    def read(self) -> Any:
        """A reader connection (``async with store.read() as conn``)."""
        return self._read()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        if self._reader_engine is None:
            raise Unavailable("the store is not open")
        try:
            async with self._reader_engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            # A damaged page found by a query: say so, not the driver's SQL statement.
            damaged = self._damaged(exc)
            if damaged is None:
                raise
            raise damaged from exc

    def _damaged(self, exc: BaseException) -> StoreDamaged | None:
        """StoreDamaged when a driver's error says the file is damaged (logged once)."""
        cause = getattr(exc, "orig", None) or exc
        if not is_damage(cause):
            return None
        if not self._damage_logged:
            self._damage_logged = True
            log.error("the database %s is damaged: %s; %s", self.path, cause, DOCTOR_HINT)
        return StoreDamaged(f"the database {self.path} is damaged ({cause}); {DOCTOR_HINT}")

    async def backup(self, directory: Path, keep: int) -> Path | None:
        """Back the database up into ``directory``, keeping the newest ``keep`` backups.

        None when nothing changed since the newest backup. Runs in a thread with one
        read snapshot (see ``taled.doctor.take_backup``): the writer never waits for it.
        """
        return await asyncio.to_thread(take_backup, self.path, directory, keep)


def _full_tasks() -> sa.Select[Any]:
    """Tasks with their history and token totals in one statement.

    Every statement is a thread hop through aiosqlite (~1 ms here), so a task's
    transitions (as a JSON array) and ledger sums come back in the same row.
    """
    history = (
        sa.select(
            sa.func.json_group_array(
                sa.func.json_array(
                    transitions.c.seq,
                    transitions.c.from_state,
                    transitions.c.to_state,
                    transitions.c.at,
                    transitions.c.reason,
                )
            )
        )
        .where(transitions.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    prompt = (
        sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.prompt_tokens), 0))
        .where(model_calls.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    completion = (
        sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.completion_tokens), 0))
        .where(model_calls.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    needs = (
        sa.select(sa.func.json_group_array(task_deps.c.needs_id))
        .where(task_deps.c.task_id == tasks.c.id)
        .scalar_subquery()
    )
    return sa.select(
        tasks,
        history.label("history"),
        prompt.label("prompt_total"),
        completion.label("completion_total"),
        needs.label("needs"),
    )


def _has_unfinished_children(parent: Any) -> Any:
    """EXISTS a subtask of ``parent``, in its parent's current round, not yet final."""
    child = tasks.alias("child")
    me = tasks.alias("me")
    return sa.exists().where(
        child.c.parent_id == parent,
        me.c.id == parent,
        child.c.round == me.c.round,
        child.c.state.notin_(_FINAL),
    )


def _unmet_needs() -> Any:
    """EXISTS a dependency of the outer task that has not completed."""
    dep = tasks.alias("dep")
    return sa.exists().where(
        task_deps.c.task_id == tasks.c.id,
        dep.c.id == task_deps.c.needs_id,
        dep.c.state != TaskState.COMPLETED.value,
    )


# Built once: constructing and cache-keying these statements per call cost more
# than running them (profiled on get_task).
_TASK_BY_ID = _full_tasks().where(tasks.c.id == sa.bindparam("task_id"))
_TASKS_NEWEST = (
    _full_tasks()
    .where(tasks.c.parent_id.is_(None))
    .order_by(tasks.c.created_at.desc(), tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_CHILDREN = (
    _full_tasks()
    .where(
        tasks.c.parent_id == sa.bindparam("parent_id"),
        sa.or_(sa.bindparam("round").is_(None), tasks.c.round == sa.bindparam("round")),
    )
    .order_by(tasks.c.round, tasks.c.created_at, tasks.c.step, tasks.c.id)
)
# The most urgent queued task whose dependencies have all completed.
_NEXT_READY = (
    sa.select(tasks)
    .where(tasks.c.state == TaskState.QUEUED.value, ~_unmet_needs())
    .order_by(tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id)
    .limit(1)
)
# A task waiting for a person (a pending approval or question) goes on waiting: the
# answer, not a restart, is what moves it.
_WAITS_FOR_A_PERSON = sa.exists().where(
    approvals.c.task_id == tasks.c.id, approvals.c.state == "pending"
)
_INTERRUPTED = sa.select(tasks.c.id, tasks.c.state, tasks.c.crashes).where(
    sa.or_(
        tasks.c.state == TaskState.RUNNING.value,
        sa.and_(
            tasks.c.state == TaskState.WAITING.value,
            ~_has_unfinished_children(tasks.c.id),
            ~_WAITS_FOR_A_PERSON,
        ),
    )
)
_TASKS_NEWEST_IN_STATE = _TASKS_NEWEST.where(tasks.c.state == sa.bindparam("state"))


def _full_row_to_task(row: sa.Row[Any]) -> TaskRecord:
    # SQLite 3.40 has no ORDER BY inside aggregates: sort by seq here.
    history = sorted(json.loads(row.history)) if row.history else []
    return replace(
        _row_to_task(row),
        transitions=tuple(Transition(f, t, at, reason) for _seq, f, t, at, reason in history),
        prompt_tokens=int(row.prompt_total),
        completion_tokens=int(row.completion_total),
        needs=tuple(json.loads(row.needs)) if row.needs else (),
    )


def _disk_full(error: BaseException) -> bool:
    """Whether a database error is SQLite's SQLITE_FULL or an OS "no space" error."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(code, int):
            return bool(code & 0xFF == sqlite3.SQLITE_FULL)
        return "database or disk is full" in str(error)
    return is_no_space(error)


def _totals(row: Any) -> dict[str, Any]:
    return {
        "calls": int(row.calls),
        "prompt_tokens": int(row.prompt_tokens),
        "completion_tokens": int(row.completion_tokens),
        "total_tokens": int(row.prompt_tokens) + int(row.completion_tokens),
        "failures": int(row.failures),
        "total_ms": round(float(row.total_ms), 1),
    }


async def _subtree(conn: AsyncConnection, task_id: str) -> list[sa.Row[Any]]:
    """Every subtask below a task (all columns), parents before their children."""
    out: list[sa.Row[Any]] = []
    frontier = [task_id]
    while frontier:
        rows = (await conn.execute(sa.select(tasks).where(tasks.c.parent_id.in_(frontier)))).all()
        out.extend(rows)
        frontier = [r.id for r in rows]
    return out


async def _current_state(conn: AsyncConnection, task_id: str) -> TaskState:
    state = (
        await conn.execute(sa.select(tasks.c.state).where(tasks.c.id == task_id))
    ).scalar_one_or_none()
    if state is None:
        raise NotFound(f"no task with id {task_id}; `tale list` shows the ids")
    return TaskState(state)


async def _move(
    conn: AsyncConnection,
    task_id: str,
    current: TaskState,
    target: TaskState,
    reason: str,
    **fields: Any,
) -> None:
    now = time.time()
    await conn.execute(
        tasks.update()
        .where(tasks.c.id == task_id)
        .values(state=target.value, updated_at=now, **fields)
    )
    await conn.execute(
        transitions.insert().values(
            task_id=task_id, from_state=current.value, to_state=target.value, at=now, reason=reason
        )
    )
