"""Intent detection's pure parts: the cheap signals and the model's vote."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from taled.chat.intent import ACTIONS, KINDS, IntentDetector, parse_vote, read_signals

DETECTOR = IntentDetector(consult_margin=0.35, model_weight=1.0)


@given(st.text(max_size=400))
def test_signals_never_fail_and_give_a_distribution(text: str) -> None:
    intent = asyncio.run(DETECTOR.detect(text))
    assert intent.kind in KINDS
    assert abs(sum(intent.probabilities.values()) - 1) < 0.01
    assert 0 < intent.confidence <= 1
    assert intent.confidence == max(intent.probabilities.values())
    assert intent.action is None or (intent.kind == "chat" and intent.action in ACTIONS)


@given(st.text(max_size=200))
def test_the_model_vote_is_a_kind_or_nothing(answer: str) -> None:
    assert parse_vote(answer) in (*KINDS, None)


@given(st.sampled_from(KINDS), st.text(alphabet=" .,!\n", max_size=5))
def test_the_model_vote_reads_the_kind_it_names(kind: str, noise: str) -> None:
    assert parse_vote(noise + kind.upper() + noise) == kind


def test_a_close_call_asks_the_model_and_its_vote_moves_the_decision() -> None:
    asked: list[str] = []

    async def says_task(text: str) -> str:
        asked.append(text)
        return "TASK"

    # "sumarize ..." (a typo) fires no work signal; a detector that consults the
    # model on every reading short of certainty asks it, and its vote counts.
    text = "sumarize report_q2.pdf for the board"
    curious = IntentDetector(consult_margin=1.0, model_weight=3.0)
    alone = asyncio.run(curious.detect(text))
    helped = asyncio.run(curious.detect(text, says_task))
    assert asked == [text]
    assert helped.model_vote == "task"
    assert helped.probabilities["task"] > alone.probabilities["task"]


def test_a_confident_reading_does_not_ask_the_model() -> None:
    async def judge(_text: str) -> str:
        raise AssertionError("the model was asked")

    intent = asyncio.run(DETECTOR.detect("Write a Python function that reverses a string", judge))
    assert intent.kind == "task" and intent.model_vote is None


def test_task_ids_named_in_a_message_are_picked_out() -> None:
    intent = asyncio.run(DETECTOR.detect("what did 0a1b2c3d4e5f produce?"))
    assert intent.action == "task_result"
    assert intent.task_ids == ("0a1b2c3d4e5f",)


def test_resume_as_a_noun_is_not_a_command() -> None:
    assert read_signals("my resume").action is None
    assert read_signals("resume it").action == "resume_task"
