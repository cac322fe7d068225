"""A task on the board: id, short text, priority, and progress while it runs."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.binding import Binding, BindingType
from textual.events import Click
from textual.widgets import Static

from tale_client.tui.messages import OpenTask
from tale_client.tui.model import Task

__all__ = ["TaskCard", "short_text"]


def short_text(text: str, width: int = 60) -> str:
    """The first ``width`` characters of ``text`` on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class TaskCard(Static, can_focus=True):
    """One task as a card; enter or a click opens it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "open", "Open", show=False)]

    def __init__(self, task: Task, asking: int = 0) -> None:
        super().__init__(self._render_task(task, asking), classes="card", id=f"card-{task.id}")
        self.tale_task = task
        self.asking = asking
        self._apply_classes(task)

    @property
    def task_id(self) -> str:
        """The id of the task shown."""
        return self.tale_task.id

    def show(self, task: Task, asking: int = 0) -> None:
        """Show a newer version of the task, and how many of its approvals wait for a
        person (only repainting when either changed)."""
        if task == self.tale_task and asking == self.asking:
            return
        self.tale_task = task
        self.asking = asking
        self._apply_classes(task)
        self.update(self._render_task(task, asking))

    def _apply_classes(self, task: Task) -> None:
        self.set_class(task.state == "cancelled", "cancelled")
        self.set_class(task.state == "running", "running")
        self.set_class(bool(self.asking), "asking")

    @staticmethod
    def _render_task(task: Task, asking: int = 0) -> str:
        head = f"[b]{task.id}[/b]  [dim]P{task.priority}[/dim]"
        if task.state == "cancelled":
            head += "  [i]✗ cancelled[/i]"
        lines = [head, escape(short_text(task.title or task.text))]
        if asking:
            count = f"{asking} " if asking > 1 else ""
            lines.append(f"[b]⚠ {count}waiting for you[/b]")
        if task.progress is not None and task.state == "running":
            lines.append(f"[dim]{escape(task.progress.short())}[/dim]")
        elif task.tokens and task.final:
            lines.append(f"[dim]{task.tokens} tok[/dim]")
        return "\n".join(lines)

    def action_open(self) -> None:
        """Open this task's screen."""
        self.post_message(OpenTask(self.tale_task.id))

    def on_click(self, event: Click) -> None:
        """A click focuses the card; a double click opens it."""
        self.focus()
        if event.chain >= 2:
            self.action_open()
