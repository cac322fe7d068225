"""Core benchmarks of issue #2, run on demand (not part of the test suite).

    python tests/bench/bench_core.py [--quick] [--json]

Measures, against a real taled in a throw-away XDG home:
  - `tale list` wall time vs `python -c pass` (p50, same run)
  - durable submits/s over the socket (one sequential client; several pipelined clients)
  - get_task latency p50/p99 over one connection
  - time to READY=1 (spawn to the sd_notify datagram), embedded model
  - the daemon's RSS after the submits (both embedded models loaded)
and prints a Markdown block for docs/benchmarks.md, or with ``--json`` one line: its
``targets.Report`` (raw numbers and verdicts), which run_all.py reads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tale_client.rpc import Connection
from tests.bench import targets
from tests.harness import Daemon, Home

# The runner executes what the benchmark submits; one-token answers on one
# thread keep it from competing with the socket for both cores.
EXTRA: dict[str, str] = {}
LONG_TASK = "Write a very long story about a dragon, at least 2000 words."

BENCH_ENV = {
    "TALE_RUNNER__MAX_TOKENS": "1",
    "TALE_QUEUE__WORKERS": "1",
    "TALE_MODELS__LLAMACPP__N_THREADS": "1",
    "TALE_DAEMON__LOG_LEVEL": "warning",
}


def direct_llama(**extra: Any) -> Any:
    """The embedded GGUF in this process, loaded as the daemon loads it (n_ctx, batch,
    weights layout), on every core: the baseline a benchmark compares the daemon with."""
    import psutil
    from llama_cpp import Llama

    from taled.models.backends.llamacpp import embedded_model_path, model_params
    from taled.settings import LlamaCppSettings

    s = LlamaCppSettings()
    with model_params(repack=s.repack_weights):
        return Llama(
            model_path=str(embedded_model_path()),
            n_ctx=s.n_ctx,
            n_batch=s.n_batch,
            n_threads=psutil.cpu_count() or 1,
            verbose=False,
            **extra,
        )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wall(cmd: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        times.append(time.perf_counter() - start)
    return times


def bench_cli(home: Home, runs: int) -> dict[str, float]:
    tale = str(Path(sys.executable).with_name("tale"))
    baseline = wall([sys.executable, "-c", "pass"], home.env, runs)
    listing = wall([tale, "list"], home.env, runs)
    return {
        "python_pass_p50_ms": statistics.median(baseline) * 1000,
        "tale_list_p50_ms": statistics.median(listing) * 1000,
        "tale_list_p95_ms": pct(listing, 95) * 1000,
    }


def _pipelined_submits(path: str, count: int, window: int, out: Any) -> None:
    conn = Connection(Path(path))
    conn.initialize("bench")
    sock = conn._sock
    f = conn._file
    sent = received = 0
    start = time.perf_counter()
    while received < count:
        while sent < count and sent - received < window:
            sent += 1
            msg = {
                "jsonrpc": "2.0",
                "id": sent,
                "method": "tools/call",
                "params": {"name": "submit_task", "arguments": {"text": f"bench {sent}"}},
            }
            f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        reply = json.loads(f.readline())
        assert "result" in reply, reply
        received += 1
    out.put((count, time.perf_counter() - start))
    sock.close()


def bench_submits(
    daemon: Daemon, sequential: int, clients: int, per_client: int
) -> dict[str, float]:
    with daemon.client() as conn:
        start = time.perf_counter()
        for i in range(sequential):
            conn.call_tool("submit_task", {"text": f"sequential {i}"})
        seq_rate = sequential / (time.perf_counter() - start)
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(
            target=_pipelined_submits, args=(str(daemon.home.socket), per_client, 64, out)
        )
        for _ in range(clients)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    total = sum(n for n, _ in results)
    return {
        "sequential_submits_per_s": seq_rate,
        "pipelined_submits_per_s": total / elapsed,
        "pipelined_clients": clients,
        "pipelined_total": total,
    }


def _get_task_latencies(daemon: Daemon, task_id: str, calls: int) -> list[float]:
    with daemon.client() as conn:
        for _ in range(50):  # warm-up
            conn.call_tool("get_task", {"id": task_id})
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            conn.call_tool("get_task", {"id": task_id})
            times.append(time.perf_counter() - start)
    return times


def bench_get_task(daemon: Daemon, calls: int) -> dict[str, float]:
    """get_task latency with the runner idle (the probed task already finished)."""
    task_id = daemon.call("submit_task", text="status probe")["id"]
    daemon.wait_for(task_id)
    times = _get_task_latencies(daemon, task_id, calls)
    return {"get_task_p50_ms": pct(times, 50) * 1000, "get_task_p99_ms": pct(times, 99) * 1000}


def bench_get_task_busy(calls: int) -> dict[str, float]:
    """get_task latency while the task model generates a long answer (2 threads)."""
    home = Home({"TALE_RUNNER__MAX_TOKENS": "4000", "TALE_DAEMON__LOG_LEVEL": "warning", **EXTRA})
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text=LONG_TASK)["id"]
        daemon.wait_for(task_id, ("running",))
        times = _get_task_latencies(daemon, task_id, calls)
        still = daemon.call("get_task", id=task_id)["state"] == "running"
    finally:
        daemon.stop()
        home.cleanup()
    return {
        "busy_get_task_p50_ms": pct(times, 50) * 1000,
        "busy_get_task_p99_ms": pct(times, 99) * 1000,
        "busy_task_still_running": still,
    }


def bench_ready(runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        home = Home(BENCH_ENV)
        notify = str(home.root / "n.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(notify)
            sock.settimeout(60)
            env = {**home.env, "NOTIFY_SOCKET": notify}
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "taled"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while b"READY=1" not in sock.recv(4096):
                pass
            times.append(time.perf_counter() - start)
            proc.terminate()
            proc.wait(30)
        home.cleanup()
    return {
        "ready_p50_s": statistics.median(times),
        "ready_max_s": max(times),
        "ready_runs": runs,
    }


def daemon_rss_mb(daemon: Daemon) -> float:
    """The daemon's resident memory, MB."""
    import psutil

    assert daemon.proc is not None
    rss: float = psutil.Process(daemon.proc.pid).memory_info().rss / 2**20
    return rss


def print_report(title: str, rows: list[tuple[str, str, str]], raw: dict[str, Any]) -> None:
    """Print a benchmark's Markdown table (what, measured, target) and its raw numbers."""
    print(f"### {title}, {datetime.now(UTC):%Y-%m-%d}, {machine()}\n")
    print("| what | measured | target |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("```json")
    print(
        json.dumps(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in raw.items()}, indent=1
        )
    )
    print("```")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    python = platform.python_version()
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {python}"


def measure(quick: bool) -> dict[str, Any]:
    """Every measure of this benchmark, raw."""
    q = quick
    home = Home(BENCH_ENV)
    daemon = Daemon(home).start()
    try:
        results: dict[str, Any] = {
            **bench_cli(home, 10 if q else 40),
            **bench_get_task(daemon, 300 if q else 2000),
            **bench_submits(daemon, 300 if q else 2000, 4, 500 if q else 3000),
        }
        results["rss_mb_after_workload"] = daemon_rss_mb(daemon)
    finally:
        daemon.stop()
        home.cleanup()
    results.update(bench_get_task_busy(300 if q else 2000))
    results.update(bench_ready(3 if q else 10))
    return results


def report(quick: bool) -> targets.Report:
    """This benchmark's run: raw numbers and verdicts."""
    results = measure(quick)
    notes = ["--quick: 10 `tale list` runs, 300 get_task calls, 2,300 submits, 3 starts"]
    return targets.Report(
        "bench_core", quick, results, targets.core(results), notes if quick else []
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--json", action="store_true", help="print one line: raw numbers and verdicts"
    )
    args = parser.parse_args()
    if args.json:
        print(json.dumps(report(args.quick).to_json()))
        return
    r = measure(args.quick)
    ratio = r["tale_list_p50_ms"] / r["python_pass_p50_ms"]
    rows = [
        (
            "`tale list` wall, p50 (daemon up)",
            f"{r['tale_list_p50_ms']:.0f} ms (p95 {r['tale_list_p95_ms']:.0f} ms); "
            f"`python -c pass` {r['python_pass_p50_ms']:.0f} ms, ratio {ratio:.1f}x",
            "p50 <= 150 ms",
        ),
        (
            f"durable submits/s, {r['pipelined_clients']} pipelined clients",
            f"{r['pipelined_submits_per_s']:.0f}/s ({r['pipelined_total']} tasks)",
            ">= 1,000/s",
        ),
        (
            "durable submits/s, one sequential client",
            f"{r['sequential_submits_per_s']:.0f}/s",
            "-",
        ),
        (
            "`get_task`, runner idle",
            f"p50 {r['get_task_p50_ms']:.2f} ms, p99 {r['get_task_p99_ms']:.2f} ms",
            "p99 <= 5 ms",
        ),
        (
            "`get_task` while the task model generates",
            f"p50 {r['busy_get_task_p50_ms']:.2f} ms, p99 {r['busy_get_task_p99_ms']:.2f} ms",
            "p99 <= 5 ms",
        ),
        (
            "spawn to READY=1, embedded model",
            f"p50 {r['ready_p50_s']:.2f} s, max {r['ready_max_s']:.2f} s",
            "<= 3 s",
        ),
        (
            "daemon RSS after the submits, both models loaded",
            f"{r['rss_mb_after_workload']:.0f} MB",
            "<= 500 MB",
        ),
    ]
    print_report("Core benchmarks", rows, r)


if __name__ == "__main__":
    main()
