"""The task state machine: which state changes are legal.

    queued ──► running ──► completed | failed | cancelled
      ▲  │      │  ▲  │
      │  │      │  │  └──► waiting (blocked on subtasks) ──► running | paused | failed
      │  ▼      ▼  │
      └─ paused ◄──┘  (pause from queued, running or waiting)

    waiting ──► queued   (its subtasks finished: it queues to aggregate them)
    queued | paused ──► failed   (a task it was to run after failed: it never runs)

    any non-final state ──► cancelled

Resuming a paused task puts it back in the queue (``paused → queued``), where it
waits for a free worker like any other; ``running → queued`` is how a task
interrupted by a crash or shutdown goes back too. ``completed``, ``failed`` and
``cancelled`` are final, except that restoring a checkpoint re-queues a failed task.
"""

from __future__ import annotations

from enum import StrEnum

from taled.errors import IllegalTransition

__all__ = ["FINAL_STATES", "RESTORE_TRANSITIONS", "TRANSITIONS", "TaskState", "check_transition"]


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
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED, S.WAITING, S.QUEUED}),
    S.WAITING: frozenset({S.RUNNING, S.QUEUED, S.PAUSED, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

FINAL_STATES = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

# Restoring a checkpoint is the one way back out of a final state: a failed task
# rewound to a checkpoint is queued again (so is a paused one, as usual).
RESTORE_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.FAILED: frozenset({S.QUEUED}),
    S.PAUSED: frozenset({S.QUEUED}),
}


def check_transition(
    task_id: str, current: TaskState, target: TaskState, *, restoring: bool = False
) -> None:
    """Raise IllegalTransition unless ``current → target`` is allowed.

    ``restoring`` also allows the moves of a checkpoint restore (failed → queued).
    """
    if restoring and target in RESTORE_TRANSITIONS.get(current, frozenset()):
        return
    if target not in TRANSITIONS[current]:
        if current in FINAL_STATES:
            raise IllegalTransition(
                f"task {task_id} is already {current}; it cannot become {target}"
            )
        allowed = ", ".join(sorted(TRANSITIONS[current]))
        raise IllegalTransition(
            f"task {task_id} is {current}; it cannot become {target} (allowed: {allowed})"
        )
