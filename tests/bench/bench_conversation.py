"""First token over one long conversation (issue #19), run on demand.

    python tests/bench/bench_conversation.py [--quick] [--json] [--turns N] [--gap S]

A real taled with chat's own settings (not the test suite's short replies: the history
must grow as a person's does), temperature 0 and seed 0, gets 30 varied messages in one
conversation, 5 s apart (a person reads the reply and types; a summary made ahead runs
meanwhile). Each turn's first token is the time from the request on the socket to the
first streamed piece; turn 1 opens the conversation and is not timed. Measures:

  - first token p50 / p95 over turns 2-30 (target: p95 <= 250 ms);
  - the last 4 turns' p50 against turn 2's (target: within 1.5x: no slower as the
    conversation grows and is folded into its summary);
  - the daemon's RSS after the conversation (target: <= 500 MB);
  - from the ledger: folds (step ``summary``), read-aheads (step ``prefill``) and the
    share of the replies' prompt tokens found in the model's cache.

``--quick`` talks the same 30 turns, 5 s apart (fewer turns made the late turns'
ratio a p50 of a 12-turn conversation, which moved between 0.93x and 1.84x over runs
of one build; shorter gaps would put more turns on a fold still being made, a
different measure), but starts none after 240 s of talk (a slow or shared machine
talks fewer, and the report says so). ``--json`` prints one
line, its ``targets.Report`` (raw numbers and verdicts), which run_all.py reads;
``report()`` returns the same in process.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil

from tale_client.rpc import Connection
from tests.bench import targets
from tests.bench.bench_core import machine, pct
from tests.harness import TEST_SETTINGS, Daemon, Home

__all__ = ["MESSAGES", "Turn", "measure", "report", "summarise", "talk", "turn"]

MESSAGES: tuple[str, ...] = (
    "Hi! I'm planning a trip to Lisbon next month.",
    "What should I pack for the weather there?",
    "Any tips for getting around the city?",
    "How do the trams work?",
    "Is it expensive to eat out?",
    "What's a typical Portuguese breakfast?",
    "Thanks. What about day trips nearby?",
    "Tell me about Sintra.",
    "How long does the train to Sintra take?",
    "Should I book tickets ahead?",
    "What's the best time of day to visit?",
    "Okay. Now something else: what is a good name for a cat?",
    "Why do cats purr?",
    "Do they purr when stressed too?",
    "Interesting. How many hours a day do cats sleep?",
    "Back to Lisbon: what neighbourhood should I stay in?",
    "Is Alfama noisy at night?",
    "What about Principe Real?",
    "How far is it from the airport?",
    "Do taxis take cards?",
    "What's a pastel de nata?",
    "Where are the best ones?",
    "Can you summarise my plans so far?",
    "What was the first thing I told you?",
    "How do I say thank you in Portuguese?",
    "And good morning?",
    "Is tipping expected?",
    "How much?",
    "Great. Any museums you recommend?",
    "Thanks, that's all for now.",
)
TURNS = len(MESSAGES)
QUICK_TURNS = TURNS
GAP_SECONDS = 5.0
LATE_TURNS = 4
FIRST_TOKEN_LIMIT_MS = 250.0
# --quick starts no turn after this much talk, to stay within run_all's budget.
QUICK_DEADLINE_SECONDS = 240.0
# A 256-token reply on a shared machine may take longer than the client's usual 30 s.
CALL_TIMEOUT_SECONDS = 120.0

# Chat's own settings but greedy and seeded, so two runs say the same things; a short
# shutdown grace only so that the benchmark's teardown is quick.
ENV = {
    "TALE_CHAT__TEMPERATURE": "0",
    "TALE_MODELS__LLAMACPP__SEED": "0",
    "TALE_DAEMON__LOG_LEVEL": "warning",
    "TALE_DAEMON__SHUTDOWN_GRACE_SECONDS": "5",
}


def _home() -> Home:
    """A home without the test suite's settings (short replies, no planning, no loop guard)."""
    home = Home(ENV)
    for key in TEST_SETTINGS:
        if key not in ENV:
            home.env.pop(key, None)
    return home


@dataclass(frozen=True)
class Turn:
    """One timed turn: seconds to the first streamed piece (None if none came), the
    full reply's seconds, and the error it ended with, if any."""

    first: float | None
    total: float
    error: str | None = None


def turn(daemon: Daemon, arguments: dict[str, Any]) -> tuple[Turn, dict[str, Any] | None]:
    """One ``chat`` call over its own connection, streamed, as bench_pool's
    ``first_token_and_total`` times it; a failure after the first piece keeps its time."""
    first: list[float] = []
    result: dict[str, Any] | None = None
    error: str | None = None
    start = time.perf_counter()

    def on_piece(_piece: str) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    try:
        with Connection(daemon.home.socket, timeout=CALL_TIMEOUT_SECONDS) as conn:
            conn.initialize("bench")
            start = time.perf_counter()
            result = conn.call_tool("chat", arguments, on_progress=on_piece)
    except Exception as exc:  # noqa: BLE001 - a failed turn is reported, not fatal
        error = f"{type(exc).__name__}: {exc}"
    total = time.perf_counter() - start
    return Turn(first[0] if first else (None if error else total), total, error), result


def talk(
    daemon: Daemon, turns: int, gap: float, deadline: float | None = None
) -> tuple[str, dict[int, Turn]]:
    """The conversation: its id and each timed turn (turn 1 opens it, untimed). No turn
    starts after ``deadline`` seconds of talk: a slow machine talks fewer turns."""
    began = time.monotonic()
    opened, result = turn(daemon, {"text": MESSAGES[0], "new": True})
    if result is None:
        raise RuntimeError(f"turn 1 failed: {opened.error}")
    conversation: str = result["conversation"]
    timed: dict[int, Turn] = {}
    for n in range(2, turns + 1):
        if deadline is not None and time.monotonic() - began + gap > deadline:
            break
        time.sleep(gap)
        timed[n], _ = turn(daemon, {"text": MESSAGES[n - 1], "conversation": conversation})
    return conversation, timed


def ledger(home: Home, conversation: str) -> dict[str, Any]:
    """Folds, read-aheads and the replies' cached prompt tokens, from the daemon's ledger."""
    with sqlite3.connect(home.data / "tale.db") as db:
        steps = dict(
            db.execute(
                "SELECT coalesce(step, 'reply'), count(*) FROM model_calls"
                " WHERE conversation_id = ? GROUP BY 1",
                (conversation,),
            ).fetchall()
        )
        prompt, cached = db.execute(
            "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(cached_tokens), 0)"
            " FROM model_calls WHERE conversation_id = ? AND step IS NULL",
            (conversation,),
        ).fetchone()
    return {
        "folds": steps.get("summary", 0),
        "read_aheads": steps.get("prefill", 0),
        "replies_in_ledger": steps.get("reply", 0),
        "reply_prompt_tokens": prompt,
        "reply_cached_share": cached / prompt if prompt else float("nan"),
    }


def summarise(timed: dict[int, Turn]) -> dict[str, Any]:
    """The numbers the targets judge, from each timed turn: the late turns are the last
    ``LATE_TURNS`` with a first token, after turn 5 (so never turn 2 itself)."""
    firsts = {n: t.first * 1000 for n, t in timed.items() if t.first is not None}
    values = list(firsts.values())
    late = [n for n in sorted(firsts) if n > 5][-LATE_TURNS:]
    late_p50 = statistics.median(firsts[t] for t in late) if late else float("nan")
    turn2 = firsts.get(2, float("nan"))
    return {
        "turns": max(timed, default=1),
        "timed_turns": len(values),
        "first_p50_ms": pct(values, 50) if values else float("nan"),
        "first_p95_ms": pct(values, 95) if values else float("nan"),
        "slow_turns": sum(v > FIRST_TOKEN_LIMIT_MS for v in values),
        "turn2_first_ms": turn2,
        "late_turns": f"{late[0]}-{late[-1]}" if late else "-",
        "late_p50_ms": late_p50,
        "late_to_turn2": late_p50 / turn2 if turn2 > 0 else float("nan"),
        "reply_p50_s": statistics.median(t.total for t in timed.values()) if timed else 0.0,
        "failed": {str(n): t.error for n, t in timed.items() if t.error},
        "per_turn_first_ms": {str(n): round(v, 1) for n, v in firsts.items()},
    }


def _failures(failed: dict[str, str]) -> list[str]:
    """One note per distinct error: which turns ended with it."""
    by_error: dict[str, list[str]] = {}
    for n, error in failed.items():
        by_error.setdefault(error, []).append(n)
    return [
        f"{'turns' if len(ns) > 1 else 'turn'} {', '.join(ns)} failed: {error}"
        for error, ns in by_error.items()
    ]


def measure(
    turns: int = TURNS, gap: float = GAP_SECONDS, deadline: float | None = None
) -> dict[str, Any]:
    """Talk ``turns`` turns ``gap`` seconds apart to a fresh daemon (none started after
    ``deadline`` seconds); every number, raw."""
    home = _home()
    daemon = Daemon(home)
    try:
        daemon.start()
        assert daemon.proc is not None
        conversation, timed = talk(daemon, turns, gap, deadline)
        rss_mb = psutil.Process(daemon.proc.pid).memory_info().rss / 2**20
        daemon.stop()
        from_ledger = ledger(home, conversation)
    finally:
        daemon.kill_if_running()
        home.cleanup()
    return {
        **summarise(timed),
        "turns_planned": turns,
        "gap_s": gap,
        "rss_mb_after": rss_mb,
        **from_ledger,
    }


def report(quick: bool, turns: int | None = None, gap: float | None = None) -> targets.Report:
    """This benchmark's run: raw numbers and verdicts (``--json`` prints its JSON form)."""
    turns = turns or (QUICK_TURNS if quick else TURNS)
    gap = GAP_SECONDS if gap is None else gap
    notes = []
    if turns != TURNS or gap != GAP_SECONDS:
        notes.append(
            f"{'--quick: ' if quick else ''}{turns} of {TURNS} turns, {gap:g} s apart "
            f"(the target is for {TURNS} turns, {GAP_SECONDS:g} s apart)"
        )
    deadline = QUICK_DEADLINE_SECONDS if quick else None
    r = measure(turns, gap, deadline)
    if r["turns"] < turns:
        notes.append(
            f"stopped after turn {r['turns']} of {turns}: the {deadline:g} s of talk "
            "--quick allows (a slow or shared machine)"
        )
    notes += _failures(r["failed"])
    return targets.Report("bench_conversation", quick, r, targets.conversation(r), notes)


def _print_markdown(rep: targets.Report) -> None:
    r = rep.results
    print(
        f"### First token over one conversation, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{machine()}\n"
    )
    print("| what | measured | target | verdict |")
    print("| --- | --- | --- | --- |")
    for t in rep.targets:
        print(f"| {t.name} | {t.measured} | {t.goal} | {t.verdict} |")
    print(
        f"\nturns 2-{r['turns']}, {r['gap_s']:g} s apart; folds {r['folds']}, read-aheads "
        f"{r['read_aheads']}, replies' prompt tokens found cached "
        f"{r['reply_cached_share']:.0%}"
    )
    for note in rep.notes:
        print(note)
    print("\n```json")
    print(json.dumps(r, indent=1, default=str))
    print("```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TURNS} turns")
    parser.add_argument(
        "--json", action="store_true", help="print one line: raw numbers and verdicts"
    )
    parser.add_argument("--turns", type=int, help=f"turns (at most {TURNS})")
    parser.add_argument("--gap", type=float, help=f"seconds between turns ({GAP_SECONDS:g})")
    args = parser.parse_args()
    if args.turns is not None and not 2 <= args.turns <= TURNS:
        parser.error(f"--turns must be between 2 and {TURNS}")
    rep = report(args.quick, args.turns, args.gap)
    if args.json:
        print(json.dumps(rep.to_json()))
    else:
        _print_markdown(rep)


if __name__ == "__main__":
    main()
