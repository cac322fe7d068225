"""The banner of what tasks wait for: tool calls to approve, questions to answer."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from textual.widgets import Static

from tale_client.tui.model import Approval
from tale_client.tui.widgets.task_card import short_text

__all__ = ["ApprovalBanner"]

_LINES_SHOWN = 3


class ApprovalBanner(Static):
    """A line per pending approval (the first few), hidden while nothing waits."""

    DEFAULT_CSS = """
    ApprovalBanner {
        height: auto;
        padding: 0 1;
        color: $text-warning;
        background: $warning 15%;
        text-style: none;
    }
    """

    def __init__(self, key: str = "a", with_task: bool = True, id: str | None = None) -> None:
        super().__init__(id=id)
        self.key = key
        self.with_task = with_task
        self.approvals: tuple[Approval, ...] = ()
        self.display = False

    def show(self, approvals: Sequence[Approval]) -> None:
        """Show these approvals (repainting only when they changed)."""
        shown = tuple(approvals)
        if shown == self.approvals:
            return
        self.approvals = shown
        self.display = bool(shown)
        if shown:
            self.update(self._render_lines(shown))

    def _render_lines(self, approvals: tuple[Approval, ...]) -> str:
        count = len(approvals)
        things = "thing waits" if count == 1 else "things wait"
        lines = [f"[b]⚠ {count} {things} for you[/b] · press [b]{self.key}[/b] to decide"]
        for a in approvals[:_LINES_SHOWN]:
            task = f"task [b]{a.task_id}[/b] " if self.with_task else ""
            kind = "asks" if a.is_question else "wants"
            lines.append(f"  {task}{kind}: {escape(short_text(a.summary, 90))}")
        if count > _LINES_SHOWN:
            lines.append(f"  … and {count - _LINES_SHOWN} more")
        return "\n".join(lines)
