"""A stand-in for Ollama's HTTP API that runs a real model (the embedded SmolLM2).

Run it as ``python -m tests.standins.ollama_server --port 11434 --model smollm2:135m``
(``--model`` repeats; it prints ``listening on URL`` when ready), or start it in a
thread with ``OllamaStandIn(["smollm2:135m"]).start()``.

Faithful to Ollama (the shapes are those of the ``ollama`` client's ``_types.py``):

- Endpoints ``GET /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
  ``POST /api/show``, ``POST /api/chat``, ``POST /api/generate``, ``POST /api/embed``;
  errors are
  ``{"error": "..."}`` with Ollama's status codes and texts (404 ``model "X" not
  found, try pulling it first``, 400 for a missing model or bad JSON).
- Streaming is NDJSON over chunked transfer (as Go's net/http sends it), ``stream``
  defaulting to true; the last object has ``done: true``, ``done_reason`` ("stop",
  "length") and the durations in nanoseconds and counts of Ollama.
- Residency like Ollama's scheduler: a model loads on first use (``load_duration``
  is the real load then, microseconds when already loaded); each request's
  ``keep_alive`` (seconds as a number, a Go duration as a string; negative means
  forever; absent means ``$OLLAMA_KEEP_ALIVE`` or 5m) sets how long the model stays
  after the request; 0 unloads it when idle; an empty prompt (or empty messages)
  only loads, and with ``keep_alive: 0`` only unloads ("done_reason": "load" /
  "unload"). A different ``num_ctx`` than the loaded instance's reloads it. ``/api/ps``
  shows ``expires_at`` about 292 years ahead for "forever", as Ollama does (Go's
  largest duration).
- One request generates on a model at a time (OLLAMA_NUM_PARALLEL=1); a client
  that disconnects mid-stream stops the generation at the next token.
- ``/api/embed`` as Ollama's ``EmbedHandler``: ``input`` a string or a list of
  strings (400 ``invalid input type`` otherwise; an empty one only loads the model
  and answers ``embeddings: []``), ``truncate`` (default true) cuts a text to the
  context, false makes an over-long text a 400; every vector is L2-normalised, then
  cut to ``dimensions`` (and normalised again) when that is smaller; the answer has
  ``model``, ``embeddings``, ``total_duration``, ``load_duration`` and
  ``prompt_eval_count``. It loads the model (residency and keep_alive as above).

Not faithful:

- Every served name is the same GGUF, chat-templated by llama-cpp-python with the
  GGUF's own Jinja template (Ollama uses its Go template from the Modelfile).
  ``show``'s ``template``/``modelfile``/``parameters`` are therefore approximations,
  ``digest`` is a hash of the name, ``size`` is the GGUF's size, ``size_vram`` is 0.
- Tools and ``format``: every model has the "tools" capability. ``tools`` are
  rendered into the system message and the history's calls and results into plain
  turns, as the embedded backend renders them (Ollama uses the model's template),
  and the reply is held by a grammar to one call of an offered tool (real Ollama lets
  the model choose between text and calls, and parses calls out of its text). The
  call comes as Ollama sends it: one message with ``tool_calls`` (``function.name``,
  ``function.arguments`` an object), no content streamed before it; a reply cut by
  ``num_predict`` that is no call comes back as content. ``format`` (``"json"`` or a
  JSON Schema) holds the reply to it with a grammar, as Ollama does; strings a schema
  leaves unbounded are bounded, as on the embedded backend.
- Thinking: models named in ``thinking`` list the "thinking" capability in
  ``show``; ``think: true`` for any other model is Ollama's 400 (``"X" does not
  support thinking``). A thinking model's answer carries no ``message.thinking``:
  the stand-in's model cannot reason, it only records what was asked.
- Embeddings come from a second llama.cpp context of the same GGUF in embedding
  mode, mean-pooled (SmolLM2 has no pooling of its own; which pooling Ollama's runner
  uses for such a model is not copied). Every served name embeds alike, and a name
  is never refused for lacking the "embedding" capability.
- No memory-pressure eviction, no OLLAMA_MAX_LOADED_MODELS, no pull/push/create/
  delete/copy, no ``/api/embeddings`` (the old endpoint), no images; options other
  than ``num_ctx`` never cause a reload; only ``num_ctx``,
  ``num_predict``, ``temperature``, ``top_k``, ``top_p``, ``repeat_penalty``,
  ``seed`` and ``stop`` are honoured. Loading happens under one lock, so ``/api/ps``
  waits while a model loads. Request bodies must carry Content-Length.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from taled.errors import ModelError
from taled.models.backends.base import ChatMessage
from taled.models.backends.llamacpp import (
    bounded_schema,
    embedded_model_path,
    json_grammar,
    plain_messages,
    string_chars,
    tool_call_schema,
)
from taled.tools.base import ToolSpec

__all__ = ["Generation", "OllamaStandIn", "main"]

VERSION = "0.0.0"
FOREVER = math.inf
# Go's largest time.Duration: what Ollama turns a negative keep_alive into.
_GO_MAX_DURATION = timedelta(microseconds=(2**63 - 1) // 1000)
_DEFAULT_NUM_CTX = 4096
# Ollama's defaults (api.DefaultOptions), where llama-cpp-python's differ.
_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
}
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M"}
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
# The reply budget assumed when bounding a grammar's strings for an unlimited num_predict.
_UNLIMITED_PREDICT = 2048


class ApiError(Exception):
    """An error answered as Ollama does: a status and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Generation:
    """What one chat or generate request generated, for tests to check."""

    path: str
    model: str
    pieces: int
    """Text pieces produced (one per token, roughly)."""
    outcome: str
    """'stop' or 'length' when it ran to the end, 'client gone' when the client hung up."""


class _ClientGone(Exception):
    """The client closed the connection (or the server is stopping)."""


def canonical(name: str) -> str:
    """Ollama's name for a model: ``smollm2`` is ``smollm2:latest``."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds a model stays loaded: a number is seconds, a string a Go duration."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ApiError(400, f"json: cannot unmarshal {type(value).__name__} into Duration")
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == "0":
            return 0.0
        parts = _GO_DURATION.findall(body)
        if not body or "".join(n + u for n, u in parts) != body:
            raise ApiError(400, f'time: invalid duration "{value}"')
        seconds = sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)
    else:
        seconds = float(value)
    return FOREVER if seconds < 0 else seconds


def _normalize(vector: Sequence[float]) -> list[float]:
    """Ollama's normalize: unit length, a 400 for NaN or infinite values."""
    if any(math.isnan(v) or math.isinf(v) for v in vector):
        raise ApiError(400, "embedding contains NaN or Inf values")
    norm = 1.0 / max(math.sqrt(sum(v * v for v in vector)), 1e-12)
    return [v * norm for v in vector]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(eq=False)
class _Instance:
    """One loaded model: a llama.cpp context of one ``num_ctx``."""

    name: str
    llm: Any
    formatter: Any
    num_ctx: int
    size: int
    busy: int = 0
    keep_alive: float = 300.0
    expires_at: float | None = None
    """Wall-clock unload time while idle; None while busy or kept forever."""
    unload_when_idle: bool = False
    generating: threading.Lock = field(default_factory=threading.Lock)
    embedder: Any = None
    """The same GGUF in embedding mode, made by the first /api/embed (under ``generating``)."""


class _Scheduler:
    """Which models are loaded, for how long: Ollama's scheduler, minus memory."""

    def __init__(self, names: Sequence[str], path: Path, default_keep_alive: float) -> None:
        self.names = [canonical(n) for n in names]
        self.thinking: set[str] = set()
        self.path = path
        self.default_keep_alive = default_keep_alive
        self.metadata = self._read_metadata()
        self._cond = threading.Condition()
        self._loaded: dict[str, _Instance] = {}
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="ollama-reaper", daemon=True)
        self._reaper.start()

    def _read_metadata(self) -> dict[str, str]:
        from llama_cpp import Llama

        llm = Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        try:
            return dict(llm.metadata)
        finally:
            llm.close()

    def resolve(self, name: Any) -> str:
        """The served name for a request's ``model``, or Ollama's 400/404."""
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        if canonical(name) not in self.names:
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        return canonical(name)

    def acquire(self, name: str, num_ctx: int) -> tuple[_Instance, int]:
        """The loaded instance (loading or reloading it), and the ns that took."""
        started = time.perf_counter_ns()
        with self._cond:
            while True:
                if self._closed:
                    raise ApiError(503, "server is shutting down")
                inst = self._loaded.get(name)
                if inst is None:
                    break
                if inst.num_ctx == num_ctx and not inst.unload_when_idle:
                    inst.busy += 1
                    inst.expires_at = None
                    return inst, time.perf_counter_ns() - started
                if inst.busy == 0:
                    # Another num_ctx: Ollama's runner "needs reload".
                    self._unload(inst)
                    break
                self._cond.wait()
            inst = self._load(name, num_ctx)
            inst.busy = 1
            return inst, time.perf_counter_ns() - started

    def release(self, inst: _Instance, keep_alive: float) -> None:
        """A request is done with ``inst``; its keep_alive decides what happens next."""
        with self._cond:
            inst.busy -= 1
            inst.keep_alive = keep_alive
            if inst.busy == 0:
                if keep_alive == 0 or inst.unload_when_idle:
                    self._unload(inst)
                elif keep_alive != FOREVER:
                    inst.expires_at = time.time() + keep_alive
            self._cond.notify_all()

    def expire(self, name: str) -> None:
        """``keep_alive: 0`` with no prompt: unload now, or when the running request ends."""
        with self._cond:
            inst = self._loaded.get(name)
            if inst is None:
                return
            if inst.busy:
                inst.unload_when_idle = True
            else:
                self._unload(inst)
            self._cond.notify_all()

    def ps(self) -> list[dict[str, Any]]:
        """``/api/ps``'s models, most recently loaded first."""
        with self._cond:
            now = datetime.now().astimezone()
            models = []
            for inst in reversed(self._loaded.values()):
                if inst.keep_alive == FOREVER:
                    expires = now + _GO_MAX_DURATION
                elif inst.expires_at is None:
                    expires = now + timedelta(seconds=inst.keep_alive)
                else:
                    expires = datetime.fromtimestamp(inst.expires_at).astimezone()
                models.append(
                    {
                        **self.describe(inst.name),
                        "expires_at": expires.isoformat(),
                        "size_vram": 0,
                        "context_length": inst.num_ctx,
                    }
                )
            return models

    def describe(self, name: str) -> dict[str, Any]:
        """The fields ``/api/tags`` and ``/api/ps`` share."""
        return {
            "name": name,
            "model": name,
            "size": self.path.stat().st_size,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": self.details(),
        }

    def details(self) -> dict[str, Any]:
        """Ollama's ``details`` object, from the GGUF's metadata."""
        arch = self.metadata.get("general.architecture", "")
        file_type = int(self.metadata.get("general.file_type", "-1"))
        return {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": self.metadata.get("general.size_label", ""),
            "quantization_level": _FILE_TYPES.get(file_type, "unknown"),
        }

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, wait for running ones to stop, and free every model."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while any(i.busy for i in self._loaded.values()) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for inst in list(self._loaded.values()):
                if not inst.busy:
                    self._unload(inst)

    def _load(self, name: str, num_ctx: int) -> _Instance:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = Llama(model_path=str(self.path), n_ctx=num_ctx, verbose=False)
        formatter = Jinja2ChatFormatter(
            template=self.metadata["tokenizer.chat_template"],
            eos_token=llm._model.token_get_text(llm.token_eos()),
            bos_token=llm._model.token_get_text(llm.token_bos()),
        )
        inst = _Instance(name, llm, formatter, num_ctx, self.path.stat().st_size)
        self._loaded[name] = inst
        return inst

    def _unload(self, inst: _Instance) -> None:
        if self._loaded.get(inst.name) is inst:
            del self._loaded[inst.name]
        inst.llm.close()
        if inst.embedder is not None:
            inst.embedder.close()

    def embedder(self, inst: _Instance) -> Any:
        """``inst``'s model in embedding mode, loaded on first use (hold ``inst.generating``)."""
        if inst.embedder is None:
            from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

            inst.embedder = Llama(
                model_path=str(self.path),
                embedding=True,
                pooling_type=LLAMA_POOLING_TYPE_MEAN,
                n_ctx=inst.num_ctx,
                # A whole (truncated) text is one batch: llama-cpp-python cuts at n_batch.
                n_batch=inst.num_ctx,
                n_ubatch=inst.num_ctx,
                verbose=False,
            )
        return inst.embedder

    def _reap(self) -> None:
        """Unload idle models whose keep_alive ran out."""
        with self._cond:
            while not self._closed:
                now = time.time()
                for inst in list(self._loaded.values()):
                    if inst.busy == 0 and inst.expires_at is not None and inst.expires_at <= now:
                        self._unload(inst)
                pending = [i.expires_at for i in self._loaded.values() if i.expires_at is not None]
                self._cond.wait(max(0.0, min(pending) - now) if pending else None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], scheduler: _Scheduler) -> None:
        super().__init__(address, _Handler)
        self.scheduler = scheduler
        self.stopping = threading.Event()
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.connections: set[socket.socket] = set()
        self.generations: list[Generation] = []
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is what the tests do on purpose: say nothing of it."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "ollama-standin"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the recorded requests instead."""

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # -- routing ---------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._send(200, b"", "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        self._route("GET", {})

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            self._error(ApiError(400, f"invalid request: {exc}"))
            return
        self._route("POST", body)

    def _route(self, method: str, body: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        with self.server.lock:
            self.server.requests.append((method, path, body))
        routes = {
            ("GET", "/"): lambda: self._send(200, b"Ollama is running", "text/plain"),
            ("GET", "/api/version"): lambda: self._json({"version": VERSION}),
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): lambda: self._json({"models": self.server.scheduler.ps()}),
            ("POST", "/api/show"): lambda: self._show(body),
            ("POST", "/api/chat"): lambda: self._generate(body, chat=True),
            ("POST", "/api/generate"): lambda: self._generate(body, chat=False),
            ("POST", "/api/embed"): lambda: self._embed(body),
        }
        handler = routes.get((method, path))
        if handler is None:
            self._send(404, b"404 page not found", "text/plain")
            return
        try:
            handler()
        except ApiError as exc:
            self._error(exc)

    # -- responses -------------------------------------------------------------

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _error(self, exc: ApiError) -> None:
        self._json({"error": exc.message}, exc.status)

    def _tags(self) -> None:
        s = self.server.scheduler
        modified = datetime.fromtimestamp(s.path.stat().st_mtime).astimezone().isoformat()
        self._json({"models": [{**s.describe(n), "modified_at": modified} for n in s.names]})

    def _show(self, body: dict[str, Any]) -> None:
        s = self.server.scheduler
        requested = body.get("model") or body.get("name")
        if not isinstance(requested, str) or not requested:
            raise ApiError(400, "model is required")
        if canonical(requested) not in s.names:
            raise ApiError(404, f"model '{requested}' not found")
        info: dict[str, Any] = {}
        for key, value in s.metadata.items():
            if key.startswith("tokenizer.chat_template"):
                continue
            try:
                info[key] = int(value)
            except ValueError:
                try:
                    info[key] = float(value)
                except ValueError:
                    info[key] = value
        template = s.metadata.get("tokenizer.chat_template", "")
        self._json(
            {
                "license": s.metadata.get("general.license", ""),
                "modelfile": f"# Modelfile generated by the stand-in\nFROM {s.path}\n",
                "parameters": 'stop "<|im_start|>"\nstop "<|im_end|>"',
                "template": template,
                "details": s.details(),
                "model_info": info,
                "capabilities": ["completion", "tools"]
                + (["thinking"] if canonical(requested) in s.thinking else []),
                "modified_at": datetime.fromtimestamp(s.path.stat().st_mtime)
                .astimezone()
                .isoformat(),
            }
        )

    # -- embed -----------------------------------------------------------------

    def _embed(self, body: dict[str, Any]) -> None:
        """``POST /api/embed``: Ollama's EmbedHandler (see the module docstring)."""
        started = time.perf_counter_ns()
        s = self.server.scheduler
        name = s.resolve(body.get("model"))
        raw = body.get("input")
        if isinstance(raw, str):
            texts = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
            texts = list(raw)
        elif raw is None:
            texts = []
        else:
            raise ApiError(400, "invalid input type")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object")
        dimensions = body.get("dimensions") or 0
        if isinstance(dimensions, bool) or not isinstance(dimensions, int):
            raise ApiError(400, "json: cannot unmarshal dimensions into Go value of type int")
        keep_alive = parse_keep_alive(body.get("keep_alive"), s.default_keep_alive)
        truncate = body.get("truncate") is not False
        inst, load_ns = s.acquire(name, int(options.get("num_ctx") or _DEFAULT_NUM_CTX))
        try:
            if not texts:
                self._json({"model": body["model"], "embeddings": []})
                return
            with inst.generating:
                llm = s.embedder(inst)
                limit = min(inst.num_ctx, int(s.metadata.get("llama.context_length", inst.num_ctx)))
                if not truncate:
                    for text in texts:
                        if len(llm.tokenize(text.encode("utf-8"))) > limit:
                            raise ApiError(400, "the input length exceeds the context length")
                vectors: list[list[float]] = []
                count = 0
                for text in texts:
                    vector, tokens = llm.embed(text, truncate=True, return_count=True)
                    cut = dimensions if dimensions > 0 else None
                    vectors.append(_normalize(_normalize(vector)[:cut]))
                    count += tokens
        finally:
            s.release(inst, keep_alive)
        self._json(
            {
                "model": body["model"],
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": load_ns,
                "prompt_eval_count": count,
            }
        )

    def _client_gone(self) -> bool:
        """Whether the client hung up (its socket reads as end-of-file)."""
        if self.server.stopping.is_set():
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- chat and generate ---------------------------------------------------

    def _generate(self, body: dict[str, Any], *, chat: bool) -> None:
        started = time.perf_counter_ns()
        s = self.server.scheduler
        name = s.resolve(body.get("model"))
        if body.get("think") is True and name not in s.thinking:
            raise ApiError(400, f'"{body["model"]}" does not support thinking')
        tools = body.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ApiError(400, "json: cannot unmarshal tools into Go value of type []api.Tool")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object")
        keep_alive = parse_keep_alive(body.get("keep_alive"), s.default_keep_alive)
        stream = body.get("stream", True) is not False
        messages = body.get("messages") or []
        prompt = body.get("prompt") or ""
        empty = not messages if chat else not prompt
        if empty and keep_alive == 0:
            s.expire(name)
            self._json(self._done(body, chat, "unload"))
            return
        num_ctx = int(options.get("num_ctx") or _DEFAULT_NUM_CTX)
        inst, load_ns = s.acquire(name, num_ctx)
        try:
            if empty:
                self._json(self._done(body, chat, "load"))
                return
            if not chat:
                system = body.get("system")
                messages = [
                    *([{"role": "system", "content": system}] if system else []),
                    {"role": "user", "content": prompt},
                ]
            with inst.generating:
                self._answer(inst, body, chat, messages, options, stream, started, load_ns)
        finally:
            s.release(inst, keep_alive)

    def _done(self, body: dict[str, Any], chat: bool, reason: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": body["model"], "created_at": _now()}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        return {**out, "done": True, "done_reason": reason}

    def _answer(
        self,
        inst: _Instance,
        body: dict[str, Any],
        chat: bool,
        messages: list[dict[str, Any]],
        options: dict[str, Any],
        stream: bool,
        started: int,
        load_ns: int,
    ) -> None:
        llm = inst.llm
        opts = {**_DEFAULTS, **options}
        num_predict = int(opts.get("num_predict", -1))
        raw = not chat and bool(body.get("raw"))
        # Ollama's templates leave a final assistant message open: the model goes on
        # with it (a prefill), and the reply holds only what follows.
        prefill = chat and bool(messages) and messages[-1].get("role") == "assistant"
        tools = [_tool_spec(t) for t in body.get("tools") or []] if chat else []
        grammar = _grammar(tools, body.get("format"), num_predict)
        # Under a grammar the prompt is rendered here (tools and tool turns included)
        # and completed as text, like a prefill.
        rendered_here = prefill or grammar is not None
        stop: list[str] = []
        if raw:
            prompt = body["prompt"]
        elif rendered_here:
            plain = plain_messages(_neutral(messages), tools)
            head = plain[:-1] if prefill else plain
            rendered = inst.formatter(messages=head)
            prompt = rendered.prompt + (str(plain[-1]["content"]) if prefill else "")
            if grammar is None:
                stop = (
                    [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop or [])
                )
        else:
            prompt = inst.formatter(messages=messages).prompt
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        kwargs: dict[str, Any] = {
            "max_tokens": num_predict if num_predict > 0 else None,
            "temperature": float(opts["temperature"]),
            "top_k": int(opts["top_k"]),
            "top_p": float(opts["top_p"]),
            "repeat_penalty": float(opts["repeat_penalty"]),
            "stream": True,
        }
        if "seed" in opts and int(opts["seed"]) >= 0:
            kwargs["seed"] = int(opts["seed"])
        if opts.get("stop") or stop:
            kwargs["stop"] = [*stop, *(opts.get("stop") or [])]
        if grammar is not None:
            kwargs["grammar"] = grammar
        completing = raw or rendered_here
        if completing:
            chunks = llm.create_completion(prompt, **kwargs)
        else:
            chunks = llm.create_chat_completion(messages=messages, **kwargs)
        stats: dict[str, Any] = {}
        # With tools, Ollama holds a reply back while it reads as a call.
        held: list[str] = []

        def pieces() -> Iterator[str]:
            first: int | None = None
            finish = "client gone"
            text: list[str] = []
            prompt_started = time.perf_counter_ns()
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    piece = choice["text"] if completing else choice["delta"].get("content")
                    if piece:
                        if first is None:
                            first = time.perf_counter_ns()
                        text.append(piece)
                        if self._client_gone():
                            raise _ClientGone
                        if tools:
                            held.append(piece)
                        else:
                            yield piece
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
                if finish == "client gone":
                    finish = "stop"
            finally:
                # Stops llama-cpp-python's generator (and the model) at once.
                chunks.close()
                with self.server.lock:
                    self.server.generations.append(
                        Generation(self.path, inst.name, len(text), finish)
                    )
            end = time.perf_counter_ns()
            first = first if first is not None else end
            answer = "".join(text)
            answer_tokens = llm.tokenize(answer.encode(), add_bos=False, special=True)
            stats.update(
                done=True,
                done_reason=finish,
                total_duration=end - started,
                load_duration=load_ns,
                prompt_eval_count=len(prompt_tokens),
                prompt_eval_duration=first - prompt_started,
                eval_count=len(answer_tokens),
                eval_duration=end - first,
            )
            if not chat:
                stats["context"] = [*prompt_tokens, *answer_tokens]

        def message(piece: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"model": body["model"], "created_at": _now()}
            if chat:
                out["message"] = {"role": "assistant", "content": piece}
                if calls:
                    out["message"]["tool_calls"] = calls
            else:
                out["response"] = piece
            return out

        def held_back() -> tuple[str, list[dict[str, Any]]]:
            """The held reply: its calls, or (no call in it) its text."""
            calls = _read_calls("".join(held))
            return ("", calls) if calls else ("".join(held), [])

        produced = pieces()
        try:
            if not stream:
                answer = "".join(produced)
                if tools:
                    answer, calls = held_back()
                    self._json({**message(answer, calls), **stats})
                    return
                self._json({**message(answer), **stats})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in produced:
                self._chunk({**message(piece), "done": False})
            if tools:
                answer, calls = held_back()
                if answer or calls:
                    self._chunk({**message(answer, calls), "done": False})
            self._chunk({**message(""), **stats})
            self.wfile.write(b"0\r\n\r\n")
        except (_ClientGone, OSError):
            # The client hung up (or we are stopping): generation has stopped.
            self.close_connection = True
        finally:
            produced.close()

    def _chunk(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _tool_spec(tool: dict[str, Any]) -> ToolSpec:
    """One of a request's ``tools`` (OpenAI's function form, as Ollama takes it)."""
    function = tool.get("function") or {}
    return ToolSpec(
        name=str(function.get("name") or ""),
        description=str(function.get("description") or ""),
        input_schema=dict(function.get("parameters") or {"type": "object"}),
    )


def _neutral(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """Ollama's messages in the form the embedded backend renders."""
    out: list[ChatMessage] = []
    for m in messages:
        role, content = m.get("role"), str(m.get("content") or "")
        if role == "tool":
            out.append({"role": "tool", "content": content, "name": str(m.get("tool_name") or "")})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [
                {
                    "id": "",
                    "name": (c.get("function") or {}).get("name", ""),
                    "arguments": (c.get("function") or {}).get("arguments") or {},
                }
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif role in ("system", "user", "assistant"):
            out.append({"role": role, "content": content})
        else:
            raise ApiError(400, f"invalid role: {role}")
    return out


def _grammar(tools: list[ToolSpec], format: Any, num_predict: int) -> Any:
    """The grammar a request's tools or ``format`` hold its reply to (None: free text)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    chars = string_chars(num_predict if num_predict > 0 else _UNLIMITED_PREDICT)
    if tools:
        schema = tool_call_schema(tools, chars)
    elif format == "json":
        schema = {"type": "object"}
    elif isinstance(format, dict):
        schema = bounded_schema(format, chars)
    elif format in (None, ""):
        return None
    else:
        raise ApiError(400, f"invalid format: {json.dumps(format)}")
    try:
        grammar = json_grammar(schema)
    except ModelError as exc:
        raise ApiError(400, f"invalid JSON schema in format: {exc.message}") from exc
    return LlamaGrammar.from_string(grammar, verbose=False)


def _read_calls(text: str) -> list[dict[str, Any]]:
    """The call in a reply written under the tools' grammar, as Ollama's tool_calls."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if not isinstance(value, dict) or not isinstance(value.get("arguments"), dict):
        return []
    return [{"function": {"name": value.get("tool"), "arguments": value["arguments"]}}]


class OllamaStandIn:
    """The stand-in server, started in a background thread of this process."""

    def __init__(
        self,
        models: Sequence[str] = ("smollm2:135m",),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_keep_alive: str | float | None = None,
        thinking: Sequence[str] = (),
    ) -> None:
        keep = default_keep_alive
        if keep is None:
            keep = os.environ.get("OLLAMA_KEEP_ALIVE") or "5m"
        scheduler = _Scheduler(models, embedded_model_path(), parse_keep_alive(keep, 300.0))
        scheduler.thinking = {canonical(n) for n in thinking}
        self._server = _Server((host, port), scheduler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every request received so far: (method, path, JSON body)."""
        with self._server.lock:
            return list(self._server.requests)

    @property
    def generations(self) -> list[Generation]:
        """Every chat or generate request's generation that has ended, in order."""
        with self._server.lock:
            return list(self._server.generations)

    def loaded(self) -> list[dict[str, Any]]:
        """What ``/api/ps`` would list now."""
        return self._server.scheduler.ps()

    def start(self) -> OllamaStandIn:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ollama-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections, and free the models (idempotent)."""
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        with self._server.lock:
            connections = list(self._server.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.scheduler.close()

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help="a model name to serve (repeatable; default smollm2:135m)",
    )
    parser.add_argument("--keep-alive", default=None, help="default keep_alive (5m)")
    parser.add_argument(
        "--thinking",
        action="append",
        default=[],
        help="a served model that has the thinking capability (repeatable)",
    )
    args = parser.parse_args(argv)
    server = OllamaStandIn(
        args.models or ["smollm2:135m"],
        host=args.host,
        port=args.port,
        default_keep_alive=args.keep_alive,
        thinking=args.thinking,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        print(f"listening on {server.url}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
