"""``tale usage`` for a person: the daemon's usage report as rich tables.

Imported only by ``tale usage`` (rich tables are kept off the client's hot path).
``docs/usage.md`` explains every number.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from tale_client.human import clock, count, parse

__all__ = ["render"]

# Days listed in the by-day table; --json has them all.
DAYS_SHOWN = 14


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:g} %"


# The lines under a section's heading are indented this much, wrapped lines too.
_INDENT = 2


def _indented(line: str) -> Padding:
    """A line under a heading: on a narrow terminal it wraps under itself, not under
    the heading."""
    return Padding(Text(line), (0, 0, 0, _INDENT))


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, title_style="bold")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    return table


def _tokens_table(title: str, key: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = _table(title, key, "calls", "prompt", "completion", "total", "failed")
    for name, r in rows:
        table.add_row(
            name,
            _n(r["calls"]),
            _n(r["prompt_tokens"]),
            _n(r["completion_tokens"]),
            _n(r["total_tokens"]),
            _n(r["failures"]),
        )
    return table


def _add_free_text(table: Table, name: str) -> None:
    """A last column of free text (a task's, a title) that gives way on a narrow
    terminal: rich narrows a column that may wrap before any other, so the numbers keep
    their width; each cell is one line cut with an ellipsis (``_line``)."""
    table.add_column(name, justify="left", no_wrap=False)


def _line(text: str) -> Text:
    return Text(text, no_wrap=True, overflow="ellipsis")


def _period(report: dict[str, Any]) -> str:
    if report.get("days") is None:
        return "all history"
    # The period starts at a local midnight, sent in UTC: east of Greenwich that is the
    # day before's date, so the date is read back in local time.
    start = parse(report.get("since"))
    since = f"{start.astimezone():%Y-%m-%d}" if start else "-"
    return f"the last {count(report['days'], 'day', 'days')}, since {since}"


def render(report: dict[str, Any]) -> list[Any]:
    """The report's sections, in reading order."""
    out: list[Any] = []
    total = report["total"]
    out.append(
        Text.assemble(
            ("Usage over " + _period(report), "bold"),
            f": {_n(total['calls'])} model calls, {_n(total['total_tokens'])} tokens "
            f"({_n(total['prompt_tokens'])} prompt + {_n(total['completion_tokens'])} "
            f"completion), {_n(total['failures'])} failed",
        )
    )
    if total["calls"]:
        out.append(
            _tokens_table(
                "By model",
                "model",
                [(f"{r['backend']}:{r['model']}", r) for r in report["by_model"]],
            )
        )
        by_role = [(r["role"], r) for r in report["by_role"]]
        by_role += [
            (f"  {r['role']} via {r['route']}", r)
            for r in report.get("by_route", [])
            if r["route"] != "role"
        ]
        out.append(_tokens_table("By role", "role", by_role))
        days = report.get("by_day", [])
        title = "By day" + (f" (newest {DAYS_SHOWN})" if len(days) > DAYS_SHOWN else "")
        out.append(_tokens_table(title, "day", [(r["day"], r) for r in days[-DAYS_SHOWN:]]))
    out += _tasks(report)
    out += _conversations(report)
    out += _prediction(report)
    out += _savings(report["savings"])
    out += _violations(report["violations"])
    return out


def _tasks(report: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    levels = report.get("by_complexity", [])
    if levels:
        table = _table(
            "By complexity",
            "complexity",
            "tasks",
            "tokens",
            "per task",
            "succeeded",
            "as predicted",
        )
        for r in levels:
            table.add_row(
                r["complexity"],
                _n(r["tasks"]),
                _n(r["total_tokens"]),
                _n(r["tokens_per_task"]),
                _pct(r["success_pct"]),
                _pct(r["classified_right_pct"]),
            )
        out.append(table)
    tasks = report.get("by_task", [])
    if tasks:
        table = _table("Top tasks by tokens", "task", "level", "tokens", "calls", "subtasks")
        _add_free_text(table, "text")
        for r in tasks:
            table.add_row(
                r["id"],
                r["complexity"] or "-",
                _n(r["total_tokens"]),
                _n(r["calls"]),
                _n(r["subtasks"]),
                _line(r["text"]),
            )
        out.append(table)
    return out


def _conversations(report: dict[str, Any]) -> list[Any]:
    rows = report.get("by_conversation", [])
    if not rows:
        return []
    table = _table(
        "Top conversations by tokens",
        "conversation",
        "turns",
        "from store",
        "tokens",
        "summary saved",
    )
    _add_free_text(table, "title")
    for r in rows:
        table.add_row(
            r["id"],
            _n(r["turns"]),
            _n(r["answered_from_store"]),
            _n(r["total_tokens"]),
            _n(r["saved_tokens"]),
            _line(r["title"] or ""),
        )
    return [table]


def _prediction(report: dict[str, Any]) -> list[Any]:
    p, t = report["prediction"], report["truncation"]
    if not p["outcomes"]:
        return [Text("Budget prediction: no finished tasks with an outcome yet.")]
    curve = " → ".join(_pct(c["mape_pct"]) for c in p["curve"])
    trend = {True: ", falling", False: ", not falling", None: ""}[p["falling"]]
    lines: list[Any] = [
        Text("Budget prediction", style="bold"),
        _indented(
            f"error (MAPE) {_pct(p['mape_pct'])} over "
            f"{count(p['predicted'], 'predicted task', 'predicted tasks')} of "
            f"{_n(p['outcomes'])}; complexity as predicted for {_pct(p['classified_right_pct'])}"
        ),
    ]
    if curve:
        lines.append(_indented(f"learning curve, oldest to newest: {curve}{trend}"))
    lines.append(
        # Cuts at the learned budget (continued up to the ceiling), not at max_tokens.
        _indented(
            f"answers cut at their learned budget: {_n(t['truncated'])} of "
            f"{count(t['tasks'], 'task', 'tasks')} ({_pct(t['rate_pct'])}), "
            f"{count(t['truncations'], 'truncation', 'truncations')}, "
            f"{count(t['retries'], 'retry', 'retries')}"
        )
    )
    return lines


def _savings(s: dict[str, Any]) -> list[Any]:
    table = _table("Savings", "what", "count", "tokens")
    table.add_row(
        "history folded into summaries",
        _n(s["summaries"]["calls"]),
        _n(s["summaries"]["saved_prompt_tokens"]),
    )
    table.add_row(
        "chat turns answered from the store",
        _n(s["answered_from_store"]["turns"]),
        "~" + _n(s["answered_from_store"]["estimated_tokens"]),
    )
    table.add_row(
        "task calls run on the UX model",
        _n(s["routed_to_ux"]["calls"]),
        _n(s["routed_to_ux"]["task_model_tokens_saved"]),
    )
    if "loops_stopped" in s:  # an older daemon does not report it
        table.add_row(
            "answers stopped when they started repeating", _n(s["loops_stopped"]["calls"]), ""
        )
    e = s["estimate"]
    tale, naive, saved = e["tale"], e["naive"], e["saved"]
    ratio = f"{e['chars_per_token']:g} chars/token" + (
        "" if e["chars_per_token_measured"] else ", guessed"
    )
    out: list[Any] = [
        table,
        Text.assemble(
            ("Estimated", "bold"),
            " savings against a naive single-model design (an estimate, not a measurement; "
            f"{ratio}; method in --json and docs/usage.md):",
        ),
        _indented(
            f"task-model tokens {_n(tale['task_model_tokens'])} vs "
            f"{_n(naive['task_model_tokens'])} naive: {_n(saved['task_model_tokens'])} saved "
            f"({_pct(saved['task_model_pct'])})"
        ),
        _indented(
            f"all tokens        {_n(tale['total_tokens'])} vs {_n(naive['total_tokens'])} "
            f"naive: {_n(saved['total_tokens'])} saved ({_pct(saved['total_pct'])})"
        ),
    ]
    st = s.get("stateless")  # an older daemon does not report it
    if st and st["direct"]:
        per = st["extra_tokens_per_rescue"]
        out += [
            Text(""),
            Text.assemble(
                ("Against one fresh call per task", "bold"),
                f" (the honest baseline; an estimate): {_n(st['direct'])} tasks cost "
                f"{_n(st['tale_tokens'])} tokens vs {_n(st['stateless_tokens'])} for their "
                f"first answers alone ({st['ratio']}x). "
                f"{_n(st['first_passed'])} passed on that first answer; the extra "
                f"{_n(st['extra_tokens'])} tokens carried {_n(st['rescued'])} more"
                + (f" ({_n(per)} tokens each)." if per is not None else "."),
            ),
        ]
    return out


def _violations(v: dict[str, Any]) -> list[Any]:
    if not v["counts"]:
        return [Text("Performance targets: no recorded violations.")]
    table = _table("Recorded target violations", "metric", "times", "worst", "target", "last")
    for r in v["counts"]:
        table.add_row(
            r["name"],
            _n(r["occurrences"]),
            f"{r['worst']:g}",
            f"{r['target']:g}",
            clock(r["last_at"]),
        )
    recent = _table("Most recent violations", "at", "metric", "value")
    recent.add_column("context", justify="left")
    for r in v["recent"]:
        recent.add_row(clock(r["at"]), r["name"], f"{r['value']:g}", r["context"])
    return [table, recent]
