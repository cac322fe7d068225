"""Snapshots of the TUI's layouts, rendered from fixed data with no daemon.

The app is built with ``live=False``: no connection, no timers, nothing but the
data each test hands the screens, so every run draws the same picture. Times
are shown in local time, so the tests pin the zone to UTC.

Update after an intended change of layout with::

    pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import TabbedContent

from tale_client.tui.app import TaleApp, build_app
from tale_client.tui.model import (
    Approval,
    ChatReply,
    Checkpoint,
    Conversation,
    ConversationInfo,
    DaemonStatus,
    Metrics,
    ModelInfo,
    Task,
    TaskDiff,
)
from tale_client.tui.screens import ApprovalScreen, TaskScreen
from tests.harness import in_zone

SIZE = (140, 40)
SOCKET = Path("/run/user/1000/tale/taled.sock")

SnapCompare = Callable[..., bool]


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Local time is UTC while a snapshot renders."""
    with in_zone("UTC"):
        yield


def _transitions(*steps: tuple[str | None, str, str, str]) -> list[dict[str, Any]]:
    return [{"from": a, "to": b, "at": at, "reason": why} for a, b, at, why in steps]


TASKS = [
    Task.from_dict(d)
    for d in [
        {
            "id": "3fa9c01b22de",
            "state": "running",
            "priority": 70,
            "text": "Write a Python function that parses ISO dates, with tests",
            "created_at": "2026-01-05T09:00:00.000Z",
            "updated_at": "2026-01-05T09:00:01.000Z",
            "progress": {"step": 1, "steps": 3, "doing": "writing tests", "tokens": 212},
        },
        {
            "id": "a1b2c3d4e5f6",
            "state": "queued",
            "priority": 50,
            "text": "Summarise the release notes",
            "created_at": "2026-01-05T09:01:00.000Z",
            "updated_at": "2026-01-05T09:01:00.000Z",
        },
        {
            "id": "0badc0ffee00",
            "state": "queued",
            "priority": 80,
            "text": "Fix the failing build",
            "created_at": "2026-01-05T09:02:00.000Z",
            "updated_at": "2026-01-05T09:02:00.000Z",
        },
        {
            "id": "5eed5eed5eed",
            "state": "waiting",
            "priority": 50,
            "text": "Build a CLI for the weather API",
            "created_at": "2026-01-05T08:50:00.000Z",
            "updated_at": "2026-01-05T08:51:00.000Z",
        },
        {
            "id": "feedfacecafe",
            "state": "paused",
            "priority": 40,
            "text": "Translate the README to French",
            "created_at": "2026-01-05T08:40:00.000Z",
            "updated_at": "2026-01-05T08:45:00.000Z",
        },
        {
            "id": "c0ffee123456",
            "state": "completed",
            "priority": 50,
            "text": "Write hello world in Python",
            "created_at": "2026-01-05T08:30:00.000Z",
            "updated_at": "2026-01-05T08:30:03.200Z",
            "tokens": {"prompt": 64, "completion": 48},
        },
        {
            "id": "dead00beef00",
            "state": "failed",
            "priority": 50,
            "text": "Prove P = NP",
            "created_at": "2026-01-05T08:20:00.000Z",
            "updated_at": "2026-01-05T08:21:00.000Z",
        },
        {
            "id": "abcabcabcabc",
            "state": "cancelled",
            "priority": 50,
            "text": "Write a very long story about a dragon",
            "created_at": "2026-01-05T08:10:00.000Z",
            "updated_at": "2026-01-05T08:12:00.000Z",
        },
    ]
]

DONE_TASK = Task.from_dict(
    {
        "id": "3fa9c01b22de",
        "state": "completed",
        "priority": 70,
        "text": "Write a Python function that parses ISO dates, with tests",
        "result": "```python\ndef parse(s: str) -> date:\n    return date.fromisoformat(s)\n```\n\n"
        "Tests pass: `parse('2026-01-05')` is January 5th.",
        "created_at": "2026-01-05T09:00:00.000Z",
        "updated_at": "2026-01-05T09:00:42.500Z",
        "tokens": {"prompt": 812, "completion": 430},
        "attempts": 1,
        "transitions": _transitions(
            (None, "queued", "2026-01-05T09:00:00.000Z", "submitted"),
            ("queued", "running", "2026-01-05T09:00:00.100Z", "worker 1 took it"),
            ("running", "waiting", "2026-01-05T09:00:05.000Z", "planned 2 subtasks"),
            ("waiting", "running", "2026-01-05T09:00:40.000Z", "subtasks done"),
            ("running", "completed", "2026-01-05T09:00:42.500Z", "aggregated"),
        ),
        "subtasks": [
            {
                "id": "111111111111",
                "step": "s1",
                "title": "Write the parser",
                "state": "completed",
                "priority": 70,
                "text": "Write the parser",
            },
            {
                "id": "222222222222",
                "step": "s2",
                "title": "Write the tests",
                "state": "completed",
                "priority": 70,
                "text": "Write the tests",
                "needs": ["111111111111"],
            },
        ],
    }
)

CHECKPOINTS = [
    Checkpoint("9e8d7c6b5a4f3e2d1c0b", "2026-01-05T09:00:42.400Z", "done", "aggregated"),
    Checkpoint("1a2b3c4d5e6f7a8b9c0d", "2026-01-05T09:00:20.000Z", "s1", "finished s1"),
    Checkpoint("0f0e0d0c0b0a09080706", "2026-01-05T09:00:05.000Z", "plan", "planned 2 subtasks"),
]

MODELS = [
    ModelInfo.from_dict(
        {
            "role": role,
            "backend": "llamacpp",
            "model": "smollm2-135m",
            "pinned": True,
            "loaded": True,
            "health": "ok",
            "memory_bytes": 96 * 2**20,
            "memory_local": True,
            "calls": calls,
            "prompt_tokens": calls * 40,
            "completion_tokens": calls * 30,
        }
    )
    for role, calls in (("ux", 12), ("task", 5))
]

STATUS = DaemonStatus.from_dict(
    {
        "version": "0.1.0",
        "pid": 4242,
        "uptime_seconds": 3720,
        "workers": {"busy": 1, "limit": 2},
        "tasks": {"queued": 2, "running": 1, "waiting": 1, "paused": 1, "completed": 9},
    }
)

METRICS = Metrics.from_dict(
    {
        "at": "2026-01-05T09:10:30+00:00",
        "window_minutes": 10,
        "tokens_per_minute": [
            {"minute": f"2026-01-05T09:{m:02d}:00+00:00", "model": model, "role": role, "tokens": n}
            for m, model, role, n in [
                (1, "llamacpp:smollm2-135m", "task", 400),
                (3, "llamacpp:smollm2-135m", "task", 900),
                (4, "llamacpp:smollm2-135m", "ux", 120),
                (6, "llamacpp:smollm2-135m", "task", 1500),
                (9, "llamacpp:smollm2-135m", "ux", 60),
                (10, "llamacpp:smollm2-135m", "task", 700),
            ]
        ],
        "latency": [
            {
                "name": "ux_first_token_ms",
                "p50": 180.2,
                "p95": 240.0,
                "p99": 260.1,
                "target": 250.0,
                "stat": "p95",
                "unit": "ms",
                "samples": 14,
                "ok": True,
            },
            {
                "name": "status_ms",
                "p50": 1.2,
                "p95": 3.1,
                "p99": 6.4,
                "target": 5.0,
                "stat": "p99",
                "unit": "ms",
                "samples": 300,
                "ok": False,
            },
            {
                "name": "rss_mb",
                "p50": 430.0,
                "p95": 430.0,
                "p99": 430.0,
                "target": 500.0,
                "stat": "max",
                "unit": "MB",
                "samples": 1,
                "ok": True,
            },
        ],
        "queue": {"queued": 2, "running": 1, "waiting": 1, "paused": 1, "workers": 2},
        "violations": [
            {
                "at": "2026-01-05T09:08:00+00:00",
                "name": "status_ms",
                "value": 6.4,
                "target": 5.0,
                "context": "get_task",
            }
        ],
    }
)

CONVERSATIONS = [
    ConversationInfo("c0c0c0c0c0c0", "Dates in Python", "", "2026-01-05T09:00:00.000Z", 4),
    ConversationInfo("d1d1d1d1d1d1", "hello", "", "2026-01-04T17:30:00.000Z", 6),
]

CONVERSATION = Conversation.from_dict(
    {
        "id": "c0c0c0c0c0c0",
        "title": "Dates in Python",
        "summary": None,
        "messages": [
            {"seq": 1, "role": "user", "text": "hi, can you help me with dates?"},
            {
                "seq": 2,
                "role": "assistant",
                "text": "Sure. Python's `datetime` module does most of it:\n\n"
                "```python\nfrom datetime import date\ndate.fromisoformat('2026-01-05')\n```",
            },
        ],
    }
)

HANDOFF = ChatReply.from_dict(
    {
        "text": "On it: I queued that as task **3fa9c01b22de**.",
        "conversation": "c0c0c0c0c0c0",
        "intent": {"kind": "task", "confidence": 0.93, "action": "submit"},
        "task": {"id": "3fa9c01b22de", "state": "queued", "text": "Write a Python function..."},
        "finish_reason": "stop",
        "tokens": {"prompt": 0, "completion": 0},
    }
)


_APPROVALS: list[dict[str, Any]] = [
    {
        "id": "7c1e2a9b3d4f",
        "task_id": "5eed5eed5eed",
        "call_id": "call-1",
        "kind": "tool",
        "tool": "run",
        "arguments": {"command": "pip install requests && python weather.py --city Paris"},
        "summary": "run: pip install requests && python weather.py --city Paris",
        "rule": "run:pip",
        "state": "pending",
        "reason": None,
        "created_at": "2026-01-05T08:51:00.000Z",
        "decided_at": None,
    },
    {
        "id": "9a8b7c6d5e4f",
        "task_id": "bead5bead5be",
        "call_id": "call-2",
        "kind": "question",
        "tool": "ask_user",
        "arguments": {"question": "Celsius or Fahrenheit?"},
        "summary": "Celsius or Fahrenheit?",
        "rule": None,
        "state": "pending",
        "reason": None,
        "created_at": "2026-01-05T08:51:30.000Z",
        "decided_at": None,
    },
]
APPROVALS = [Approval.from_dict(d) for d in _APPROVALS]

# The board's tasks and a second acting task, waiting for an answer.
ACTING_TASKS = [
    *TASKS,
    Task.from_dict(
        {
            "id": "bead5bead5be",
            "state": "waiting",
            "priority": 60,
            "text": "Convert the temperatures in data.csv",
            "created_at": "2026-01-05T08:49:00.000Z",
            "updated_at": "2026-01-05T08:51:30.000Z",
        }
    ),
]

ACTING_TASK = Task.from_dict(
    {
        "id": "5eed5eed5eed",
        "state": "waiting",
        "priority": 50,
        "text": "Build a CLI for the weather API",
        "created_at": "2026-01-05T08:50:00.000Z",
        "updated_at": "2026-01-05T08:51:00.000Z",
        "tokens": {"prompt": 1200, "completion": 340},
        "act": True,
        "workspace": "/home/ada/weather",
        "transitions": _transitions(
            (None, "queued", "2026-01-05T08:50:00.000Z", "submitted"),
            ("queued", "running", "2026-01-05T08:50:00.100Z", "worker 1 took it"),
            ("running", "waiting", "2026-01-05T08:51:00.000Z", "run needs approval"),
        ),
        "tool_calls": [
            {
                "call_id": f"call-{i}",
                "tool": tool,
                "digest": "0123abcd",
                "outcome": outcome,
                "duration_ms": ms,
                "detail": detail,
                "at": f"2026-01-05T08:50:{10 + 5 * i:02d}.000Z",
            }
            for i, (tool, outcome, ms, detail) in enumerate(
                [
                    ("list_files", "ok", 3.2, None),
                    ("read_file", "ok", 1.4, None),
                    ("write_file", "ok", 2.9, None),
                    ("read_file", "error", 0.8, "no file named 'config.toml'"),
                    ("run", "denied", 20150.0, "denied: use the venv's pip"),
                ]
            )
        ],
        "approvals": [_APPROVALS[0]],
    }
)

DIFF = TaskDiff.from_dict(
    {
        "task_id": "5eed5eed5eed",
        "state": "waiting",
        "workspace": "/home/ada/.local/share/tale/workspaces/5eed5eed5eed",
        "source": "/home/ada/weather",
        "diff": "diff --git a/weather.py b/weather.py\n"
        "--- a/weather.py\n"
        "+++ b/weather.py\n"
        "@@ -1,4 +1,9 @@\n"
        " import sys\n"
        "+import argparse\n"
        " \n"
        "-def main():\n"
        "-    print(sys.argv)\n"
        "+def main() -> None:\n"
        "+    parser = argparse.ArgumentParser()\n"
        "+    parser.add_argument('--city', required=True)\n"
        "+    args = parser.parse_args()\n"
        "+    print(args.city)\n",
    }
)


def _app(screen: str) -> TaleApp:
    return build_app(screen, socket=SOCKET, live=False)


def test_down_screen(snap_compare: SnapCompare) -> None:
    """You should see a red-bordered box: the daemon is down, the socket, what to run, a retry."""
    app = _app("down")

    async def feed(_pilot: Pilot[None]) -> None:
        app.down_screen.show(
            f"no daemon is listening on {SOCKET} (No such file or directory)", 2.0, ""
        )

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_board(snap_compare: SnapCompare) -> None:
    """You should see six columns (queued 2, running 1/2, waiting, paused, done, failed 2) with
    the running card showing its step and tokens and a cancelled card marked in failed."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        await app.board_screen.show_tasks(TASKS, STATUS)
        app.board_screen.select("3fa9c01b22de")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_task_screen(snap_compare: SnapCompare) -> None:
    """You should see a completed task's header (tokens, took 42.5 s), its two-subtask tree,
    and its output rendered as markdown with a code block."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        screen = TaskScreen(DONE_TASK.id, live=False)
        await app.push_screen(screen)
        await screen.show_task(DONE_TASK, CHECKPOINTS)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_task_screen_history(snap_compare: SnapCompare) -> None:
    """You should see the History tab: five transitions from queued to completed, with reasons."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        screen = TaskScreen(DONE_TASK.id, live=False)
        await app.push_screen(screen)
        await screen.show_task(DONE_TASK, CHECKPOINTS)
        screen.query_one("#task-tabs", TabbedContent).active = "tab-history"
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_dashboard(snap_compare: SnapCompare) -> None:
    """You should see the pool (ux and task, pinned, ok), the queue counts, a tokens-per-minute
    sparkline with its per-model table, and latencies against targets with one miss."""
    app = _app("dashboard")

    async def feed(pilot: Pilot[None]) -> None:
        screen = app.dashboard_screen
        for rtt in (1.5, 2.0, 1.2, 3.4, 1.1, 0.9, 1.3):
            screen.show_status(STATUS, rtt)
        screen.show_models(MODELS)
        screen.show_metrics(METRICS)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_dashboard_without_metrics(snap_compare: SnapCompare) -> None:
    """You should see "metrics unavailable" in the latency table and the tokens caption."""
    app = _app("dashboard")

    async def feed(pilot: Pilot[None]) -> None:
        screen = app.dashboard_screen
        screen.show_status(STATUS, 1.0)
        screen.show_models(MODELS)
        screen.show_metrics(None, "this daemon has no metrics tool")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_chat(snap_compare: SnapCompare) -> None:
    """You should see two past conversations on the left, an exchange with a code block, and a
    request that became a task, marked "→ task 3fa9c01b22de queued"."""
    app = _app("chat")

    async def feed(pilot: Pilot[None]) -> None:
        screen = app.chat_screen
        screen.show_history(CONVERSATIONS)
        await screen.show_conversation(CONVERSATION)
        await screen.add_exchange("Write a Python function that parses ISO dates", HANDOFF)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_board_waiting_for_you(snap_compare: SnapCompare) -> None:
    """You should see a yellow banner under the summary ("2 things wait for you": a run to
    approve, a question to answer) and both cards in the waiting column marked, in yellow,
    "waiting for you"."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        await app.board_screen.show_tasks(ACTING_TASKS, STATUS, APPROVALS)
        app.board_screen.select("5eed5eed5eed")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_approval_dialog(snap_compare: SnapCompare) -> None:
    """You should see a yellow-bordered box over the board: the task wants to use run, the
    command, its arguments, the rule "run:pip", and Approve / Always / Deny buttons."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        await app.board_screen.show_tasks(ACTING_TASKS, STATUS, APPROVALS)
        await app.push_screen(ApprovalScreen(APPROVALS[0]))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_approval_dialog_deny_reason(snap_compare: SnapCompare) -> None:
    """You should see the approval box after d: a box for the reason under the buttons."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        await app.board_screen.show_tasks(ACTING_TASKS, STATUS, APPROVALS)
        await app.push_screen(ApprovalScreen(APPROVALS[0]))
        await pilot.press("d", *"use the venv")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_question_dialog(snap_compare: SnapCompare) -> None:
    """You should see the box for a question: "Celsius or Fahrenheit?" over an answer box."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        await app.board_screen.show_tasks(ACTING_TASKS, STATUS, APPROVALS)
        await app.push_screen(ApprovalScreen(APPROVALS[1]))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_task_screen_tool_calls(snap_compare: SnapCompare) -> None:
    """You should see an acting task waiting: its header says it acts on a copy of
    /home/ada/weather with 5 tool calls, a banner names the run call it waits for, and the
    Tool calls tab lists five calls (one error with its detail, one denied taking 20.1 s)."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        screen = TaskScreen(ACTING_TASK.id, live=False)
        await app.push_screen(screen)
        await screen.show_task(ACTING_TASK, [])
        screen.query_one("#task-tabs", TabbedContent).active = "tab-tools"
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)


def test_task_screen_diff(snap_compare: SnapCompare) -> None:
    """You should see the Diff tab: a unified diff of weather.py, added lines green and
    removed lines red."""
    app = _app("board")

    async def feed(pilot: Pilot[None]) -> None:
        screen = TaskScreen(ACTING_TASK.id, live=False)
        await app.push_screen(screen)
        await screen.show_task(ACTING_TASK, [])
        screen.query_one("#task-tabs", TabbedContent).active = "tab-diff"
        screen.show_diff(DIFF)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=feed)
