"""Schedules benchmark of issue #18, run on demand (not part of the test suite).

    python tests/bench/bench_schedules.py [--quick]

Measures, with 0 and with 10,000 recurring schedules loaded:
  - the scheduler's next-due computation (``ScheduleRecords.next_due``: the minimum next
    run over active schedules) and an idle pass (``Schedules.tick`` with nothing due),
    in process on a real store (a SQLite file in a temporary directory)
  - firing 100 due schedules among the 10,000 (one transaction each: task, record, next run)
  - a real daemon's CPU while idle (psutil cpu_times of the taled process, user + system,
    over a window: 30 s, 10 s with --quick), before and after 10,000 schedules are
    submitted through MCP (``submit_task`` with ``every``)
and prints a Markdown block and the raw JSON. The schedules run on 1 January at random
times, so none comes due while it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taled.db.schedules import ScheduleRecords
from taled.db.store import Store
from taled.schedules.service import ScheduleRequest, Schedules
from taled.settings import QueueSettings, ScheduleSettings, StoreSettings
from taled.tasks.queue import TaskQueue
from tests.bench.bench_core import pct, print_report
from tests.harness import Daemon, Home

N = 10_000


class _Clock:
    """A clock the benchmark sets (firing due schedules without waiting for them)."""

    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


def _yearly(rng: random.Random) -> str:
    """A cron expression for 1 January at a random time: never due while measuring."""
    return f"{rng.randrange(60)} {rng.randrange(24)} 1 1 *"


async def _timed(call: Any, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


async def in_process(reps: int) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    rng = random.Random(18)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "tale.db", StoreSettings(), write_batch_max=1024)
        await store.open()
        try:
            clock = _Clock()
            queue = TaskQueue(store, QueueSettings())
            schedules = Schedules(ScheduleRecords(store), queue, ScheduleSettings(), clock)
            fields = queue.check("Summarise what changed since yesterday")
            for loaded in (0, N):
                if loaded:
                    start = time.perf_counter()
                    for chunk in range(0, N, 500):
                        await asyncio.gather(
                            *(
                                schedules.create(
                                    ScheduleRequest(fields, every=_yearly(rng), timezone="UTC")
                                )
                                for _ in range(chunk, min(chunk + 500, N))
                            )
                        )
                    raw["create_10000_s"] = time.perf_counter() - start
                next_due = await _timed(schedules.records.next_due, reps)
                idle = await _timed(schedules.tick, reps)
                raw[f"next_due_{loaded}_p50_ms"] = pct(next_due, 50) * 1000
                raw[f"next_due_{loaded}_p95_ms"] = pct(next_due, 95) * 1000
                raw[f"idle_tick_{loaded}_p50_ms"] = pct(idle, 50) * 1000
                raw[f"idle_tick_{loaded}_p95_ms"] = pct(idle, 95) * 1000
            # Fire the 100 earliest, on time: a scheduler that was running just before the
            # first of them (so none counts as missed), its clock moved to the 100th.
            first = await schedules.records.find(None, 100)
            clock.t = min(s.next_run or 0 for s in first) - 1
            on_time = ScheduleSettings(grace_seconds=86_400)
            schedules = Schedules(ScheduleRecords(store), queue, on_time, clock)
            clock.t = max(s.next_run or 0 for s in first)
            start = time.perf_counter()
            outcomes: list[str] = []
            while True:
                tick = await schedules.tick()
                outcomes += [r.outcome.value for r in tick.runs]
                if not tick.more:
                    break
            raw["fire_100_ms"] = (time.perf_counter() - start) * 1000
            raw["fired"] = len(outcomes)
            raw["fired_on_time"] = outcomes.count("ran")
        finally:
            await store.close()
    return raw


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _idle_cpu(proc: psutil.Process, window: float) -> float:
    before = _cpu(proc)
    time.sleep(window)
    return _cpu(proc) - before


def daemon_idle(window: float, settle: float) -> dict[str, Any]:
    raw: dict[str, Any] = {"window_s": window}
    home = Home()
    daemon = Daemon(home).start()
    try:
        assert daemon.proc is not None
        proc = psutil.Process(daemon.proc.pid)
        time.sleep(settle)
        raw["idle_cpu_0_s"] = _idle_cpu(proc, window)
        rng = random.Random(1818)
        start = time.perf_counter()
        with daemon.client() as conn:
            for _ in range(N):
                conn.call_tool(
                    "submit_task",
                    {"text": "Draft my stand-up notes", "every": _yearly(rng)},
                )
        raw["submit_10000_s"] = time.perf_counter() - start
        listed = daemon.call("list_schedules", limit=N)["schedules"]
        raw["schedules_loaded"] = len(listed)
        time.sleep(settle)
        raw["idle_cpu_10000_s"] = _idle_cpu(proc, window)
        raw["rss_mb"] = proc.memory_info().rss / 2**20
    finally:
        daemon.kill_if_running()
        home.cleanup()
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 10 s windows")
    args = parser.parse_args()
    reps = 50 if args.quick else 300
    window = 10.0 if args.quick else 30.0
    raw = asyncio.run(in_process(reps))
    raw.update(daemon_idle(window, settle=3.0 if args.quick else 10.0))
    w = raw["window_s"]
    rows = [
        (
            "next due time (min next_run), 0 / 10,000 schedules",
            f"p50 {raw['next_due_0_p50_ms']:.2f} / {raw['next_due_10000_p50_ms']:.2f} ms, "
            f"p95 {raw['next_due_0_p95_ms']:.2f} / {raw['next_due_10000_p95_ms']:.2f} ms",
            "flat",
        ),
        (
            "idle scheduler pass (nothing due), 0 / 10,000",
            f"p50 {raw['idle_tick_0_p50_ms']:.2f} / {raw['idle_tick_10000_p50_ms']:.2f} ms, "
            f"p95 {raw['idle_tick_0_p95_ms']:.2f} / {raw['idle_tick_10000_p95_ms']:.2f} ms",
            "flat",
        ),
        (
            "firing 100 due among 10,000 (task + record + next run, one transaction each)",
            f"{raw['fire_100_ms']:.0f} ms ({raw['fire_100_ms'] / max(raw['fired'], 1):.2f} ms "
            f"each, {raw['fired']} fired)",
            "",
        ),
        (
            "creating 10,000 in process (gathered 500 at a time)",
            f"{raw['create_10000_s']:.1f} s",
            "",
        ),
        (
            "submitting 10,000 through MCP (one connection, one at a time)",
            f"{raw['submit_10000_s']:.1f} s ({raw['schedules_loaded']} listed)",
            "",
        ),
        (
            f"daemon CPU over {w:.0f} s idle, 0 / 10,000 schedules",
            f"{raw['idle_cpu_0_s']:.3f} / {raw['idle_cpu_10000_s']:.3f} s "
            f"({100 * raw['idle_cpu_0_s'] / w:.2f} / {100 * raw['idle_cpu_10000_s'] / w:.2f} % "
            "of a core)",
            "flat",
        ),
        ("daemon RSS with 10,000 schedules", f"{raw['rss_mb']:.0f} MB", ""),
    ]
    print_report("bench_schedules" + (" --quick" if args.quick else ""), rows, raw)


if __name__ == "__main__":
    main()
