"""What the kernel sandbox costs a gate, run on demand (not part of the test suite).

    python tests/bench/bench_sandbox.py [--runs N]

One gate run of a trivial program (``print(1)``) end to end through ``run_python``
(scratch directory, launcher, namespaces and minimal root, Landlock, seccomp,
rlimits, the interpreter's start-up, audit hooks, clean-up), for each way of
building the root, against the baseline a user would otherwise get: the same
interpreter started plainly (``python -I -S -c``), with no sandbox at all. Runs
alternate between the variants so a drift of the machine touches each alike.
Prints a Markdown table (p50/p95 in ms) and the raw JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taled.sandbox.sandbox import run_python
from taled.settings import SandboxSettings
from tests.bench.bench_core import pct

CODE = "print(1)\n"


async def _sandboxed(isolation: str) -> float:
    started = time.perf_counter()
    result = await run_python(CODE, SandboxSettings(isolation=isolation))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert result.ok and result.stdout == "1\n", result
    return elapsed


async def _plain() -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        os.path.realpath(sys.executable),
        "-I",
        "-S",
        "-c",
        CODE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    elapsed = time.perf_counter() - started
    assert out == b"1\n"
    return elapsed


async def main(runs: int) -> dict[str, list[float]]:
    variants = ["plain", "builtin"] + (["bwrap"] if shutil.which("bwrap") else [])
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # one warm-up each (page cache, the interpreter's files)
        await (_plain() if v == "plain" else _sandboxed(v))
    for _ in range(runs):
        for v in variants:
            samples[v].append(await (_plain() if v == "plain" else _sandboxed(v)))
    return samples


def report(samples: dict[str, list[float]]) -> str:
    plain = pct(samples["plain"], 50)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{len(samples['plain'])} runs each, interleaved.",
        "",
        "| variant | p50 ms | p95 ms | p50 over plain |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in samples.items():
        p50, p95 = pct(values, 50), pct(values, 95)
        lines.append(
            f"| {name} | {p50 * 1000:.1f} | {p95 * 1000:.1f} | +{(p50 - plain) * 1000:.1f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    found = asyncio.run(main(args.runs))
    print(report(found))
    print(json.dumps({k: [round(v, 5) for v in vs] for k, vs in found.items()}))
