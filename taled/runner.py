"""The runner: a bounded pool of workers that execute queued tasks.

A task's execution is one task-model call with the configured system prompt
(planning, checkpoints and gates come later). A worker claims the most urgent
queued task, runs it, and records the outcome; a cancel stops the model call at
the next token. On shutdown, calls still running after the grace period are
stopped and their tasks go back to ``queued`` for the next start.
"""

from __future__ import annotations

import asyncio
import logging

from taled.backends.base import CancelToken, ChatMessage, Completion
from taled.errors import IllegalTransition, ModelError, RoleDown, TaleError
from taled.lifecycle import TaskState
from taled.pool import ModelPool
from taled.queue import TaskQueue
from taled.routing import Route, Router
from taled.settings import RunnerSettings
from taled.store import Store, TaskRecord

__all__ = ["Runner"]

log = logging.getLogger(__name__)


class Runner:
    """Runs tasks from the queue on the task model, ``workers`` at a time."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        pool: ModelPool,
        settings: RunnerSettings,
        workers: int,
        router: Router,
    ) -> None:
        self._store = store
        self._queue = queue
        self._pool = pool
        self._router = router
        self._settings = settings
        self._n_workers = workers
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, CancelToken] = {}
        self._stopping = False
        queue.on_stop(self._cancel_call)

    @property
    def busy(self) -> int:
        """Tasks being executed right now."""
        return len(self._running)

    async def start(self) -> None:
        """Start the workers."""
        self._workers = [
            asyncio.create_task(self._work(i), name=f"worker-{i}") for i in range(self._n_workers)
        ]

    async def stop(self, grace: float) -> None:
        """Stop claiming; let calls finish for ``grace`` seconds, then stop them."""
        self._stopping = True
        self._queue.stop_accepting()
        if not self._workers:
            return
        _done, pending = await asyncio.wait(self._workers, timeout=grace)
        if pending:
            log.info("stopping %d running task(s) after %.1f s grace", len(self._running), grace)
            for token in self._running.values():
                token.cancel()
            await asyncio.wait(pending)
        self._workers = []

    def _cancel_call(self, task_id: str) -> None:
        token = self._running.get(task_id)
        if token is not None:
            token.cancel()

    async def _work(self, index: int) -> None:
        while not self._stopping:
            task = await self._queue.next_task()
            if task is None:
                return
            token = CancelToken()
            self._running[task.id] = token
            try:
                await self._execute(task, token)
            except TaleError:
                # The task stays 'running' in the store; the next start requeues it.
                log.exception("worker %d could not finish task %s", index, task.id)
            finally:
                del self._running[task.id]
        log.debug("worker %d stopped", index)

    def _messages(self, task: TaskRecord) -> list[ChatMessage]:
        return [
            {"role": "system", "content": self._settings.system_prompt},
            {"role": "user", "content": task.text},
        ]

    async def _execute(self, task: TaskRecord, token: CancelToken) -> None:
        route = self._router.for_task(task)
        log.info(
            "task %s started (attempt %d) on %s: %s",
            task.id,
            task.attempts + 1,
            route.model or route.role,
            route.reason,
        )
        completion = await self._call(task, route, token)
        if completion is None:
            return
        if completion.finish_reason == "cancelled":
            if self._stopping:
                await self._finish(
                    task.id,
                    TaskState.QUEUED,
                    "daemon stopped mid-task; it will run again on the next start",
                )
            # Otherwise the user cancelled or paused it: the task is already moved.
            return
        reason = (
            "answered"
            if completion.finish_reason == "stop"
            else (f"answer cut at max_tokens={self._settings.max_tokens}")
        )
        await self._finish(task.id, TaskState.COMPLETED, reason, result=completion.text)

    async def _call(self, task: TaskRecord, route: Route, token: CancelToken) -> Completion | None:
        """The task's model call, or None if the task ended without one (failed, cancelled).

        While the role's model is down and nothing serves it, the task is
        ``waiting`` (with the reason in its history) rather than failed.
        """
        while True:
            try:
                return await self._pool.complete(
                    route.role,
                    self._messages(task),
                    model=route.model,
                    max_tokens=self._settings.max_tokens,
                    temperature=self._settings.temperature,
                    timeout=self._settings.call_timeout_seconds,
                    task_id=task.id,
                    cancel=token,
                )
            except RoleDown as exc:
                down = exc.message
            except ModelError as exc:
                await self._finish(
                    task.id,
                    TaskState.FAILED,
                    f"model call failed: {exc.message}",
                    error=exc.message,
                )
                return None
            if not token.cancelled:
                if not await self._finish(
                    task.id, TaskState.WAITING, f"{down}; the task waits for it"
                ):
                    return None
                served = await self._pool.wait_until_served(route.role, token)
                back = "the model is back" if served else "stopped while waiting for the model"
                if not await self._finish(task.id, TaskState.RUNNING, back, TaskState.WAITING):
                    return None  # cancelled while waiting
            if token.cancelled:
                if self._stopping:
                    await self._finish(
                        task.id,
                        TaskState.QUEUED,
                        "daemon stopped; it will run again on the next start",
                    )
                return None

    async def _finish(
        self,
        task_id: str,
        target: TaskState,
        reason: str,
        expect: TaskState = TaskState.RUNNING,
        **fields: str,
    ) -> bool:
        """Move the task unless it left ``expect`` meanwhile (say, cancelled); True if moved."""
        try:
            await self._store.transition(task_id, target, reason, expect=expect, **fields)
        except IllegalTransition as exc:
            # Cancelled (or otherwise moved) while the model was answering.
            log.info("task %s not moved to %s: %s", task_id, target, exc.message)
            return False
        log.info("task %s %s: %s", task_id, target, reason)
        return True
