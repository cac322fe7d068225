"""The agent loop: the task model proposes tool calls, the policy decides, the tools run
in the task's workspace, their results go back, until the model finishes or the budget
(tool calls, wall time) runs out.

Exactly once, across crashes. Each step is checkpointed before the next one starts:

    model turn ──► ACT_TURN (calls proposed, none run)
    per call:  policy ──► deny ─────────────► TOOL_DONE (denied, reason to the model)
                      ──► ask ──► WAITING (approval stored; the task waits; a person answers)
                      ──► allow ─► TOOL_RUNNING ─► the tool runs ─► TOOL_DONE (result + tree)

A call found ``running`` in the newest checkpoint after a restart was cut off by the
daemon's death: it is reported to the model as interrupted (with a ``run`` call's output
so far) and never run again. A call whose result was checkpointed is never run again
either: the loop carries on from the checkpoint. Every TOOL_DONE checkpoint holds the
workspace's tree, so ``tale restore`` rewinds files and state together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from taled.checkpoints.repo import Checkpoint, CheckpointKind
from taled.db.acting import Approval, ApprovalKind, ApprovalState, NewApproval, ToolCallRecord
from taled.db.store import TaskRecord
from taled.errors import ContextOverflow, IllegalTransition, ModelError, NotFound
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.settings import AgentSettings
from taled.tasks.gates.redact import redact
from taled.tasks.workstate import AgentState, AttemptKey, ToolStep, WorkState
from taled.tools.base import ToolCall, ToolResult, ToolSpec, arguments_digest
from taled.tools.policy import command_of
from taled.tools.service import Acting
from taled.tools.workspace import Workspace

__all__ = [
    "SYSTEM_PROMPT",
    "AgentLoop",
    "CannotGoOn",
    "LoopParts",
    "Parked",
    "Stopped",
    "WorkspaceGone",
]

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are tale, a careful worker. You do the user's task in a workspace directory "
    "(your current directory) by calling tools: list_files, read_file, write_file, "
    "edit_file, search, run (a shell command). Paths are relative to the workspace. "
    "Work in small steps and check your work. When the task is done, call finish with "
    "a short summary of what you did. If the request is ambiguous, call ask_user."
)

# Older tool results shrink to this many characters once the history is too long.
_SHRUNK_CHARS = 300
# Turns whose tool results are always kept whole.
_RECENT_TURNS = 2
_REPEATED = (
    "(You made exactly this call just before, and it gave this same kind of result. "
    "Do something different, or call finish.)\n"
)
# Times a turn is sent again, its history shorter each time, when it does not fit.
_SQUEEZES = 3


class Parked(Exception):
    """The task waits for a person (an approval or an answer); the worker lets it go."""


class CannotGoOn(Exception):
    """The loop cannot go on: its budget (tool calls, wall time) is used up, the model
    failed, or the history no longer fits its context; the message says which."""


class WorkspaceGone(Exception):
    """The task's workspace was deleted underneath it: the loop cannot go on."""


class Stopped(Exception):
    """The task was paused or cancelled, or the daemon is stopping, during a tool call
    (the call was stopped; its checkpoint says running, so it resumes as interrupted)."""


ModelCall = Callable[[list[ChatMessage], list[ToolSpec], AttemptKey], Awaitable[Completion]]
Save = Callable[[WorkState, CheckpointKind, str, str], Awaitable[Checkpoint]]
Gate = Callable[[str, Workspace], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True)
class LoopParts:
    """What one task's loop acts with (the runner builds it per task)."""

    call_model: ModelCall
    save: Save
    gate: Gate
    """Whether a finish result passes the task's done-criteria (run: ones in the workspace)."""
    token: CancelToken


class AgentLoop:
    """Runs acting tasks' loops against the acting service."""

    def __init__(self, acting: Acting, settings: AgentSettings, *, max_gate_failures: int) -> None:
        self._acting = acting
        self._settings = settings
        self._max_gate_failures = max_gate_failures

    async def prepare(self, task: TaskRecord, ws: WorkState, save: Save) -> None:
        """Make the task's workspace and checkpoint it (the diff's left side)."""
        with self._acting.pinned():
            made = await self._acting.create_workspace(task.id, task.workspace)
            ws.agent = AgentState(
                workspace=str(made.workspace.root),
                base_tree=made.tree,
                tree=made.tree,
                source=task.workspace,
                git_dir=made.git_dir,
                branch=made.branch,
                git_base=made.git_base,
            )
            await save(ws, CheckpointKind.ACT_START, "workspace", f"working in {made.where}")

    async def prepare_step(
        self, task: TaskRecord, ws: WorkState, shared: AgentState, brief: str, save: Save
    ) -> None:
        """A planned step's loop works in its parent task's workspace: its diff starts
        from the workspace as the step finds it (hold the workspace's lock)."""
        try:
            workspace = self._acting.open_workspace(task.id, shared.workspace)
        except NotFound as exc:
            raise WorkspaceGone(exc.message) from None
        with self._acting.pinned():
            tree = await self._acting.snapshot(workspace)
            ws.agent = AgentState(
                workspace=shared.workspace,
                base_tree=tree,
                tree=tree,
                source=shared.source,
                brief=brief,
            )
            await save(ws, CheckpointKind.ACT_START, "workspace", "works in its task's workspace")

    async def run(self, task: TaskRecord, ws: WorkState, parts: LoopParts) -> str:
        """Carry the loop on from ``ws`` to the model's finish; returns its result.

        Raises Parked when a call waits for a person, CannotGoOn when the budget ends.
        """
        agent = ws.agent
        assert agent is not None
        try:
            workspace = self._acting.open_workspace(task.id, agent.workspace)
        except NotFound as exc:
            raise WorkspaceGone(exc.message) from None
        await self._recover(task, ws, workspace, parts)
        specs = self._acting.specs()
        while True:
            _still_there(task, workspace)
            # Calls proposed and not yet answered come first (a resumed task's, too).
            for step in agent.steps:
                if step.status in ("proposed", "awaiting"):
                    finished = await self._settle(task, ws, workspace, step, parts)
                    if finished is not None:
                        return finished
            self._check_budget(agent)
            if parts.token.cancelled:
                raise Stopped
            started = time.monotonic()
            turn = agent.turns + 1
            completion = await self._turn(task, agent, specs, AttemptKey("act", turn), parts)
            agent.seconds += time.monotonic() - started
            agent.turns = turn
            ws.tokens += completion.completion_tokens
            calls = completion.tool_calls
            if not calls:
                # A reply without a call is the model's final answer.
                calls = [ToolCall(id="", name="finish", arguments={"result": completion.text})]
            if completion.text.strip():
                agent.texts[str(turn)] = completion.text.strip()
            for i, call in enumerate(calls):
                # The loop's own id: unique in the task across restores (round) and turns.
                own = ToolCall(f"r{ws.round}t{turn}c{i + 1}", call.name, call.arguments, call.error)
                self._check_repeats(agent, own)
                agent.steps.append(ToolStep(call=own.as_json(), turn=turn))
            names = ", ".join(c.name for c in calls)
            await parts.save(ws, CheckpointKind.ACT_TURN, f"turn {turn}", f"proposed: {names}")

    async def _turn(
        self,
        task: TaskRecord,
        agent: AgentState,
        specs: list[ToolSpec],
        key: AttemptKey,
        parts: LoopParts,
    ) -> Completion:
        """One model turn; a history too long for the model's context is squeezed (older
        results shortened, then older turns left out) and sent again."""
        for squeeze in range(_SQUEEZES + 1):
            try:
                return await parts.call_model(self.messages(task, agent, squeeze), specs, key)
            except ContextOverflow as exc:
                log.info("task %s: %s; squeezing its history (%d)", task.id, exc.message, squeeze)
                last = exc.message
            except ModelError as exc:
                raise CannotGoOn(f"the model failed: {exc.message}") from None
        raise CannotGoOn(
            f"the task's history no longer fits the model's context, even squeezed ({last})"
        )

    # -- one call ----------------------------------------------------------

    async def _settle(
        self,
        task: TaskRecord,
        ws: WorkState,
        workspace: Workspace,
        step: ToolStep,
        parts: LoopParts,
    ) -> str | None:
        """Decide and run one proposed call; its result is checkpointed. Returns the task's
        result when the call was an accepted finish."""
        agent = ws.agent
        assert agent is not None
        call = ToolCall.from_json(step.call)
        problem = self._acting.check(call)
        if problem is not None:
            await self._done(
                ws, workspace, step, ToolResult(problem, is_error=True), parts, "error"
            )
            return None
        if call.name == "finish":
            return await self._finish(task, ws, workspace, step, call, parts)
        if call.name == "ask_user":
            await self._ask_user(task, ws, workspace, step, call, parts)
            return None
        server = self._acting.server_of(call.name)
        verdict = (await self._acting.policy()).decide(call, server)
        step.rule = verdict.rule
        if verdict.decision == "deny":
            result = ToolResult(
                f"refused: the permission policy denies this call (rule {verdict.rule}). "
                "Do it another way, or finish and say what you could not do.",
                is_error=True,
            )
            await self._done(ws, workspace, step, result, parts, "denied")
            return None
        if verdict.decision == "ask":
            approval = await self._answer(
                ws, step, call, ApprovalKind.TOOL, _summary(call), verdict.always, parts
            )
            if approval.state != ApprovalState.APPROVED:
                why = f": {approval.reason}" if approval.reason else ""
                result = ToolResult(f"the person denied this call{why}", is_error=True)
                await self._done(ws, workspace, step, result, parts, "denied")
                return None
        await self._execute(task, ws, workspace, step, call, parts)
        return None

    async def _execute(
        self,
        task: TaskRecord,
        ws: WorkState,
        workspace: Workspace,
        step: ToolStep,
        call: ToolCall,
        parts: LoopParts,
    ) -> None:
        step.status = "running"
        if call.name == "run":
            step.output_file = str(self._acting.output_file(task.id, call.id))
        # The intent is durable before the tool starts: after a crash this call is
        # reported interrupted, never run a second time.
        await parts.save(ws, CheckpointKind.TOOL_RUNNING, call.name, _summary(call))
        started = time.monotonic()
        runner = asyncio.create_task(self._acting.run(task.id, workspace, call))
        stopper = asyncio.create_task(_until_cancelled(parts.token))
        try:
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if runner not in done:
            # Paused, cancelled or the daemon stopping: stop the tool; the checkpoint
            # says running, so the resumed task reports the call interrupted.
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            raise Stopped
        result = runner.result()
        step.duration_ms = (time.monotonic() - started) * 1000
        ws.agent.seconds += step.duration_ms / 1000  # type: ignore[union-attr]
        await self._done(ws, workspace, step, result, parts, "error" if result.is_error else "ok")
        return None

    async def _finish(
        self,
        task: TaskRecord,
        ws: WorkState,
        workspace: Workspace,
        step: ToolStep,
        call: ToolCall,
        parts: LoopParts,
    ) -> str | None:
        agent = ws.agent
        assert agent is not None
        text = str(call.arguments.get("result", "")).strip()
        passed, feedback = await parts.gate(text, workspace)
        if passed:
            step.status, step.result = "done", "accepted"
            ws.result = text or "done"
            await self._record(task.id, step, "ok")
            return ws.result
        agent.gate_failures += 1
        if agent.gate_failures >= self._max_gate_failures:
            raise CannotGoOn(
                f"the result failed its done-criteria {agent.gate_failures} times; "
                f"last: {feedback[:300]}"
            )
        result = ToolResult(f"not done yet: {feedback}", is_error=True)
        await self._done(ws, workspace, step, result, parts, "error")
        return None

    async def _ask_user(
        self,
        task: TaskRecord,
        ws: WorkState,
        workspace: Workspace,
        step: ToolStep,
        call: ToolCall,
        parts: LoopParts,
    ) -> None:
        question = str(call.arguments.get("question", "")).strip() or "(no question given)"
        approval = await self._answer(
            ws, step, call, ApprovalKind.QUESTION, question[:500], None, parts
        )
        if approval.state == ApprovalState.ANSWERED:
            result = ToolResult(f"the person answered: {approval.reason or ''}")
        else:
            why = f": {approval.reason}" if approval.reason else ""
            result = ToolResult(f"the person did not answer{why}; decide yourself", is_error=True)
        await self._done(ws, workspace, step, result, parts, "ok")
        return None

    async def _answer(
        self,
        ws: WorkState,
        step: ToolStep,
        call: ToolCall,
        kind: ApprovalKind,
        summary: str,
        rule: str | None,
        parts: LoopParts,
    ) -> Approval:
        """A person's decided answer about ``call``; until there is one, the task waits
        for it (Parked)."""
        approval = await self._acting.records.for_call(ws.task_id, call.id)
        if approval is not None and approval.state != ApprovalState.PENDING:
            return approval
        new = NewApproval(
            task_id=ws.task_id,
            call_id=call.id,
            kind=kind,
            tool=call.name,
            arguments=call.arguments,
            summary=summary,
            rule=rule,
        )
        await self._park(ws, step, new, parts)
        raise AssertionError("unreachable: _park raises")

    async def _park(
        self, ws: WorkState, step: ToolStep, new: NewApproval, parts: LoopParts
    ) -> None:
        """Store the approval, checkpoint the call as awaiting, and move the task to waiting."""
        step.status = "awaiting"
        await parts.save(ws, CheckpointKind.WAITING, new.tool, f"waits for a person: {new.summary}")
        what = "an answer" if new.kind == ApprovalKind.QUESTION else "approval"
        try:
            approval = await self._acting.records.ask(
                new, f"waiting for {what}: {new.summary[:200]}"
            )
        except IllegalTransition as exc:
            log.info("task %s not parked: %s", ws.task_id, exc.message)
            raise Stopped from None
        step.approval = approval.id
        raise Parked(approval.id)

    async def _done(
        self,
        ws: WorkState,
        workspace: Workspace,
        step: ToolStep,
        result: ToolResult,
        parts: LoopParts,
        outcome: str,
    ) -> None:
        """Checkpoint a call's result with the workspace's tree; then the ledger row."""
        agent = ws.agent
        assert agent is not None
        step.status = "denied" if outcome == "denied" else "done"
        # What a tool read or printed may hold the user's secrets (a .env, a key in a
        # log), and the model may run elsewhere: credentials go out before it sees it.
        step.result = _cut(redact(result.content), self._settings.result_chars)
        if self._settings.max_repeats and self._repeated(agent, step):
            step.result = _REPEATED + step.result
        step.is_error = result.is_error
        call = ToolCall.from_json(step.call)
        verdict = "failed" if result.is_error else "done"
        _still_there(ws.task_id, workspace)
        with self._acting.pinned():
            agent.tree = await self._acting.snapshot(workspace)
            await parts.save(
                ws, CheckpointKind.TOOL_DONE, call.name, f"{_summary(call)}: {verdict}"
            )
        await self._record(ws.task_id, step, outcome)
        return None

    async def _record(self, task_id: str, step: ToolStep, outcome: str) -> None:
        call = ToolCall.from_json(step.call)
        await self._acting.records.record_call(
            ToolCallRecord(
                task_id=task_id,
                call_id=call.id,
                tool=call.name,
                digest=arguments_digest(call.arguments),
                outcome=outcome,
                duration_ms=step.duration_ms,
                # A person reads the tool's own result, not the nudge the loop put in
                # front of it for the model.
                detail=step.result.removeprefix(_REPEATED)[:200] if step.is_error else None,
            )
        )

    # -- after a restart ---------------------------------------------------

    async def _recover(
        self, task: TaskRecord, ws: WorkState, workspace: Workspace, parts: LoopParts
    ) -> None:
        """Report calls a crash cut off as interrupted; fill in missing ledger rows."""
        agent = ws.agent
        assert agent is not None
        for step in agent.steps:
            if step.status != "running":
                continue
            call = ToolCall.from_json(step.call)
            text = (
                "interrupted: tale stopped while this call was running. It was NOT run "
                "again; whatever it changed is in the workspace as it was left. Check "
                "before you repeat it."
            )
            if call.name == "run":
                so_far = self._acting.partial_output(task.id, call.id)
                text += f"\nOutput so far:\n{so_far}" if so_far else "\nIt had printed nothing."
            log.warning(
                "task %s: call %s (%s) was interrupted by a restart", task.id, call.id, call.name
            )
            await self._done(
                ws, workspace, step, ToolResult(text, is_error=True), parts, "interrupted"
            )
        recorded = {r.call_id for r in await self._acting.records.calls(task.id)}
        for step in agent.steps:
            call_id = str(step.call.get("id"))
            if step.status in ("done", "denied") and call_id not in recorded:
                outcome = (
                    "denied" if step.status == "denied" else ("error" if step.is_error else "ok")
                )
                await self._record(task.id, step, outcome)

    # -- budget and messages -----------------------------------------------

    def _check_repeats(self, agent: AgentState, call: ToolCall) -> None:
        """CannotGoOn when ``call`` would be the same call ``max_repeats`` times in a row."""
        limit = self._settings.max_repeats
        if not limit or call.name in ("finish", "ask_user"):
            return
        same = 1
        for step in reversed(agent.steps):
            earlier = ToolCall.from_json(step.call)
            if (earlier.name, earlier.arguments) != (call.name, call.arguments):
                break
            same += 1
        if same >= limit:
            raise CannotGoOn(
                f"the model proposed the same call ({_summary(call)}) {same} times in a row "
                f"(tools.agent.max_repeats = {limit}); stopped"
            )

    def _repeated(self, agent: AgentState, step: ToolStep) -> bool:
        """Whether ``step``'s call is the same as the one just before it."""
        at = agent.steps.index(step)
        if at == 0:
            return False
        before = agent.steps[at - 1]
        return (before.call.get("name"), before.call.get("arguments")) == (
            step.call.get("name"),
            step.call.get("arguments"),
        )

    def _check_budget(self, agent: AgentState) -> None:
        if len(agent.steps) >= self._settings.max_steps:
            raise CannotGoOn(
                f"stopped after {len(agent.steps)} tool calls (tools.agent.max_steps = "
                f"{self._settings.max_steps}) without finishing; its work so far is in "
                "the workspace (`tale diff`)"
            )
        if agent.seconds >= self._settings.wall_seconds:
            raise CannotGoOn(
                f"stopped after {agent.seconds:.0f} s in the loop (tools.agent.wall_seconds "
                f"= {self._settings.wall_seconds:g}) without finishing"
            )

    def messages(self, task: TaskRecord, agent: AgentState, squeeze: int = 0) -> list[ChatMessage]:
        """The conversation the model reads: the task, then each turn's calls and results.

        Older results shrink when the whole would pass tools.agent.history_chars, so a
        long loop still fits a small model's context. ``squeeze`` (after the model said
        the prompt is too long) halves that budget each time, and from 2 on keeps only
        the newest turns.
        """
        where = (
            f"The workspace is a copy of {agent.source}."
            if agent.source
            else "The workspace starts empty."
        )
        asked = f"{task.text}\n\n({where})"
        if agent.brief and task.parent_id is not None:
            # A step's instruction comes first, read with its place in the whole task.
            asked = f"{asked}\n\n{agent.brief}"
        messages: list[ChatMessage] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": asked},
        ]
        if agent.brief and task.parent_id is None:
            # The planned task's check: a new instruction after the steps' work.
            messages.append({"role": "user", "content": agent.brief})
        total = sum(len(s.result) for s in agent.steps)
        budget = self._settings.history_chars >> squeeze
        last_turn = agent.turns
        first = 1 if squeeze < 2 else max(1, last_turn - (_RECENT_TURNS >> (squeeze - 2)) + 1)
        for turn in range(first, agent.turns + 1):
            # Only answered calls: a backend refuses a call listed without its result.
            steps = [s for s in agent.steps if s.turn == turn and s.status in ("done", "denied")]
            if not steps:
                continue
            messages.append(
                {
                    "role": "assistant",
                    "content": agent.texts.get(str(turn), ""),
                    "tool_calls": [s.call for s in steps],
                }
            )
            for s in steps:
                content = s.result
                older = turn <= last_turn - _RECENT_TURNS or squeeze >= _SQUEEZES
                if total > budget and older and len(content) > _SHRUNK_CHARS:
                    total -= len(content) - _SHRUNK_CHARS
                    content = content[:_SHRUNK_CHARS] + " [... shortened ...]"
                messages.append(
                    {
                        "role": "tool",
                        "content": content,
                        "tool_call_id": str(s.call["id"]),
                        "name": str(s.call["name"]),
                    }
                )
        return messages


def _still_there(task: TaskRecord | str, workspace: Workspace) -> None:
    """WorkspaceGone unless the workspace directory still exists."""
    if not workspace.root.is_dir():
        task_id = task if isinstance(task, str) else task.id
        raise WorkspaceGone(
            f"the workspace of task {task_id} ({workspace.root}) is gone: it was deleted "
            "while the task used it"
        )


async def _until_cancelled(token: CancelToken) -> None:
    while not token.cancelled:
        await asyncio.sleep(0.1)


def _summary(call: ToolCall) -> str:
    """One line a person reads for a call: ``run: pytest -q``, ``write_file: a.py``."""
    if call.name == "run":
        return f"run: {command_of(call)}"[:300]
    path = call.arguments.get("path")
    if isinstance(path, str):
        return f"{call.name}: {path}"[:300]
    args = json.dumps(call.arguments, ensure_ascii=False, sort_keys=True)
    return f"{call.name} {args}"[:300]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"
