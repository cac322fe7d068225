"""The scheduler's clock: what time it is, and how to wait.

The scheduler reads the time and sleeps only through a ``Clock``, so tests drive it with
one of their own (``tests/test_schedules.py`` has a clock that moves when told to).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock time as a UTC epoch, and sleeping."""

    def now(self) -> float:
        """Seconds since the epoch (UTC), as ``time.time()``."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` of this clock's time (at once when <= 0)."""
        ...


class SystemClock:
    """The machine's clock."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))
