"""The daemon: its services, wired in one place, with explicit phases.

    startup   lock the socket path → check the database (quick_check; a damaged
              one stops start-up with a line naming it and `tale doctor`) → open the
              store → open the checkpoint repository and check its refs
              → the embedder's clients (if learning.embeddings is set; no I/O)
              → the learning engine → requeue interrupted tasks (each resumes from
              its latest checkpoint; a crash, not a kill, counts against them) and
              finish restores a crash cut off → load the models → listen → READY=1 → start
              the workers; in the background, load the embedding model, back
              the database up (then every store.backup_interval_minutes), and
              finish a forgetting a crash cut off, then forget tasks past
              retention.keep_days (then every retention.sweep_interval_hours)
              → start the scheduler (its first pass runs or skips, by schedules.missed,
              what came due while the daemon was down) → start sending notifications
              (desktop and hooks) of what tasks did, from the first commit on
    main loop serve MCP sessions and ping the watchdog until SIGTERM/SIGINT
    shutdown  STOPPING=1 → refuse new tasks → let running calls finish within the
              grace period, then stop them (their tasks go back to the queue)
              → close the socket → unload models → release the embedder
              → flush and close the store → back it up (if it changed)

Signal handlers only set a flag; everything else happens in ``serve``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import anyio
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from taled import __version__, doctor, paths
from taled.chat.service import ChatService
from taled.checkpoints.repo import CheckpointStore
from taled.checkpoints.retention import Retention
from taled.daemon.crashlog import CrashLog
from taled.daemon.sdnotify import Notifier
from taled.daemon.server import Services, build_server
from taled.daemon.transport import SocketListener
from taled.db.acting import ActingRecords
from taled.db.schedules import ScheduleRecords
from taled.db.store import Store
from taled.errors import TaleError
from taled.learning.embeddings import EmbeddingService
from taled.learning.engine import LearningEngine
from taled.models.backends.compute import COMPUTE
from taled.models.pool import ModelPool
from taled.models.routing import Router
from taled.notify.service import Notifications
from taled.reporting.metrics import Metrics
from taled.reporting.monitor import Monitor
from taled.reporting.usage import UsageReport
from taled.retention.forget import Forgetting
from taled.retention.sweep import Sweep
from taled.schedules.service import Schedules
from taled.settings import Settings
from taled.tasks.progress import ProgressHub
from taled.tasks.queue import TaskQueue
from taled.tasks.runner import Runner
from taled.tools.mcp_client import McpServers
from taled.tools.service import Acting

__all__ = ["App"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _unwrap_one() -> Iterator[None]:
    """Re-raise a task group's lone TaleError as itself (start-up errors have exit codes)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], TaleError):
            raise group.exceptions[0] from None
        raise


class App:
    """taled's services and their lifecycle."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.store = Store(
            paths.data_dir() / "tale.db", settings.store, settings.queue.write_batch_max
        )
        self.queue = TaskQueue(self.store, settings.queue)
        # The process's one compute thread reads it when it starts, at the first job.
        COMPUTE.policy = settings.models.llamacpp.cpu_policy
        self.pool = ModelPool(settings.models, self.store, loops=settings.loops)
        # Optional: similar tasks found by meaning as well as words (learning.embeddings).
        self.embeddings = (
            EmbeddingService.from_settings(settings.learning, settings.models)
            if settings.learning.embeddings
            else None
        )
        self.learning = LearningEngine(
            self.store,
            settings.learning,
            settings.models,
            ceiling=settings.runner.max_tokens,
            thinks=self.pool.thinks,
            embeddings=self.embeddings,
        )
        # The learning engine may send simple tasks to ux when history says it succeeds there.
        self.router = Router(advisor=self.learning)
        cp = settings.checkpoints
        self.checkpoints = CheckpointStore(
            paths.data_dir() / "checkpoints.git",
            fsync=cp.fsync,
            contention_timeout_seconds=cp.contention_timeout_seconds,
            max_state_bytes=cp.max_state_bytes,
        )
        self.retention = Retention(self.store, self.checkpoints, cp)
        self.crash_log = CrashLog(paths.data_dir() / "crash.log")
        self.progress = ProgressHub()
        # Acting: the user's MCP servers, the built-in tools, approvals and workspaces.
        self.mcp = McpServers(settings.tools.mcp, log_dir=paths.log_file().parent)
        self.acting = Acting(
            settings.tools,
            settings.gates.sandbox,
            ActingRecords(self.store),
            self.checkpoints,
            data_dir=paths.data_dir(),
            scratch=paths.data_dir() / "scratch",
            mcp=self.mcp,
        )
        self.runner = Runner(
            self.store,
            self.queue,
            self.pool,
            self.checkpoints,
            self.progress,
            self.router,
            settings=settings.runner,
            planning=settings.planner,
            gating=settings.gates,
            workers=settings.queue.workers,
            fallback=settings.models.fallback or None,
            scratch=paths.data_dir() / "scratch",
            learning=self.learning,
            acting=self.acting,
        )
        self.listener = SocketListener(
            paths.socket_path(),
            paths.lock_file(),
            max_frame_bytes=settings.server.max_frame_bytes,
            max_connections=settings.server.max_connections,
        )
        self.chat = ChatService(
            self.pool, settings.chat, self.router, self.store, self.queue, self.progress
        )
        self.monitor = Monitor(self.store, settings.metrics)
        self.metrics = Metrics(
            self.store,
            settings.metrics,
            workers=settings.queue.workers,
            ready_seconds=lambda: self.ready_seconds,
            monitor=self.monitor,
        )
        self.usage = UsageReport(self.store, self.monitor, settings.usage, settings.chat)
        # Tasks that run later or again; the scheduler starts after READY.
        self.schedules = Schedules(ScheduleRecords(self.store), self.queue, settings.schedules)
        # Forgetting tasks (tale delete / purge) and retention.keep_days.
        self.forgetting = Forgetting(
            self.store,
            self.checkpoints,
            self.acting,
            self.runner,
            self.progress,
            self.learning,
            data_dir=paths.data_dir(),
            backups=paths.data_dir() / "backups",
            take_backups=bool(settings.store.backup_interval_minutes),
            title_chars=settings.chat.title_chars,
        )
        self.sweep = Sweep(self.forgetting, settings.retention)
        # Desktop notifications and hooks: they watch the store's state changes.
        self.notifications = Notifications(
            self.store,
            ActingRecords(self.store),
            settings.notifications,
            settings.hooks,
            run_limits=settings.tools.run,
            sandbox=settings.gates.sandbox,
            scratch=paths.data_dir() / "scratch",
        )
        self.server = build_server(
            Services(
                store=self.store,
                queue=self.queue,
                status=self.status,
                models=self.models_status,
                chat=self.chat,
                runner=self.runner,
                checkpoints=self.checkpoints,
                progress=self.progress,
                metrics=self.metrics,
                usage=self.usage,
                acting=self.acting,
                forgetting=self.forgetting,
                schedules=self.schedules,
                list_limit=settings.queue.list_limit,
                max_list_limit=settings.queue.max_list_limit,
                conversation_limit=settings.chat.list_limit,
                stream_interval=settings.chat.stream_interval_ms / 1000,
                schedule_limit=settings.schedules.list_limit,
            )
        )
        self._init_options = self.server.create_initialization_options()
        self._stop = anyio.Event()
        self.ready_seconds: float | None = None
        self._started_at = time.time()
        # Set once the store passed its check and opened: only then is it backed up.
        self._store_opened = False

    async def status(self) -> dict[str, Any]:
        """What ``tale daemon status`` shows."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "socket": str(self.listener.path),
            "database": str(self.store.path),
            "uptime_seconds": round(time.time() - self._started_at, 1),
            "ready_seconds": self.ready_seconds,
            "workers": {
                "busy": self.runner.busy,
                "limit": self.settings.queue.workers,
                **self.runner.health(),
            },
            "tasks": await self.store.count_by_state(),
            "waiting_for_you": len(await self.acting.pending()),
            "models": [
                {
                    "role": r.role,
                    "backend": r.backend,
                    "model": r.model,
                    "loaded": r.loaded,
                    "health": r.health,
                }
                for r in self.pool.status()
            ],
            "learning": self.learning.status(),
        }

    async def models_status(self) -> dict[str, Any]:
        """What ``tale models`` shows: every model the pool knows, with its health."""
        return {"models": [asdict(r) for r in self.pool.status()]}

    def request_stop(self) -> None:
        """Ask the daemon to shut down (safe to call from a signal handler)."""
        self._stop.set()

    async def serve(self) -> None:
        """Run the daemon until asked to stop. Start-up errors propagate."""
        started = time.perf_counter()
        # Signals are caught from the first instant: a SIGTERM during start-up (or
        # right after READY=1) must still end in a graceful stop, not a kill.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, _unwrap_one():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._on_signals, signals)
                try:
                    await self._startup()
                    # Start-up leaves a large, long-lived heap (SDK, SQLAlchemy, models'
                    # metadata); freezing it keeps the collector's full passes (and the
                    # pauses they put into request latency) to what requests allocate.
                    gc.freeze()
                    self.ready_seconds = time.perf_counter() - started
                    self.notifier.notify("READY=1", f"STATUS=ready in {self.ready_seconds:.2f} s")
                    log.info(
                        "taled ready in %.2f s on %s (pid %s)",
                        self.ready_seconds,
                        self.listener.path,
                        os.getpid(),
                    )
                    tg.start_soon(self.listener.serve, self._session)
                    tg.start_soon(self.notifier.watchdog, self.settings.daemon.watchdog_fraction)
                    tg.start_soon(self.retention.run)
                    self.monitor.note_ready(
                        self.ready_seconds,
                        [f"{r.role}={r.backend}:{r.model}" for r in self.pool.status()],
                    )
                    tg.start_soon(self.monitor.run)
                    # After READY, not before: the embedding model's load must not delay it.
                    tg.start_soon(self.learning.warm)
                    tg.start_soon(self._backups)
                    tg.start_soon(self.sweep.run)
                    tg.start_soon(self.mcp.start)
                    if self.settings.schedules.enabled:
                        # Its first pass applies the missed-run policy to what came due
                        # while the daemon was down.
                        tg.start_soon(self.schedules.run)
                    tg.start_soon(self.notifications.run)
                    await self._stop.wait()
                    self.notifier.notify("STOPPING=1")
                    log.info("shutting down")
                    await self.runner.stop(self.settings.daemon.shutdown_grace_seconds)
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()

    async def _on_signals(self, signals: Any) -> None:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            self.request_stop()

    async def _startup(self) -> None:
        self.listener.lock()
        paths.secure_data_dir()
        check = self.settings.store.check_on_start
        if check:
            rebuilt = await anyio.to_thread.run_sync(doctor.check_store_on_start, self.store.path)
            for table in rebuilt:
                log.warning("the full-text index %s was damaged; rebuilt it", table)
        await self.store.open()
        self._store_opened = True
        await self.monitor.start()
        await self.checkpoints.open()
        if check:
            await doctor.check_checkpoints_on_start(self.checkpoints)
        if self.embeddings is not None:
            await self.embeddings.start()
        await self.learning.start()
        # Interrupted tasks go back to the queue; a crash (not a kill) counts against
        # them, and restores a crash cut off are finished, before anyone can look.
        await self.runner.recover(self.crash_log.arm())
        await self.pool.start()
        await self.listener.listen()
        if self._stop.is_set():
            return
        await self.runner.start()

    async def _shutdown(self) -> None:
        # Each step undoes only what start-up got to, so this runs after any failure.
        await self.listener.close()
        await self.mcp.stop()
        await self.chat.stop()
        await self.pool.stop()
        await self.learning.stop()
        if self.embeddings is not None:
            await self.embeddings.stop()
        await self.checkpoints.close()
        await self.monitor.stop()
        await self.store.close()
        self.crash_log.disarm()
        if self._store_opened:
            await self._backup()
        log.info("taled stopped")

    async def _backups(self) -> None:
        """Back the database up now, then every ``store.backup_interval_minutes``."""
        minutes = self.settings.store.backup_interval_minutes
        while minutes:
            await self._backup()
            await anyio.sleep(minutes * 60)

    async def _backup(self) -> None:
        if not self.settings.store.backup_interval_minutes:
            return
        try:
            made = await self.store.backup(
                paths.data_dir() / "backups", self.settings.store.backups_keep
            )
        except TaleError as exc:
            log.error("no backup made: %s", exc.message)
        except (OSError, sqlite3.Error) as exc:
            # A full disk, say: the daemon goes on; the next round tries again.
            log.error("no backup made of %s: %s", self.store.path, exc)
        else:
            if made is not None:
                log.info("database backed up to %s", made)

    async def _session(
        self,
        read: ReadStream[SessionMessage | Exception],
        write: WriteStream[SessionMessage],
    ) -> None:
        await self.server.run(read, write, self._init_options)
