"""The daemon's tools as typed calls: what each screen asks, answered with ``model`` objects.

Calls that refresh a view carry a timeout, so a hung daemon shows as an error
instead of a frozen screen; a chat turn has none (the daemon bounds it).
Tools an older daemon lacks (``metrics``, ``list_conversations``, ...) answer
``None`` instead of raising, and ``chat`` falls back to its plain form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tale_client.rpc import RpcError, is_unknown_argument, is_unknown_tool
from tale_client.sanitize import printable
from tale_client.tui.client import TaleClient
from tale_client.tui.model import (
    Approval,
    ChatReply,
    Checkpoint,
    Conversation,
    ConversationInfo,
    DaemonStatus,
    Metrics,
    ModelInfo,
    Task,
    TaskDiff,
    Usage,
)

__all__ = ["CALL_TIMEOUT_SECONDS", "Api", "Decision", "Verdict"]

CALL_TIMEOUT_SECONDS = 10.0


class Verdict(StrEnum):
    """What a person said to a waiting task; the value is the tool that says it."""

    APPROVE = "approve"
    DENY = "deny"
    ANSWER = "answer"


@dataclass(frozen=True)
class Decision:
    """A person's decision on one approval, as the approval dialog returns it."""

    approval: Approval
    verdict: Verdict
    always: bool = False
    text: str = ""
    """The reason of a denial (optional) or the answer to a question."""

    def arguments(self) -> dict[str, Any]:
        """The tool call's arguments."""
        args: dict[str, Any] = {"id": self.approval.id}
        if self.verdict is Verdict.ANSWER:
            args["text"] = self.text
            return args
        if self.always:
            args["always"] = True
        if self.verdict is Verdict.DENY and self.text:
            args["reason"] = self.text
        return args


class Api:
    """Typed tool calls over one ``TaleClient``."""

    def __init__(self, client: TaleClient) -> None:
        self.client = client
        # Set once the daemon rejects the conversation arguments of `chat`.
        self._plain_chat = False

    async def _call(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(
            self.client.call_tool(tool, arguments or {}), CALL_TIMEOUT_SECONDS
        )

    async def _optional(
        self, tool: str, arguments: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """A call to a tool the daemon may not have yet: None when it does not."""
        try:
            return await self._call(tool, arguments)
        except RpcError as exc:
            if is_unknown_tool(exc):
                return None
            raise

    # -- tasks ---------------------------------------------------------------

    async def list_tasks(self, limit: int = 200) -> list[Task]:
        """Top-level tasks, newest first."""
        found = await self._call("list_tasks", {"limit": limit})
        return [Task.from_dict(t) for t in found.get("tasks", []) if isinstance(t, dict)]

    async def get_task(self, task_id: str) -> Task:
        """One task with progress and subtasks."""
        return Task.from_dict(await self._call("get_task", {"id": task_id}))

    async def submit(self, text: str, priority: int | None = None) -> Task:
        """Queue a task."""
        args: dict[str, Any] = {"text": text}
        if priority is not None:
            args["priority"] = priority
        return Task.from_dict(await self._call("submit_task", args))

    async def pause(self, task_id: str) -> Task:
        """Pause a task."""
        return Task.from_dict(await self._call("pause_task", {"id": task_id}))

    async def resume(self, task_id: str) -> Task:
        """Resume a paused task."""
        return Task.from_dict(await self._call("resume_task", {"id": task_id}))

    async def cancel(self, task_id: str) -> Task:
        """Cancel a task."""
        return Task.from_dict(await self._call("cancel_task", {"id": task_id}))

    async def set_priority(self, task_id: str, priority: int) -> Task:
        """Change a task's priority (clamped to 0..100)."""
        value = max(0, min(100, priority))
        return Task.from_dict(await self._call("set_priority", {"id": task_id, "priority": value}))

    async def checkpoints(self, task_id: str, limit: int = 50) -> list[Checkpoint]:
        """A task's checkpoints, newest first."""
        found = await self._call("list_checkpoints", {"id": task_id, "limit": limit})
        return [
            Checkpoint.from_dict(c) for c in found.get("checkpoints", []) if isinstance(c, dict)
        ]

    # -- what tasks wait for ---------------------------------------------------

    async def approvals(self, task_id: str | None = None) -> list[Approval] | None:
        """Pending approvals and questions, oldest first; None if the daemon has no acting."""
        found = await self._optional("list_approvals", {} if task_id is None else {"task": task_id})
        if found is None:
            return None
        return [Approval.from_dict(a) for a in found.get("approvals", []) if isinstance(a, dict)]

    async def decide(self, decision: Decision) -> Approval:
        """Approve, deny or answer; the approval as decided."""
        return Approval.from_dict(await self._call(decision.verdict.value, decision.arguments()))

    async def task_diff(self, task_id: str) -> TaskDiff:
        """What an acting task changed in its workspace."""
        return TaskDiff.from_dict(await self._call("task_diff", {"id": task_id}))

    # -- the daemon ----------------------------------------------------------

    async def daemon_status(self) -> DaemonStatus:
        """Workers and tasks by state."""
        return DaemonStatus.from_dict(await self._call("daemon_status"))

    async def models(self) -> list[ModelInfo]:
        """The model pool."""
        found = await self._call("models_status")
        return [ModelInfo.from_dict(m) for m in found.get("models", []) if isinstance(m, dict)]

    async def usage(self) -> Usage:
        """The token ledger's totals."""
        return Usage.from_dict(await self._call("usage"))

    async def metrics(self) -> Metrics | None:
        """Tokens per minute, latencies and violations; None if the daemon has no metrics."""
        found = await self._optional("metrics")
        return None if found is None else Metrics.from_dict(found)

    # -- conversation ----------------------------------------------------------

    async def conversations(self, limit: int = 50) -> list[ConversationInfo] | None:
        """Past conversations, newest first; None if the daemon keeps none."""
        found = await self._optional("list_conversations", {"limit": limit})
        if found is None:
            return None
        items = found.get("conversations", [])
        return [ConversationInfo.from_dict(c) for c in items if isinstance(c, dict)]

    async def conversation(self, conversation_id: str) -> Conversation | None:
        """One stored conversation with its messages; None if the daemon keeps none."""
        found = await self._optional("get_conversation", {"id": conversation_id})
        return None if found is None else Conversation.from_dict(found)

    async def chat(
        self,
        text: str,
        on_piece: Callable[[str], Awaitable[None]],
        conversation: str | None = None,
        new: bool = False,
    ) -> ChatReply:
        """One chat turn; each streamed piece of the reply goes to ``on_piece`` as it comes."""
        args: dict[str, Any] = {"text": text}
        if not self._plain_chat:
            if conversation is not None:
                args["conversation"] = conversation
            if new:
                args["new"] = True
        stream = self.client.stream_tool("chat", args)
        try:
            async for note in stream:
                await on_piece(printable(note.message))
            return ChatReply.from_dict(await stream.result())
        except RpcError as exc:
            # A daemon from before conversations rejects the arguments up front
            # (nothing was said yet): say it again the old way.
            if len(args) > 1 and is_unknown_argument(exc):
                self._plain_chat = True
                return await self.chat(text, on_piece)
            raise
        finally:
            stream.cancel()  # stop waiting if we left early (no-op once it ended)
