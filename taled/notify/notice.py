"""What a notification tells: a top-level task ended, or waits for a person.

A ``Notice`` is made once (``taled.notify.service``) and read by every channel: the
desktop's words come from ``summary`` and ``body``, a hook's stdin is ``to_json``
(versioned: ``"version": 1``; fields are only ever added).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from taled.db.acting import Approval, ApprovalKind
from taled.db.store import TaskRecord
from taled.text import one_line

__all__ = ["JSON_VERSION", "Notice", "NoticeKind"]

JSON_VERSION = 1
"""The version of ``Notice.to_json``'s form."""

# Characters of the task's first line in a desktop notification's body.
_TITLE_CHARS = 80
# C0 and C1 control characters: a notification or a log line shows none of them.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class NoticeKind(StrEnum):
    """What happened to the task (the values are ``notifications.on``'s words)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"
    """It waits for a person: a tool call to approve, or a question to answer."""


_SAID = {
    NoticeKind.COMPLETED: "completed",
    NoticeKind.FAILED: "failed",
    NoticeKind.CANCELLED: "was cancelled",
    NoticeKind.WAITING: "waits for you",
}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(text: str, limit: int) -> str:
    return one_line(_CONTROLS.sub("", text), limit)


def _first_line(text: str, limit: int) -> str:
    """The first line of ``text`` that says something, short."""
    return next((_line(t, limit) for t in text.splitlines() if t.strip()), "")


@dataclass(frozen=True)
class Notice:
    """A top-level task's event, with what a person needs to act on it."""

    kind: NoticeKind
    task: TaskRecord
    """The top-level task, as stored when the notice was made."""
    at: float
    """When the state change was committed."""
    approvals: tuple[Approval, ...] = ()
    """For ``waiting``: what it waits for (its own, or one of its planned steps')."""

    @property
    def title(self) -> str:
        """The task's first line, short."""
        return _first_line(self.task.title or self.task.text, _TITLE_CHARS)

    def summary(self) -> str:
        """The notification's one line: ``tale: task 3f2a9c01b22d completed``."""
        return f"tale: task {self.task.id} {_SAID[self.kind]}"

    def body(self, chars: int) -> str:
        """The task's first line, then what came of it: the result's first line, the
        error, or what it waits for and how to answer. Plain text, controls removed."""
        if self.kind is NoticeKind.WAITING:
            lines = [self._asks(a, chars) for a in self.approvals[:3]]
        elif self.kind is NoticeKind.COMPLETED:
            lines = [_first_line(self.task.result or "", chars)]
        elif self.kind is NoticeKind.FAILED:
            lines = [_first_line(self.task.error or "no reason recorded", chars)]
        else:
            lines = []
        return "\n".join([self.title, *(line for line in lines if line)])

    @staticmethod
    def _asks(approval: Approval, chars: int) -> str:
        if approval.kind is ApprovalKind.QUESTION:
            return _line(f"asks: {approval.summary} (tale answer {approval.id} TEXT)", chars)
        return _line(f"{approval.summary} (tale approve {approval.id})", chars)

    def to_json(self) -> dict[str, Any]:
        """What a hook reads on stdin (one line of JSON)."""
        t = self.task
        return {
            "version": JSON_VERSION,
            "event": self.kind.value,
            "at": _iso(self.at),
            "task": {
                "id": t.id,
                "state": t.state.value,
                "title": self.title,
                "text": t.text,
                "result": t.result,
                "error": t.error,
                "priority": t.priority,
                "model": t.model,
                "created_at": _iso(t.created_at),
                "updated_at": _iso(t.updated_at),
                "act": t.act,
                "workspace": t.workspace,
                "schedule_id": t.schedule_id,
                "tokens": {"prompt": t.prompt_tokens, "completion": t.completion_tokens},
            },
            "approvals": [
                {
                    "id": a.id,
                    "task_id": a.task_id,
                    "kind": a.kind.value,
                    "tool": a.tool,
                    "summary": a.summary,
                    "created_at": _iso(a.created_at),
                }
                for a in self.approvals
            ],
        }
