"""The command palette's tale commands: the screens, the actions, and "open task ID"."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tale_client.tui.client import DaemonUnreachable, RpcError
from tale_client.tui.widgets.task_card import short_text

if TYPE_CHECKING:
    from tale_client.tui.app import TaleApp

__all__ = ["TaleCommands"]

_TASK_ID = re.compile(r"\b[0-9a-f]{12}\b")


class TaleCommands(Provider):
    """Screens, actions and the tasks tale knows, by name."""

    @property
    def _tale(self) -> TaleApp:
        return cast("TaleApp", self.app)

    async def startup(self) -> None:
        """Fetch the task list, so "open task" offers the newest tasks."""
        api = self._tale.api
        if api is None:
            return
        # Without the list, the palette still offers the tasks it already knew.
        with contextlib.suppress(DaemonUnreachable, RpcError, TimeoutError):
            self._tale.remember_tasks(await api.list_tasks(limit=100))

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        app = self._tale
        return [
            ("Chat", "The conversation (F1)", partial(app.action_show, "chat")),
            ("Board", "Tasks by state (F2)", partial(app.action_show, "board")),
            (
                "Dashboard",
                "Pool, queue, tokens, latency (F3)",
                partial(app.action_show, "dashboard"),
            ),
            ("New conversation", "Start a new chat (ctrl+n on the chat)", app.new_conversation),
            ("New task", "Queue a task typed in a box", app.new_task),
            ("Retry the connection", "Try to reach the daemon now", app.retry_now),
        ]

    async def discover(self) -> Hits:
        """The commands, before anything is typed."""
        for name, help_text, command in self._commands():
            yield DiscoveryHit(name, command, help=help_text)

    async def search(self, query: str) -> Hits:
        """Commands and tasks matching what was typed; a whole task id opens that task."""
        matcher = self.matcher(query)
        for name, help_text, command in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), command, help=help_text)
        known = self._tale.known_tasks
        for task in list(known.values()):
            label = f"Open task {task.id} {short_text(task.text, 50)}"
            score = matcher.match(label)
            if score > 0:
                yield Hit(
                    score,
                    matcher.highlight(label),
                    partial(self._tale.open_task, task.id),
                    text=label,
                    help=task.state,
                )
        typed = _TASK_ID.search(query.lower())
        if typed is not None and typed.group() not in known:
            task_id = typed.group()
            yield Hit(1.0, f"Open task {task_id}", partial(self._tale.open_task, task_id))
