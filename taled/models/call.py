"""One model call as asked for: the value every layer of the pool takes.

The caller builds a ``ModelCall`` once and hands it to ``ModelPool.complete`` or
``ModelPool.stream``; the pool carries it unchanged through routing, a retry and the
ledger row (as httpx builds one ``Request`` and every layer takes it). Adding a field
touches this class and the place that reads it, not every signature in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from taled.db.store import AttemptKey
from taled.models.backends.base import CancelToken, ChatMessage
from taled.tools.base import ToolSpec

__all__ = ["ModelCall"]


@dataclass(frozen=True)
class ModelCall:
    """One model call as asked for, carried unchanged through a retry.

    Raises ValueError if it has tools or a schema and continues a ``partial`` answer:
    the grammar would start over in the middle of the JSON.
    """

    role: str
    """The role whose model answers ('ux' or 'task'), unless ``model`` names another."""
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float
    timeout: float
    """Seconds the whole call may take (each wait for the backend counts)."""
    _: KW_ONLY
    task_id: str | None = None
    """The task the call works for, for the ledger."""
    cancel: CancelToken = field(default_factory=CancelToken)
    """Set to stop the call at the next token; it then ends with finish_reason 'cancelled'."""
    model: str | None = None
    """A model spec that serves this call instead of the role's own (a per-task override)."""
    key: AttemptKey | None = None
    """The step (and attempt at it) the call serves, for the ledger."""
    on_piece: Callable[[str], None] | None = None
    """Sees each piece as it arrives, for progress (``complete``; ``stream``'s caller
    sees the pieces itself)."""
    on_restart: Callable[[], None] | None = None
    """Hears that the pieces seen so far are void: the call starts over."""
    conversation_id: str | None = None
    """The conversation the call answers in, for the ledger."""
    saved_tokens: int = 0
    """Prompt tokens a conversation summary kept out, recorded with the call."""
    think: bool | None = None
    """Switches a thinking model's reasoning on or off (backends without one ignore it)."""
    partial: str = ""
    """An answer of the model's own, cut off, that this call continues."""
    tools: Sequence[ToolSpec] | None = None
    """Tools the model may call; its calls land in the Completion's ``tool_calls``."""
    schema: dict[str, Any] | None = None
    """A JSON Schema the reply's text must satisfy."""
    background: bool = False
    """Nobody waits on the call (a read ahead): the embedded model reads its prompt in
    smaller chunks, so a call someone waits on that stops it gets the model sooner, and
    it does not pause the other roles' models as a UX call does (models.pool.ux_priority)."""
    keep_prefix: bool = True
    """Whether the model may keep a copy of what it read for this call, for a later call
    whose prompt starts the same (models.llamacpp.prefix_cache_mb); a prompt that will
    not come again (a conversation's summary, an intent vote) says no, so it takes no
    memory and pushes out no copy that will be used."""

    def __post_init__(self) -> None:
        if self.partial and self.structured:
            raise ValueError("a call with tools or a schema cannot continue a partial answer")

    @property
    def structured(self) -> bool:
        """Whether the reply is a tool call or JSON under a schema (never cut as a loop)."""
        return bool(self.tools) or self.schema is not None
