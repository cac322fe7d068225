"""The usage repository (taled/db/usage.py) over a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from taled.db.conversations import ConversationRecords, NewMessage
from taled.db.learning import LearningRecords, Outcome, OutcomeRecord
from taled.db.store import CallRecord, Store, SubtaskSpec, TaskRecord
from taled.db.usage import (
    CallTotals,
    ChatTurns,
    ReplyChars,
    RoutedToUx,
    StatelessTotals,
    UsageRecords,
)
from taled.settings import Level, StoreSettings
from taled.tasks.workstate import AttemptKey

T = TypeVar("T")


def _run(tmp_path: Path, body: Callable[[Store, UsageRecords], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        try:
            return await body(store, UsageRecords(store))
        finally:
            await store.close()

    return asyncio.run(main())


def _call(
    task_id: str | None,
    prompt: int,
    completion: int,
    *,
    role: str = "task",
    key: AttemptKey | None = None,
    success: bool = True,
    conversation_id: str | None = None,
) -> CallRecord:
    return CallRecord(
        role=role,
        backend="llamacpp",
        model="m",
        task_id=task_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        load_ms=0.0,
        prompt_ms=1.0,
        generation_ms=9.0,
        total_ms=10.0,
        success=success,
        key=key,
        conversation_id=conversation_id,
    )


def _outcome(task_id: str, level: Level = "simple", **changes: Any) -> OutcomeRecord:
    """A successful task's outcome, with ``changes`` to its fields."""
    outcome = Outcome(
        task_id=task_id,
        text="t",
        predicted_level="simple",
        confidence=0.5,
        completion_tokens=0,
        success=True,
        role="task",
        backend="llamacpp",
        model="m",
    )
    return OutcomeRecord(replace(outcome, **changes), level, {})


async def _planned(store: Store, text: str) -> tuple[TaskRecord, str]:
    """A top-level task, running, with one subtask: the task and the subtask's id."""
    top = await store.submit(text, 0)
    running = await store.claim_next()
    assert running is not None and running.id == top.id
    await store.add_subtasks(running, 1, [SubtaskSpec("s1", "step", "do it", ())], "planned")
    [child] = await store.children(top.id)
    return top, child.id


def test_sums_over_nothing_are_zero_not_none(tmp_path: Path) -> None:
    """Over an empty store every aggregate reads as zero and every list as empty."""

    async def body(store: Store, records: UsageRecords) -> None:
        assert await records.ledger(0.0) == []
        assert await records.top_tasks(0.0, 5) == []
        assert await records.by_complexity(0.0) == []
        assert await records.top_conversations(0.0, 5) == []
        assert await records.routed_to_ux(0.0) == RoutedToUx(0, 0, 0)
        assert await records.stateless(0.0) == StatelessTotals(0, 0, 0, 0, 0, 0)
        assert await records.loops_stopped(0.0) == 0
        assert await records.reply_chars() == ReplyChars(0, 0)
        assert await records.chat_turns(0.0, 10) == ChatTurns(0, 0, 0, 0, 0, 0, 0)
        assert await records.outcomes_by_day(0.0) == []
        assert await records.last_predictions(0.0, 5) == []

    _run(tmp_path, body)


def test_the_ledger_is_grouped_by_day_model_role_route_and_task(tmp_path: Path) -> None:
    """Calls of one day, model, role and route are summed, calls for tasks apart; a failed
    call counts as a failure."""

    async def body(store: Store, records: UsageRecords) -> None:
        store.record_call(_call("t1", 10, 5))
        store.record_call(_call("t2", 20, 7, success=False))
        store.record_call(_call(None, 3, 1, role="ux"))
        await store.ledger_settled()
        groups = {(g.role, g.for_task): g for g in await records.ledger(0.0)}
        assert set(groups) == {("task", True), ("ux", False)}
        task = groups[("task", True)]
        assert task.day == date.today().isoformat()
        assert (task.backend, task.model, task.route) == ("llamacpp", "m", "role")
        assert task.totals == CallTotals(2, 30, 12, 1, 20.0)
        assert await records.ledger(1e12) == []

    _run(tmp_path, body)


def test_a_subtasks_calls_count_under_its_top_level_task(tmp_path: Path) -> None:
    """A subtask's calls are summed into its top-level task, which is listed (most tokens
    first, ``top`` of them) and counted under its outcome's level; one without an outcome
    is 'unknown'."""

    async def body(store: Store, records: UsageRecords) -> None:
        top, child = await _planned(store, "the big one")
        small = await store.submit("the small one", 0)
        store.record_call(_call(top.id, 100, 10, key=AttemptKey("plan")))
        store.record_call(_call(child, 50, 5, key=AttemptKey("answer")))
        store.record_call(_call(small.id, 1, 1, key=AttemptKey("answer")))
        await store.ledger_settled()
        await LearningRecords(store).ingest(_outcome(top.id, level="complex"))
        [first] = await records.top_tasks(0.0, 1)
        assert (first.id, first.tasks, first.text, first.level) == (
            top.id,
            2,
            "the big one",
            "complex",
        )
        assert first.totals == CallTotals(2, 150, 15, 0, 20.0)
        listed = await records.top_tasks(0.0, 5)
        assert [t.id for t in listed] == [top.id, small.id]
        assert (listed[1].level, listed[1].confidence) == (None, None)
        levels = {
            lv.level: (lv.tasks, lv.totals.calls, lv.outcomes, lv.successes)
            for lv in await records.by_complexity(0.0)
        }
        assert levels == {"complex": (1, 2, 1, 1), "unknown": (1, 1, 0, 0)}

    _run(tmp_path, body)


def test_stateless_holds_each_task_to_its_first_direct_answer(tmp_path: Path) -> None:
    """A top-level task's first direct answer is the fresh call; tale's tokens are all its
    tree's; a task that passed at once is first_passed, one carried by a retry rescued."""

    async def body(store: Store, records: UsageRecords) -> None:
        once = await store.submit("passes at once", 0)
        retried = await store.submit("needs a retry", 0)
        never = await store.submit("planned up front", 0)
        store.record_call(_call(once.id, 10, 10, key=AttemptKey("answer")))
        store.record_call(_call(retried.id, 20, 5, key=AttemptKey("answer")))
        store.record_call(_call(retried.id, 20, 15, key=AttemptKey("answer", 2)))
        store.record_call(_call(never.id, 7, 7, key=AttemptKey("plan")))
        await store.ledger_settled()
        learning = LearningRecords(store)
        await learning.ingest(_outcome(once.id))
        await learning.ingest(_outcome(retried.id, retries=1))
        assert await records.stateless(0.0) == StatelessTotals(
            tasks=3, direct=2, tale_tokens=80, first_tokens=45, first_passed=1, rescued=1
        )

    _run(tmp_path, body)


def test_chat_turns_count_each_conversation_so_far_and_cap_replies(tmp_path: Path) -> None:
    """A turn's naive prompt is its conversation up to it; replies count up to the cap;
    a turn with an action was answered from the store; model-written chat replies give
    the characters per token."""

    async def body(store: Store, records: UsageRecords) -> None:
        chat = ConversationRecords(store)
        conv = await chat.create("hello")
        for role, text, intent, action in (
            ("user", "abcd", "chat", None),
            ("assistant", "x" * 10, None, None),
            ("user", "abc", "recall", "recall"),
            ("assistant", "y" * 6, None, None),
        ):
            await chat.add(NewMessage(conv.id, role, text, intent=intent, action=action))
        store.record_call(_call(None, 30, 4, role="ux", conversation_id=conv.id))
        await store.ledger_settled()
        assert await records.chat_turns(0.0, 5) == ChatTurns(
            turns=2,
            from_store=1,
            handed_off=0,
            prompt_chars=4 + 17,
            completion_chars=5 + 5,
            store_prompt_chars=17,
            store_completion_chars=5,
        )
        assert await records.reply_chars() == ReplyChars(chars=10, tokens=4)
        [used] = await records.top_conversations(0.0, 5)
        assert (used.id, used.title, used.turns, used.from_store) == (conv.id, "hello", 2, 1)
        assert used.totals.calls == 1

    _run(tmp_path, body)


def test_predictions_are_held_to_the_first_answers_tokens(tmp_path: Path) -> None:
    """An outcome's prediction is held to its first answer's tokens (the whole task's
    without one); the newest come first, and a day sums their absolute errors."""

    async def body(store: Store, records: UsageRecords) -> None:
        learning = LearningRecords(store)
        a, b, c = [await store.submit(text, 0) for text in "abc"]
        now = 1_900_000_000.0
        await learning.ingest(
            _outcome(a.id, predicted_tokens=150, completion_tokens=900, answer_tokens=100, at=now)
        )
        await learning.ingest(
            _outcome(b.id, predicted_tokens=50, completion_tokens=100, at=now + 1, truncations=2)
        )
        await learning.ingest(_outcome(c.id, at=now + 2))
        last = await records.last_predictions(0.0, 5)
        assert [(p.at, p.predicted_tokens, p.actual_tokens) for p in last] == [
            (now + 1, 50, 100),
            (now, 150, 100),
        ]
        [day] = await records.outcomes_by_day(0.0)
        assert (day.outcomes, day.predicted, day.ape_sum) == (3, 2, 1.0)
        assert (day.truncated, day.truncations, day.successes) == (1, 2, 3)

    _run(tmp_path, body)
