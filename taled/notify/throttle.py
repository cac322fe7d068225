"""A failure that repeats is logged once, then at most once per interval, with a count."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Throttle"]


class Throttle:
    """Rate-limits one kind of log line: the first is said, then one per ``interval``
    seconds saying how many were held back since."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    @property
    def failing(self) -> bool:
        """Something was said (or held back) since the last ``clear``."""
        return self._last is not None

    def warning(self, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING unless one was logged within the interval."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            message += " (%d more like it not logged since)"
            args = (*args, held)
        self._log.warning(message, *args)

    def clear(self) -> None:
        """The failure is over: the next one is said at once."""
        self._last = None
        self._held = 0
