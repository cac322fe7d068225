"""An OpenAI-compatible chat server that answers from a script, for tests of what
tale does with a given answer (a hostile one, above all), which no real model can be
made to write on demand.

Faithful to the parts of the API tale uses: ``GET /v1/models``;
``POST /v1/chat/completions`` streamed as server-sent events (a role delta, content
deltas, a chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage`` asks, ``data: [DONE]``) or answered whole.

Tool calls as OpenAI makes them: streamed, each call's first delta carries its
``index``, ``id``, ``type`` and ``function.name`` (with empty ``arguments``), then the
arguments' JSON text follows in several fragments under the same ``index``, and the
finish reason is ``tool_calls``; answered whole, the message has ``content: null`` and
``tool_calls`` with the arguments as a JSON string. Requests are checked as OpenAI
checks them, with its 400 and messages: a function name outside
``^[a-zA-Z0-9_-]{1,64}$``; a ``tool`` message that answers no call of the assistant
message before it; an assistant's calls not all answered before the next turn; a
call's ``arguments`` that is not a string.

The answer: the latest user message that names a script entry as ``[[script:NAME]]``
(a retry's feedback names none, so the task's own text decides) is answered with that
entry; an unknown name, or none, gets ``OK.``. An entry is one turn, or a list of turns
for an agent loop: the turn answered is the one at the number of ``tool`` messages in
the request (stateless, so a daemon restarted mid-loop gets the right next turn; past
the end, ``OK.``). A turn is text; or ``{"tool_calls": [{"name": ..., "arguments":
{...}}]}``, the names as the model writes them (the functions' names in the request);
or ``{"name": ..., "raw_arguments": "not json"}``, one call whose arguments are that
text. Every request body is kept, so a test can see exactly what travelled to the
model.

Timing, for tests of a slow or hung model: ``delay`` seconds pass before each streamed
piece (a word); after ``stall_after`` pieces the stream falls silent and stays open
until the server stops; ``silent`` reads a chat request and never answers it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MODEL", "ScriptedServer", "Turn", "scripted_server"]

MODEL = "scripted"
_KEY = re.compile(r"\[\[script:([\w-]+)\]\]")
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Characters of a call's arguments per streamed fragment (OpenAI sends about a token).
_FRAGMENT_CHARS = 4

Turn = str | dict[str, Any]
"""One answer: text, ``{"tool_calls": [...]}`` or ``{"name": ..., "raw_arguments": ...}``."""


class _Invalid(Exception):
    """A request OpenAI refuses with 400: the message is OpenAI's."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _check(body: dict[str, Any]) -> None:
    """Refuse what OpenAI refuses in a request's tools and tool messages."""
    for n, tool in enumerate(body.get("tools") or []):
        name = str((tool.get("function") or {}).get("name", ""))
        if not _FUNCTION_NAME.fullmatch(name):
            param = f"tools[{n}].function.name"
            raise _Invalid(
                f"Invalid '{param}': string does not match pattern. Expected a string that "
                "matches the pattern '^[a-zA-Z0-9_-]+$'.",
                param,
            )
    waiting: list[str] = []
    messages = body.get("messages") or []
    for n, message in enumerate([*messages, {"role": "end"}]):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in waiting:
                raise _Invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{n}].role",
                )
            waiting.remove(call_id)
            continue
        if waiting:
            raise _Invalid(
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(waiting)}",
                f"messages.[{n - 1}].role",
            )
        for k, call in enumerate(message.get("tool_calls") or [] if role == "assistant" else []):
            arguments = (call.get("function") or {}).get("arguments")
            if not isinstance(arguments, str):
                param = f"messages[{n}].tool_calls[{k}].function.arguments"
                raise _Invalid(
                    f"Invalid type for '{param}': expected a string, but got "
                    f"{type(arguments).__name__} instead.",
                    param,
                )
            waiting.append(call.get("id"))


def _calls(turn: dict[str, Any]) -> list[dict[str, Any]]:
    """A tool-call turn as OpenAI's ``tool_calls`` (arguments as text)."""
    if "raw_arguments" in turn:
        wanted = [{"name": turn["name"], "text": str(turn["raw_arguments"])}]
    else:
        wanted = [
            {"name": c["name"], "text": json.dumps(c.get("arguments", {}))}
            for c in turn["tool_calls"]
        ]
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": w["name"], "arguments": w["text"]},
        }
        for w in wanted
    ]


class ScriptedServer:
    """The running server: its URL and every request body it received."""

    def __init__(
        self,
        script: Mapping[str, Turn | Sequence[Turn]],
        *,
        delay: float = 0.0,
        stall_after: int | None = None,
        silent: bool = False,
    ) -> None:
        self.script = dict(script)
        self.requests: list[dict[str, Any]] = []
        self.delay = delay
        self.stall_after = stall_after
        self.silent = silent
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The ``/v1`` URL an ``openai:`` model spec names."""
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    @property
    def spec(self) -> str:
        """The model spec for a role: ``openai:<base_url>#scripted``."""
        return f"openai:{self.base_url}#{MODEL}"

    def chats(self) -> int:
        """How many chat requests arrived so far."""
        with self._lock:
            return len(self.requests)

    def received(self) -> str:
        """Every request body received so far, as one string (to search for leaks)."""
        with self._lock:
            return "\n".join(json.dumps(body) for body in self.requests)

    def answer(self, body: dict[str, Any]) -> Turn:
        """The turn that answers a request (see the module docstring)."""
        messages = body.get("messages", [])
        for message in reversed(messages):
            if message.get("role") == "user":
                found = _KEY.search(str(message.get("content", "")))
                if found:
                    entry = self.script.get(found.group(1), "OK.")
                    if isinstance(entry, str | dict):
                        return entry
                    done = sum(m.get("role") == "tool" for m in messages)
                    return entry[done] if done < len(entry) else "OK."
        return "OK."

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()  # lets a stalled or silent answer end
        self._http.shutdown()
        self._http.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self._json(404, {"error": {"message": "not found", "type": "not_found"}})
                    return
                self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._json(404, {"error": {"message": "not found", "type": "not_found"}})
                    return
                with server._lock:
                    server.requests.append(body)
                try:
                    _check(body)
                except _Invalid as exc:
                    error = {
                        "message": exc.message,
                        "type": "invalid_request_error",
                        "param": exc.param,
                        "code": None,
                    }
                    self._json(400, {"error": error})
                    return
                if server.silent:
                    server._stopped.wait()
                    self.close_connection = True
                    return
                turn = server.answer(body)
                calls = _calls(turn) if isinstance(turn, dict) else []
                text = turn if isinstance(turn, str) else ""
                written = text + " ".join(c["function"]["arguments"] for c in calls)
                prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": max(1, len(written.split())),
                    "total_tokens": prompt + max(1, len(written.split())),
                }
                if body.get("stream"):
                    try:
                        self._stream(
                            text,
                            calls,
                            usage,
                            bool((body.get("stream_options") or {}).get("include_usage")),
                        )
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True  # a stopped call hung up mid-answer
                    return
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    message = {"role": "assistant", "content": None, "tool_calls": calls}
                self._json(
                    200,
                    {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": MODEL,
                        "choices": [
                            {
                                "index": 0,
                                "message": message,
                                "finish_reason": "tool_calls" if calls else "stop",
                            }
                        ],
                        "usage": usage,
                    },
                )

            def _stream(
                self,
                text: str,
                calls: list[dict[str, Any]],
                usage: dict[str, int],
                include_usage: bool,
            ) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                base = {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": MODEL,
                }

                def send(chunk: dict[str, Any]) -> None:
                    self.wfile.write(f"data: {json.dumps({**base, **chunk})}\n\n".encode())

                if calls:
                    if not self._stream_calls(send, calls):
                        self.close_connection = True
                        return
                    if include_usage:
                        send({"choices": [], "usage": usage})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                self.wfile.flush()
                pieces = [piece for piece in re.findall(r"\S*\s*", text) if piece]
                for n, piece in enumerate(pieces):
                    if server.stall_after is not None and n >= server.stall_after:
                        server._stopped.wait()
                        self.close_connection = True
                        return
                    if server.delay and server._stopped.wait(server.delay):
                        self.close_connection = True
                        return
                    send({"choices": [{"index": 0, "delta": {"content": piece}}]})
                    self.wfile.flush()
                send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if include_usage:
                    send({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _stream_calls(self, send: Any, calls: list[dict[str, Any]]) -> bool:
                """Calls as OpenAI streams them: a header delta per call, then fragments.
                False if the server stopped meanwhile."""
                for index, call in enumerate(calls):
                    header = {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""},
                    }
                    delta: dict[str, Any] = {"tool_calls": [header]}
                    if index == 0:
                        delta = {"role": "assistant", "content": None, **delta}
                    send({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    arguments = call["function"]["arguments"]
                    for at in range(0, len(arguments), _FRAGMENT_CHARS):
                        fragment = arguments[at : at + _FRAGMENT_CHARS]
                        part = {"index": index, "function": {"arguments": fragment}}
                        if server.delay and server._stopped.wait(server.delay):
                            return False
                        send(
                            {
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"tool_calls": [part]},
                                        "finish_reason": None,
                                    }
                                ]
                            }
                        )
                    self.wfile.flush()
                send({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                return True

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@contextmanager
def scripted_server(
    script: Mapping[str, Turn | Sequence[Turn]],
    *,
    delay: float = 0.0,
    stall_after: int | None = None,
    silent: bool = False,
) -> Iterator[ScriptedServer]:
    """A started scripted server, stopped afterwards."""
    server = ScriptedServer(script, delay=delay, stall_after=stall_after, silent=silent)
    server.start()
    try:
        yield server
    finally:
        server.stop()
