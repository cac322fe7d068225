"""The OpenAI-compatible backend against a real llama_cpp.server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from taled.errors import BackendDown, ModelError
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.openai import OpenAIBackend
from taled.settings import OpenAISettings
from tests.harness import running_daemon
from tests.llama_server import ALIAS, LlamaServer, free_port
from tests.standins.openai_scripted import MODEL, scripted_server

HELLO: list[ChatMessage] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Write hello world in Python"},
]
YES_NO: list[ChatMessage] = [{"role": "user", "content": "Answer yes or no: is 2 > 1?"}]
STORY: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]
ACCENTS: list[ChatMessage] = [
    {"role": "user", "content": "Translate to French: I like café crème and naïve résumés."}
]


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    """One llama_cpp.server for the module's tests that do not kill it."""
    s = LlamaServer().start()
    yield s
    s.stop()


@pytest.fixture
def crashable() -> Iterator[LlamaServer]:
    """A llama_cpp.server of the test's own, to kill and restart."""
    s = LlamaServer().start()
    yield s
    s.stop()


def _backend(base_url: str, model: str = ALIAS, **settings: object) -> OpenAIBackend:
    return OpenAIBackend(base_url, model, OpenAISettings.model_validate(settings))


async def _run(
    backend: OpenAIBackend, messages: list[ChatMessage], max_tokens: int
) -> tuple[list[str], Completion]:
    """The pieces of one greedy call, and its result."""
    out = Completion.empty()
    pieces = [
        p
        async for p in backend.stream(
            messages, max_tokens=max_tokens, temperature=0, cancel=CancelToken(), result=out
        )
    ]
    return pieces, out


def _stream(
    base_url: str, messages: list[ChatMessage], max_tokens: int
) -> tuple[list[str], Completion]:
    async def go() -> tuple[list[str], Completion]:
        backend = _backend(base_url)
        await backend.load()
        try:
            return await _run(backend, messages, max_tokens)
        finally:
            await backend.unload()

    return asyncio.run(go())


def _server_usage(
    server: LlamaServer, messages: list[ChatMessage], max_tokens: int
) -> dict[str, object]:
    """The server's own answer to the same request, not streamed."""
    answer = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": ALIAS, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    ).json()
    assert isinstance(answer, dict)
    return answer


def test_streamed_pieces_add_up_to_a_finished_answer_with_finish_reason_stop(
    server: LlamaServer,
) -> None:
    """A short answer arrives in several pieces that join to result.text, ending with 'stop'."""
    pieces, out = _stream(server.base_url, YES_NO, max_tokens=100)
    assert len(pieces) >= 2
    assert "".join(pieces) == out.text
    assert out.finish_reason == "stop"
    assert out.completion_tokens < 100


def test_max_tokens_cuts_the_answer_with_finish_reason_length(server: LlamaServer) -> None:
    """An answer stopped by max_tokens says 'length' and has exactly that many tokens."""
    pieces, out = _stream(server.base_url, STORY, max_tokens=12)
    assert len(pieces) >= 5
    assert "".join(pieces) == out.text
    assert out.finish_reason == "length"
    assert out.completion_tokens == 12


@pytest.mark.parametrize("messages", [HELLO, YES_NO, ACCENTS], ids=["hello", "yes-no", "accents"])
def test_counts_equal_the_servers_own_non_streamed_usage(
    server: LlamaServer, messages: list[ChatMessage]
) -> None:
    """Prompt and answer tokens of a stream equal the server's usage for the same request."""
    # llama_cpp.server streams no usage; the backend counts with the server itself.
    # The server's greedy answer can differ between a cold prompt and one already in
    # its KV cache, so the prompt is put in the cache first: stream and reference
    # then start from the same state and give the same answer.
    _server_usage(server, messages, max_tokens=60)
    _pieces, out = _stream(server.base_url, messages, max_tokens=60)
    reference = _server_usage(server, messages, max_tokens=60)
    usage = reference["usage"]
    assert isinstance(usage, dict)
    assert out.text == reference["choices"][0]["message"]["content"]  # type: ignore[index]
    assert out.prompt_tokens == usage["prompt_tokens"]
    assert out.completion_tokens == usage["completion_tokens"]
    assert out.counts_exact


def test_cancel_mid_stream_stops_at_once_with_finish_reason_cancelled(
    server: LlamaServer,
) -> None:
    """A cancel stops the stream within a piece, and the server stops generating too."""
    token = CancelToken()

    async def go() -> tuple[int, float, Completion]:
        backend = _backend(server.base_url)
        await backend.load()
        out = Completion.empty()
        pieces = 0
        cancelled_at = 0.0
        async for _ in backend.stream(
            STORY, max_tokens=1000, temperature=0, cancel=token, result=out
        ):
            pieces += 1
            if pieces == 3:
                token.cancel()
                cancelled_at = time.perf_counter()
        # The counts are taken from the server after the cancel; it serves one request
        # at a time, so they come back quickly only if it stopped the cancelled answer.
        elapsed = time.perf_counter() - cancelled_at
        await backend.unload()
        return pieces, elapsed, out

    pieces, elapsed, out = asyncio.run(go())
    assert out.finish_reason == "cancelled"
    assert pieces == 3
    assert elapsed < 3, f"{elapsed:.1f} s from cancel to the end of the stream"
    assert out.completion_tokens < 10


def test_a_cancelled_call_is_counted_exactly_once_the_server_is_known_to_send_no_usage(
    server: LlamaServer,
) -> None:
    """A cancel before any finished stream gives estimates; after one, the server's own counts."""

    async def cancelled(backend: OpenAIBackend) -> Completion:
        token = CancelToken()
        out = Completion.empty()
        async for _ in backend.stream(
            STORY, max_tokens=500, temperature=0, cancel=token, result=out
        ):
            token.cancel()
        return out

    async def go() -> tuple[Completion, Completion]:
        backend = _backend(server.base_url)
        await backend.load()
        # Whether this server sends usage is unknown yet, and a replay could bill
        # the prompt twice on one that does: the prompt is estimated.
        before = await cancelled(backend)
        await _run(backend, YES_NO, max_tokens=8)
        after = await cancelled(backend)
        await backend.unload()
        return before, after

    before, after = asyncio.run(go())
    usage = _server_usage(server, STORY, max_tokens=1)["usage"]
    assert isinstance(usage, dict)
    assert before.finish_reason == after.finish_reason == "cancelled"
    assert not before.counts_exact
    assert after.counts_exact
    assert after.prompt_tokens == usage["prompt_tokens"]
    assert after.completion_tokens == 1


def test_an_unknown_model_id_is_a_model_error_listing_the_servers_models(
    server: LlamaServer,
) -> None:
    """Loading a model the server does not list fails with the ids it does list."""
    with pytest.raises(ModelError, match=r"no-such-model.*it serves: smollm2") as caught:
        asyncio.run(_backend(server.base_url, "no-such-model").load())
    assert not isinstance(caught.value, BackendDown)


def test_a_prompt_over_the_context_is_a_model_error_with_the_servers_text(
    server: LlamaServer,
) -> None:
    """A prompt longer than the server's context fails with its explanation, not as a crash."""
    huge: list[ChatMessage] = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(ModelError, match="maximum context length is 2048") as caught:
        _stream(server.base_url, huge, max_tokens=8)
    assert not isinstance(caught.value, BackendDown)


def test_a_server_that_is_not_running_is_backend_down_on_load() -> None:
    """Loading against a port nobody listens on raises BackendDown naming the URL."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendDown, match=f"cannot reach {url}/models"):
        asyncio.run(_backend(url).load())


Respond = Callable[[BaseHTTPRequestHandler], tuple[int, str, bytes]]


@contextmanager
def _stand_in(respond: Respond) -> Iterator[tuple[str, list[str]]]:
    """A stand-in HTTP server on loopback: its base URL and the requests it got."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            asked.append(f"{self.command} {self.path}")
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, content_type, body = respond(self)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", asked
    finally:
        httpd.shutdown()
        httpd.server_close()


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def test_usage_sent_on_the_stream_is_taken_as_is() -> None:
    """A server that streams usage (vLLM, OpenAI) is believed, and asked nothing more."""
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 17, "completion_tokens": 2}},
    ]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def respond(request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        if request.command == "GET":
            return 200, "application/json", _json({"data": [{"id": "big-model"}]})
        return 200, "text/event-stream", sse.encode()

    async def go(url: str) -> tuple[list[str], Completion]:
        backend = _backend(url, "big-model")
        await backend.load()
        try:
            return await _run(backend, YES_NO, max_tokens=50)
        finally:
            await backend.unload()

    with _stand_in(respond) as (url, asked):
        pieces, out = asyncio.run(go(url))
    assert pieces == ["Hel", "lo"]
    assert (out.text, out.finish_reason) == ("Hello", "stop")
    assert (out.prompt_tokens, out.completion_tokens, out.counts_exact) == (17, 2, True)
    assert asked == ["GET /v1/models", "POST /v1/chat/completions"]


def _models_or(content_type: str, body: bytes) -> Respond:
    """A stand-in's answers: the model list to GET, ``body`` to the chat POST."""

    def respond(request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        if request.command == "GET":
            return 200, "application/json", _json({"data": [{"id": "big-model"}]})
        return 200, content_type, body

    return respond


def _call(url: str) -> tuple[list[str], Completion]:
    async def go() -> tuple[list[str], Completion]:
        backend = _backend(url, "big-model")
        await backend.load()
        try:
            return await _run(backend, YES_NO, max_tokens=50)
        finally:
            await backend.unload()

    return asyncio.run(go())


def test_event_streams_with_crlf_comments_and_multiline_data_are_parsed() -> None:
    """CRLF line ends, keep-alive comments, event/id fields and data split over lines all parse."""
    first = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}, indent=1)
    last = {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    multiline = "".join(f"data: {line}\r\n" for line in first.splitlines())
    sse = (
        ": keep-alive\r\n\r\n"
        + f"event: message\r\nid: 1\r\n{multiline}\r\n"
        + "event: ping\r\n\r\n"
        + f"data:{json.dumps(last)}\r\n\r\n"
        + f"data: {json.dumps(usage)}\r\n\r\ndata: [DONE]\r\n\r\n"
    )
    with _stand_in(_models_or("text/event-stream; charset=utf-8", sse.encode())) as (url, _):
        pieces, out = _call(url)
    assert pieces == ["Hel", "lo"]
    assert (out.text, out.finish_reason, out.prompt_tokens) == ("Hello", "stop", 5)


def test_a_200_that_is_not_an_event_stream_is_a_model_error_naming_its_type() -> None:
    """A base_url that answers the chat call with a web page is misconfigured, not down."""
    page = b"<html>not an API</html>"
    with (
        _stand_in(_models_or("text/html", page)) as (url, _),
        pytest.raises(ModelError, match=r"'text/html', not an event stream"),
    ):
        _call(url)


def test_a_5xx_answer_is_backend_down_with_the_servers_text() -> None:
    """A server answering 503 is down, and the error carries what it said."""

    def respond(_request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        return 503, "application/json", _json({"error": {"message": "the GPU is on fire"}})

    with _stand_in(respond) as (url, _asked), pytest.raises(BackendDown, match="GPU is on fire"):
        asyncio.run(_backend(url).load())


def test_a_server_that_never_answers_is_backend_down_after_the_read_timeout() -> None:
    """A server that accepts the connection but never answers is down after the read timeout."""
    with socket.socket() as silent:
        # Listening without ever accepting: the kernel completes the handshake, nobody answers.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.perf_counter()
        with pytest.raises(BackendDown, match="ReadTimeout"):
            asyncio.run(_backend(url, read_timeout_seconds=0.3).load())
        assert time.perf_counter() - started < 3


def test_a_probe_during_a_stream_passes_at_once_and_leaves_the_stream_alone(
    server: LlamaServer,
) -> None:
    """A probe while a stream runs passes at once instead of queueing behind the generation."""

    async def go() -> tuple[float, Completion]:
        backend = _backend(server.base_url)
        await backend.load()
        out = Completion.empty()
        probe_s = 0.0
        pieces = 0
        async for _ in backend.stream(
            STORY, max_tokens=30, temperature=0, cancel=CancelToken(), result=out
        ):
            pieces += 1
            if pieces == 2:
                started = time.perf_counter()
                await asyncio.wait_for(backend.probe(), 5)
                probe_s = time.perf_counter() - started
        await backend.unload()
        return probe_s, out

    probe_s, out = asyncio.run(go())
    assert probe_s < 0.1
    assert out.finish_reason == "length"
    assert out.completion_tokens == 30


def test_an_answer_interrupted_by_another_request_is_a_model_error_naming_the_flag() -> None:
    """An answer the server cuts short for another request fails naming the flag against it."""
    interrupting = LlamaServer(interrupt_requests=True).start()

    async def go() -> None:
        backend = _backend(interrupting.base_url)
        await backend.load()
        pieces = 0
        async with httpx.AsyncClient(timeout=30) as other:
            try:
                async for _ in backend.stream(
                    STORY,
                    max_tokens=500,
                    temperature=0,
                    cancel=CancelToken(),
                    result=Completion.empty(),
                ):
                    pieces += 1
                    if pieces == 3:
                        asyncio.get_running_loop().create_task(
                            other.get(f"{interrupting.base_url}/models")
                        )
            finally:
                await backend.unload()

    try:
        with pytest.raises(ModelError, match="--interrupt_requests False") as caught:
            asyncio.run(go())
        assert not isinstance(caught.value, BackendDown)
    finally:
        interrupting.stop()


def test_a_server_killed_mid_stream_raises_backend_down_from_the_stream(
    crashable: LlamaServer,
) -> None:
    """SIGKILLing the server while it streams ends the stream with BackendDown."""

    async def go() -> int:
        backend = _backend(crashable.base_url)
        await backend.load()
        pieces = 0
        try:
            async for _ in backend.stream(
                STORY,
                max_tokens=1000,
                temperature=0,
                cancel=CancelToken(),
                result=Completion.empty(),
            ):
                pieces += 1
                if pieces == 3:
                    crashable.kill()
        finally:
            await backend.unload()
        return pieces

    with pytest.raises(BackendDown, match=rf"'smollm2' at {crashable.base_url}"):
        asyncio.run(go())


def test_probe_fails_while_the_server_is_down_and_passes_when_it_is_back(
    crashable: LlamaServer,
) -> None:
    """After a crash the probe raises BackendDown; restarted on the same port, it passes."""

    async def go() -> None:
        backend = _backend(crashable.base_url)
        await backend.load()
        await backend.probe()
        crashable.kill()
        with pytest.raises(BackendDown, match=f"cannot reach {crashable.base_url}/models"):
            await backend.probe()
        crashable.start()
        await backend.probe()
        _pieces, out = await _run(backend, YES_NO, max_tokens=8)
        assert out.text
        await backend.unload()

    asyncio.run(go())


def test_the_bearer_token_comes_from_the_env_var_named_in_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server with an API key refuses us without the variable and serves us with it."""
    secured = LlamaServer(api_key="sesame").start()
    try:
        settings = {"api_key_env": "TALE_TEST_OPENAI_KEY"}
        monkeypatch.delenv("TALE_TEST_OPENAI_KEY", raising=False)
        with pytest.raises(ModelError, match="answered 401"):
            asyncio.run(_backend(secured.base_url, **settings).load())
        monkeypatch.setenv("TALE_TEST_OPENAI_KEY", "sesame")

        async def load_and_unload() -> bool:
            backend = _backend(secured.base_url, **settings)
            await backend.load()
            loaded = backend.loaded
            await backend.unload()
            return loaded

        assert asyncio.run(load_and_unload())
    finally:
        secured.stop()


def test_memory_is_unknown_and_local_only_on_loopback() -> None:
    """The backend cannot size a remote model; it is local when the host is loopback."""
    for url, local in [
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://gpu-box:8000/v1", False),
        ("https://api.openai.com/v1", False),
    ]:
        backend = _backend(url)
        assert backend.memory().bytes is None
        assert backend.memory().local is local, url
        assert backend.threads() is None


def test_a_task_completes_end_to_end_on_an_openai_task_model(server: LlamaServer) -> None:
    """The real daemon runs a task on the server and its ledger shows the openai backend."""
    with running_daemon({"TALE_MODELS__TASK": f"openai:{server.base_url}#{ALIAS}"}) as d:
        task_id = d.call("submit_task", text="Answer yes or no: is 2 > 1?")["id"]
        task = d.wait_for(task_id)
        assert task["state"] == "completed", d.log_text()
        usage = d.home.tale("usage", "--json")
        assert usage.returncode == 0, usage.stderr
        [row] = [m for m in json.loads(usage.stdout)["by_model"] if m["backend"] == "openai"]
        assert row["model"] == f"{server.base_url}#{ALIAS}"
        assert row["calls"] >= 1
        assert row["prompt_tokens"] > 0
        assert row["completion_tokens"] > 0


def _cancelled_after(url: str, seconds: float) -> tuple[float, list[str], Completion]:
    """Stream from ``url`` with a 60 s read timeout, cancel after ``seconds``; time the end."""

    async def go() -> tuple[float, list[str], Completion]:
        backend = _backend(url, MODEL, read_timeout_seconds=60)
        await backend.load()
        token = CancelToken()
        asyncio.get_running_loop().call_later(seconds, token.cancel)
        out = Completion.empty()
        pieces: list[str] = []
        try:
            async for piece in backend.stream(
                [{"role": "user", "content": "[[script:story]] Tell me a story"}],
                max_tokens=100,
                temperature=0,
                cancel=token,
                result=out,
            ):
                pieces.append(piece)
            return time.perf_counter(), pieces, out
        finally:
            await backend.unload()

    started = time.perf_counter()
    ended, pieces, out = asyncio.run(go())
    return ended - started - seconds, pieces, out


def test_a_cancel_interrupts_a_server_that_never_answers_the_request() -> None:
    """A cancel ends a call whose server took the request and sent nothing, long before the
    read timeout."""
    with scripted_server({}, silent=True) as server:
        late, pieces, out = _cancelled_after(server.base_url, 0.5)
    assert late < 1.5, f"the call ended {late:.1f} s after its cancel"
    assert pieces == []
    assert out.finish_reason == "cancelled"
    assert not out.counts_exact


def test_a_cancel_interrupts_a_stream_that_fell_silent() -> None:
    """A cancel ends a stream whose server stopped sending mid-answer, keeping what came."""
    with scripted_server({"story": "once upon a time"}, stall_after=2) as server:
        late, pieces, out = _cancelled_after(server.base_url, 0.5)
    assert late < 1.5, f"the call ended {late:.1f} s after its cancel"
    assert pieces == ["once ", "upon "]
    assert (out.text, out.finish_reason) == ("once upon ", "cancelled")


def test_sigterm_stops_the_daemon_within_its_grace_while_a_remote_model_is_silent() -> None:
    """SIGTERM stops a daemon whose task model went silent mid-answer within the grace
    period (not the 60 s read timeout), and the task is queued again for the next start."""
    with scripted_server({"story": "a story that never ends " * 20}, stall_after=3) as server:
        env = {
            "TALE_MODELS__TASK": server.spec,
            "TALE_MODELS__OPENAI__READ_TIMEOUT_SECONDS": "60",
            "TALE_DAEMON__SHUTDOWN_GRACE_SECONDS": "1",
        }
        with running_daemon(env) as d:
            task_id = d.call("submit_task", text="[[script:story]] Tell me a story")["id"]
            deadline = time.monotonic() + 60
            while server.chats() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the three pieces are in; the server is silent now
            started = time.perf_counter()
            assert d.stop(timeout=30) == 0, d.log_text()
            took = time.perf_counter() - started
            assert took < 8, f"stop took {took:.1f} s:\n{d.log_text()}"
            d.start()
            task = d.call("get_task", id=task_id)
    assert task["state"] in ("queued", "running"), task
    assert any("daemon stopped mid-task" in t["reason"] for t in task["transitions"]), task
