"""Crash resume under fault injection: kill -9 the daemon at random moments, many times.

Every task must complete, and no step whose checkpoint was committed may run
again: each checkpoint records (precisely) when a step was taken, and no ledger
call for that step may have started after that moment. tests/faults.py runs the
campaign; tests/bench/bench_resume.py runs it with more kills.
"""

from __future__ import annotations

from tests.faults import run_campaign

KILLS = 20
SEED = 20261123


def test_kill_9_at_random_moments_loses_nothing_and_never_reruns_a_checkpointed_step() -> None:
    """20 seeded kill -9s mid-work: all tasks complete; no checkpointed step runs twice."""
    audit = run_campaign(KILLS, SEED)
    assert audit.kills == KILLS
    assert set(audit.states) == {"completed"}, audit.states
    assert audit.result_mismatches == []
    assert audit.reruns == [], f"checkpointed steps ran again: {audit.reruns}"
    # The kills really landed mid-work: tasks were interrupted and resumed many times.
    assert audit.steps_checked >= sum(audit.states.values())
    assert audit.interrupted >= KILLS // 2, audit.interrupted
    assert audit.fsck_ok
