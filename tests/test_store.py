"""The SQLite store: schema versioning, group commit, durability."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from taled.db.engine import raw_sql
from taled.db.schema import MIGRATIONS, SCHEMA_VERSION
from taled.db.store import AttemptKey, CallRecord, Store, SubtaskSpec, TaskRecord
from taled.errors import NotFound, TaleError
from taled.settings import StoreSettings
from taled.tasks.lifecycle import TaskState


def _store(path: Path) -> Store:
    return Store(path, StoreSettings(), write_batch_max=256)


def test_a_new_database_is_at_the_current_schema_version(tmp_path: Path) -> None:
    """Opening an empty file creates the schema and records its version."""

    async def run() -> int:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            return await store.schema_version()
        finally:
            await store.close()

    assert asyncio.run(run()) == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tasks", "transitions", "model_calls"} <= tables


def test_a_database_from_a_newer_tale_is_refused(tmp_path: Path) -> None:
    """A schema version above ours is an error that says to upgrade, and nothing is changed."""
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")

    async def run() -> None:
        store = _store(tmp_path / "t.db")
        try:
            await store.open()
        finally:
            await store.close()

    with pytest.raises(TaleError, match="upgrade tale"):
        asyncio.run(run())


def test_a_version_1_database_migrates_without_losing_data(tmp_path: Path) -> None:
    """A database written by the first release opens at the current version, rows intact."""
    with sqlite3.connect(tmp_path / "t.db") as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO tasks (id, text, state, priority, result, created_at, updated_at) "
            "VALUES ('aaaaaaaaaaaa', 'old task', 'completed', 50, 'done', 1.0, 2.0)"
        )
        db.execute(
            "INSERT INTO model_calls (at, task_id, role, backend, model, prompt_tokens, "
            "completion_tokens, load_ms, prompt_ms, generation_ms, total_ms, success) "
            "VALUES (1.5, 'aaaaaaaaaaaa', 'task', 'llamacpp', 'smollm2-135m', 7, 9, 0, 1, 2, 3, 1)"
        )
        db.execute("PRAGMA user_version=1")

    async def run() -> tuple[int, str | None, str | None, int]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            task = await store.get_task("aaaaaaaaaaaa")
            usage = await store.usage()
            return await store.schema_version(), task.result, task.model, usage["total"]["calls"]
        finally:
            await store.close()

    assert asyncio.run(run()) == (SCHEMA_VERSION, "done", None, 1)
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT route, counts_exact FROM model_calls").fetchall() == [("role", 1)]


def _v9_database_with_calls(path: Path, calls: list[tuple[str | None, str | None]]) -> None:
    """A schema-9 database whose ledger holds one call per (step, note)."""
    with sqlite3.connect(path) as db:
        for statements in MIGRATIONS[:9]:
            for statement in statements:
                db.execute(statement)
        db.executemany(
            "INSERT INTO model_calls (at, task_id, role, backend, model, prompt_tokens, "
            "completion_tokens, load_ms, prompt_ms, generation_ms, total_ms, success, step, "
            "note) VALUES (1.5, 'a', 'task', 'llamacpp', 'm', 7, 9, 0, 1, 2, 3, 1, ?, ?)",
            calls,
        )
        db.execute("PRAGMA user_version=9")


def _migrated(path: Path, columns: str) -> list[tuple[Any, ...]]:
    async def run() -> int:
        store = _store(path)
        await store.open()
        try:
            return await store.schema_version()
        finally:
            await store.close()

    assert asyncio.run(run()) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT {columns} FROM model_calls ORDER BY seq").fetchall()


def test_a_version_9_ledger_splits_attempt_numbers_out_of_its_steps(tmp_path: Path) -> None:
    """Legacy steps named ``answer#2`` become step ``answer``, attempt 2; the rest attempt 1."""
    steps = ["answer", "answer#2", "plan#3", "s2", "s2#12", "intent", None, "odd#x"]
    _v9_database_with_calls(tmp_path / "t.db", [(s, None) for s in steps])
    assert _migrated(tmp_path / "t.db", "step, attempt") == [
        ("answer", 1),
        ("answer", 2),
        ("plan", 3),
        ("s2", 1),
        ("s2", 12),
        ("intent", 1),
        (None, 1),
        ("odd#x", 1),
    ]


def test_a_version_9_ledger_marks_the_calls_its_note_says_looped(tmp_path: Path) -> None:
    """A call whose note says the pool stopped it repeating itself is marked looped."""
    notes = [None, "stopped repeating itself; kept 40 characters", "task model x was down: y"]
    _v9_database_with_calls(tmp_path / "t.db", [("answer", n) for n in notes])
    assert _migrated(tmp_path / "t.db", "looped") == [(0,), (1,), (0,)]


def test_a_new_ledger_row_keeps_its_step_and_attempt_apart(tmp_path: Path) -> None:
    """A call recorded for the second attempt at ``answer`` is stored as step ``answer``,
    attempt 2; a call without a key has neither."""

    async def run() -> None:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            for key in (AttemptKey("answer", 2), None):
                store.record_call(
                    CallRecord(
                        "task", "llamacpp", "m", None, 1, 2, 0.0, 0.0, 0.0, 0.0, True, key=key
                    )
                )
            await store.ledger_settled()
        finally:
            await store.close()

    asyncio.run(run())
    with sqlite3.connect(tmp_path / "t.db") as db:
        rows = db.execute("SELECT step, attempt FROM model_calls ORDER BY seq").fetchall()
    assert rows == [("answer", 2), (None, 1)]


def test_reopening_keeps_every_task(tmp_path: Path) -> None:
    """Tasks written before a close are all there after reopening (migrations are no-ops)."""

    async def write() -> list[str]:
        store = _store(tmp_path / "t.db")
        await store.open()
        ids = [(await store.submit(f"task {i}", i)).id for i in range(5)]
        await store.close()
        return ids

    async def read(ids: list[str]) -> list[str]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            return [(await store.get_task(i)).text for i in ids]
        finally:
            await store.close()

    ids = asyncio.run(write())
    assert asyncio.run(read(ids)) == [f"task {i}" for i in range(5)]


def test_concurrent_submits_all_get_distinct_ids_and_are_stored(tmp_path: Path) -> None:
    """A burst of 500 concurrent submits (group-committed together) stores every one."""

    async def run() -> tuple[int, int]:
        store = _store(tmp_path / "t.db")
        await store.open()
        records = await asyncio.gather(*(store.submit(f"t{i}", 50) for i in range(500)))
        await store.close()
        return len({r.id for r in records}), len(records)

    unique, total = asyncio.run(run())
    assert unique == total == 500
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 500
        assert db.execute("SELECT count(*) FROM transitions").fetchone()[0] == 500


def test_a_failing_write_does_not_spoil_its_batch(tmp_path: Path) -> None:
    """An illegal transition in a group commit fails alone; the other writes commit."""

    async def run() -> tuple[list[object], TaskState]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            task = await store.submit("x", 50)
            other = await store.submit("y", 50)
            outcomes = await asyncio.gather(
                store.transition(task.id, TaskState.COMPLETED, "illegal from queued"),
                store.transition("0123456789ab", TaskState.CANCELLED, "unknown"),
                store.transition(other.id, TaskState.CANCELLED, "legal"),
                return_exceptions=True,
            )
            return outcomes, (await store.get_task(other.id)).state
        finally:
            await store.close()

    outcomes, other_state = asyncio.run(run())
    assert type(outcomes[0]).__name__ == "IllegalTransition"
    assert isinstance(outcomes[1], NotFound)
    assert outcomes[2] == TaskState.QUEUED
    assert other_state == TaskState.CANCELLED


def test_the_writer_outlives_a_write_that_raises_unexpectedly(tmp_path: Path) -> None:
    """A write that raises a non-store error fails alone; later writes still commit."""

    async def broken(_conn: object) -> None:
        raise RuntimeError("boom")

    async def run() -> tuple[BaseException | None, str]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            failure: BaseException | None = None
            try:
                await store.write(broken)  # type: ignore[arg-type]
            except TaleError as exc:
                failure = exc
            task = await asyncio.wait_for(store.submit("after", 50), timeout=10)
            return failure, (await store.get_task(task.id)).text
        finally:
            # Without the fix the writer is dead and close() would wait forever.
            await asyncio.wait_for(store.close(), timeout=10)

    failure, text = asyncio.run(run())
    assert failure is not None and "boom" in str(failure)
    assert text == "after"


def test_watchers_are_told_of_committed_moves_only_in_order(tmp_path: Path) -> None:
    """Store.watch sees each state change once it committed, in order; a write that
    failed after moving a task (its savepoint undone) tells nothing, and a watcher that
    raises changes nothing for the write or the other watchers."""
    from taled.db import store as store_module

    seen: list[tuple[str, str]] = []

    def broken(_moved: store_module.Moved) -> None:
        raise RuntimeError("a broken watcher")

    async def run() -> TaskState:
        store = _store(tmp_path / "t.db")
        store.watch(broken)
        store.watch(lambda m: seen.append((m.from_state.value, m.to_state.value)))
        await store.open()
        try:
            task = await store.submit("a task", 50)
            await store.transition(task.id, TaskState.RUNNING, "claimed")

            async def move_then_fail(conn: Any) -> None:
                await store_module._move(conn, task.id, TaskState.RUNNING, TaskState.PAUSED, "x")
                raise TaleError("changed its mind")

            with pytest.raises(TaleError, match="changed its mind"):
                await store.write(move_then_fail)
            await store.transition(task.id, TaskState.COMPLETED, "done", result="ok")
            return (await store.get_task(task.id)).state
        finally:
            await store.close()

    assert asyncio.run(run()) is TaskState.COMPLETED
    assert seen == [("queued", "running"), ("running", "completed")]


def test_a_lone_failing_write_is_undone_and_the_rows_beside_it_commit(tmp_path: Path) -> None:
    """The one write of a batch runs without a savepoint: when it fails, what it did is
    undone with the transaction, and the rows that shared the batch (a submit) are
    written again on their own."""
    from taled.db import schema

    async def half_then_fail(conn: Any) -> None:
        await conn.execute(
            schema.conversations.insert().values(
                id="c0", title="half", created_at=0.0, updated_at=0.0
            )
        )
        raise TaleError("changed its mind")

    async def run() -> Sequence[object]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            return await asyncio.gather(
                store.submit("beside a failing write", 50),
                store.write(half_then_fail),
                return_exceptions=True,
            )
        finally:
            await store.close()

    outcomes = asyncio.run(run())
    assert isinstance(outcomes[1], TaleError)
    assert getattr(outcomes[0], "text", None) == "beside a failing write"
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT text FROM tasks").fetchall() == [("beside a failing write",)]
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0


def _raw_insert(cid: str, fail: bool = False) -> Any:
    def apply(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, 't', 0, 0)",
            (cid,),
        )
        if fail:  # after writing: the write must be undone
            conn.execute("INSERT INTO no_such_table VALUES (1)")
        return cid

    return apply


def _conversation_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT id FROM conversations ORDER BY id")]


def test_a_failing_raw_write_is_undone_alone_or_beside_others(tmp_path: Path) -> None:
    """A raw write that fails leaves nothing and answers with the store's error, whether
    alone in its batch (the transaction is its undo) or beside other raw writes and a
    write through SQLAlchemy (a savepoint of its own): the others commit."""

    async def run() -> tuple[object, Sequence[object]]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            alone = await asyncio.gather(
                store.write_raw(_raw_insert("a0", fail=True)), return_exceptions=True
            )
            task = await store.submit("a task", 50)
            together = await asyncio.gather(
                store.write_raw(_raw_insert("b1")),
                store.write_raw(_raw_insert("b2", fail=True)),
                store.transition(task.id, TaskState.CANCELLED, "beside raw writes"),
                store.write_raw(_raw_insert("b3")),
                return_exceptions=True,
            )
            return alone[0], together
        finally:
            await store.close()

    alone, together = asyncio.run(run())
    assert isinstance(alone, TaleError) and "no such table" in str(alone)
    assert together[0] == "b1" and together[3] == "b3"
    assert isinstance(together[1], TaleError) and "no such table" in str(together[1])
    assert together[2] == TaskState.QUEUED
    assert _conversation_ids(tmp_path / "t.db") == ["b1", "b3"]


def _trips_to_sqlite(
    tmp_path: Path,
    before: Callable[[Store], Awaitable[Any]],
    measured: Callable[[Store], Awaitable[Any]],
) -> int:
    """How many jobs ``measured`` hands to SQLite's threads (taled.db.driver), after
    ``before`` (which opens the connections it needs)."""
    from taled.db import driver

    trips = 0
    # Every job aiosqlite hands its thread goes through _execute (a commit's, a
    # rollback's, a statement's); the counter still runs it.
    run_job = aiosqlite.Connection._execute

    async def counted(self: driver.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal trips
        trips += 1
        return await run_job(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    async def run() -> int:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            await before(store)
            start = trips
            await measured(store)
            return trips - start
        finally:
            await store.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver.Connection, "_execute", counted)
        return asyncio.run(run())


def test_a_batch_of_raw_writes_is_one_trip_to_the_database_thread(tmp_path: Path) -> None:
    """BEGIN, every raw write of the batch and COMMIT run in one job on SQLite's thread."""

    async def nothing(_store: Store) -> None:
        pass

    async def three(store: Store) -> None:
        await asyncio.gather(*(store.write_raw(_raw_insert(f"c{i}")) for i in range(3)))

    assert _trips_to_sqlite(tmp_path, nothing, three) == 1
    assert _conversation_ids(tmp_path / "t.db") == ["c0", "c1", "c2"]


def test_a_read_through_sqlalchemy_is_one_trip_to_the_database_thread(tmp_path: Path) -> None:
    """A read's statement runs and fetches its rows in one job on SQLite's thread
    (taled.db.driver), not one per cursor step; and giving its connection back to the
    pool costs none (no rollback of a transaction the read never began)."""
    ids: list[str] = []

    async def submit_and_read(store: Store) -> None:
        ids.append((await store.submit("counted", 50)).id)
        await store.pending_restores()  # a reader connection is open from here on

    async def read(store: Store) -> None:
        await store.pending_restores()  # one statement

    assert _trips_to_sqlite(tmp_path, submit_and_read, read) == 1


def test_get_task_is_read_on_the_event_loops_thread_with_no_trip(tmp_path: Path) -> None:
    """A task and its subtasks, the reads `tale status` polls, are read at once on the
    event loop's thread (Database.read_now): no job waits for SQLite's threads."""
    got: list[TaskRecord] = []

    async def submit(store: Store) -> None:
        got.append(await store.submit("polled", 50))

    async def poll(store: Store) -> None:
        got.append(await store.get_task(got[0].id))
        assert await store.children(got[0].id) == []

    assert _trips_to_sqlite(tmp_path, submit, poll) == 0
    assert got[1].id == got[0].id
    assert got[1].text == "polled"
    assert [t.to_state for t in got[1].transitions] == [TaskState.QUEUED]


# Values a statement may hold as constants: text without NUL (SQLite's literals end at
# it) or lone surrogates (not encodable), integers, None and booleans.
_CONSTANTS = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.none(),
    st.booleans(),
)


# SQLAlchemy warns when it writes a NULL where a comparison could meet it; here it is
# only selected.
@pytest.mark.filterwarnings("ignore:Bound parameter .* rendering literal NULL")
@settings(max_examples=200, deadline=None)
@given(
    constants=st.lists(_CONSTANTS, min_size=1, max_size=5),
    words=st.lists(_CONSTANTS.filter(lambda v: isinstance(v, str)), min_size=1, max_size=5),
    named=st.text(max_size=20),
)
def test_raw_sql_writes_a_statements_constants_into_its_text(
    constants: list[Any], words: list[str], named: str
) -> None:
    """raw_sql writes the values a statement holds into its SQL, quoted, so SQLite
    gives them back as they were (in an IN list too, as `state NOT IN (...)` has
    them), and keeps a named parameter a :name placeholder."""
    statement = sa.select(
        *(sa.literal(value) for value in constants),
        sa.bindparam("named", type_=sa.Text),
        sa.literal(words[-1]).in_(words),
        sa.literal(words[-1] + "!").in_(words),
    )
    sql = raw_sql(statement)
    assert ":named" in sql
    with sqlite3.connect(":memory:") as db:
        row = db.execute(sql, {"named": named}).fetchone()
    *values, back, found, not_found = row
    assert values == [_as_sqlite(v) for v in constants]
    assert back == named
    assert (found, not_found) == (1, 0)


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_raw_sql_refuses_a_float_constant_it_cannot_write_exactly(value: float) -> None:
    """SQLite reads a float written as text back to within its last digit (found by the
    test above: 2.941505202154424e-294 came back as ...237e-294), so raw_sql refuses a
    float constant and says to give it as a named parameter."""
    with pytest.raises(TypeError, match="named parameter"):
        raw_sql(sa.select(sa.literal(value)))


def _as_sqlite(value: Any) -> Any:
    # SQLite has no boolean: True and False are stored as 1 and 0.
    return int(value) if isinstance(value, bool) else value


def test_a_plans_subtree_is_every_level_of_its_current_rounds_in_one_read(
    tmp_path: Path,
) -> None:
    """subtree reads what children() gives level by level (each of its parent's current
    round, in plan order) in one point read on the loop's thread: no trip to a reader."""
    seen: dict[str, Any] = {}

    async def plan(store: Store) -> None:
        await store.submit("top", 0)
        top = await store.claim_next()
        assert top is not None
        specs = [SubtaskSpec(f"s{i}", f"step {i}", f"do {i}", ()) for i in (1, 2, 3)]
        await store.add_subtasks(top, 1, specs, "planned")
        first = await store.claim_next()  # whichever step the queue gives first
        assert first is not None and first.parent_id == top.id
        seen["first"] = first.id
        inner = [SubtaskSpec(k, k, f"do {k}", ()) for k in ("a", "b")]
        await store.add_subtasks(first, 1, inner, "planned")
        seen["top"] = top.id
        # Another step as a step of a round its parent has since replaced (the planned
        # step's own round column is its plan's round: it stays).
        seen["stale"] = max({"s1", "s2", "s3"} - {first.step})
        with sqlite3.connect(tmp_path / "t.db") as db:
            db.execute("UPDATE tasks SET round = 0 WHERE step = ?", (seen["stale"],))

    async def read(store: Store) -> None:
        top = await store.get_task(seen["top"])
        seen["subtree"] = await store.subtree(top)

    assert _trips_to_sqlite(tmp_path, plan, read) == 0
    under = seen["subtree"]
    assert [t.step for t in under[seen["top"]]] == sorted({"s1", "s2", "s3"} - {seen["stale"]})
    assert [t.step for t in under[seen["first"]]] == ["a", "b"]
    assert set(under) == {seen["top"], seen["first"]}

    async def level_by_level() -> dict[str, list[TaskRecord]]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            out: dict[str, list[TaskRecord]] = {}
            todo = [await store.get_task(seen["top"])]
            while todo:
                task = todo.pop()
                if kids := await store.children(task.id, task.round):
                    out[task.id] = kids
                    todo += kids
            return out
        finally:
            await store.close()

    assert asyncio.run(level_by_level()) == under


def test_the_reads_get_task_polls_search_indexes_and_scan_no_table(tmp_path: Path) -> None:
    """get_task's reads run on the event loop's thread, which waits for them: every
    part of them (the task or its subtasks, transitions, ledger sums, dependencies) is
    an index search, never a scan that grows with the tables."""
    from taled.db.store import _CHILDREN_SQL, _SUBTREE_SQL, _TASK_BY_ID_SQL

    async def create() -> None:
        store = _store(tmp_path / "t.db")
        await store.open()
        await store.close()

    asyncio.run(create())
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql, params in (
            (_TASK_BY_ID_SQL, {"task_id": "t"}),
            (_CHILDREN_SQL, {"parent_id": "t", "round": None}),
            (_SUBTREE_SQL, {"root": "t"}),
        ):
            plan = [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            searches = [step for step in plan if step.startswith("SEARCH")]
            assert searches, plan
            # The subtree's own rows (a recursive CTE, "under") are read whole; no table is.
            assert not [s for s in plan if s.startswith("SCAN") and s != "SCAN under"], plan


def test_a_point_read_refused_for_a_lock_runs_on_a_readers_thread(tmp_path: Path) -> None:
    """The loop's connection never waits for a lock: a read SQLite refuses as busy
    (SQLITE_BUSY) there is run again on a reader's thread, which waits as readers do."""
    threads: list[str] = []

    def read(conn: sqlite3.Connection) -> int:
        threads.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
            raise busy
        return int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])

    async def run() -> int:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            await store.submit("counted", 50)
            return await store._db.read_now(read)
        finally:
            await store.close()

    assert asyncio.run(run()) == 1
    assert len(threads) == 2
    assert threads[0] == threading.main_thread().name
    assert threads[1] != threads[0]
