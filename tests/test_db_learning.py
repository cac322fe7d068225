"""The learning repository (taled/db/learning.py) over a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from taled.db.learning import (
    Embedding,
    LearningRecords,
    LedgerFacts,
    Outcome,
    OutcomeRecord,
    Vector,
)
from taled.db.store import CallRecord, Store
from taled.settings import StoreSettings
from taled.tasks.workstate import AttemptKey

T = TypeVar("T")


def _run(tmp_path: Path, body: Callable[[Store, LearningRecords], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        try:
            return await body(store, LearningRecords(store))
        finally:
            await store.close()

    return asyncio.run(main())


def _call(task_id: str, key: AttemptKey, completion: int, role: str = "task") -> CallRecord:
    return CallRecord(
        role=role,
        backend="llamacpp",
        model="m",
        task_id=task_id,
        prompt_tokens=10,
        completion_tokens=completion,
        load_ms=0.0,
        prompt_ms=1.0,
        generation_ms=100.0,
        total_ms=101.0,
        success=True,
        key=key,
    )


def _record(outcome: Outcome) -> OutcomeRecord:
    return OutcomeRecord(outcome, "simple", {"words": 3.0})


def _vector(*values: float) -> Vector:
    return np.asarray(values, dtype=np.float32)


def test_a_recorded_outcome_is_built_from_the_ledger_and_read_back(tmp_path: Path) -> None:
    """``record`` hands the ledger's facts of the task to ``make`` and stores what it
    builds with its text and vector; the outcome reads back labelled, with its features."""

    async def body(store: Store, records: LearningRecords) -> None:
        task = await store.submit("sort the list of numbers", 0)
        store.record_call(_call(task.id, AttemptKey("answer"), 40, role="ux"))
        store.record_call(_call(task.id, AttemptKey("answer", 2), 60))
        seen: list[LedgerFacts] = []

        def make(facts: LedgerFacts) -> OutcomeRecord:
            seen.append(facts)
            return _record(
                Outcome(
                    task_id=task.id,
                    text=task.text,
                    predicted_level="simple",
                    confidence=0.5,
                    completion_tokens=facts.completion_tokens,
                    success=True,
                    role=facts.role or "task",
                    backend=facts.backend,
                    model=facts.model,
                    retries=facts.retries,
                    answer_tokens=facts.answer_tokens,
                    at=1000.0,
                )
            )

        outcome = await records.record(task.id, make, Embedding("e:m", _vector(0.6, 0.8)))
        facts = seen[0]
        assert (facts.completion_tokens, facts.retries, facts.answer_tokens) == (100, 1, 40)
        assert (facts.retry_tokens, facts.plan_tokens, facts.role) == (70, 0, "ux")
        stored = await records.outcomes(10)
        assert stored == [_record(outcome)]
        vectors = await records.vectors("e:m", 10)
        assert [(v.task_id, v.dimension) for v in vectors] == [(task.id, 2)]
        assert vectors[0].vector.tolist() == _vector(0.6, 0.8).tolist()

    _run(tmp_path, body)


def test_recording_a_task_again_replaces_its_outcome_and_text(tmp_path: Path) -> None:
    """A task finished again (after a restore) has one outcome and one memory row."""

    async def body(store: Store, records: LearningRecords) -> None:
        task = await store.submit("count the words", 0)
        first = Outcome(task.id, task.text, "simple", 0.5, 10, False, "task", None, None)
        await records.ingest(_record(first))
        await records.ingest(_record(Outcome(**{**first.__dict__, "success": True})))
        assert [r.outcome.success for r in await records.outcomes(10)] == [True]
        found = await records.similar('"count"', 10)
        assert [(p.task_id, p.success) for p in found.by_words] == [(task.id, True)]

    _run(tmp_path, body)


def test_a_lookup_reads_word_matches_and_the_other_ids_asked_for(tmp_path: Path) -> None:
    """Word matches come back by bm25; ids asked for that the words did not find come
    back beside them, scored 0; no query reads only the ids."""

    async def body(store: Store, records: LearningRecords) -> None:
        ids = []
        for text in ("parse the csv file", "write a haiku"):
            task = await store.submit(text, 0)
            await records.ingest(
                _record(Outcome(task.id, text, "simple", 0.5, 7, True, "task", None, None))
            )
            ids.append(task.id)
        found = await records.similar('"csv"', 10, ids)
        assert [p.task_id for p in found.by_words] == [ids[0]]
        assert [(p.task_id, p.score, p.tokens) for p in found.by_id] == [(ids[1], 0.0, 7.0)]
        only_ids = await records.similar("", 10, ids[1:])
        assert only_ids.by_words == [] and [p.task_id for p in only_ids.by_id] == ids[1:]

    _run(tmp_path, body)


def test_backfilled_vectors_leave_nothing_unembedded(tmp_path: Path) -> None:
    """Tasks without a vector of a model are listed newest first until it is saved."""

    async def body(store: Store, records: LearningRecords) -> None:
        ids = []
        for n, text in enumerate(("one", "two")):
            task = await store.submit(text, 0)
            outcome = Outcome(task.id, text, "simple", 0.5, 1, True, "task", None, None, at=n)
            await records.ingest(_record(outcome), Embedding("old:m", _vector(1.0)))
            ids.append(task.id)
        missing = await records.unembedded("new:m", 10)
        assert [(t.task_id, t.text) for t in missing] == [(ids[1], "two"), (ids[0], "one")]
        await records.save_vectors("new:m", [(ids[1], _vector(0.0, 1.0))])
        assert [t.task_id for t in await records.unembedded("new:m", 10)] == [ids[0]]
        assert [t.task_id for t in await records.unembedded("new:m", 1)] == []

    _run(tmp_path, body)


def test_generation_totals_sum_each_models_newest_calls(tmp_path: Path) -> None:
    """Completion tokens and generation time are summed per model over the newest rows."""

    async def body(store: Store, records: LearningRecords) -> None:
        task = await store.submit("x", 0)
        for n in (1, 2, 3):
            store.record_call(_call(task.id, AttemptKey("answer", n), 10 * n))
        await store.ledger_settled()
        totals = await records.generation_totals(2)
        assert [(t.model, t.completion_tokens, t.generation_ms) for t in totals] == [
            ("m", 50, 200.0)
        ]

    _run(tmp_path, body)
