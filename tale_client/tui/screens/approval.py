"""The box where a person decides what a waiting task asked: approve, deny, or answer.

A tool call waiting for approval: ``a`` lets it run, ``A`` lets calls like it run
from now on (its rule), ``d`` opens a box for an optional reason and enter denies
(``D``: deny calls like it from now on too). A question: type the answer, enter
sends it. Escape closes the box and decides nothing. The box only returns the
decision; ``ask_person`` opens it and sends what it returns to the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from tale_client.tui.api import Decision, Verdict
from tale_client.tui.model import Approval
from tale_client.tui.screens._base import TaleScreen

__all__ = ["ApprovalScreen", "ask_person"]

# Arguments are the model's: a long file's content must not fill the box.
_ARGUMENTS_SHOWN = 600

_DONE = {Verdict.APPROVE: "approved", Verdict.DENY: "denied", Verdict.ANSWER: "answered"}


def _arguments(approval: Approval) -> str:
    text = json.dumps(approval.arguments, indent=2, ensure_ascii=False)
    if len(text) > _ARGUMENTS_SHOWN:
        text = text[: _ARGUMENTS_SHOWN - 1] + "…"
    return text


class ApprovalScreen(ModalScreen[Decision | None]):
    """One approval or question; dismisses with the person's decision, or None (escape)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve(False)", "Approve"),
        Binding("A", "approve(True)", "Approve always"),
        Binding("d", "deny(False)", "Deny…"),
        Binding("D", "deny(True)", "Deny always…"),
        Binding("escape", "back", "Close"),
    ]

    def __init__(self, approval: Approval) -> None:
        super().__init__()
        self.approval = approval
        # Set while the reason box is open: whether the denial is for calls like it too.
        self.denying: bool | None = None

    def compose(self) -> ComposeResult:
        a = self.approval
        with Vertical(id="approval-box") as box:
            box.border_title = "waiting for you"
            if a.is_question:
                yield Static(f"Task [b]{a.task_id}[/b] asks:", classes="approval-what")
                yield Static(f"[b]{escape(a.summary)}[/b]", id="approval-summary")
                yield Input(
                    placeholder="your answer (enter sends it, escape closes)",
                    id="approval-answer",
                )
                return
            yield Static(
                f"Task [b]{a.task_id}[/b] wants to use [b]{escape(a.tool)}[/b]:",
                classes="approval-what",
            )
            yield Static(f"[b]{escape(a.summary)}[/b]", id="approval-summary")
            if a.arguments:
                yield Static(escape(_arguments(a)), id="approval-arguments")
            if a.rule:
                yield Static(
                    f"[dim]rule [b]{escape(a.rule)}[/b]: “always” allows (or denies) "
                    "every call it matches from now on[/dim]",
                    id="approval-rule",
                )
            with Horizontal(id="approval-buttons"):
                yield Button("Approve (a)", variant="success", id="approve")
                yield Button("Always (A)", variant="primary", id="approve-always")
                yield Button("Deny (d)", variant="error", id="deny")
            yield Input(
                placeholder="why, or what to do instead (optional; enter denies, escape goes back)",
                id="approval-reason",
            )

    def on_mount(self) -> None:
        if self.approval.is_question:
            self.query_one("#approval-answer", Input).focus()
            return
        self.query_one("#approval-reason", Input).display = False
        self.query_one("#approve", Button).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A question has no yes or no: only its answer box and escape."""
        return not (action in ("approve", "deny") and self.approval.is_question)

    # -- deciding ------------------------------------------------------------------

    def action_approve(self, always: bool) -> None:
        """Let the call run (``always``: and calls like it from now on)."""
        self.dismiss(Decision(self.approval, Verdict.APPROVE, always=always))

    def action_deny(self, always: bool) -> None:
        """Open the reason box; enter in it denies."""
        self.denying = always
        reason = self.query_one("#approval-reason", Input)
        reason.border_title = "deny always" if always else "deny"
        reason.display = True
        reason.focus()

    def action_back(self) -> None:
        """Escape: out of the reason box, or close the dialog deciding nothing."""
        if self.denying is not None:
            self.denying = None
            self.query_one("#approval-reason", Input).display = False
            self.query_one("#deny", Button).focus()
            return
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """A button decides, as its key does."""
        if event.button.id == "approve":
            self.action_approve(False)
        elif event.button.id == "approve-always":
            self.action_approve(True)
        elif event.button.id == "deny":
            self.action_deny(False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: deny with the reason typed, or send the answer."""
        text = event.value.strip()
        if event.input.id == "approval-reason" and self.denying is not None:
            self.dismiss(Decision(self.approval, Verdict.DENY, always=self.denying, text=text))
        elif event.input.id == "approval-answer":
            if not text:
                self.notify("type an answer first (escape closes)", severity="warning")
                return
            self.dismiss(Decision(self.approval, Verdict.ANSWER, text=text))


def ask_person(screen: TaleScreen, approval: Approval, then: Callable[[], Awaitable[None]]) -> None:
    """Open the dialog for ``approval``; send the decision, say what happened, then ``then()``."""

    async def send(decision: Decision) -> None:
        what = f"{decision.verdict.value} {decision.approval.short_id}"
        done = await screen.call(lambda api: api.decide(decision), what)
        if done is None:
            return
        screen.notify(f"{_DONE[decision.verdict]}: {done.summary} (task {done.task_id} goes on)")
        await then()

    def decided(decision: Decision | None) -> None:
        if decision is not None:
            screen.run_worker(send(decision), group="decide")

    screen.app.push_screen(ApprovalScreen(approval), decided)
