"""A live progress bar for one task on stderr (``tale submit --wait`` on a terminal).

Kept out of ``cli.py`` so rich's progress machinery loads only when a bar is shown.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tale_client.sanitize import printable

__all__ = ["ProgressBar"]


class ProgressBar:
    """Shows ``watch_task`` progress events: step i of n, and the daemon's progress line."""

    def __init__(self, task_id: str) -> None:
        self._bar = Progress(
            TextColumn(f"[bold]{task_id}[/]"),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._id = self._bar.add_task("submitted", total=None)

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._bar.stop()

    def update(self, step: float, total: float | None, message: str) -> None:
        """Move the bar to ``step`` of ``total`` (indeterminate without one)."""
        # The message quotes the task: neither its escape sequences nor its brackets
        # (rich markup) may reach the terminal as anything but text.
        description = escape(printable(message))
        self._bar.update(self._id, completed=step, total=total, description=description)
