"""The runner: a bounded pool of workers that carry tasks through their steps.

A worker claims the most urgent ready task and continues it from its latest
checkpoint (a fresh task has none). A task the classifier calls simple is
answered in one step; a complex one is planned by the task model into subtasks
(a DAG), which run as tasks of their own, in parallel up to the worker limit,
each given a summary of its dependencies' results; the parent then aggregates.

Every step's result is checkpointed (``WorkState`` in the task's git ref)
before the runner acts on it, so after a crash the task resumes at the next
unfinished step and never repeats a checkpointed one. Each result passes the
task's done-gates; a failure is fed back and recovered in order: retry with
more tokens → fallback model → decompose and retry → fail, saying what was
tried. Pausing stops the model call at the next token and checkpoints the
partial answer, which the resumed attempt continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from taled.checkpoints.repo import Checkpoint, CheckpointKind, CheckpointStore
from taled.db.store import Store, SubtaskSpec, TaskRecord
from taled.errors import (
    DiskFull,
    IllegalTransition,
    InvalidInput,
    ModelError,
    NotFound,
    RoleDown,
    TaleError,
    Unavailable,
    is_no_space,
)
from taled.learning.assessment import Assessment
from taled.learning.engine import LearningEngine
from taled.learning.selection import Tactic
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.pool import ModelCall, ModelPool
from taled.models.routing import Route, Router
from taled.sandbox import sandbox
from taled.settings import GateSettings, PlannerSettings, Role, RunnerSettings
from taled.tasks.agent import AgentLoop, CannotGoOn, LoopParts, Parked, Stopped, WorkspaceGone
from taled.tasks.gates import gates
from taled.tasks.lifecycle import FINAL_STATES, TaskState
from taled.tasks.planning import planner
from taled.tasks.planning.needs_tools import needs_tools
from taled.tasks.progress import ProgressHub
from taled.tasks.queue import TaskQueue
from taled.tasks.workstate import AgentState, Attempt, AttemptKey, Partial, WorkState
from taled.text import count, one_line
from taled.tools.base import ToolSpec
from taled.tools.service import Acting
from taled.tools.workspace import Workspace

__all__ = ["Runner"]

log = logging.getLogger(__name__)


# A worker that failed starts again after this pause, doubling up to the maximum.
_RESTART_SECONDS = 1.0
_RESTART_MAX_SECONDS = 30.0
# A task parked by a full disk: how often its disk is looked at, and the least wait
# before the first try (doubling with each full disk in a row).
_ROOM_POLL_SECONDS = 0.25
_ROOM_FIRST_SECONDS = 1.0
# Free space that counts as room again: enough for checkpoints and the store's WAL.
_ROOM_BYTES = 1 << 20


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _disk_full(exc: BaseException, where: Path) -> DiskFull | None:
    """The exception as DiskFull if it is one (or an OS "no space" error), else None."""
    if isinstance(exc, DiskFull):
        return exc
    if isinstance(exc, OSError) and is_no_space(exc):
        return DiskFull(str(exc.filename or where))
    return None


def _has_room(path: str) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has room."""
    at = Path(path)
    while not at.exists() and at != at.parent:
        at = at.parent
    try:
        fs = os.statvfs(at)
    except OSError:
        return True  # cannot tell: let the next write find out
    inodes = fs.f_files == 0 or fs.f_favail > 0
    return fs.f_bavail * fs.f_frsize >= _ROOM_BYTES and inodes


class _Stopped(Exception):
    """The task left ``running`` (paused, cancelled, daemon stopping): drop it quietly."""


class _Decompose(Exception):
    """Every direct attempt failed: plan the task into subtasks and try again."""


class _Failed(Exception):
    """The step could not be done; the message says what was tried."""


@dataclass(frozen=True)
class _Stage:
    name: str
    max_tokens: int
    model: str | None
    role: Role | None = None
    """The role this stage runs on; None: the task's routed role."""


def _next_stage(stages: list[_Stage], attempts: list[Attempt]) -> int:
    """Index of the recovery stage the next attempt uses (``len(stages)``: none left).

    Each attempt uses up one stage; after a model error (or timeout), more tokens
    from the same model will not help, so its remaining stages are skipped.
    """
    at = 0
    for attempt in attempts:
        used = stages[min(at, len(stages) - 1)]
        at += 1
        if attempt.finish == "error":
            while at < len(stages) and (stages[at].role, stages[at].model) == (
                used.role,
                used.model,
            ):
                at += 1
    return at


class Runner:
    """Runs tasks from the queue, ``workers`` at a time, checkpointing every step."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        pool: ModelPool,
        checkpoints: CheckpointStore,
        progress: ProgressHub,
        router: Router,
        *,
        settings: RunnerSettings,
        planning: PlannerSettings,
        gating: GateSettings,
        workers: int,
        fallback: str | None,
        scratch: Path,
        learning: LearningEngine | None = None,
        acting: Acting | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._pool = pool
        self._checkpoints = checkpoints
        self._progress = progress
        self._router = router
        self._settings = settings
        self._planning = planning
        self._gating = gating
        self._n_workers = workers
        self._fallback = fallback
        self._scratch = scratch
        self._learning = learning
        self._acting = acting
        self._agent = (
            None
            if acting is None
            else AgentLoop(acting, acting.settings.agent, max_gate_failures=gating.attempts + 1)
        )
        self._workers: list[asyncio.Task[None]] = []
        # task id -> (its call's cancel token, set once its worker let go of it)
        self._running: dict[str, tuple[CancelToken, asyncio.Event]] = {}
        self._parent_locks: dict[str, asyncio.Lock] = {}
        # Held only while in use (a waiter keeps its lock alive); a finished workspace's
        # lock goes with the last reference.
        self._workspace_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._stopping = False
        self._stopped = asyncio.Event()
        # worker index -> (since, why): restarting after a failure (down), or alive but
        # unable to work for now (blocked: a full disk, a store refusing claims)
        self._down: dict[int, tuple[float, str]] = {}
        self._blocked: dict[int, tuple[float, str]] = {}
        # task id -> why, while parked by a full disk
        self._parked: dict[str, str] = {}
        # Full-disk episodes in a row (reset when a task attempt ends without one).
        self._full_streak = 0
        queue.on_stop(self._on_stop)

    def estimate(self, task_id: str) -> dict[str, Any] | None:
        """The learning engine's estimate of a top-level task, if it has one in memory."""
        return self._learning.estimate(task_id) if self._learning is not None else None

    @property
    def busy(self) -> int:
        """Tasks being executed right now."""
        return len(self._running)

    async def let_go(self, task_ids: Collection[str], timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds until no worker holds any of ``task_ids`` (a task
        just finished or cancelled is still being wound down: its outcome recorded, its
        last checkpoint written); the ids still held then."""
        deadline = time.monotonic() + timeout
        while True:
            held = [t for t in task_ids if t in self._running]
            left = deadline - time.monotonic()
            if not held or left <= 0:
                return held
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._running[held[0]][1].wait(), left)

    def health(self) -> dict[str, Any]:
        """The workers for ``daemon_status``: how many are alive; those down (restarting
        after a failure) and those blocked (alive, waiting for a full disk or a store
        that refuses claims), each with why and since when; the tasks parked by a full disk.
        """
        down = dict(self._down)
        for i, worker in enumerate(self._workers):
            if worker.done() and not self._stopping:
                down[i] = (time.time(), "not running")

        def listed(workers: dict[int, tuple[float, str]]) -> list[dict[str, Any]]:
            return [
                {"worker": i, "since": round(since, 3), "reason": why}
                for i, (since, why) in sorted(workers.items())
            ]

        return {
            "alive": len(self._workers) - len(down),
            "down": listed(down),
            "blocked": listed(self._blocked),
            "parked": [{"id": task_id, "reason": why} for task_id, why in self._parked.items()],
        }

    async def recover(self, crash: str | None) -> None:
        """Start-up, before the workers: requeue what a stop or a crash interrupted, and
        finish the restores a crash cut off.

        ``crash`` is what the previous run died of when it died of a fatal error of its
        own (None after a clean stop or a kill): it counts against each task that was
        running, and one that reaches ``runner.quarantine_after`` crashes is failed.
        """
        requeued = await self._store.requeue_running(
            "daemon restarted; the task was interrupted and runs again",
            crash=crash,
            quarantine_after=self._settings.quarantine_after,
        )
        if requeued:
            log.warning(
                "requeued %s interrupted by a crash; each resumes from its latest checkpoint",
                count(len(requeued), "task", "tasks"),
            )
        for task in await self._store.pending_restores():
            assert task.restore_to is not None
            try:
                history = await self._checkpoints.list(task.id)
                target = next((c for c in history if c.commit == task.restore_to), None)
                if target is None:
                    raise NotFound(f"its checkpoint {task.restore_to[:12]} is gone")
                saved, ws = await self._write_restore(task, target)
                await self._queue_restored(task, target, ws)
            except TaleError as exc:
                log.error(
                    "task %s: the restore a crash cut off could not be finished: %s",
                    task.id,
                    exc.message,
                )
                await self._store.unmark_restore(task.id)
            else:
                log.warning(
                    "task %s: finished its restore to %s that a crash cut off",
                    task.id,
                    saved.commit[:12],
                )

    async def start(self) -> None:
        """Start the workers."""
        self._scratch.mkdir(parents=True, exist_ok=True)
        # A daemon killed mid-gate leaves its run's scratch directory behind.
        left = await asyncio.to_thread(sandbox.remove_leftovers, self._scratch)
        if left:
            dirs = count(left, "scratch directory", "scratch directories")
            log.info("removed %s a stopped run left behind", dirs)
        self._workers = [
            asyncio.create_task(self._supervise(i), name=f"worker-{i}")
            for i in range(self._n_workers)
        ]

    async def stop(self, grace: float) -> None:
        """Stop claiming; let calls finish for ``grace`` seconds, then stop them."""
        self._stopping = True
        self._stopped.set()
        self._queue.stop_accepting()
        if not self._workers:
            return
        _done, pending = await asyncio.wait(self._workers, timeout=grace)
        if pending:
            running = count(len(self._running), "running task", "running tasks")
            log.info("stopping %s after %.1f s grace", running, grace)
            for token, _released in self._running.values():
                token.cancel()
            await asyncio.wait(pending)
        self._workers = []

    async def _on_stop(self, task: TaskRecord) -> None:
        """A task was paused or cancelled: stop its call and wait until its partial answer
        is checkpointed (bounded by ``stop_wait_seconds``); a cancelled subtask settles
        its parent."""
        running = self._running.get(task.id)
        if running is not None:
            token, released = running
            token.cancel()
            try:
                await asyncio.wait_for(released.wait(), self._settings.stop_wait_seconds)
            except TimeoutError:
                log.warning("task %s: its worker has not let go after being stopped", task.id)
        if task.state == TaskState.CANCELLED and task.parent_id is not None:
            await self._settle_parent(task.parent_id)

    # -- workers -----------------------------------------------------------

    async def _supervise(self, index: int) -> None:
        """Run worker ``index`` until the daemon stops; if it ever fails, start it again.

        ``_work`` handles every task's errors itself, so this is the last line: a
        failure there (the store refusing even to record one) is logged with its
        traceback and the worker restarts after a pause, growing to 30 s.
        """
        failures = 0
        while not self._stopping:
            try:
                await self._work(index)
            except Exception as exc:
                failures += 1
                pause = min(_RESTART_SECONDS * 2 ** (failures - 1), _RESTART_MAX_SECONDS)
                log.exception("worker %d failed; it starts again in %.0f s", index, pause)
                self._down[index] = (time.time(), f"restarting after an error: {_describe(exc)}")
                await self._sleep(pause)
                self._down.pop(index, None)
            else:
                break
        log.debug("worker %d stopped", index)

    async def _work(self, index: int) -> None:
        while not self._stopping:
            task = await self._claim(index)
            if task is None:
                return
            await self._attempt(index, task)

    async def _claim(self, index: int) -> TaskRecord | None:
        """The next task to run; None once stopping.

        A store that cannot hand one out (its disk full, a read failing) is asked
        again after a pause: the worker waits, shown as blocked in ``daemon_status``.
        """
        failures = 0
        full_before = False
        while not self._stopping:
            try:
                task = await self._queue.next_task()
            except Exception as exc:
                full = _disk_full(exc, self._store.path)
                if full is not None:
                    full_before = True
                    self._blocked[index] = (time.time(), f"cannot claim a task: {full.message}")
                    await self._wait_for_room(full, None)
                    continue
                failures += 1
                pause = min(_RESTART_SECONDS * 2 ** (failures - 1), _RESTART_MAX_SECONDS)
                if failures == 1:
                    log.exception("worker %d cannot claim a task; it tries again", index)
                else:
                    log.warning("worker %d still cannot claim a task: %s", index, _describe(exc))
                self._blocked[index] = (time.time(), f"cannot claim a task: {_describe(exc)}")
                await self._sleep(pause)
                continue
            self._blocked.pop(index, None)
            if full_before:
                log.info("the store's disk has room again: tasks are claimed as before")
                self._full_streak = 0
            return task
        return None

    async def _attempt(self, index: int, task: TaskRecord) -> None:
        """Carry one claimed task as far as it goes; whatever it raises, the worker goes on.

        A full disk parks the task until there is room; any other error fails this
        task (not the worker) with the reason, logged with its traceback.
        """
        token, released = CancelToken(), asyncio.Event()
        self._running[task.id] = (token, released)
        try:
            await self._execute(task, token)
        except (_Stopped, Parked):
            pass
        except Stopped:
            if self._stopping:
                await self._finish(
                    task.id,
                    TaskState.QUEUED,
                    "daemon stopped during a tool call; it resumes from its checkpoint, the "
                    "call reported interrupted",
                )
        except Exception as exc:  # noqa: BLE001 - one task's error must not end its worker
            full = _disk_full(exc, self._scratch)
            if full is not None:
                await self._park(index, task, full, token)
            else:
                await self._fail_unexpectedly(index, task, exc, token)
        else:
            if self._full_streak:
                log.info("the disk has room again: tasks run as before")
            self._full_streak = 0
        finally:
            del self._running[task.id]
            released.set()

    async def _fail_unexpectedly(
        self, index: int, task: TaskRecord, exc: Exception, token: CancelToken
    ) -> None:
        """Fail a task whose attempt raised an error the runner did not expect."""
        why = f"internal error: {exc.message if isinstance(exc, TaleError) else _describe(exc)}"
        log.exception("worker %d could not finish task %s", index, task.id)
        if self._stopping:
            return  # the task stays 'running'; the next start requeues it
        try:
            current = await self._store.get_task(task.id)
            if current.state in FINAL_STATES or current.state == TaskState.PAUSED:
                return
            failed = await self._finish(task.id, TaskState.FAILED, why, current.state, error=why)
            if failed and task.parent_id is not None:
                await self._settle_parent(task.parent_id)
        except Exception as again:
            full = _disk_full(again, self._store.path)
            if full is None:
                raise
            # The failure cannot be recorded yet: hold the task until the disk has room;
            # it then runs again, and fails again (recorded, this time) if it must.
            await self._park(index, task, full, token)

    async def _park(self, index: int, task: TaskRecord, full: DiskFull, token: CancelToken) -> None:
        """Hold a task a full disk stopped until the disk has room, then queue it again.

        Nothing is lost: the write that failed did not happen, and the task resumes
        from its latest checkpoint. While parked it is ``waiting`` with the reason
        (when the store's own disk can record that) and its worker waits with it.
        """
        why = f"{full.message}; the task waits for space and resumes by itself"
        self._parked[task.id] = full.message
        self._blocked[index] = (time.time(), f"task {task.id} parked: {full.message}")
        self._progress.update(task.id, doing=f"waiting: {full.message}")
        try:
            try:
                state = (await self._store.get_task(task.id)).state  # reads need no space
                if state == TaskState.RUNNING:
                    if not await self._finish(task.id, TaskState.WAITING, why):
                        return  # paused or cancelled meanwhile
                elif state != TaskState.WAITING:
                    return  # paused, cancelled or finished meanwhile
                parked_in = TaskState.WAITING
            except DiskFull:
                parked_in = TaskState.RUNNING  # the store cannot record it: parked in memory
            while await self._wait_for_room(full, token):
                try:
                    if await self._finish(
                        task.id,
                        TaskState.QUEUED,
                        "the disk has room again; the task resumes from its latest checkpoint",
                        parked_in,
                    ):
                        self._queue.wake()
                    return
                except DiskFull as again:
                    full = again
            # Stopped, paused or cancelled while parked: a paused task is queued again by
            # resume, a stopped daemon requeues it on start.
        finally:
            self._parked.pop(task.id, None)
            self._blocked.pop(index, None)

    async def _wait_for_room(self, full: DiskFull, token: CancelToken | None) -> bool:
        """Wait until the disk ``full`` names has room again; False if stopped first.

        Room is what ``statvfs`` shows free; a quota it cannot see is tried again after
        ``runner.disk_full_retry_seconds``. Full disks in a row wait longer each time
        (1 s, 2 s, 4 s ... up to that setting) and only the first is logged as a warning.
        """
        self._full_streak += 1
        limit = self._settings.disk_full_retry_seconds
        least = min(_ROOM_FIRST_SECONDS * 2 ** (self._full_streak - 1), limit)
        level = logging.WARNING if self._full_streak == 1 else logging.DEBUG
        log.log(level, "%s: work waits for space and resumes by itself", full.message)
        started = time.monotonic()
        while not self._stopping and not (token is not None and token.cancelled):
            await self._sleep(_ROOM_POLL_SECONDS)
            waited = time.monotonic() - started
            if (waited >= least and _has_room(full.path)) or waited >= limit:
                return not self._stopping and not (token is not None and token.cancelled)
        return False

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when the daemon stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    # -- one task ----------------------------------------------------------

    async def _execute(self, task: TaskRecord, token: CancelToken) -> None:
        latest = await self._checkpoints.latest(task.id)
        if latest is None:
            ws = WorkState(task.id, round=task.round)
        else:
            ws = WorkState.from_json(await self._checkpoints.load(task.id, latest.commit))
            log.info(
                "task %s resumes from checkpoint %s (%s, phase %s)",
                task.id,
                latest.commit[:12],
                latest.step,
                ws.phase,
            )
        self._progress.start(
            task.id, self._steps(ws, task), self._doing(ws, task), self._steps_done(ws), ws.tokens
        )
        try:
            if task.parent_id is not None:
                await self._run_subtask(task, ws, token)
            else:
                await self._run_task(task, ws, token)
        except _Failed as exc:
            await self._finish(task.id, TaskState.FAILED, str(exc), error=str(exc))
            if task.parent_id is not None:
                await self._settle_parent(task.parent_id)
        finally:
            current = await self._store.get_task(task.id)
            if current.state in FINAL_STATES:
                self._progress.forget(task.id)
                self._parent_locks.pop(task.id, None)
                if self._acting is not None:
                    self._acting.close_workspace(task.id)
                if self._learning is not None:
                    self._learning.forget(task.id)

    async def _run_task(self, task: TaskRecord, ws: WorkState, token: CancelToken) -> None:
        if ws.phase == "done":
            # Finished and checkpointed, but its last write to the store did not happen
            # (a crash, a full disk): record the result now.
            why = self._why_done(ws)
            await self._finish(task.id, TaskState.COMPLETED, why, result=ws.result or "")
            return
        asked = await self._with_results_waited_for(task)
        assessment = await self._assess(task, ws)
        route = self._router.for_task(task)
        criteria = gates.parse_criteria(list(task.criteria))
        acting = task.act
        if ws.phase == "start":
            complexity = self._classified(task, assessment)
            ws.complexity = complexity
        if ws.phase == "start" and self._acts(task):
            assert self._acting is not None
            planned = self._acting.settings.agent.plan and self._planned(complexity, assessment)
            ws.phase = "plan" if planned else "act"
            if not task.act:
                await self._acting.records.mark_acting(task.id)
            acting = True
            how = "acts in planned steps" if planned else "acts"
            await self._save(ws, CheckpointKind.START, "start", f"{how}; runs on {route.role}")
        if acting and ws.agent is None and ws.phase in ("act", "plan"):
            assert self._agent is not None
            await self._agent.prepare(task, ws, self._save)
        if ws.phase == "start":
            planned = self._planned(complexity, assessment)
            ws.phase = "plan" if planned else "answer"
            level = assessment.level if assessment is not None else complexity.level
            await self._save(
                ws,
                CheckpointKind.START,
                "start",
                f"classified {level} ({complexity.score:.2f}); runs on {route.role}",
            )
        if ws.phase == "answer":
            messages = self._messages(asked.text)
            budget = assessment.budget if assessment and self._learning_on else None
            parted = self._decomposable(ws, assessment)
            try:
                ws.result = await self._produce(
                    task,
                    ws,
                    "answer",
                    messages,
                    criteria,
                    route,
                    token,
                    can_decompose=self._may(assessment, "decompose") and parted,
                    budget=budget,
                    retry=self._may(assessment, "retry"),
                    skipped=self._skipped(assessment, parted),
                )
            except _Decompose:
                ws.phase, ws.decomposed = "plan", True
                await self._save(
                    ws, CheckpointKind.DECOMPOSE, "decompose", "direct answers failed: decomposing"
                )
            else:
                await self._complete(task, ws)
                return
        if ws.phase == "plan":
            await self._plan(asked, ws, route, token)
        if ws.phase == "subtasks" and not await self._gather(task, ws):
            return  # waiting for its subtasks; the last one to finish queues it again
        if ws.phase == "aggregate" and ws.agent is not None:
            # An acting task's steps changed its workspace: the task itself checks the
            # whole (its done-criteria gate its finish) instead of writing an answer.
            await self._check_steps(task, ws)
        if ws.phase == "act":
            assert ws.agent is not None
            predicted = assessment.predicted_steps if assessment is not None else None
            async with self._workspace_lock(ws.agent.workspace):
                ws.result = await self._act(asked, ws, route, criteria, token, predicted)
            await self._complete(task, ws)
            return
        if ws.phase == "aggregate":
            messages = planner.aggregate_messages(
                asked.text,
                self._plan_of(ws),
                ws.outputs,
                self._planning.aggregate_chars,
                self._settings.system_prompt,
            )
            ws.result = await self._produce(
                task, ws, "aggregate", messages, criteria, route, token, can_decompose=False
            )
            await self._complete(task, ws)

    @staticmethod
    def _classified(task: TaskRecord, assessment: Assessment | None) -> planner.Complexity:
        """The rules' verdict on the task: the learning engine's, made when it assessed
        the task (the one place a task is classified); the rules' own without an engine,
        or for an assessment checkpointed before it kept the verdict."""
        rules = assessment.rules if assessment is not None else None
        return rules if rules is not None else planner.classify(task.text)

    def _decomposable(self, ws: WorkState, assessment: Assessment | None) -> bool:
        """Whether the task's predicted level is one whose failed answers are decomposed
        (``planner.decompose_levels``): the learning engine's level, else the rules'."""
        level = assessment.level if assessment is not None else None
        if level is None and ws.complexity is not None:
            level = ws.complexity.level
        return level in self._planning.decompose_levels

    def _planned(self, complexity: planner.Complexity, assessment: Assessment | None) -> bool:
        """Whether a task is planned into subtasks: complex by the rules or by history,
        and history does not advise against planning."""
        return (
            self._planning.decompose
            and (
                complexity.score >= self._planning.complex_min_score
                or self._learned_complex(assessment)
            )
            and self._may(assessment, "plan")
        )

    async def _run_subtask(self, task: TaskRecord, ws: WorkState, token: CancelToken) -> None:
        assert task.parent_id is not None and task.step is not None
        if ws.phase != "done":
            parent_state = await self._parent_state(task.parent_id)
            plan = self._plan_of(parent_state)
            outputs = {
                c.step: c.result or ""
                for c in await self._store.children(task.parent_id, task.round)
                if c.state == TaskState.COMPLETED and c.step is not None
            }
            outputs.update(parent_state.outputs)
            context = planner.dependency_context(
                plan, task.step, outputs, self._planning.context_chars
            )
            parent = await self._with_results_waited_for(await self._store.get_task(task.parent_id))
            shared = parent_state.agent
            if shared is not None:
                # Steps of one acting task share its workspace: one at a time writes there,
                # and its tree goes to the parent before the next step may start.
                async with self._workspace_lock(shared.workspace):
                    brief = planner.step_brief(parent.text, plan, task.step, context)
                    await self._act_step(task, ws, shared, brief, token)
                    await self._record_in_parent(task, ws)
            else:
                messages = planner.step_messages(
                    parent.text, plan, task.step, context, self._settings.system_prompt
                )
                ws.result = await self._produce(
                    task,
                    ws,
                    task.step,
                    messages,
                    gates.parse_criteria([]),
                    self._router.for_task(task),
                    token,
                    can_decompose=False,
                )
                ws.phase = "done"
                await self._save(
                    ws, CheckpointKind.STEP_DONE, f"{task.step} done", "subtask finished"
                )
        await self._record_in_parent(task, ws)
        if await self._finish(task.id, TaskState.COMPLETED, "step done", result=ws.result or ""):
            await self._settle_parent(task.parent_id)

    @property
    def _learning_on(self) -> bool:
        return self._learning is not None and self._learning.enabled

    def _may(self, assessment: Assessment | None, tactic: Tactic) -> bool:
        """Whether history lets this task use a costly tactic (taled.learning.selection.Tactics)."""
        return not self._learning_on or assessment is None or assessment.allows(tactic)

    def _skipped(self, assessment: Assessment | None, parted: bool) -> str:
        """Why tactics were left out, for a failure message ("" when none were);
        ``parted``: whether the task's level is one that is decomposed."""
        why = []
        if self._planning.decompose and not parted:
            why.append("decompose: not for this level (planner.decompose_levels)")
        if self._learning_on and assessment is not None:
            why += [assessment.tactics[t] for t in assessment.skip if t in assessment.tactics]
        return "; ".join(why)

    def _learned_complex(self, assessment: Assessment | None) -> bool:
        """Whether history (not the rules alone) says the task is complex."""
        return (
            self._learning_on
            and assessment is not None
            and assessment.history_weight > 0
            and assessment.level == "complex"
        )

    async def _assess(self, task: TaskRecord, ws: WorkState) -> Assessment | None:
        """The learning engine's assessment, from the checkpoint when the task resumes."""
        if self._learning is None:
            return None
        assessment = ws.estimate
        if assessment is None:
            assessment = await self._learning.assess(task, acts=self._acts(task))
            # Saved with the task's next checkpoint (its "start" one for a new task).
            ws.estimate = assessment
        self._learning.remember(task.id, assessment)
        self._progress.expect(task.id, assessment.predicted_tokens, assessment.tokens_per_second)
        log.info(
            "task %s: %s (%.2f), predicted %d tokens, budget %d, %s%s",
            task.id,
            assessment.level,
            assessment.confidence,
            assessment.predicted_tokens,
            assessment.budget,
            assessment.reason,
            "" if self._learning.enabled else " (not applied)",
        )
        return assessment

    async def _complete(self, task: TaskRecord, ws: WorkState) -> None:
        ws.phase = "done"
        await self._save(ws, CheckpointKind.DONE, "done", "task finished")
        await self._finish(task.id, TaskState.COMPLETED, self._why_done(ws), result=ws.result or "")

    @staticmethod
    def _why_done(ws: WorkState) -> str:
        if ws.agent is not None:
            calls = len(ws.agent.steps)
            how = f"finished after {ws.agent.turns} model turns and {calls} tool calls"
            if ws.plan is not None:
                how = f"did {len(ws.outputs)} planned steps, then checked the whole: " + how
            return how
        final = "aggregate" if ws.plan is not None else "answer"
        attempts = ws.attempts.get(final, [])
        how = "answered"
        if ws.plan is not None:
            how = f"aggregated {len(ws.outputs)} subtask results"
            if ws.decomposed:
                how = "decomposed after failed attempts; " + how
        if len(attempts) > 1:
            how += f" (passed on attempt {len(attempts)}: {attempts[-1].stage})"
        if attempts and attempts[-1].finish == "length":
            how += f"; answer cut at max_tokens={attempts[-1].max_tokens}"
        return how

    # -- planning and subtasks ---------------------------------------------

    @staticmethod
    def _plan_of(ws: WorkState) -> planner.Plan:
        """The plan of a task past its planning. PlanError if the checkpoint holds none:
        tale writes no such checkpoint, but a subtask may read its parent's just after
        the parent was restored to before its plan."""
        if ws.plan is None:
            raise planner.PlanError(f"task {ws.task_id} is at {ws.phase!r} and has no plan")
        return ws.plan

    async def _plan(
        self, task: TaskRecord, ws: WorkState, route: Route, token: CancelToken
    ) -> None:
        attempts = ws.attempts.setdefault("plan", [])
        plan: planner.Plan | None = None
        messages = planner.plan_messages(task.text, self._planning.max_steps)
        while plan is None and len(attempts) < self._planning.plan_attempts:
            key = AttemptKey("plan", len(attempts) + 1)
            self._progress.update(task.id, doing="planning")
            try:
                completion = await self._call(
                    task,
                    route,
                    messages,
                    self._planning.plan_max_tokens,
                    key,
                    token,
                    schema=planner.PLAN_SCHEMA,
                )
            except ModelError as exc:
                output, finish, detail, tokens = "", "error", exc.message, 0
            else:
                output, finish = completion.text, completion.finish_reason
                tokens, detail = completion.completion_tokens, ""
                try:
                    plan = planner.parse_plan(output, self._planning.max_steps)
                except planner.PlanError as exc:
                    detail = str(exc)
            attempts.append(
                Attempt(
                    key,
                    "plan",
                    route.model,
                    self._planning.plan_max_tokens,
                    output,
                    finish,
                    plan is not None,
                    detail,
                    tokens,
                )
            )
            ws.tokens += tokens
        if plan is None:
            plan = planner.heuristic_plan(task.text, self._planning.max_steps)
        ws.plan, ws.phase = plan, "subtasks"
        now = time.time()
        for attempt in attempts:
            ws.done_at.setdefault(str(attempt.key), now)
        notes = f" ({'; '.join(plan.notes)})" if plan.notes else ""
        await self._save(
            ws,
            CheckpointKind.PLAN,
            "plan",
            f"planned {len(plan.steps)} steps from {plan.source}{notes}",
        )
        self._progress.update(task.id, steps=self._steps(ws, task), step=1)

    async def _gather(self, task: TaskRecord, ws: WorkState) -> bool:
        """Collect finished subtasks; create missing ones and wait. True when all are done."""
        plan = self._plan_of(ws)
        while True:
            children = {c.step: c for c in await self._store.children(task.id, ws.round)}
            before = len(ws.outputs)
            for step in plan.steps:
                child = children.get(step.id)
                if step.id in ws.outputs or child is None:
                    continue
                if child.state == TaskState.COMPLETED:
                    ws.outputs[step.id] = child.result or ""
                elif child.state in (TaskState.FAILED, TaskState.CANCELLED):
                    why = child.error or child.state.value
                    raise _Failed(f"subtask {step.id} ({step.title}) {child.state.value}: {why}")
            if len(ws.outputs) == len(plan.steps):
                ws.phase = "aggregate"
                await self._save(
                    ws,
                    CheckpointKind.SUBTASKS_DONE,
                    "subtasks done",
                    "every step finished; " + ("checking" if ws.agent else "aggregating"),
                )
                return True
            if len(ws.outputs) != before:
                await self._save(
                    ws,
                    CheckpointKind.SUBTASKS,
                    "subtasks",
                    f"{len(ws.outputs)} of {len(plan.steps)} steps done",
                )
            specs = [
                SubtaskSpec(
                    step=s.id,
                    title=s.title,
                    text=s.instruction,
                    needs=tuple(s.needs),
                    act=ws.agent is not None,
                )
                for s in plan.steps
                if s.id not in ws.outputs
            ]
            try:
                waiting = await self._store.add_subtasks(
                    task,
                    ws.round,
                    specs,
                    f"waiting for {len(specs)} of {len(plan.steps)} subtasks",
                )
            except IllegalTransition as exc:
                log.info("task %s not moved to waiting: %s", task.id, exc.message)
                raise _Stopped from None
            if waiting:
                self._queue.wake()
                self._progress.update(task.id, doing=f"waiting for {len(specs)} subtasks")
                return False
            # Every subtask finished meanwhile: collect them again.

    async def _parent_state(self, parent_id: str) -> WorkState:
        return WorkState.from_json(await self._checkpoints.load(parent_id))

    async def _record_in_parent(self, task: TaskRecord, done: WorkState) -> None:
        """Add a finished subtask's output to its parent's checkpoint (once); an acting
        step's workspace tree too, so a restore to this point rewinds the files to it."""
        assert task.parent_id is not None and task.step is not None
        lock = self._parent_locks.setdefault(task.parent_id, asyncio.Lock())
        async with lock:
            ws = await self._parent_state(task.parent_id)
            if ws.round != task.round or task.step in ws.outputs:
                return
            ws.outputs[task.step] = done.result or ""
            if ws.agent is not None and done.agent is not None:
                ws.agent.tree = done.agent.tree
            plan_steps = 0 if ws.plan is None else len(ws.plan.steps)
            await self._save(
                ws,
                CheckpointKind.STEP_DONE,
                f"{task.step} done",
                f"subtask {task.id} finished ({len(ws.outputs)}/{plan_steps})",
            )
            self._progress.update(task.parent_id, step=1 + len(ws.outputs))

    async def _settle_parent(self, parent_id: str) -> None:
        """After a subtask ends: queue its parent when all are done, fail it if one failed."""
        parent = await self._store.get_task(parent_id)
        if parent.state != TaskState.WAITING:
            return
        children = await self._store.children(parent_id, parent.round)
        failed = [c for c in children if c.state in (TaskState.FAILED, TaskState.CANCELLED)]
        if failed:
            bad = failed[0]
            why = f"subtask {bad.step} ({bad.title}) {bad.state.value}: {bad.error or 'no reason'}"
            if self._acting is not None:
                # An acting task's steps worked in its worktree: the branch gets what they
                # left before the failure shows, as for a task that fails in its own loop.
                agent = (await self._parent_state(parent_id)).agent
                await self._acting.settle_workspace(parent, agent, "failed", why)
            if await self._finish(parent_id, TaskState.FAILED, why, TaskState.WAITING, error=why):
                await self._queue.cancel_subtasks(parent_id, f"its parent failed: {why}")
            return
        if await self._store.wake_parent(parent_id, "all subtasks done; queued to aggregate"):
            self._queue.wake()

    # -- one step, with gates and recovery ---------------------------------

    def _stages(self, route: Route, base_tokens: int, *, retry: bool = True) -> list[_Stage]:
        g = self._gating
        bigger = min(int(base_tokens * g.more_tokens_factor), 131_072)
        stages = [_Stage("first", base_tokens, route.model)]
        if route.role == "ux" and route.model is None:
            # Sent to the small model on its record: a failure escalates to the task model.
            stages += [_Stage("task model", base_tokens, None, "task")] * g.attempts
        elif retry:
            stages += [_Stage("more tokens", bigger, route.model)] * (g.attempts - 1)
        if self._fallback is not None and self._fallback != route.model:
            stages += [_Stage("fallback model", bigger, self._fallback)] * g.attempts
        return stages

    async def _produce(
        self,
        task: TaskRecord,
        ws: WorkState,
        step: str,
        messages: list[ChatMessage],
        criteria: list[gates.Criterion],
        route: Route,
        token: CancelToken,
        *,
        can_decompose: bool,
        budget: int | None = None,
        retry: bool = True,
        skipped: str = "",
    ) -> str:
        """The step's gated output: from its checkpoint, or by attempts in recovery order.

        ``budget`` (the learning engine's) replaces the first stage's max_tokens when it
        is smaller. An answer it cuts off is continued, not redone: the continuation
        gets the rest of the fixed max_tokens, and the cut is counted.
        """
        done = ws.passed(step)
        if done is not None:
            return done.output
        attempts = ws.attempts.setdefault(step, [])
        stages = self._stages(route, self._settings.max_tokens, retry=retry)
        while (at := _next_stage(stages, attempts)) < len(stages):
            stage = stages[at]
            i = len(attempts)
            key = AttemptKey(step, i + 1)
            prompt = list(messages)
            if attempts and attempts[-1].output and attempts[-1].detail:
                prompt += [
                    {"role": "assistant", "content": attempts[-1].output},
                    {"role": "user", "content": attempts[-1].detail},
                ]
            partial = ws.partial.text if ws.partial is not None and ws.partial.key == key else ""
            limit = stage.max_tokens
            budgeted = budget is not None and at == 0 and budget < stage.max_tokens
            if budgeted:
                assert budget is not None
                limit = stage.max_tokens - budget if str(key) in ws.cut else budget
            doing = self._doing_step(step, stage)
            self._progress.update(
                task.id, doing=f"{doing} (past its budget)" if str(key) in ws.cut else doing
            )
            try:
                completion = await self._call(
                    task,
                    Route(stage.role or route.role, stage.model, route.reason),
                    prompt,
                    limit,
                    key,
                    token,
                    partial_of=(ws, key, partial),
                )
            except ModelError as exc:
                attempt = Attempt(
                    key,
                    stage.name,
                    stage.model,
                    stage.max_tokens,
                    "",
                    "error",
                    False,
                    f"model error: {exc.message}",
                )

            else:
                output = partial + completion.text
                if budgeted and completion.finish_reason == "length" and str(key) not in ws.cut:
                    # Cut by the learned budget, not by the fixed limit: continue it.
                    ws.cut.append(str(key))
                    ws.truncations += 1
                    ws.tokens += completion.completion_tokens
                    ws.partial = Partial(key, output)
                    await self._save(
                        ws,
                        CheckpointKind.BUDGET_CUT,
                        "budget cut",
                        f"{key} cut at its budget of {limit} tokens; continuing up to "
                        f"{stage.max_tokens}",
                    )
                    continue
                passed, detail = await self._gate(output, criteria)
                attempt = Attempt(
                    key,
                    stage.name,
                    stage.model,
                    stage.max_tokens if budgeted and str(key) in ws.cut else limit,
                    output,
                    completion.finish_reason,
                    passed,
                    detail,
                    completion.completion_tokens,
                )
                ws.tokens += completion.completion_tokens
            attempts.append(attempt)
            ws.partial = None
            ws.done_at[str(key)] = time.time()
            verdict = "passed" if attempt.passed else f"failed: {attempt.detail[:200]}"
            kind = (
                CheckpointKind.ATTEMPT_PASSED if attempt.passed else CheckpointKind.ATTEMPT_FAILED
            )
            await self._save(ws, kind, str(key), f"{stage.name} attempt {verdict}")
            if attempt.passed:
                return attempt.output
        if can_decompose and not ws.decomposed and self._planning.decompose:
            raise _Decompose
        tried = "; ".join(
            f"{a.key} ({a.stage}, {a.max_tokens} tokens"
            f"{', ' + a.model if a.model else ''}): {a.detail[:160]}"
            for a in attempts
        )
        if can_decompose and ws.decomposed:
            tried += "; decomposed and retried"
        if skipped:
            tried += f"; not tried, from history: {skipped}"
        raise _Failed(f"every recovery step failed. Tried: {tried}")

    async def _call(
        self,
        task: TaskRecord,
        route: Route,
        messages: list[ChatMessage],
        max_tokens: int,
        key: AttemptKey,
        token: CancelToken,
        *,
        partial_of: tuple[WorkState, AttemptKey, str] | None = None,
        tools: list[ToolSpec] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """One model call of a step. Raises _Stopped if the task stops meanwhile.

        While the role's model is down and nothing serves it, the task is
        ``waiting`` (with the reason in its history) rather than failed.
        """

        pieces: list[str] = []

        def counted(piece: str) -> None:
            pieces.append(piece)
            self._progress.update(task.id, add_tokens=1)
            if task.parent_id is not None:
                self._progress.update(task.parent_id, add_tokens=1)

        partial = partial_of[2] if partial_of is not None else ""
        while True:
            pieces.clear()
            answered = asyncio.Event()
            saver = None
            if partial_of is not None and self._settings.partial_checkpoint_seconds > 0:
                saver = asyncio.create_task(self._save_partials(partial_of, pieces, answered))
            completion: Completion | None = None
            try:
                completion = await self._pool.complete(
                    ModelCall(
                        route.role,
                        messages,
                        model=route.model,
                        max_tokens=max_tokens,
                        temperature=self._settings.temperature,
                        timeout=self._settings.call_timeout_seconds,
                        task_id=task.id,
                        cancel=token,
                        key=key,
                        on_piece=counted,
                        on_restart=pieces.clear,
                        think=self._learning.think(task) if self._learning is not None else None,
                        partial=partial,
                        tools=tools,
                        schema=schema,
                    )
                )
            except RoleDown as exc:
                down = exc.message
            finally:
                # Let a save in progress land before anything else is checkpointed:
                # a stale partial committed after the attempt would hide the attempt.
                answered.set()
                if saver is not None:
                    await saver
            if completion is not None:
                if completion.finish_reason != "cancelled":
                    return completion
                await self._stopped_mid_call(task, completion, partial_of)
                raise _Stopped
            if not token.cancelled:
                if not await self._finish(
                    task.id, TaskState.WAITING, f"{down}; the task waits for it"
                ):
                    raise _Stopped
                served = await self._pool.wait_until_served(route.role, token)
                back = "the model is back" if served else "stopped while waiting for the model"
                if not await self._finish(task.id, TaskState.RUNNING, back, TaskState.WAITING):
                    raise _Stopped  # cancelled or paused while waiting
            if token.cancelled:
                await self._stopped_mid_call(task, None, partial_of)
                raise _Stopped

    async def _save_partials(
        self,
        partial_of: tuple[WorkState, AttemptKey, str],
        pieces: list[str],
        answered: asyncio.Event,
    ) -> None:
        """Checkpoint the answer so far every ``partial_checkpoint_seconds`` until it ends."""
        ws, key, earlier = partial_of
        saved = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), self._settings.partial_checkpoint_seconds)
            if answered.is_set():
                return
            if len(pieces) > saved:
                saved = len(pieces)
                ws.partial = Partial(key, earlier + "".join(pieces))
                await self._save(
                    ws,
                    CheckpointKind.PARTIAL,
                    "partial",
                    f"{len(ws.partial.text)} chars of {key} so far",
                )

    async def _stopped_mid_call(
        self,
        task: TaskRecord,
        completion: Completion | None,
        partial_of: tuple[WorkState, AttemptKey, str] | None,
    ) -> None:
        """Checkpoint what a stopped call had written; requeue the task on shutdown."""
        if partial_of is not None and completion is not None and completion.text:
            ws, key, earlier = partial_of
            ws.partial = Partial(key, earlier + completion.text)
            why = "daemon stopping" if self._stopping else "paused or cancelled"
            await self._save(
                ws,
                CheckpointKind.PAUSE,
                "pause",
                f"{why} during {key}: {len(ws.partial.text)} chars kept",
            )
        if self._stopping:
            await self._finish(
                task.id,
                TaskState.QUEUED,
                "daemon stopped mid-task; it resumes from its checkpoint on the next start",
            )

    async def _gate(
        self, output: str, criteria: list[gates.Criterion], run: gates.RunCheck | None = None
    ) -> tuple[bool, str]:
        """Whether the output passes its gates, and the feedback for the model if not."""
        try:
            outcome = await gates.check(
                output, criteria, self._gating, scratch_root=self._scratch, command=run
            )
        except Unavailable as exc:
            # Never run the code unprotected: the gate fails, saying how to turn it off.
            return False, (
                f"the code gate could not run: {exc.message}; set gates.python_code = false "
                "in taled.toml to accept code unchecked"
            )
        return outcome.passed, "" if outcome.passed else outcome.feedback

    # -- helpers -----------------------------------------------------------

    async def _save(
        self, ws: WorkState, kind: CheckpointKind, step: str, message: str
    ) -> Checkpoint:
        return await self._checkpoints.commit(
            ws.task_id,
            ws.to_json(),
            step=step,
            message=message,
            kind=kind,
            workspace=ws.agent.tree if ws.agent is not None else None,
            base=ws.agent.base_tree if ws.agent is not None else None,
        )

    # -- acting ------------------------------------------------------------

    def _workspace_lock(self, root: str) -> asyncio.Lock:
        """The lock one workspace's writers hold: the loops of an acting task's planned
        steps (and the task's own) never run in it at the same time."""
        lock = self._workspace_locks.get(root)
        if lock is None:
            lock = self._workspace_locks[root] = asyncio.Lock()
        return lock

    async def _act_step(
        self,
        task: TaskRecord,
        ws: WorkState,
        shared: AgentState,
        brief: str,
        token: CancelToken,
    ) -> None:
        """One planned step of an acting task: its own loop (its own turns, calls and
        checkpoints) in its parent's workspace; hold the workspace's lock around it."""
        assert self._agent is not None
        if ws.agent is None:
            try:
                await self._agent.prepare_step(task, ws, shared, brief, self._save)
            except WorkspaceGone as exc:
                raise _Failed(str(exc)) from None
        ws.result = await self._act(task, ws, self._router.for_task(task), [], token)
        ws.phase = "done"
        await self._save(ws, CheckpointKind.STEP_DONE, f"{task.step} done", "subtask finished")

    async def _check_steps(self, task: TaskRecord, ws: WorkState) -> None:
        """After an acting task's planned steps: its loop goes on from the workspace the
        steps left, told their results, to check the whole and finish."""
        assert self._acting is not None and ws.agent is not None
        plan = self._plan_of(ws)
        try:
            workspace = self._acting.open_workspace(task.id, ws.agent.workspace)
        except NotFound as exc:
            raise _Failed(exc.message) from None
        async with self._workspace_lock(ws.agent.workspace):
            with self._acting.pinned():
                ws.agent.tree = await self._acting.snapshot(workspace)
                ws.agent.brief = planner.check_brief(
                    plan, ws.outputs, self._planning.aggregate_chars
                )
                ws.phase = "act"
                await self._save(
                    ws, CheckpointKind.ACT_START, "check", "every step finished; checking the whole"
                )

    def _acts(self, task: TaskRecord) -> bool:
        """Whether a task runs the agent loop: it asked to (a workspace, --act, a run:
        criterion), or the classifier sees it plainly needs files made or commands run."""
        if self._agent is None or self._acting is None or task.parent_id is not None:
            return False
        if task.act:
            return True
        return self._acting.settings.agent.classify and needs_tools(task.text)

    async def _act(
        self,
        task: TaskRecord,
        ws: WorkState,
        route: Route,
        criteria: list[gates.Criterion],
        token: CancelToken,
        predicted_steps: int | None = None,
    ) -> str:
        """Run the agent loop; progress counts tool calls against the learned prediction."""
        assert self._agent is not None and self._acting is not None
        acting = self._acting
        settings = acting.settings.agent

        async def call_model(
            messages: list[ChatMessage], tools: list[ToolSpec], key: AttemptKey
        ) -> Completion:
            done = len(ws.agent.steps) if ws.agent is not None else 0
            self._progress.update(
                task.id,
                doing=f"turn {key.number}",
                step=done,
                steps=max(predicted_steps or 0, done + 1),
            )
            return await self._call(
                task, route, messages, settings.max_tokens, key, token, tools=tools
            )

        async def gate(text: str, workspace: Workspace) -> tuple[bool, str]:
            async def command(line: str) -> tuple[bool, str]:
                result = await sandbox.run_command(
                    line,
                    workspace=workspace.root,
                    limits=acting.settings.run,
                    sandbox=self._gating.sandbox,
                    scratch_root=self._scratch,
                )
                if result.exit_code == 0:
                    return True, f"run:{line} exited 0"
                why = result.reason or f"exited with status {result.exit_code}"
                return False, f"run:{line} {why}. Its output:\n{result.output[-1500:]}"

            return await self._gate(text, criteria, run=command)

        parts = LoopParts(call_model=call_model, save=self._save, gate=gate, token=token)
        try:
            result = await self._agent.run(task, ws, parts)
        except (CannotGoOn, WorkspaceGone) as exc:
            # A git worktree's branch gets the work either way, before the task's end shows.
            await acting.settle_workspace(task, ws.agent, "failed", str(exc))
            raise _Failed(str(exc)) from None
        await acting.settle_workspace(task, ws.agent, "completed", result)
        return result

    async def _with_results_waited_for(self, task: TaskRecord) -> TaskRecord:
        """The task as its model reads it: one submitted to run after others has their
        results after its text, sharing ``planner.context_chars``, and is told which of
        them failed or were cancelled (it runs regardless of them: ``--after-any``)."""
        needs = [] if task.parent_id is not None else await self._store.dependencies(task.id)
        if not needs:
            return task
        results, missing = [], []
        for need in needs:
            first_line = need.text.strip().partition("\n")[0]
            about = f"task {need.id}: {one_line(first_line, 80)}"
            if need.state == TaskState.COMPLETED:
                results.append((about, need.result or ""))
                continue
            why = one_line(need.error or "no reason recorded", 200)
            results.append((f"{about} ({need.state})", f"(no result: it {need.state}: {why})"))
            missing.append(f"{need.id} {need.state}")
        text = (
            f"{task.text}\n\nResults of the tasks this one waits for:\n\n"
            + planner.results_context(results, self._planning.context_chars)
        )
        if missing:
            text += (
                f"\n\nNot all of them completed ({'; '.join(missing)}): do what you can "
                "without their results, and say what is missing."
            )
        return replace(task, text=text)

    def _messages(self, text: str) -> list[ChatMessage]:
        return [
            {"role": "system", "content": self._settings.system_prompt},
            {"role": "user", "content": text},
        ]

    @staticmethod
    def _steps(ws: WorkState, task: TaskRecord) -> int:
        if task.parent_id is not None or ws.plan is None:
            return 1
        return len(ws.plan.steps) + 2  # plan, the steps, aggregate

    @staticmethod
    def _steps_done(ws: WorkState) -> int:
        if ws.phase == "done":
            return 1 if ws.plan is None else len(ws.plan.steps) + 2
        if ws.plan is None:
            return 0
        return 1 + len(ws.outputs) + (1 if ws.phase == "aggregate" and ws.result else 0)

    @staticmethod
    def _doing(ws: WorkState, task: TaskRecord) -> str:
        if task.parent_id is not None:
            return task.title or f"step {task.step}"
        return {"start": "starting", "answer": "answering", "plan": "planning"}.get(
            ws.phase, "working"
        )

    @staticmethod
    def _doing_step(step: str, stage: _Stage) -> str:
        what = {"answer": "answering", "aggregate": "aggregating"}.get(step, f"step {step}")
        return what if stage.name == "first" else f"{what} ({stage.name})"

    async def _finish(
        self,
        task_id: str,
        target: TaskState,
        reason: str,
        expect: TaskState = TaskState.RUNNING,
        **fields: Any,
    ) -> bool:
        """Move the task unless it left ``expect`` meanwhile (say, cancelled); True if moved."""
        try:
            await self._store.transition(task_id, target, reason, expect=expect, **fields)
        except IllegalTransition as exc:
            # Cancelled (or otherwise moved) while the model was answering.
            log.info("task %s not moved to %s: %s", task_id, target, exc.message)
            return False
        log.info("task %s %s: %s", task_id, target, reason)
        if self._learning is not None and target in (TaskState.COMPLETED, TaskState.FAILED):
            await self._learn_from(task_id)
        return True

    async def _learn_from(self, task_id: str) -> None:
        """Hand a finished top-level task to the learning engine."""
        assert self._learning is not None
        try:
            task = await self._store.get_task(task_id)
            if task.parent_id is not None:
                return
            saved = await self._checkpoints.latest(task_id)
            ws = None
            if saved is not None:
                ws = WorkState.from_json(await self._checkpoints.load(task_id, saved.commit))
            outcome = await self._learning.record(task, ws)
        except Exception:
            # What is learned is advice: a failure to record it must never fail the task.
            log.exception("task %s: its outcome could not be recorded for learning", task_id)
            return
        if outcome is not None:
            log.info(
                "task %s learned: %d tokens (predicted %s), %s, %s, %d cut",
                task_id,
                outcome.completion_tokens,
                outcome.predicted_tokens,
                count(outcome.steps, "step", "steps"),
                count(outcome.retries, "retry", "retries"),
                outcome.truncations,
            )

    # -- restore -------------------------------------------------------------

    async def restore(self, task_id: str, commit: str | None) -> tuple[TaskRecord, Checkpoint]:
        """Rewind a paused or failed task to a checkpoint and queue it again.

        Without ``commit``, the newest checkpoint that is not a failed attempt.
        Subtasks of the abandoned plan round are cancelled; finished steps in
        the restored state are kept.

        One step as far as anyone can see: the store records the restore first
        (``restore_to``), then the checkpoint is written, then the task is queued
        and the record cleared in one transaction. A daemon killed in between
        finishes the restore when it starts again (``recover``), before it answers.
        """
        task = await self._store.get_task(task_id)
        if task.state not in (TaskState.PAUSED, TaskState.FAILED):
            hint = "" if task.state in FINAL_STATES else f" (`tale pause {task_id}` first)"
            raise IllegalTransition(
                f"task {task_id} is {task.state}; only a paused or failed task can be "
                f"restored{hint}"
            )
        history = await self._checkpoints.list(task_id)
        if not history:
            raise InvalidInput(f"task {task_id} has no checkpoints to restore")
        if commit is None:
            target = next(
                (c for c in history if c.kind != CheckpointKind.ATTEMPT_FAILED), history[-1]
            )
        else:
            matches = [c for c in history if c.commit.startswith(commit.lower())]
            if len(matches) != 1:
                problem = "no checkpoint" if not matches else "more than one checkpoint matching"
                raise InvalidInput(
                    f"task {task_id} has {problem} {commit}; `tale checkpoints {task_id}` "
                    "lists them"
                )
            target = matches[0]
        # Shielded: a caller that goes away mid-restore must not leave half of one.
        with anyio.CancelScope(shield=True):
            await self._store.mark_restore(task_id, target.commit, task.state)
            try:
                saved, ws = await self._write_restore(task, target)
            except BaseException:
                # Its checkpoint was not written: the restore did not happen at all.
                await self._store.unmark_restore(task_id)
                raise
            await self._queue_restored(task, target, ws)
        return await self._store.get_task(task_id), saved

    async def _write_restore(
        self, task: TaskRecord, target: Checkpoint
    ) -> tuple[Checkpoint, WorkState]:
        """A restore's checkpoint, after cancelling the abandoned round's subtasks.

        Only a restore raises a checkpoint's round above the store's: a latest state
        with a higher round is this restore's own, written before a crash cut it off.
        """
        current = WorkState.from_json(await self._checkpoints.load(task.id))
        latest = await self._checkpoints.latest(task.id)
        if current.round > task.round and latest is not None:
            return latest, current
        ws = WorkState.from_json(await self._checkpoints.load(task.id, target.commit))
        ws.round = current.round + 1
        if ws.agent is not None:
            await self._rewind_workspace(task, ws)
        await self._queue.cancel_subtasks(
            task.id, f"superseded: its parent was restored to {target.commit[:12]}"
        )
        saved = await self._save(
            ws,
            CheckpointKind.RESTORE,
            "restore",
            f"restored to {target.commit[:12]} ({target.step}: {target.message})",
        )
        return saved, ws

    async def _rewind_workspace(self, task: TaskRecord, ws: WorkState) -> None:
        """Files rewound with the state: the workspace becomes the checkpoint's tree.

        Calls the checkpoint had not finished (proposed, waiting for a person, running)
        are proposed again, so they are decided afresh; their old approvals go.
        Idempotent: a restore a crash cut off does it again.
        """
        assert ws.agent is not None
        if self._acting is None:
            raise Unavailable("this daemon runs no acting tasks; the workspace cannot be rewound")
        workspace = self._acting.open_workspace(task.id, ws.agent.workspace, create=True)
        await self._acting.checkout(workspace, ws.agent.tree)
        for step in ws.agent.steps:
            if step.status in ("proposed", "awaiting", "running"):
                step.status, step.approval = "proposed", None
        finished = [str(s.call["id"]) for s in ws.agent.steps if s.status in ("done", "denied")]
        await self._acting.records.forget_except(task.id, finished)

    async def _queue_restored(self, task: TaskRecord, target: Checkpoint, ws: WorkState) -> None:
        """Queue a task whose restore checkpoint is written; clears its restore record."""
        reason = f"restored to checkpoint {target.commit[:12]} ({target.step})"
        if not await self._store.finish_restore(task.id, reason, ws.round):
            current = await self._store.get_task(task.id)
            raise IllegalTransition(
                f"task {task.id} became {current.state} while being restored; it was not queued"
            )
        self._queue.wake()
