"""The MCP surface: tool schemas, argument validation and dispatch.

Tool arguments are validated here against pydantic models whose JSON Schemas are
what ``tools/list`` publishes, so the schema a client sees is the one enforced.
This module is also the one place where a ``TaleError`` becomes a JSON-RPC error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taled import __version__
from taled.chat.conversations import Conversation, Message
from taled.chat.intent import Intent
from taled.chat.service import ChatService, Turn
from taled.checkpoints.repo import Checkpoint, CheckpointStore
from taled.daemon.elicitation import Asker, Elicit
from taled.daemon.resources import RESOURCES, TEMPLATES, ResourceKind, ResourceRef, parse_uri
from taled.db.acting import Approval, ApprovalState
from taled.db.schedules import MissedPolicy, Schedule, ScheduleRun, ScheduleState
from taled.db.store import Store, TaskRecord
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

__all__ = ["TOOLS", "Call", "build_server", "task_to_json"]

log = logging.getLogger(__name__)

TASK_ID_PATTERN = r"^[0-9a-f]{12}$"
# watch_task repeats an unchanged line this often (clients time out reads at 30 s).
_HEARTBEAT_SECONDS = 10.0


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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

    id: str = Field(pattern=TASK_ID_PATTERN, description="A task id: 12 lowercase hex digits.")


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

    id: str = Field(
        pattern=r"^[0-9a-f]{4,12}$",
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
    pattern=r"^[0-9a-f]{4,12}$",
    description="An approval's id, or a unique prefix of at least 4 of its hex digits.",
)


class ApprovalsArgs(_Args):
    """Which approvals to list."""

    task: str | None = Field(
        default=None, pattern=TASK_ID_PATTERN, description="Only this task's (12 hex digits)."
    )


class ApproveArgs(_Args):
    """An approval to grant."""

    id: str = APPROVAL_ID
    always: bool | None = Field(
        default=None,
        description="Also allow calls like it from now on (adds its rule, e.g. run:pytest).",
    )


class DenyArgs(_Args):
    """An approval to refuse, and why (the model reads the reason)."""

    id: str = APPROVAL_ID
    reason: str | None = Field(
        default=None, max_length=2000, description="Why, or what to do instead; sent to the model."
    )
    always: bool | None = Field(
        default=None, description="Also deny calls like it from now on (adds its rule)."
    )


class AnswerArgs(_Args):
    """The answer to a task's question (its model called ask_user)."""

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

    text: str = Field(min_length=1, description="What you say: 1..4,000 characters once trimmed.")
    conversation: str | None = CONVERSATION_ID
    new: bool = Field(default=False, description="Start a new conversation with this message.")


class DetectIntentArgs(_Args):
    """A message whose intent to read, without acting on it."""

    text: str = Field(min_length=1, description="A chat message: 1..4,000 characters once trimmed.")


class ConversationArgs(_Args):
    """Arguments naming one conversation."""

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


def task_to_json(task: TaskRecord, progress: Progress | None = None) -> dict[str, Any]:
    """The wire form of a task (the CLI's --json contract)."""
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


class _Tools:
    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        status: StatusProvider,
        models: StatusProvider,
        chat: ChatService,
        runner: Runner,
        checkpoints: CheckpointStore,
        progress: ProgressHub,
        metrics: Metrics,
        max_list_limit: int,
        list_limit: int,
        conversation_limit: int,
        stream_interval: float,
        usage_report: UsageReport,
        acting: Acting,
        schedules: Schedules,
        schedule_limit: int = 100,
    ) -> None:
        self.acting = acting
        self.schedules = schedules
        self.schedule_limit = schedule_limit
        self.runner = runner
        self.metrics_service = metrics
        self.usage_report = usage_report
        self.conversation_limit = conversation_limit
        self.checkpoints = checkpoints
        self.progress = progress
        self.store = store
        self.queue = queue
        self.status = status
        self.models = models
        self.chat_service = chat
        self.stream_interval = stream_interval
        self.max_list_limit = max_list_limit
        self.list_limit = list_limit

    async def submit_task(self, args: SubmitTaskArgs, _call: Call) -> dict[str, Any]:
        if args.at is not None or args.every is not None:
            if args.after or args.after_any:
                raise InvalidInput("after goes with a task that runs now, not with at or every")
            return await self._schedule(args)
        if args.timezone is not None or args.missed is not None:
            raise InvalidInput("timezone and missed go with at or every (a schedule)")
        task = await self.queue.submit(
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
        fields = self.queue.check(
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
        return schedule_to_json(await self.schedules.create(request))

    # -- schedules ---------------------------------------------------------

    async def list_schedules(self, args: ListSchedulesArgs, _call: Call) -> dict[str, Any]:
        limit = args.limit if args.limit is not None else self.schedule_limit
        state = None if args.state is None else ScheduleState(args.state)
        found = await self.schedules.records.find(state, limit)
        return {"schedules": [schedule_to_json(s) for s in found]}

    async def get_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        found = await self.schedules.records.get(args.id)
        runs = await self.schedules.records.runs(found.id, self.schedule_limit)
        return {**schedule_to_json(found), "history": [_schedule_run_json(r) for r in runs]}

    async def pause_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return schedule_to_json(await self.schedules.pause(args.id))

    async def resume_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return schedule_to_json(await self.schedules.resume(args.id))

    async def delete_schedule(self, args: ScheduleIdArgs, _call: Call) -> dict[str, Any]:
        return {**schedule_to_json(await self.schedules.delete(args.id)), "deleted": True}

    # -- acting ------------------------------------------------------------

    async def list_approvals(self, args: ApprovalsArgs, _call: Call) -> dict[str, Any]:
        return {"approvals": [approval_to_json(a) for a in await self.acting.pending(args.task)]}

    async def approve(self, args: ApproveArgs, _call: Call) -> dict[str, Any]:
        decided = await self.acting.decide(
            args.id, ApprovalState.APPROVED, None, always=bool(args.always)
        )
        self.queue.wake()
        return approval_to_json(decided)

    async def deny(self, args: DenyArgs, _call: Call) -> dict[str, Any]:
        decided = await self.acting.decide(
            args.id, ApprovalState.DENIED, args.reason, always=bool(args.always)
        )
        self.queue.wake()
        return approval_to_json(decided)

    async def answer(self, args: AnswerArgs, _call: Call) -> dict[str, Any]:
        decided = await self.acting.decide(args.id, ApprovalState.ANSWERED, args.text)
        self.queue.wake()
        return approval_to_json(decided)

    async def _view(self, task_id: str) -> tuple[TaskRecord, WorkspaceView]:
        task = await self.store.get_task(task_id)
        latest = await self.checkpoints.latest(task_id)
        ws = None if latest is None else WorkState.from_json(await self.checkpoints.load(task_id))
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
            "diff": await self.acting.diff(view),
        }

    async def apply_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        task, view = await self._view(args.id)
        if task.state in (TaskState.RUNNING, TaskState.QUEUED):
            raise IllegalTransition(
                f"task {task.id} is {task.state}; its workspace is still changing "
                f"(`tale pause {task.id}` first, or wait for it)"
            )
        report = await self.acting.apply(view)
        return {
            "task_id": task.id,
            "target": str(view.source),
            "applied": [{"path": c.path, "kind": c.kind.value} for c in report.applied],
            "unchanged": [{"path": c.path, "kind": c.kind.value} for c in report.unchanged],
        }

    async def list_tools(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.acting.status()

    async def get_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return await self._tree(await self.store.get_task(args.id))

    async def _tree(self, task: TaskRecord) -> dict[str, Any]:
        """A task with its progress and, recursively, its subtasks (current plan round)."""
        out = task_to_json(task, self.progress.get(task.id))
        if task.parent_id is None:
            # The learning engine's estimate, from memory (no query): level, tokens, budget.
            out["estimate"] = self.runner.estimate(task.id)
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
                for c in await self.acting.records.calls(task.id)
            ]
            out["approvals"] = [approval_to_json(a) for a in await self.acting.pending(task.id)]
        out["subtasks"] = [
            await self._tree(child) for child in await self.store.children(task.id, task.round)
        ]
        return out

    async def watch_task(self, args: TaskIdArgs, call: Call) -> dict[str, Any]:
        # With a client that can show forms, what the task waits for is also asked
        # there, in the background: progress lines keep flowing while the person thinks.
        asker = None if call.elicit is None else Asker(call.elicit, self.acting, self.queue.wake)
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
            task = await self.store.get_task(task_id)
            progress = self.progress.get(task.id)
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
                asked = await self.acting.pending(task.id)
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
                return await self._tree(task)
            seen = await self.progress.wait_change(seen, 1.0)
            await asyncio.sleep(self.stream_interval)

    async def list_checkpoints(self, args: CheckpointsArgs, _call: Call) -> dict[str, Any]:
        await self.store.get_task(args.id)  # NotFound for an unknown task
        found = await self.checkpoints.list(args.id, args.limit)
        return {"task_id": args.id, "checkpoints": [_checkpoint_json(c) for c in found]}

    async def restore_checkpoint(self, args: RestoreArgs, _call: Call) -> dict[str, Any]:
        task, saved = await self.runner.restore(args.id, args.commit)
        return {"task": task_to_json(task), "checkpoint": _checkpoint_json(saved)}

    async def list_tasks(self, args: ListTasksArgs, _call: Call) -> dict[str, Any]:
        limit = args.limit if args.limit is not None else self.list_limit
        if limit > self.max_list_limit:
            raise InvalidInput(f"limit {limit} is above the maximum of {self.max_list_limit}")
        state = TaskState(args.state) if args.state else None
        tasks = await self.store.list_tasks(state, limit)
        return {"tasks": [task_to_json(t) for t in tasks]}

    async def cancel_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.queue.cancel(args.id))

    async def pause_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.queue.pause(args.id))

    async def resume_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.queue.resume(args.id))

    async def set_priority(self, args: SetPriorityArgs, _call: Call) -> dict[str, Any]:
        return task_to_json(await self.queue.set_priority(args.id, args.priority))

    async def usage(self, args: UsageArgs, _call: Call) -> dict[str, Any]:
        return await self.usage_report.report(args.days, args.top)

    async def daemon_status(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.status()

    async def models_status(self, _args: NoArgs, _call: Call) -> dict[str, Any]:
        return await self.models()

    async def chat(self, args: ChatArgs, call: Call) -> dict[str, Any]:
        # One notification per token costs more than the token (~0.6 ms each here):
        # pieces are gathered and sent at most every stream_interval, the first at once.
        interval = self.stream_interval
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

        turn = await self.chat_service.turn(
            args.text, on_text, conversation=args.conversation, new=args.new
        )
        await flush()
        return _turn_json(turn)

    async def detect_intent(self, args: DetectIntentArgs, _call: Call) -> dict[str, Any]:
        return _intent_json(await self.chat_service.detect(self.chat_service.validate(args.text)))

    async def list_conversations(self, args: ListConversationsArgs, _call: Call) -> dict[str, Any]:
        found = await self.chat_service.conversations.recent(args.limit or self.conversation_limit)
        return {"conversations": [_conversation_json(c) for c in found]}

    async def get_conversation(self, args: ConversationArgs, _call: Call) -> dict[str, Any]:
        conversations = self.chat_service.conversations
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
        return await self.metrics_service.snapshot()

    # -- forgetting ----------------------------------------------------------

    forgetting: Forgetting
    """Set by build_server."""

    async def delete_task(self, args: TaskIdArgs, _call: Call) -> dict[str, Any]:
        return await self.forgetting.delete(args.id)

    async def purge_tasks(self, args: PurgeTasksArgs, _call: Call) -> dict[str, Any]:
        return await self.forgetting.purge(args.older_than, dry_run=args.dry_run)


# name -> (argument model, description)
TOOLS: dict[str, tuple[type[_Args], str]] = {
    "submit_task": (
        SubmitTaskArgs,
        "Queue a task for the task model. Returns the task (with its id) as soon as it is "
        "stored. With at or every it is scheduled instead: the schedule is returned (id, "
        "kind, next_run in UTC and next_run_local in its timezone), and each run is a task "
        "of its own with schedule_id set.",
    ),
    "list_schedules": (
        ListSchedulesArgs,
        "Schedules: active ones by next run, then paused, then done; each with its "
        "expression, cron, timezone, next run, runs and missed runs.",
    ),
    "get_schedule": (
        ScheduleIdArgs,
        "One schedule, with the history of its due times newest first: ran, caught_up "
        "(one run for times missed while the daemon was down) or skipped, with the task "
        "each created.",
    ),
    "pause_schedule": (ScheduleIdArgs, "Stop an active schedule from running until resumed."),
    "resume_schedule": (
        ScheduleIdArgs,
        "Make a paused schedule active again from its next time after now (times that "
        "passed while paused are not run).",
    ),
    "delete_schedule": (
        ScheduleIdArgs,
        "Delete a schedule; the tasks it already created stay (no longer linked).",
    ),
    "get_task": (
        TaskIdArgs,
        "One task: state, priority, result, transitions, tokens, live progress and its "
        "subtasks (the same, recursively).",
    ),
    "watch_task": (
        TaskIdArgs,
        "Follow a task until it ends, then return it. With a progress token, each change "
        "of state or progress (step i of n, tokens, elapsed, ETA) is a progress notification. "
        "A client that declared elicitation is asked, as a form, about each tool call the "
        "task waits to have approved and each question its model asks; declining leaves it "
        "to the approve, deny and answer tools.",
    ),
    "list_checkpoints": (
        CheckpointsArgs,
        "A task's checkpoints, newest first: commit, time, step, kind and message.",
    ),
    "restore_checkpoint": (
        RestoreArgs,
        "Rewind a paused or failed task to one of its checkpoints and queue it again; "
        "finished steps in that checkpoint are not run again.",
    ),
    "list_tasks": (ListTasksArgs, "Tasks, newest first, optionally filtered by state."),
    "list_approvals": (
        ApprovalsArgs,
        "What acting tasks wait for: tool calls their policy says to ask about, and their "
        "models' questions, oldest first, each with its id, task, tool and summary.",
    ),
    "approve": (ApproveArgs, "Let a waiting tool call run; the task goes on."),
    "deny": (DenyArgs, "Refuse a waiting tool call; the reason goes to the task's model."),
    "answer": (AnswerArgs, "Answer a task's question (its model asked with ask_user)."),
    "task_diff": (
        TaskIdArgs,
        "What an acting task changed in its workspace, as a unified diff against the "
        "directory it started from.",
    ),
    "apply_task": (
        TaskIdArgs,
        "Bring an acting task's change into the directory it was given; refused whole, "
        "naming the files, when any of them changed there since the task copied it.",
    ),
    "list_tools": (
        NoArgs,
        "The tools tasks may use: the built-ins with their permission rule, and the "
        "configured MCP servers with their state and tools.",
    ),
    "cancel_task": (
        TaskIdArgs,
        "Cancel a task that has not finished; a running model call is stopped.",
    ),
    "pause_task": (
        TaskIdArgs,
        "Pause a queued, running or waiting task; a running model call is stopped and the "
        "partial answer is checkpointed and continued on resume.",
    ),
    "resume_task": (TaskIdArgs, "Put a paused task back in the queue."),
    "set_priority": (
        SetPriorityArgs,
        "Change an unfinished task's priority (0..100, higher runs first).",
    ),
    "usage": (
        UsageArgs,
        "The usage report: tokens (calls, prompt, completion, failures) overall and by model, "
        "role, route, day, top task (subtasks folded in), complexity and top conversation; "
        "budget prediction error (MAPE by day and as a learning curve) and truncation rate; "
        "savings (summaries, turns answered from the store, tasks routed to the UX model, and "
        "an estimate against a naive single-model design, with its method); recorded "
        "performance-target violations.",
    ),
    "chat": (
        ChatArgs,
        "One turn of a conversation with the UX agent (the most recent conversation unless "
        "one is named or new is true). A request for work is queued as a task and the reply "
        "names it; a vague one gets a clarifying question; questions about your tasks are "
        "answered from the store. With a progress token, the reply streams as "
        "notifications/progress whose message is the next piece of text.",
    ),
    "detect_intent": (
        DetectIntentArgs,
        "How the agent would read a message (chat, task or unclear, with confidence, the "
        "signals that fired and the UX model's vote), without acting on it.",
    ),
    "list_conversations": (
        ListConversationsArgs,
        "Conversations, most recently active first: id, title, times, message count.",
    ),
    "get_conversation": (
        ConversationArgs,
        "One conversation: its messages (with the task each handed off), and the summary "
        "its older part was folded into.",
    ),
    "metrics": (
        NoArgs,
        "Live metrics: tokens per minute per model, latencies against the spec's targets, "
        "queue depth and recent target violations with their context (live, from the "
        "window), and the newest violations the monitor recorded (kept across restarts).",
    ),
    "models_status": (
        NoArgs,
        "The model pool: each role's and optional model's backend, model, pinned, loaded, "
        "health, who serves a role that is down, memory, calls and tokens since start, "
        "reloads, evictions, last error.",
    ),
    "daemon_status": (
        NoArgs,
        "The daemon: version, pid, uptime, models, workers, tasks by state, and the "
        "learning engine (its embeddings' model, state, lookups and bm25 fallbacks).",
    ),
    "delete_task": (
        TaskIdArgs,
        "Forget a finished top-level task and its subtasks everywhere: its text, result, "
        "history, checkpoints (and their objects), workspace, run outputs, git worktree "
        "branch, the conversation turns that submitted or named it and the learning "
        "engine's copy; the database and its backups are rewritten without it. Token counts "
        "stay in the ledger, anonymous, so usage totals do not change. A live task is "
        "refused (cancel it first); a second delete of the same id is NotFound.",
    ),
    "purge_tasks": (
        PurgeTasksArgs,
        "Forget, as delete_task does, every finished top-level task last updated longer "
        "ago than older_than; dry_run only lists them. Returns the tasks (with their text "
        "on a dry run) and any skipped, with why.",
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
            allowed = ", ".join(TOOLS[tool][0].model_fields) or "none"
            parts.append(f"unknown argument {field!r} (allowed: {allowed})")
        elif err["type"] == "string_too_short" and field == "text":
            parts.append(
                "chat message is empty; say something"
                if tool == "chat"
                else "task text is empty; say what you want done"
            )
        elif err["type"] == "missing":
            parts.append(f"missing required argument {field!r}")
        elif err["type"] == "string_pattern_mismatch" and field == "id" and "schedule" in tool:
            parts.append(
                f"{err['input']!r} is not a schedule id (4 to 12 lowercase hex digits, as "
                "`tale schedules` shows)"
            )
        elif err["type"] == "string_pattern_mismatch" and field == "id":
            parts.append(
                f"{err['input']!r} is not a task id (12 lowercase hex digits, as `tale list` shows)"
            )
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


def build_server(
    store: Store,
    queue: TaskQueue,
    status: StatusProvider,
    models: StatusProvider,
    chat: ChatService,
    runner: Runner,
    checkpoints: CheckpointStore,
    progress: ProgressHub,
    metrics: Metrics,
    *,
    list_limit: int,
    max_list_limit: int,
    conversation_limit: int,
    stream_interval: float,
    usage: UsageReport,
    acting: Acting,
    forgetting: Forgetting,
    schedules: Schedules,
    schedule_limit: int = 100,
) -> Server[Any]:
    """The MCP server with tale's tools, ready to ``run`` on a stream pair."""
    tools = _Tools(
        store,
        queue,
        status,
        models,
        chat,
        runner,
        checkpoints,
        progress,
        metrics,
        max_list_limit=max_list_limit,
        list_limit=list_limit,
        conversation_limit=conversation_limit,
        stream_interval=stream_interval,
        usage_report=usage,
        acting=acting,
        schedules=schedules,
        schedule_limit=schedule_limit,
    )
    tools.forgetting = forgetting
    listed = [
        types.Tool(name=name, description=desc, input_schema=_schema(model))
        for name, (model, desc) in TOOLS.items()
    ]

    async def on_list_tools(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        entry = TOOLS.get(params.name)
        if entry is None:
            raise MCPError(
                InvalidInput.code,
                f"unknown tool {params.name!r}; tools: {', '.join(TOOLS)}",
            )
        model, _ = entry
        try:
            args = model.model_validate(params.arguments or {})
        except ValidationError as exc:
            raise MCPError(InvalidInput.code, _describe_validation(params.name, exc)) from None
        handler: Handler = getattr(tools, params.name)

        async def report(progress: float, message: str, total: float | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        async def elicit(message: str, schema: dict[str, Any]) -> types.ElicitResult:
            return await ctx.session.elicit_form(message, schema, ctx.request_id)

        call = Call(progress=report, elicit=elicit if _can_elicit(ctx) else None)
        started = time.perf_counter()
        try:
            result = await handler(args, call)
        except TaleError as exc:
            raise MCPError(exc.code, exc.message) from None
        finally:
            metrics.time_tool(params.name, time.perf_counter() - started)
        return types.CallToolResult(
            content=[types.TextContent(text=json.dumps(result))],
            structured_content=result,
        )

    async def on_list_resources(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=RESOURCES)

    async def on_list_resource_templates(
        _ctx: ServerRequestContext[Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=TEMPLATES)

    async def on_read_resource(
        _ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        try:
            found = await _read_resource(tools, parse_uri(params.uri))
        except NotFound as exc:
            # What the SDK's own resource manager answers for a missing resource.
            raise MCPError(types.INVALID_PARAMS, exc.message, data={"uri": params.uri}) from None
        except TaleError as exc:
            raise MCPError(exc.code, exc.message) from None
        text = json.dumps(found)
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=params.uri, mime_type="application/json", text=text)
            ]
        )

    server: Server[Any] = Server(
        "taled",
        version=__version__,
        instructions="tale runs your tasks in the background on local models. "
        "submit_task queues one; get_task and list_tasks follow them.",
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
        on_list_resources=on_list_resources,
        on_list_resource_templates=on_list_resource_templates,
        on_read_resource=on_read_resource,
    )
    # The SDK wraps every request in an OpenTelemetry span by default; tale exports
    # no traces, and the no-op spans cost a measurable share of each request.
    server.middleware = []
    return server
