"""How llama.cpp's worker threads wait, and what it costs a reply while a task generates.

    python tests/bench/bench_threads.py [--quick]

llama-cpp-python's wheels build llama.cpp with OpenMP: each instance computes with a
team of OpenMP threads, and libgomp's threads spin between parallel regions before
they sleep. The daemon holds two instances (ux and task) on the same cores; when both
compute, or when one has just stopped, their spinning threads take cores from the
other. This measures, for each wait policy, in one run on the same machine:

- prompt reading speed of one instance alone (tokens/s, the embedded GGUF, 600 tokens);
- a short chat reply's first token and end-to-end time through the daemon, idle and
  while the task role generates a long answer (ux_priority on, the default);
- ``get_task``'s latency while the task role generates (bench_core's measure).

Each policy runs in fresh processes: libgomp reads its environment once, at load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_core import bench_get_task_busy, machine
from tests.bench.bench_pool import ENV, busy_latencies, latencies
from tests.harness import Daemon, Home

# name -> environment given to the daemon (and to the prompt-reading probe)
# (explicit values: the daemon sets GOMP_SPINCOUNT from its settings unless it is set)
POLICIES: dict[str, dict[str, str]] = {
    "libgomp's default, GOMP_SPINCOUNT=300000 (tale's)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=passive (no spinning)": {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "0"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}

_PROBE = """
import json, time
from llama_cpp import Llama
from taled.models.backends.llamacpp import embedded_model_path, machine_threads
llm = Llama(model_path=str(embedded_model_path()), n_ctx=2048, n_batch=256,
            n_threads=machine_threads(), verbose=False)
tokens = llm.tokenize(("The quick brown fox jumps over the lazy dog. " * 80).encode())[:600]
best = None
for _ in range(3):
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    took = time.perf_counter() - start
    best = took if best is None else min(best, took)
print(json.dumps({"prompt_tokens_per_s": len(tokens) / best}))
"""


def prompt_speed(env: dict[str, str]) -> float:
    """Best of three: tokens/s reading a 600-token prompt, one instance alone."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    speed: float = json.loads(out.stdout.strip().splitlines()[-1])["prompt_tokens_per_s"]
    return speed


def measure(env: dict[str, str], runs: int) -> dict[str, float]:
    speed = prompt_speed(env)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the harness passes the environment on to taled
    try:
        home = Home({**ENV, "TALE_CHAT__TEMPERATURE": "0"})
        daemon = Daemon(home).start()
        try:
            idle = latencies(daemon, runs)
            busy, running = busy_latencies(daemon, runs)
        finally:
            daemon.stop()
            home.cleanup()
        status = bench_get_task_busy(runs * 100)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "prompt_tokens_per_s": speed,
        **{f"idle_{k}": v for k, v in idle.items()},
        **{f"busy_{k}": v for k, v in busy.items()},
        "task_still_running": float(running),
        **status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    runs = 8 if parser.parse_args().quick else 20
    results = {name: measure(env, runs) for name, env in POLICIES.items()}
    print(f"### llama.cpp thread waiting, {time.strftime('%Y-%m-%d %H:%M')}, {machine()}\n")
    print(
        "| policy | prompt reading, one instance | reply first token idle p50 / p95 | "
        "reply end to end idle p95 | first token, task generating p50 / p95 | "
        "end to end, task generating p50 / p95 | get_task p50 / p99, task generating |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['prompt_tokens_per_s']:,.0f} tok/s "
            f"| {r['idle_first_p50_ms']:.0f} / {r['idle_first_p95_ms']:.0f} ms "
            f"| {r['idle_reply_p95_ms']:.0f} ms "
            f"| {r['busy_first_p50_ms']:.0f} / {r['busy_first_p95_ms']:.0f} ms "
            f"| {r['busy_reply_p50_ms']:.0f} / {r['busy_reply_p95_ms']:.0f} ms "
            f"| {r['busy_get_task_p50_ms']:.1f} / {r['busy_get_task_p99_ms']:.1f} ms |"
        )
    print("\n" + json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
