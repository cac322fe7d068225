"""Every benchmark target in one table: the regression check of issue #19.

    python tests/bench/run_all.py [--quick] [--only NAME ...]

Runs each benchmark of ``BENCHES`` in its own process with ``--json`` (and ``--quick``
when given), one after another, never two at once (the models take both cores), and
prints one Markdown table: target, measured value, met / MISSED, benchmark; then the
machine, the date, what each quick mode left out and the wall times. ``--quick`` is
sized to fit in 10 minutes on 2 cores; the report says whether it did.

Exit status: 0 when every benchmark reported, even with targets missed (this is a
report, not a gate); 1 when one crashed, ran past its time limit or printed no report
(the others still run, and the table says which).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_core import machine
from tests.bench.targets import Report, Verdict

__all__ = [
    "BENCHES",
    "ISSUE_19",
    "NOT_RUN",
    "QUICK_BUDGET_SECONDS",
    "Bench",
    "Outcome",
    "Row",
    "exit_status",
    "main",
    "parse_report",
    "render",
    "rows",
    "run_bench",
]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUICK_BUDGET_SECONDS = 600.0
CRASHED = "CRASHED"


@dataclass(frozen=True)
class Bench:
    """A benchmark script in tests/bench/ and how long it may run before it is stopped."""

    name: str
    quick_limit_seconds: float
    full_limit_seconds: float
    script: Path | None = None
    """The script; tests/bench/NAME.py unless given."""

    def command(self, quick: bool) -> list[str]:
        script = self.script or HERE / f"{self.name}.py"
        return [sys.executable, str(script), "--json", *(["--quick"] if quick else [])]


# The limits only stop a hung benchmark: on a shared 2-core machine (load average 4-6)
# the three --quick runs took 46 s, 3 min 43 s and 4 min 07 s.
BENCHES: tuple[Bench, ...] = (
    Bench("bench_core", quick_limit_seconds=300, full_limit_seconds=900),
    Bench("bench_pool", quick_limit_seconds=600, full_limit_seconds=2400),
    Bench("bench_conversation", quick_limit_seconds=540, full_limit_seconds=1500),
)

# Benchmarks in tests/bench/ this check leaves out, and why.
NOT_RUN: dict[str, str] = {
    "bench_threads": (
        "its numbers at tale's default wait policy are bench_pool's busy reply and "
        "bench_core's busy get_task; its comparison of wait policies has no target"
    ),
    "the others (checkpoints, resume, savings, sandbox, agent, schedules, intent)": (
        "other issues' measures, run on their own"
    ),
}

# Issue #19's targets, in its table's order: first in the table, the rest after.
ISSUE_19: tuple[str, ...] = (
    "pool.busy_reply_p95",
    "conversation.first_p95",
    "conversation.late_to_turn2",
    "pool.overhead",
    "core.get_task_busy_p99",
    "pool.ux_priority",
    "core.get_task_idle_p99",
    "core.submits_per_s",
    "core.ready",
    "core.rss",
    "pool.rss",
    "conversation.rss",
)


@dataclass(frozen=True)
class Outcome:
    """One benchmark's run: its report, or why there is none."""

    bench: str
    command: list[str]
    seconds: float
    report: Report | None
    error: str | None = None


@dataclass(frozen=True)
class Row:
    """One line of the table; ``target`` starts with "#19: " for issue #19's own."""

    target: str
    goal: str
    measured: str
    verdict: str
    bench: str


def parse_report(stdout: str) -> Report:
    """The report a benchmark printed with ``--json``: its last non-empty line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    try:
        return Report.from_json(json.loads(lines[-1]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no report on the last line ({type(exc).__name__}: {exc})") from exc


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """Stop the benchmark and the daemons it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_bench(bench: Bench, quick: bool) -> Outcome:
    """Run one benchmark in its own process group; a crash or a hang is an outcome too."""
    command = bench.command(quick)
    limit = bench.quick_limit_seconds if quick else bench.full_limit_seconds
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        proc.communicate()
        error = f"still running after {limit:g} s: stopped"
        return Outcome(bench.name, command, time.monotonic() - start, None, error)
    except BaseException:
        _stop_group(proc)
        raise
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        error = f"exit status {proc.returncode}: {_tail(stderr, 1)}"
        return Outcome(bench.name, command, seconds, None, error)
    try:
        return Outcome(bench.name, command, seconds, parse_report(stdout))
    except ValueError as exc:
        return Outcome(bench.name, command, seconds, None, f"{exc}: {_tail(stderr)}")


def rows(outcomes: Iterable[Outcome]) -> list[Row]:
    """The table's rows: issue #19's targets first (its order), then the rest (run order);
    a benchmark with no report has one row saying so."""
    found: list[Row] = []
    order: list[str] = []
    for outcome in outcomes:
        if outcome.report is None:
            why = (outcome.error or "no report")[:160]
            found.append(Row(f"every target of {outcome.bench}", "-", why, CRASHED, outcome.bench))
            order.append("")
            continue
        for t in outcome.report.targets:
            name = f"#19: {t.name}" if t.key in ISSUE_19 else t.name
            found.append(Row(name, t.goal, t.measured, t.verdict.value, t.bench))
            order.append(t.key)

    def rank(i: int) -> tuple[int, int]:
        key = order[i]
        return (ISSUE_19.index(key), i) if key in ISSUE_19 else (len(ISSUE_19), i)

    return [found[i] for i in sorted(range(len(found)), key=rank)]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min {rest:02d} s" if rest else f"{minutes} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(
    outcomes: Sequence[Outcome], *, quick: bool, machine: str, when: datetime, wall: float
) -> str:
    """The whole report, Markdown."""
    table = rows(outcomes)
    counts = {v: sum(r.verdict == v for r in table) for v in (*Verdict, CRASHED)}
    mode = "--quick" if quick else "full"
    lines = [
        f"### All benchmark targets ({mode}), {when:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine}",
        "",
        "| target | goal | measured | verdict | benchmark |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {_cell(r.target)} | {_cell(r.goal)} | {_cell(r.measured)} | {r.verdict} "
            f"| {r.bench} |"
            for r in table
        ),
        "",
        f"{counts[Verdict.MET]} met, {counts[Verdict.MISSED]} missed, "
        f"{counts[Verdict.NOT_MEASURED]} not measured"
        + (f"; crashed: {counts[CRASHED]} of {len(outcomes)} benchmarks" if counts[CRASHED] else "")
        + ". Issue #19's targets (#19) come first.",
        "",
    ]
    for outcome in outcomes:
        took = _duration(outcome.seconds)
        if outcome.report is None:
            lines.append(f"- {outcome.bench} ({took}): {outcome.error}")
            continue
        notes = "; ".join(outcome.report.notes) or "nothing left out"
        lines.append(f"- {outcome.bench} ({took}): {notes}")
    lines += [f"- not run: {name}: {why}" for name, why in NOT_RUN.items()]
    total = f"Total wall time: {_duration(wall)}"
    if quick:
        within = "within" if wall <= QUICK_BUDGET_SECONDS else "OVER"
        total += f" ({within} the {_duration(QUICK_BUDGET_SECONDS)} budget of --quick)"
    flags = "--json --quick" if quick else "--json"
    lines += [
        "",
        f"{total}; each benchmark alone, in its own process: `python tests/bench/NAME.py {flags}`.",
    ]
    return "\n".join(lines)


def exit_status(outcomes: Iterable[Outcome]) -> int:
    """0 when every benchmark reported (targets missed or not), 1 when one did not."""
    return 0 if all(o.report is not None for o in outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode")
    parser.add_argument(
        "--only",
        action="append",
        choices=[b.name for b in BENCHES],
        help="run only this benchmark (repeatable)",
    )
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    when = datetime.now(UTC)
    start = time.monotonic()
    outcomes: list[Outcome] = []
    for i, bench in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {' '.join(bench.command(args.quick)[1:])}", file=sys.stderr)
        outcome = run_bench(bench, args.quick)
        state = "reported" if outcome.report else outcome.error
        print(f"      {bench.name}: {state} ({_duration(outcome.seconds)})", file=sys.stderr)
        outcomes.append(outcome)
    wall = time.monotonic() - start
    print(render(outcomes, quick=args.quick, machine=machine(), when=when, wall=wall))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
