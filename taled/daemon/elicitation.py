"""Asking the person through their MCP client (elicitation) while it follows a task.

``watch_task`` hands what its task waits for (a tool call to approve, a question) to
an ``Asker`` when the client declared the ``elicitation`` capability. The asker sends
one ``elicitation/create`` form at a time, in a background task, so progress
notifications keep flowing while the person thinks::

    watch loop ──offer(pending)──► Asker ──form──► client
        ▲                            │ accept: Acting.decide (as approve/deny/answer)
        └──── progress lines ◄───────┘ decline / cancel: stays pending, not asked again

An approval decided elsewhere (``tale approve``, the TUI) withdraws its open form; an
answer that arrives after someone else decided is logged and dropped. Nothing here
fails the watch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import mcp_types as types
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taled.db.acting import Approval, ApprovalKind, ApprovalState
from taled.errors import TaleError
from taled.tools.service import Acting

__all__ = ["Asker", "Elicit", "Form", "form_for"]

log = logging.getLogger(__name__)

# Sends one form (message, requested schema) to the client; its answer.
Elicit = Callable[[str, dict[str, Any]], Awaitable[types.ElicitResult]]


@dataclass(frozen=True)
class Form:
    """What the person is shown: a message and a flat schema of the fields to fill."""

    message: str
    schema: dict[str, Any]


class _ToolAnswer(BaseModel):
    """A filled-in approval form."""

    model_config = ConfigDict(extra="ignore")

    decision: Literal["approve", "deny"]
    always: bool = False
    reason: str | None = Field(default=None, max_length=2000)


class _QuestionAnswer(BaseModel):
    """A filled-in question form."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    answer: str = Field(min_length=1, max_length=10_000)


def form_for(approval: Approval) -> Form:
    """The form asking about ``approval``: approve/deny a tool call, or answer a question."""
    if approval.kind == ApprovalKind.QUESTION:
        return Form(
            message=f"Task {approval.task_id} asks: {approval.summary}",
            schema={
                "type": "object",
                "properties": {
                    "answer": {
                        "type": "string",
                        "title": "Answer",
                        "description": "Your answer; the task's model reads it.",
                        "minLength": 1,
                        "maxLength": 10_000,
                    }
                },
                "required": ["answer"],
            },
        )
    # The summary is "run: pytest -q" or "write_file: a.py": the tool, then what it does.
    what = approval.summary.removeprefix(f"{approval.tool}:").strip() or approval.summary
    verb = "run" if approval.tool == "run" else f"call {approval.tool}"
    properties: dict[str, Any] = {
        "decision": {
            "type": "string",
            "title": "Decision",
            "enum": ["approve", "deny"],
            "description": "approve: the call runs; deny: it does not, and the model is told.",
        }
    }
    if approval.rule is not None:
        properties["always"] = {
            "type": "boolean",
            "title": "Always",
            "description": f"Decide the same for calls like it from now on (rule {approval.rule}).",
            "default": False,
        }
    properties["reason"] = {
        "type": "string",
        "title": "Reason",
        "description": "If you deny: why, or what to do instead; the model reads it.",
        "maxLength": 2000,
    }
    return Form(
        message=f"Task {approval.task_id} wants to {verb}: `{what}` (tool {approval.tool}). "
        "Approve?",
        schema={"type": "object", "properties": properties, "required": ["decision"]},
    )


class Asker:
    """Asks about one watch's approvals through the client, one form at a time.

    An approval the person declined or dismissed is not asked about again in this
    watch: they answer with the CLI, the TUI or the MCP tools instead.
    """

    def __init__(self, elicit: Elicit, acting: Acting, wake: Callable[[], None]) -> None:
        self._elicit = elicit
        self._acting = acting
        self._wake = wake
        self._asked: set[str] = set()
        self._open: tuple[str, asyncio.Task[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(self, pending: Sequence[Approval]) -> None:
        """Ask about the oldest of ``pending`` not asked yet, unless a form is open;
        withdraw an open form whose approval is no longer pending (decided elsewhere)."""
        if self._open is not None:
            approval_id, task = self._open
            if not task.done() and any(a.id == approval_id for a in pending):
                return
            if not task.done():
                # Decided elsewhere, or its task was paused: a paused task that waits
                # again asks again, as its form was not the person's choice to dismiss.
                log.info("approval %s no longer waits here; its form is withdrawn", approval_id)
                task.cancel()
                self._asked.discard(approval_id)
            self._open = None
        for approval in pending:
            if approval.id not in self._asked:
                self._asked.add(approval.id)
                task = asyncio.create_task(self._ask(approval), name=f"elicit {approval.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self._open = (approval.id, task)
                return

    async def close(self) -> None:
        """Withdraw any open form (the watch ended) and wait for it to go."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._open = None

    async def _ask(self, approval: Approval) -> None:
        form = form_for(approval)
        try:
            result = await self._elicit(form.message, form.schema)
        except MCPError as exc:
            log.info("approval %s: the client did not take the form: %s", approval.id, exc)
            return
        except Exception:
            # A background task: nothing above it would hear; the watch goes on.
            log.warning("approval %s: asking through the client failed", approval.id, exc_info=True)
            return
        if result.action != "accept":
            log.info(
                "approval %s: the person chose %s in their MCP client; it stays pending",
                approval.id,
                result.action,
            )
            return
        try:
            decided = await self._decide(approval, result.content or {})
        except ValidationError as exc:
            log.info(
                "approval %s: the client's form does not fit its schema (%s); it stays pending",
                approval.id,
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
            )
            return
        except TaleError as exc:
            # Decided meanwhile by someone else (IllegalTransition), or gone (NotFound).
            # Not exc.message: it quotes the other decision's reason, and answers stay
            # out of the log.
            log.info(
                "approval %s: the answer from the MCP client is not used (%s: decided "
                "meanwhile, or gone)",
                approval.id,
                type(exc).__name__,
            )
            return
        self._wake()
        log.info(
            "approval %s %s through MCP elicitation (task %s)",
            decided.id,
            decided.state.value,
            decided.task_id,
        )

    async def _decide(self, approval: Approval, content: dict[str, Any]) -> Approval:
        """Record the filled-in form exactly as the approve, deny and answer tools do."""
        if approval.kind == ApprovalKind.QUESTION:
            answer = _QuestionAnswer.model_validate(content)
            return await self._acting.decide(approval.id, ApprovalState.ANSWERED, answer.answer)
        filled = _ToolAnswer.model_validate(content)
        always = filled.always and approval.rule is not None
        if filled.decision == "approve":
            return await self._acting.decide(
                approval.id, ApprovalState.APPROVED, None, always=always
            )
        reason = (filled.reason or "").strip() or None
        return await self._acting.decide(approval.id, ApprovalState.DENIED, reason, always=always)
