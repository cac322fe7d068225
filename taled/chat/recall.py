"""Answers to questions about the user's own requests and tasks, from the store.

The UX model is small and would invent a task's state; these answers are read
from the task store and the conversation, and worded here. Which task "it"
means is resolved from an id in the message, else the words the message shares
with a recent task's text, else the task this conversation handed off last.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from taled.chat.conversations import Conversations, Message
from taled.db.store import Store, TaskRecord
from taled.errors import IllegalTransition, NotFound
from taled.tasks.lifecycle import FINAL_STATES
from taled.tasks.progress import ProgressHub
from taled.tasks.queue import TaskQueue
from taled.text import word_set

__all__ = ["Recall", "describe_task", "task_update"]

# Which states an action can apply to: "pause it" means a task that can pause.
_SUITS: dict[str, frozenset[str]] = {
    "cancel_task": frozenset({"queued", "running", "waiting", "paused"}),
    "pause_task": frozenset({"queued", "running", "waiting"}),
    "resume_task": frozenset({"paused"}),
    "task_result": frozenset({"completed", "failed", "cancelled"}),
}
_WORD = re.compile(r"[a-z0-9]{4,}")
_COMMON = word_set(
    """task tasks that this what with your from have done finished cancel pause resume
    status result output show please could would about doing going thing"""
)


def _quote(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return f"“{flat if len(flat) <= limit else flat[: limit - 1].rstrip() + '…'}”"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def describe_task(task: TaskRecord, progress: ProgressHub, now: float | None = None) -> str:
    """One sentence on where a task stands."""
    now = time.time() if now is None else now
    head = f"Task {task.id} ({_quote(task.text)})"
    if task.state == "running":
        live = progress.get(task.id)
        return f"{head} is running: {live.line()}." if live else f"{head} is running."
    if task.state == "queued":
        return f"{head} is queued (priority {task.priority}) and will start when a worker is free."
    if task.state == "waiting":
        return f"{head} is waiting for its subtasks to finish."
    if task.state == "paused":
        return f"{head} is paused; say “resume it” to carry on."
    ended = _ago(now - task.updated_at)
    if task.state == "completed":
        return f"{head} finished {ended}; ask “what did it produce?” to see the result."
    if task.state == "failed":
        return f"{head} failed {ended}: {task.error or 'no reason recorded'}."
    return f"{head} was cancelled {ended}."


def task_update(task: TaskRecord, progress: ProgressHub) -> str:
    """What changed about a handed-off task, said in passing at the next turn."""
    if task.state == "completed":
        result = " ".join((task.result or "").split())
        preview = result if len(result) <= 160 else result[:159].rstrip() + "…"
        return f"Update: task {task.id} ({_quote(task.text, 40)}) finished. It begins: {preview}"
    return "Update: " + describe_task(task, progress)


@dataclass(frozen=True)
class Answer:
    """A reply worded from the store, and the task it was about."""

    text: str
    task: TaskRecord | None = None


class Recall:
    """Answers an ``action`` (see taled.chat.intent.ACTIONS) from the store."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        conversations: Conversations,
        progress: ProgressHub,
        *,
        result_chars: int,
        candidates: int = 20,
    ) -> None:
        self._store = store
        self._queue = queue
        self._conversations = conversations
        self._progress = progress
        self._result_chars = result_chars
        self._candidates = candidates

    async def answer(
        self,
        action: str,
        text: str,
        task_ids: Sequence[str],
        conversation_id: str,
        message: Message,
    ) -> Answer:
        """The reply to one question or command about the user's tasks."""
        if action == "last_request":
            return await self._last_request(conversation_id, message)
        task = await self._resolve(action, text, task_ids, conversation_id)
        if task is None:
            return Answer(
                "I can't find a task that fits. `tale list` shows your tasks; "
                "you can name one by its id."
            )
        if action == "task_result":
            return Answer(self._result(task), task)
        if action in ("cancel_task", "pause_task", "resume_task"):
            return await self._control(action, task)
        return Answer(describe_task(task, self._progress), task)

    async def _last_request(self, conversation_id: str, message: Message) -> Answer:
        # A request is work asked for; small talk since then does not replace it.
        earlier = await self._conversations.last_user_message(
            message.seq, conversation_id, work_only=True
        ) or await self._conversations.last_user_message(message.seq, conversation_id)
        if earlier is None:
            earlier = await self._conversations.last_user_message(message.seq)
        tasks = await self._store.list_tasks(None, 1)
        latest_task = tasks[0] if tasks else None
        if earlier is None and latest_task is None:
            return Answer("This is your first request: there is nothing before it.")
        if earlier is None or (
            latest_task is not None and latest_task.created_at > earlier.at and not earlier.task_id
        ):
            assert latest_task is not None
            return Answer(
                f"Your last request was the task {_quote(latest_task.text, 200)}. "
                + describe_task(latest_task, self._progress),
                latest_task,
            )
        said = f"Your last request was {_quote(earlier.text, 200)}"
        if earlier.task_id:
            task = await self._store.get_task(earlier.task_id)
            return Answer(f"{said}. I queued it: " + describe_task(task, self._progress), task)
        return Answer(f"{said}.")

    async def _resolve(
        self, action: str, text: str, task_ids: Sequence[str], conversation_id: str
    ) -> TaskRecord | None:
        for task_id in task_ids:
            try:
                return await self._store.get_task(task_id)
            except NotFound:
                continue
        tracked = [tid for tid, _ in await self._conversations.tracked(conversation_id)]
        recent = await self._store.list_tasks(None, self._candidates)
        by_id = {t.id: t for t in recent}
        for tid in tracked:
            if tid not in by_id:
                by_id[tid] = await self._store.get_task(tid)
        # Newest first: this conversation's hand-offs, then everything else recent.
        order = [by_id[t] for t in reversed(tracked)] + [t for t in recent if t.id not in tracked]
        suits = _SUITS.get(action)
        fitting = [t for t in order if suits is None or t.state in suits] or order
        words = set(_WORD.findall(text.lower())) - _COMMON
        if words:
            scored = [
                (len(words & set(_WORD.findall(t.text.lower()))), i) for i, t in enumerate(fitting)
            ]
            best, index = max(scored, key=lambda s: (s[0], -s[1]), default=(0, 0))
            if best > 0:
                return fitting[index]
        return fitting[0] if fitting else None

    def _result(self, task: TaskRecord) -> str:
        if task.state != "completed" or task.result is None:
            return describe_task(task, self._progress)
        result = task.result
        if len(result) > self._result_chars:
            result = (
                result[: self._result_chars].rstrip()
                + f"\n\n… (cut here; `tale status {task.id}` prints all of it)"
            )
        return f"Task {task.id} ({_quote(task.text)}) produced:\n\n{result}"

    async def _control(self, action: str, task: TaskRecord) -> Answer:
        verb = {"cancel_task": "cancel", "pause_task": "pause", "resume_task": "resume"}[action]
        try:
            if action == "cancel_task":
                done = await self._queue.cancel(task.id)
            elif action == "pause_task":
                done = await self._queue.pause(task.id)
            else:
                done = await self._queue.resume(task.id)
        except IllegalTransition:
            why = "it has already ended" if task.state in FINAL_STATES else f"it is {task.state}"
            return Answer(
                f"I can't {verb} task {task.id} ({_quote(task.text)}): {why}.",
                task,
            )
        past = {"cancel": "Cancelled", "pause": "Paused", "resume": "Resumed"}[verb]
        return Answer(f"{past} task {task.id} ({_quote(task.text)}); it is now {done.state}.", done)
