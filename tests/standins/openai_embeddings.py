"""A stand-in for an OpenAI-compatible embeddings server that runs a real model.

``POST /v1/embeddings`` in OpenAI's format (as vLLM and OpenAI answer it), computed
by the embedded SmolLM2 GGUF in llama.cpp's embedding mode, mean-pooled and
normalised. llama-cpp-python's own server cannot stand in: for a model without a
pooling type (SmolLM2) it answers one vector per token, and it refuses a list of
texts in one request.

Faithful: the request ``{"model", "input": str | [str], "encoding_format"?}``; the
answer ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage": {"prompt_tokens", "total_tokens"}}``; an unknown model is OpenAI's
404 ``{"error": {"message", "type": "invalid_request_error", "code":
"model_not_found"}}``; a bad body is a 400 in the same shape; with ``api_key`` set a
request without ``Authorization: Bearer KEY`` is a 401. ``GET /v1/models`` lists the
model. Not faithful: ``encoding_format: "base64"`` and ``dimensions`` are refused (400),
token-id inputs too.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taled.models.backends.llamacpp import embedded_model_path

__all__ = ["OpenAIEmbeddingsStandIn"]

_CONTEXT = 512


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: str, api_key: str | None) -> None:
        super().__init__(address, _Handler)
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        self.model = model
        self.api_key = api_key
        self.llm = Llama(
            model_path=str(embedded_model_path()),
            embedding=True,
            pooling_type=LLAMA_POOLING_TYPE_MEAN,
            n_ctx=_CONTEXT,
            n_batch=_CONTEXT,
            n_ubatch=_CONTEXT,
            verbose=False,
        )
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, Any], str | None]] = []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the recorded requests."""

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        self._json(status, {"error": error})

    def _authorised(self) -> bool:
        if self.server.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._error(401, "Incorrect API key provided.", "invalid_api_key")
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/models":
            self._error(404, f"Invalid URL (GET {self.path})")
            return
        self._json(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.server.lock:
            recorded = body if isinstance(body, dict) else {}
            self.server.requests.append((self.path, recorded, self.headers.get("Authorization")))
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/embeddings":
            self._error(404, f"Invalid URL (POST {self.path})")
            return
        if not isinstance(body, dict):
            self._error(400, "We could not parse the JSON body of your request.")
            return
        if body.get("model") != self.server.model:
            self._error(404, f"The model `{body.get('model')}` does not exist.", "model_not_found")
            return
        if body.get("encoding_format", "float") != "float" or "dimensions" in body:
            self._error(400, "only encoding_format 'float' without dimensions is served here")
            return
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            self._error(400, "'input' must be a string or a non-empty list of strings")
            return
        data = []
        tokens = 0
        with self.server.lock:
            for i, text in enumerate(texts):
                vector, count = self.server.llm.embed(
                    text, normalize=True, truncate=True, return_count=True
                )
                data.append({"object": "embedding", "index": i, "embedding": vector})
                tokens += count
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": self.server.model, "usage": usage}
        self._json(200, answer)


class OpenAIEmbeddingsStandIn:
    """The server in a background thread of this process, on a free loopback port."""

    def __init__(self, model: str = "smollm2-embed", api_key: str | None = None) -> None:
        self._server = _Server(("127.0.0.1", 0), model, api_key)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (``…/v1``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def requests(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """Every POST so far: (path, JSON body, Authorization header)."""
        with self._server.lock:
            return list(self._server.requests)

    def __enter__(self) -> OpenAIEmbeddingsStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server.server_close()
        self._server.llm.close()
