"""Hooks: the user's commands, run when a top-level task ends or waits for them.

``[hooks] on_done``, ``on_failed`` and ``on_waiting`` are command lines run by
``/bin/sh -c`` with the notice as one line of JSON on stdin (``Notice.to_json``). They
run in the sandbox (``taled.sandbox.sandbox.run_command``) like the agent's ``run``
tool: the kernel's fences, ``[tools.run]``'s CPU, memory and process limits, the wall
clock of ``hooks.timeout_seconds``, no network unless ``hooks.network``. Their only
writable directory is ``hooks.workdir`` (or, unset, a fresh empty one removed after
the run); nothing of the daemon's data is visible to them.

One background task runs them one at a time from a bounded queue: the runner never
waits for a hook, a full queue drops a run (logged), and a hook's exit status, timeout
or failure to start is logged and changes nothing else. Their output is not logged
(it may well repeat the task's text, which the log never holds): a hook that wants a
record writes one in its workdir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from taled.errors import Unavailable
from taled.notify.notice import Notice, NoticeKind
from taled.notify.throttle import Throttle
from taled.sandbox import sandbox
from taled.settings import HookSettings, RunToolSettings, SandboxSettings

__all__ = ["Hooks"]

log = logging.getLogger(__name__)

# The setting that names each kind's hook.
SETTING = {
    NoticeKind.COMPLETED: "on_done",
    NoticeKind.FAILED: "on_failed",
    NoticeKind.WAITING: "on_waiting",
}
# Past the hook's own wall clock, how long setting the sandbox up and tearing it down
# may take before the run is abandoned (its processes are killed either way).
_SETUP_SECONDS = 30.0
# Per-run working directories (removed after the run), and what a killed daemon left.
_WORKDIR_PREFIX = "tale-sandbox-hook-"


@dataclass(frozen=True)
class _Run:
    setting: str
    command: str
    notice: Notice


class Hooks:
    """Runs the configured hooks of notices offered to it, one at a time, in the sandbox."""

    def __init__(
        self,
        settings: HookSettings,
        run_limits: RunToolSettings,
        sandbox_settings: SandboxSettings,
        scratch: Path,
    ) -> None:
        self._settings = settings
        self._limits = run_limits.model_copy(
            update={"timeout_seconds": settings.timeout_seconds, "network": settings.network}
        )
        self._sandbox = sandbox_settings
        # Their own directory under the scratch root: cleared of leftovers at start.
        self._scratch = scratch / "hooks"
        self._queue: asyncio.Queue[_Run] = asyncio.Queue(settings.queue_size)
        self._drops = Throttle(log)

    def kinds(self) -> set[NoticeKind]:
        """The kinds of notice a hook is configured for."""
        return {k for k, name in SETTING.items() if getattr(self._settings, name).strip()}

    def offer(self, notice: Notice) -> None:
        """Queue the notice's hook, if one is configured; never waits (full: dropped)."""
        name = SETTING.get(notice.kind)
        command = getattr(self._settings, name).strip() if name else ""
        if not name or not command:
            return
        try:
            self._queue.put_nowait(_Run(name, command, notice))
        except asyncio.QueueFull:
            self._drops.warning(
                "hook %s for task %s dropped: %d hook runs are waiting (hooks.queue_size)",
                name,
                notice.task.id,
                self._queue.qsize(),
            )

    async def remove_leftovers(self) -> None:
        """Remove the working directories of runs a stopped daemon cut short."""
        await asyncio.to_thread(sandbox.remove_leftovers, self._scratch)

    async def run(self) -> None:
        """Run queued hooks one after another, for ever (cancel to stop)."""
        while True:
            job = await self._queue.get()
            try:
                await self._run(job)
            except Exception:  # one hook's trouble never stops the next ones
                log.exception("hook %s for task %s", job.setting, job.notice.task.id)

    async def _run(self, job: _Run) -> None:
        task_id = job.notice.task.id
        stdin = json.dumps(job.notice.to_json(), ensure_ascii=False) + "\n"
        try:
            async with self._workdir() as workdir:
                result = await asyncio.wait_for(
                    sandbox.run_command(
                        job.command,
                        workspace=workdir,
                        limits=self._limits,
                        sandbox=self._sandbox,
                        scratch_root=self._scratch,
                        stdin=stdin,
                    ),
                    self._limits.timeout_seconds + _SETUP_SECONDS,
                )
        except Unavailable as exc:
            log.warning("hook %s for task %s not run: %s", job.setting, task_id, exc.message)
            return
        except TimeoutError:
            log.warning(
                "hook %s for task %s abandoned: the sandbox did not finish it", job.setting, task_id
            )
            return
        except (OSError, ValueError) as exc:
            log.warning("hook %s for task %s not run: %s", job.setting, task_id, exc)
            return
        if result.timed_out:
            log.warning(
                "hook %s for task %s killed after %g s (hooks.timeout_seconds)",
                job.setting,
                task_id,
                self._limits.timeout_seconds,
            )
        elif result.exit_code != 0:
            how = (
                f"exit status {result.exit_code}"
                if result.exit_code is not None
                else f"killed by {result.signal or 'a signal'}"
            )
            log.warning(
                "hook %s for task %s failed: %s after %.1f s (%d bytes of output, not logged)",
                job.setting,
                task_id,
                how,
                result.duration,
                result.output_bytes,
            )
        else:
            log.info("hook %s for task %s ran in %.1f s", job.setting, task_id, result.duration)

    @asynccontextmanager
    async def _workdir(self) -> AsyncIterator[Path]:
        """The configured workdir (made if missing), or a fresh one removed afterwards."""
        if self._settings.workdir:
            where = Path(self._settings.workdir).expanduser()
            where.mkdir(parents=True, exist_ok=True)
            yield where
            return
        self._scratch.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=self._scratch))
        try:
            yield fresh
        except asyncio.CancelledError:
            # The daemon stops: the sandbox may still be handing the directory back (a
            # root daemon's run); the next start removes it.
            raise
        except BaseException:
            await asyncio.to_thread(sandbox.remove_leftovers, self._scratch)
            raise
        # Only this worker runs under the hooks' scratch root: all there is this run's.
        await asyncio.to_thread(sandbox.remove_leftovers, self._scratch)
