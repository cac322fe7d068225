"""Which role (and model) serves a piece of work.

Conversation goes to ``ux``; planning and execution to ``task``. A task may name
its own model (a per-task override). The learning engine plugs in as a
``RouteAdvisor``: it may send a simple task to ``ux`` when history shows the UX
model succeeds there. The pool decides the rest (fallback while a role is down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from taled.db.store import TaskRecord
from taled.settings import Role

__all__ = ["Route", "RouteAdvisor", "Router"]


@dataclass(frozen=True)
class Route:
    """Where one call goes, and why (the reason is logged)."""

    role: Role
    model: str | None
    """A ``backend:model`` override, or None for the role's own model."""
    reason: str


class RouteAdvisor(Protocol):
    """A policy that may move a task to another role (the learning engine)."""

    def advise(self, task: TaskRecord) -> Role | None:
        """The role this task should run on, or None for no opinion."""
        ...


class Router:
    """Routes tasks and conversation turns to roles."""

    def __init__(self, advisor: RouteAdvisor | None = None) -> None:
        self._advisor = advisor

    def set_advisor(self, advisor: RouteAdvisor | None) -> None:
        """Install (or remove) the policy consulted for tasks without an override."""
        self._advisor = advisor

    def for_task(self, task: TaskRecord) -> Route:
        """The route of a task's execution call."""
        if task.model:
            return Route("task", task.model, "per-task model override")
        if self._advisor is not None:
            role = self._advisor.advise(task)
            if role is not None and role != "task":
                return Route(role, None, "advised by the learning engine")
        return Route("task", None, "tasks run on the task model")

    def for_chat(self) -> Route:
        """The route of a conversation turn."""
        return Route("ux", None, "conversation runs on the UX model")
