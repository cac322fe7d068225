"""Finding a record by a unique prefix of its id (taled/db/ids.py), and the words each
of its callers says when a reference names none, or several."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from taled.db.acting import ActingRecords
from taled.db.ids import MIN_PREFIX, IdMessages, by_prefix
from taled.db.schedules import ScheduleRecords
from taled.db.schema import approvals, schedules, tasks
from taled.db.store import Store
from taled.errors import InvalidInput, NotFound
from taled.settings import StoreSettings

T = TypeVar("T")

_THINGS = sa.MetaData()
_things = sa.Table("things", _THINGS, sa.Column("id", sa.Text, primary_key=True))
_MESSAGES = IdMessages(
    invalid="bad {given!r} {ref!r} {min}",
    missing="none {ref}",
    ambiguous="several {ref} {first} {second}",
)

_ids = st.text(alphabet="0123456789abcdef", min_size=MIN_PREFIX, max_size=12)


def _with_things(ids: set[str], body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """``body`` over a fresh in-memory table holding ``ids``."""

    async def main() -> T:
        engine = create_async_engine("sqlite+aiosqlite://")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_THINGS.create_all)
                if ids:
                    await conn.execute(_things.insert(), [{"id": i} for i in ids])
                return await body(conn)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _lookup(ids: set[str], given: str) -> Any:
    async def body(conn: AsyncConnection) -> Any:
        return (await by_prefix(conn, _things.c.id, given, _MESSAGES)).id

    return _with_things(ids, body)


@settings(deadline=None, max_examples=80)
@given(ids=st.sets(_ids, max_size=8), data=st.data())
def test_a_reference_names_the_one_id_it_starts(ids: set[str], data: st.DataObject) -> None:
    """A reference of enough hex digits finds the id it is the start of when exactly one
    is, NotFound when none is, InvalidInput naming two when several are."""
    pool = sorted(ids) or ["0000"]
    base = data.draw(st.sampled_from(pool))
    ref = data.draw(st.integers(MIN_PREFIX, len(base)).map(lambda n: base[:n]))
    given_ = data.draw(st.sampled_from([ref, ref.upper(), f"  {ref}\n"]))
    matches = sorted(i for i in ids if i.startswith(ref))
    if len(matches) == 1:
        assert _lookup(ids, given_) == matches[0]
    elif not matches:
        with pytest.raises(NotFound) as missing:
            _lookup(ids, given_)
        assert missing.value.message == f"none {ref}"
    else:
        with pytest.raises(InvalidInput) as several:
            _lookup(ids, given_)
        words = several.value.message.split()
        assert words[:2] == ["several", ref]
        assert set(words[2:]) <= set(matches) and words[2] != words[3]


@settings(deadline=None, max_examples=40)
@given(ids=st.sets(_ids, min_size=1, max_size=4))
def test_a_full_id_that_starts_a_longer_one_is_ambiguous(ids: set[str]) -> None:
    """No exact match wins: an id that is also the start of another is as ambiguous as
    any shared prefix (ids are all 12 digits, so only a prefix can be)."""
    shorter = min(ids)
    everything = ids | {shorter + "0"}
    with pytest.raises(InvalidInput):
        _lookup(everything, shorter)


@settings(deadline=None, max_examples=60)
@given(
    ids=st.sets(_ids, max_size=3),
    given_=st.text(max_size=MIN_PREFIX - 1)
    | st.text(min_size=MIN_PREFIX).filter(
        lambda t: any(c not in "0123456789abcdef" for c in t.strip().lower())
    ),
)
def test_a_reference_that_is_no_id_is_invalid_input(ids: set[str], given_: str) -> None:
    """Fewer than MIN_PREFIX hex digits, or anything but hex, is InvalidInput quoting it,
    whatever the table holds."""
    ref = given_.strip().lower()
    if len(ref) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in ref):
        return  # trimming left a valid reference: the first test's ground
    with pytest.raises(InvalidInput) as bad:
        _lookup(ids, given_)
    assert bad.value.message == f"bad {given_!r} {ref!r} {MIN_PREFIX}"


def test_a_like_wildcard_never_matches_as_one() -> None:
    """``_`` and ``%`` are not hex, so a reference holding them is refused, not matched."""
    for given_ in ("ab_d", "ab%d", "____"):
        with pytest.raises(InvalidInput):
            _lookup({"abcd0000"}, given_)


# -- each caller's words, byte for byte --------------------------------------------


def _store(tmp_path: Path, body: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def _add_tasks(store: Store, *ids: str) -> None:
    now = time.time()
    rows = [
        {"id": i, "text": "t", "state": "completed", "priority": 0, "created_at": now}
        | {"updated_at": now}
        for i in ids
    ]

    async def apply(conn: AsyncConnection) -> None:
        await conn.execute(tasks.insert(), rows)

    await store.write(apply)


async def _message(call: Awaitable[Any]) -> tuple[str, str]:
    try:
        await call
    except (InvalidInput, NotFound) as exc:
        return type(exc).__name__, exc.message
    raise AssertionError("no error")


def test_approval_ids_are_refused_in_the_words_they_always_were(tmp_path: Path) -> None:
    """``tale approve`` with a bad, unknown or ambiguous id says what it always said."""

    async def body(store: Store) -> list[tuple[str, str]]:
        await _add_tasks(store, "feed00000000")
        rows = [
            {
                "id": i,
                "task_id": "feed00000000",
                "call_id": i,
                "kind": "tool",
                "tool": "run",
                "arguments": "{}",
                "summary": "run: true",
                "state": "pending",
                "created_at": time.time(),
            }
            for i in ("abcd00000001", "abcd00000002")
        ]

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(approvals.insert(), rows)

        await store.write(apply)
        acting = ActingRecords(store)
        return [await _message(acting.get(ref)) for ref in (" XYZ ", "ffff", "ABCD")]

    assert _store(tmp_path, body) == [
        (
            "InvalidInput",
            "approval id 'xyz': give at least 4 hex digits of an id `tale approvals` lists",
        ),
        ("NotFound", "no approval with id ffff; `tale approvals` lists the pending ones"),
        ("InvalidInput", "more than one approval starts with abcd; give more digits"),
    ]


def test_schedule_ids_are_refused_in_the_words_they_always_were(tmp_path: Path) -> None:
    """``tale schedules pause`` with a bad, unknown or ambiguous id says what it always said."""

    async def body(store: Store) -> list[tuple[str, str]]:
        now = time.time()
        rows = [
            {
                "id": i,
                "text": "t",
                "priority": 0,
                "kind": "every",
                "expression": "hourly",
                "timezone": "UTC",
                "state": "active",
                "missed_policy": "skip",
                "created_at": now,
                "updated_at": now,
            }
            for i in ("abcd00000001", "abcd00000002")
        ]

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(schedules.insert(), rows)

        await store.write(apply)
        records = ScheduleRecords(store)
        return [await _message(records.get(ref)) for ref in ("ab", "ffff", "abcd")]

    assert _store(tmp_path, body) == [
        (
            "InvalidInput",
            "schedule id 'ab': give at least 4 hex digits of an id `tale schedules` lists",
        ),
        ("NotFound", "no schedule with id ffff; `tale schedules` lists them"),
        ("InvalidInput", "more than one schedule starts with abcd; give more digits"),
    ]


def test_after_ids_are_refused_in_the_words_they_always_were(tmp_path: Path) -> None:
    """``tale submit --after`` with a bad, unknown or ambiguous id says what it always said."""

    async def body(store: Store) -> list[tuple[str, str]]:
        await _add_tasks(store, "abcd00000001", "abcd00000002")
        return [
            await _message(store.submit("next", 0, after=[ref])) for ref in (" AB ", "ffff", "ABCD")
        ]

    assert _store(tmp_path, body) == [
        (
            "InvalidInput",
            "after ' AB ': give a task id, or at least 4 of its hex digits (`tale list` shows "
            "the ids)",
        ),
        ("NotFound", "after ffff: no task with that id; `tale list` shows the ids"),
        (
            "InvalidInput",
            "after abcd: more than one task starts with abcd (abcd00000001, abcd00000002, ...); "
            "give more digits",
        ),
    ]


def test_a_task_is_named_by_its_id_or_a_unique_prefix_of_it(tmp_path: Path) -> None:
    """A whole id is taken as it is; a prefix of 4+ digits (any case, spaces around)
    names the one task it starts."""

    async def body(store: Store) -> list[str]:
        await _add_tasks(store, "abcd00000001", "abcd00000002", "beef00000001")
        return [await store.task_id(ref) for ref in ("abcd00000002", "BEEF", " abcd00000001 ")]

    assert _store(tmp_path, body) == ["abcd00000002", "beef00000001", "abcd00000001"]


def test_a_task_prefix_that_is_bad_unknown_or_ambiguous_is_refused_saying_so(
    tmp_path: Path,
) -> None:
    """`tale status abc`, `tale cancel ffff`, `tale pause abcd` when two ids start so."""

    async def body(store: Store) -> list[tuple[str, str]]:
        await _add_tasks(store, "abcd00000001", "abcd00000002")
        return [await _message(store.task_id(ref)) for ref in ("abc", "ffff", "abcd")]

    assert _store(tmp_path, body) == [
        (
            "InvalidInput",
            "'abc' is not a task id: give it, or at least 4 of its hex digits (`tale list` "
            "shows the ids)",
        ),
        ("NotFound", "no task id starts with ffff; `tale list` shows the ids"),
        (
            "InvalidInput",
            "more than one task id starts with abcd (abcd00000001, abcd00000002, ...); give "
            "more digits",
        ),
    ]
