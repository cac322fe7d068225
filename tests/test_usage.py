"""`tale usage` and the performance monitor: the report equals the ledger, violations persist."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tale_client.rpc import RpcError
from taled.db.store import Store
from taled.reporting.monitor import Monitor, describe
from taled.reporting.usage import UsageReport, learning_curve, since_days
from taled.settings import ChatSettings, MetricsSettings, StoreSettings, UsageSettings
from tests.harness import LOCAL_ZONE, Daemon, Home, running_daemon

TOKENS = "SUM(prompt_tokens), SUM(completion_tokens), COUNT(*)"


def _rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def _sums(r: dict[str, Any]) -> tuple[int, int, int]:
    return (r["prompt_tokens"], r["completion_tokens"], r["calls"])


@pytest.fixture(scope="module")
def used() -> Iterator[tuple[Daemon, dict[str, Any]]]:
    """A daemon after one finished task and three chat turns, one answered from the store."""
    with running_daemon() as daemon:
        task_id = daemon.call("submit_task", text="Answer yes or no: is 2 > 1?")["id"]
        daemon.wait_for(task_id)
        first = daemon.call("chat", text="Hello, who are you?", new=True)
        conv = first["conversation"]
        daemon.call("chat", text="Name one colour.", conversation=conv)
        daemon.call("chat", text="what was my last request?", conversation=conv)
        yield daemon, {"task": task_id, "conversation": conv}


def test_usage_json_tokens_equal_the_ledger_sums(used: tuple[Daemon, dict[str, Any]]) -> None:
    """By model, role, day, task and conversation, `tale usage --json` equals the SQLite sums."""
    daemon, ids = used
    proc = daemon.home.tale("usage", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    db = daemon.home.data / "tale.db"
    [(prompt, completion, calls)] = _rows(db, f"SELECT {TOKENS} FROM model_calls")
    assert _sums(report["total"]) == (prompt, completion, calls)
    by_model = {
        f"{b}:{m}": (p, c, n)
        for b, m, p, c, n in _rows(
            db, f"SELECT backend, model, {TOKENS} FROM model_calls GROUP BY 1, 2"
        )
    }
    assert {f"{r['backend']}:{r['model']}": _sums(r) for r in report["by_model"]} == by_model
    by_role = {
        r: (p, c, n)
        for r, p, c, n in _rows(db, f"SELECT role, {TOKENS} FROM model_calls GROUP BY 1")
    }
    assert {r["role"]: _sums(r) for r in report["by_role"]} == by_role
    by_day = {
        d: (p, c, n)
        for d, p, c, n in _rows(
            db,
            f"SELECT date(at, 'unixepoch', 'localtime'), {TOKENS} FROM model_calls GROUP BY 1",
        )
    }
    assert {r["day"]: _sums(r) for r in report["by_day"]} == by_day
    [task_sums] = _rows(db, f"SELECT {TOKENS} FROM model_calls WHERE task_id = ?", ids["task"])
    task = next(r for r in report["by_task"] if r["id"] == ids["task"])
    assert _sums(task) == task_sums
    assert task["text"] == "Answer yes or no: is 2 > 1?"
    [conv_sums] = _rows(
        db, f"SELECT {TOKENS} FROM model_calls WHERE conversation_id = ?", ids["conversation"]
    )
    conv = next(r for r in report["by_conversation"] if r["id"] == ids["conversation"])
    assert _sums(conv) == conv_sums
    assert (conv["turns"], conv["answered_from_store"]) == (3, 1)


def test_usage_tool_keeps_the_ledger_totals_keys(used: tuple[Daemon, dict[str, Any]]) -> None:
    """The `usage` tool still answers total, by_model, by_role and by_route as before."""
    daemon, _ = used
    report = daemon.call("usage")
    for key in ("total", "by_model", "by_role", "by_route"):
        assert key in report
    assert {"calls", "prompt_tokens", "completion_tokens", "total_tokens", "failures"} <= set(
        report["total"]
    )
    assert sum(r["calls"] for r in report["by_route"]) == report["total"]["calls"]


def test_savings_count_the_turn_answered_from_the_store(
    used: tuple[Daemon, dict[str, Any]],
) -> None:
    """The store-answered turn is counted, and the naive-baseline figures are labelled estimates."""
    daemon, _ = used
    savings = daemon.call("usage")["savings"]
    assert savings["answered_from_store"]["turns"] == 1
    assert savings["answered_from_store"]["estimated_tokens"] > 0
    estimate = savings["estimate"]
    assert estimate["kind"] == "estimate"
    assert "naive" in estimate["method"].lower()
    assert estimate["chat_turns"] == 3
    naive = estimate["naive"]
    assert naive["total_tokens"] == (
        naive["task_tokens"] + naive["chat_prompt_tokens"] + naive["chat_completion_tokens"]
    )
    assert (
        estimate["saved"]["total_tokens"]
        == naive["total_tokens"] - estimate["tale"]["total_tokens"]
    )


def test_savings_compare_tale_with_one_fresh_call_per_task(
    used: tuple[Daemon, dict[str, Any]],
) -> None:
    """The stateless estimate's baseline is each top-level task's first direct answer, from
    the ledger; tale's side is every call of those tasks; what the extra bought is counted."""
    daemon, _ = used
    st = daemon.call("usage")["savings"]["stateless"]
    db = daemon.home.data / "tale.db"
    ((first,),) = _rows(
        db,
        "SELECT COALESCE(SUM(c.prompt_tokens + c.completion_tokens), 0) FROM model_calls c "
        "JOIN tasks t ON t.id = c.task_id WHERE t.parent_id IS NULL AND c.step = 'answer' "
        "AND c.attempt = 1",
    )
    assert st["kind"] == "estimate"
    assert st["direct"] >= 1
    assert st["stateless_tokens"] == first > 0
    assert st["tale_tokens"] >= st["stateless_tokens"]
    assert st["extra_tokens"] == st["tale_tokens"] - st["stateless_tokens"]
    assert st["first_passed"] + st["rescued"] <= st["direct"] <= st["tasks"]


def test_finished_task_appears_by_complexity_with_its_prediction(
    used: tuple[Daemon, dict[str, Any]],
) -> None:
    """The finished task's outcome puts it under its complexity and in the prediction error."""
    daemon, ids = used
    report = daemon.call("usage")
    db = daemon.home.data / "tale.db"
    outcomes = _rows(db, "SELECT level FROM task_outcomes WHERE task_id = ?", ids["task"])
    assert outcomes, "the learning engine records an outcome for every finished task"
    [(level,)] = outcomes
    row = next(r for r in report["by_complexity"] if r["complexity"] == level)
    assert row["tasks"] == 1
    assert report["prediction"]["outcomes"] == 1
    assert report["truncation"]["tasks"] == 1


def test_usage_for_one_day_covers_today(used: tuple[Daemon, dict[str, Any]]) -> None:
    """`--days 1` reports today's local date only, with the same totals as all history."""
    daemon, _ = used
    proc = daemon.home.tale("usage", "--json", "--days", "1", "--top", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["day"] for r in report["by_day"]] == [date.today().isoformat()]
    assert report["total"] == daemon.call("usage")["total"]
    assert len(report["by_task"]) <= 1 and len(report["by_conversation"]) <= 1


def test_a_period_starts_on_todays_local_date_east_of_greenwich() -> None:
    """`tale usage --days 1` in India says since today's date there: the period starts at
    local midnight, which is yesterday in UTC."""
    with running_daemon({"TZ": LOCAL_ZONE}) as daemon:  # the daemon and the CLI
        shown = daemon.home.tale("usage", "--days", "1")
    assert shown.returncode == 0, shown.stderr
    today = datetime.now(ZoneInfo(LOCAL_ZONE)).date()
    assert f"Usage over the last 1 day, since {today:%Y-%m-%d}:" in shown.stdout, shown.stdout


def test_usage_prints_tables_a_person_reads(used: tuple[Daemon, dict[str, Any]]) -> None:
    """Plain `tale usage` prints the sections: models, roles, days, tasks, savings, targets."""
    daemon, ids = used
    proc = daemon.home.tale("usage")
    assert proc.returncode == 0, proc.stderr
    for heading in ("By model", "By role", "By day", "Top tasks", "Savings", "Estimated"):
        assert heading in proc.stdout
    assert ids["task"] in proc.stdout


def test_usage_keeps_every_number_on_an_80_column_terminal(
    used: tuple[Daemon, dict[str, Any]],
) -> None:
    """On 80 columns the free text gives way, not the numbers: the top tasks' columns
    keep their headings and the task id prints whole."""
    daemon, ids = used
    daemon.home.env["COLUMNS"] = "80"
    try:
        proc = daemon.home.tale("usage")
    finally:
        del daemon.home.env["COLUMNS"]
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("Top tasks by tokens", 1)[1]
    heading = table.splitlines()[2].split()
    assert heading == ["task", "level", "tokens", "calls", "subtasks", "text"], table
    assert ids["task"] in table
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    # The budget's lines are long: wrapped, they stay under their heading's indent.
    budget = proc.stdout.split("Budget prediction\n", 1)[1].split("Savings", 1)[0]
    assert len(budget.splitlines()) > 3, budget  # some did wrap at 80
    assert all(line.startswith("  ") for line in budget.splitlines()), budget


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"days": 0}, "'days'"),
        ({"days": 3651}, "'days'"),
        ({"days": "7"}, "'days'"),
        ({"top": 101}, "'top'"),
        ({"top": 1.5}, "'top'"),
        ({"since": 3}, "unknown argument 'since'"),
    ],
)
def test_bad_usage_arguments_are_invalid_params(
    used: tuple[Daemon, dict[str, Any]], args: dict[str, Any], expected: str
) -> None:
    """Out-of-range or mistyped days/top, or an unknown argument, are -32602 naming it."""
    daemon, _ = used
    with pytest.raises(RpcError) as caught:
        daemon.call("usage", **args)
    assert caught.value.code == -32602
    assert expected in caught.value.message


@pytest.mark.parametrize("args", [("--days", "0"), ("--days", "4000"), ("--top", "0")])
def test_bad_usage_options_exit_2(
    used: tuple[Daemon, dict[str, Any]], args: tuple[str, ...]
) -> None:
    """`tale usage` with --days or --top out of range exits 2 and says the allowed range."""
    daemon, _ = used
    proc = daemon.home.tale("usage", *args)
    assert proc.returncode == 2
    assert "must be between" in proc.stderr
    assert proc.stdout == ""


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    days=st.one_of(
        st.integers(min_value=-10, max_value=4000),
        st.floats(allow_nan=False),
        st.booleans(),
        st.text(max_size=5),
        st.none(),
    )
)
def test_usage_accepts_exactly_whole_days_in_range(
    used: tuple[Daemon, dict[str, Any]], days: Any
) -> None:
    """`days` is accepted iff it is an integer (not a bool) in 1..3650; else -32602."""
    daemon, _ = used
    valid = days is None or (type(days) is int and 1 <= days <= 3650)
    args = {} if days is None else {"days": days}
    try:
        report = daemon.call("usage", **args)
    except RpcError as exc:
        assert not valid, exc.message
        assert exc.code == -32602
    else:
        assert valid, f"days={days!r} was accepted"
        assert report["days"] == days


def _violations(db: Path) -> list[tuple[Any, ...]]:
    return _rows(db, "SELECT seq, metric, value, target, context FROM violations ORDER BY seq")


def test_a_recorded_violation_is_shown_and_survives_a_restart(home: Home) -> None:
    """A get_task over a tiny status target is recorded, shown by metrics and usage, and kept."""
    home.env["TALE_METRICS__STATUS_MS"] = "0.0001"
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text="Say yes.")["id"]
        daemon.call("get_task", id=task_id)
        recorded = daemon.call("metrics")["recorded_violations"]
        status = [v for v in recorded if v["name"] == "status_ms"]
        assert status, recorded
        assert status[0]["target"] == 0.0001
        assert status[0]["details"]["tool"] == "get_task"
        counts = daemon.call("usage")["violations"]["counts"]
        assert any(c["name"] == "status_ms" and c["occurrences"] >= 1 for c in counts)
        assert daemon.stop() == 0
        before = _violations(home.data / "tale.db")
        assert any(m == "status_ms" for _, m, *_ in before)
        daemon = Daemon(home).start()
        after = daemon.call("metrics")["recorded_violations"]
        assert {v["seq"] for v in after if v["name"] == "status_ms"} >= {
            seq for seq, m, *_ in before if m == "status_ms"
        }
    finally:
        daemon.kill_if_running()


def test_status_violations_are_one_row_per_interval_counting_occurrences(home: Home) -> None:
    """Within the record interval, slow get_tasks add to one row's count instead of new rows."""
    home.env["TALE_METRICS__STATUS_MS"] = "0.0001"
    home.env["TALE_METRICS__RECORD_INTERVAL_SECONDS"] = "3600"
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text="Say yes.")["id"]
        with daemon.client() as conn:
            for _ in range(6):
                conn.call_tool("get_task", {"id": task_id})
            conn.call_tool("metrics")
            mid = conn.call_tool("metrics")["recorded_violations"]
        assert [v["name"] for v in mid].count("status_ms") == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()
    rows = [r for r in _violations(home.data / "tale.db") if r[1] == "status_ms"]
    # The first is recorded at once; the rest are counted and written at the latest on stop.
    assert len(rows) == 2
    assert sum(json.loads(r[4])["occurrences"] for r in rows) == 6


def test_a_violations_context_reads_as_a_person_would_say_it(local_zone: None) -> None:
    """ "get_task, once since 10:28:21 IST" (local time, as `tale usage` prints the rest),
    not "1 time(s) since 2026-...T04:58:21+00:00"."""
    since = "2026-12-06T04:58:21+00:00"
    one = {"tool": "get_task", "occurrences": 1, "since": since}
    assert describe("status_ms", one) == "get_task, once since 10:28:21 IST"
    six = {"tool": "get_task", "occurrences": 6, "since": since}
    assert describe("status_ms", six) == "get_task, 6 times since 10:28:21 IST"
    assert describe("status_ms", {"tool": "get_task"}) == "get_task, once"


def test_ready_over_its_target_is_recorded_at_start(home: Home) -> None:
    """A start slower than metrics.ready_seconds leaves a ready_seconds row naming the models."""
    home.env["TALE_METRICS__READY_SECONDS"] = "0.0001"
    daemon = Daemon(home).start()
    try:
        recorded = daemon.call("metrics")["recorded_violations"]
    finally:
        daemon.kill_if_running()
    [ready] = [v for v in recorded if v["name"] == "ready_seconds"]
    assert ready["value"] > 0.0001
    assert any(m.startswith("ux=") for m in ready["details"]["models"])


def test_slow_first_tokens_are_recorded_per_call_with_their_conversation(home: Home) -> None:
    """Every chat reply over the first-token target is one row naming its model and conversation."""
    home.env["TALE_METRICS__UX_FIRST_TOKEN_MS"] = "0.0001"
    daemon = Daemon(home).start()
    try:
        conv = daemon.call("chat", text="Say yes.", new=True)["conversation"]
        daemon.call("chat", text="Say no.", conversation=conv)
        recent = daemon.call("usage")["violations"]["recent"]
    finally:
        daemon.kill_if_running()
    slow = [v for v in recent if v["name"] == "ux_first_token_ms"]
    assert len(slow) == 2
    assert {v["details"]["conversation"] for v in slow} == {conv}
    assert all(v["details"]["model"].startswith("llamacpp:") for v in slow)


# -- the report's arithmetic over a real store -------------------------------------------


async def _report_over(path: Path, outcomes: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    """Write tasks with (at, predicted, actual, truncations) outcomes; return the report."""
    store = Store(path, StoreSettings(), 10)
    await store.open()
    monitor = Monitor(store, MetricsSettings())
    await monitor.start()

    async def write(conn: Any) -> None:
        for i, (at, predicted, actual, truncations) in enumerate(outcomes):
            task_id = f"{i:012x}"
            await conn.exec_driver_sql(
                "INSERT INTO tasks (id, text, state, priority, created_at, updated_at) "
                "VALUES (?, ?, 'completed', 50, ?, ?)",
                (task_id, f"task {i}", at, at),
            )
            await conn.exec_driver_sql(
                "INSERT INTO task_outcomes (task_id, at, text, features, predicted_level, "
                "confidence, level, predicted_tokens, completion_tokens, truncations, success, "
                "role) VALUES (?, ?, ?, '{}', 'simple', 0.9, ?, ?, ?, ?, 1, 'task')",
                (
                    task_id,
                    at,
                    f"task {i}",
                    "simple" if i % 2 else "medium",
                    predicted,
                    actual,
                    truncations,
                ),
            )

    try:
        await store.write(write)
        report = UsageReport(store, monitor, UsageSettings(curve_points=2), ChatSettings())
        return await report.report()
    finally:
        await monitor.stop()
        await store.close()


def test_prediction_error_is_the_mape_by_day_and_along_the_curve(tmp_path: Path) -> None:
    """MAPE per day and per curve point is mean(|predicted - actual| / actual) of its outcomes."""
    yesterday = since_days(2) + 3600
    today = time.time() - 1
    outcomes = [
        (yesterday, 200, 100, 1),  # 100 % off
        (yesterday + 1, 50, 100, 0),  # 50 %
        (today - 1, 110, 100, 0),  # 10 %
        (today, 90, 100, 0),  # 10 %
    ]
    report = asyncio.run(_report_over(tmp_path / "tale.db", outcomes))
    p = report["prediction"]
    assert (p["outcomes"], p["predicted"]) == (4, 4)
    assert p["mape_pct"] == 42.5
    assert [d["mape_pct"] for d in p["by_day"]] == [75.0, 10.0]
    assert [(c["outcomes"], c["mape_pct"]) for c in p["curve"]] == [(2, 75.0), (4, 10.0)]
    assert p["falling"] is True
    assert report["truncation"] == {
        "tasks": 4,
        "truncated": 1,
        "rate_pct": 25.0,
        "truncations": 1,
        "retries": 0,
    }


@given(
    actuals=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(1, 10_000)), min_size=1, max_size=60
    ),
    points=st.integers(1, 20),
)
def test_learning_curve_covers_every_outcome_once_in_order(
    actuals: list[tuple[int, int]], points: int
) -> None:
    """The curve has at most `points` points, covers every outcome once, MAPE is non-negative."""
    rows = [(1_700_000_000.0 + i, p, a) for i, (p, a) in enumerate(actuals)]
    curve = learning_curve(rows, points)
    assert 1 <= len(curve) <= points
    assert sum(c["count"] for c in curve) == len(rows)
    assert [c["outcomes"] for c in curve] == sorted({c["outcomes"] for c in curve})
    assert curve[-1]["outcomes"] == len(rows)
    assert all(c["mape_pct"] >= 0 for c in curve)
    if points == 1:
        expected = 100 * sum(abs(p - a) / a for _, p, a in rows) / len(rows)
        assert curve[0]["mape_pct"] == round(expected, 1)


@given(days=st.integers(1, 3650), today=st.dates(date(2001, 1, 1), date(2090, 1, 1)))
def test_a_longer_period_starts_a_local_day_earlier(days: int, today: date) -> None:
    """since_days(d + 1) is one local day (23..25 hours) before since_days(d), both midnights."""
    later, earlier = since_days(days, today), since_days(days + 1, today)
    assert 23 * 3600 <= later - earlier <= 25 * 3600
    start = time.localtime(later)
    assert (start.tm_hour, start.tm_min) == (0, 0)
    assert date(start.tm_year, start.tm_mon, start.tm_mday) == today - timedelta(days=days - 1)
