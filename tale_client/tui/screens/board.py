"""The task board: one column per state, refreshed about once a second.

Cards move between columns as their tasks change state, and the focus follows
the task it was on, so pausing a task and resuming it keeps it selected. What
acting tasks wait for (tool calls to approve, questions) is polled with the
tasks: a banner lists it, the cards of those tasks are marked, and ``a`` opens
the approval dialog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Static

from tale_client.tui.api import Api
from tale_client.tui.model import BOARD_COLUMNS, Approval, DaemonStatus, Task, board_column
from tale_client.tui.screens._base import TaleScreen
from tale_client.tui.screens.approval import ask_person
from tale_client.tui.screens.confirm import ConfirmScreen
from tale_client.tui.screens.new_task import NewTaskScreen
from tale_client.tui.widgets.approvals import ApprovalBanner
from tale_client.tui.widgets.task_card import TaskCard

__all__ = ["PRIORITY_STEP", "BoardColumn", "BoardScreen", "order_column"]

# Finished columns would grow without end; the newest are the interesting ones.
_FINISHED_SHOWN = 30
PRIORITY_STEP = 10
REFRESH_SECONDS = 1.0

# An action on one task: (api, task id) -> the task in its new state.
_TaskCall = Callable[[Api, str], Awaitable[Task]]


def order_column(column: str, tasks: Iterable[Task]) -> list[Task]:
    """A column's cards, top first: the queue in the order it runs, the rest newest first."""
    items = list(tasks)
    if column in ("queued", "running", "waiting", "paused"):
        # list_tasks is newest first; the runner takes the highest priority, oldest first.
        items.sort(key=lambda t: (-t.priority, t.created_at))
        return items
    items.sort(key=lambda t: t.updated_at, reverse=True)
    return items[:_FINISHED_SHOWN]


class BoardColumn(Vertical):
    """A column: a header (the state, a count, a WIP limit) over its cards."""

    def __init__(self, name: str) -> None:
        super().__init__(id=f"col-{name}", classes="column")
        self.column = name

    def compose(self) -> ComposeResult:
        yield Static(self.column, classes="column-header")
        yield VerticalScroll(classes="column-body")

    @property
    def body(self) -> VerticalScroll:
        """Where the cards are."""
        return self.query_one(".column-body", VerticalScroll)

    @property
    def cards(self) -> list[TaskCard]:
        """The cards, top first."""
        return [c for c in self.body.children if isinstance(c, TaskCard)]

    def set_header(self, text: str, over_limit: bool = False) -> None:
        """The header line."""
        header = self.query_one(".column-header", Static)
        header.update(text)
        header.set_class(over_limit, "over-limit")

    async def drop_missing(self, keep: set[str]) -> None:
        """Remove the cards of tasks that left this column."""
        gone = [c for c in self.cards if c.task_id not in keep]
        if gone:
            await self.body.remove_children(gone)

    async def place(self, tasks: list[Task], asking: dict[str, int] | None = None) -> None:
        """Show exactly these tasks, in this order (cards are reused, not rebuilt); a
        task in ``asking`` is marked with how many of its approvals wait for a person."""
        body = self.body
        existing = {c.task_id: c for c in self.cards}
        asking = asking or {}
        for i, task in enumerate(tasks):
            card = existing.get(task.id)
            if card is None:
                card = TaskCard(task, asking.get(task.id, 0))
                if i < len(body.children):
                    await body.mount(card, before=i)
                else:
                    await body.mount(card)
                continue
            card.show(task, asking.get(task.id, 0))
            if body.children.index(card) != i:
                body.move_child(card, before=i)


class BoardScreen(TaleScreen):
    """Tasks as a Kanban board; keys act on the selected card."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Open"),
        Binding("a", "decide", "Approve…"),
        Binding("n", "new_task", "New task"),
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cancel", "Cancel"),
        Binding("plus,=", "priority(1)", "Priority +"),
        Binding("minus", "priority(-1)", "Priority -"),
        Binding("up,k", "move(0, -1)", "Up", show=False),
        Binding("down,j", "move(0, 1)", "Down", show=False),
        Binding("left,h", "move(-1, 0)", "Left", show=False),
        Binding("right,l", "move(1, 0)", "Right", show=False),
    ]

    def __init__(self, live: bool = True) -> None:
        super().__init__(id="board")
        self.live = live
        self.tasks: list[Task] = []
        self.status: DaemonStatus | None = None
        self.approvals: list[Approval] = []
        self._refreshing = False

    def compose(self) -> ComposeResult:
        yield Static(id="board-summary")
        yield ApprovalBanner(id="board-approvals")
        with Horizontal(id="columns"):
            for name, _states in BOARD_COLUMNS:
                yield BoardColumn(name)
        yield Footer()

    def on_mount(self) -> None:
        self._render_headers()
        if self.live:
            self.set_interval(REFRESH_SECONDS, self._tick)
            self.tale.connection_signal.subscribe(self, lambda _api: self._tick())

    def on_screen_resume(self) -> None:
        """Coming back to the board: refresh at once, not at the next tick."""
        if self.live:
            self._tick()

    # -- data ------------------------------------------------------------------

    def _tick(self) -> None:
        if self._refreshing or self.tale.api is None or not self.is_current:
            return
        self._refreshing = True
        self.run_worker(self.refresh_tasks(), group="board-refresh")

    async def refresh_tasks(self) -> None:
        """Fetch the tasks (with progress for the running ones) and what they wait for,
        and show them."""
        try:
            tasks = await self.call(lambda api: api.list_tasks(), "list tasks")
            status = await self.call(lambda api: api.daemon_status(), "daemon status")
            approvals = await self.call(lambda api: api.approvals(), "list approvals")
            if tasks is None:
                return
            tasks = await self._with_progress(tasks)
            # None: a daemon without acting, or the call failed (shown): keep the last.
            await self.show_tasks(tasks, status, approvals)
        finally:
            self._refreshing = False

    async def _with_progress(self, tasks: list[Task]) -> list[Task]:
        """list_tasks has no progress; get_task has it, for the few running tasks."""
        running = [t.id for t in tasks if t.state == "running"]
        if not running:
            return tasks

        async def detail(api: Api) -> list[Task]:
            return list(await asyncio.gather(*(api.get_task(i) for i in running)))

        detailed = await self.call(detail, "task progress")
        if detailed is None:
            return tasks
        by_id = {t.id: t for t in detailed}
        return [by_id.get(t.id, t) for t in tasks]

    async def show_tasks(
        self,
        tasks: list[Task],
        status: DaemonStatus | None = None,
        approvals: Sequence[Approval] | None = None,
    ) -> None:
        """Render the board from these tasks (the worker limit from ``status``, the
        banner and the marked cards from ``approvals``)."""
        self.tasks = tasks
        if status is not None:
            self.status = status
        if approvals is not None:
            if bool(approvals) != bool(self.approvals):
                self.refresh_bindings()  # `a` shows in the footer while something waits
            self.approvals = list(approvals)
        self.query_one("#board-approvals", ApprovalBanner).show(self.approvals)
        asking: dict[str, int] = {}
        for a in self.approvals:
            asking[a.task_id] = asking.get(a.task_id, 0) + 1
        self.tale.remember_tasks(tasks)
        groups: dict[str, list[Task]] = {name: [] for name, _ in BOARD_COLUMNS}
        for task in tasks:
            groups[board_column(task.state)].append(task)
        focused = self.focused.task_id if isinstance(self.focused, TaskCard) else None
        columns = list(self.query(BoardColumn))
        # Removals first: a card moving to another column keeps its id there.
        for col in columns:
            await col.drop_missing({t.id for t in groups[col.column]})
        for col in columns:
            await col.place(order_column(col.column, groups[col.column]), asking)
        self._render_headers(groups)
        # A card that moved column was rebuilt there: give it the focus back.
        now = self.selected()
        if focused is not None and (now is None or now.task_id != focused):
            self.select(focused)
        elif now is None and self.is_current:
            # Keys act on the selected card: with nothing selected, enter would do
            # nothing, so the first card is selected as soon as there is one.
            self.action_move(0, 0)

    def _render_headers(self, groups: dict[str, list[Task]] | None = None) -> None:
        counts = {name: len(groups[name]) if groups else 0 for name, _ in BOARD_COLUMNS}
        for col in self.query(BoardColumn):
            count = counts[col.column]
            if col.column == "running" and self.status is not None and self.status.workers_limit:
                limit = self.status.workers_limit
                col.set_header(f"running {count}/{limit}", over_limit=count > limit)
            else:
                col.set_header(f"{col.column} {count}")
        summary = self.query_one("#board-summary", Static)
        if not self.tasks:
            summary.update(
                "No tasks yet. Press [b]n[/b] to add one, or ask for something in the chat (F1)."
            )
        else:
            waiting = counts["queued"] + counts["running"] + counts["waiting"]
            summary.update(
                f"{len(self.tasks)} tasks · {waiting} to do · select a card with the arrows, "
                "[b]enter[/b] opens it"
            )

    # -- selection ---------------------------------------------------------------

    def selected(self) -> TaskCard | None:
        """The card with the focus, if any."""
        return self.focused if isinstance(self.focused, TaskCard) else None

    def select(self, task_id: str) -> bool:
        """Focus the card of this task; False if it is not on the board."""
        for card in self.query(TaskCard):
            if card.task_id == task_id:
                card.focus()
                card.scroll_visible()
                return True
        return False

    def action_move(self, dx: int, dy: int) -> None:
        """Move the selection across cards (up/down) and columns (left/right)."""
        columns = [c for c in self.query(BoardColumn)]
        card = self.selected()
        if card is None:
            first = next((c.cards[0] for c in columns if c.cards), None)
            if first is not None:
                first.focus()
            return
        col_index = next(i for i, c in enumerate(columns) if card in c.cards)
        row = columns[col_index].cards.index(card)
        if dy:
            cards = columns[col_index].cards
            cards[max(0, min(len(cards) - 1, row + dy))].focus()
            return
        i = col_index + dx
        while 0 <= i < len(columns):
            cards = columns[i].cards
            if cards:
                cards[min(row, len(cards) - 1)].focus()
                return
            i += dx

    # -- actions -------------------------------------------------------------------

    def action_open(self) -> None:
        """Open the selected task."""
        card = self.selected()
        if card is not None:
            card.action_open()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``a`` is there only while something waits for a person."""
        return action != "decide" or bool(self.approvals)

    def action_decide(self) -> None:
        """Open the approval dialog: the selected task's first waiting approval, else the
        oldest of all."""
        if not self.approvals:
            return
        card = self.selected()
        mine = [a for a in self.approvals if card is not None and a.task_id == card.task_id]
        ask_person(self, (mine or self.approvals)[0], self.refresh_tasks_now)

    def action_pause(self) -> None:
        """Pause the selected task."""
        self._act("pause", lambda api, i: api.pause(i))

    def action_resume(self) -> None:
        """Resume the selected task."""
        self._act("resume", lambda api, i: api.resume(i))

    def action_priority(self, direction: int) -> None:
        """Raise or lower the selected task's priority by PRIORITY_STEP."""
        card = self.selected()
        if card is not None:
            value = card.tale_task.priority + direction * PRIORITY_STEP
            self._act("set the priority of", lambda api, i: api.set_priority(i, value))

    def action_cancel(self) -> None:
        """Cancel the selected task, after asking."""
        card = self.selected()
        if card is None:
            return
        task_id = card.task_id

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("cancel", lambda api, i: api.cancel(i), task_id)

        self.app.push_screen(
            ConfirmScreen(f"Cancel task [b]{task_id}[/b]?\n{card.tale_task.text[:200]}"), answered
        )

    def action_new_task(self) -> None:
        """Queue a new task typed in a small box."""

        async def submitted(text: str | None) -> None:
            if text:
                task = await self.call(lambda api: api.submit(text), "submit")
                if task is not None:
                    self.notify(f"task {task.id} queued")
                    await self.refresh_tasks_now()
                    self.select(task.id)

        self.app.push_screen(NewTaskScreen(), submitted)

    async def refresh_tasks_now(self) -> None:
        """Refresh at once (after an action), unless a refresh is already running."""
        if not self._refreshing and self.live:
            self._refreshing = True
            await self.refresh_tasks()

    def _act(self, what: str, call: _TaskCall, task_id: str | None = None) -> None:
        """Act on the selected task (or ``task_id``) in the background: the board stays live
        while the daemon stops a running answer, which can take a moment."""
        if task_id is None:
            card = self.selected()
            if card is None:
                self.notify("select a task first (arrows or tab)", severity="warning")
                return
            task_id = card.task_id
        self.run_worker(self._run_act(what, call, task_id), group="board-action")

    async def _run_act(self, what: str, call: _TaskCall, task_id: str) -> None:
        done = await self.call(lambda api: call(api, task_id), f"{what} {task_id}")
        if done is not None:
            await self.refresh_tasks_now()
