"""An OpenAI-compatible chat server that answers from a script, for tests of what
tale does with a given answer (a hostile one, above all), which no real model can be
made to write on demand.

Faithful to the parts of the API tale uses: ``GET /v1/models``;
``POST /v1/chat/completions`` streamed as server-sent events (a role delta, content
deltas, a chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage`` asks, ``data: [DONE]``) or answered whole.

The answer: the latest user message that names a script entry as ``[[script:NAME]]``
(a retry's feedback names none, so the task's own text decides) is answered with that
entry's text; an unknown name, or none, gets ``OK.``. Every
request body is kept, so a test can see exactly what travelled to the model.

Timing, for tests of a slow or hung model: ``delay`` seconds pass before each streamed
piece (a word); after ``stall_after`` pieces the stream falls silent and stays open
until the server stops; ``silent`` reads a chat request and never answers it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MODEL", "ScriptedServer", "scripted_server"]

MODEL = "scripted"
_KEY = re.compile(r"\[\[script:([\w-]+)\]\]")


class ScriptedServer:
    """The running server: its URL and every request body it received."""

    def __init__(
        self,
        script: Mapping[str, str],
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

    def answer(self, body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages", [])):
            if message.get("role") == "user":
                found = _KEY.search(str(message.get("content", "")))
                if found:
                    return self.script.get(found.group(1), "OK.")
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
                if server.silent:
                    server._stopped.wait()
                    self.close_connection = True
                    return
                text = server.answer(body)
                prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": max(1, len(text.split())),
                    "total_tokens": prompt + max(1, len(text.split())),
                }
                if body.get("stream"):
                    try:
                        self._stream(
                            text,
                            usage,
                            bool((body.get("stream_options") or {}).get("include_usage")),
                        )
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True  # a stopped call hung up mid-answer
                    return
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
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": usage,
                    },
                )

            def _stream(self, text: str, usage: dict[str, int], include_usage: bool) -> None:
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
    script: Mapping[str, str],
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
