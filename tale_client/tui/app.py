"""The tale app: three screens (chat, board, dashboard) over one connection to the daemon.

One supervisor owns the connection: it connects, hands the API to the screens
(``connection_signal``), waits for the connection to drop, shows the
daemon-is-down screen with a countdown, and tries again, for as long as the app
runs. Screens never reconnect themselves; a call that finds no daemon just
returns nothing and the supervisor does the rest.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import ClassVar, Literal

from textual.app import App
from textual.binding import Binding, BindingType
from textual.signal import Signal

from tale_client import paths
from tale_client.tui.api import Api
from tale_client.tui.client import DaemonUnreachable, TaleClient
from tale_client.tui.commands import TaleCommands
from tale_client.tui.messages import OpenTask
from tale_client.tui.model import Task, TaskRef
from tale_client.tui.screens.board import BoardScreen
from tale_client.tui.screens.chat import ChatScreen
from tale_client.tui.screens.dashboard import DashboardScreen
from tale_client.tui.screens.down import DownScreen
from tale_client.tui.screens.task import TaskScreen

__all__ = ["RETRY_SECONDS", "SCREENS", "ScreenName", "TaleApp", "build_app"]

ScreenName = Literal["chat", "board", "dashboard", "down"]
RETRY_SECONDS = 2.0
_STARTING_POLL_SECONDS = 0.25
_KNOWN_TASKS = 500  # tasks remembered for the palette's "open task"


class TaleApp(App[None]):
    """Chat, board and dashboard of one tale daemon."""

    TITLE = "tale"
    CSS_PATH = "tale.tcss"
    COMMANDS: ClassVar = App.COMMANDS | {TaleCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "show('chat')", "Chat"),
        Binding("f2", "show('board')", "Board"),
        Binding("f3", "show('dashboard')", "Dashboard"),
        # Digits too, where no text box takes them (the board, the dashboard).
        Binding("1", "show('chat')", show=False),
        Binding("2", "show('board')", show=False),
        Binding("3", "show('dashboard')", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        screen: ScreenName = "chat",
        socket: Path | None = None,
        autostart: bool = False,
        live: bool = True,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        super().__init__()
        self.socket = socket if socket is not None else paths.socket_path()
        self.start_screen: ScreenName = screen
        self.autostart = autostart
        self.live = live
        self.retry_seconds = retry_seconds
        self.client: TaleClient | None = None
        self.api: Api | None = None
        self.connection_signal: Signal[Api | None] = Signal(self, "connection")
        self.known_tasks: dict[str, Task] = {}
        self.chat_screen = ChatScreen(live=live)
        self.board_screen = BoardScreen(live=live)
        self.dashboard_screen = DashboardScreen(live=live)
        self.down_screen = DownScreen(self.socket)
        self.add_mode("chat", lambda: self.chat_screen)
        self.add_mode("board", lambda: self.board_screen)
        self.add_mode("dashboard", lambda: self.dashboard_screen)
        self.add_mode("down", lambda: self.down_screen)
        # The screen to go back to when the daemon returns.
        self._return_mode: str = screen if screen != "down" else "chat"
        self._retry = asyncio.Event()
        self._daemon_proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._ever_connected = False
        self._spawned: list[subprocess.Popen[bytes]] = []

    async def on_mount(self) -> None:
        if not self.live:
            await self.switch_mode(self.start_screen)
            return
        # The first try happens before any screen shows, so a running daemon
        # never flashes the down screen and a stopped one never flashes the chat.
        try:
            client: TaleClient | None = await TaleClient.connect(self.socket)
        except DaemonUnreachable as exc:
            client = None
            await self.switch_mode("down")
            self._went_down(str(exc))
        else:
            await self.switch_mode(self.start_screen)
        self.run_worker(self._supervise(client), group="connection", exclusive=True)

    async def on_unmount(self) -> None:
        # Stop the supervisor first: the hang-up below is not a daemon going down.
        self._stopping = True
        self.workers.cancel_group(self, "connection")
        if self.client is not None:
            await self.client.close()

    # -- the connection --------------------------------------------------------------

    async def _supervise(self, client: TaleClient | None) -> None:
        """Keep a connection to the daemon for as long as the app runs."""
        reason = ""
        while True:
            if client is None:
                try:
                    client = await TaleClient.connect(self.socket)
                except DaemonUnreachable as exc:
                    reason = str(exc)
                    self._went_down(reason)
                    # Only at launch: a daemon stopped later was stopped on purpose.
                    if self.autostart and not self._spawned and not self._ever_connected:
                        self.start_daemon()
                    await self._count_down(reason)
                    continue
            self._came_up(client)
            reason = await client.wait_closed()
            client = None
            self._went_down(reason)
            await self._count_down(reason)

    def _came_up(self, client: TaleClient) -> None:
        # A daemon this app started is up: nothing more to say about starting it.
        self._daemon_proc = None
        self._ever_connected = True
        self.client = client
        self.api = Api(client)
        if self.current_mode == "down":
            self.switch_mode(self._return_mode)
        self.connection_signal.publish(self.api)

    def _went_down(self, reason: str) -> None:
        if self._stopping:
            return
        was_up = self.api is not None
        self.client = None
        self.api = None
        if self.current_mode != "down":
            self._return_mode = self.current_mode
            self.switch_mode("down")
        self.down_screen.show(reason, self.retry_seconds, self._start_note())
        if was_up:
            self.connection_signal.publish(None)

    async def _count_down(self, reason: str) -> None:
        """Wait ``retry_seconds`` (or until retry_now), showing the seconds left."""
        # A daemon this app is starting answers within a second or so: look often.
        wait = _STARTING_POLL_SECONDS if self._starting() else self.retry_seconds
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.down_screen.show(reason, left, self._start_note())
            try:
                await asyncio.wait_for(self._retry.wait(), min(1.0, left))
            except TimeoutError:
                continue
            break
        self._retry.clear()
        self.down_screen.show(reason, 0, self._start_note())

    def _starting(self) -> bool:
        return self._daemon_proc is not None and self._daemon_proc.poll() is None

    def retry_now(self) -> None:
        """Try to reach the daemon now instead of at the end of the countdown."""
        self._retry.set()

    def start_daemon(self) -> None:
        """Start taled in the background, the way ``tale daemon start`` does."""
        if self._starting():
            self.notify("taled is already starting")
            return
        from tale_client.daemon import Route, probe, spawn_daemon, start_daemon

        found = probe()
        if found.route is Route.SYSTEMD:
            # systemd runs it here: start the unit (as `tale daemon start` does), not a
            # second daemon it does not know about. systemctl waits for READY=1, so it
            # runs off the app's loop; the countdown finds the socket when it answers.
            self.notify("starting taled through systemd (systemctl --user start taled)")

            def through_systemd() -> None:
                try:
                    start_daemon()
                except DaemonUnreachable as exc:  # systemctl's own message, and the journal's
                    self.call_from_thread(self.notify, str(exc), severity="error")

            self.run_worker(through_systemd, thread=True)
            self.retry_now()
            return
        try:
            # Its own session: the daemon outlives the app (and a ctrl+c in it).
            self._daemon_proc = proc = spawn_daemon()
        except DaemonUnreachable as exc:  # the data dir or the log cannot be written
            self.notify(str(exc), severity="error")
            return
        # Kept for the app's life: a Popen dropped while its process runs warns.
        self._spawned.append(proc)
        self.down_screen.show(self.down_screen.reason, 0, self._start_note())
        self.retry_now()

    def _start_note(self) -> str:
        """What became of the daemon this app started, if it started one."""
        proc = self._daemon_proc
        if proc is None:
            return ""
        code = proc.poll()
        if code is None:
            return f"Starting taled (pid {proc.pid}); its log: {paths.log_file()}"
        if code == 3:
            return "Another taled owns the socket; waiting for it to answer."
        from tale_client.daemon import log_tail

        return f"taled exited with code {code}. From {paths.log_file()}:\n{log_tail(8)}"

    # -- navigation ------------------------------------------------------------------

    def action_show(self, mode: str) -> None:
        """Switch to the chat, the board or the dashboard."""
        if self.current_mode == "down":
            self._return_mode = mode
            self.notify(f"the daemon is down; {mode} shows when it is back", severity="warning")
            return
        self.switch_mode(mode)

    def open_task(self, task_id: str) -> None:
        """Show a task's screen over the current one."""
        if self.current_mode == "down":
            self.notify("the daemon is down", severity="warning")
            return
        self.push_screen(TaskScreen(task_id, live=self.live))

    def on_open_task(self, message: OpenTask) -> None:
        """A card, a chat marker or a subtask asked to open a task."""
        self.open_task(message.task_id)

    def new_conversation(self) -> None:
        """Go to the chat and start a new conversation."""
        self.action_show("chat")
        if self.current_mode == "chat":
            self.call_next(self.chat_screen.action_new_conversation)

    def new_task(self) -> None:
        """Go to the board and ask for a new task."""
        self.action_show("board")
        if self.current_mode == "board":
            self.call_next(self.board_screen.action_new_task)

    # -- what the palette knows -------------------------------------------------------

    def remember_tasks(self, tasks: list[Task]) -> None:
        """Tasks seen on the board, for "open task" in the palette."""
        for task in tasks:
            self.known_tasks[task.id] = task
        while len(self.known_tasks) > _KNOWN_TASKS:
            del self.known_tasks[next(iter(self.known_tasks))]

    def remember_task_ref(self, ref: TaskRef) -> None:
        """A task the chat handed off."""
        self.remember_tasks([Task(id=ref.id, state=ref.state, priority=50, text=ref.text)])


SCREENS: tuple[ScreenName, ...] = ("chat", "board", "dashboard", "down")


def build_app(
    screen: str = "chat",
    socket: Path | None = None,
    autostart: bool = False,
    live: bool = True,
    retry_seconds: float = RETRY_SECONDS,
) -> TaleApp:
    """The app, opening on ``screen``; ``live=False`` renders only data it is given (tests)."""
    for name in SCREENS:
        if name == screen:
            break
    else:
        raise ValueError(f"unknown screen {screen!r}; one of: {', '.join(SCREENS[:3])}")
    return TaleApp(
        screen=name,
        socket=socket,
        autostart=autostart,
        live=live,
        retry_seconds=retry_seconds,
    )
