"""Checkpoint store benchmarks of issue #4, run on demand (not part of the test suite).

    python tests/bench/bench_checkpoints.py [--quick]

Measures, on a fresh bare repository in a temporary directory (fsync on, the default):
  - commit latency of a 10 KB state, one task at a time (p50/p95/p99), and without fsync
  - commit latency with several tasks committing at once, and their total rate
  - load latency of the newest state, and of an older one named by a 7-digit prefix
  - commit and list latency with 10,000 checkpoints already in the repository
  - gc (prune + repack) time over that repository
and prints a Markdown block and the raw JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taled.checkpoints.repo import CheckpointStore
from tests.bench.bench_core import pct, print_report

TASK = "0123456789ab"


def state(i: int) -> dict[str, Any]:
    """A task state of about 10 KB whose content changes with ``i`` (a new blob each time)."""
    return {
        "plan": [{"id": f"s{n}", "text": f"subtask {n} " + "p" * 80, "deps": []} for n in range(8)],
        "finished": {f"s{n}": f"output {i}/{n} " + "o" * 1000 for n in range(8)},
        "partial": f"partial output {i} " + "x" * 300,
        "tokens": {"prompt": 1000 + i, "completion": 2000 + i},
        "step": i,
    }


def ms_summary(prefix: str, times: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_p50_ms": pct(times, 50) * 1000,
        f"{prefix}_p95_ms": pct(times, 95) * 1000,
        f"{prefix}_p99_ms": pct(times, 99) * 1000,
    }


async def timed_commits(store: CheckpointStore, task_id: str, start: int, n: int) -> list[float]:
    times = []
    for i in range(start, start + n):
        t = time.perf_counter()
        await store.commit(task_id, state(i), f"step {i}", "bench")
        times.append(time.perf_counter() - t)
    return times


async def bench_sequential(root: Path, n: int, fsync: bool) -> list[float]:
    store = CheckpointStore(root / f"seq-{fsync}", fsync=fsync)
    await store.open()
    try:
        await timed_commits(store, TASK, 0, 10)  # warm-up
        return await timed_commits(store, TASK, 10, n)
    finally:
        await store.close()


async def bench_concurrent(root: Path, tasks: int, per_task: int) -> tuple[list[float], float]:
    store = CheckpointStore(root / "concurrent")
    await store.open()
    try:
        ids = [f"{n:012x}" for n in range(tasks)]
        await asyncio.gather(*(timed_commits(store, t, 0, 5) for t in ids))
        start = time.perf_counter()
        runs = await asyncio.gather(*(timed_commits(store, t, 5, per_task) for t in ids))
        elapsed = time.perf_counter() - start
    finally:
        await store.close()
    return [t for run in runs for t in run], tasks * per_task / elapsed


async def bench_load(root: Path, n: int) -> dict[str, float]:
    store = CheckpointStore(root / "load")
    await store.open()
    try:
        made = [await store.commit(TASK, state(i), f"step {i}", "bench") for i in range(100)]
        latest, by_prefix = [], []
        for i in range(n):
            t = time.perf_counter()
            await store.load(TASK)
            latest.append(time.perf_counter() - t)
            t = time.perf_counter()
            await store.load(TASK, made[i % 100].commit[:7])
            by_prefix.append(time.perf_counter() - t)
    finally:
        await store.close()
    return {**ms_summary("load_latest", latest), **ms_summary("load_prefix_100deep", by_prefix)}


async def bench_full_repo(root: Path, existing: int, n: int) -> dict[str, float]:
    """Commit/list latency and gc time once ``existing`` checkpoints are in the repository."""
    path = root / "full"
    tasks = [f"{n:012x}" for n in range(100)]
    # Filling needs no durability: only the repository's size matters here.
    filler = CheckpointStore(path, fsync=False)
    await filler.open()
    fill_start = time.perf_counter()
    try:
        for k in range(existing // len(tasks)):
            # Every state differs (k * 100 + n), so no blob is shared between tasks.
            await asyncio.gather(
                *(
                    filler.commit(t, state(k * 100 + n), f"step {k}", "fill")
                    for n, t in enumerate(tasks)
                )
            )
    finally:
        await filler.close()
    fill_s = time.perf_counter() - fill_start
    store = CheckpointStore(path)
    await store.open()
    try:
        commits = await timed_commits(store, tasks[0], 10_000, n)
        lists = []
        for _ in range(50):
            t = time.perf_counter()
            await store.list(tasks[0])
            lists.append(time.perf_counter() - t)
        depth = len(await store.list(tasks[0]))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        report = await store.gc()
        gc_s = time.perf_counter() - t
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        after_gc = await timed_commits(store, tasks[1], 20_000, n)
    finally:
        await store.close()
    return {
        "full_existing_checkpoints": existing,
        "full_fill_s": fill_s,
        **ms_summary("full_commit", commits),
        "full_list_depth": depth,
        **ms_summary("full_list", lists),
        "full_gc_s": gc_s,
        "full_gc_packed_loose_objects": report.loose_objects_before,
        "full_gc_peak_rss_mb_before": rss_before,
        "full_gc_peak_rss_mb_after": rss_after,
        **ms_summary("full_commit_after_gc", after_gc),
    }


async def run(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="tale-bench-cp-") as tmp:
        root = Path(tmp)
        results: dict[str, Any] = {"state_bytes": len(json.dumps(state(0), sort_keys=True))}
        results.update(ms_summary("seq_commit", await bench_sequential(root, n, fsync=True)))
        results.update(ms_summary("seq_commit_nofsync", await bench_sequential(root, n, False)))
        tasks = 4
        times, rate = await bench_concurrent(root, tasks, n // tasks)
        results.update(ms_summary("conc_commit", times))
        results.update({"conc_tasks": tasks, "conc_commits_per_s": rate})
        results.update(await bench_load(root, n))
        results.update(await bench_full_repo(root, 2000 if quick else 10_000, n // 2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller repo")
    args = parser.parse_args()
    r = asyncio.run(run(args.quick))

    def lat(prefix: str) -> str:
        return (
            f"p50 {r[prefix + '_p50_ms']:.1f} ms, p95 {r[prefix + '_p95_ms']:.1f} ms, "
            f"p99 {r[prefix + '_p99_ms']:.1f} ms"
        )

    kb = r["state_bytes"] / 1024
    rows = [
        (f"commit, {kb:.1f} KB state, one task at a time", lat("seq_commit"), "p95 <= 20 ms"),
        ("same, fsync off (crash-safe, not power-loss-safe)", lat("seq_commit_nofsync"), "-"),
        (
            f"commit, {r['conc_tasks']} tasks at once",
            f"{lat('conc_commit')}; {r['conc_commits_per_s']:.0f} commits/s in all",
            "p95 <= 20 ms",
        ),
        ("load newest state", lat("load_latest"), "-"),
        ("load by 7-digit prefix, 0-99 checkpoints back", lat("load_prefix_100deep"), "-"),
        (
            f"commit with {r['full_existing_checkpoints']:,} checkpoints in the repo",
            lat("full_commit"),
            "p95 <= 20 ms",
        ),
        (f"list a {r['full_list_depth']}-deep history, same repo", lat("full_list"), "-"),
        (
            "gc (prune + repack) of that repo",
            f"{r['full_gc_s']:.1f} s for {r['full_gc_packed_loose_objects']:,} loose objects; "
            f"peak RSS {r['full_gc_peak_rss_mb_before']:.0f} -> "
            f"{r['full_gc_peak_rss_mb_after']:.0f} MB",
            "-",
        ),
        ("commit after gc", lat("full_commit_after_gc"), "p95 <= 20 ms"),
    ]
    print_report("Checkpoint benchmarks", rows, r)


if __name__ == "__main__":
    main()
