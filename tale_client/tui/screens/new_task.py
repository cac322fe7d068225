"""A small box to type a new task into (the board's ``n``)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

__all__ = ["NewTaskScreen"]


class NewTaskScreen(ModalScreen[str | None]):
    """Dismisses with the text typed (enter), or None (escape)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="new-task-box"):
            yield Static("[b]New task[/b]: what should tale do? (enter queues it, escape cancels)")
            yield Input(placeholder="e.g. Write a Python function that reverses a string")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter queues the text (an empty box queues nothing)."""
        self.dismiss(event.value.strip() or None)
