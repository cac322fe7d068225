"""Crash-resume benchmarks of issue #4, run on demand (not part of the test suite).

    python tests/bench/bench_resume.py [--quick] [--kills N]

1. Resume after kill -9 with 100 running tasks: 100 workers each mid-answer on the
   embedded task model (every task checkpointed), kill -9, restart; measures the time
   to READY, and from the restart until each task is running again from its latest
   checkpoint (p50/p95/max), counting the tasks that resumed from a checkpoint.
2. The fault-injection campaign of tests/test_crash_resume.py with more kills
   (default 60; 0 skips it) and longer answers: completion time, steps audited,
   re-runs of checkpointed steps (must be 0), interruptions.
Prints a Markdown block and the raw JSON.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_core import pct, print_report
from tests.faults import run_campaign
from tests.harness import Daemon, Home

RUNNING = 100
_RESUMED = re.compile(
    r"^(?P<at>\S+ \S+) INFO taled\.runner: task (?P<task>[0-9a-f]{12}) resumes from checkpoint",
    re.M,
)


def _running(home: Home) -> int:
    db = sqlite3.connect(home.data / "tale.db")
    n = db.execute("SELECT COUNT(*) FROM tasks WHERE state = 'running'").fetchone()[0]
    db.close()
    return int(n)


def bench_resume(tasks: int) -> dict[str, Any]:
    """Kill -9 with ``tasks`` tasks running; time their resumption after a restart."""
    home = Home(
        {
            "TALE_QUEUE__WORKERS": str(tasks),
            "TALE_RUNNER__MAX_TOKENS": "2000",
            "TALE_PLANNER__DECOMPOSE": "false",
        }
    )
    daemon = Daemon(home).start()
    try:
        ids = [
            daemon.call("submit_task", text=f"Write a very long story about dragon number {i}.")[
                "id"
            ]
            for i in range(tasks)
        ]
        deadline = time.monotonic() + 120
        while _running(home) < tasks and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # every worker has checkpointed its start
        running_before = _running(home)
        daemon.kill9()
        log_mark = len(daemon.log_text())
        t0 = time.time()
        spawn = time.perf_counter()
        daemon.start()
        ready_s = time.perf_counter() - spawn
        # A task has resumed once its worker loaded its latest checkpoint (logged).
        resumed_at: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(resumed_at) < tasks and time.monotonic() < deadline:
            time.sleep(0.1)
            for m in _RESUMED.finditer(daemon.log_text()[log_mark:]):
                stamp = datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                resumed_at.setdefault(m["task"], stamp)
        after = [resumed_at[i] - t0 for i in ids if i in resumed_at]
        from_checkpoint = len(resumed_at)
    finally:
        daemon.kill_if_running()
        home.cleanup()
    return {
        "resume_tasks": tasks,
        "resume_running_at_kill": running_before,
        "resume_ready_s": ready_s,
        "resume_all_running_again_s": max(after) if after else float("nan"),
        "resume_p50_s": pct(after, 50) if after else float("nan"),
        "resume_p95_s": pct(after, 95) if after else float("nan"),
        "resume_tasks_resumed": len(after),
        "resume_from_checkpoint": from_checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer kills")
    parser.add_argument("--kills", type=int, default=None, help="kill -9s in the campaign")
    args = parser.parse_args()
    kills = args.kills if args.kills is not None else (20 if args.quick else 60)
    results = bench_resume(RUNNING)
    if kills == 0:
        print_report("Crash resume (bench_resume.py)", [], results)
        return
    audit = run_campaign(kills, seed=7, settings={"TALE_RUNNER__MAX_TOKENS": "64"})
    results.update(
        {
            "campaign_kills": audit.kills,
            "campaign_seconds": audit.seconds,
            "campaign_tasks": sum(audit.states.values()),
            "campaign_completed": audit.states.get("completed", 0),
            "campaign_steps_audited": audit.steps_checked,
            "campaign_reruns_of_checkpointed_steps": len(audit.reruns),
            "campaign_interruptions": audit.interrupted,
            "campaign_model_calls": audit.calls,
            "campaign_fsck_ok": audit.fsck_ok,
        }
    )
    r = results
    rows = [
        (
            f"resume after kill -9 with {r['resume_running_at_kill']} running tasks: READY",
            f"{r['resume_ready_s']:.2f} s",
            "-",
        ),
        (
            "... until every task runs again from its checkpoint",
            f"p50 {r['resume_p50_s']:.2f} s, p95 {r['resume_p95_s']:.2f} s, "
            f"all {r['resume_all_running_again_s']:.2f} s "
            f"({r['resume_from_checkpoint']}/{r['resume_tasks']} from a checkpoint)",
            "-",
        ),
        (
            f"fault injection: {r['campaign_kills']} kill -9s",
            f"{r['campaign_completed']}/{r['campaign_tasks']} tasks completed in "
            f"{r['campaign_seconds']:.0f} s; {r['campaign_steps_audited']} checkpointed steps "
            f"audited, {r['campaign_reruns_of_checkpointed_steps']} re-run; "
            f"{r['campaign_interruptions']} interruptions; fsck "
            f"{'ok' if r['campaign_fsck_ok'] else 'FAILED'}",
            "0 re-runs, nothing lost",
        ),
    ]
    print_report("Crash resume (bench_resume.py)", rows, results)


if __name__ == "__main__":
    main()
