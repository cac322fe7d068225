"""The database's schema: every table, and the migrations that build them.

Two definitions of one schema live here, side by side. The SQLAlchemy tables are what
queries are written against; the migrations (``MIGRATIONS``, plain SQL) are what
builds a database file, one entry per schema version, applied in order by
``taled.db.engine`` at open, so an old file is brought up to date with its rows intact.
``tests/test_schema.py`` builds a database from the migrations alone and fails when it
differs from the tables in any table, column, nullability or primary key.

A new table, or a new column, therefore goes here twice in one change: its
``sa.Table`` (or ``sa.Column``) below, and a new ``_Vn`` migration appended to
``MIGRATIONS`` that creates it. A released migration is never edited: databases in
the field have run it.

Which service reads which table is the business of ``tests/test_layout.py``: a table
is read through the repository of the service that owns it (``taled.db.store`` for
tasks, transitions and the token ledger; ``taled.db.acting`` for approvals, the tool
ledger and permission rules; ``taled.db.schedules`` for schedules and their runs), and
the modules that still read another's tables are listed there as debt. Nothing here
does I/O.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "MIGRATIONS",
    "PREDICTABLE_TOKENS_SQL",
    "SCHEMA_VERSION",
    "approvals",
    "conversation_tasks",
    "conversations",
    "messages",
    "metadata",
    "model_calls",
    "policy_rules",
    "schedule_runs",
    "schedules",
    "task_deps",
    "task_embeddings",
    "task_outcomes",
    "tasks",
    "tool_calls",
    "transitions",
    "violations",
]

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
    # The schedule this task is a run of (taled.db.schedules); NULL for a task submitted
    # directly, and for a run whose schedule was deleted since.
    sa.Column("schedule_id", sa.Text, sa.ForeignKey("schedules.id")),
    # A top-level task with dependencies (task_deps) runs once they have all finished,
    # whatever became of them, instead of failing when one fails (`tale submit --after-any`).
    sa.Column("after_any", sa.Boolean, nullable=False, server_default="0"),
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
    sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
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

# Tasks that happen later or again (``tale submit --at`` / ``--every``): the fields of the
# task each run creates, when (``kind`` at | every, the expression as given, the cron
# expression it stands for, the IANA zone it is computed in) and the next run as a UTC
# epoch; NULL once a one-off ran. taled.db.schedules owns it.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("criteria", sa.Text),
    sa.Column("workspace", sa.Text),
    sa.Column("act", sa.Boolean, nullable=False, server_default="0"),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("expression", sa.Text, nullable=False),
    sa.Column("cron", sa.Text),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("next_run", sa.Float),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("missed_policy", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("last_run", sa.Float),
    sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("missed_runs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_task_id", sa.Text),
)

# What became of each time a schedule was due: run on time, run once for times missed
# while the daemon was down, or skipped. One row per (schedule, due time): a time is
# never acted on twice.
schedule_runs = sa.Table(
    "schedule_runs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("schedule_id", sa.Text, sa.ForeignKey("schedules.id"), nullable=False),
    sa.Column("due_at", sa.Float, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("missed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("task_id", sa.Text),
    sa.UniqueConstraint("schedule_id", "due_at"),
)

_V1: tuple[str, ...] = (
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
)

# Version 2 (the dual-model pool): a task may name its model; a ledger row says how
# its model was chosen (the role's own, a per-task override, the fallback while the
# role was down), notes events such as an unexpected reload, and whether its
# counts are exact (a remote server may report no usage).
_V2: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN model TEXT",
    "ALTER TABLE model_calls ADD COLUMN route TEXT NOT NULL DEFAULT 'role'",
    "ALTER TABLE model_calls ADD COLUMN note TEXT",
    "ALTER TABLE model_calls ADD COLUMN counts_exact BOOLEAN NOT NULL DEFAULT 1",
)

# Version 3 (long-running tasks): subtasks of a planned task (parent, plan step,
# title, the plan round they belong to) with their dependencies, done criteria
# as a JSON list, and the plan step of each ledger row.
_V3: tuple[str, ...] = (
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
)

# Version 4 (the conversation agent): conversations with their messages, the
# running summary of their older part and a request awaiting a clarifying answer;
# the tasks each handed off with the last state it reported back; and ledger rows
# that name their conversation and the prompt tokens a summary saved.
_V4: tuple[str, ...] = (
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
)

# Version 5 (the learning engine): the outcome of every finished top-level task
# (the engine's predictions beside what happened); an FTS5 index over their text
# for similar-task lookups (bm25), keyed by task id; and the performance
# monitor's recorded violations.
_V5: tuple[str, ...] = (
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
)

# Version 6 (similar tasks by meaning): the embeddings of finished tasks' texts,
# keyed by task and embedding model (see ``task_embeddings`` above).
_V6: tuple[str, ...] = (
    """CREATE TABLE task_embeddings (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (task_id, model)
    )""",
    "CREATE INDEX task_embeddings_by_model ON task_embeddings (model)",
)

# Version 7 (tactics): the costly tactics a finished task was carried with (planned,
# retried, decomposed; did the retry work) and the tokens its retries and its plan cost.
_V7: tuple[str, ...] = (
    "ALTER TABLE task_outcomes ADD COLUMN planned BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retried BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retry_worked BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN decomposed BOOLEAN",
    "ALTER TABLE task_outcomes ADD COLUMN retry_tokens INTEGER",
    "ALTER TABLE task_outcomes ADD COLUMN plan_tokens INTEGER",
)

# Version 8: the tokens of a task's first direct answer, apart from what retries and
# decomposition spent on it.
_V8: tuple[str, ...] = ("ALTER TABLE task_outcomes ADD COLUMN answer_tokens INTEGER",)

# Version 9 (reliability): how many times the daemon crashed while running a task
# (a task that keeps crashing it is quarantined), and the checkpoint a restore in
# progress rewinds to (set before the checkpoint is written, cleared with the
# restore's transition, so a restore cut off by a crash is finished on start).
_V9: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN restore_to TEXT",
    "CREATE INDEX tasks_restoring ON tasks (id) WHERE restore_to IS NOT NULL",
)

# Version 10 (decisions on columns, not on words): which attempt at its step a call
# was, and whether the pool stopped it for repeating itself, each in a column of its
# own. Rows written before named a retry in the step itself ('answer#2') and a stopped
# loop only in the note; both are read back here, once, and nowhere else.
_V10: tuple[str, ...] = (
    "ALTER TABLE model_calls ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
    """UPDATE model_calls
        SET attempt = CAST(substr(step, instr(step, '#') + 1) AS INTEGER),
            step = substr(step, 1, instr(step, '#') - 1)
        WHERE instr(step, '#') > 1
          AND substr(step, instr(step, '#') + 1) GLOB '[1-9]*'
          AND substr(step, instr(step, '#') + 1) NOT GLOB '*[^0-9]*'""",
    "ALTER TABLE model_calls ADD COLUMN looped BOOLEAN NOT NULL DEFAULT 0",
    "UPDATE model_calls SET looped = 1 WHERE instr(note, 'stopped repeating itself') > 0",
)

# Version 11 (acting): a task's workspace (the user's directory it works on a copy of)
# and whether it acts (runs the agent loop); approvals and questions waiting for a
# person; the tool ledger; the permission rules people added.
_V11: tuple[str, ...] = (
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
)

# Version 12 (schedules): tasks that happen later or again, what became of each due
# time, and the schedule a task is a run of. The due index is partial: the scheduler's
# next wake-up is the minimum over active schedules, one index lookup however many.
_V12: tuple[str, ...] = (
    """CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        priority INTEGER NOT NULL,
        model TEXT,
        criteria TEXT,
        workspace TEXT,
        act BOOLEAN NOT NULL DEFAULT 0,
        kind TEXT NOT NULL,
        expression TEXT NOT NULL,
        cron TEXT,
        timezone TEXT NOT NULL,
        next_run REAL,
        state TEXT NOT NULL,
        missed_policy TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_run REAL,
        runs INTEGER NOT NULL DEFAULT 0,
        missed_runs INTEGER NOT NULL DEFAULT 0,
        last_task_id TEXT
    )""",
    "CREATE INDEX schedules_due ON schedules (next_run) WHERE state = 'active'",
    "CREATE INDEX schedules_by_created ON schedules (created_at)",
    """CREATE TABLE schedule_runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule_id TEXT NOT NULL REFERENCES schedules(id),
        due_at REAL NOT NULL,
        at REAL NOT NULL,
        outcome TEXT NOT NULL,
        missed INTEGER NOT NULL DEFAULT 0,
        task_id TEXT,
        UNIQUE (schedule_id, due_at)
    )""",
    "ALTER TABLE tasks ADD COLUMN schedule_id TEXT REFERENCES schedules(id)",
    "CREATE INDEX tasks_by_schedule ON tasks (schedule_id) WHERE schedule_id IS NOT NULL",
)

# Version 13 (dependencies between top-level tasks, `tale submit --after`): the edges
# are task_deps' own; a task may run after its dependencies whatever became of them;
# a failed or cancelled task looks its dependents up by the task they need.
_V13: tuple[str, ...] = (
    "ALTER TABLE tasks ADD COLUMN after_any BOOLEAN NOT NULL DEFAULT 0",
    "CREATE INDEX task_deps_by_needs ON task_deps (needs_id)",
)

# Version 14 (issue #19): of a call's prompt tokens, those the backend did not read again
# (a prefix still in its KV cache, or OpenAI's prompt_tokens_details.cached_tokens).
_V14: tuple[str, ...] = (
    "ALTER TABLE model_calls ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
)

# Index i holds the statements that take the schema from version i to i + 1.

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _V1,
    _V2,
    _V3,
    _V4,
    _V5,
    _V6,
    _V7,
    _V8,
    _V9,
    _V10,
    _V11,
    _V12,
    _V13,
    _V14,
)
"""The migrations in order: entry ``i`` takes a database from schema version ``i`` to
``i + 1`` (SQLite's ``PRAGMA user_version``)."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code reads and writes."""
