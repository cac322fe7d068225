"""One conversation turn on the UX model, streamed.

The full conversation agent (memory, intent detection, hand-off to tasks) grows
from here; this turn is stateless: the user's text and the chat system prompt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from taled.backends.base import ChatMessage, Completion
from taled.pool import ModelPool
from taled.routing import Router
from taled.settings import ChatSettings
from taled.text import clean_text

__all__ = ["ChatService"]


class ChatService:
    """Answers a message on the ``ux`` role, text delivered as it is generated."""

    def __init__(self, pool: ModelPool, settings: ChatSettings, router: Router) -> None:
        self._pool = pool
        self._settings = settings
        self._router = router

    def validate(self, text: str) -> str:
        """Strip and check a chat message; InvalidInput says what is wrong."""
        return clean_text(
            text,
            what="chat message",
            limit=self._settings.max_text_chars,
            empty_hint="say something",
            too_long_hint=" (submit long work as a task instead)",
        )

    async def reply(self, text: str, on_text: Callable[[str], Awaitable[None]]) -> Completion:
        """Stream the UX model's reply to ``on_text``; return the whole of it."""
        messages: list[ChatMessage] = [
            {"role": "system", "content": self._settings.system_prompt},
            {"role": "user", "content": self.validate(text)},
        ]
        result = Completion.empty()
        async for piece in self._pool.stream(
            self._router.for_chat().role,
            messages,
            max_tokens=self._settings.max_tokens,
            temperature=self._settings.temperature,
            timeout=self._settings.call_timeout_seconds,
            result=result,
        ):
            await on_text(piece)
        return result
