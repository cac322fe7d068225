"""Shown while no daemon answers: what is wrong, what to run, and when the next try is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, cast

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

if TYPE_CHECKING:
    from tale_client.tui.app import TaleApp

__all__ = ["DownScreen"]


class DownScreen(Screen[None]):
    """The daemon is down; the app retries on its own and comes back when it answers."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "retry", "Retry now"),
        Binding("s", "start", "Start the daemon"),
        Binding("q", "app.quit", "Quit", show=False),
    ]

    def __init__(self, socket: Path) -> None:
        super().__init__()
        self.socket = socket
        self.reason = ""
        self.retry_in: float | None = None
        self.starting = ""

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="down-box"):
            yield Static("[b]The tale daemon is down[/b]", id="down-title")
            yield Static(id="down-reason")
            yield Static(
                "Start it with [b]tale daemon start[/b] (or press [b]s[/b]); under systemd: "
                "[b]systemctl --user start taled[/b]. Its log: [b]tale daemon logs[/b].",
                id="down-help",
            )
            yield Static(id="down-starting")
            yield Static(id="down-retry")
        yield Footer()

    def on_mount(self) -> None:
        self._refresh_text()

    def show(self, reason: str, retry_in: float | None = None, starting: str | None = None) -> None:
        """Update what the screen says: why, when the next try is, and a start attempt."""
        self.reason = reason
        self.retry_in = retry_in
        if starting is not None:
            self.starting = starting
        # Not before it is composed, nor while the app takes it down.
        if self.is_mounted and self.display:
            self._refresh_text()

    def _refresh_text(self) -> None:
        self.query_one("#down-reason", Static).update(
            f"Socket [b]{escape(str(self.socket))}[/b]\n{escape(self.reason)}"
        )
        starting = self.query_one("#down-starting", Static)
        starting.update(escape(self.starting))
        starting.display = bool(self.starting)
        retry = (
            "retrying…"
            if self.retry_in is None or self.retry_in <= 0
            else f"retrying in {max(1, round(self.retry_in))} s"
        )
        self.query_one("#down-retry", Static).update(f"[dim]{retry}[/dim]")

    def action_retry(self) -> None:
        """Try to connect now."""
        cast("TaleApp", self.app).retry_now()

    def action_start(self) -> None:
        """Start taled in the background, as `tale daemon start` would."""
        cast("TaleApp", self.app).start_daemon()
