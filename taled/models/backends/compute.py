"""The one thread that runs every embedded llama.cpp instance's work.

llama.cpp computes with OpenMP, and libgomp gives each thread that starts a parallel
region a team of its own. Its idle threads spin (and so answer the next op at once)
only while the threads it manages number no more than the CPUs; past that every team
sleeps on a futex between ops. With a thread per call, or one per instance, a second
team exists whenever two instances have worked (or the embedder has), and on this
2-core machine a 20-token reply took about 1.5x as long on a second thread beside
the first one's team (docs/benchmarks.md, 2026-12-05 night); a new thread per call
also paid ~10 ms for its team on every first token.

So every instance's work runs here, on one thread with one team, as a job: an
iterator that does one step (a chunk of a prompt, a token) each time it is advanced.
The thread advances the runnable jobs in turn, so two instances share the cores a
step at a time rather than both at half speed; a job that is not runnable (a task
model paused for a person's reply) is skipped until it is. One step is never
interrupted: a job waits for at most one step of each other job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from taled.settings import CpuPolicy

__all__ = ["COMPUTE", "Compute"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# While every job is paused, how often the thread looks again (a pause ends when an
# event set elsewhere says so, which does not wake this thread).
_PAUSED_POLL_SECONDS = 0.02
_PR_SET_NAME = 15  # prctl(2)


def _always() -> bool:
    return True


@dataclass(eq=False)
class _Job:
    steps: Iterator[None]
    runnable: Callable[[], bool]


class Compute:
    """A thread that advances jobs one step at a time, in turn (see module doc)."""

    def __init__(self, name: str = "llama") -> None:
        self._name = name
        # models.llamacpp.cpu_policy; read when the thread starts (the first job).
        self.policy: CpuPolicy = "normal"
        self._jobs: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, steps: Iterator[None], runnable: Callable[[], bool] = _always) -> None:
        """Run ``steps`` to its end, advancing it only while ``runnable()`` says so.

        ``steps`` reports its own results and errors (it is not awaited); one that
        raises is logged and dropped. ``runnable`` is asked on this thread, under its
        lock: it must be quick and must not block.
        """
        with self._changed:
            self._jobs.append(_Job(steps, runnable))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify()

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the compute thread, as one step; its result or error.

        A cancelled caller still waits for ``fn`` to end (then is cancelled), as with a
        worker thread that cannot be abandoned, so a caller's lock still guards what
        ``fn`` uses.
        """
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def once() -> Iterator[None]:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                done.set_exception(exc)
            return
            yield  # a generator of one step: the call above

        self.start(once())
        waiting = asyncio.wrap_future(done)
        cancelled = False
        while not waiting.done():
            try:
                await asyncio.wait([waiting])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return waiting.result()

    @property
    def jobs(self) -> int:
        """Jobs started and not yet finished."""
        with self._changed:
            return len(self._jobs)

    def _next(self) -> _Job | None:
        """The next runnable job in turn (under the lock), moved to the back."""
        for _ in range(len(self._jobs)):
            job = self._jobs[0]
            self._jobs.rotate(-1)
            if job.runnable():
                return job
        return None

    def _main(self) -> None:
        _name_this_thread(self._name)
        if self.policy == "idle":
            # Before the first parallel region: OpenMP's threads, made by this one,
            # inherit its policy. An unprivileged process cannot leave SCHED_IDLE, so it is
            # set once, for the thread's life.
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:
                log.warning("cannot run llama.cpp at idle priority: %s", exc)
        while True:
            with self._changed:
                job = self._next()
                while job is None:
                    self._changed.wait(_PAUSED_POLL_SECONDS if self._jobs else None)
                    job = self._next()
            try:
                next(job.steps)
                continue
            except StopIteration:
                pass
            except Exception:
                # The thread serves every instance: log, drop the job, live.
                log.exception("an embedded model's job failed; dropped")
            with self._changed:
                self._jobs.remove(job)


def _name_this_thread(name: str) -> None:
    """Give the OS thread ``name`` (``top -H``, /proc), as Python 3.11 does not; the
    OpenMP threads it makes take the name too."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


# The process's one: every embedded instance and embedder runs on it.
COMPUTE = Compute()
