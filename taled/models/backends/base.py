"""The interface every model backend implements, and what a call returns.

Tool traffic travels in ``ChatMessage`` in one backend-neutral form: an assistant
turn's ``tool_calls`` (each ``ToolCall.as_json()``), answered by ``tool`` turns that
name the call (``tool_call_id``) and the tool (``name``). Each backend turns that into
its native form, and ``wire_name``/``tool_name`` map tool names to the names OpenAI and
Ollama accept and back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import socket
import threading
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, Protocol, TypedDict
from urllib.parse import urlsplit

from taled.tools.base import ToolCall, ToolSpec

__all__ = [
    "Backend",
    "CancelToken",
    "ChatMessage",
    "Completion",
    "Memory",
    "continuation",
    "estimate_tokens",
    "function_tool",
    "is_local_host",
    "message_text",
    "new_call_id",
    "tool_name",
    "wire_name",
]

# The usual rule of thumb for English with BPE tokenizers, used only where a
# backend gives no count (such counts are marked counts_exact = False).
CHARS_PER_TOKEN = 4

# How a backend that cannot continue an assistant message is asked to go on.
CONTINUE_PROMPT = "Continue exactly where you stopped. Do not repeat what you already wrote."


def estimate_tokens(text: str) -> int:
    """A rough token count for ``text`` (about four characters a token)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def is_local_host(url: str) -> bool:
    """Whether a server URL (or bare host[:port]) is this machine."""
    hostname = urlsplit(url if "://" in url else f"http://{url}").hostname or "127.0.0.1"
    if hostname in ("localhost", socket.gethostname()) or hostname.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        return False
    # 0.0.0.0 is how a server's own address is often written (OLLAMA_HOST);
    # connecting to it reaches this machine.
    return address.is_loopback or address.is_unspecified


class ChatMessage(TypedDict):
    """One chat turn."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: NotRequired[list[dict[str, Any]]]
    """An assistant turn's calls, each in ``ToolCall.as_json()`` form."""
    tool_call_id: NotRequired[str]
    """A tool turn: the id of the call it answers."""
    name: NotRequired[str]
    """A tool turn: the tool that was called (tale's name, ``SERVER.tool`` included)."""


def message_text(message: ChatMessage) -> str:
    """A message's text with its tool calls, as far as counting its size goes."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    return message["content"] + json.dumps(calls, ensure_ascii=False)


def new_call_id() -> str:
    """A made-up tool call id, unique per call, for a backend whose model gives none."""
    return f"call_{uuid.uuid4().hex[:24]}"


# OpenAI's rule for a function's name; Ollama is given the same names.
_WIRE_MAX = 64
_WIRE_SAFE = re.compile(r"[A-Za-z0-9_]")
_WIRE_ESCAPE = re.compile(r"--|-([0-9a-f]+)-")
_WIRE_HASH_CHARS = 10


def wire_name(name: str) -> str:
    """``name`` as a function name OpenAI accepts (``^[a-zA-Z0-9_-]{1,64}$``).

    Letters, digits and ``_`` stay; a ``.`` (an MCP server's namespace) becomes ``--``;
    any other character ``-HEX-`` (its code point), so ``fs.read_file`` is
    ``fs--read_file`` and ``my-srv.x`` is ``my-2d-srv--x``. Distinct names get distinct
    wire names, and ``tool_name`` reads them back. A name longer than 64 characters once
    escaped keeps its start and ends in a hash of the whole: only the tools offered
    with the call map it back.
    """
    escaped = "".join(
        c if _WIRE_SAFE.fullmatch(c) else "--" if c == "." else f"-{ord(c):x}-" for c in name
    )
    if len(escaped) <= _WIRE_MAX:
        return escaped
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_WIRE_HASH_CHARS]
    return f"{escaped[: _WIRE_MAX - _WIRE_HASH_CHARS - 2]}-_{digest}"


def tool_name(wire: str, tools: Sequence[ToolSpec] = ()) -> str:
    """The tale name of a function name a model called: a tool offered, else unescaped.

    A name the model made up is read back as well as it can be (a malformed escape
    stays as written); the agent loop then reports it as unknown.
    """
    for tool in tools:
        if wire_name(tool.name) == wire:
            return tool.name

    def unescape(found: re.Match[str]) -> str:
        if found.group(0) == "--":
            return "."
        code = int(found.group(1), 16)
        return chr(code) if code <= 0x10FFFF else found.group(0)

    return _WIRE_ESCAPE.sub(unescape, wire)


def continuation(messages: list[ChatMessage], partial: str, *, native: bool) -> list[ChatMessage]:
    """The messages that make a model go on with ``partial``, its own cut-off answer.

    A backend that continues a final assistant message (``continues_final_message``)
    gets the partial as that message: the model picks up mid-sentence, and at
    temperature 0 writes exactly what it would have written uncut. Others get the
    partial as a finished turn followed by a request to continue, which small models
    often answer by starting over.
    """
    if not partial:
        return messages
    prefill: list[ChatMessage] = [*messages, {"role": "assistant", "content": partial}]
    if native:
        return prefill
    return [*prefill, {"role": "user", "content": CONTINUE_PROMPT}]


class CancelToken:
    """Set from any thread to stop a call at the next token.

    A token made with a ``parent`` is also cancelled when its parent is: the pool
    stops a call for its own reasons (a loop) without touching the caller's token,
    whose state means "the caller stopped it".
    """

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def cancel(self) -> None:
        """Ask the call to stop."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called (on this token or its parent)."""
        return self._event.is_set() or (self._parent is not None and self._parent.cancelled)


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
    counts_exact: bool = True
    """False when a remote server reported no usage and the counts are estimates."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The calls the model made (only when the call offered ``tools``), in order. A call
    that could not be read has ``error`` set; the agent loop answers it with that."""
    cached_tokens: int = 0
    """Of prompt_tokens, how many the backend did not evaluate again: a prefix still in
    its KV cache from an earlier call (OpenAI's ``prompt_tokens_details.cached_tokens``)."""

    @classmethod
    def empty(cls) -> Completion:
        """A result to be filled in by a stream."""
        return cls("", 0, 0, 0.0, 0.0, 0.0, "stop")


@dataclass(frozen=True)
class Memory:
    """What a loaded model occupies, as far as its backend can tell."""

    bytes: int | None
    """Weights in memory (llama.cpp's model size; Ollama's ``size``)."""
    vram_bytes: int | None = None
    """Of which in GPU memory (Ollama's ``size_vram``); None when unknown."""
    local: bool = True
    """Whether the memory is this machine's (False for a remote server)."""


class Backend(Protocol):
    """A loaded model that can answer chats. One instance serves one role.

    Errors: raise ``BackendDown`` when the backend itself is broken or unreachable
    (the pool then reloads it and fails over), ``ModelError`` for a problem with
    this one request (a prompt over the context, an unknown model).
    """

    kind: str
    model: str
    continues_final_message: bool
    """Whether a final assistant message is continued rather than answered."""

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
        think: bool | None = None,
        tools: Sequence[ToolSpec] | None = None,
        schema: dict[str, Any] | None = None,
        keep_prefix: bool = True,
        background: bool = False,
    ) -> AsyncGenerator[str, None]:
        """Yield the answer's text as it is generated; fill ``result`` when done.

        ``think`` turns a thinking model's reasoning on or off (None: the model's
        default); a backend or model without that switch ignores it.
        ``tools``: the model may call these, in the backend's native form; the calls
        land in ``result.tool_calls`` (their arguments are not yielded as text).
        ``schema``: a JSON Schema the reply's text must satisfy (a grammar on llama.cpp,
        ``response_format`` on OpenAI, ``format`` on Ollama).
        ``keep_prefix``: whether the backend may keep a copy of this call's prompt state
        for a later call (the embedded model's prefix cache; others ignore it).
        ``background``: nobody waits on the call; the embedded model reads its prompt in
        smaller chunks, to give way sooner when it is stopped (others ignore it).
        """
        ...

    async def probe(self) -> None:
        """A cheap health check; raise BackendDown if the model cannot serve.

        The pool calls it periodically under a timeout (a hang counts as down).
        It must not wait behind a call in progress.
        """

    def memory(self) -> Memory:
        """What the loaded model occupies (zeros/None when not loaded or unknown)."""
        ...

    def threads(self) -> int | None:
        """CPU threads this instance computes with (None for remote backends)."""
        ...


def function_tool(tool: ToolSpec) -> dict[str, Any]:
    """A tool in the OpenAI function form, which Ollama's ``tools`` takes as well."""
    return {
        "type": "function",
        "function": {
            "name": wire_name(tool.name),
            "description": tool.description,
            "parameters": tool.input_schema,
        },
    }
