"""The conversation's pieces: what the person said, the reply, and a task marker."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Markdown, Static

from tale_client.tui.messages import OpenTask
from tale_client.tui.model import FINAL_STATES, TaskRef
from tale_client.tui.widgets.task_card import short_text

__all__ = ["AssistantMessage", "TaskMarker", "UserMessage"]


class UserMessage(Static):
    """A message the person sent."""

    def __init__(self, text: str) -> None:
        super().__init__(escape(text), classes="message user", markup=True)
        self.border_title = "you"


class TaskMarker(Static, can_focus=True):
    """``→ task 3fa9c01b22de queued``: the message became this task; enter opens it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "open", "Open task")]

    def __init__(self, task: TaskRef) -> None:
        super().__init__(classes="task-marker")
        self.ref = task
        self.update(self._line())

    @property
    def final(self) -> bool:
        """Whether the task has ended (no more updates to show)."""
        return self.ref.state in FINAL_STATES

    def show_state(self, state: str, detail: str = "") -> None:
        """The task moved on: show its new state."""
        self.ref = TaskRef(self.ref.id, state, self.ref.text)
        self.update(self._line(detail))

    def _line(self, detail: str = "") -> str:
        line = f"→ task [b]{self.ref.id}[/b] {self.ref.state}"
        if detail:
            line += f" · {escape(detail)}"
        if self.ref.text:
            line += f"  [dim]{escape(short_text(self.ref.text, 50))}[/dim]"
        return line

    def action_open(self) -> None:
        """Open the task's screen."""
        self.post_message(OpenTask(self.ref.id))

    def on_click(self) -> None:
        """A click opens the task too."""
        self.action_open()


class AssistantMessage(Vertical):
    """The reply: markdown that grows as pieces stream in, then what it led to."""

    def __init__(self, text: str = "") -> None:
        super().__init__(classes="message assistant")
        self._initial = text
        self.border_title = "tale"

    def compose(self) -> ComposeResult:
        yield Markdown(self._initial)

    @property
    def markdown(self) -> Markdown:
        """The reply's text."""
        return self.query_one(Markdown)

    async def finish(self, meta: str, task: TaskRef | None = None) -> None:
        """Add the line under the reply (tokens, intent) and the task marker, if any."""
        if meta:
            await self.mount(Static(meta, classes="meta"))
        if task is not None:
            await self.mount(TaskMarker(task))

    async def fail(self, reason: str) -> None:
        """The reply did not finish: say why, in the message."""
        self.add_class("error")
        await self.mount(Static(f"[b]✗[/b] {escape(reason)}", classes="meta"))
