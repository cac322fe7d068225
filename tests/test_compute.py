"""The compute thread every embedded llama.cpp model shares: jobs take turns a step at
a time, a paused job waits, a failing job is dropped and the thread lives, and with
real models every instance and the embedder compute on one thread (one OpenMP team)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from taled.learning import embeddings
from taled.learning.embeddings import LlamaCppEmbedder
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.compute import COMPUTE, Compute
from taled.models.backends.llamacpp import LlamaCppBackend
from taled.settings import LlamaCppSettings
from tests.harness import Daemon, Home

MESSAGES: list[ChatMessage] = [{"role": "user", "content": "Say yes."}]


def _steps(name: str, n: int, log: list[str]) -> Iterator[None]:
    for i in range(n):
        log.append(f"{name}{i}")
        yield


def _wait_for(compute: Compute, timeout: float = 5.0) -> None:
    """Until every job started on ``compute`` has finished."""
    done = threading.Event()

    def mark() -> Iterator[None]:
        done.set()
        yield

    compute.start(mark())
    assert done.wait(timeout)
    for _ in range(200):
        if compute.jobs == 0:
            return
        threading.Event().wait(0.01)
    raise AssertionError("jobs still running")


def test_jobs_take_turns_a_step_at_a_time() -> None:
    compute = Compute("test-turns")
    go = threading.Event()
    log: list[str] = []
    compute.start(_steps("a", 3, log), go.is_set)
    compute.start(_steps("b", 3, log), go.is_set)
    go.set()
    _wait_for(compute)
    assert log == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_paused_job_waits_while_the_others_run_and_goes_on_after() -> None:
    compute = Compute("test-pause")
    resume = threading.Event()
    log: list[str] = []
    compute.start(_steps("task", 2, log), resume.is_set)
    compute.start(_steps("reply", 3, log))
    for _ in range(200):
        if len(log) == 3:
            break
        threading.Event().wait(0.01)
    assert log == ["reply0", "reply1", "reply2"]
    resume.set()
    _wait_for(compute)
    assert log[3:] == ["task0", "task1"]


def test_a_job_that_raises_is_logged_and_dropped_and_the_thread_lives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    compute = Compute("test-fail")

    def broken() -> Iterator[None]:
        yield
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="taled.models.backends.compute"):
        compute.start(broken())
        assert asyncio.run(compute.run(lambda: 41 + 1)) == 42
        _wait_for(compute)
    assert any("job failed" in r.getMessage() for r in caplog.records)


def test_run_returns_the_result_on_the_compute_thread_or_raises_the_error() -> None:
    compute = Compute("test-run")
    assert asyncio.run(compute.run(lambda: threading.current_thread().name)) == "test-run"

    def fails() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(compute.run(fails))


def test_run_waits_for_its_call_even_when_the_caller_is_cancelled() -> None:
    """As with a worker thread: what the call uses stays guarded until it is done."""
    compute = Compute("test-shield")
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        release.wait(5)
        finished.append(True)

    async def main() -> bool:
        call = asyncio.create_task(compute.run(slow))
        await asyncio.sleep(0.05)
        call.cancel()
        await asyncio.sleep(0.05)
        waited = not call.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        return waited

    assert asyncio.run(main())
    assert finished == [True]


def _threads_named(name: str) -> int:
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == name
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return count


def test_every_embedded_model_and_the_embedder_compute_on_one_openmp_team() -> None:
    """libgomp spins its idle threads only while the threads it manages are no more
    than the CPUs: one team for the process, made by the one compute thread (its
    OpenMP threads take its name), whichever instance or embedder computes."""
    settings = LlamaCppSettings(seed=1, n_threads=2)
    seen: list[str] = []
    real = embeddings._llama_embed

    def spy(llm: object, texts: list[str]) -> embeddings.Matrix:
        seen.append(threading.current_thread().name)
        return real(llm, texts)

    ux, task = (LlamaCppBackend("smollm2-135m", settings) for _ in range(2))
    embedder = LlamaCppEmbedder("smollm2-135m", settings)

    async def main() -> None:
        for b in (ux, task):
            await b.load()
            out = Completion.empty()
            async for _ in b.stream(
                MESSAGES, max_tokens=4, temperature=0, cancel=CancelToken(), result=out
            ):
                pass
        await embedder.embed(["a text to embed"])

    mp = pytest.MonkeyPatch()
    mp.setattr(embeddings, "_llama_embed", spy)
    try:
        asyncio.run(main())
        assert seen == [COMPUTE._name]
        # The compute thread and its OpenMP threads (one here; more if an earlier test
        # in this process ran an instance on more threads), never past the CPUs.
        assert 2 <= _threads_named(COMPUTE._name) <= max(2, len(os.sched_getaffinity(0)))
    finally:
        mp.undo()
        asyncio.run(ux.unload())
        asyncio.run(task.unload())
        asyncio.run(embedder.stop())


def _policies(pid: int, name: str) -> list[int]:
    """The scheduling policy of each of ``pid``'s threads called ``name``."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm == name:
            # Fields after the name, from the state (3rd): policy is the 41st.
            found.append(int(stat[stat.rindex(")") + 2 :].split()[41 - 3]))
    return found


@pytest.mark.parametrize(
    ("policy", "expected"), [("normal", os.SCHED_OTHER), ("idle", os.SCHED_IDLE)]
)
def test_models_llamacpp_cpu_policy_sets_how_the_compute_threads_are_scheduled(
    policy: str, expected: int
) -> None:
    home = Home({"TALE_MODELS__LLAMACPP__CPU_POLICY": policy})
    daemon = Daemon(home).start()
    try:
        daemon.call("chat", text="Say yes.", new=True)
        assert daemon.proc is not None
        policies = _policies(daemon.proc.pid, COMPUTE._name)
    finally:
        daemon.stop()
        home.cleanup()
    assert len(policies) >= 2  # the compute thread and its OpenMP threads
    assert set(policies) == {expected}


def test_a_task_keeps_generating_beside_a_busy_program() -> None:
    """llama.cpp's OpenMP threads work in lock-step, so one that waits behind a busy
    program holds up the others at every operation: ranked below one (niceness + 10,
    tried once), a 200-token answer got 13 tokens in 90 s. As scheduled now, it
    finishes while a program of the same session spins on one of the two cores
    (6.7 s measured; the 120 s wait is only for a slow machine)."""
    home = Home({"TALE_RUNNER__MAX_TOKENS": "200"})
    daemon = Daemon(home).start()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        task_id = daemon.call("submit_task", text="Write a short story about a dragon.")["id"]
        task = daemon.wait_for(task_id)
    finally:
        busy.kill()
        busy.wait()
        daemon.stop()
        home.cleanup()
    assert task["state"] == "completed"
    assert task["tokens"]["completion"] >= 100
