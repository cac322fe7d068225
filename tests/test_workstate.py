"""A task's checkpointed work state: attempt keys and the checkpoint document."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.errors import DaemonError
from taled.tasks.workstate import AttemptKey, WorkState

_STEPS = st.text(st.characters(blacklist_characters="#"), min_size=1, max_size=12)


def _attempt(key: str, passed: bool) -> dict[str, Any]:
    return {
        "key": key,
        "stage": "first",
        "model": None,
        "max_tokens": 16,
        "output": "hi",
        "finish": "stop",
        "passed": passed,
        "detail": "" if passed else "no",
        "tokens": 3,
    }


# A checkpoint document as tale wrote it before attempt keys were typed.
_OLD = {
    "format": 1,
    "task_id": "aaaaaaaaaaaa",
    "phase": "done",
    "round": 0,
    "complexity": None,
    "plan": None,
    "outputs": {},
    "attempts": {"answer": [_attempt("answer", False), _attempt("answer#2", True)]},
    "partial": None,
    "result": "hi",
    "decomposed": False,
    "done_at": {"answer": 1.0, "answer#2": 2.0},
    "tokens": 6,
    "estimate": None,
    "truncations": 0,
    "cut": [],
}


@given(_STEPS, st.integers(min_value=1, max_value=10_000))
def test_an_attempt_keys_text_form_parses_back_to_it(step: str, number: int) -> None:
    """Every key reads back from its text form unchanged."""
    key = AttemptKey(step, number)
    assert AttemptKey.parse(str(key)) == key


def test_the_first_attempt_is_named_by_its_step_and_a_retry_numbered() -> None:
    """``answer`` is the first attempt at the answer, ``answer#2`` the one after it."""
    assert (str(AttemptKey("answer")), str(AttemptKey("answer", 2))) == ("answer", "answer#2")
    assert AttemptKey.parse("s3#4") == AttemptKey("s3", 4)


@pytest.mark.parametrize("text", ["answer#1", "answer#02", "answer#x", "a#b#2", "#2", ""])
def test_text_that_is_not_a_keys_text_form_is_refused(text: str) -> None:
    """Text no key writes (a number 1, a padded number, a second '#'...) is a ValueError."""
    with pytest.raises(ValueError):
        AttemptKey.parse(text)


def test_a_checkpoint_written_before_typed_keys_loads_and_writes_back_the_same() -> None:
    """An old document's ``answer#2`` attempt loads as step answer, attempt 2, and the
    document written back is the one read."""
    ws = WorkState.from_json(_OLD)
    assert [a.key for a in ws.attempts["answer"]] == [AttemptKey("answer"), AttemptKey("answer", 2)]
    assert ws.to_json() == _OLD


def test_a_checkpoint_with_an_unreadable_attempt_key_is_refused() -> None:
    """A key that is not a text form makes the document unreadable, as a DaemonError."""
    bad = {**_OLD, "attempts": {"answer": [_attempt("answer#x", True)]}}
    with pytest.raises(DaemonError, match="not readable"):
        WorkState.from_json(bad)
