"""The Ollama backend, against a stand-in of Ollama's API that runs the real SmolLM2.

The stand-in (``tests/standins/ollama_server.py``) is a real HTTP server speaking
Ollama's native API; the backend talks to it through the official ``ollama``
client exactly as it would to Ollama. The last test runs against a real Ollama
when ``OLLAMA_HOST`` points at one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from taled.errors import BackendDown, ModelError
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.ollama import OllamaBackend
from taled.settings import OllamaSettings
from tests.harness import running_daemon
from tests.standins.ollama_server import OllamaStandIn

MODEL = "smollm2:135m"
NUM_CTX = 1024
HELLO: list[ChatMessage] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Say hello."},
]
STORY: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def standin() -> Iterator[OllamaStandIn]:
    """The Ollama stand-in on a free loopback port, serving smollm2:135m."""
    with OllamaStandIn([MODEL]) as server:
        yield server


def _settings(host: str, **overrides: Any) -> OllamaSettings:
    return OllamaSettings(host=host, num_ctx=NUM_CTX, **overrides)


def _backend(host: str, *, pinned: bool = True, **overrides: Any) -> OllamaBackend:
    return OllamaBackend(MODEL, _settings(host, **overrides), pinned=pinned)


async def _run(
    backend: OllamaBackend,
    messages: list[ChatMessage],
    *,
    max_tokens: int = 12,
    cancel: CancelToken | None = None,
    cancel_after: int | None = None,
) -> tuple[list[str], Completion]:
    """Stream a call to the end; cancel after ``cancel_after`` pieces if asked."""
    token = cancel or CancelToken()
    out = Completion.empty()
    pieces: list[str] = []
    async for piece in backend.stream(
        messages, max_tokens=max_tokens, temperature=0, cancel=token, result=out
    ):
        pieces.append(piece)
        if cancel_after is not None and len(pieces) == cancel_after:
            token.cancel()
    return pieces, out


def _ps_entry(host: str, model: str = MODEL) -> ollama.ProcessResponse.Model | None:
    """The model's /api/ps entry, asked as any other Ollama client would."""
    for entry in ollama.Client(host=host).ps().models:
        if entry.model == model:
            return entry
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bodies(server: OllamaStandIn, path: str) -> list[dict[str, Any]]:
    return [body for _, p, body in server.requests if p == path]


def test_streamed_pieces_add_up_to_the_text(standin: OllamaStandIn) -> None:
    """The pieces a stream yields join to exactly the result's text."""

    async def scenario() -> tuple[list[str], Completion]:
        backend = _backend(standin.url)
        await backend.load()
        return await _run(backend, HELLO)

    pieces, out = asyncio.run(scenario())
    assert len(pieces) > 1
    assert "".join(pieces) == out.text
    assert out.text.strip()


def test_counts_are_ollamas_own(standin: OllamaStandIn) -> None:
    """Token counts are Ollama's prompt_eval_count and eval_count for the same chat."""

    async def scenario() -> Completion:
        backend = _backend(standin.url)
        await backend.load()
        return (await _run(backend, HELLO))[1]

    out = asyncio.run(scenario())
    reference = ollama.Client(host=standin.url).chat(
        MODEL,
        messages=HELLO,
        options={"num_ctx": NUM_CTX, "num_predict": 12, "temperature": 0},
        keep_alive=-1,
    )
    assert out.counts_exact
    assert out.prompt_tokens == reference.prompt_eval_count > 0
    assert out.completion_tokens == reference.eval_count > 0
    assert out.text == reference.message.content
    assert out.prompt_ms > 0 and out.generation_ms > 0


def test_max_tokens_cuts_the_answer_and_says_so(standin: OllamaStandIn) -> None:
    """An answer stopped by max_tokens (num_predict) reports finish_reason 'length'."""

    async def scenario() -> Completion:
        backend = _backend(standin.url)
        await backend.load()
        return (await _run(backend, STORY, max_tokens=5))[1]

    out = asyncio.run(scenario())
    assert out.finish_reason == "length"
    assert out.completion_tokens == 5


def test_pinned_load_asks_ollama_to_keep_the_model_forever(standin: OllamaStandIn) -> None:
    """Loading a pinned model sends keep_alive=-1 with num_ctx; /api/ps then shows it forever."""
    asyncio.run(_backend(standin.url).load())
    (load,) = [b for b in _bodies(standin, "/api/generate") if not b.get("prompt")]
    assert load["keep_alive"] == -1
    assert load["options"]["num_ctx"] == NUM_CTX
    entry = _ps_entry(standin.url)
    assert entry is not None and entry.expires_at is not None
    # Ollama shows "forever" as its largest duration from now: about 292 years ahead.
    assert entry.expires_at > datetime.now().astimezone() + timedelta(days=365 * 100)
    assert entry.context_length == NUM_CTX


def test_every_request_repeats_num_ctx_and_keep_alive(standin: OllamaStandIn) -> None:
    """Calls and the unload carry the same num_ctx, and calls the pin, so Ollama never reloads."""

    async def scenario() -> None:
        backend = _backend(standin.url)
        await backend.load()
        await _run(backend, HELLO, max_tokens=3)
        await _run(backend, HELLO, max_tokens=3)
        await backend.unload()

    asyncio.run(scenario())
    chats = _bodies(standin, "/api/chat")
    generates = _bodies(standin, "/api/generate")
    assert len(chats) == 2 and len(generates) == 2
    assert all(b["options"]["num_ctx"] == NUM_CTX for b in [*chats, *generates])
    assert all(b["keep_alive"] == -1 for b in chats)


def test_optional_model_gets_the_optional_keep_alive(standin: OllamaStandIn) -> None:
    """An unpinned model is loaded with models.ollama.optional_keep_alive, and expires by it."""
    backend = _backend(standin.url, pinned=False, optional_keep_alive="2m")
    asyncio.run(backend.load())
    (load,) = _bodies(standin, "/api/generate")
    assert load["keep_alive"] == "2m"
    entry = _ps_entry(standin.url)
    assert entry is not None and entry.expires_at is not None
    left = entry.expires_at - datetime.now().astimezone()
    assert timedelta(seconds=90) < left <= timedelta(minutes=2)


def test_model_num_ctx_overrides_num_ctx_for_that_model(standin: OllamaStandIn) -> None:
    """models.ollama.model_num_ctx sets one model's context window, sent with the load."""
    backend = _backend(standin.url, model_num_ctx={MODEL: 512})
    asyncio.run(backend.load())
    entry = _ps_entry(standin.url)
    assert entry is not None and entry.context_length == 512


def test_memory_is_what_ollama_ps_reports(standin: OllamaStandIn) -> None:
    """memory() is /api/ps's size and size_vram, local for a loopback host."""
    backend = _backend(standin.url)
    assert backend.memory().bytes is None
    asyncio.run(backend.load())
    entry = _ps_entry(standin.url)
    assert entry is not None
    memory = backend.memory()
    assert memory.bytes == entry.size > 0
    assert memory.vram_bytes == entry.size_vram == 0
    assert memory.local
    assert backend.threads() is None


def test_remote_host_memory_is_not_local() -> None:
    """A model on another machine's Ollama does not count as this machine's memory."""
    assert not _backend("http://gpu-box.example:11434").memory().local
    assert _backend("localhost:11434").memory().local


def test_cancel_stops_the_stream_and_ollama_stops_generating(standin: OllamaStandIn) -> None:
    """A cancel ends the stream at the next piece, and the server stops generating too."""

    async def scenario() -> tuple[list[str], Completion, float]:
        backend = _backend(standin.url)
        await backend.load()
        started = time.monotonic()
        pieces, out = await _run(backend, STORY, max_tokens=400, cancel_after=3)
        return pieces, out, time.monotonic() - started

    pieces, out, seconds = asyncio.run(scenario())
    assert out.finish_reason == "cancelled"
    assert len(pieces) == 3
    assert out.text == "".join(pieces)
    assert not out.counts_exact and out.completion_tokens == 3
    assert seconds < 5
    deadline = time.monotonic() + 10
    while not standin.generations and time.monotonic() < deadline:
        time.sleep(0.02)
    (generation,) = standin.generations
    assert generation.outcome == "client gone"
    assert generation.pieces < 100


def test_unknown_model_is_a_model_error_naming_ollama_pull(standin: OllamaStandIn) -> None:
    """Loading a model Ollama does not have says to `ollama pull` it."""
    backend = OllamaBackend("qwen2.5:14b", _settings(standin.url), pinned=True)
    with pytest.raises(ModelError, match=r"ollama pull qwen2\.5:14b") as caught:
        asyncio.run(backend.load())
    assert not isinstance(caught.value, BackendDown)
    assert not backend.loaded


def test_load_without_a_server_is_backend_down() -> None:
    """Loading when nothing listens at the host is BackendDown naming the host."""
    host = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(BackendDown, match=host):
        asyncio.run(_backend(host).load())


def test_probe_after_the_server_stopped_is_backend_down(standin: OllamaStandIn) -> None:
    """A probe when Ollama has gone away is BackendDown naming the host."""

    async def scenario() -> None:
        backend = _backend(standin.url)
        await backend.load()
        await backend.probe()
        standin.stop()
        await backend.probe()

    with pytest.raises(BackendDown, match=standin.url):
        asyncio.run(scenario())


def test_server_dying_mid_stream_is_backend_down() -> None:
    """Killing Ollama (the stand-in as its own process) mid-stream raises BackendDown."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.standins.ollama_server", "--port", "0", "--model", MODEL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = line.split()[-1]

        async def scenario() -> None:
            backend = _backend(url)
            await backend.load()
            out = Completion.empty()
            async for _ in backend.stream(
                STORY, max_tokens=400, temperature=0, cancel=CancelToken(), result=out
            ):
                if proc.poll() is None:
                    proc.kill()

        with pytest.raises(BackendDown, match=f"{url}.*{MODEL}"):
            asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait(10)


def test_model_unloaded_behind_our_back_fails_probe_and_reloads(standin: OllamaStandIn) -> None:
    """Another client unloading the pinned model fails the probe; the next call reports a load."""

    async def scenario() -> tuple[str, Completion]:
        backend = _backend(standin.url)
        await backend.load()
        await _run(backend, HELLO, max_tokens=2)
        # What `ollama stop` does: keep_alive=0 with no prompt, then wait for /api/ps.
        await ollama.AsyncClient(host=standin.url).generate(MODEL, keep_alive=0)
        deadline = time.monotonic() + 10
        while _ps_entry(standin.url) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with pytest.raises(BackendDown) as caught:
            await backend.probe()
        _, out = await _run(backend, HELLO, max_tokens=2)
        await backend.probe()
        return caught.value.message, out

    message, out = asyncio.run(scenario())
    assert "unloaded behind tale's back" in message
    assert out.load_ms > 0
    entry = _ps_entry(standin.url)
    assert entry is not None and entry.expires_at is not None
    assert entry.expires_at > datetime.now().astimezone() + timedelta(days=365 * 100)


def test_daemon_runs_a_task_on_ollama_and_ledgers_it(standin: OllamaStandIn) -> None:
    """A daemon whose task role is on Ollama completes a task, and the ledger says ollama."""
    env = {"TALE_MODELS__TASK": f"ollama:{MODEL}", "TALE_MODELS__OLLAMA__HOST": standin.url}
    with running_daemon(env) as d:
        task = d.call("submit_task", text="Write a haiku about rain.")
        done = d.wait_for(task["id"])
        assert done["state"] == "completed", done
        usage = json.loads(d.home.tale("usage", "--json").stdout)
    rows = [r for r in usage["by_model"] if r["backend"] == "ollama"]
    assert rows and rows[0]["model"] == MODEL and rows[0]["calls"] >= 1
    assert any(b.get("messages") for b in _bodies(standin, "/api/chat"))


# -- a real Ollama, when there is one ------------------------------------------------


@pytest.fixture
def real_ollama() -> str:
    """OLLAMA_HOST of a reachable Ollama; skips the test otherwise."""
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        pytest.skip("OLLAMA_HOST is not set")
    url = host if "://" in host else f"http://{host}"
    try:
        httpx.get(f"{url}/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.skip(f"no Ollama at {host}: {exc}")
    return host


def test_real_ollama_answers_and_keeps_the_model_pinned(real_ollama: str) -> None:
    """Against a real Ollama: a short chat streams with counts, and /api/ps shows it forever."""
    model = os.environ.get("TALE_TEST_OLLAMA_MODEL", "qwen2.5:0.5b")
    backend = OllamaBackend(model, OllamaSettings(host=real_ollama, num_ctx=2048), pinned=True)

    async def scenario() -> tuple[Completion, ollama.ProcessResponse.Model | None]:
        await backend.load()
        try:
            _, out = await _run(backend, HELLO, max_tokens=8)
            await backend.probe()
            return out, _ps_entry(real_ollama, model if ":" in model else f"{model}:latest")
        finally:
            await backend.unload()

    try:
        out, entry = asyncio.run(scenario())
    except ModelError as exc:
        if "ollama pull" in exc.message:
            pytest.skip(exc.message)
        raise
    assert out.text and out.prompt_tokens > 0 and out.completion_tokens > 0
    assert entry is not None and entry.expires_at is not None
    assert entry.expires_at > datetime.now().astimezone() + timedelta(days=365 * 100)


def test_a_final_assistant_message_is_continued_not_answered(standin: OllamaStandIn) -> None:
    """As Ollama does, a cut-off answer sent back as the last message is carried on."""

    async def scenario() -> tuple[str, str, str]:
        backend = _backend(standin.url)
        await backend.load()
        whole = (await _run(backend, STORY, max_tokens=24))[1].text
        partial = (await _run(backend, STORY, max_tokens=8))[1].text
        prefill: list[ChatMessage] = [*STORY, {"role": "assistant", "content": partial}]
        rest = (await _run(backend, prefill, max_tokens=16))[1].text
        return whole, partial, rest

    whole, partial, rest = asyncio.run(scenario())
    assert OllamaBackend.continues_final_message
    assert whole.startswith(partial) and rest
    # It goes on with the next words of the uncut answer instead of starting over.
    # (Ollama's repeat penalty sees the prompt re-tokenized, so later words may drift.)
    assert rest.split()[:2] == whole[len(partial) :].split()[:2]
