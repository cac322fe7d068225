"""The OpenAI-compatible backend: a model on a remote server (vLLM, llama.cpp, LM Studio).

Calls are ``POST {base_url}/chat/completions`` with ``stream: true``; the
server-sent events are parsed by httpx-sse. Closing the response is how a cancelled
call tells the server to stop generating.

Token counts, best first:

1. ``usage`` sent on the stream (asked for with ``stream_options.include_usage``;
   vLLM, OpenAI, LM Studio and llama.cpp's ``llama-server`` send it).
2. llama-cpp-python's ``python -m llama_cpp.server`` ignores ``stream_options``
   and streams no usage. Its only count of the prompt *as the chat template
   renders it* is the ``usage`` of a non-streamed call, so the request is
   replayed with ``max_tokens: 1`` and its ``prompt_tokens`` taken: the server's
   own figure. It is cheap there: the prompt is still in the server's KV cache,
   so one token is evaluated and one sampled. The answer is counted with the
   server's tokenizer (``/extras/tokenize``; ``/tokenize`` on llama-server and
   vLLM), minus what it adds to an empty string (a BOS), as llama-cpp-python's
   own non-streamed usage counts it.
   The replay is made only for a server known (from a finished stream) to send
   no usage: elsewhere it could bill the prompt a second time.
3. Otherwise the counts are estimates and ``counts_exact`` is False: a call
   cancelled before the server's usage arrived (it comes at the end) on a server
   not known to lack it, a server without a tokenizer endpoint, or a count
   request that failed (the answer is kept; the ledger marks its counts).

Errors: no answer from the server (refused, reset, timed out, cut mid-stream)
or a 5xx is ``BackendDown``; a 4xx is ``ModelError`` with the server's text.

Tools are sent as OpenAI's ``tools`` (functions), under names OpenAI accepts
(``base.wire_name``: ``fs.read`` is ``fs--read``) and read back on the way in. Streamed
``delta.tool_calls`` are put together by ``index`` (the id and name come first, the
arguments as JSON in fragments); arguments that are not a JSON object make a call
with ``error`` set. The history's calls go back as ``tool_calls`` with the arguments
as a JSON string, and their results as ``tool`` messages naming the call's id. A
``schema`` is sent as ``response_format`` of type ``json_schema``; a server that
refuses that form naming ``response_format`` (llama-cpp-python's, which knows only
``{"type": "json_object", "schema": ...}``) gets that form instead, from then on.

Cancelling interrupts a pending read, not only the next chunk: a server that has
gone silent would otherwise hold a stopped call (and a daemon's SIGTERM) for the
whole read timeout. Such a call's counts are estimates: the server is not asked
for them, as it is not answering.

llama_cpp.server serves one request at a time and, by default
(``--interrupt_requests True``), ends a running answer when another request
arrives -- a health probe included. So while a stream is open the probe sends
nothing: the open stream is the proof of life, and its read timeout catches a
server that went silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import httpx
from httpx_sse import EventSource, SSEError

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
from taled.settings import OpenAISettings
from taled.tools.base import ToolCall, ToolSpec

__all__ = ["OpenAIBackend"]

log = logging.getLogger(__name__)

# Tokenizer endpoints (path under the server root, request body), tried in order.
_TOKENIZERS: tuple[tuple[str, Callable[[str, str], dict[str, Any]]], ...] = (
    # llama-cpp-python's llama_cpp.server
    ("/extras/tokenize", lambda model, text: {"model": model, "input": text}),
    # vLLM reads "prompt", llama.cpp's llama-server reads "content"
    ("/tokenize", lambda model, text: {"model": model, "prompt": text, "content": text}),
)
# Statuses by which a server says "no such endpoint here" (or not in this shape).
_NOT_THIS_ENDPOINT = {400, 404, 405, 422, 501}
_ERROR_TEXT_CHARS = 500
# How often a stream waiting for the server looks at its cancel token.
_CANCEL_POLL_SECONDS = 0.05


class OpenAIBackend:
    """One model on an OpenAI-compatible server."""

    kind = "openai"
    # llama.cpp's server closes a final assistant message and starts another; vLLM
    # continues one only when asked (continue_final_message), a field others may not know.
    continues_final_message = False

    def __init__(self, base_url: str, model: str, settings: OpenAISettings) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._settings = settings
        self._client: httpx.AsyncClient | None = None
        # Streams in flight on this instance; the probe leaves the server alone meanwhile.
        self._streams = 0
        # Whether the server reports usage on streams: None until a stream has finished.
        self._stream_usage: bool | None = None
        # The tokenizer endpoint that works ("" when none does; None: not tried yet)
        # and how many tokens it counts for an empty string.
        self._tokenize_url: str | None = None
        self._tokenize_offset = 0
        # How this server takes a schema: OpenAI's json_schema, or (llama-cpp-python's
        # server, which refuses that) a json_object with a schema.
        self._schema_type = "json_schema"

    @property
    def loaded(self) -> bool:
        """Whether the server has been checked and a connection pool is open."""
        return self._client is not None

    @property
    def _root(self) -> str:
        # The tokenizer endpoints live beside /v1, not under it.
        return self.base_url.removesuffix("/v1")

    def _where(self) -> str:
        return f"{self.model!r} at {self.base_url}"

    async def load(self) -> None:
        """Check that the server answers and serves the model; nothing is loaded remotely."""
        if self._client is None:
            self._client = self._new_client()
        try:
            ids = await self._model_ids(self._client, timeout=None)
        except ModelError:
            await self.unload()
            raise
        if self.model not in ids:
            await self.unload()
            raise ModelError(
                f"{self.base_url} does not serve a model {self.model!r}; it serves: "
                f"{', '.join(ids) or '(none)'}. Name one of them after '#' in the "
                "openai: model spec"
            )

    def _new_client(self) -> httpx.AsyncClient:
        s = self._settings
        headers = {}
        token = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(s.read_timeout_seconds, connect=s.connect_timeout_seconds),
        )

    async def unload(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def probe(self) -> None:
        """Idle: list the server's models (short timeout). Streaming: the stream is alive."""
        if self._client is None:
            raise BackendDown(f"{self._where()} is not loaded")
        if self._streams:
            return
        ids = await self._model_ids(
            self._client, timeout=httpx.Timeout(self._settings.connect_timeout_seconds)
        )
        if self.model not in ids:
            raise BackendDown(
                f"{self.base_url} no longer serves {self.model!r} (it serves: "
                f"{', '.join(ids) or '(none)'})"
            )

    def memory(self) -> Memory:
        """Unknown size; local when the server is on this machine's loopback."""
        return Memory(bytes=None, local=is_local_host(self.base_url))

    def threads(self) -> int | None:
        """None: the server computes with its own threads."""
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
        """Yield text as the server streams it; ``result`` holds counts and timings after.

        The calls of a reply to ``tools`` land in ``result.tool_calls``.
        """
        client = self._client
        if client is None:
            raise BackendDown(f"{self._where()} is not loaded")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _wire_messages(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = [function_tool(t) for t in tools]
        if schema is not None:
            body["response_format"] = _response_format(schema, self._schema_type)
        calls: dict[int, _PartialCall] = {}
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        done = False
        started = time.perf_counter()
        first: float | None = None
        self._streams += 1
        try:
            async with _Interrupter(cancel) as interrupter, contextlib.AsyncExitStack() as stack:
                # Every wait for the server is interruptible by the cancel token; no
                # scope spans the yield below (our caller's code runs there).
                with interrupter.reading():
                    url = f"{self.base_url}/chat/completions"
                    response = await stack.enter_async_context(
                        client.stream("POST", url, json=body)
                    )
                    if schema is not None and await self._refuses_json_schema(response):
                        body["response_format"] = _response_format(schema, self._schema_type)
                        response = await stack.enter_async_context(
                            client.stream("POST", url, json=body)
                        )
                    await self._raise_for_status(response)
                    events = await stack.enter_async_context(
                        contextlib.aclosing(_sse_data(response, self._where()))
                    )
                while not interrupter.interrupted:
                    with interrupter.reading():
                        data = await anext(events, None)
                    if interrupter.interrupted or data is None:
                        break
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    chunk = self._decode(data)
                    if chunk.get("error"):
                        raise self._error_from_body(chunk["error"], "streamed an error")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = time.perf_counter()
                            pieces.append(text)
                            yield text
                        for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                            if first is None:
                                first = time.perf_counter()
                            _PartialCall.add(calls, delta)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                    if cancel.cancelled:
                        # Leaving the block closes the response: the server
                        # sees the disconnect and stops generating.
                        break
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BackendDown(f"{self._where()} failed while streaming: {_describe(exc)}") from exc
        finally:
            self._streams -= 1
        end = time.perf_counter()

        if not cancel.cancelled and finish is None:
            await self._explain_unfinished(body, done)
        first = first if first is not None else end
        result.text = "".join(pieces)
        result.tool_calls = [calls[n].finish(tools or ()) for n in sorted(calls)]
        result.load_ms = 0.0
        result.prompt_ms = (first - started) * 1000
        result.generation_ms = (end - first) * 1000
        result.finish_reason = (
            "cancelled" if cancel.cancelled else ("length" if finish == "length" else "stop")
        )
        if usage is not None and "prompt_tokens" in usage and "completion_tokens" in usage:
            self._stream_usage = True
            result.prompt_tokens = int(usage["prompt_tokens"])
            result.completion_tokens = int(usage["completion_tokens"])
            result.counts_exact = True
            return
        if finish is not None:
            self._stream_usage = False
        generated = result.text + "".join(c.generated() for c in calls.values())
        if interrupter.interrupted:
            # Stopped while the server was silent: it would not answer a count either.
            result.prompt_tokens = estimate_tokens("\n".join(map(message_text, messages)))
            result.completion_tokens = estimate_tokens(generated)
            result.counts_exact = False
            return
        await self._count_without_usage(body, messages, generated, result)

    async def _refuses_json_schema(self, response: httpx.Response) -> bool:
        """Whether a server refused OpenAI's ``json_schema`` response format (then the
        schema goes as a ``json_object`` with a ``schema`` from now on).

        llama-cpp-python's server knows only that form, and answers the other with a 500
        naming ``response_format``; it is no sign of the server being down.
        """
        if response.status_code < 400 or self._schema_type != "json_schema":
            return False
        await response.aread()
        if "response_format" not in response.text:
            return False
        log.info("%s takes a schema as a json_object response format", self.base_url)
        self._schema_type = "json_object"
        return True

    async def _count_without_usage(
        self,
        body: dict[str, Any],
        messages: list[ChatMessage],
        generated: str,
        result: Completion,
    ) -> None:
        """Fill the counts of a stream that carried no usage (see the module docstring).

        ``generated``: the answer's text with its calls' names and arguments.
        """
        prompt: int | None = None
        completion: int | None = 0 if not generated else None
        try:
            if self._stream_usage is False:
                prompt = await self._replayed_prompt_tokens(body)
            if completion is None:
                completion = await self._server_token_count(generated)
        except ModelError as exc:
            # The answer is complete; losing it over its token count would be worse
            # than an estimate, which the ledger marks as one.
            log.warning("cannot count tokens on %s, estimating: %s", self.base_url, exc.message)
        result.counts_exact = prompt is not None and completion is not None
        if prompt is None:
            prompt = estimate_tokens("\n".join(map(message_text, messages)))
        if completion is None:
            completion = estimate_tokens(generated)
        result.prompt_tokens = prompt
        result.completion_tokens = completion

    async def _replayed_prompt_tokens(
        self, body: dict[str, Any], client: httpx.AsyncClient | None = None
    ) -> int | None:
        """The server's own prompt count, from a one-token non-streamed call of ``body``."""
        replay = {k: v for k, v in body.items() if k != "stream_options"}
        answer = await self._post_json(
            f"{self.base_url}/chat/completions",
            {**replay, "max_tokens": 1, "stream": False},
            client,
        )
        usage = answer.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            return int(usage["prompt_tokens"])
        return None

    async def _server_token_count(self, text: str) -> int | None:
        """Tokens in ``text`` by the server's tokenizer; None when it has no endpoint."""
        if self._tokenize_url is None:
            await self._find_tokenizer()
        if not self._tokenize_url:
            return None
        count = await self._tokenize(self._tokenize_url, text)
        return None if count is None else count - self._tokenize_offset

    async def _find_tokenizer(self) -> None:
        for path, _ in _TOKENIZERS:
            url = self._root + path
            empty = await self._tokenize(url, "")
            word = await self._tokenize(url, "hello") if empty is not None else None
            # A server that ignored our field name counts nothing for a real word.
            if empty is not None and word is not None and word > empty:
                self._tokenize_url, self._tokenize_offset = url, empty
                return
        # Remembered only now: a server that failed mid-search is asked again next time.
        self._tokenize_url = ""
        log.info("%s has no tokenizer endpoint: answers' tokens are estimated", self.base_url)

    async def _tokenize(self, url: str, text: str) -> int | None:
        """Tokens in ``text`` counted at ``url``; None when that is no tokenizer."""
        body = next(make for path, make in _TOKENIZERS if url.endswith(path))(self.model, text)
        response = await self._post(url, body)
        if response.status_code in _NOT_THIS_ENDPOINT:
            return None
        answer = await self._json_answer(response)
        if isinstance(answer.get("count"), int):
            return int(answer["count"])
        tokens = answer.get("tokens")
        return len(tokens) if isinstance(tokens, list) else None

    async def _explain_unfinished(self, body: dict[str, Any], done: bool) -> None:
        """Raise for a stream that ended cleanly without a finish reason."""
        if done:
            raise ModelError(
                f"{self.base_url} ended the answer of {self.model!r} without a finish reason. "
                "llama_cpp.server does this when another request arrives: start it with "
                "--interrupt_requests False"
            )
        # A clean end with no [DONE] is the server giving up on this request
        # (llama_cpp.server: a prompt over its context). The same request without
        # streaming gets its error as a proper answer. On a new connection: the
        # server closes the one that stream came on.
        async with self._new_client() as client:
            await self._replayed_prompt_tokens(body, client)
        raise ModelError(
            f"{self.base_url} ended the stream of {self.model!r} before the answer was finished"
        )

    async def _post(
        self, url: str, body: dict[str, Any], client: httpx.AsyncClient | None = None
    ) -> httpx.Response:
        client = client or self._client
        if client is None:
            raise BackendDown(f"{self._where()} is not loaded")
        try:
            return await client.post(url, json=body)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BackendDown(f"{self._where()}: POST {url} failed: {_describe(exc)}") from exc

    async def _post_json(
        self, url: str, body: dict[str, Any], client: httpx.AsyncClient | None = None
    ) -> dict[str, Any]:
        return await self._json_answer(await self._post(url, body, client))

    async def _json_answer(self, response: httpx.Response) -> dict[str, Any]:
        await self._raise_for_status(response)
        return self._decode(response.text)

    async def _model_ids(
        self, client: httpx.AsyncClient, timeout: httpx.Timeout | None
    ) -> list[str]:
        url = f"{self.base_url}/models"
        try:
            if timeout is None:
                response = await client.get(url)
            else:
                response = await client.get(url, timeout=timeout)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BackendDown(f"cannot reach {url} for {self.model!r}: {_describe(exc)}") from exc
        except httpx.InvalidURL as exc:
            raise ModelError(f"{url} is not a valid URL: {exc}") from exc
        await self._raise_for_status(response)
        data = self._decode(response.text).get("data")
        if not isinstance(data, list):
            raise ModelError(f"{url} is not an OpenAI-compatible model list (no 'data')")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            await response.aread()
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BackendDown(
                f"{self._where()}: {response.status_code} and a broken body: {_describe(exc)}"
            ) from exc
        try:
            body: Any = json.loads(response.text)
        except ValueError:
            body = response.text
        # OpenAI and vLLM: {"error": {"message": ...}}; FastAPI: {"detail": ...}.
        error = (
            (body.get("error") or body.get("detail") or body) if isinstance(body, dict) else body
        )
        raise self._error_from_body(error, f"answered {response.status_code}", response.status_code)

    def _error_from_body(self, error: Any, what: str, status: int | None = None) -> ModelError:
        """BackendDown for a server-side failure (5xx), else ModelError, with the server's text."""
        if isinstance(error, dict):
            text = str(error.get("message") or error)
            code = error.get("code")
            if status is None and isinstance(code, int):
                status = code
        else:
            text = str(error)
        message = f"{self.base_url} {what} for {self.model!r}: {text[:_ERROR_TEXT_CHARS]}"
        if status is not None and status >= 500:
            return BackendDown(message)
        return ModelError(message)

    def _decode(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise BackendDown(
                f"{self._where()} sent something that is not JSON: {text[:200]!r}"
            ) from exc
        if not isinstance(value, dict):
            raise BackendDown(f"{self._where()} sent JSON that is not an object: {text[:200]!r}")
        return value


class _Interrupter:
    """Interrupts a wait for the server as soon as a call's cancel token is set.

    The token is a thread-safe flag, not awaitable: a watcher task looks at it every
    50 ms and cancels the scope of the read in progress (``reading()``), if any; a read
    begun after the token was set is cancelled at once.
    """

    def __init__(self, cancel: CancelToken) -> None:
        self._cancel = cancel
        self._scope: anyio.CancelScope | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.interrupted = False
        """Whether a read was cut off by the token (the server was silent then)."""

    async def __aenter__(self) -> _Interrupter:
        self._watcher = asyncio.create_task(self._watch(), name="openai-cancel-watch")
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while not self._cancel.cancelled:
            await asyncio.sleep(_CANCEL_POLL_SECONDS)
        if self._scope is not None:
            self._scope.cancel()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A wait for the server that the cancel token interrupts."""
        with anyio.CancelScope() as scope:
            if self._cancel.cancelled:
                scope.cancel()
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught:
            self.interrupted = True


def _response_format(schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """``response_format`` holding a reply to ``schema``: OpenAI's form, or llama-cpp-python's."""
    if kind == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


def _wire_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in OpenAI's form: calls with JSON-string arguments, results by call id."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if message["role"] == "tool":
            out["tool_call_id"] = message.get("tool_call_id", "")
        elif message.get("tool_calls"):
            out["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {
                        "name": wire_name(call["name"]),
                        "arguments": json.dumps(call.get("arguments") or {}, ensure_ascii=False),
                    },
                }
                for call in message.get("tool_calls", [])
            ]
        wire.append(out)
    return wire


@dataclass
class _PartialCall:
    """One streamed tool call, put together from its deltas."""

    id: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    @staticmethod
    def add(calls: dict[int, _PartialCall], delta: Any) -> None:
        """Fold one ``delta.tool_calls`` entry into the call at its index."""
        if not isinstance(delta, dict):
            return
        index = delta.get("index")
        call = calls.setdefault(index if isinstance(index, int) else len(calls), _PartialCall())
        if isinstance(delta.get("id"), str) and not call.id:
            call.id = delta["id"]
        function = delta.get("function") or {}
        if isinstance(function.get("name"), str):
            call.name.append(function["name"])
        if isinstance(function.get("arguments"), str):
            call.arguments.append(function["arguments"])

    def generated(self) -> str:
        """What the model wrote for this call (for a token count)."""
        return "".join(self.name) + "".join(self.arguments)

    def finish(self, tools: Sequence[ToolSpec]) -> ToolCall:
        """The call, its name read back to tale's; ``error`` if its arguments are no object."""
        call_id = self.id or new_call_id()
        name = tool_name("".join(self.name), tools)
        text = "".join(self.arguments)
        try:
            arguments = json.loads(text) if text.strip() else {}
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return ToolCall(
                call_id,
                name,
                error=f"the arguments of your call to {name} are not a JSON object: "
                f"{text[:_ERROR_TEXT_CHARS]!r}",
            )
        return ToolCall(call_id, name, arguments)


async def _sse_data(response: httpx.Response, where: str) -> AsyncGenerator[str, None]:
    """The data of each server-sent event; comments (keep-alive pings) and other fields skipped.

    httpx-sse parses the stream (line endings, multi-line data, fields) as the
    HTML standard says. A 200 that is not an event stream (a web page, a server
    that ignores ``stream: true``) is a misconfigured endpoint, not a server
    that is down: a ``ModelError`` naming what came instead.
    """
    events = EventSource(response).aiter_sse()
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                # An event with no data field (only ``event:`` or ``id:``) carries no chunk.
                if event.data:
                    yield event.data
    except SSEError as exc:
        # httpx-sse raises it (a TransportError) only for the content type, before
        # reading a line: not a server that is down.
        content_type = response.headers.get("content-type", "")
        raise ModelError(
            f"{where} answered with {content_type or 'no content type'!r}, not an event "
            "stream: is base_url the API's (ending in /v1)?"
        ) from exc


def _describe(exc: Exception) -> str:
    # Some httpx errors (a reset, a read timeout) have an empty message.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
