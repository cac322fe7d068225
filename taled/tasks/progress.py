"""Live progress of running tasks: step i of n, tokens so far, elapsed, ETA.

The runner publishes; readers (``get_task``, the ``watch_task`` tool behind
``tale status --watch`` and ``tale submit --wait``) read the latest value or wait
for the next change. Progress lives in memory only: it describes work happening
now, and everything worth keeping is in the store and the checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["Progress", "ProgressHub"]


@dataclass(frozen=True)
class Progress:
    """Where a task's work is."""

    task_id: str
    step: int
    """Steps finished."""
    steps: int
    """Steps known so far (a plan can add more)."""
    doing: str
    """What is happening now, in a few words."""
    tokens: int
    """Tokens generated so far by this task (its subtasks included)."""
    started_at: float
    updated_at: float
    eta_seconds: float | None = None
    """Seconds left: from the pace of the steps so far, or before the first step ends,
    from the learning engine's predicted tokens at the model's measured speed."""
    predicted_tokens: int | None = None
    """Tokens the learning engine expects the task to generate."""
    tokens_per_second: float | None = None
    """The task model's measured generation speed (from the ledger)."""

    def to_json(self) -> dict[str, Any]:
        """The wire form, with elapsed seconds."""
        out = asdict(self)
        out["elapsed_seconds"] = round(self.updated_at - self.started_at, 1)
        if self.eta_seconds is not None:
            out["eta_seconds"] = round(self.eta_seconds, 1)
        return out

    def line(self) -> str:
        """One human line: ``step 2/4 · writing tests · 130 tokens · 12 s · ETA 20 s``."""
        parts = [f"step {min(self.step + 1, self.steps)}/{self.steps}", self.doing]
        parts.append(f"{self.tokens} tokens")
        parts.append(f"{self.updated_at - self.started_at:.0f} s")
        if self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds:.0f} s")
        return " · ".join(parts)


def estimate_eta(started_at: float, now: float, done: int, total: int) -> float | None:
    """Seconds left at the pace of the steps done so far (None before the first)."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return (now - started_at) / done * (total - done)


def _eta(p: Progress) -> float | None:
    """Step pace once a step is done; before that, the predicted tokens still to come."""
    by_steps = estimate_eta(p.started_at, p.updated_at, p.step, p.steps)
    if by_steps is not None or not p.predicted_tokens or not p.tokens_per_second:
        return by_steps
    return max(p.predicted_tokens - p.tokens, 0) / p.tokens_per_second


class ProgressHub:
    """The latest progress of each task, and a way to wait for changes."""

    def __init__(self) -> None:
        self._latest: dict[str, Progress] = {}
        self._version = 0
        self._changed = asyncio.Event()

    def get(self, task_id: str) -> Progress | None:
        """The task's latest progress, if it has run in this daemon's life."""
        return self._latest.get(task_id)

    def start(self, task_id: str, steps: int, doing: str, step: int, tokens: int) -> Progress:
        """Begin (or carry on, keeping its start time) reporting a task's progress."""
        now = time.time()
        old = self._latest.get(task_id)
        started = old.started_at if old is not None else now
        new = Progress(task_id, step, max(steps, 1), doing, tokens, started, now)
        if old is not None:
            new = replace(
                new,
                predicted_tokens=old.predicted_tokens,
                tokens_per_second=old.tokens_per_second,
            )
        return self._put(replace(new, eta_seconds=_eta(new)))

    def expect(
        self, task_id: str, predicted_tokens: int | None, tokens_per_second: float | None
    ) -> Progress | None:
        """Give a task's progress the learning engine's prediction (for its ETA)."""
        old = self._latest.get(task_id)
        if old is None:
            return None
        new = replace(old, predicted_tokens=predicted_tokens, tokens_per_second=tokens_per_second)
        return self._put(replace(new, eta_seconds=_eta(new)))

    def update(
        self,
        task_id: str,
        *,
        step: int | None = None,
        steps: int | None = None,
        doing: str | None = None,
        tokens: int | None = None,
        add_tokens: int = 0,
    ) -> Progress | None:
        """Change some fields of a task's progress; None if it has none."""
        old = self._latest.get(task_id)
        if old is None:
            return None
        now = time.time()
        new = replace(
            old,
            step=old.step if step is None else step,
            steps=old.steps if steps is None else max(steps, 1),
            doing=old.doing if doing is None else doing,
            tokens=(old.tokens if tokens is None else tokens) + add_tokens,
            updated_at=now,
        )
        new = replace(new, eta_seconds=_eta(new))
        return self._put(new)

    def forget(self, task_id: str) -> None:
        """Drop a finished task's progress."""
        if self._latest.pop(task_id, None) is not None:
            self._bump()

    def _put(self, progress: Progress) -> Progress:
        self._latest[progress.task_id] = progress
        self._bump()
        return progress

    def _bump(self) -> None:
        # Each change sets the event waiters hold and starts a fresh one.
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, seen: int, timeout: float) -> int:
        """Wait until the version passes ``seen`` (or ``timeout`` s); return the version."""
        if self._version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self._version
