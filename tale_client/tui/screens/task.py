"""One task: its subtask tree, history, checkpoints, output, tokens and timings; live.

An acting task also shows its tool calls as they happen, what it waits for (``a``
opens the approval dialog) and, on ``D``, the diff of its workspace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import ClassVar

from rich.markup import escape
from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, ScrollableContainer, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Markdown, Static, TabbedContent, TabPane, Tree
from textual.widgets.tree import TreeNode

from tale_client.human import clock
from tale_client.tui.api import Api
from tale_client.tui.messages import OpenTask
from tale_client.tui.model import Checkpoint, Task, TaskDiff, ToolCall
from tale_client.tui.screens._base import TaleScreen
from tale_client.tui.screens.approval import ask_person
from tale_client.tui.screens.board import PRIORITY_STEP
from tale_client.tui.screens.confirm import ConfirmScreen
from tale_client.tui.widgets.approvals import ApprovalBanner
from tale_client.tui.widgets.task_card import short_text

__all__ = ["STATE_ICONS", "TaskScreen", "clock"]

STATE_ICONS = {
    "queued": "○",
    "running": "▶",
    "waiting": "⧗",
    "paused": "⏸",
    "completed": "✓",
    "failed": "✗",
    "cancelled": "⊘",
}
REFRESH_SECONDS = 1.0
# The tabs only an acting task has.
_ACTING_TABS = ("tab-tools", "tab-diff")


def _keys(task: Task) -> tuple[bool, bool]:
    """Which of the task screen's acting keys apply: ``a`` (decide), ``D`` (diff)."""
    return bool(task.approvals), task.act


def _tree_shape(task: Task) -> tuple[object, ...]:
    """What the tree shows of a task: rebuilt only when this changes (keeps the cursor)."""
    return (task.id, task.state, task.title, tuple(_tree_shape(t) for t in task.subtasks))


class TaskScreen(TaleScreen):
    """Everything about one task, refreshed every second until it ends."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("a", "decide", "Approve…"),
        Binding("D", "diff", "Diff"),
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cancel", "Cancel"),
        Binding("plus,=", "priority(1)", "Priority +"),
        Binding("minus", "priority(-1)", "Priority -"),
    ]

    def __init__(self, task_id: str, live: bool = True) -> None:
        super().__init__(classes="task-screen")
        self.task_id = task_id
        self.live = live
        self.shown: Task | None = None
        self.checkpoints: list[Checkpoint] = []
        self.diff: TaskDiff | None = None
        self._shape: tuple[object, ...] | None = None
        self._refreshing = False
        self._final_seen = False

    def compose(self) -> ComposeResult:
        yield Static(f"task {self.task_id}", id="task-header")
        yield ApprovalBanner(with_task=False, id="task-approvals")
        with Horizontal(id="task-body"):
            with Vertical(id="task-left"):
                yield Static("[b]Subtasks[/b]", classes="section-title")
                yield Tree(f"task {self.task_id}", id="subtasks")
            with TabbedContent(id="task-tabs"):
                with TabPane("Output", id="tab-output"), VerticalScroll():
                    yield Markdown("", id="task-output")
                with TabPane("Tool calls", id="tab-tools"):
                    yield DataTable(id="tool-calls", cursor_type="row", zebra_stripes=True)
                with TabPane("Diff", id="tab-diff"), ScrollableContainer(id="diff-scroll"):
                    yield Static("[b]D[/b] shows what the task changed (and reloads it)", id="diff")
                with TabPane("History", id="tab-history"):
                    yield DataTable(id="transitions", cursor_type="row", zebra_stripes=True)
                with TabPane("Checkpoints", id="tab-checkpoints"):
                    yield DataTable(id="checkpoints", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#transitions", DataTable).add_columns("time", "from", "to", "reason")
        self.query_one("#checkpoints", DataTable).add_columns("commit", "time", "step", "message")
        self.query_one("#tool-calls", DataTable).add_columns(
            "time", "tool", "outcome", "took", "detail"
        )
        tabs = self.query_one("#task-tabs", TabbedContent)
        for pane in _ACTING_TABS:
            tabs.hide_tab(pane)
        self.query_one("#subtasks", Tree).show_root = True
        if self.live:
            self.set_interval(REFRESH_SECONDS, self._tick)
            self._tick()

    # -- data ------------------------------------------------------------------

    def _tick(self) -> None:
        if self._refreshing or self.tale.api is None or self._final_seen:
            return
        self._refreshing = True
        self.run_worker(self.refresh_task(), group="task-refresh")

    async def refresh_task(self) -> None:
        """Fetch the task and its checkpoints and show them."""
        try:
            task = await self.call(lambda api: api.get_task(self.task_id), f"task {self.task_id}")
            checkpoints = await self.call(
                lambda api: api.checkpoints(self.task_id), "list checkpoints"
            )
            if task is None:
                return
            if task.state == "waiting" and not task.act:
                # A task the daemon chose to let act (its text asked for files or commands)
                # is not marked `act`, and get_task leaves its approvals out: ask for them.
                asked = await self.call(lambda api: api.approvals(self.task_id), "approvals")
                if asked:
                    task = replace(task, approvals=tuple(asked))
            await self.show_task(task, checkpoints)
            # One more look after the end (the last checkpoint lands with it), then stop.
            self._final_seen = task.final
        finally:
            self._refreshing = False

    async def show_task(self, task: Task, checkpoints: list[Checkpoint] | None = None) -> None:
        """Render the screen from a task (and its checkpoints)."""
        before, self.shown = self.shown, task
        if before is None or _keys(before) != _keys(task):
            self.refresh_bindings()  # `a` and `D` show only when they can act
        self.query_one("#task-header", Static).update(self._header(task))
        self.query_one("#task-approvals", ApprovalBanner).show(task.approvals)
        if task.act:
            tabs = self.query_one("#task-tabs", TabbedContent)
            for pane in _ACTING_TABS:
                tabs.show_tab(pane)
            self._show_tool_calls(task.tool_calls)
        self._show_tree(task)
        self._show_transitions(task)
        if checkpoints is not None:
            self._show_checkpoints(checkpoints)
        output = self.query_one("#task-output", Markdown)
        text = self._output(task)
        if output.source != text:
            await output.update(text)

    def _header(self, task: Task) -> str:
        icon = STATE_ICONS.get(task.state, "?")
        lines = [
            f"[b]task {task.id}[/b]  {icon} [b]{task.state}[/b]  ·  priority {task.priority}"
            + (f"  ·  model {escape(task.model)}" if task.model else ""),
            escape(short_text(task.text, 200)),
        ]
        timing = [f"created {clock(task.created_at)}"]
        took = task.took_seconds()
        if task.final and took is not None:
            timing.append(f"took {took:.1f} s")
        if task.attempts > 1:
            timing.append(f"{task.attempts} attempts")
        lines.append(
            f"tokens {task.prompt_tokens} prompt + {task.completion_tokens} completion  ·  "
            + "  ·  ".join(timing)
        )
        if task.progress is not None and not task.final:
            lines.append(f"[b]{escape(task.progress.line())}[/b]")
        if task.criteria:
            lines.append("done when " + escape("; ".join(task.criteria)))
        if task.act:
            where = f"a copy of {task.workspace}" if task.workspace else "a scratch workspace"
            calls = len(task.tool_calls)
            lines.append(
                f"acts in {escape(where)}  ·  {calls} tool call{'' if calls == 1 else 's'}"
                "  ·  [b]D[/b] shows its diff"
            )
        return "\n".join(lines)

    @staticmethod
    def _output(task: Task) -> str:
        if task.result:
            return task.result
        if task.error:
            return f"**{task.state}**: {task.error}"
        if task.state == "cancelled":
            return "*cancelled before it produced a result*"
        return "*no result yet: it appears here when the task finishes*"

    def _show_tree(self, task: Task) -> None:
        shape = _tree_shape(task)
        if shape == self._shape:
            return
        self._shape = shape
        tree: Tree[str] = self.query_one("#subtasks", Tree)
        tree.clear()
        # The root is this task (its id is in the header); subtasks show theirs.
        icon = STATE_ICONS.get(task.state, "?")
        tree.root.set_label(f"{icon} {escape(short_text(task.title or task.text, 60))}")
        tree.root.data = task.id

        def add(node: TreeNode[str], subtasks: tuple[Task, ...]) -> None:
            steps = {t.id: t.step or t.id for t in subtasks}
            for sub in subtasks:
                label = self._node_label(sub)
                if sub.needs:
                    after = ", ".join(sorted(steps.get(n, n) for n in sub.needs))
                    label += f" [dim]after {escape(after)}[/dim]"
                child = node.add(label, data=sub.id, expand=True)
                if sub.subtasks:
                    add(child, sub.subtasks)
                else:
                    child.allow_expand = False

        add(tree.root, task.subtasks)
        tree.root.expand()
        if not task.subtasks:
            tree.root.add_leaf("[dim](one step: no subtasks)[/dim]")

    @staticmethod
    def _node_label(task: Task) -> str:
        icon = STATE_ICONS.get(task.state, "?")
        step = f"{task.step} " if task.step else ""
        return (
            f"{icon} {step}{escape(short_text(task.title or task.text, 40))} [dim]{task.id}[/dim]"
        )

    def _show_transitions(self, task: Task) -> None:
        table: DataTable[str] = self.query_one("#transitions", DataTable)
        if table.row_count == len(task.transitions):
            return
        table.clear()
        for t in task.transitions:
            table.add_row(clock(t.at), t.from_state or "-", t.to_state, t.reason)

    def _show_tool_calls(self, calls: tuple[ToolCall, ...]) -> None:
        table: DataTable[str] = self.query_one("#tool-calls", DataTable)
        # Calls are only ever added: rows already shown stay (and keep the cursor).
        if table.row_count > len(calls):
            table.clear()
        new = calls[table.row_count :]
        for c in new:
            detail = escape(short_text(c.detail, 120)) if c.detail else ""
            table.add_row(clock(c.at), escape(c.tool), c.outcome, c.took(), detail)
        if new:
            table.move_cursor(row=table.row_count - 1)  # follow the newest call

    async def load_diff(self) -> None:
        """Fetch the task's diff and show it, highlighted; an error is said in its place."""
        view = self.query_one("#diff", Static)

        def failed(message: str) -> None:
            if not self.closing:
                view.update(escape(message))

        diff = await self.call(lambda api: api.task_diff(self.task_id), "diff", failed)
        if diff is None:
            return
        self.diff = diff
        self.show_diff(diff)

    def show_diff(self, diff: TaskDiff) -> None:
        """Render a diff (the task's changes against the directory it started from)."""
        view = self.query_one("#diff", Static)
        if not diff.diff.strip():
            view.update(f"no changes yet (task {diff.state})")
            return
        view.update(Syntax(diff.diff, "diff", theme="ansi_dark", background_color="default"))

    def _show_checkpoints(self, checkpoints: list[Checkpoint]) -> None:
        if checkpoints == self.checkpoints and checkpoints:
            return
        self.checkpoints = checkpoints
        table: DataTable[str] = self.query_one("#checkpoints", DataTable)
        table.clear()
        for c in checkpoints:
            table.add_row(c.commit[:12], clock(c.at), c.step, c.message)

    def on_tree_node_selected(self, event: Tree.NodeSelected[str]) -> None:
        """Selecting a subtask opens its own screen."""
        task_id = event.node.data
        if task_id and task_id != self.task_id:
            self.post_message(OpenTask(task_id))

    # -- actions ---------------------------------------------------------------------

    def _act(self, what: str, call: Callable[[Api], Awaitable[Task]]) -> None:
        """Act on this task in the background (the screen stays live meanwhile)."""
        self.run_worker(self._run_act(what, call), group="task-action")

    async def _run_act(self, what: str, call: Callable[[Api], Awaitable[Task]]) -> None:
        done = await self.call(call, f"{what} {self.task_id}")
        if done is not None:
            self.notify(f"task {done.id} {done.state}")
            await self.refresh_now()

    async def refresh_now(self) -> None:
        """Refresh at once (after an action), unless a refresh is already running; a task
        that had ended is followed again (a resumed or restored one goes on)."""
        self._final_seen = False
        if not self._refreshing and self.live:
            self._refreshing = True
            await self.refresh_task()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``a`` is there while the task waits for a person, ``D`` for an acting task."""
        if action not in ("decide", "diff"):
            return True
        if self.shown is None:
            return False
        decide, diff = _keys(self.shown)
        return decide if action == "decide" else diff

    def action_decide(self) -> None:
        """Open the approval dialog for what this task waits for (the oldest first)."""
        task = self.shown
        if task is None or not task.approvals:
            return

        ask_person(self, task.approvals[0], self.refresh_now)

    def action_diff(self) -> None:
        """Show the Diff tab with the task's diff, fetched now."""
        if self.shown is None or not self.shown.act:
            return
        tabs = self.query_one("#task-tabs", TabbedContent)
        if tabs.active == "tab-diff":
            self.run_worker(self.load_diff(), group="task-diff", exclusive=True)
        else:
            tabs.active = "tab-diff"  # its activation loads it

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """Opening the Diff tab (D or a click) fetches the diff as it is now."""
        if event.pane.id == "tab-diff" and self.live:
            self.run_worker(self.load_diff(), group="task-diff", exclusive=True)

    def action_pause(self) -> None:
        """Pause this task."""
        self._act("pause", lambda api: api.pause(self.task_id))

    def action_resume(self) -> None:
        """Resume this task."""
        self._act("resume", lambda api: api.resume(self.task_id))

    def action_priority(self, direction: int) -> None:
        """Raise or lower this task's priority."""
        if self.shown is not None:
            value = self.shown.priority + direction * PRIORITY_STEP
            self._act("set the priority of", lambda api: api.set_priority(self.task_id, value))

    def action_cancel(self) -> None:
        """Cancel this task, after asking."""

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("cancel", lambda api: api.cancel(self.task_id))

        self.app.push_screen(ConfirmScreen(f"Cancel task [b]{self.task_id}[/b]?"), answered)
