"""Loop detection: an answer that repeats itself word for word is stopped and trimmed."""

from __future__ import annotations

import itertools
import sqlite3

from hypothesis import given
from hypothesis import strategies as st

from taled.models.repetition import LoopGuard, loop_start
from taled.settings import LoopSettings
from tests.harness import running_daemon

_S = LoopSettings()
_KW = {
    "min_chars": _S.min_chars,
    "max_chars": _S.max_chars,
    "repeats": _S.repeats,
    "long_chars": _S.long_chars,
}
_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=9)


def _words(text: str) -> set[str]:
    return set(text.replace(".", " ").split())


@given(st.text(max_size=600))
def test_loop_start_never_crashes_and_points_inside_the_text(text: str) -> None:
    """Any text gives None or a cut inside it."""
    cut = loop_start(text, **_KW)
    assert cut is None or 0 < cut <= len(text)


@given(st.lists(_WORDS, min_size=1, max_size=60, unique=True))
def test_text_without_repeats_is_not_a_loop(words: list[str]) -> None:
    """Distinct words never make a loop, however long the text."""
    assert loop_start(" ".join(words), **_KW) is None


# Prose, and a sentence that could repeat.
_PROSE = st.lists(_WORDS, max_size=12).map(" ".join)
_UNIT = (
    st.lists(_WORDS, min_size=3, max_size=12, unique=True)
    .map(lambda w: " ".join(w) + ". ")
    .filter(lambda u: len(u) >= _S.min_chars)
)


@given(
    _PROSE,
    _UNIT,
    st.integers(min_value=3, max_value=6),
)
def test_a_unit_repeated_is_cut_after_one_copy(prose: str, unit: str, copies: int) -> None:
    """Prose then one sentence over and over: the repeats go, one copy of it stays."""
    text = prose + " " + unit * copies
    cut = loop_start(text, **_KW)
    assert cut is not None
    assert len(text) - cut >= (copies - 2) * len(unit)
    assert _words(unit) <= _words(text[:cut])


def test_rules_and_tables_are_not_loops() -> None:
    """Repeated punctuation (a rule, a table's dashes) has no words: not a loop."""
    assert loop_start("-" * 200, **_KW) is None
    assert loop_start("| --- | --- |\n" * 10, **_KW) is None


def test_the_cut_ends_where_a_sentence_ends() -> None:
    """The kept text ends at a sentence's end, not mid-word."""
    loop = "In the end, a dragon is a mythical creature that rules the world. "
    text = "The dragon is a legendary creature. " + loop * 3
    guard = LoopGuard.from_settings(_S)
    assert guard.looped(text)
    assert guard.trimmed(text).endswith("rules the world.")


@given(
    _PROSE,
    _UNIT,
    st.integers(min_value=0, max_value=6),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60),
)
def test_the_guard_sees_the_same_loop_however_the_stream_is_split(
    prose: str, unit: str, copies: int, sizes: list[int]
) -> None:
    """A character at a time or in pieces of any size (a lagging consumer's are merged):
    the same verdict, cut at the same place."""
    text = prose + " " + unit * copies

    def fed(pieces: list[int]) -> tuple[bool, int | None]:
        guard = LoopGuard.from_settings(_S)
        end, looped, i = 0, False, 0
        while end < len(text) and not looped:
            end = min(len(text), end + pieces[i % len(pieces)])
            i += 1
            looped = guard.looped(text[:end])
        return looped, guard.cut

    assert fed(sizes) == fed([1])


# Tasks the small model often answers and then repeats itself on, at temperature 0
# (which ones loop depends on the machine's arithmetic, so there are several).
_LOOPY = (
    "Write hello world in Python",
    "Write a very long story about a dragon, at least 2000 words.",
    "Describe your favourite food.",
    "Write a poem about the sea.",
)


def _answers(guard: bool) -> tuple[list[tuple[str, int, bool]], int]:
    """Each _LOOPY task's result, completion tokens and whether the ledger says the pool
    stopped it for looping, in a fresh daemon, and the calls `tale usage` says were
    stopped for looping."""
    settings = {"TALE_LOOPS__ENABLED": str(guard).lower(), "TALE_RUNNER__MAX_TOKENS": "300"}
    out = []
    with running_daemon(settings) as daemon:
        for text in _LOOPY:
            task_id = daemon.call("submit_task", text=text)["id"]
            task = daemon.wait_for(task_id)
            assert task["state"] == "completed"
            with sqlite3.connect(daemon.home.data / "tale.db") as db:
                tokens, looped = db.execute(
                    "SELECT completion_tokens, looped FROM model_calls WHERE task_id = ?",
                    (task_id,),
                ).fetchone()
            out.append((task["result"], tokens, bool(looped)))
        stopped = daemon.call("usage")["savings"]["loops_stopped"]["calls"]
    return out, stopped


def test_looping_answers_are_stopped_where_they_start_repeating() -> None:
    """Paired at temperature 0: every answer that loops without the guard is stopped with
    it, early, keeping what the model wrote before the repeats; the others are untouched."""
    (free, none_stopped), (guarded, reported) = _answers(False), _answers(True)
    stopped = 0
    for (free_text, free_tokens, _), (text, tokens, looped) in zip(free, guarded, strict=True):
        if looped:
            stopped += 1
            assert tokens < free_tokens
            assert free_text.startswith(text)
            paragraphs = [p for p in text.split("\n\n") if p.strip()]
            assert all(a != b for a, b in itertools.pairwise(paragraphs))
        else:
            assert text == free_text
            assert loop_start(free_text, **_KW) is None, "a looping answer was not stopped"
        assert loop_start(text, **_KW) is None
    assert stopped >= 1
    assert any(loop_start(t, **_KW) is not None for t, _, _ in free), "no answer looped"
    assert (none_stopped, reported) == (0, stopped)  # what `tale usage` reports


# Open questions the small model often answers and then repeats itself on (which ones
# loop depends on the machine's arithmetic, so there are several).
_RAMBLE = (
    "tell me about dragons",
    "what do you think about music?",
    "why is the sky blue?",
    "what is love?",
    "what makes a good friend?",
    "tell me about the ocean",
)


def test_looping_chat_replies_are_stopped_and_stored_without_their_repeats() -> None:
    """Replies that loop end early (at least one of these does); every turn's text and
    its stored message are the same, and none holds a loop."""
    settings = {
        "TALE_LOOPS__ENABLED": "true",
        "TALE_CHAT__MAX_TOKENS": "256",
        "TALE_CHAT__TEMPERATURE": "0",
    }
    stopped = 0
    with running_daemon(settings) as daemon:
        for text in _RAMBLE:
            turn = daemon.call("chat", text=text, new=True)
            with sqlite3.connect(daemon.home.data / "tale.db") as db:
                tokens, looped = db.execute(
                    "SELECT completion_tokens, looped FROM model_calls"
                    " WHERE conversation_id = ? AND step IS NULL",
                    (turn["conversation"],),
                ).fetchone()
            if looped:
                stopped += 1
                assert tokens < 256
            stored = daemon.call("get_conversation", id=turn["conversation"])["messages"][-1]
            assert stored["text"] == turn["text"]
            assert loop_start(turn["text"], **_KW) is None
    assert stopped >= 1


def test_repetition_the_request_asks_for_is_not_a_loop() -> None:
    """ "Write this sentence ten times" gets every copy: the request holds the unit."""
    unit = "I like green apples and red cherries. "
    asked = LoopGuard.from_settings(_S, f"Write '{unit.strip()}' ten times, please.")
    assert not asked.looped(unit * 6)
    assert asked.trimmed(unit * 6) == unit * 6
    unasked = LoopGuard.from_settings(_S, "Write a story about fruit.")
    assert unasked.looped(unit * 6)
