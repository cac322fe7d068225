"""run_all.py's verdicts and table, without a daemon or a model.

The benchmarks' raw numbers below are the shape each one prints with ``--json``; the
scripts run_all starts here are a few lines of Python, not benchmarks.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.bench import run_all, targets
from tests.bench.run_all import Bench, Outcome
from tests.bench.targets import Report, Verdict

CORE: dict[str, Any] = {
    "python_pass_p50_ms": 35.3,
    "tale_list_p50_ms": 105.4,
    "tale_list_p95_ms": 164.2,
    "get_task_p50_ms": 1.585,
    "get_task_p99_ms": 2.0,
    "sequential_submits_per_s": 109.0,
    "pipelined_submits_per_s": 1754.6,
    "pipelined_clients": 4,
    "pipelined_total": 2000,
    "rss_mb_after_workload": 470.0,
    "busy_get_task_p50_ms": 7.2,
    "busy_get_task_p99_ms": 43.5,
    "busy_task_still_running": True,
    "ready_p50_s": 2.23,
    "ready_max_s": 2.35,
    "ready_runs": 3,
}
POOL: dict[str, Any] = {
    "rss_mb_both_roles": 448.3,
    "idle_first_p50_ms": 43.4,
    "idle_first_p95_ms": 521.2,
    "idle_reply_p50_ms": 400.0,
    "idle_reply_p95_ms": 900.0,
    "busy_first_p50_ms": 91.8,
    "busy_first_p95_ms": 122.9,
    "busy_reply_p50_ms": 821.1,
    "busy_reply_p95_ms": 1178.6,
    "task_still_running_during_busy": True,
    "no_priority_busy_first_p50_ms": 115.3,
    "no_priority_busy_first_p95_ms": 159.4,
    "no_priority_busy_reply_p50_ms": 919.9,
    "no_priority_busy_reply_p95_ms": 1165.2,
    "task_still_running_without_priority": True,
    "reply_via_socket_p50_s": 1.02,
    "reply_direct_p50_s": 1.0,
    "daemon_overhead_pct": 2.0,
    "switch_load_p50_ms": 225.8,
    "switch_load_p95_ms": 292.0,
    "task_cold_p50_ms": 8425.6,
    "task_warm_p50_ms": 2499.0,
    "runs": 8,
}
CONVERSATION: dict[str, Any] = {
    "turns": 12,
    "timed_turns": 11,
    "first_p50_ms": 110.0,
    "first_p95_ms": 1190.0,
    "slow_turns": 2,
    "turn2_first_ms": 300.0,
    "late_turns": "9-12",
    "late_p50_ms": 120.0,
    "late_to_turn2": 0.4,
    "rss_mb_after": 610.0,
}
WHEN = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _report(bench: str, results: dict[str, Any], notes: list[str] | None = None) -> Report:
    build = {"bench_core": targets.core, "bench_pool": targets.pool}
    made = build.get(bench, targets.conversation)(results)
    return Report(bench, True, results, made, notes or [])


def _outcomes() -> list[Outcome]:
    return [
        Outcome("bench_core", ["x"], 35.0, _report("bench_core", CORE)),
        Outcome("bench_pool", ["x"], 190.0, _report("bench_pool", POOL, ["--quick: 8 runs"])),
        Outcome("bench_conversation", ["x"], 150.0, _report("bench_conversation", CONVERSATION)),
    ]


def _by_key(made: list[targets.Target]) -> dict[str, targets.Target]:
    return {t.key: t for t in made}


def test_a_value_at_the_limit_meets_an_at_most_target() -> None:
    """A measured value equal to its limit meets an at-most target."""
    t = targets.at_most("k", "n", 5.0, 5, "b", shown="5 ms", goal="<= 5 ms")
    assert t.verdict is Verdict.MET


def test_a_value_over_the_limit_misses_an_at_most_target() -> None:
    """A measured value over its limit misses an at-most target."""
    t = targets.at_most("k", "n", 5.01, 5, "b", shown="5.01 ms", goal="<= 5 ms")
    assert t.verdict is Verdict.MISSED


def test_a_value_under_the_floor_misses_an_at_least_target() -> None:
    """Fewer submits/s than the floor miss an at-least target."""
    t = targets.at_least("k", "n", 999.0, 1000, "b", shown="999/s", goal=">= 1,000/s")
    assert t.verdict is Verdict.MISSED


def test_a_missing_value_is_not_measured() -> None:
    """NaN or None is neither met nor missed."""
    for value in (math.nan, None):
        t = targets.at_most("k", "n", value, 5, "b", shown="-", goal="<= 5 ms")
        assert t.verdict is Verdict.NOT_MEASURED


def test_bench_core_verdicts() -> None:
    """bench_core's numbers are judged against its own targets and issue #19's busy get_task."""
    made = _by_key(targets.core(CORE))
    assert made["core.tale_list_p50"].verdict is Verdict.MET
    assert made["core.submits_per_s"].verdict is Verdict.MET
    assert made["core.get_task_idle_p99"].verdict is Verdict.MET
    assert made["core.get_task_busy_p99"].verdict is Verdict.MISSED
    assert made["core.ready"].verdict is Verdict.MET
    assert made["core.rss"].verdict is Verdict.MET


def test_a_busy_measure_without_a_running_task_is_not_measured() -> None:
    """get_task 'while the task model generates' is not judged if the task had finished."""
    made = _by_key(
        targets.core({**CORE, "busy_get_task_p99_ms": 1.0, "busy_task_still_running": False})
    )
    assert made["core.get_task_busy_p99"].verdict is Verdict.NOT_MEASURED
    assert "had finished" in made["core.get_task_busy_p99"].measured


def test_ux_priority_helps_when_replies_are_faster_with_it_on() -> None:
    """ux_priority is met when the busy reply's p50 is lower on than off, missed otherwise."""
    assert _by_key(targets.pool(POOL))["pool.ux_priority"].verdict is Verdict.MET
    slower = {**POOL, "busy_reply_p50_ms": 950.0}
    assert _by_key(targets.pool(slower))["pool.ux_priority"].verdict is Verdict.MISSED


def test_parts_a_run_left_out_have_no_row() -> None:
    """bench_pool --quick has no conversation part, so no conversation row."""
    keys = _by_key(targets.pool(POOL))
    assert "pool.conversation_first_p95" not in keys
    with_it = {**POOL, "conversation_first_p50_ms": 100.0, "conversation_first_p95_ms": 200.0}
    assert _by_key(targets.pool(with_it))["pool.conversation_first_p95"].verdict is Verdict.MET


def test_late_turns_within_one_and_a_half_times_turn_two() -> None:
    """The late turns' p50 is judged against 1.5x turn 2's first token."""
    made = _by_key(targets.conversation(CONVERSATION))
    assert made["conversation.late_to_turn2"].verdict is Verdict.MET
    assert made["conversation.first_p95"].verdict is Verdict.MISSED
    assert made["conversation.rss"].verdict is Verdict.MISSED
    late = _by_key(targets.conversation({**CONVERSATION, "late_to_turn2": 1.6}))
    assert late["conversation.late_to_turn2"].verdict is Verdict.MISSED


def test_every_issue_19_target_has_a_builder() -> None:
    """Each key run_all puts first is one the benchmarks' targets produce."""
    made = {t.key for o in _outcomes() if o.report for t in o.report.targets}
    assert set(run_all.ISSUE_19) <= made


def test_a_report_survives_its_json_line() -> None:
    """A report printed with --json reads back equal, the NaN of a missing value included."""
    report = _report("bench_conversation", {**CONVERSATION, "late_to_turn2": math.nan})
    noisy = "llama.cpp says hello\n" + json.dumps(report.to_json()) + "\n\n"
    back = run_all.parse_report(noisy)
    assert back.targets == report.targets
    assert back.bench == "bench_conversation"


def test_output_without_a_report_is_an_error() -> None:
    """A benchmark that printed no JSON report has no report."""
    for stdout in ("", "### a Markdown table\n| what |\n"):
        try:
            run_all.parse_report(stdout)
        except ValueError:
            continue
        raise AssertionError(f"parsed a report from {stdout!r}")


def test_issue_19_targets_come_first_in_its_order() -> None:
    """The table starts with issue #19's targets, in the issue's order."""
    table = run_all.rows(_outcomes())
    assert table[0].target.startswith("#19: short chat reply end to end while a task generates")
    assert table[0].bench == "bench_pool"
    assert table[1].bench == "bench_conversation"
    assert table[-1].target.startswith("model switch")


def test_a_crashed_benchmark_has_one_crashed_row() -> None:
    """A benchmark with no report shows as one CRASHED row; the others' rows stay."""
    outcomes = [*_outcomes()[:2], Outcome("bench_conversation", ["x"], 3.0, None, "exit status 1")]
    table = run_all.rows(outcomes)
    crashed = [r for r in table if r.verdict == run_all.CRASHED]
    assert [(r.bench, r.target) for r in crashed] == [
        ("bench_conversation", "every target of bench_conversation")
    ]
    assert len(table) == 1 + len(targets.core(CORE)) + len(targets.pool(POOL))


def test_missed_targets_still_exit_zero() -> None:
    """Missed targets are a report, not a failure: exit status 0."""
    assert run_all.exit_status(_outcomes()) == 0


def test_a_crash_exits_non_zero() -> None:
    """A benchmark that crashed makes the exit status 1."""
    outcomes = [*_outcomes(), Outcome("bench_x", ["x"], 1.0, None, "exit status 1")]
    assert run_all.exit_status(outcomes) == 1


def test_the_report_names_machine_date_notes_and_wall_time() -> None:
    """The printed report has the machine, the date, what --quick left out and the wall time."""
    text = run_all.render(_outcomes(), quick=True, machine="x86_64, 2 cores", when=WHEN, wall=375)
    assert "x86_64, 2 cores" in text
    assert "2026-12-05 12:00 UTC" in text
    assert "- bench_pool (3 min 10 s): --quick: 8 runs" in text
    assert "Total wall time: 6 min 15 s (within the 10 min budget of --quick)" in text
    assert "| <= 5 ms | 44 ms (p50 7.20 ms) | MISSED | bench_core |" in text


def test_a_quick_run_over_budget_says_so() -> None:
    """A --quick run longer than 10 minutes is flagged OVER."""
    text = run_all.render(_outcomes(), quick=True, machine="m", when=WHEN, wall=601)
    assert "(OVER the 10 min budget of --quick)" in text


def test_a_crashing_script_is_an_outcome_not_an_exception(tmp_path: Path) -> None:
    """A benchmark that exits non-zero gives an outcome with its status and stderr's last line."""
    script = tmp_path / "crash.py"
    script.write_text("import sys\nprint('Traceback\\nboom', file=sys.stderr)\nsys.exit(3)\n")
    outcome = run_all.run_bench(Bench("crash", 30, 30, script), quick=True)
    assert outcome.report is None
    assert outcome.error == "exit status 3: boom"


def test_a_benchmark_past_its_limit_is_stopped(tmp_path: Path) -> None:
    """A benchmark still running at its time limit is stopped and reported as such."""
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(60)\n")
    outcome = run_all.run_bench(Bench("hang", 0.5, 0.5, script), quick=True)
    assert outcome.report is None
    assert outcome.error == "still running after 0.5 s: stopped"
    assert outcome.seconds < 20


def test_a_reporting_script_gives_its_report(tmp_path: Path) -> None:
    """A benchmark's --json line on stdout becomes its outcome's report."""
    line = json.dumps(_report("bench_core", CORE).to_json())
    script = tmp_path / "ok.py"
    script.write_text(
        f"import sys\nassert sys.argv[1:] == ['--json', '--quick']\nprint({line!r})\n"
    )
    outcome = run_all.run_bench(Bench("bench_core", 30, 30, script), quick=True)
    assert outcome.report is not None
    assert outcome.report.targets == targets.core(CORE)


def test_late_turns_are_the_last_four_after_turn_five() -> None:
    """bench_conversation judges the last four turns with a first token, never the early ones."""
    from tests.bench.bench_conversation import Turn, summarise

    timed = {n: Turn(first=n / 1000, total=1.0) for n in range(2, 13)}
    timed[12] = Turn(first=None, total=120.0, error="RpcError: timed out")
    r = summarise(timed)
    assert r["late_turns"] == "8-11"
    assert r["late_p50_ms"] == pytest.approx(9.5)
    assert r["late_to_turn2"] == pytest.approx(9.5 / 2)
    assert r["turns"] == 12
    assert r["failed"] == {"12": "RpcError: timed out"}
