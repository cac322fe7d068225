"""Notifications: what the store's state changes mean to a person, sent on.

The service watches the store (``Store.watch``): every committed state change of every
task passes there, whoever made it (the runner, a person's cancel, an approval asked
for), so nothing that moves tasks knows this service exists. The watcher only keeps the
changes that could matter (to completed, failed, cancelled or waiting, of a kind some
channel wants) in a bounded queue; one background task reads the task and turns each
into a ``Notice``, or into nothing:

* a planned task's step that ends says nothing (its top-level task will);
* ``waiting`` is a notice only when the task (or a planned step of it) waits for a
  person — a pending approval or question it asked in that move — never when a
  planned task waits for its steps; the notice is about the top-level task;
* a task forgotten meanwhile (``tale delete``) says nothing.

Each notice goes to the desktop (``notifications.on``) and to its hook, each through a
queue of its own; neither can hold the other up, nor anything outside this service.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import anyio

from taled.db.acting import ActingRecords
from taled.db.store import Moved, Store, TaskRecord
from taled.errors import NotFound, TaleError
from taled.notify.desktop import Desktop, session_bus_address
from taled.notify.hooks import Hooks
from taled.notify.notice import Notice, NoticeKind
from taled.notify.throttle import Throttle
from taled.settings import HookSettings, NotificationSettings, RunToolSettings, SandboxSettings
from taled.tasks.lifecycle import TaskState

__all__ = ["Notifications"]

log = logging.getLogger(__name__)

_KIND = {
    TaskState.COMPLETED: NoticeKind.COMPLETED,
    TaskState.FAILED: NoticeKind.FAILED,
    TaskState.CANCELLED: NoticeKind.CANCELLED,
    TaskState.WAITING: NoticeKind.WAITING,
}
# State changes waiting to be read; past it they are dropped (logged).
_QUEUE = 1000
# How far up a planned task's steps may nest.
_MAX_DEPTH = 16


class Notifications:
    """Turns committed state changes into notices for the desktop and the hooks."""

    def __init__(
        self,
        store: Store,
        records: ActingRecords,
        settings: NotificationSettings,
        hooks: HookSettings,
        *,
        run_limits: RunToolSettings,
        sandbox: SandboxSettings,
        scratch: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._store = store
        self._records = records
        self._settings = settings
        env = os.environ if environ is None else environ
        self._address = session_bus_address(env) if settings.desktop else None
        self.desktop = Desktop(settings, self._address) if self._address is not None else None
        self.hooks = Hooks(hooks, run_limits, sandbox, scratch)
        self._on_desktop = {NoticeKind(k) for k in settings.on} if self.desktop else set()
        self._wanted = self._on_desktop | self.hooks.kinds()
        self._moves: asyncio.Queue[Moved] = asyncio.Queue(_QUEUE)
        self._drops = Throttle(log)
        if self._wanted:
            store.watch(self._moved)

    def _moved(self, moved: Moved) -> None:
        """The store's watcher: keep what may become a notice; never wait."""
        kind = _KIND.get(moved.to_state)
        if kind is None or kind not in self._wanted:
            return
        try:
            self._moves.put_nowait(moved)
        except asyncio.QueueFull:
            self._drops.warning(
                "no notification of task %s becoming %s: %d state changes wait to be read",
                moved.task_id,
                moved.to_state.value,
                self._moves.qsize(),
            )

    async def run(self) -> None:
        """Send notices until cancelled (started after READY; changes committed before
        wait in the queue)."""
        if self._settings.desktop and self._address is None:
            log.info(
                "desktop notifications are off: no D-Bus session bus "
                "(DBUS_SESSION_BUS_ADDRESS is unset and $XDG_RUNTIME_DIR/bus is not there)"
            )
        try:
            await self.hooks.remove_leftovers()
        except OSError as exc:
            log.warning("hooks' leftover directories not removed: %s", exc)
        async with anyio.create_task_group() as tg:
            if self.desktop is not None:
                tg.start_soon(self.desktop.run)
            if self.hooks.kinds():
                tg.start_soon(self.hooks.run)
            await self._dispatch()

    async def _dispatch(self) -> None:
        while True:
            moved = await self._moves.get()
            try:
                notice = await self._notice(moved)
            except NotFound:
                continue  # forgotten since (tale delete)
            except TaleError as exc:
                log.warning("no notification of task %s: %s", moved.task_id, exc.message)
                continue
            except Exception:  # the daemon must outlive any one notice's trouble
                log.exception("no notification of task %s", moved.task_id)
                continue
            if notice is None:
                continue
            if notice.kind in self._on_desktop and self.desktop is not None:
                self.desktop.offer(notice)
            self.hooks.offer(notice)

    async def _notice(self, moved: Moved) -> Notice | None:
        """The notice a state change makes, or None (see the module's docstring)."""
        kind = _KIND[moved.to_state]
        task = await self._store.get_task(moved.task_id)
        if kind is not NoticeKind.WAITING:
            return None if task.parent_id is not None else Notice(kind, task, moved.at)
        # Asked in this move, still unanswered: a person is needed (a planned task
        # waiting for its steps has asked nothing itself).
        asks = tuple(a for a in await self._records.pending(task.id) if a.task_id == task.id)
        if not asks:
            return None
        top = await self._top(task)
        return Notice(kind, top, moved.at, asks)

    async def _top(self, task: TaskRecord) -> TaskRecord:
        """The top-level task a (planned) task belongs to."""
        for _ in range(_MAX_DEPTH):
            if task.parent_id is None:
                break
            task = await self._store.get_task(task.parent_id)
        return task
