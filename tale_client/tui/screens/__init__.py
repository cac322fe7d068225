"""The TUI's screens: chat, board, task, dashboard, the daemon-is-down screen, and the
modal boxes (confirm, new task, approval)."""

from __future__ import annotations

from tale_client.tui.screens.approval import ApprovalScreen
from tale_client.tui.screens.board import BoardScreen
from tale_client.tui.screens.chat import ChatScreen
from tale_client.tui.screens.confirm import ConfirmScreen
from tale_client.tui.screens.dashboard import DashboardScreen
from tale_client.tui.screens.down import DownScreen
from tale_client.tui.screens.task import TaskScreen

__all__ = [
    "ApprovalScreen",
    "BoardScreen",
    "ChatScreen",
    "ConfirmScreen",
    "DashboardScreen",
    "DownScreen",
    "TaskScreen",
]
