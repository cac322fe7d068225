"""The interface every model backend implements, and what a call returns."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

__all__ = ["Backend", "CancelToken", "ChatMessage", "Completion"]


class ChatMessage(TypedDict):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


class CancelToken:
    """Set from any thread to stop a call at the next token."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the call to stop."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._event.is_set()


@dataclass
class Completion:
    """What a finished (or stopped) call produced, with the backend's own counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    load_ms: float
    prompt_ms: float
    generation_ms: float
    finish_reason: Literal["stop", "length", "cancelled"]

    @classmethod
    def empty(cls) -> Completion:
        """A result to be filled in by a stream."""
        return cls("", 0, 0, 0.0, 0.0, 0.0, "stop")


class Backend(Protocol):
    """A loaded model that can answer chats. One instance serves one role."""

    kind: str
    model: str

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        ...

    async def load(self) -> None:
        """Load the model; raise ModelError with a clear message if it cannot."""

    async def unload(self) -> None:
        """Release the model's memory."""

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        cancel: CancelToken,
        result: Completion,
    ) -> AsyncGenerator[str, None]:
        """Yield the answer's text as it is generated; fill ``result`` when done."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by the model's own tokenizer."""
        ...

    def model_bytes(self) -> int | None:
        """Size of the loaded weights, if the backend knows it."""
        ...

    def threads(self) -> int | None:
        """CPU threads this instance computes with (None for remote backends)."""
        ...
