"""The model pool: optional models, eviction, health, reload, fallback and routing.

Daemon-level tests run a real taled; the in-process ones build a real ModelPool
on a real store with the real embedded model, and inject faults into
llama-cpp-python (the external library), never into tale's own code.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from taled.db.store import Store, TaskRecord
from taled.errors import Unavailable
from taled.models.backends.base import ChatMessage
from taled.models.backends.llamacpp import embedded_model_path
from taled.models.pool import ModelCall, ModelPool, ModelStatus
from taled.models.routing import Route, Router
from taled.settings import LlamaCppSettings, ModelsSettings, PoolSettings, Role, StoreSettings
from tests.harness import Daemon, running_daemon

HELLO: list[ChatMessage] = [{"role": "user", "content": "Say hello."}]

GGUF = str(embedded_model_path())
# Two more names for the embedded GGUF: distinct optional models for the pool.
NAMED = json.dumps({"tiny-a": GGUF, "tiny-b": GGUF})


def _models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {m["spec"] if not m["pinned"] else m["role"]: m for m in _model_rows(daemon)}


def _model_rows(daemon: Daemon) -> list[dict[str, Any]]:
    proc = daemon.home.tale("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)["models"]
    return rows


def _ledger(daemon: Daemon, task_id: str) -> list[sqlite3.Row]:
    daemon.home.tale("usage", "--json")  # waits for ledger rows still in flight
    with sqlite3.connect(f"file:{daemon.home.data / 'tale.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return db.execute(
            "SELECT * FROM model_calls WHERE task_id = ? ORDER BY seq", (task_id,)
        ).fetchall()


# -- per-task model override and optional models ---------------------------------


@pytest.fixture(scope="module")
def pressured() -> Iterator[Daemon]:
    """A daemon whose memory floor is always breached: optional models are evicted."""
    env = {
        "TALE_MODELS__LLAMACPP__MODELS": NAMED,
        "TALE_MODELS__POOL__MEMORY_FLOOR_MB": str(1 << 30),
        "TALE_MODELS__POOL__HEALTH_INTERVAL_SECONDS": "3600",
    }
    with running_daemon(env) as d:
        yield d


def test_a_task_with_a_model_override_runs_on_that_model(pressured: Daemon) -> None:
    """`tale submit --model` runs the task on that model, loaded on demand; ledger says so."""
    proc = pressured.home.tale("submit", "--model", "llamacpp:tiny-a", "--json", "Say yes")
    assert proc.returncode == 0, proc.stderr
    task = pressured.wait_for(json.loads(proc.stdout)["id"])
    assert task["state"] == "completed"
    assert task["model"] == "llamacpp:tiny-a"
    [call] = _ledger(pressured, task["id"])
    assert (call["model"], call["route"], call["success"]) == ("tiny-a", "override", 1)


def test_loading_an_optional_model_under_memory_pressure_evicts_the_lru_one(
    pressured: Daemon,
) -> None:
    """With available memory below the floor, loading tiny-b unloads idle tiny-a; pinned stay."""
    for name in ("tiny-a", "tiny-b"):
        task_id = pressured.call("submit_task", text="Say yes", model=f"llamacpp:{name}")["id"]
        assert pressured.wait_for(task_id)["state"] == "completed"
    models = _models(pressured)
    assert models["llamacpp:tiny-a"]["health"] == "unloaded"
    assert models["llamacpp:tiny-a"]["evictions"] >= 1
    assert models["llamacpp:tiny-b"]["health"] == "ok"
    for role in ("ux", "task"):
        assert models[role]["pinned"] and models[role]["health"] == "ok"
        assert models[role]["evictions"] == 0


def test_without_memory_pressure_optional_models_stay_loaded() -> None:
    """With a floor of 0 nothing is evicted: both optional models stay loaded."""
    env = {"TALE_MODELS__LLAMACPP__MODELS": NAMED, "TALE_MODELS__POOL__MEMORY_FLOOR_MB": "0"}
    with running_daemon(env) as d:
        for name in ("tiny-a", "tiny-b"):
            task_id = d.call("submit_task", text="Say yes", model=f"llamacpp:{name}")["id"]
            assert d.wait_for(task_id)["state"] == "completed"
        models = _models(d)
    assert models["llamacpp:tiny-a"]["health"] == "ok"
    assert models["llamacpp:tiny-b"]["health"] == "ok"


def test_a_malformed_model_override_is_refused_and_nothing_is_queued(pressured: Daemon) -> None:
    """`--model nonsense` exits 2 with the accepted forms; no task is created."""
    before = len(pressured.call("list_tasks")["tasks"])
    proc = pressured.home.tale("submit", "--model", "gpt:4", "Say yes")
    assert proc.returncode == 2
    assert "unknown backend 'gpt'" in proc.stderr
    assert "llamacpp, ollama, openai" in proc.stderr
    assert len(pressured.call("list_tasks")["tasks"]) == before


def test_an_override_naming_a_missing_model_fails_the_task_with_why(pressured: Daemon) -> None:
    """A well-formed override whose model cannot load fails the task, naming the fix."""
    task_id = pressured.call("submit_task", text="Say yes", model="llamacpp:no-such")["id"]
    task = pressured.wait_for(task_id)
    assert task["state"] == "failed"
    assert "[models.llamacpp.models]" in task["error"]


# -- health, reload and fallback (in process, faults injected into llama.cpp) ----


@asynccontextmanager
async def _pool(tmp_path: Path, **pool: Any) -> AsyncIterator[tuple[ModelPool, Store]]:
    settings = ModelsSettings(
        fallback=pool.pop("fallback", ""),
        pool=PoolSettings(**pool),
        llamacpp=LlamaCppSettings(seed=1),
    )
    store = Store(tmp_path / "t.db", StoreSettings(), 64)
    await store.open()
    p = ModelPool(settings, store)
    await p.start()
    try:
        yield p, store
    finally:
        await p.stop()
        await store.close()


def _hello(role: Role = "task") -> ModelCall:
    """A short call that asks ``role``'s model to say hello."""
    return ModelCall(role, HELLO, max_tokens=8, temperature=0, timeout=60)


def _status(pool: ModelPool, role: str) -> ModelStatus:
    return next(s for s in pool.status() if s.role == role)


def _llama(pool: ModelPool, role: str) -> Any:
    """The llama_cpp.Llama object behind a role (for fault injection)."""
    return pool._roles[role].backend._llm  # type: ignore[attr-defined]


def _break(llm: Any, fault: Callable[..., Any]) -> None:
    llm.create_completion = fault


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("llama_decode returned -3")


async def _until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _rows(store_path: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(store_path) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM model_calls ORDER BY seq").fetchall()


def test_a_backend_that_raises_is_reloaded_and_its_calls_go_to_the_fallback(
    tmp_path: Path,
) -> None:
    """A task call whose backend raises is answered by the fallback; the role comes back."""

    async def run() -> tuple[str, ModelStatus, ModelStatus]:
        async with _pool(tmp_path, fallback="llamacpp:smollm2-135m", reload_backoff_seconds=6) as (
            pool,
            _store,
        ):
            _break(_llama(pool, "task"), _raise)
            out = await pool.complete(_hello())
            during = _status(pool, "task")
            await _until(lambda: _status(pool, "task").health == "ok")
            await pool.complete(_hello())
            return out.text, during, _status(pool, "task")

    text, during, after = asyncio.run(run())
    assert text
    assert during.health in ("down", "loading")
    assert during.serving == "llamacpp:smollm2-135m"
    assert "llama_decode returned -3" in (during.last_error or "")
    assert after.reloads == 1
    rows = [(r["route"], r["success"]) for r in _rows(tmp_path / "t.db")]
    assert rows == [("role", 0), ("fallback", 1), ("role", 1)]
    assert "task model llamacpp:smollm2-135m was down" in _rows(tmp_path / "t.db")[1]["note"]


def test_without_a_fallback_a_call_waits_for_the_role_then_says_why(tmp_path: Path) -> None:
    """No fallback and no recovery within down_wait_seconds: Unavailable naming the setting."""

    async def run() -> tuple[ModelStatus, str]:
        async with _pool(tmp_path, reload_backoff_seconds=3600, down_wait_seconds=0.5) as (
            pool,
            _store,
        ):
            _break(_llama(pool, "task"), _raise)
            with pytest.raises(Unavailable) as caught:
                await pool.complete(_hello())
            return _status(pool, "task"), caught.value.message

    status, message = asyncio.run(run())
    assert status.serving == "waiting"
    assert status.next_reload_at is not None
    assert "models.fallback" in message
    assert "llama_decode returned -3" in message


def test_a_waiting_call_proceeds_when_the_role_comes_back(tmp_path: Path) -> None:
    """No fallback: a call made while the role reloads is answered once it is back."""

    async def run() -> tuple[str, list[str]]:
        async with _pool(tmp_path, reload_backoff_seconds=0.5, down_wait_seconds=60) as (
            pool,
            _store,
        ):
            _break(_llama(pool, "task"), _raise)
            out = await pool.complete(_hello())
            return out.text, [s.role for s in pool.status()]

    text, roles = asyncio.run(run())
    assert text
    assert roles == ["ux", "task"]
    assert [(r["route"], r["success"]) for r in _rows(tmp_path / "t.db")] == [
        ("role", 0),
        ("role", 1),
    ]


def test_a_hung_model_fails_its_probe_and_is_reloaded(tmp_path: Path) -> None:
    """A generation that stops producing tokens fails the health probe; the role reloads."""
    release = threading.Event()

    def hang(*_args: Any, **_kwargs: Any) -> Any:
        release.wait(30)
        raise RuntimeError("stuck")

    async def run() -> ModelStatus:
        async with _pool(
            tmp_path,
            probe_timeout_seconds=0.5,
            health_interval_seconds=0.2,
            reload_backoff_seconds=0.1,
            down_wait_seconds=60,
        ) as (pool, _store):
            _break(_llama(pool, "task"), hang)
            call = asyncio.create_task(pool.complete(_hello()))
            await _until(lambda: _status(pool, "task").reloads == 1)
            status = _status(pool, "task")
            release.set()
            out = await call  # the stuck call fails and is retried on the reloaded model
            assert out.text
            return status

    status = asyncio.run(run())
    assert status.health == "ok"
    assert "probe hung" in (status.last_error or "")


def test_the_ux_role_keeps_answering_while_the_task_role_is_down(tmp_path: Path) -> None:
    """A broken task model does not touch the UX model: chat calls still succeed on ux."""

    async def run() -> tuple[str, str, str]:
        async with _pool(tmp_path, reload_backoff_seconds=3600, down_wait_seconds=0.1) as (
            pool,
            _store,
        ):
            _break(_llama(pool, "task"), _raise)
            with pytest.raises(Unavailable):
                await pool.complete(_hello())
            out = await pool.complete(_hello("ux"))
            return out.text, _status(pool, "ux").health, _status(pool, "task").health

    text, ux, task = asyncio.run(run())
    assert text
    assert (ux, task) == ("ok", "down")


# -- routing -------------------------------------------------------------------


def _task(model: str | None = None) -> TaskRecord:
    from taled.tasks.lifecycle import TaskState

    return TaskRecord("a" * 12, "x", TaskState.RUNNING, 50, None, None, 1, 0.0, 0.0, model=model)


class _Simple:
    def advise(self, task: TaskRecord) -> Role | None:
        return "ux"


def test_tasks_route_to_the_task_role_and_chat_to_ux() -> None:
    """Default routes: tasks on task, conversation on ux."""
    router = Router()
    assert router.for_task(_task()).role == "task"
    assert router.for_chat().role == "ux"


def test_the_learning_engine_hook_can_send_a_task_to_ux() -> None:
    """An installed advisor moves a task to ux; an explicit override still wins."""
    router = Router()
    router.set_advisor(_Simple())
    assert router.for_task(_task()) == Route("ux", None, "advised by the learning engine")
    assert router.for_task(_task("ollama:qwen2.5:14b")).model == "ollama:qwen2.5:14b"


# -- UX priority ----------------------------------------------------------------

STORY: list[ChatMessage] = [{"role": "user", "content": "Write a long story about a dragon."}]


def _task_tokens_during_a_reply(
    tmp_path: Path, ux_priority: bool, background: bool = False
) -> tuple[int, str]:
    """Tokens the task model generated while a UX reply streamed, and the task's end."""

    async def run() -> tuple[int, str]:
        async with _pool(tmp_path, ux_priority=ux_priority) as (pool, _store):
            task_backend = pool._roles["task"].backend
            work = asyncio.create_task(
                pool.complete(ModelCall("task", STORY, max_tokens=400, temperature=0, timeout=120))
            )
            await _until(lambda: task_backend._beats > 5)  # type: ignore[attr-defined]
            pieces = pool.stream(
                ModelCall(
                    "ux", HELLO, max_tokens=24, temperature=0, timeout=60, background=background
                )
            )
            first = await anext(pieces)
            before = task_backend._beats  # type: ignore[attr-defined]
            rest = [p async for p in pieces]
            during = task_backend._beats - before  # type: ignore[attr-defined]
            assert first and rest
            out = await work
            return during, out.finish_reason

    return asyncio.run(run())


def test_the_task_model_pauses_while_the_ux_model_answers(tmp_path: Path) -> None:
    """With ux_priority, the task model generates (almost) nothing during a reply, then resumes."""
    during, finish = _task_tokens_during_a_reply(tmp_path, ux_priority=True)
    assert during <= 1  # at most the token already being decoded
    assert finish in ("stop", "length")


def test_without_ux_priority_both_models_generate_at_once(tmp_path: Path) -> None:
    """With ux_priority off, the task model keeps generating during the reply."""
    during, _finish = _task_tokens_during_a_reply(tmp_path, ux_priority=False)
    assert during > 1


def test_a_ux_call_nobody_waits_on_does_not_pause_the_task_model(tmp_path: Path) -> None:
    """A read ahead on the UX model (background) is no person's reply: the task model
    keeps generating while it runs."""
    during, _finish = _task_tokens_during_a_reply(tmp_path, ux_priority=True, background=True)
    assert during > 1


# -- remote backends: failure, fallback, recovery, unexpected reloads ----------------


def _wait_model(daemon: Daemon, role: str, check: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 60
    while True:
        row = next(m for m in _model_rows(daemon) if m["role"] == role)
        if check(row):
            return
        assert time.monotonic() < deadline, f"{role} never reached the state: {row}"
        time.sleep(0.2)


def test_a_killed_openai_server_fails_over_to_the_fallback_and_recovers() -> None:
    """Task role on llama_cpp.server, SIGKILLed mid-answer: the task finishes on the fallback,
    `tale models` shows the role down and who serves it; the server back, the role recovers."""
    from tests.llama_server import ALIAS, LlamaServer

    server = LlamaServer().start()
    env = {
        "TALE_MODELS__TASK": f"openai:{server.base_url}#{ALIAS}",
        "TALE_MODELS__FALLBACK": "llamacpp:smollm2-135m",
        "TALE_RUNNER__MAX_TOKENS": "400",
        "TALE_MODELS__POOL__HEALTH_INTERVAL_SECONDS": "0.5",
        "TALE_MODELS__POOL__RELOAD_BACKOFF_SECONDS": "0.5",
        "TALE_MODELS__POOL__RELOAD_BACKOFF_MAX_SECONDS": "1",
    }
    try:
        with running_daemon(env) as d:
            task_id = d.call("submit_task", text="Write a long story about a dragon.")["id"]
            d.wait_for(task_id, ("running",))
            time.sleep(1.5)  # the server is streaming the answer
            server.kill()
            assert d.wait_for(task_id)["state"] == "completed"
            calls = [(r["backend"], r["route"], r["success"]) for r in _ledger(d, task_id)]
            assert calls == [("openai", "role", 0), ("llamacpp", "fallback", 1)]
            assert "task via fallback" in d.home.tale("usage").stdout
            task_role = next(m for m in _model_rows(d) if m["role"] == "task")
            assert task_role["health"] in ("down", "loading")
            assert task_role["serving"] == "llamacpp:smollm2-135m"
            assert "served by llamacpp:smollm2-135m" in d.home.tale("models").stdout

            server.start()  # same port
            _wait_model(d, "task", lambda m: m["health"] == "ok" and m["reloads"] >= 1)
            again = d.call("submit_task", text="Say yes")["id"]
            assert d.wait_for(again)["state"] == "completed"
            [call] = _ledger(d, again)
            assert (call["backend"], call["route"], call["success"]) == ("openai", "role", 1)
    finally:
        server.stop()


def test_an_ollama_model_unloaded_behind_our_back_is_noticed_in_the_ledger() -> None:
    """Another client unloads the pinned task model: the next call's load is flagged."""
    from tests.standins.ollama_server import OllamaStandIn

    with OllamaStandIn(["smollm2:135m"]) as ollama:
        env = {
            "TALE_MODELS__TASK": "ollama:smollm2:135m",
            "TALE_MODELS__OLLAMA__HOST": ollama.url,
            # The stand-in loads the small GGUF in ~0.2 s; a real model takes seconds.
            "TALE_MODELS__POOL__UNEXPECTED_LOAD_MS": "20",
            "TALE_MODELS__POOL__HEALTH_INTERVAL_SECONDS": "3600",
        }
        with running_daemon(env) as d:
            first = d.call("submit_task", text="Say yes")["id"]
            assert d.wait_for(first)["state"] == "completed"
            # What `ollama stop` or another client's keep_alive=0 does:
            httpx.post(
                f"{ollama.url}/api/generate",
                json={"model": "smollm2:135m", "keep_alive": 0},
                timeout=30,
            ).raise_for_status()
            second = d.call("submit_task", text="Say no")["id"]
            assert d.wait_for(second)["state"] == "completed"
            [call] = _ledger(d, second)
            assert "unloaded behind tale's back" in call["note"]
            assert call["load_ms"] > 20
            task_role = next(m for m in _model_rows(d) if m["role"] == "task")
            assert task_role["unexpected_loads"] == 1


def test_an_ollama_probe_notices_the_unload_and_the_pool_reloads_the_pin() -> None:
    """With health checks on, /api/ps missing the pinned model marks it down; it is reloaded."""
    from tests.standins.ollama_server import OllamaStandIn

    with OllamaStandIn(["smollm2:135m"]) as ollama:
        env = {
            "TALE_MODELS__TASK": "ollama:smollm2:135m",
            "TALE_MODELS__OLLAMA__HOST": ollama.url,
            "TALE_MODELS__POOL__HEALTH_INTERVAL_SECONDS": "0.3",
            "TALE_MODELS__POOL__RELOAD_BACKOFF_SECONDS": "0.2",
        }
        with running_daemon(env) as d:
            httpx.post(
                f"{ollama.url}/api/generate",
                json={"model": "smollm2:135m", "keep_alive": 0},
                timeout=30,
            ).raise_for_status()
            _wait_model(d, "task", lambda m: m["reloads"] >= 1 and m["health"] == "ok")
            ps = httpx.get(f"{ollama.url}/api/ps", timeout=10).json()["models"]
            assert [m["name"] for m in ps] == ["smollm2:135m"]
            task_role = next(m for m in _model_rows(d) if m["role"] == "task")
            assert "unloaded behind tale's back" in task_role["last_error"]


def test_without_a_fallback_a_task_waits_for_its_model_and_runs_when_it_is_back() -> None:
    """Task model down, no fallback: the task is `waiting` (history says why), not failed;
    once the server is back it runs to completion; a waiting task can be cancelled."""
    from tests.llama_server import ALIAS, LlamaServer

    server = LlamaServer().start()
    env = {
        "TALE_MODELS__TASK": f"openai:{server.base_url}#{ALIAS}",
        "TALE_MODELS__POOL__HEALTH_INTERVAL_SECONDS": "0.3",
        "TALE_MODELS__POOL__RELOAD_BACKOFF_SECONDS": "0.3",
        "TALE_MODELS__POOL__RELOAD_BACKOFF_MAX_SECONDS": "0.5",
        "TALE_MODELS__POOL__DOWN_WAIT_SECONDS": "0.5",
    }
    try:
        with running_daemon(env) as d:
            server.kill()
            _wait_model(d, "task", lambda m: m["health"] != "ok")
            assert "calls wait for it" in d.home.tale("models").stdout
            kept = d.call("submit_task", text="Say yes")["id"]
            dropped = d.call("submit_task", text="Say no")["id"]
            waiting = d.wait_for(kept, ("waiting",), timeout=30)
            assert "is down" in waiting["transitions"][-1]["reason"]
            d.wait_for(dropped, ("waiting",), timeout=30)
            assert d.home.tale("cancel", dropped).returncode == 0

            server.start()
            done = d.wait_for(kept, timeout=60)
            assert done["state"] == "completed", done
            path = [t["to"] for t in done["transitions"]]
            assert path[:4] == ["queued", "running", "waiting", "running"]
            assert d.call("get_task", id=dropped)["state"] == "cancelled"
    finally:
        server.stop()
