"""The TUI's reading of the daemon's answers: lenient parsing and the numbers it derives."""

from __future__ import annotations

from tale_client.tui.api import Decision, Verdict
from tale_client.tui.model import (
    Approval,
    ApprovalKind,
    ChatReply,
    Metrics,
    Task,
    TaskDiff,
    Usage,
    UsageRow,
    board_column,
)
from tale_client.tui.screens.dashboard import LedgerRates


def test_a_chat_reply_from_a_daemon_without_conversations_parses_with_defaults() -> None:
    """The plain `chat` result (text, finish_reason, tokens): no conversation, intent or task."""
    reply = ChatReply.from_dict(
        {"text": "hi", "finish_reason": "stop", "tokens": {"prompt": 3, "completion": 2}}
    )
    assert (reply.text, reply.conversation, reply.intent, reply.task) == ("hi", None, None, None)
    assert reply.completion_tokens == 2


def test_a_handed_off_chat_reply_names_its_task() -> None:
    """A reply whose message became a task names it; fields the TUI does not know are ignored."""
    reply = ChatReply.from_dict(
        {
            "text": "queued",
            "conversation": "c0c0c0c0c0c0",
            "intent": {"kind": "task", "confidence": 0.9, "action": None, "signals": ["verb"]},
            "task": {"id": "3fa9c01b22de", "state": "queued", "text": "do it"},
            "handed_off": True,
        }
    )
    assert reply.task is not None and reply.task.id == "3fa9c01b22de"
    assert reply.intent is not None and reply.intent.kind == "task"


def test_cancelled_tasks_share_the_failed_column() -> None:
    """Every state has a board column; completed is "done", cancelled sits with failed."""
    assert [board_column(s) for s in ("queued", "running", "completed", "cancelled")] == [
        "queued",
        "running",
        "done",
        "failed",
    ]


def test_a_task_reads_its_progress_and_subtasks() -> None:
    """get_task's progress and nested subtasks become objects; a card shows "step i/n · tok"."""
    task = Task.from_dict(
        {
            "id": "a" * 12,
            "state": "running",
            "priority": 50,
            "text": "t",
            "progress": {"step": 0, "steps": 2, "doing": "x", "tokens": 7},
            "subtasks": [{"id": "b" * 12, "state": "queued", "priority": 50, "text": "s"}],
        }
    )
    assert task.progress is not None and task.progress.short() == "step 1/2 · 7 tok"
    assert [s.id for s in task.subtasks] == ["b" * 12]


def test_metrics_minutes_fill_quiet_minutes_with_zero() -> None:
    """Tokens per minute cover the whole window, oldest first, 0 where nothing ran."""
    metrics = Metrics.from_dict(
        {
            "at": "2026-01-05T09:04:30+00:00",
            "window_minutes": 5,
            "tokens_per_minute": [
                {"minute": "2026-01-05T09:01:00+00:00", "model": "m", "role": "ux", "tokens": 5},
                {"minute": "2026-01-05T09:04:00+00:00", "model": "m", "role": "ux", "tokens": 3},
                {"minute": "2026-01-05T09:04:00+00:00", "model": "n", "role": "task", "tokens": 4},
            ],
        }
    )
    assert metrics.minutes() == [0, 5, 0, 0, 7]
    assert metrics.by_model() == [("m", "ux", 3, 8), ("n", "task", 4, 4)]


def test_ledger_rates_are_tokens_per_minute_between_samples() -> None:
    """Without metrics, two ledger totals 30 s apart give each model's rate per minute."""
    rates = LedgerRates()
    rates.add(Usage(by_model=(UsageRow("m", 1, 100),)), at=0.0)
    rates.add(Usage(by_model=(UsageRow("m", 2, 160),)), at=30.0)
    assert rates.per_minute() == {"m": 120.0}
    assert list(rates.per_tick) == [60.0]


def _approval(**fields: object) -> Approval:
    return Approval.from_dict(
        {
            "id": "7c1e2a9b3d4f",
            "task_id": "5eed5eed5eed",
            "kind": "tool",
            "tool": "run",
            "summary": "run: echo hi",
            **fields,
        }
    )


def test_an_acting_task_reads_its_tool_calls_and_pending_approvals() -> None:
    """get_task's act, workspace, tool_calls and approvals become objects; a task from an
    older daemon has none of them."""
    task = Task.from_dict(
        {
            "id": "5eed5eed5eed",
            "state": "waiting",
            "act": True,
            "workspace": None,
            "tool_calls": [
                {"call_id": "r0t1c1", "tool": "write_file", "outcome": "ok", "duration_ms": 2.5},
                {"call_id": "r0t2c1", "tool": "run", "outcome": "error", "detail": "exit 1"},
            ],
            "approvals": [
                {"id": "7c1e2a9b3d4f", "task_id": "5eed5eed5eed", "kind": "question"},
            ],
        }
    )
    assert task.act and task.workspace is None
    assert [(c.tool, c.outcome, c.took()) for c in task.tool_calls] == [
        ("write_file", "ok", "2 ms"),
        ("run", "error", "-"),
    ]
    assert [a.kind for a in task.approvals] == [ApprovalKind.QUESTION]
    old = Task.from_dict({"id": "a" * 12, "state": "completed"})
    assert (old.act, old.tool_calls, old.approvals) == (False, (), ())


def test_an_approval_of_an_unknown_kind_is_a_yes_or_no_with_its_arguments_made_safe() -> None:
    """A kind this TUI does not know is treated as a tool call; escape sequences a model put
    in the arguments are dropped."""
    approval = _approval(kind="something-new", arguments={"command": "echo \x1b[2Jhi"})
    assert approval.kind is ApprovalKind.TOOL and not approval.is_question
    assert approval.arguments == {"command": "echo hi"}
    assert approval.short_id == "7c1e2a9b"


def test_a_decision_becomes_the_arguments_of_its_tool() -> None:
    """approve and deny carry always (and deny its reason) only when given; answer its text."""
    tool, question = _approval(), _approval(kind="question")
    assert Decision(tool, Verdict.APPROVE).arguments() == {"id": tool.id}
    assert Decision(tool, Verdict.APPROVE, always=True).arguments() == {
        "id": tool.id,
        "always": True,
    }
    assert Decision(tool, Verdict.DENY, text="not now").arguments() == {
        "id": tool.id,
        "reason": "not now",
    }
    assert Decision(question, Verdict.ANSWER, text="Celsius").arguments() == {
        "id": question.id,
        "text": "Celsius",
    }


def test_a_diff_keeps_its_layout_but_not_escape_sequences() -> None:
    """task_diff's text keeps newlines and tabs; terminal escapes in file contents go."""
    diff = TaskDiff.from_dict({"task_id": "t", "state": "completed", "diff": "+a\tb\x1b[31m\n"})
    assert diff.diff == "+a\tb\n"
