"""The savings benchmark's short mode, so it cannot rot (issue #6).

The full run (``python tests/bench/bench_savings.py``) is measured on a quiet machine
and its numbers go to docs/benchmarks.md; here a few workload items are replayed
through both designs with short answers, and the report is checked for shape and
consistency, not for the 60 % target.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from taled.tasks.gates.gates import parse_criteria

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "bench" / "bench_savings.py"
WORKLOAD = ROOT / "tests" / "data" / "workload.json"
SHORT = 6


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench_savings")
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--short",
            str(SHORT),
            "--out",
            str(out),
            "--max-tokens",
            "32",
            "--chat-max-tokens",
            "32",
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    data["_stdout"] = run.stdout
    data["_out"] = str(out)
    return data


def _items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(WORKLOAD.read_text())["items"]
    return items


def test_workload_is_large_varied_and_checkable() -> None:
    """The workload has 200+ items: tasks and chat turns, every criterion in a gate form."""
    items = _items()
    assert len(items) >= 200
    assert len({i["id"] for i in items}) == len(items)
    kinds = [i["kind"] for i in items]
    assert kinds.count("task") >= 120 and kinds.count("chat") >= 60
    assert {i["level"] for i in items} == {"simple", "medium", "complex"}
    assert len({i["conversation"] for i in items if i["kind"] == "chat"}) >= 4
    for item in items:
        parse_criteria(item.get("criteria", []))


def test_short_run_counts_tokens_for_both_designs(report: dict[str, Any]) -> None:
    """Both runs answered every item and spent tokens; the naive one only on the task model."""
    assert report["items"] == SHORT
    assert report["tale"]["total_tokens"] > 0
    assert report["naive"]["total_tokens"] > 0
    assert set(report["naive"]["tokens"]["by_role"]) == {"task"}
    assert report["naive"]["task_model_tokens"] == report["naive"]["total_tokens"]
    for run in ("tale", "naive"):
        assert [r["id"] for r in report[run]["items_detail"]] == [i["id"] for i in _items()[:SHORT]]


def test_short_run_pass_rates_are_rates(report: dict[str, Any]) -> None:
    """Gate pass rates are fractions of the items that carry criteria, for both runs."""
    gated = sum(1 for i in _items()[:SHORT] if i.get("criteria"))
    for run in ("tale", "naive"):
        r = report[run]
        assert r["gate_judged"] == gated
        assert 0 <= r["gate_passed"] <= gated
        assert 0.0 <= r["pass_rate"] <= 1.0


def test_short_run_report_matches_tale_ledger(report: dict[str, Any]) -> None:
    """Tale's reported tokens are the sums of the ledger the daemon wrote."""
    with sqlite3.connect(report["tale"]["db"]) as conn:
        rows = conn.execute(
            "SELECT role, SUM(prompt_tokens + completion_tokens) FROM model_calls GROUP BY role"
        ).fetchall()
        (for_chat,) = conn.execute(
            "SELECT coalesce(SUM(prompt_tokens + completion_tokens), 0) FROM model_calls"
            " WHERE role = 'task' AND conversation_id IS NOT NULL AND task_id IS NULL"
        ).fetchone()
    conn.close()
    by_role = {role: total for role, total in rows}
    tokens = report["tale"]["tokens"]
    assert {k: v["total"] for k, v in tokens["by_role"].items()} == by_role
    assert report["tale"]["total_tokens"] == sum(by_role.values())
    # The task model's work for conversations (chat's summaries) is not task work.
    assert report["tale"]["task_model_tokens"] == by_role.get("task", 0) - for_chat
    assert sum(r["tokens"] for r in report["tale"]["items_detail"]) == sum(by_role.values())


def test_short_run_savings_and_verdicts_follow_the_numbers(report: dict[str, Any]) -> None:
    """Savings follow from the two runs' tokens; each verdict is met, MISSED or not measured."""
    saved = report["savings"]["task_tokens_pct"]
    expected = (
        1 - report["tale"]["task_model_tokens"] / report["naive"]["task_model_tokens"]
    ) * 100
    assert saved == pytest.approx(expected)
    assert set(report["verdicts"].values()) <= {"met", "MISSED", "not measured"}
    mape = report["mape"]
    assert mape["points"] or mape["note"]
    for point in mape["points"]:
        assert point["mape"] >= 0


def test_short_run_prints_a_table_and_a_plot(report: dict[str, Any]) -> None:
    """The run prints a Markdown table and writes the two-panel PNG into its output dir."""
    assert "| task-model tokens |" in report["_stdout"]
    png = Path(report["_out"]) / "savings.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_run_has_the_stateless_baselines(report: dict[str, Any]) -> None:
    """The stateless baselines answered every item; their task tokens are the task items'
    own, and the right-sized limit is one the user could pick, no higher than the full."""
    base = report["baselines"]
    stateless, sized = base["stateless"], base["right_sized"]
    gated = sum(1 for i in _items()[:SHORT] if i.get("criteria"))
    for run in (stateless, sized):
        assert run["judged"] == gated
        assert 0 <= run["passed"] <= gated
        assert run["total_tokens"] >= run["task_model_tokens"] > 0
    assert sized["max_tokens"] <= stateless["max_tokens"] == 32
    assert sized["task_model_tokens"] <= stateless["task_model_tokens"]
    assert "stateless single calls" in report["_stdout"]


def test_short_run_breakdown_accounts_for_every_ledger_token(report: dict[str, Any]) -> None:
    """Tokens by step kind add up to the ledger's total: none uncounted, none twice."""
    with sqlite3.connect(report["tale"]["db"]) as conn:
        (total,) = conn.execute(
            "SELECT SUM(prompt_tokens + completion_tokens) FROM model_calls"
        ).fetchone()
    conn.close()
    kinds = report["baselines"]["happy_path"][0]["by_kind"]
    assert sum(k["total"] for k in kinds.values()) == total
    assert sum(k["calls"] for k in kinds.values()) == report["tale"]["tokens"]["total"]["calls"]


def test_short_run_compares_tale_with_the_stateless_baseline(report: dict[str, Any]) -> None:
    """The token ratio is tale's task-model tokens over the stateless run's, and the goal
    and happy-path verdicts are met or MISSED."""
    base = report["baselines"]
    (run,) = base["runs"]
    ratio = run["task_model_tokens"] / base["stateless"]["task_model_tokens"]
    assert base["token_ratio"]["median"] == pytest.approx(ratio)
    assert set(base["verdicts"].values()) <= {"met", "MISSED"}
    assert run["task_model_tokens"] == report["tale"]["task_model_tokens"]
