"""What the benchmarks must meet: each target, the value measured against it, the verdict.

Pure: no daemon, no model, no tale import. A benchmark measures raw numbers, builds its
``Report`` here (``core``, ``pool``, ``conversation``) and prints it with ``--json``;
``run_all.py`` reads the reports back and prints one table. A target whose numbers a
run did not produce (a part skipped by ``--quick``) has no row; one whose measure was
not valid (the task meant to keep the model busy had already finished) says so and is
``not measured``, neither met nor missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "RSS_LIMIT_MB",
    "Report",
    "Target",
    "Verdict",
    "at_least",
    "at_most",
    "conversation",
    "core",
    "holds",
    "ms",
    "pool",
]

RSS_LIMIT_MB = 500.0


class Verdict(StrEnum):
    MET = "met"
    MISSED = "MISSED"
    NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Target:
    """One target: ``key`` is stable (``bench.what``), ``name`` and ``goal`` are for people."""

    key: str
    name: str
    goal: str
    measured: str
    verdict: Verdict
    bench: str

    def to_json(self) -> dict[str, str]:
        return {
            "key": self.key,
            "name": self.name,
            "goal": self.goal,
            "measured": self.measured,
            "verdict": self.verdict.value,
            "bench": self.bench,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        return cls(
            key=str(data["key"]),
            name=str(data["name"]),
            goal=str(data["goal"]),
            measured=str(data["measured"]),
            verdict=Verdict(data["verdict"]),
            bench=str(data["bench"]),
        )


@dataclass(frozen=True)
class Report:
    """One benchmark run: its raw numbers, its targets, and what its mode left out."""

    bench: str
    quick: bool
    results: dict[str, Any]
    targets: list[Target]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "quick": self.quick,
            "notes": list(self.notes),
            "results": self.results,
            "targets": [t.to_json() for t in self.targets],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        return cls(
            bench=str(data["bench"]),
            quick=bool(data["quick"]),
            results=dict(data["results"]),
            targets=[Target.from_json(t) for t in data["targets"]],
            notes=[str(n) for n in data.get("notes", [])],
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def ms(value: float) -> str:
    """Milliseconds for a table: two decimals below 10 ms, whole ms above."""
    return f"{value:.2f} ms" if value < 10 else f"{value:,.0f} ms"


def _against(
    key: str,
    name: str,
    value: Any,
    bench: str,
    met: Callable[[float], bool],
    *,
    shown: str,
    goal: str,
) -> Target:
    """Met when ``met(value)``; not measured when ``value`` is missing or NaN."""
    number = _number(value)
    if number is None:
        return Target(key, name, goal, shown or "-", Verdict.NOT_MEASURED, bench)
    return Target(key, name, goal, shown, Verdict.MET if met(number) else Verdict.MISSED, bench)


def at_most(
    key: str,
    name: str,
    value: Any,
    limit: float,
    bench: str,
    *,
    shown: str,
    goal: str,
) -> Target:
    """Met when ``value`` <= ``limit``; not measured when ``value`` is missing or NaN."""
    return _against(key, name, value, bench, lambda n: n <= limit, shown=shown, goal=goal)


def at_least(
    key: str,
    name: str,
    value: Any,
    limit: float,
    bench: str,
    *,
    shown: str,
    goal: str,
) -> Target:
    """Met when ``value`` >= ``limit``; not measured when ``value`` is missing or NaN."""
    return _against(key, name, value, bench, lambda n: n >= limit, shown=shown, goal=goal)


def holds(key: str, name: str, ok: bool | None, bench: str, *, shown: str, goal: str) -> Target:
    """Met when ``ok``; not measured when it could not be told (None)."""
    if ok is None:
        return Target(key, name, goal, shown or "-", Verdict.NOT_MEASURED, bench)
    return Target(key, name, goal, shown, Verdict.MET if ok else Verdict.MISSED, bench)


def _invalid(target: Target, why: str) -> Target:
    """The same target, not judged: its measure did not measure what it says."""
    return Target(
        target.key,
        target.name,
        target.goal,
        f"{target.measured} ({why})",
        Verdict.NOT_MEASURED,
        target.bench,
    )


def _rss(key: str, where: str, r: Mapping[str, Any], field_: str, bench: str) -> Target:
    value = r[field_]
    return at_most(
        key,
        f"daemon RSS, both embedded models loaded, {where}",
        value,
        RSS_LIMIT_MB,
        bench,
        shown=f"{value:,.0f} MB" if _number(value) is not None else "-",
        goal=f"<= {RSS_LIMIT_MB:.0f} MB",
    )


def core(r: Mapping[str, Any]) -> list[Target]:
    """bench_core's targets (issue #2's, with issue #19's get_task while generating)."""
    b = "bench_core"
    out: list[Target] = []
    if "tale_list_p50_ms" in r:
        out.append(
            at_most(
                "core.tale_list_p50",
                "`tale list` wall time, p50 (daemon up)",
                r["tale_list_p50_ms"],
                150,
                b,
                shown=f"{ms(r['tale_list_p50_ms'])} (`python -c pass` "
                f"{ms(r['python_pass_p50_ms'])})",
                goal="<= 150 ms",
            )
        )
    if "pipelined_submits_per_s" in r:
        out.append(
            at_least(
                "core.submits_per_s",
                f"durable submits/s, {r['pipelined_clients']} pipelined clients",
                r["pipelined_submits_per_s"],
                1000,
                b,
                shown=f"{r['pipelined_submits_per_s']:,.0f}/s ({r['pipelined_total']:,} tasks)",
                goal=">= 1,000/s",
            )
        )
    if "get_task_p99_ms" in r:
        out.append(
            at_most(
                "core.get_task_idle_p99",
                "status (`get_task`) p99, runner idle",
                r["get_task_p99_ms"],
                5,
                b,
                shown=f"{ms(r['get_task_p99_ms'])} (p50 {ms(r['get_task_p50_ms'])})",
                goal="<= 5 ms",
            )
        )
    if "busy_get_task_p99_ms" in r:
        busy = at_most(
            "core.get_task_busy_p99",
            "`get_task` p99 while the task model generates",
            r["busy_get_task_p99_ms"],
            5,
            b,
            shown=f"{ms(r['busy_get_task_p99_ms'])} (p50 {ms(r['busy_get_task_p50_ms'])})",
            goal="<= 5 ms",
        )
        if r.get("busy_task_still_running") is False:
            busy = _invalid(busy, "the task had finished: not a busy measure")
        out.append(busy)
    if "ready_max_s" in r:
        out.append(
            at_most(
                "core.ready",
                f"spawn to READY=1, embedded models, slowest of {r.get('ready_runs', '?')}",
                r["ready_max_s"],
                3,
                b,
                shown=f"{r['ready_max_s']:.2f} s (p50 {r['ready_p50_s']:.2f} s)",
                goal="<= 3 s",
            )
        )
    if "rss_mb_after_workload" in r:
        out.append(_rss("core.rss", "after bench_core's submits", r, "rss_mb_after_workload", b))
    return out


def _interval(r: Mapping[str, Any]) -> str:
    """The overhead's bootstrap interval, where the run has one."""
    if "daemon_overhead_low_pct" not in r:
        return ""
    low, high = r["daemon_overhead_low_pct"], r["daemon_overhead_high_pct"]
    return f" [95 % interval {low:+.1f} to {high:+.1f} %, {r['overhead_pairs']:.0f} pairs]"


def pool(r: Mapping[str, Any]) -> list[Target]:
    """bench_pool's targets: replies while a task generates, overhead, ux_priority, RSS."""
    b = "bench_pool"
    out: list[Target] = []
    busy_valid = r.get("task_still_running_during_busy") is not False
    not_busy = "the task had finished: not a busy measure"
    if "busy_reply_p95_ms" in r:
        t = at_most(
            "pool.busy_reply_p95",
            "short chat reply end to end while a task generates, p95",
            r["busy_reply_p95_ms"],
            1000,
            b,
            shown=f"{ms(r['busy_reply_p95_ms'])} (p50 {ms(r['busy_reply_p50_ms'])})",
            goal="<= 1 s",
        )
        out.append(t if busy_valid else _invalid(t, not_busy))
    if "daemon_overhead_pct" in r:
        out.append(
            at_most(
                "pool.overhead",
                "daemon overhead on a chat reply vs llama-cpp-python direct "
                "(paired, median difference / median direct)",
                r["daemon_overhead_pct"],
                5,
                b,
                shown=f"{r['daemon_overhead_pct']:+.1f} %{_interval(r)} "
                f"({r['reply_via_socket_p50_s']:.3f} s vs {r['reply_direct_p50_s']:.3f} s "
                "direct, p50)",
                goal="<= 5 %",
            )
        )
    if "busy_reply_p50_ms" in r and "no_priority_busy_reply_p50_ms" in r:
        on, off = r["busy_reply_p50_ms"], r["no_priority_busy_reply_p50_ms"]
        change = (on - off) / off * 100 if off else float("nan")
        t = holds(
            "pool.ux_priority",
            "models.pool.ux_priority helps: short reply while a task generates, on vs off (p50)",
            on < off,
            b,
            shown=f"on {ms(on)} vs off {ms(off)} ({change:+.0f} %); p95 "
            f"{ms(r['busy_reply_p95_ms'])} vs {ms(r['no_priority_busy_reply_p95_ms'])}",
            goal="on < off",
        )
        both_busy = busy_valid and r.get("task_still_running_without_priority") is not False
        out.append(t if both_busy else _invalid(t, not_busy))
    if "rss_mb_both_roles" in r:
        out.append(_rss("pool.rss", "right after start", r, "rss_mb_both_roles", b))
    for part, label in (("idle", "idle"), ("busy", "while a task generates")):
        if f"{part}_first_p95_ms" in r:
            t = at_most(
                f"pool.{part}_first_p95",
                f"UX first token, {label}, p95",
                r[f"{part}_first_p95_ms"],
                250,
                b,
                shown=f"{ms(r[f'{part}_first_p95_ms'])} (p50 {ms(r[f'{part}_first_p50_ms'])})",
                goal="<= 250 ms",
            )
            out.append(t if part == "idle" or busy_valid else _invalid(t, not_busy))
    if "idle_reply_p95_ms" in r:
        out.append(
            at_most(
                "pool.idle_reply_p95",
                "short chat reply end to end, idle, p95",
                r["idle_reply_p95_ms"],
                1000,
                b,
                shown=f"{ms(r['idle_reply_p95_ms'])} (p50 {ms(r['idle_reply_p50_ms'])})",
                goal="<= 1 s",
            )
        )
    if "conversation_first_p95_ms" in r:
        out.append(
            at_most(
                "pool.conversation_first_p95",
                "UX first token, turns of one conversation 5 s apart, p95",
                r["conversation_first_p95_ms"],
                250,
                b,
                shown=f"{ms(r['conversation_first_p95_ms'])} "
                f"(p50 {ms(r['conversation_first_p50_ms'])})",
                goal="<= 250 ms",
            )
        )
    if "switch_load_p95_ms" in r:
        out.append(
            at_most(
                "pool.switch_load_p95",
                "model switch: loading an optional model on demand, p95",
                r["switch_load_p95_ms"],
                500,
                b,
                shown=f"{ms(r['switch_load_p95_ms'])} (p50 {ms(r['switch_load_p50_ms'])})",
                goal="< 500 ms",
            )
        )
    return out


# The first-token-in-a-long-conversation target: no slower late in the conversation
# than at its start, measured against turn 2 (turn 1 opens it and is not timed).
LATE_TO_TURN2_LIMIT = 1.5


def conversation(r: Mapping[str, Any]) -> list[Target]:
    """bench_conversation's targets: first token over a long conversation, and RSS after it."""
    b = "bench_conversation"
    out: list[Target] = []
    turns = r.get("turns", "?")
    if "first_p95_ms" in r:
        out.append(
            at_most(
                "conversation.first_p95",
                f"first token in a {turns}-turn conversation, p95 of turns 2-{turns}",
                r["first_p95_ms"],
                250,
                b,
                shown=f"{ms(r['first_p95_ms'])} (p50 {ms(r['first_p50_ms'])}, "
                f"{r.get('slow_turns', '?')} turns over 250 ms)",
                goal="<= 250 ms",
            )
        )
    if "late_to_turn2" in r:
        late = r.get("late_turns", "last 4")
        out.append(
            at_most(
                "conversation.late_to_turn2",
                f"first token late in the conversation (p50 of turns {late}) vs turn 2's",
                r["late_to_turn2"],
                LATE_TO_TURN2_LIMIT,
                b,
                shown=f"{r['late_to_turn2']:.2f}x ({ms(r['late_p50_ms'])} vs "
                f"{ms(r['turn2_first_ms'])})"
                if _number(r["late_to_turn2"]) is not None
                else "-",
                goal=f"<= {LATE_TO_TURN2_LIMIT}x",
            )
        )
    if "rss_mb_after" in r:
        out.append(
            _rss("conversation.rss", f"after the {turns}-turn conversation", r, "rss_mb_after", b)
        )
    return out
