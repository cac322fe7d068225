"""The durable task queue: validated submits, priority order, cancel.

The store is the source of truth; this service adds input validation and the
wake-up signal the runner's workers sleep on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path

from taled import paths
from taled.db.store import Store, TaskFields, TaskRecord
from taled.errors import IllegalTransition, InvalidInput, Unavailable
from taled.settings import QueueSettings, parse_model_spec
from taled.tasks.gates import gates
from taled.tasks.lifecycle import FINAL_STATES, TaskState
from taled.text import clean_text

__all__ = ["MAX_AFTER", "TaskQueue"]

MAX_AFTER = 20
"""Most tasks one task may be submitted to run after (``--after``)."""

_PAUSABLE = frozenset({TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING})
# Times a pause reads a task again when it moved on between the read and the write.
_MOVED_RETRIES = 3
_LIVE = frozenset(set(TaskState) - FINAL_STATES)


def check_workspace(path: str) -> str:
    """A directory a task may work on a copy of, as its real absolute path; InvalidInput
    saying what is wrong. The daemon's own directories are refused: a copy of them would
    put its store and logs within a model's reach."""
    if not path.strip() or "\0" in path:
        raise InvalidInput("workspace: give the path of a directory")
    given = Path(path).expanduser()
    if not given.is_absolute():
        raise InvalidInput(f"workspace {path!r} must be an absolute path (the CLI makes it one)")
    real = Path(os.path.realpath(given))
    if not real.is_dir():
        problem = "does not exist" if not real.exists() else "is not a directory"
        raise InvalidInput(f"workspace {path} {problem}")
    if not os.access(real, os.R_OK | os.X_OK):
        raise InvalidInput(f"workspace {path} is not readable by the daemon")
    for own in (paths.data_dir(), paths.runtime_dir(), paths.config_file().parent):
        mine = Path(os.path.realpath(own))
        if real == mine or mine.is_relative_to(real) or real.is_relative_to(mine):
            raise InvalidInput(
                f"workspace {path} holds or is inside tale's own directory {own}; "
                "choose a directory of your project"
            )
    return str(real)


class TaskQueue:
    """Accepts tasks and hands them to workers, most urgent first."""

    def __init__(self, store: Store, settings: QueueSettings) -> None:
        self._store = store
        self._settings = settings
        self._wake = asyncio.Event()
        self._accepting = True
        self._stop_hooks: list[Callable[[TaskRecord], Awaitable[None]]] = []

    def on_stop(self, hook: Callable[[TaskRecord], Awaitable[None]]) -> None:
        """Await ``hook(task)`` after a task is cancelled or paused (the runner stops it)."""
        self._stop_hooks.append(hook)

    def wake(self) -> None:
        """Tell sleeping workers that a task may have become ready."""
        self._wake.set()

    def stop_accepting(self) -> None:
        """Refuse new work from now on (shutdown)."""
        self._accepting = False
        self._wake.set()

    def validate_text(self, text: str) -> str:
        """Strip and check a task text; raise InvalidInput saying what is wrong."""
        return clean_text(
            text,
            what="task text",
            limit=self._settings.max_text_chars,
            empty_hint="say what you want done",
            too_long_hint=". Shorten it or split it into several tasks",
        )

    async def submit(
        self,
        text: str,
        priority: int | None = None,
        model: str | None = None,
        criteria: list[str] | None = None,
        *,
        workspace: str | None = None,
        act: bool = False,
        after: list[str] | None = None,
        after_any: bool = False,
    ) -> TaskRecord:
        """Validate and durably enqueue a task; returns once it is on disk.

        ``model`` (``backend:model``) runs this task on that model instead of the
        task role's; it is checked for form here and loaded when the task runs.
        ``criteria`` are done criteria (see taled.tasks.gates.gates), checked for form here.
        ``workspace`` is a directory of the user's the task acts on (a copy of it);
        ``act`` gives the task tools in a scratch workspace. Either, or a ``run:``
        criterion, makes the task act. ``after`` (ids or unique prefixes of top-level
        tasks) makes it wait until they complete, and fail if one fails or is cancelled;
        with ``after_any`` it runs once they have finished, whatever became of them.
        """
        if not self._accepting:
            raise Unavailable("the daemon is shutting down and takes no new tasks; retry shortly")
        fields = self.check(text, priority, model, criteria, workspace=workspace, act=act)
        if after_any and not after:
            raise InvalidInput("after-any goes with after: name the tasks to run after")
        if after and len(after) > MAX_AFTER:
            raise InvalidInput(f"after: at most {MAX_AFTER} tasks, not {len(after)}")
        record = await self._store.submit(
            fields.text,
            fields.priority,
            fields.model,
            fields.criteria,
            workspace=fields.workspace,
            act=fields.act,
            after=after or (),
            after_any=after_any,
        )
        self._wake.set()
        return record

    def check(
        self,
        text: str,
        priority: int | None = None,
        model: str | None = None,
        criteria: list[str] | None = None,
        *,
        workspace: str | None = None,
        act: bool = False,
    ) -> TaskFields:
        """The task ``submit`` would store, checked; InvalidInput saying what is wrong.
        Writes nothing (a schedule keeps these fields for each of its runs)."""
        clean = self._validate(text, priority)
        if model is not None:
            try:
                model = parse_model_spec(model).label
            except ValueError as exc:
                raise InvalidInput(f"model: {exc}") from None
        parsed = gates.parse_criteria(criteria) if criteria else []
        if workspace is not None:
            workspace = check_workspace(workspace)
        acts = act or workspace is not None or any(c.kind == "run" for c in parsed)
        return TaskFields(
            clean[0], clean[1], model, tuple(criteria or ()), workspace=workspace, act=acts
        )

    def _validate(self, text: str, priority: int | None) -> tuple[str, int]:
        if priority is None:
            priority = self._settings.default_priority
        self._validate_priority(priority)
        return self.validate_text(text), priority

    @staticmethod
    def _validate_priority(priority: int) -> None:
        if not 0 <= priority <= 100:
            raise InvalidInput(
                f"priority must be between 0 and 100 (higher runs first), not {priority}"
            )

    async def next_task(self) -> TaskRecord | None:
        """Wait for and claim the most urgent queued task; None once stopping."""
        while self._accepting:
            task = await self._store.claim_next()
            if task is not None:
                return task
            self._wake.clear()
            # Re-check after clearing: a submit may have landed in between.
            task = await self._store.claim_next()
            if task is not None:
                return task
            if not self._accepting:
                # stop_accepting() ran while we were claiming; its wake-up is spent.
                break
            await self._wake.wait()
        return None

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task that has not finished, and its subtasks; running calls are stopped."""
        current = await self._store.get_task(task_id)
        if current.state in FINAL_STATES:
            raise IllegalTransition(f"task {task_id} is already {current.state}; nothing to cancel")
        await self._store.transition(task_id, TaskState.CANCELLED, "cancelled by the user")
        await self.cancel_subtasks(task_id, "its parent was cancelled")
        self._wake.set()  # a task to run after it whatever became of it may be ready now
        return await self._stopped(task_id)

    async def cancel_subtasks(self, task_id: str, reason: str) -> None:
        """Cancel every unfinished subtask below a task; running calls are stopped."""
        await self._cascade(task_id, TaskState.CANCELLED, _LIVE, reason)

    async def pause(self, task_id: str) -> TaskRecord:
        """Pause a queued, running or waiting task; a running model call is stopped.

        A paused task is not picked up until resumed; one paused mid-answer
        starts its answer again when resumed.
        """
        for attempt in range(1, _MOVED_RETRIES + 1):
            current = await self._store.get_task(task_id)
            if current.state not in _PAUSABLE:
                raise IllegalTransition(
                    f"task {task_id} is {current.state}; only queued, running or waiting tasks "
                    "can be paused"
                )
            reason = "paused by the user"
            if current.state != TaskState.QUEUED:
                reason += (
                    f" while {current.state}; its partial answer is checkpointed and continued "
                    "on resume"
                )
            try:
                await self._store.transition(
                    task_id, TaskState.PAUSED, reason, expect=current.state
                )
                break
            except IllegalTransition:
                # Every pausable state may become paused, so the write was refused because
                # the task moved on after the read (a worker claimed it just after its
                # submit, a step ended); the reason names the state read: read again.
                if attempt == _MOVED_RETRIES:
                    raise
        await self._cascade(task_id, TaskState.PAUSED, _PAUSABLE, "its parent was paused")
        return await self._stopped(task_id)

    async def resume(self, task_id: str) -> TaskRecord:
        """Put a paused task back in the queue, in its priority order."""
        current = await self._store.get_task(task_id)
        if current.state != TaskState.PAUSED:
            raise IllegalTransition(
                f"task {task_id} is {current.state}; only a paused task can be resumed"
            )
        await self._store.transition(
            task_id, TaskState.QUEUED, "resumed by the user", expect=TaskState.PAUSED
        )
        await self._cascade(task_id, TaskState.QUEUED, {TaskState.PAUSED}, "its parent was resumed")
        # Read before waking the workers: the answer is the task as resumed (queued),
        # not as an idle worker may already have claimed it.
        resumed = await self._store.get_task(task_id)
        self._wake.set()
        return resumed

    async def set_priority(self, task_id: str, priority: int) -> TaskRecord:
        """Change an unfinished task's priority (0..100, higher runs first)."""
        self._validate_priority(priority)
        current = await self._store.get_task(task_id)
        if current.state in FINAL_STATES:
            raise IllegalTransition(
                f"task {task_id} is already {current.state}; its priority no longer matters"
            )
        await self._store.set_priority(task_id, priority)
        return await self._store.get_task(task_id)

    async def _cascade(
        self, task_id: str, target: TaskState, sources: Iterable[TaskState], reason: str
    ) -> None:
        """Move a task's subtasks along with it; running ones have their calls stopped."""
        moved = await self._store.move_descendants(task_id, target, list(sources), reason)
        if target == TaskState.QUEUED:
            return
        for child in moved:
            for hook in self._stop_hooks:
                await hook(replace(child, state=target))

    async def _stopped(self, task_id: str) -> TaskRecord:
        task = await self._store.get_task(task_id)
        for hook in self._stop_hooks:
            await hook(task)
        return task
