"""The thin client's copy of the daemon's facts (tale_client/protocol.py) matches them.

tale_client never imports taled, so its states and error codes are written twice; this
is the test that keeps the two the same.
"""

from __future__ import annotations

from tale_client import protocol
from taled import errors
from taled.db.schedules import ScheduleState
from taled.db.store import TASK_ID_DIGITS, new_task_id
from taled.tasks.lifecycle import FINAL_STATES, TaskState


def test_task_states_are_the_daemons() -> None:
    assert tuple(s.value for s in TaskState) == protocol.TASK_STATES


def test_final_states_are_the_daemons() -> None:
    assert set(protocol.FINAL_STATES) == {s.value for s in FINAL_STATES}


def test_schedule_states_are_the_daemons() -> None:
    assert tuple(s.value for s in ScheduleState) == protocol.SCHEDULE_STATES


def test_the_id_length_is_the_daemons() -> None:
    assert protocol.ID_DIGITS == TASK_ID_DIGITS == len(new_task_id())


def test_error_codes_are_the_daemons() -> None:
    assert errors.InvalidInput.code == protocol.INVALID_PARAMS
    assert errors.NotFound.code == protocol.NOT_FOUND
    assert errors.IllegalTransition.code == protocol.ILLEGAL_TRANSITION
    assert errors.Unavailable.code == protocol.UNAVAILABLE
    assert errors.Conflict.code == protocol.CONFLICT
    assert errors.TaleError.code == protocol.INTERNAL_ERROR


def test_no_client_module_writes_a_code_or_the_task_states_itself() -> None:
    """Every other client module takes them from protocol.py."""
    import re
    from pathlib import Path

    import tale_client

    root = Path(tale_client.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "protocol.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"-32\d{3}", text), f"{path.name} writes an error code"
        assert '"completed", "failed", "cancelled"' not in text, f"{path.name} lists them"
