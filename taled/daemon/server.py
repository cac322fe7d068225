"""The MCP surface: tool schemas, argument validation and dispatch.

Tool arguments are validated here against pydantic models whose JSON Schemas are
what ``tools/list`` publishes, so the schema a client sees is the one enforced.
This module is also the one place where a ``TaleError`` becomes a JSON-RPC error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taled import __version__
from taled.chat.conversations import Conversation, Message
from taled.chat.intent import Intent
from taled.chat.service import ChatService, Turn
from taled.checkpoints.repo import Checkpoint, CheckpointStore
from taled.daemon.elicitation import Asker, Elicit
from taled.daemon.resources import (
    RESOURCES,
    TASK_URI,
    TEMPLATES,
    ResourceKind,
    ResourceRef,
    affected_by_move,
    parse_uri,
    subscribable,
)
from taled.db.acting import Approval, ApprovalState
from taled.db.ids import MIN_PREFIX
from taled.db.schedules import MissedPolicy, Schedule, ScheduleRun, ScheduleState
from taled.db.store import TASK_ID_DIGITS, Moved, Store, TaskRecord
from taled.errors import IllegalTransition, InvalidInput, NotFound, TaleError
from taled.reporting.metrics import Metrics
from taled.reporting.usage import UsageReport
from taled.retention.forget import Forgetting
from taled.schedules.service import ScheduleRequest, Schedules
from taled.schedules.timing import zone_or_utc
from taled.tasks.lifecycle import FINAL_STATES, TaskState
from taled.tasks.progress import Progress, ProgressHub
from taled.tasks.queue import MAX_AFTER, TaskQueue
from taled.tasks.runner import Runner
from taled.tasks.workstate import WorkState
from taled.tools.service import Acting, WorkspaceView

__all__ = ["PROMPTS", "TOOLS", "Call", "Services", "ToolDef", "build_server", "task_to_json"]

log = logging.getLogger(__name__)

TASK_ID_PATTERN = rf"^[0-9a-f]{{{TASK_ID_DIGITS}}}$"
# An id a person types (a task's, a schedule's, an approval's): the whole id or a unique
# prefix of it (taled.db.ids), resolved before the tool acts.
ID_REF_PATTERN = rf"^[0-9a-f]{{{MIN_PREFIX},{TASK_ID_DIGITS}}}$"
# watch_task repeats an unchanged line this often (clients time out reads at 30 s).
_HEARTBEAT_SECONDS = 10.0


# What an id argument that is not one is told it should be, by the kind of id.
_ID_SHAPES = {
    "task": f"a task id ({TASK_ID_DIGITS} lowercase hex digits, or a unique prefix of at "
    f"least {MIN_PREFIX}, as `tale list` shows)",
    "schedule": f"a schedule id ({MIN_PREFIX} to {TASK_ID_DIGITS} lowercase hex digits, as "
    "`tale schedules` shows)",
    "approval": f"an approval id ({MIN_PREFIX} to {TASK_ID_DIGITS} lowercase hex digits, as "
    "`tale approvals` shows)",
    "conversation": f"a conversation id ({TASK_ID_DIGITS} lowercase hex digits, as "
    "`list_conversations` shows)",
}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id_kinds: ClassVar[dict[str, str]] = {}
    """Which arguments are ids, and of what (a key of ``_ID_SHAPES``)."""


class SubmitTaskArgs(_Args):
    """Queue a task for the task model; returns its id at once."""

    text: str = Field(min_length=1, description="What to do: 1..10,000 characters once trimmed.")
    priority: int | None = Field(
        default=None, ge=0, le=100, description="0..100, higher runs first; default 50."
    )
    model: str | None = Field(
        default=None,
        min_length=3,
        max_length=2000,
        description="Run on this model instead of the task role's, as backend:model "
        "(llamacpp:NAME, ollama:NAME[:TAG], openai:URL#MODEL); loaded on demand.",
    )
    criteria: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        default=None,
        max_length=20,
        description="Done criteria the result must pass: 'python' (its code runs), "
        "'contains:TEXT', 'regex:PATTERN', 'assert:CODE' (its code then CODE runs), "
        "'output:TEXT' (running its code prints TEXT), 'run:COMMAND' (the command exits 0 "
        "in the task's workspace).",
    )
    workspace: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="An absolute path of a directory: the task acts on a copy of it (tools: "
        "list, read, write, edit, search, run); `tale diff` / `tale apply` bring the change back.",
    )
    act: bool | None = Field(
        default=None,
        description="Give the task tools in a fresh scratch workspace (implied by workspace "
        "and by a run: criterion).",
    )
    after: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        max_length=MAX_AFTER,
        description="Ids (or unique prefixes of 4+ hex digits) of top-level tasks this one "
        "waits for: it runs once they all completed, reading their results, and fails if "
        "one fails or is cancelled.",
    )
    after_any: bool | None = Field(
        default=None,
        description="With after: run once those tasks finished whatever became of them, told "
        "which of them failed, instead of failing with them.",
    )
    at: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Run the task once, later, instead of now: '07:00' (its next occurrence), "
        "'tomorrow 07:00', 'in 20m', or an ISO 8601 date-time ('2026-12-02T07:00', local "
        "unless it has an offset). Creates a schedule and returns it.",
    )
    every: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Run the task again and again: a 5-field cron expression ('30 8 * * 1-5') "
        "or 'mon-fri 08:30', 'daily 07:00', 'hourly', 'every 2h', 'every 15m'. Creates a "
        "schedule and returns it.",
    )
    timezone: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="The IANA zone at and every are read in (e.g. Europe/Berlin); default: "
        "the daemon's local zone.",
    )
    missed: Literal["skip", "run_once"] | None = Field(
        default=None,
        description="What a schedule does about times that pass while the daemon is down: "
        "run_once (one run at start for all of them) or skip; default schedules.missed.",
    )


class TaskIdArgs(_Args):
    """Arguments naming one task."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "task"}

    id: str = Field(
        pattern=ID_REF_PATTERN,
        description="A task's id (12 lowercase hex digits), or a unique prefix of at least 4 "
        "of them.",
    )


class ListTasksArgs(_Args):
    """Filter and bound a task listing."""

    state: (
        Literal["queued", "running", "waiting", "paused", "completed", "failed", "cancelled"] | None
    ) = Field(default=None, description="Only tasks in this state.")
    limit: int | None = Field(
        default=None, ge=1, le=100_000, description="Most tasks returned, newest first."
    )


class CheckpointsArgs(TaskIdArgs):
    """A task and how many of its checkpoints to list."""

    limit: int | None = Field(default=None, ge=1, le=100_000, description="Newest first.")


class RestoreArgs(TaskIdArgs):
    """A task and the checkpoint to rewind it to."""

    commit: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{7,40}$",
        description="A checkpoint's commit (7..40 hex digits); default: the newest "
        "checkpoint that is not a failed attempt.",
    )


class SetPriorityArgs(TaskIdArgs):
    """A task and its new priority."""

    priority: int = Field(ge=0, le=100, description="0..100, higher runs first.")


class NoArgs(_Args):
    """No arguments."""


class ScheduleIdArgs(_Args):
    """Arguments naming one schedule."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "schedule"}

    id: str = Field(
        pattern=ID_REF_PATTERN,
        description="A schedule's id, or a unique prefix of at least 4 of its hex digits.",
    )


class ListSchedulesArgs(_Args):
    """Filter and bound a schedule listing."""

    state: Literal["active", "paused", "done"] | None = Field(
        default=None, description="Only schedules in this state."
    )
    limit: int | None = Field(
        default=None, ge=1, le=100_000, description="Most schedules returned."
    )


APPROVAL_ID = Field(
    pattern=ID_REF_PATTERN,
    description="An approval's id, or a unique prefix of at least 4 of its hex digits.",
)


class ApprovalsArgs(_Args):
    """Which approvals to list."""

    id_kinds: ClassVar[dict[str, str]] = {"task": "task"}

    task: str | None = Field(
        default=None,
        pattern=ID_REF_PATTERN,
        description="Only this task's: its id, or a unique prefix of at least 4 of its digits.",
    )


class ApproveArgs(_Args):
    """An approval to grant."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "approval"}

    id: str = APPROVAL_ID
    always: bool | None = Field(
        default=None,
        description="Also allow calls like it from now on (adds its rule, e.g. run:pytest).",
    )


class DenyArgs(_Args):
    """An approval to refuse, and why (the model reads the reason)."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "approval"}

    id: str = APPROVAL_ID
    reason: str | None = Field(
        default=None, max_length=2000, description="Why, or what to do instead; sent to the model."
    )
    always: bool | None = Field(
        default=None, description="Also deny calls like it from now on (adds its rule)."
    )


class AnswerArgs(_Args):
    """The answer to a task's question (its model called ask_user)."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "approval"}

    id: str = APPROVAL_ID
    text: str = Field(min_length=1, max_length=10_000, description="The answer.")


class UsageArgs(_Args):
    """The period and the length of the usage report's top lists."""

    days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="Only today and the days-1 before (local dates); default: all history.",
    )
    top: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Tasks, conversations and recent violations listed; default usage.top.",
    )


CONVERSATION_ID = Field(
    default=None,
    pattern=TASK_ID_PATTERN,
    description="A conversation id (12 lowercase hex digits); default: the most recent one.",
)


class ChatArgs(_Args):
    """One chat message for the UX agent."""

    id_kinds: ClassVar[dict[str, str]] = {"conversation": "conversation"}

    text: str = Field(min_length=1, description="What you say: 1..4,000 characters once trimmed.")
    conversation: str | None = CONVERSATION_ID
    new: bool = Field(default=False, description="Start a new conversation with this message.")


class DetectIntentArgs(_Args):
    """A message whose intent to read, without acting on it."""

    text: str = Field(min_length=1, description="A chat message: 1..4,000 characters once trimmed.")


class ConversationArgs(_Args):
    """Arguments naming one conversation."""

    id_kinds: ClassVar[dict[str, str]] = {"id": "conversation"}

    id: str = Field(
        pattern=TASK_ID_PATTERN, description="A conversation id: 12 lowercase hex digits."
    )


class ListConversationsArgs(_Args):
    """How many conversations to list."""

    limit: int | None = Field(
        default=None, ge=1, le=10_000, description="Most conversations, most recent first."
    )


class PurgeTasksArgs(_Args):
    """Which finished tasks to forget."""

    older_than: str = Field(
        min_length=1,
        max_length=32,
        description="Forget finished top-level tasks last updated longer ago than this: a "
        "whole number and a unit, e.g. 90m, 12h, 30d, 2w (s, m, h, d, w).",
    )
    dry_run: bool = Field(default=False, description="Only list the tasks that would be forgotten.")


def shown_progress(task: TaskRecord, progress: Progress | None) -> Progress | None:
    """A task's progress as it is shown: no ETA while the task is paused or back in
    the queue, where nothing counts down. (A task waiting for its subtasks keeps it:
    they are its steps.)"""
    if progress is None or task.state not in (TaskState.PAUSED, TaskState.QUEUED):
        return progress
    return replace(progress, eta_seconds=None)


def task_to_json(task: TaskRecord, progress: Progress | None = None) -> dict[str, Any]:
    """The wire form of a task (the CLI's --json contract)."""
    progress = shown_progress(task, progress)
    return {
        "id": task.id,
        "parent_id": task.parent_id,
        "step": task.step,
        "title": task.title,
        "needs": list(task.needs),
        "criteria": list(task.criteria),
        "progress": progress.to_json() if progress is not None else None,
        "state": task.state.value,
        "priority": task.priority,
        "model": task.model,
        "text": task.text,
        "result": task.result,
        "error": task.error,
        "attempts": task.attempts,
        "created_at": _iso(task.created_at),
        "updated_at": _iso(task.updated_at),
        "transitions": [
            {"from": t.from_state, "to": t.to_state, "at": _iso(t.at), "reason": t.reason}
            for t in task.transitions
        ],
        "tokens": _tokens(task.prompt_tokens, task.completion_tokens),
        "act": task.act,
        "workspace": task.workspace,
        "schedule_id": task.schedule_id,
        "after": list(task.needs) if task.parent_id is None else [],
        "after_any": task.after_any,
        "waiting_for": list(task.waiting_for),
    }


def schedule_to_json(s: Schedule) -> dict[str, Any]:
    """The wire form of a schedule: times as UTC, and the next run also in its zone."""
    zone = zone_or_utc(s.timezone).info
    local = (
        None
        if s.next_run is None
        else datetime.fromtimestamp(s.next_run, zone).isoformat(timespec="seconds")
    )
    return {
        "id": s.id,
        "kind": s.kind.value,
        "expression": s.expression,
        "cron": s.cron,
        "timezone": s.timezone,
        "state": s.state.value,
        "next_run": None if s.next_run is None else _iso(s.next_run),
        "next_run_local": local,
        "missed_policy": s.missed_policy.value,
        "text": s.task.text,
        "priority": s.task.priority,
        "model": s.task.model,
        "criteria": list(s.task.criteria),
        "workspace": s.task.workspace,
        "act": s.task.act,
        "runs": s.runs,
        "missed_runs": s.missed_runs,
        "last_run": None if s.last_run is None else _iso(s.last_run),
        "last_task_id": s.last_task_id,
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
    }


def _schedule_run_json(r: ScheduleRun) -> dict[str, Any]:
    return {
        "due_at": _iso(r.due_at),
        "at": _iso(r.at),
        "outcome": r.outcome.value,
        "missed": r.missed,
        "task_id": r.task_id,
    }


def approval_to_json(a: Approval) -> dict[str, Any]:
    """The wire form of an approval or question."""
    return {
        "id": a.id,
        "task_id": a.task_id,
        "call_id": a.call_id,
        "kind": a.kind.value,
        "tool": a.tool,
        "arguments": a.arguments,
        "summary": a.summary,
        "rule": a.rule,
        "state": a.state.value,
        "reason": a.reason,
        "created_at": _iso(a.created_at),
        "decided_at": None if a.decided_at is None else _iso(a.decided_at),
    }


def _checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "commit": c.commit,
        "at": _iso(c.at),
        "step": c.step,
        "kind": c.kind.value,
        "message": c.message,
    }


def _tokens(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt": prompt, "completion": completion, "total": prompt + completion}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _intent_json(intent: Intent) -> dict[str, Any]:
    return {
        "kind": intent.kind,
        "confidence": intent.confidence,
        "probabilities": intent.probabilities,
        "action": intent.action,
        "signals": list(intent.features),
        "model_vote": intent.model_vote,
    }


def _conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "title": c.title,
        "created_at": _iso(c.created_at),
        "updated_at": _iso(c.updated_at),
        "messages": c.messages,
    }


def _message_json(m: Message) -> dict[str, Any]:
    return {
        "seq": m.seq,
        "role": m.role,
        "text": m.text,
        "at": _iso(m.at),
        "task": m.task_id,
        "intent": m.intent,
        "confidence": m.confidence,
        "action": m.action,
    }


def _turn_json(turn: Turn) -> dict[str, Any]:
    done = turn.completion
    return {
        "text": turn.text,
        "conversation": turn.conversation,
        "intent": _intent_json(turn.intent),
        "task": None
        if turn.task is None
        else {"id": turn.task.id, "state": turn.task.state.value, "text": turn.task.text},
        "handed_off": turn.handed_off,
        "updates": turn.updates,
        "summarised": turn.summarised,
        "finish_reason": done.finish_reason,
        "tokens": _tokens(done.prompt_tokens, done.completion_tokens),
    }


# Streams text to the caller as MCP progress notifications (a no-op when the
# caller sent no progress token).
Report = Callable[[float, str, float | None], Awaitable[None]]


@dataclass(frozen=True)
class Call:
    """One tools/call as a handler sees it: how to tell the caller how it goes, and,
    when the client can show forms (MCP elicitation), how to ask the person."""

    progress: Report
    elicit: Elicit | None = None
    """Sends one form to the client; None when it did not declare ``elicitation``."""


Handler = Callable[[Any, Call], Awaitable[dict[str, Any]]]


StatusProvider = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Services:
    """What the MCP surface serves from: built once in ``taled/app.py`` and handed down
    whole, so a new service or limit is one field here, not a parameter at every layer."""

    store: Store
    queue: TaskQueue
    status: StatusProvider
    """daemon_status's answer."""
    models: StatusProvider
    """models_status's answer."""
    chat: ChatService
    runner: Runner
    checkpoints: CheckpointStore
    progress: ProgressHub
    metrics: Metrics
    usage: UsageReport
    acting: Acting
    forgetting: Forgetting
    schedules: Schedules
    list_limit: int
    """Tasks list_tasks returns without a limit."""
    max_list_limit: int
    """The largest limit list_tasks accepts."""
    conversation_limit: int
    """Conversations list_conversations returns without a limit."""
    stream_interval: float
    """Seconds between streamed notifications of one call or subscription, at least."""
    schedule_limit: int = 100
    """Schedules (and a schedule's runs) listed without a limit."""


class _Tools:
    """The tools' handlers: one method per tool, named for it."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def submit_task(self, args: SubmitTaskArgs, _call: Call) -> dict[str, Any]:
        if args.at is not None or args.every is not None:
            if args.after or args.after_any:
                raise InvalidInput("after goes with a task that runs now, not with at or every")
            return await self._schedule(args)
        if args.timezone is not None or args.missed is not None:
            raise InvalidInput("timezone and missed go with at or every (a schedule)")
        task = await self.s.queue.submit(
            args.text,
            args.priority,
            args.model,
            args.criteria,
            workspace=args.workspace,
            act=bool(args.act),
            after=args.after,
            after_any=bool(args.after_any),
        )
        return task_to_json(task)

    async def _schedule(self, args: SubmitTaskArgs) -> dict[str, Any]:
        fields = self.s.queue.check(
            args.text,
            args.priority,
            args.model,
            args.criteria,
            workspace=args.workspace,
            act=bool(args.act),
        )
        request = ScheduleRequest(
            fields,
            at=args.at,
            every=args.every,
            timezone=args.timezone,
            missed=None if args.missed is None else MissedPolicy(args.missed),
        )
        return schedule_to_json(await self.s.schedules.create(request))

    # -- schedules ---------------------------------------------------------

    async def list_schedules(self, args: ListSchedulesArgs, _call: Call) -> dict[str, Any]:
        limit = args.limit if args.limit is not None else self.s.schedule_limit
        state = None if args.state is None else ScheduleState(args.state)
        found = await self.s.schedules.records.find(state, limit)
        return {"schedules": [schedule_to_json(s) for s in found]}

    async def get_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        found = await self.s.schedules.records.get(args.id)
        runs = await self.s.schedules.records.runs(found.id, self.s.schedule_limit)
        return {**schedule_to_json(found), "history": [_schedule_run_json(r) for r in runs]}

    async def pause_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return schedule_to_json(await self.s.schedules.pause(args.id))

    async def resume_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return schedule_to_json(await self.s.schedules.resume(args.id))

    async def delete_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return {**schedule_to_json(await self.s.schedules.delete(args.id)), "deleted": True}

    # -- acting ------------------------------------------------------------

    async def list_approvals(self, args: ApprovalsArgs, _call: Call) -> dict[str, Any]:
        return {"approvals": [approval_to_json(a) for a in await self.s.acting.pending(args.task)]}

    async def approve(self, args: ApproveArgs, _call: Call) -> dict[str, Any]:
        decided = await self.s.acting.decide(
            args.id, ApprovalState.APPROVED, None, always=bool(args.always)
        )
        self.s.queue.wake()
        return approval_to_json(decided)

    async def deny(self, args: DenyArgs, _call: Call) -> dict[str, Any]:
        decided = await self.s.acting.decide(
            args.id, ApprovalState.DENIED, args.reason, always=bool(args.always)
        )
        self.s.queue.wake()
        return approval_to_json(decided)

    async def answer(self, args: AnswerArgs, _call: Call) -> dict[str, Any]:
        decided = await self.s.acting.decide(args.id, ApprovalState.ANSWERED, args.text)
        self.s.queue.wake()
        return approval_to_json(decided)

    async def _view(self, task_id: str) -> tuple[TaskRecord, WorkspaceView]:
        task = await self.s.store.get_task(task_id)
        latest = await self.s.checkpoints.latest(task_id)
        ws = None if latest is None else WorkState.from_json(await self.s.checkpoints.load(task_id))
        if ws is None or ws.agent is None:
            if task.act and task.state not in FINAL_STATES:
                raise IllegalTransition(f"task {task_id} has not made its workspace yet")
            raise InvalidInput(f"task {task_id} did not act: it has no workspace to diff")
        agent = ws.agent
        view = WorkspaceView(
            root=Path(agent.workspace),
            source=Path(agent.source) if agent.source else None,
            base_tree=agent.base_tree,
            tree=agent.tree,
        )
        return task, view

    async def task_diff(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        task, view = await self._view(args.id)
        return {
            "task_id": task.id,
            "state": task.state.value,
            "workspace": str(view.root),
            "source": None if view.source is None else str(view.source),
            "diff": await self.s.acting.diff(view),
        }

    async def apply_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        task, view = await self._view(args.id)
        if task.state in (TaskState.RUNNING, TaskState.QUEUED):
            raise IllegalTransition(
                f"task {task.id} is {task.state}; its workspace is still changing "
                f"(`tale pause {task.id}` first, or wait for it)"
            )
        report = await self.s.acting.apply(view)
        return {
            "task_id": task.id,
            "target": str(view.source),
            "applied": [{"path": c.path, "kind": c.kind.value} for c in report.applied],
            "unchanged": [{"path": c.path, "kind": c.kind.value} for c in report.unchanged],
        }

    async def list_tools(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.s.acting.status()

    async def get_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return await self._whole(await self.s.store.get_task(args.id))

    async def _whole(self, task: TaskRecord) -> dict[str, Any]:
        """A task's wire form with every subtask under it (one read for all levels)."""
        return await self._tree(task, await self.s.store.subtree(task))

    async def _tree(self, task: TaskRecord, under: dict[str, list[TaskRecord]]) -> dict[str, Any]:
        """A task with its progress and, recursively, its subtasks (each of its parent's
        current plan round; ``under`` maps a task's id to them)."""
        out = task_to_json(task, self.s.progress.get(task.id))
        if task.parent_id is None:
            # The learning engine's estimate, from memory (no query): level, tokens, budget.
            out["estimate"] = self.s.runner.estimate(task.id)
        if task.act:
            out["tool_calls"] = [
                {
                    "call_id": c.call_id,
                    "tool": c.tool,
                    "digest": c.digest,
                    "outcome": c.outcome,
                    "duration_ms": round(c.duration_ms, 1),
                    "detail": c.detail,
                    "at": _iso(c.at),
                }
                for c in await self.s.acting.records.calls(task.id)
            ]
            out["approvals"] = [approval_to_json(a) for a in await self.s.acting.pending(task.id)]
        out["subtasks"] = [await self._tree(child, under) for child in under.get(task.id, [])]
        return out

    async def watch_task(self, args: TaskIdArgs, call: Call) -> dict[str, Any]:
        # With a client that can show forms, what the task waits for is also asked
        # there, in the background: progress lines keep flowing while the person thinks.
        asker = (
            None if call.elicit is None else Asker(call.elicit, self.s.acting, self.s.queue.wake)
        )
        try:
            return await self._watch(args.id, call, asker)
        finally:
            if asker is not None:
                await asker.close()

    async def _watch(self, task_id: str, call: Call, asker: Asker | None) -> dict[str, Any]:
        # A notification goes out whenever the line a person would read changes
        # (state, step, tokens, elapsed seconds), at most every stream_interval; the
        # store is re-read at least every second for state changes.
        seen = -1
        last = ""
        sent = time.monotonic()
        while True:
            task = await self.s.store.get_task(task_id)
            progress = shown_progress(task, self.s.progress.get(task.id))
            if progress is not None and task.state not in FINAL_STATES:
                line = f"{task.state} · {progress.line()}"
                step, total = float(progress.step), float(progress.steps)
            elif task.state in FINAL_STATES:
                took = task.updated_at - task.created_at
                line, step, total = f"{task.state} after {took:.1f} s", 0.0, None
            else:
                waited = time.time() - task.updated_at
                line, step, total = f"{task.state} · {waited:.0f} s", 0.0, None
                if task.waiting_for and task.state == TaskState.QUEUED:
                    line = f"{task.state} · waiting for {', '.join(task.waiting_for)}"
            asked: list[Approval] = []
            if task.state == TaskState.WAITING and task.act:
                asked = await self.s.acting.pending(task.id)
                if asked:
                    a = asked[0]
                    how = "tale answer" if a.kind.value == "question" else "tale approve"
                    line = f"waiting for you: {a.summary} · `{how} {a.id[:8]}`"
            if asker is not None:
                asker.offer(asked)
            # A line that does not change (a task waiting for a person) is sent again
            # now and then: a client reading with a timeout knows the daemon is there.
            if line != last or time.monotonic() - sent >= _HEARTBEAT_SECONDS:
                last, sent = line, time.monotonic()
                await call.progress(step, line, total)
            if task.state in FINAL_STATES:
                return await self._whole(task)
            seen = await self.s.progress.wait_change(seen, 1.0)
            await asyncio.sleep(self.s.stream_interval)

    async def list_checkpoints(self, args: CheckpointsArgs, _call: Call) -> dict[str, Any]:
        await self.s.store.get_task(args.id)  # NotFound for an unknown task
        found = await self.s.checkpoints.list(args.id, args.limit)
        return {"task_id": args.id, "checkpoints": [_checkpoint_json(c) for c in found]}

    async def restore_checkpoint(self, args: RestoreArgs, _call: Call) -> dict[str, Any]:
        task, saved = await self.s.runner.restore(args.id, args.commit)
        return {"task": task_to_json(task), "checkpoint": _checkpoint_json(saved)}

    async def list_tasks(self, args: ListTasksArgs, _call: Call) -> dict[str, Any]:
        limit = args.limit if args.limit is not None else self.s.list_limit
        if limit > self.s.max_list_limit:
            raise InvalidInput(f"limit {limit} is above the maximum of {self.s.max_list_limit}")
        state = TaskState(args.state) if args.state else None
        tasks = await self.s.store.list_tasks(state, limit)
        return {"tasks": [task_to_json(t) for t in tasks]}

    async def cancel_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.s.queue.cancel(args.id))

    async def pause_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.s.queue.pause(args.id))

    async def resume_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.s.queue.resume(args.id))

    async def set_priority(self, args: SetPriorityArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.s.queue.set_priority(args.id, args.priority))

    async def usage(self, args: UsageArgs, _call: Call) -> dict[str, Any]:
        return await self.s.usage.report(args.days, args.top)

    async def daemon_status(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.s.status()

    async def models_status(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.s.models()

    async def chat(self, args: ChatArgs, call: Call) -> dict[str, Any]:
        # One notification per token costs more than the token (~0.6 ms each here):
        # pieces are gathered and sent at most every stream_interval, the first at once.
        interval = self.s.stream_interval
        pending: list[str] = []
        sent = 0
        last = float("-inf")

        async def flush() -> None:
            nonlocal sent, last
            if pending:
                sent += 1
                last = time.monotonic()
                await call.progress(sent, "".join(pending), None)
                pending.clear()

        async def on_text(piece: str) -> None:
            pending.append(piece)
            if time.monotonic() - last >= interval:
                await flush()

        turn = await self.s.chat.turn(
            args.text, on_text, conversation=args.conversation, new=args.new
        )
        await flush()
        return _turn_json(turn)

    async def detect_intent(self, args: DetectIntentArgs, _call: Call) -> dict[str, Any]:
        return _intent_json(await self.s.chat.detect(self.s.chat.validate(args.text)))

    async def list_conversations(self, args: ListConversationsArgs, _call: Call) -> dict[str, Any]:
        found = await self.s.chat.conversations.recent(args.limit or self.s.conversation_limit)
        return {"conversations": [_conversation_json(c) for c in found]}

    async def get_conversation(self, args: ConversationArgs, _call: Call) -> dict[str, Any]:
        conversations = self.s.chat.conversations
        conv = await conversations.get(args.id)
        messages = await conversations.messages(conv.id)
        return {
            **_conversation_json(conv),
            "summary": conv.summary,
            "summary_upto": conv.summary_upto,
            "pending": None if conv.pending is None else conv.pending.text,
            "messages": [_message_json(m) for m in messages],
        }

    async def metrics(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.s.metrics.snapshot()

    # -- forgetting ----------------------------------------------------------

    async def delete_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return await self.s.forgetting.delete(args.id)

    async def purge_tasks(self, args: PurgeTasksArgs, _call: Call) -> dict[str, Any]:
        return await self.s.forgetting.purge(args.older_than, dry_run=args.dry_run)


# -- what each tool returns (its outputSchema) ---------------------------------
# Hand-written to match the *_json functions above; tests validate real results
# against them, and the SDK client validates every result it receives. A shape
# that grows with the daemon (usage, metrics, status) names only the keys it always
# has and leaves the rest open.

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_OBJ: dict[str, Any] = {"type": "object"}
_ARR: dict[str, Any] = {"type": "array"}


def _maybe(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _object(properties: dict[str, Any], *optional: str) -> dict[str, Any]:
    """An object with these properties, all required but ``optional``; others allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
    }


def _keys(*required: str) -> dict[str, Any]:
    """An open-ended object: only the keys it always has are named."""
    return {"type": "object", "required": list(required)}


_NSTR = _maybe(_STR)
_TOKENS = _object({"prompt": _INT, "completion": _INT, "total": _INT})
_TASK = _object(
    {
        "id": _STR,
        "parent_id": _NSTR,
        "step": _NSTR,
        "title": _NSTR,
        "needs": _list(_STR),
        "criteria": _list(_STR),
        "progress": _maybe(_keys("step", "steps", "doing", "tokens", "elapsed_seconds")),
        "state": {"enum": [s.value for s in TaskState]},
        "priority": _INT,
        "model": _NSTR,
        "text": _STR,
        "result": _NSTR,
        "error": _NSTR,
        "attempts": _INT,
        "created_at": _STR,
        "updated_at": _STR,
        "transitions": _list(_object({"from": _NSTR, "to": _STR, "at": _STR, "reason": _STR})),
        "tokens": _TOKENS,
        "act": _BOOL,
        "workspace": _NSTR,
        "schedule_id": _NSTR,
        "after": _list(_STR),
        "after_any": _BOOL,
        "waiting_for": _list(_STR),
    }
)
_APPROVAL = _object(
    {
        "id": _STR,
        "task_id": _STR,
        "call_id": _NSTR,
        "kind": _STR,
        "tool": _NSTR,
        "arguments": {},
        "summary": _STR,
        "rule": _NSTR,
        "state": _STR,
        "reason": _NSTR,
        "created_at": _STR,
        "decided_at": _NSTR,
    }
)
# get_task's tree: the task, the learning engine's estimate (top-level tasks), an
# acting task's tool calls and approvals, and the subtasks (each the same, recursively).
_TASK_TREE = {
    **_TASK,
    "properties": {
        **_TASK["properties"],
        "estimate": _maybe(_OBJ),
        "tool_calls": _list(_keys("call_id", "tool", "outcome", "at")),
        "approvals": _list(_APPROVAL),
        "subtasks": _list(_TASK),
    },
    "required": [*_TASK["required"], "subtasks"],
}
_TASKS = _object({"tasks": _list(_TASK)})
_SCHEDULE = _object(
    {
        "id": _STR,
        "kind": _STR,
        "expression": _STR,
        "cron": _NSTR,
        "timezone": _NSTR,
        "state": {"enum": [s.value for s in ScheduleState]},
        "next_run": _NSTR,
        "next_run_local": _NSTR,
        "missed_policy": _STR,
        "text": _STR,
        "priority": _maybe(_INT),
        "model": _NSTR,
        "criteria": _list(_STR),
        "workspace": _NSTR,
        "act": _BOOL,
        "runs": _INT,
        "missed_runs": _INT,
        "last_run": _NSTR,
        "last_task_id": _NSTR,
        "created_at": _STR,
        "updated_at": _STR,
    }
)
_SCHEDULES = _object({"schedules": _list(_SCHEDULE)})
_SCHEDULE_WITH_HISTORY = {
    **_SCHEDULE,
    "properties": {
        **_SCHEDULE["properties"],
        "history": _list(
            _object(
                {"due_at": _STR, "at": _STR, "outcome": _STR, "missed": _BOOL, "task_id": _NSTR}
            )
        ),
    },
    "required": [*_SCHEDULE["required"], "history"],
}
_SCHEDULE_DELETED = {
    **_SCHEDULE,
    "properties": {**_SCHEDULE["properties"], "deleted": {"const": True}},
    "required": [*_SCHEDULE["required"], "deleted"],
}
# submit_task returns the task, or with at/every the schedule it made.
_SUBMITTED = {"type": "object", "anyOf": [_TASK, _SCHEDULE]}
_CHECKPOINT = _object({"commit": _STR, "at": _STR, "step": _NSTR, "kind": _STR, "message": _STR})
_CHECKPOINTS = _object({"task_id": _STR, "checkpoints": _list(_CHECKPOINT)})
_RESTORED = _object({"task": _TASK, "checkpoint": _CHECKPOINT})
_APPROVALS = _object({"approvals": _list(_APPROVAL)})
_DIFF = _object({"task_id": _STR, "state": _STR, "workspace": _STR, "source": _NSTR, "diff": _STR})
_CHANGE = _list(_object({"path": _STR, "kind": _STR}))
_APPLIED = _object({"task_id": _STR, "target": _STR, "applied": _CHANGE, "unchanged": _CHANGE})
_TOOL_STATUS = _object({"builtin": _list(_keys("name", "policy")), "servers": _ARR, "rules": _OBJ})
_USAGE = _keys(
    "at", "total", "by_model", "by_role", "by_day", "by_task", "prediction", "savings", "violations"
)
_INTENT = _object(
    {
        "kind": {"enum": ["chat", "task", "unclear"]},
        "confidence": _NUM,
        "probabilities": _OBJ,
        "action": _NSTR,
        "signals": _list(_STR),
        "model_vote": {},
    }
)
_TURN = _object(
    {
        "text": _STR,
        "conversation": _STR,
        "intent": _INTENT,
        "task": _maybe(_object({"id": _STR, "state": _STR, "text": _STR})),
        "handed_off": _BOOL,
        "updates": _list(_STR),
        "summarised": _BOOL,
        "finish_reason": _NSTR,
        "tokens": _TOKENS,
    }
)
_CONVERSATION_SUMMARY = _object(
    {"id": _STR, "title": _NSTR, "created_at": _STR, "updated_at": _STR, "messages": _INT}
)
_CONVERSATIONS = _object({"conversations": _list(_CONVERSATION_SUMMARY)})
_CONVERSATION = _object(
    {
        "id": _STR,
        "title": _NSTR,
        "created_at": _STR,
        "updated_at": _STR,
        "summary": _NSTR,
        "summary_upto": {},
        "pending": _NSTR,
        "messages": _list(_keys("seq", "role", "text", "at")),
    }
)
_METRICS = _keys("at", "window_minutes", "tokens_per_minute", "latency", "queue", "violations")
_MODELS = _object({"models": _list(_keys("role", "backend", "model", "loaded", "health"))})
_STATUS = _keys("version", "pid", "uptime_seconds", "workers", "tasks", "models")
_DELETED = _keys("id", "tasks")
_PURGED = _keys("older_than", "dry_run", "tasks", "skipped")


@dataclass(frozen=True)
class ToolDef:
    """One MCP tool: its arguments' model, what it does and returns, and its hints."""

    args: type[_Args]
    description: str
    title: str
    read_only: bool
    """Changes nothing (readOnlyHint); the two hints below then say nothing."""
    destructive: bool
    """May undo or lose something: cancels, deletes, overwrites (destructiveHint)."""
    idempotent: bool
    """A second identical call has no further effect (idempotentHint)."""
    output: dict[str, Any]
    """The JSON Schema of its structuredContent (outputSchema)."""

    def listed(self, name: str) -> types.Tool:
        """The tool as tools/list publishes it."""
        return types.Tool(
            name=name,
            title=self.title,
            description=self.description,
            input_schema=_schema(self.args),
            output_schema=self.output,
            annotations=types.ToolAnnotations(
                title=self.title,
                read_only_hint=self.read_only,
                destructive_hint=self.destructive,
                idempotent_hint=self.idempotent,
                # Everything a tool touches is this daemon's own (its store, its
                # models, the workspace given); nothing reaches out to the world.
                open_world_hint=False,
            ),
        )


# name -> the tool: its arguments, what it does and returns, and its hints.
TOOLS: dict[str, ToolDef] = {
    "submit_task": ToolDef(
        SubmitTaskArgs,
        "Queue a task for the task model. Returns the task (with its id) as soon as it is "
        "stored. With at or every it is scheduled instead: the schedule is returned (id, "
        "kind, next_run in UTC and next_run_local in its timezone), and each run is a task "
        "of its own with schedule_id set.",
        title="Submit a task",
        read_only=False,
        destructive=False,
        idempotent=False,
        output=_SUBMITTED,
    ),
    "list_schedules": ToolDef(
        ListSchedulesArgs,
        "Schedules: active ones by next run, then paused, then done; each with its "
        "expression, cron, timezone, next run, runs and missed runs.",
        title="List schedules",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_SCHEDULES,
    ),
    "get_schedule": ToolDef(
        ScheduleIdArgs,
        "One schedule, with the history of its due times newest first: ran, caught_up "
        "(one run for times missed while the daemon was down) or skipped, with the task "
        "each created.",
        title="Get a schedule",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_SCHEDULE_WITH_HISTORY,
    ),
    "pause_schedule": ToolDef(
        ScheduleIdArgs,
        "Stop an active schedule from running until resumed.",
        title="Pause a schedule",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_SCHEDULE,
    ),
    "resume_schedule": ToolDef(
        ScheduleIdArgs,
        "Make a paused schedule active again from its next time after now (times that "
        "passed while paused are not run).",
        title="Resume a schedule",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_SCHEDULE,
    ),
    "delete_schedule": ToolDef(
        ScheduleIdArgs,
        "Delete a schedule; the tasks it already created stay (no longer linked).",
        title="Delete a schedule",
        read_only=False,
        destructive=True,
        idempotent=True,
        output=_SCHEDULE_DELETED,
    ),
    "get_task": ToolDef(
        TaskIdArgs,
        "One task: state, priority, result, transitions, tokens, live progress and its "
        "subtasks (the same, recursively).",
        title="Get a task",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_TASK_TREE,
    ),
    "watch_task": ToolDef(
        TaskIdArgs,
        "Follow a task until it ends, then return it. With a progress token, each change "
        "of state or progress (step i of n, tokens, elapsed, ETA) is a progress notification. "
        "A client that declared elicitation is asked, as a form, about each tool call the "
        "task waits to have approved and each question its model asks; declining leaves it "
        "to the approve, deny and answer tools.",
        title="Watch a task",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_TASK_TREE,
    ),
    "list_checkpoints": ToolDef(
        CheckpointsArgs,
        "A task's checkpoints, newest first: commit, time, step, kind and message.",
        title="List a task's checkpoints",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_CHECKPOINTS,
    ),
    "restore_checkpoint": ToolDef(
        RestoreArgs,
        "Rewind a paused or failed task to one of its checkpoints and queue it again; "
        "finished steps in that checkpoint are not run again.",
        title="Restore a checkpoint",
        read_only=False,
        destructive=True,
        idempotent=False,
        output=_RESTORED,
    ),
    "list_tasks": ToolDef(
        ListTasksArgs,
        "Tasks, newest first, optionally filtered by state.",
        title="List tasks",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_TASKS,
    ),
    "list_approvals": ToolDef(
        ApprovalsArgs,
        "What acting tasks wait for: tool calls their policy says to ask about, and their "
        "models' questions, oldest first, each with its id, task, tool and summary.",
        title="List approvals",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_APPROVALS,
    ),
    "approve": ToolDef(
        ApproveArgs,
        "Let a waiting tool call run; the task goes on.",
        title="Approve a tool call",
        read_only=False,
        destructive=True,
        idempotent=True,
        output=_APPROVAL,
    ),
    "deny": ToolDef(
        DenyArgs,
        "Refuse a waiting tool call; the reason goes to the task's model.",
        title="Deny a tool call",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_APPROVAL,
    ),
    "answer": ToolDef(
        AnswerArgs,
        "Answer a task's question (its model asked with ask_user).",
        title="Answer a task's question",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_APPROVAL,
    ),
    "task_diff": ToolDef(
        TaskIdArgs,
        "What an acting task changed in its workspace, as a unified diff against the "
        "directory it started from.",
        title="Show a task's diff",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_DIFF,
    ),
    "apply_task": ToolDef(
        TaskIdArgs,
        "Bring an acting task's change into the directory it was given; refused whole, "
        "naming the files, when any of them changed there since the task copied it.",
        title="Apply a task's change",
        read_only=False,
        destructive=True,
        idempotent=False,
        output=_APPLIED,
    ),
    "list_tools": ToolDef(
        NoArgs,
        "The tools tasks may use: the built-ins with their permission rule, and the "
        "configured MCP servers with their state and tools.",
        title="List task tools",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_TOOL_STATUS,
    ),
    "cancel_task": ToolDef(
        TaskIdArgs,
        "Cancel a task that has not finished; a running model call is stopped.",
        title="Cancel a task",
        read_only=False,
        destructive=True,
        idempotent=True,
        output=_TASK,
    ),
    "pause_task": ToolDef(
        TaskIdArgs,
        "Pause a queued, running or waiting task; a running model call is stopped and the "
        "partial answer is checkpointed and continued on resume.",
        title="Pause a task",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_TASK,
    ),
    "resume_task": ToolDef(
        TaskIdArgs,
        "Put a paused task back in the queue.",
        title="Resume a task",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_TASK,
    ),
    "set_priority": ToolDef(
        SetPriorityArgs,
        "Change an unfinished task's priority (0..100, higher runs first).",
        title="Set a task's priority",
        read_only=False,
        destructive=False,
        idempotent=True,
        output=_TASK,
    ),
    "usage": ToolDef(
        UsageArgs,
        "The usage report: tokens (calls, prompt, completion, failures) overall and by model, "
        "role, route, day, top task (subtasks folded in), complexity and top conversation; "
        "budget prediction error (MAPE by day and as a learning curve) and truncation rate; "
        "savings (summaries, turns answered from the store, tasks routed to the UX model, and "
        "an estimate against a naive single-model design, with its method); recorded "
        "performance-target violations.",
        title="Usage report",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_USAGE,
    ),
    "chat": ToolDef(
        ChatArgs,
        "One turn of a conversation with the UX agent (the most recent conversation unless "
        "one is named or new is true). A request for work is queued as a task and the reply "
        "names it; a vague one gets a clarifying question; questions about your tasks are "
        "answered from the store. With a progress token, the reply streams as "
        "notifications/progress whose message is the next piece of text.",
        title="Chat with tale",
        read_only=False,
        destructive=False,
        idempotent=False,
        output=_TURN,
    ),
    "detect_intent": ToolDef(
        DetectIntentArgs,
        "How the agent would read a message (chat, task or unclear, with confidence, the "
        "signals that fired and the UX model's vote), without acting on it.",
        title="Detect a message's intent",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_INTENT,
    ),
    "list_conversations": ToolDef(
        ListConversationsArgs,
        "Conversations, most recently active first: id, title, times, message count.",
        title="List conversations",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_CONVERSATIONS,
    ),
    "get_conversation": ToolDef(
        ConversationArgs,
        "One conversation: its messages (with the task each handed off), and the summary "
        "its older part was folded into.",
        title="Get a conversation",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_CONVERSATION,
    ),
    "metrics": ToolDef(
        NoArgs,
        "Live metrics: tokens per minute per model, latencies against the spec's targets, "
        "queue depth and recent target violations with their context (live, from the "
        "window), and the newest violations the monitor recorded (kept across restarts).",
        title="Live metrics",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_METRICS,
    ),
    "models_status": ToolDef(
        NoArgs,
        "The model pool: each role's and optional model's backend, model, pinned, loaded, "
        "health, who serves a role that is down, memory, calls and tokens since start, "
        "reloads, evictions, last error.",
        title="Model pool status",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_MODELS,
    ),
    "daemon_status": ToolDef(
        NoArgs,
        "The daemon: version, pid, uptime, models, workers, tasks by state, and the "
        "learning engine (its embeddings' model, state, lookups and bm25 fallbacks).",
        title="Daemon status",
        read_only=True,
        destructive=False,
        idempotent=True,
        output=_STATUS,
    ),
    "delete_task": ToolDef(
        TaskIdArgs,
        "Forget a finished top-level task and its subtasks everywhere: its text, result, "
        "history, checkpoints (and their objects), workspace, run outputs, git worktree "
        "branch, the conversation turns that submitted or named it and the learning "
        "engine's copy; the database and its backups are rewritten without it. Token counts "
        "stay in the ledger, anonymous, so usage totals do not change. A live task is "
        "refused (cancel it first); a second delete of the same id is NotFound.",
        title="Delete a task",
        read_only=False,
        destructive=True,
        idempotent=True,
        output=_DELETED,
    ),
    "purge_tasks": ToolDef(
        PurgeTasksArgs,
        "Forget, as delete_task does, every finished top-level task last updated longer "
        "ago than older_than; dry_run only lists them. Returns the tasks (with their text "
        "on a dry run) and any skipped, with why.",
        title="Purge old tasks",
        read_only=False,
        destructive=True,
        idempotent=True,
        output=_PURGED,
    ),
}


def _schema(model: type[_Args]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
        # pydantic spells Optional as anyOf [T, null]; keep the plain type for clients.
        if "anyOf" in prop:
            options = [o for o in prop.pop("anyOf") if o.get("type") != "null"]
            if len(options) == 1:
                prop.update(options[0])
        prop.pop("default", None)
    return schema


def _describe_validation(tool: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(TOOLS[tool].args.model_fields) or "none"
            parts.append(f"unknown argument {field!r} (allowed: {allowed})")
        elif err["type"] == "string_too_short" and field == "text":
            parts.append(
                "chat message is empty; say something"
                if tool == "chat"
                else "task text is empty; say what you want done"
            )
        elif err["type"] == "missing":
            parts.append(f"missing required argument {field!r}")
        elif err["type"] == "string_pattern_mismatch" and field in TOOLS[tool].args.id_kinds:
            shape = _ID_SHAPES[TOOLS[tool].args.id_kinds[field]]
            parts.append(f"{err['input']!r} is not {shape}")
        else:
            parts.append(
                f"{field!r}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:80]})"
            )
    return f"{tool}: " + "; ".join(parts)


def _can_elicit(ctx: ServerRequestContext[Any]) -> bool:
    """Whether the client declared form elicitation and this request can carry one.

    ``elicitation: {}`` (no mode named) means forms, as before modes existed."""
    capabilities = ctx.session.client_capabilities
    wanted = None if capabilities is None else capabilities.elicitation
    if wanted is None or (wanted.form is None and wanted.url is not None):
        return False
    return ctx.session.can_send_request


async def _quiet(_progress: float, _message: str, _total: float | None) -> None:
    """A resource read reports no progress."""


async def _read_resource(tools: _Tools, ref: ResourceRef) -> dict[str, Any]:
    """A resource's JSON, read through the tool that returns the same thing."""
    call = Call(progress=_quiet)
    match ref.kind:
        case ResourceKind.TASKS:
            return await tools.list_tasks(ListTasksArgs(), call)
        case ResourceKind.SCHEDULES:
            return await tools.list_schedules(ListSchedulesArgs(), call)
        case ResourceKind.DASHBOARD:
            return await tools.daemon_status(NoArgs(), call)
        case ResourceKind.TASK:
            return await tools.get_task(TaskIdArgs(id=ref.id), call)
        case ResourceKind.SCHEDULE:
            return await tools.get_schedule(ScheduleIdArgs(id=ref.id), call)


class _Rising:
    """One call's progress reporter whose values strictly increase, as MCP requires.

    A handler reports what it knows (step i of n, or 0 while a task waits); a value
    that does not rise (an unchanged step, a heartbeat, the final line) is sent as
    the last rising value plus a fraction that approaches, never reaches, the next
    whole step: ``2, 2.5, 2.67, ...`` stays inside "step 2 of n", so ``total`` and a
    client's bar keep their meaning."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._last = -math.inf
        self._base = 0.0
        self._repeats = 0

    async def __call__(self, progress: float, message: str, total: float | None) -> None:
        if progress > self._last:
            self._base, self._repeats, value = progress, 0, progress
        else:
            self._repeats += 1
            value = self._base + self._repeats / (self._repeats + 1)
            if value <= self._last:  # past what a float can tell apart
                value = math.nextafter(self._last, math.inf)
        self._last = value
        await self._report(value, message, total)


# RFC 5424 severities, lowest first, as logging/setLevel names them.
_LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)

# What a state change of one of a session's tasks is logged to it as.
_MOVE_LEVEL: dict[TaskState, types.LoggingLevel] = {
    TaskState.FAILED: "warning",
    TaskState.CANCELLED: "notice",
    TaskState.WAITING: "notice",
    TaskState.COMPLETED: "info",
}

# Log entries a slow client may leave unsent before the oldest are dropped.
_LOG_BACKLOG = 200


class _Session:
    """One connection's MCP state: the resources it follows, its log level, the tasks
    that are its work, and the one background task that sends what they produce.

    Made when the connection's session starts (the server's lifespan runs once per
    connection) and closed with it, which ends its subscriptions."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self.subscribed: set[str] = set()
        self.tasks: set[str] = set()
        """Tasks this session submitted or watches: their state changes are logged to it."""
        self.level: types.LoggingLevel | None = None
        """logging/setLevel's level; None (nothing is logged) until the client sets one."""
        self._peer: ServerSession | None = None
        self._dirty: set[str] = set()
        self._logs: collections.deque[types.LoggingMessageNotificationParams] = collections.deque(
            maxlen=_LOG_BACKLOG
        )
        self._seen: dict[str, Progress | None] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def attach(self, peer: ServerSession) -> None:
        """Send this session's notifications through ``peer`` (any request's session
        handle: notifications go on the connection's own channel, not the request's)."""
        self._peer = peer
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name="mcp session notices")

    async def close(self) -> None:
        """The connection ended: stop sending."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    def changed(self, uris: Iterable[str]) -> None:
        """These resources changed; those this session follows are sent as updated."""
        followed = self.subscribed.intersection(uris)
        if followed:
            self._dirty |= followed
            self._wake.set()

    def moved(self, moved: Moved) -> None:
        """A task changed state (the store's watcher: returns at once)."""
        self.changed(affected_by_move(moved.task_id))
        if moved.task_id in self.tasks:
            level = _MOVE_LEVEL.get(moved.to_state, "debug")
            self.log(
                level,
                {
                    "task_id": moved.task_id,
                    "from": moved.from_state.value,
                    "to": moved.to_state.value,
                    "reason": moved.reason,
                },
                "taled.tasks",
            )

    def log(self, level: types.LoggingLevel, data: Any, logger: str) -> None:
        """Queue one notifications/message if ``level`` is at or above the session's."""
        if self.level is None or _LEVELS.index(level) < _LEVELS.index(self.level):
            return
        self._logs.append(
            types.LoggingMessageNotificationParams(level=level, data=data, logger=logger)
        )
        self._wake.set()

    async def _send_loop(self) -> None:
        # Wakes on a move or log entry, and (while it follows a task) on progress;
        # then sends what changed, and rests stream_interval so a busy task is
        # reported at most that often.
        seen = -1
        try:
            while True:
                seen = await self._wait(seen)
                self._wake.clear()
                self._progress_changed()
                await self._send()
                await asyncio.sleep(self._services.stream_interval)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            # The client went away mid-send; the lifespan closes this session.
            return

    async def _wait(self, seen: int) -> int:
        """Until woken or, while a task resource is followed, its progress may have moved."""
        if not any(uri.startswith(TASK_URI) for uri in self.subscribed):
            await self._wake.wait()
            return seen
        woken = asyncio.ensure_future(self._wake.wait())
        progressed = asyncio.ensure_future(self._services.progress.wait_change(seen, 3600))
        try:
            await asyncio.wait({woken, progressed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            progressed.cancel()
        return progressed.result() if progressed.done() and not progressed.cancelled() else seen

    def _progress_changed(self) -> None:
        for uri in self.subscribed:
            if uri.startswith(TASK_URI):
                now = self._services.progress.get(uri.removeprefix(TASK_URI))
                if now is not self._seen.get(uri):
                    self._seen[uri] = now
                    self._dirty.add(uri)

    async def _send(self) -> None:
        if self._peer is None:
            return
        dirty, self._dirty = self._dirty & self.subscribed, set()
        for uri in sorted(dirty):
            await self._peer.send_resource_updated(uri)
        while self._logs:
            params = self._logs.popleft()
            await self._peer.send_notification(types.LoggingMessageNotification(params=params))


class _Sessions:
    """The live sessions; one watcher on the store tells them all of each move."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._live: set[_Session] = set()
        services.store.watch(self._moved)

    def _moved(self, moved: Moved) -> None:
        for session in list(self._live):
            session.moved(moved)

    def changed(self, uris: Iterable[str]) -> None:
        """Resources changed without a move (a task was submitted)."""
        for session in list(self._live):
            session.changed(uris)

    @contextlib.asynccontextmanager
    async def open(self, _server: Server[Any]) -> AsyncIterator[_Session]:
        """The server's lifespan: entered once per connection, for its session."""
        session = _Session(self._services)
        self._live.add(session)
        try:
            yield session
        finally:
            self._live.discard(session)
            await session.close()


def _session_of(ctx: ServerRequestContext[Any]) -> _Session:
    session = ctx.lifespan_context
    assert isinstance(session, _Session), "build_server's lifespan makes one per connection"
    return session


def _error_result(code: int, message: str) -> types.CallToolResult:
    """A tool execution error as MCP 2025-11-25 asks: in the result, so the model reads
    the message and can correct its call; structuredContent carries the code."""
    return types.CallToolResult(
        content=[types.TextContent(text=message)],
        structured_content={"error": {"code": code, "message": message}},
        is_error=True,
    )


# -- prompts ---------------------------------------------------------------------

PROMPTS = [
    types.Prompt(
        name="submit",
        title="Submit a task",
        description="Ask the assistant to queue a task for tale's task model with submit_task.",
        arguments=[
            types.PromptArgument(
                name="task", description="What the task should do, in your words.", required=True
            )
        ],
    ),
    types.Prompt(
        name="summarise",
        title="Summarise my tasks",
        description="Ask the assistant to summarise your recent tale tasks; the message "
        "carries the current list_tasks answer.",
        arguments=[],
    ),
]


def _user_prompt(description: str, text: str) -> types.GetPromptResult:
    return types.GetPromptResult(
        description=description,
        messages=[types.PromptMessage(role="user", content=types.TextContent(text=text))],
    )


async def _get_prompt(tools: _Tools, params: types.GetPromptRequestParams) -> types.GetPromptResult:
    arguments = params.arguments or {}
    if params.name == "submit":
        task = arguments.get("task", "").strip()
        if not task:
            raise MCPError(types.INVALID_PARAMS, "prompt submit: missing required argument 'task'")
        return _user_prompt(
            "Queue a task with tale",
            "Please queue this as a background task with tale's submit_task tool (text: the "
            "task below, unchanged), then tell me the task's id and that `tale status ID` "
            f"follows it.\n\nTask:\n{task}",
        )
    if params.name == "summarise":
        listed = await tools.list_tasks(ListTasksArgs(), Call(progress=_quiet))
        return _user_prompt(
            "Summarise my tale tasks",
            "Summarise my tale tasks for me: what finished (and its result in a line), what "
            "failed and why, and what is still queued, running or waiting for me. Here is "
            "the current list from tale's list_tasks tool, newest first:\n\n```json\n"
            f"{json.dumps(listed, indent=1)}\n```",
        )
    known = ", ".join(p.name for p in PROMPTS)
    raise MCPError(types.INVALID_PARAMS, f"unknown prompt {params.name!r}; prompts: {known}")


def build_server(services: Services) -> Server[Any]:
    """The MCP server with tale's tools, resources and prompts, ready to ``run`` on a
    stream pair (once per connection)."""
    tools = _Tools(services)
    sessions = _Sessions(services)
    listed = [tool.listed(name) for name, tool in TOOLS.items()]

    async def on_list_tools(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tool = TOOLS.get(params.name)
        if tool is None:
            # Not an execution error: the call names nothing, a protocol error.
            raise MCPError(
                InvalidInput.code,
                f"unknown tool {params.name!r}; tools: {', '.join(TOOLS)}",
            )
        session = _session_of(ctx)
        session.attach(ctx.session)
        started = time.perf_counter()
        try:
            result = await _call_tool(ctx, params.name, tool, params.arguments or {}, session)
        except TaleError as exc:
            session.log(
                "warning",
                {"tool": params.name, "code": exc.code, "message": exc.message},
                "taled.tools",
            )
            return _error_result(exc.code, exc.message)
        finally:
            services.metrics.time_tool(params.name, time.perf_counter() - started)
        return types.CallToolResult(
            content=[types.TextContent(text=json.dumps(result))],
            structured_content=result,
        )

    async def _call_tool(
        ctx: ServerRequestContext[Any],
        name: str,
        tool: ToolDef,
        arguments: dict[str, Any],
        session: _Session,
    ) -> dict[str, Any]:
        try:
            args = tool.args.model_validate(arguments)
        except ValidationError as exc:
            raise InvalidInput(_describe_validation(name, exc)) from None
        handler: Handler = getattr(tools, name)

        async def report(progress: float, message: str, total: float | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        async def elicit(message: str, schema: dict[str, Any]) -> types.ElicitResult:
            return await ctx.session.elicit_form(message, schema, ctx.request_id)

        # Every argument naming a task takes a unique prefix of its id, as `--after`,
        # approvals and schedules do: resolved here, once, so each tool sees a whole id.
        shortened = {
            field: value
            for field, kind in tool.args.id_kinds.items()
            if kind == "task"
            and isinstance(value := getattr(args, field), str)
            and len(value) < TASK_ID_DIGITS
        }
        if shortened:
            whole = {f: await services.store.task_id(v) for f, v in shortened.items()}
            args = args.model_copy(update=whole)
        if isinstance(args, TaskIdArgs) and name == "watch_task":
            session.tasks.add(args.id)
        call = Call(progress=_Rising(report), elicit=elicit if _can_elicit(ctx) else None)
        result = await handler(args, call)
        if name == "submit_task" and "attempts" in result:  # a task, not a schedule
            session.tasks.add(result["id"])
            sessions.changed(affected_by_move(result["id"]))
        return result

    async def on_list_resources(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=RESOURCES)

    async def on_list_resource_templates(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=TEMPLATES)

    async def read(uri: str) -> dict[str, Any]:
        try:
            return await _read_resource(tools, parse_uri(uri))
        except NotFound as exc:
            # What the SDK's own resource manager answers for a missing resource.
            raise MCPError(types.INVALID_PARAMS, exc.message, data={"uri": uri}) from None
        except TaleError as exc:
            raise MCPError(exc.code, exc.message) from None

    async def on_read_resource(
        _ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        text = json.dumps(await read(params.uri))
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=params.uri, mime_type="application/json", text=text)
            ]
        )

    async def on_subscribe(
        ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        await read(uri)  # a missing resource is refused as a read of it is
        if not subscribable(uri):
            raise MCPError(
                types.INVALID_PARAMS,
                f"{uri} cannot be subscribed to (schedules are not followed); read it "
                "again instead. Subscribable: task://{id}, tale://tasks, tale://dashboard",
                data={"uri": uri},
            )
        session = _session_of(ctx)
        session.subscribed.add(uri)
        if uri.startswith(TASK_URI):
            session.tasks.add(uri.removeprefix(TASK_URI))
        session.attach(ctx.session)
        return types.EmptyResult()

    async def on_unsubscribe(
        ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        _session_of(ctx).subscribed.discard(str(params.uri))
        return types.EmptyResult()

    async def on_set_level(
        ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        session = _session_of(ctx)
        session.level = params.level
        session.attach(ctx.session)
        return types.EmptyResult()

    async def on_list_prompts(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=PROMPTS)

    async def on_get_prompt(
        _ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        return await _get_prompt(tools, params)

    server: Server[Any] = Server(
        "taled",
        version=__version__,
        instructions="tale runs your tasks in the background on local models. "
        "submit_task queues one; get_task and list_tasks follow them.",
        lifespan=sessions.open,
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
        on_list_resources=on_list_resources,
        on_list_resource_templates=on_list_resource_templates,
        on_read_resource=on_read_resource,
        on_subscribe_resource=on_subscribe,
        on_unsubscribe_resource=on_unsubscribe,
        on_list_prompts=on_list_prompts,
        on_get_prompt=on_get_prompt,
    )
    # Registered here, not as on_set_logging_level: the constructor warns that logging
    # leaves the protocol in 2026-07-28; tale speaks 2025-11-25, where it is current.
    # The capability is declared from the handler all the same.
    server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, on_set_level)
    # The SDK wraps every request in an OpenTelemetry span by default; tale exports
    # no traces, and the no-op spans cost a measurable share of each request.
    server.middleware = []
    return server
