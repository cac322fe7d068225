"""The TUI's screens: chat, board, task, dashboard, and the daemon-is-down screen."""

from __future__ import annotations

from tale_client.tui.screens.board import BoardScreen
from tale_client.tui.screens.chat import ChatScreen
from tale_client.tui.screens.confirm import ConfirmScreen
from tale_client.tui.screens.dashboard import DashboardScreen
from tale_client.tui.screens.down import DownScreen
from tale_client.tui.screens.task import TaskScreen

__all__ = [
    "BoardScreen",
    "ChatScreen",
    "ConfirmScreen",
    "DashboardScreen",
    "DownScreen",
    "TaskScreen",
]
