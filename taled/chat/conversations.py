"""Conversations with the UX agent, kept in the store.

A conversation is its messages (each user message with the intent it was read
as, and the task it handed off if any), a running summary of its older part,
a request waiting for the answer to a clarifying question, and the tasks it
handed off with the last state it reported back to the user. Their rows are kept by
``taled.db.conversations``; this module is what the agent asks of them.
"""

from __future__ import annotations

from taled.db.conversations import (
    Conversation,
    ConversationRecords,
    Message,
    NewMessage,
    Pending,
)
from taled.db.store import Store
from taled.errors import NotFound
from taled.text import one_line

__all__ = ["Conversation", "Conversations", "Message", "Pending"]

# The intents that read a message as work asked for (chat, the third, is not).
_WORK_INTENTS = ("task", "unclear")


class Conversations:
    """Reads and writes conversations through the store's group-committing writer."""

    def __init__(self, store: Store, title_chars: int) -> None:
        self._records = ConversationRecords(store)
        self._title_chars = title_chars

    def draft(self, first_text: str) -> Conversation:
        """A new conversation titled after its first message, stored with it (``add``)."""
        return self._records.draft(one_line(first_text, self._title_chars))

    async def get(self, conversation_id: str) -> Conversation:
        """One conversation's header; NotFound if there is none by that id."""
        found = await self._records.get(conversation_id)
        if found is None:
            raise NotFound(
                f"no conversation {conversation_id}; `list_conversations` shows the ones there are"
            )
        return found

    async def latest(self) -> Conversation | None:
        """The conversation with the most recent message, if any."""
        found = await self.recent(1)
        return found[0] if found else None

    async def recent(self, limit: int) -> list[Conversation]:
        """Conversations, most recently active first."""
        return await self._records.recent(limit)

    async def messages(self, conversation_id: str, after_seq: int = 0) -> list[Message]:
        """A conversation's messages after ``after_seq``, oldest first."""
        return await self._records.messages(conversation_id, after_seq)

    async def add(
        self,
        conversation_id: str,
        role: str,
        text: str,
        *,
        intent: str | None = None,
        confidence: float | None = None,
        action: str | None = None,
        task_id: str | None = None,
        draft: Conversation | None = None,
    ) -> Message:
        """Append a message (durably) and mark the conversation active; ``draft``: the
        conversation, not stored yet, to store with it."""
        return await self._records.add(
            NewMessage(
                conversation_id=conversation_id,
                role=role,
                text=text,
                intent=intent,
                confidence=confidence,
                action=action,
                task_id=task_id,
            ),
            draft=draft,
        )

    async def set_pending(self, conversation_id: str, pending: Pending | None) -> None:
        """Remember (or forget) what a yes to the clarifying question would do."""
        await self._records.set_pending(conversation_id, pending)

    async def set_summary(self, conversation_id: str, summary: str, upto: int) -> None:
        """Store the summary of every message up to seq ``upto``."""
        await self._records.set_summary(conversation_id, summary, upto)

    async def track_task(self, conversation_id: str, task_id: str, state: str) -> None:
        """Note that this conversation handed off ``task_id`` (or last saw it in ``state``)."""
        await self._records.track_task(conversation_id, task_id, state)

    async def tracked(self, conversation_id: str) -> list[tuple[str, str]]:
        """(task id, last reported state) of the tasks it handed off, in hand-off order."""
        return await self._records.tracked(conversation_id)

    async def last_user_message(
        self, before_seq: int, conversation_id: str | None = None, *, work_only: bool = False
    ) -> Message | None:
        """The user's last request before ``before_seq``, in one conversation or in any.

        ``work_only`` keeps to messages read as work (a task, or unclear).
        """
        return await self._records.last_request(
            before_seq, conversation_id, _WORK_INTENTS if work_only else None
        )
