"""Facts the thin client shares with the daemon, written once for the client.

Task and schedule states, and the JSON-RPC error codes the client acts on. The
client never imports taled (its import costs a second, and it may not even be
installed beside tale), so ``tests/test_protocol.py`` pins each of these to the
daemon's own definition: a state or code changed there fails that test until it
is changed here.
"""

from __future__ import annotations

__all__ = [
    "CONFLICT",
    "FINAL_STATES",
    "ID_DIGITS",
    "ILLEGAL_TRANSITION",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOT_FOUND",
    "PARSE_ERROR",
    "SCHEDULE_STATES",
    "TASK_STATES",
    "UNAVAILABLE",
    "USAGE_CODES",
]

# taled.tasks.lifecycle.TaskState, in the order a task lives them.
TASK_STATES = ("queued", "running", "waiting", "paused", "completed", "failed", "cancelled")
# taled.tasks.lifecycle.FINAL_STATES: a task in one of these never moves again by itself.
FINAL_STATES = ("completed", "failed", "cancelled")
# taled.db.store.TASK_ID_DIGITS: every id the daemon makes (task, conversation,
# approval, schedule) is this many lowercase hex digits.
ID_DIGITS = 12
# taled.db.schedules.ScheduleState
SCHEDULE_STATES = ("active", "paused", "done")

# JSON-RPC's own codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602  # taled.errors.InvalidInput
INTERNAL_ERROR = -32603
# taled.errors' own.
NOT_FOUND = -32001
ILLEGAL_TRANSITION = -32002
UNAVAILABLE = -32003
CONFLICT = -32070

# Codes that mean "what you asked was wrong" (the CLI exits 2 for them).
USAGE_CODES = frozenset({INVALID_PARAMS, NOT_FOUND, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR})
