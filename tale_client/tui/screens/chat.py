"""The conversation: replies stream in as they are generated; a message that became a
task gets a marker that opens it; past conversations are listed on the left.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import ClassVar

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Input, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from tale_client.human import clock
from tale_client.tui.api import Api
from tale_client.tui.client import DaemonUnreachable, RpcError
from tale_client.tui.model import ChatReply, Conversation, ConversationInfo, Task, TaskRef
from tale_client.tui.screens._base import TaleScreen
from tale_client.tui.widgets.messages import AssistantMessage, TaskMarker, UserMessage
from tale_client.tui.widgets.task_card import short_text

__all__ = ["TASK_PREFIX", "ChatScreen", "reply_meta"]

TASK_PREFIX = "/task "
MARKER_REFRESH_SECONDS = 2.0


async def _get_task(api: Api, task_id: str) -> Task:
    return await api.get_task(task_id)


def reply_meta(reply: ChatReply) -> str:
    """The dim line under a reply: tokens, why it ended, and the intent if one was told."""
    # A hand-off or an answer from the task store is not generated: no tokens to show.
    parts = [f"{reply.completion_tokens} tokens"] if reply.completion_tokens else []
    if reply.finish_reason:
        parts.append(reply.finish_reason)
    if reply.intent is not None:
        confidence = "" if reply.intent.confidence is None else f" {reply.intent.confidence:.2f}"
        parts.append(f"intent {reply.intent.kind}{confidence}")
    return "[dim]" + escape(" · ".join(parts)) + "[/dim]" if parts else ""


class ChatScreen(TaleScreen):
    """Talk to tale; ask for work and watch it become a task."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "new_conversation", "New conversation"),
        Binding("ctrl+o", "history", "History"),
        Binding("escape", "focus_input", "Type", show=False),
    ]

    def __init__(self, live: bool = True) -> None:
        super().__init__(id="chat")
        self.live = live
        self.conversation_id: str | None = None
        self.conversations: list[ConversationInfo] | None = None
        self.sending = False
        # ctrl+n asks for a new conversation; the daemon makes it with the next message.
        self._start_new = False
        self._loaded_once = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-body"):
            with Vertical(id="history-pane"):
                yield Static("[b]Conversations[/b]", classes="section-title")
                yield OptionList(id="conversations")
            with Vertical(id="chat-pane"):
                yield Static(id="chat-title")
                yield VerticalScroll(id="messages")
                yield Input(
                    placeholder="Say something (enter sends) · /task TEXT queues a task directly",
                    id="prompt",
                )
        yield Footer()

    def on_mount(self) -> None:
        self._render_title()
        self.show_history(self.conversations)
        self.query_one("#prompt", Input).focus()
        if self.live:
            self.tale.connection_signal.subscribe(self, self._on_connection)
            self.set_interval(MARKER_REFRESH_SECONDS, self._refresh_markers)
            if self.tale.api is not None:
                self._on_connection(self.tale.api)

    def _on_connection(self, api: Api | None) -> None:
        if api is not None:
            self.load_history(open_latest=not self._loaded_once)
            self._loaded_once = True

    # -- rendering ------------------------------------------------------------------

    @property
    def messages(self) -> VerticalScroll:
        """The conversation's scroll area."""
        return self.query_one("#messages", VerticalScroll)

    def _render_title(self, title: str | None = None) -> None:
        if self.conversation_id is None:
            text = "[b]New conversation[/b]" if self._start_new else "[b]Chat[/b]"
        else:
            text = f"[b]{escape(title or 'Conversation')}[/b] [dim]{self.conversation_id}[/dim]"
        self.query_one("#chat-title", Static).update(text)

    def show_history(self, conversations: list[ConversationInfo] | None) -> None:
        """The list of past conversations (None: the daemon keeps none)."""
        self.conversations = conversations
        options = self.query_one("#conversations", OptionList)
        options.clear_options()
        if conversations is None:
            options.add_option(
                Option("[dim]this daemon keeps no conversation history[/dim]", disabled=True)
            )
            return
        if not conversations:
            options.add_option(Option("[dim]none yet[/dim]", disabled=True))
            return
        for c in conversations:
            when = clock(c.updated_at)
            options.add_option(
                Option(
                    f"{escape(short_text(c.title, 26))}\n[dim]{c.messages} msgs · {when}[/dim]",
                    id=c.id,
                )
            )
        if self.conversation_id is not None:
            # The current conversation may not be among those listed.
            with contextlib.suppress(LookupError):
                options.highlighted = options.get_option_index(self.conversation_id)

    async def show_conversation(self, conversation: Conversation) -> None:
        """Replace the view with a stored conversation (to read it or go on with it)."""
        self.conversation_id = conversation.id
        self._start_new = False
        await self.messages.remove_children()
        widgets: list[Static | AssistantMessage | TaskMarker] = []
        if conversation.summary:
            widgets.append(
                Static(f"[dim]earlier: {escape(conversation.summary)}[/dim]", classes="summary")
            )
        for m in conversation.messages:
            widgets.append(UserMessage(m.text) if m.role == "user" else AssistantMessage(m.text))
            if m.task:
                widgets.append(TaskMarker(TaskRef(m.task, "…")))
        await self.messages.mount_all(widgets)
        self.messages.scroll_end(animate=False)
        self._render_title(conversation.title)
        self.show_history(self.conversations)
        self._refresh_markers()

    async def add_exchange(self, text: str, reply: ChatReply) -> None:
        """Show one finished exchange (what fixed-data views and snapshots use)."""
        await self.messages.mount(UserMessage(text))
        answer = AssistantMessage(reply.text)
        await self.messages.mount(answer)
        await answer.finish(reply_meta(reply), reply.task)
        self.messages.scroll_end(animate=False)

    # -- talking ---------------------------------------------------------------------

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter sends the message (or, with /task, queues it as a task)."""
        text = event.value.strip()
        if not text:
            return
        if self.sending:
            self.notify("wait for the reply to finish", severity="warning")
            return
        if self.tale.api is None:
            self.notify("the daemon is not connected", severity="error")
            return
        event.input.clear()
        if text == TASK_PREFIX.strip() or text.startswith(TASK_PREFIX):
            await self.queue_task(text[len(TASK_PREFIX) :].strip())
            return
        self.send(text)

    async def queue_task(self, text: str) -> None:
        """``/task TEXT``: submit it as a task and mark it in the conversation."""
        if not text:
            self.notify("say what the task is: /task TEXT", severity="warning")
            return
        task = await self.call(lambda api: api.submit(text), "submit")
        if task is None:
            return
        await self.messages.mount(UserMessage(f"{TASK_PREFIX}{text}"))
        await self.messages.mount(TaskMarker(TaskRef(task.id, task.state, task.text)))
        self.messages.scroll_end(animate=False)

    @work(exclusive=True, group="chat-send")
    async def send(self, text: str) -> None:
        """Send one message; the reply streams into the view as it is generated."""
        api = self.tale.api
        if api is None:
            return
        self.sending = True
        messages = self.messages
        await messages.mount(UserMessage(text))
        answer = AssistantMessage()
        answer.add_class("pending")
        answer.border_subtitle = "thinking…"
        await messages.mount(answer)
        messages.anchor()
        stream = Markdown.get_stream(answer.markdown)
        streamed: list[str] = []

        async def on_piece(piece: str) -> None:
            if not streamed:
                answer.remove_class("pending")
                answer.border_subtitle = "streaming…"
            streamed.append(piece)
            await stream.write(piece)

        try:
            reply = await api.chat(
                text, on_piece, conversation=self.conversation_id, new=self._start_new
            )
        except DaemonUnreachable as exc:
            await stream.stop()
            await answer.fail(f"the daemon went away before the reply ended ({exc})")
            return
        except RpcError as exc:
            await stream.stop()
            await answer.fail(exc.message)
            return
        except TimeoutError:
            await stream.stop()
            await answer.fail("the daemon did not answer in time")
            return
        finally:
            self.sending = False
            answer.remove_class("pending")
            answer.border_subtitle = ""
        await stream.stop()
        # The daemon's text is the truth (a hand-off may phrase it after streaming).
        if "".join(streamed) != reply.text:
            await answer.markdown.update(reply.text)
        await answer.finish(reply_meta(reply), reply.task)
        if reply.task is not None:
            self.tale.remember_task_ref(reply.task)
        messages.scroll_end(animate=False)
        if reply.conversation is not None:
            self.conversation_id = reply.conversation
            self._start_new = False
            self._render_title(self._title_of(reply.conversation))
            self.load_history(open_latest=False)

    def _title_of(self, conversation_id: str) -> str | None:
        for c in self.conversations or []:
            if c.id == conversation_id:
                return c.title
        return None

    # -- history -----------------------------------------------------------------------

    @work(exclusive=True, group="chat-history")
    async def load_history(self, open_latest: bool) -> None:
        """Fetch the conversation list; on first connect, show the latest conversation."""
        found = await self.call(lambda api: api.conversations(), "list conversations")
        if self.tale.api is None:
            return
        self.show_history(found)
        if self.conversation_id is not None:
            self._render_title(self._title_of(self.conversation_id))
        if open_latest and found and not self._start_new and not self.messages.children:
            await self.open_conversation(found[0].id)

    async def open_conversation(self, conversation_id: str) -> None:
        """Load a past conversation into the view; the next message continues it."""
        conversation = await self.call(
            lambda api: api.conversation(conversation_id), "open conversation"
        )
        if conversation is not None:
            await self.show_conversation(conversation)

    async def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """Choosing a conversation in the list opens it."""
        if event.option.id is not None and not self.sending:
            await self.open_conversation(event.option.id)
            self.query_one("#prompt", Input).focus()

    async def action_new_conversation(self) -> None:
        """Start afresh: the next message opens a new conversation."""
        if self.sending:
            self.notify("wait for the reply to finish", severity="warning")
            return
        self.conversation_id = None
        self._start_new = True
        await self.messages.remove_children()
        self._render_title()
        self.query_one("#prompt", Input).focus()

    def action_history(self) -> None:
        """Move to the list of past conversations."""
        self.query_one("#conversations", OptionList).focus()

    def action_focus_input(self) -> None:
        """Back to typing."""
        self.query_one("#prompt", Input).focus()

    # -- task markers ------------------------------------------------------------------

    def _refresh_markers(self) -> None:
        if self.tale.api is None or not self.is_current:
            return
        if any(not m.final for m in self.query(TaskMarker)):
            self.run_worker(self._update_markers(), group="chat-markers", exclusive=True)

    async def _update_markers(self) -> None:
        for marker in list(self.query(TaskMarker)):
            if marker.final:
                continue
            task_id = marker.ref.id
            task = await self.call(partial(_get_task, task_id=task_id), f"task {task_id}")
            if task is not None:
                detail = task.progress.short() if task.progress and task.state == "running" else ""
                marker.show_state(task.state, detail)
