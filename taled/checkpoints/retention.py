"""Checkpoint retention: finished tasks keep only their newest few checkpoints.

A running task needs its whole chain (any step may be restored); once a task
has been finished for ``compact_after_seconds``, its history is rewritten to
the ``keep_finished`` newest checkpoints, and every ``gc_every`` rounds the
repository is repacked and unreachable objects pruned, so it stays small and
``git fsck`` clean however many tasks have run.
"""

from __future__ import annotations

import logging
import time

import anyio

from taled.checkpoints.repo import CheckpointStore
from taled.db.store import Store
from taled.errors import TaleError
from taled.settings import CheckpointSettings
from taled.text import count

__all__ = ["Retention"]

log = logging.getLogger(__name__)


class Retention:
    """Runs compaction and repacking of the checkpoint repository on a timer."""

    def __init__(
        self, store: Store, checkpoints: CheckpointStore, settings: CheckpointSettings
    ) -> None:
        self._store = store
        self._checkpoints = checkpoints
        self._settings = settings
        # Tasks already compacted in this daemon's life: a finished task never grows again.
        self._compacted: set[str] = set()

    async def run(self) -> None:
        """Compact every ``maintenance_interval_seconds``; repack every ``gc_every`` rounds."""
        rounds = 0
        while True:
            await anyio.sleep(self._settings.maintenance_interval_seconds)
            try:
                await self.compact_finished()
                rounds += 1
                if rounds % self._settings.gc_every == 0:
                    report = await self._checkpoints.gc()
                    log.info("checkpoint repository repacked: %s", report)
            except TaleError as exc:
                # Maintenance must never take the daemon down; it retries next round.
                log.warning("checkpoint maintenance failed (retried next round): %s", exc.message)

    async def compact_finished(self, now: float | None = None) -> int:
        """Compact the checkpoints of tasks finished long enough ago; return how many went."""
        cutoff = (time.time() if now is None else now) - self._settings.compact_after_seconds
        ids = [t for t in await self._checkpoints.task_ids() if t not in self._compacted]
        removed = 0
        for task_id in await self._store.finished_before(ids, cutoff):
            removed += await self._checkpoints.compact(task_id, self._settings.keep_finished)
            self._compacted.add(task_id)
        if removed:
            log.info("compacted %s of finished tasks", count(removed, "checkpoint", "checkpoints"))
        return removed
