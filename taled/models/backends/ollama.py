"""The Ollama backend: the official ``ollama`` client on Ollama's native API.

Ollama owns the model; tale only asks for it. A pinned model is loaded with
``keep_alive=-1`` and every request repeats it, because each request's
``keep_alive`` replaces the model's expiry (a request without one would give it
Ollama's default five minutes). ``num_ctx`` is sent, constant per model, with
every request too: a request with a different ``num_ctx`` makes Ollama reload
the model, and a reload with another request's ``keep_alive`` drops the pin.

Errors: an unreachable, dead or silent server is ``BackendDown`` (the pool
reloads and fails over); Ollama refusing a request (unknown model, bad
arguments) is ``ModelError`` with Ollama's own message. Ollama's 5xx answers
and errors reported inside a stream come from its model runner (crashed, out of
memory), so they count as the backend being down.

``probe`` reads ``/api/ps``: a pinned model missing from it was unloaded behind
tale's back (another client, ``ollama stop``, a server restart); an optional one
has outlived its ``keep_alive``. Either way the probe fails, so the pool knows;
Ollama loads the model again on the next call, which then reports a load time.

Tools are Ollama's ``tools`` (functions, named as on OpenAI: ``base.wire_name``); its
calls come whole in a message's ``tool_calls``, the arguments an object. The history's
calls go back the same way, their results as ``tool`` messages with ``tool_name``. A
``schema`` is Ollama's ``format``. The ``ollama`` client keeps only part of a tool's
schema (a property's type, description, enum and items), as Ollama itself does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NoReturn

import anyio
import httpx
from ollama import AsyncClient, ChatResponse, ProcessResponse, ResponseError

from taled.errors import BackendDown, ModelError
from taled.models.backends.base import (
    CancelToken,
    ChatMessage,
    Completion,
    Memory,
    estimate_tokens,
    function_tool,
    is_local_host,
    message_text,
    new_call_id,
    tool_name,
    wire_name,
)
from taled.settings import OllamaSettings
from taled.tools.base import ToolCall, ToolSpec

__all__ = [
    "DEFAULT_HOST",
    "NETWORK_ERRORS",
    "OllamaBackend",
    "canonical_name",
    "describe_error",
    "parse_keep_alive",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"

_NS_PER_MS = 1e6
# Closing a stream only closes a socket; bounded anyway, as it runs shielded.
_CLOSE_SECONDS = 2.0
_UNLOAD_SECONDS = 10.0
# What a network failure looks like: the client turns a refused connection into
# the builtin ConnectionError outside streams, and lets httpx's errors through.
NETWORK_ERRORS = (ConnectionError, httpx.TransportError)


def parse_keep_alive(value: str) -> float | str:
    """Settings hold a string; Ollama reads a bare number as seconds, text as a Go duration."""
    try:
        return float(value)
    except ValueError:
        return value


def describe_error(exc: BaseException) -> str:
    """An exception as a message (httpx's timeouts often carry none of their own)."""
    return str(exc) or type(exc).__name__


@contextmanager
def translated_errors(host: str, model: str, doing: str) -> Iterator[None]:
    """Map the Ollama client's failures while *doing* with *model* to tale's errors.

    A missing model (404) says how to pull it; a server error or a dropped
    connection is the backend being down; any other refusal is the model's error.
    """
    try:
        yield
    except ResponseError as exc:
        if exc.status_code == 404:
            raise ModelError(
                f"Ollama at {host} has no model {model!r}: run `ollama pull {model}` ({exc.error})"
            ) from exc
        if exc.status_code >= 500 or exc.status_code == -1:
            raise BackendDown(
                f"Ollama at {host} failed while {doing} {model}: {exc.error}"
            ) from exc
        raise ModelError(f"Ollama refused {doing} {model}: {exc.error}") from exc
    except NETWORK_ERRORS as exc:
        raise BackendDown(
            f"cannot reach Ollama at {host} while {doing} {model}: {describe_error(exc)}"
        ) from exc


def canonical_name(name: str) -> str:
    """Ollama's name for a model: ``qwen2.5`` is ``qwen2.5:latest``."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class OllamaBackend:
    """One model served by an Ollama server."""

    kind = "ollama"
    # Ollama's templates leave a final assistant message open and continue it.
    continues_final_message = True

    def __init__(self, model: str, settings: OllamaSettings, *, pinned: bool) -> None:
        self.model = model
        self._settings = settings
        self._pinned = pinned
        self.host = settings.host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self._num_ctx = settings.model_num_ctx.get(model, settings.num_ctx)
        self._keep_alive: float | str = (
            -1 if pinned else parse_keep_alive(settings.optional_keep_alive)
        )
        self._local = is_local_host(self.host)
        # Made by load(): an httpx client belongs to the event loop it first ran in.
        self._client: AsyncClient | None = None
        self._size: int | None = None
        self._size_vram: int | None = None
        self.thinks = False
        """Whether the model has Ollama's "thinking" capability (read by load())."""

    @property
    def loaded(self) -> bool:
        """Whether tale has loaded the model (Ollama may have dropped it since)."""
        return self._client is not None

    def _new_client(self) -> AsyncClient:
        s = self._settings
        timeout = httpx.Timeout(s.read_timeout_seconds, connect=s.connect_timeout_seconds)
        return AsyncClient(host=self.host, timeout=timeout)

    def _require_client(self) -> AsyncClient:
        if self._client is None:
            raise BackendDown(f"ollama model {self.model} is not loaded")
        return self._client

    def _options(self, **extra: Any) -> dict[str, Any]:
        return {"num_ctx": self._num_ctx, **extra}

    def _translated(self, doing: str) -> AbstractContextManager[None]:
        """Map the client's failures to tale's errors (see the module docstring)."""
        return translated_errors(self.host, self.model, doing)

    def _unreachable(self, exc: BaseException) -> NoReturn:
        raise BackendDown(
            f"cannot reach Ollama at {self.host} (is `ollama serve` running? set "
            f"models.ollama.host or OLLAMA_HOST): {describe_error(exc)}"
        ) from exc

    async def load(self) -> None:
        """Check that Ollama has the model, then load it with our keep_alive and num_ctx."""
        # Until this succeeds the model counts as not loaded, even if it was before.
        client, self._client = self._client or self._new_client(), None
        started = time.perf_counter()
        try:
            await self._load(client)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.close()  # type: ignore[no-untyped-call]
            raise
        self._client = client
        log.info(
            "ollama loaded %s at %s in %.0f ms (num_ctx %d, keep_alive %s)",
            self.model,
            self.host,
            (time.perf_counter() - started) * 1000,
            self._num_ctx,
            self._keep_alive,
        )

    async def _load(self, client: AsyncClient) -> None:
        try:
            shown = await client.show(self.model)
        except ResponseError as exc:
            if exc.status_code == 404:
                raise ModelError(
                    f"Ollama at {self.host} has no model {self.model!r}: "
                    f"run `ollama pull {self.model}` ({exc.error})"
                ) from exc
            raise ModelError(f"Ollama cannot show {self.model}: {exc.error}") from exc
        except NETWORK_ERRORS as exc:
            self._unreachable(exc)
        self.thinks = "thinking" in (shown.capabilities or [])
        with self._translated("loading"):
            # An empty prompt makes Ollama load the model and answer at once.
            await client.generate(self.model, options=self._options(), keep_alive=self._keep_alive)
            self._remember(await client.ps())

    async def unload(self) -> None:
        """Ask Ollama to unload the model now; a server already gone is fine."""
        client, self._client = self._client, None
        self._size = self._size_vram = None
        if client is None:
            return
        try:
            # Ollama answers an unload at once; a server that does not is hung, and a
            # shutdown must not wait a whole read timeout for it.
            with anyio.move_on_after(_UNLOAD_SECONDS) as scope:
                await client.generate(self.model, options=self._options(), keep_alive=0)
            if scope.cancelled_caught:
                log.warning("ollama at %s did not answer the unload of %s", self.host, self.model)
        except NETWORK_ERRORS as exc:
            log.info(
                "ollama at %s is gone; %s is unloaded with it (%s)", self.host, self.model, exc
            )
        except ResponseError as exc:
            if exc.status_code != 404:
                raise ModelError(f"Ollama cannot unload {self.model}: {exc.error}") from exc
            # The model was deleted meanwhile: nothing is loaded.
            log.info("ollama no longer has %s: %s", self.model, exc.error)
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()  # type: ignore[no-untyped-call]

    def _find(self, ps: ProcessResponse) -> ProcessResponse.Model | None:
        want = canonical_name(self.model)
        for entry in ps.models:
            if want in (canonical_name(entry.name or ""), canonical_name(entry.model or "")):
                return entry
        return None

    def _remember(self, ps: ProcessResponse) -> ProcessResponse.Model | None:
        entry = self._find(ps)
        self._size = None if entry is None or entry.size is None else int(entry.size)
        self._size_vram = None if entry is None or entry.size_vram is None else int(entry.size_vram)
        return entry

    async def probe(self) -> None:
        """Ask ``/api/ps`` whether the model is still loaded (and how big it is)."""
        client = self._require_client()
        try:
            ps = await client.ps()
        except ResponseError as exc:
            raise BackendDown(f"Ollama at {self.host} answers /api/ps with {exc}") from exc
        except NETWORK_ERRORS as exc:
            self._unreachable(exc)
        if self._remember(ps) is not None:
            return
        if self._pinned:
            raise BackendDown(
                f"Ollama at {self.host} no longer has {self.model} loaded: it was unloaded "
                "behind tale's back (another client, `ollama stop`, or a restart)"
            )
        raise BackendDown(
            f"Ollama at {self.host} let {self.model} expire "
            f"(keep_alive {self._keep_alive}, models.ollama.optional_keep_alive)"
        )

    def memory(self) -> Memory:
        """The model's size and VRAM share as ``/api/ps`` last reported them."""
        return Memory(bytes=self._size, vram_bytes=self._size_vram, local=self._local)

    def threads(self) -> int | None:
        """Ollama computes on its own threads."""
        return None

    async def stream(
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
        """Yield text as Ollama streams it; ``result`` holds Ollama's counts and timings after.

        The calls of a reply to ``tools`` land in ``result.tool_calls``.
        """
        client = self._require_client()
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        calls: list[ToolCall] = []
        chunks = 0
        final: ChatResponse | None = None
        parts: AsyncIterator[ChatResponse] | None = None
        try:
            with self._translated("streaming from"):
                parts = await client.chat(
                    self.model,
                    _wire_messages(messages),
                    tools=[function_tool(t) for t in tools or ()] or None,
                    format=schema,
                    stream=True,
                    options=self._options(num_predict=max_tokens, temperature=temperature),
                    keep_alive=self._keep_alive,
                    # Ollama refuses think=true for a model without the capability.
                    think=think if self.thinks else None,
                )
            while final is None and not cancel.cancelled:
                with self._translated("streaming from"):
                    part = await anext(parts, None)
                if part is None:
                    # Ollama always ends a stream with done=true; a clean end before
                    # it means the server went away between chunks.
                    raise BackendDown(
                        f"Ollama at {self.host} ended the stream of {self.model} "
                        "without its final message"
                    )
                if part.done:
                    final = part
                for call in part.message.tool_calls or ():
                    calls.append(_tool_call(call.function.name, call.function.arguments, tools))
                piece = part.message.content
                if piece:
                    first = first if first is not None else time.perf_counter()
                    chunks += 1
                    pieces.append(piece)
                    yield piece
        finally:
            if parts is not None:
                # Closing the response closes the connection, which is how Ollama
                # learns to stop generating; it must happen even when we are cancelled.
                with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                    if isinstance(parts, AsyncGenerator):
                        await parts.aclose()
        end = time.perf_counter()
        result.text = "".join(pieces)
        result.tool_calls = calls
        if final is not None:
            result.prompt_tokens = final.prompt_eval_count or 0
            result.completion_tokens = final.eval_count or 0
            result.load_ms = (final.load_duration or 0) / _NS_PER_MS
            result.prompt_ms = (final.prompt_eval_duration or 0) / _NS_PER_MS
            result.generation_ms = (final.eval_duration or 0) / _NS_PER_MS
            result.finish_reason = "length" if final.done_reason == "length" else "stop"
            result.counts_exact = True
            return
        # Cancelled: Ollama sends its counts only in the final message, so estimate.
        # Ollama streams one chunk per token; a prompt is about four characters a token.
        first = first if first is not None else end
        result.completion_tokens = chunks
        result.prompt_tokens = estimate_tokens("".join(map(message_text, messages)))
        result.load_ms = 0.0
        result.prompt_ms = (first - started) * 1000
        result.generation_ms = (end - first) * 1000
        result.finish_reason = "cancelled"
        result.counts_exact = False


def _wire_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in Ollama's form: calls with object arguments, results by tool name."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if message["role"] == "tool":
            out["tool_name"] = wire_name(message.get("name", ""))
        elif message.get("tool_calls"):
            out["tool_calls"] = [
                {
                    "function": {
                        "name": wire_name(call["name"]),
                        "arguments": call.get("arguments") or {},
                    }
                }
                for call in message.get("tool_calls", [])
            ]
        wire.append(out)
    return wire


def _tool_call(
    name: str, arguments: Mapping[str, Any], tools: Sequence[ToolSpec] | None
) -> ToolCall:
    """One of Ollama's calls: its arguments are always an object (Ollama parsed them);
    it gives no id, so one is made up."""
    return ToolCall(new_call_id(), tool_name(name, tools or ()), dict(arguments))
