"""Custom Textual messages the TUI's widgets send up to their screen and the app."""

from __future__ import annotations

from textual.message import Message

__all__ = ["OpenTask"]


class OpenTask(Message):
    """Show a task's screen (a board card, a chat marker, a subtask or the palette asked)."""

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
