"""The task state machine: which state changes are legal.

    queued ──► running ──► completed | failed | cancelled
      ▲  │      │  ▲  │
      │  │      │  │  └──► waiting (blocked on subtasks) ──► running | paused | failed
      │  ▼      ▼  │
      └─ paused ◄──┘  (pause from queued, running or waiting)

    any non-final state ──► cancelled

Resuming a paused task puts it back in the queue (``paused → queued``), where it
waits for a free worker like any other; ``running → queued`` is how a task
interrupted by a crash or shutdown goes back too. ``completed``, ``failed`` and
``cancelled`` are final.
"""

from __future__ import annotations

from enum import StrEnum

from taled.errors import IllegalTransition

__all__ = ["FINAL_STATES", "TRANSITIONS", "TaskState", "check_transition"]


class TaskState(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = TaskState

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED, S.WAITING, S.QUEUED}),
    S.WAITING: frozenset({S.RUNNING, S.PAUSED, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

FINAL_STATES = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def check_transition(task_id: str, current: TaskState, target: TaskState) -> None:
    """Raise IllegalTransition unless ``current → target`` is allowed."""
    if target not in TRANSITIONS[current]:
        if current in FINAL_STATES:
            raise IllegalTransition(
                f"task {task_id} is already {current}; it cannot become {target}"
            )
        allowed = ", ".join(sorted(TRANSITIONS[current]))
        raise IllegalTransition(
            f"task {task_id} is {current}; it cannot become {target} (allowed: {allowed})"
        )
