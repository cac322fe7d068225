"""``retention.keep_days``, applied: finished top-level tasks last updated longer ago
are forgotten, as ``tale purge`` forgets them.

The sweep starts after READY: it first finishes a forgetting a crash cut off, then
forgets what is past ``keep_days``, and again every ``sweep_interval_hours``. It runs in
a task of its own (the workers never wait for it); a failure is logged and the next
round tries again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from taled.retention.forget import Forgetting
from taled.settings import RetentionSettings

__all__ = ["Sweep"]

log = logging.getLogger(__name__)

_DAY = 86_400.0


class Sweep:
    """Forgets tasks past ``retention.keep_days`` on a timer."""

    def __init__(self, forgetting: Forgetting, settings: RetentionSettings) -> None:
        self._forgetting = forgetting
        self._settings = settings

    async def run(self) -> None:
        """Finish an interrupted forgetting, then sweep now and every interval."""
        try:
            await self._forgetting.recover()
        except Exception:  # the sweep must outlive any one failure
            log.exception("an interrupted forgetting could not be finished; retried at next start")
        while True:
            await self.once()
            await anyio.sleep(self._settings.sweep_interval_hours * 3600)

    async def once(self, now: float | None = None) -> dict[str, Any] | None:
        """One sweep: forget what is past ``keep_days`` (None when it is 0, or it failed)."""
        days = self._settings.keep_days
        if days <= 0:
            return None
        cutoff = (time.time() if now is None else now) - days * _DAY
        try:
            report = await self._forgetting.purge_before(cutoff, dry_run=False)
        except Exception:  # the sweep must outlive any one failure
            log.exception("the retention sweep failed; the next one tries again")
            return None
        for skipped in report["skipped"]:
            log.info("retention: task %s kept for now: %s", skipped["id"], skipped["reason"])
        return report
