"""Widgets the TUI's screens are built from."""

from __future__ import annotations

from tale_client.tui.widgets.approvals import ApprovalBanner
from tale_client.tui.widgets.messages import AssistantMessage, TaskMarker, UserMessage
from tale_client.tui.widgets.task_card import TaskCard

__all__ = ["ApprovalBanner", "AssistantMessage", "TaskCard", "TaskMarker", "UserMessage"]
