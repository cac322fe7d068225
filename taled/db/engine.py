"""How the daemon talks to SQLite: the connections, the migrations, the one writer.

SQLAlchemy 2 (async, Core) over aiosqlite, in WAL mode. All writes go through one
writer task that group-commits whatever is waiting in a single ``BEGIN IMMEDIATE``
transaction, each operation inside its own savepoint when it has company, so a burst
of writes costs one fsync instead of one each. Rows written with ``write_row`` go
further: those waiting for the same insert share one ``executemany``. Reads use a small
pool of separate connections and never wait behind the writer. Every statement is one
round trip to SQLite's thread (``taled.db.driver``). A point read a person polls for
(``get_task``) skips even that: ``read_now`` runs it on the event loop's own thread.

Every connection runs with ``secure_delete``: what a delete or an update frees is
overwritten with zeros, so a forgotten task's text does not linger in free space
(``taled.retention``). ``scrub()`` goes further when a task is forgotten: it rewrites the
whole file (``VACUUM``, which also drops what older versions of tale left in free space)
and empties the write-ahead log (``wal_checkpoint(TRUNCATE)``), in the writer's turn.

The schema is versioned with ``PRAGMA user_version``: ``open()`` applies the entries
of ``taled.db.schema.MIGRATIONS`` the file has not had yet, in order.

A driver's error leaves this module as the daemon's own (``taled.errors``): a full
disk is ``DiskFull``, a damaged file ``StoreDamaged`` (with the hint to run ``tale
doctor``), anything else a ``TaleError`` with SQLite's message, never SQLAlchemy's.

What a task is, and every other table's meaning, is the repositories' business
(``taled.db.store``, ``taled.db.acting``); only modules of ``taled.db`` use this one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import BindParameter, ClauseElement, event
from sqlalchemy.dialects.sqlite.base import SQLiteCompiler, SQLiteDialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from taled.db import driver
from taled.db.schema import MIGRATIONS, SCHEMA_VERSION
from taled.doctor import DOCTOR_HINT, is_damage, replace_backups, sqlite_code, take_backup
from taled.errors import DiskFull, StoreDamaged, TaleError, Unavailable, is_no_space
from taled.settings import StoreSettings

__all__ = ["Database", "InsertMany", "RawRead", "RawWrite", "fetch", "raw_sql"]

log = logging.getLogger(__name__)

T = TypeVar("T")

InsertMany = Callable[[AsyncConnection, Sequence[dict[str, Any]]], Awaitable[None]]
"""Writes a batch of rows in one go (see ``Database.write_row``)."""

RawWrite = Callable[[sqlite3.Connection], Any]
"""A write on SQLite's own connection, run on its thread (see ``Database.write_raw``)."""

RawRead = Callable[[sqlite3.Connection], T]
"""A read on SQLite's own connection (see ``Database.read_now``)."""

_Outcome = tuple[Any, BaseException | None]


class _RawCompiler(SQLiteCompiler):
    """SQLite's compiler, with the statement's own constants written into the SQL.

    A raw statement is run with only the parameters its caller names, so a constant
    (``state NOT IN ('failed', ...)``, which SQLAlchemy would expand at execution)
    must be part of its text. Named ``bindparam``s stay ``:name`` placeholders."""

    def visit_bindparam(  # type: ignore[override]
        self, bindparam: BindParameter[Any], literal_binds: bool = False, **kw: Any
    ) -> str:
        # unique: an anonymous value given in the statement itself, not a :name.
        literal = literal_binds or bindparam.unique
        if literal and isinstance(bindparam.effective_value, float):
            # SQLite reads a float's text back to within its last digit, not exactly.
            raise TypeError(
                f"raw_sql cannot write the float {bindparam.effective_value!r} into SQL "
                "exactly: give it as a named parameter (sa.bindparam)"
            )
        text: str = super().visit_bindparam(  # type: ignore[no-untyped-call]
            bindparam, literal_binds=literal, **kw
        )
        return text


class _RawDialect(SQLiteDialect):
    statement_compiler = _RawCompiler


_NAMED = _RawDialect(paramstyle="named")


def raw_sql(statement: ClauseElement, columns: Sequence[str] = ()) -> str:
    """A SQLAlchemy statement as SQL text for a raw read or write (``:name``
    parameters, constants written in): the schema stays the one source of table and
    column names. ``columns``: an insert's."""
    return str(statement.compile(dialect=_NAMED, column_keys=list(columns) or None))


def fetch(conn: sqlite3.Connection, sql: str, params: Mapping[str, Any]) -> list[Any]:
    """The rows of a raw read, each a named tuple (``row.state``, as SQLAlchemy's rows)."""
    cursor = conn.execute(sql, params)
    try:
        row_type = _row_type(tuple(column[0] for column in cursor.description))
        return [row_type._make(values) for values in cursor.fetchall()]
    finally:
        cursor.close()


@functools.cache
def _row_type(columns: tuple[str, ...]) -> Any:
    # One class per statement's columns, made once (making one costs ~0.4 ms).
    return collections.namedtuple("Row", columns)


@dataclass
class _WriteOp:
    future: asyncio.Future[Any]
    fn: Callable[[AsyncConnection], Awaitable[Any]] | None = None
    # Run in a thread after the batch commits, outside any transaction (VACUUM).
    alone: Callable[[], Any] | None = None
    # Rows for the same insert are batched into one executemany instead of a savepoint each.
    insert: InsertMany | None = None
    row: dict[str, Any] | None = None
    # Run on SQLite's thread with the driver's connection (Database.write_raw).
    raw: RawWrite | None = None


class Database:
    """One SQLite file: a writer that group-commits, and a pool of readers.

    ``open()`` before use, ``close()`` after.
    """

    def __init__(
        self,
        path: Path,
        settings: StoreSettings,
        write_batch_max: int,
        *,
        on_settled: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = path
        self._settings = settings
        self._batch_max = write_batch_max
        # Told after each group commit of ``write`` operations whether it committed
        # (True) or was rolled back (False), before any caller is answered.
        self._on_settled = on_settled
        self._writer_engine: AsyncEngine | None = None
        self._reader_engine: AsyncEngine | None = None
        self._wconn: AsyncConnection | None = None
        # The writer's own aiosqlite connection, under SQLAlchemy's (for raw writes).
        self._driver: driver.Connection | None = None
        # The event loop's own connection, for read_now.
        self._now: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_WriteOp] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._damage_logged = False
        # One backup operation at a time (see replace_backups).
        self._backing_up = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite+aiosqlite:///{self.path}"
        self._writer_engine = self._engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
        # Reads are single statements, so they need no BEGIN (and no ROLLBACK on
        # return to the pool): each is its own consistent snapshot under WAL.
        self._reader_engine = self._engine(
            url, begin=None, pool_size=self._settings.read_connections
        )
        try:
            self._wconn = await self._writer_engine.connect()
            await self._migrate(self._wconn)
            self._driver = await _driver_of(self._wconn)
            self._now = self._loop_connection()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            # Start-up's check (taled.doctor) catches most damage first; this is the rest.
            damaged = self._damaged(exc)
            if damaged is None:
                raise
            raise damaged from None
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        """Flush pending writes, stop the writer and close every connection."""
        self._closing = True
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._wconn is not None:
            await self._wconn.close()
            self._wconn = None
        if self._now is not None:
            self._now.close()
            self._now = None
        for engine in (self._writer_engine, self._reader_engine):
            if engine is not None:
                await engine.dispose()

    def _loop_connection(self) -> sqlite3.Connection:
        """The connection ``read_now`` reads with, on the event loop's thread.

        It never waits for a lock (``timeout=0``: the loop must not stall) and cannot
        write (``query_only``); the file is in WAL mode already (``_migrate``)."""
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _engine(self, url: str, *, begin: str | None, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(
            url,
            # aiosqlite with one trip to SQLite's thread per statement (taled.db.driver).
            async_creator=functools.partial(driver.connect, self.path),
            pool_size=pool_size,
            max_overflow=0,
            pool_reset_on_return="rollback" if begin else None,
        )
        pragmas = (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA synchronous={self._settings.synchronous.upper()}",
            f"PRAGMA busy_timeout={self._settings.busy_timeout_ms}",
            "PRAGMA foreign_keys=ON",
            # Freed content is zeroed: deleted text leaves no trace in free space.
            "PRAGMA secure_delete=ON",
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver so BEGIN IMMEDIATE and
            # SAVEPOINT behave as written (the pysqlite recipe in SQLAlchemy's docs).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            for pragma in pragmas:
                cursor.execute(pragma)
            cursor.close()

        if begin is not None:

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql(begin)

        return engine

    async def _migrate(self, conn: AsyncConnection) -> None:
        async with conn.begin():
            version = (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()
            if version > SCHEMA_VERSION:
                raise TaleError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"tale understands ({SCHEMA_VERSION}); upgrade tale"
                )
            for target in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[target]:
                    await conn.exec_driver_sql(statement)
                log.info("store migrated to schema version %d", target + 1)
            await conn.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def schema_version(self) -> int:
        """The schema version recorded in the database file."""
        async with self.read() as conn:
            return int((await conn.exec_driver_sql("PRAGMA user_version")).scalar_one())

    # -- the writer --------------------------------------------------------

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` inside the next group commit; if it fails, none of it is kept and
        the batch's other writes are."""
        loop = asyncio.get_running_loop()
        result: T = await self._enqueue(_WriteOp(future=loop.create_future(), fn=fn))
        return result

    async def write_row(self, insert: InsertMany, row: dict[str, Any]) -> None:
        """Have ``insert`` write ``row`` in the next group commit; returns once committed.

        Every row waiting for the same ``insert`` goes in one call of it, ahead of the
        batch's other writes and outside their savepoints: a burst costs one
        ``executemany``, and a row that fails fails its whole batch.
        """
        loop = asyncio.get_running_loop()
        await self._enqueue(_WriteOp(future=loop.create_future(), insert=insert, row=row))

    async def write_raw(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with SQLite's own connection, on its thread, inside the next group
        commit; if it fails, none of it is kept and the batch's other writes are.

        For the writes a person waits for (a chat turn's messages, the ledger): a batch
        of nothing else is one round trip to the thread from BEGIN to COMMIT, where a
        write through SQLAlchemy is one per statement besides those two (~0.3 ms each).
        """
        loop = asyncio.get_running_loop()
        result: T = await self._enqueue(_WriteOp(future=loop.create_future(), raw=fn))
        return result

    def write_raw_nowait(self, fn: RawWrite) -> asyncio.Future[Any] | None:
        """``write_raw`` without waiting for the commit.

        Returns the future its outcome is set on, or None (nothing queued) when the
        database is closed or closing. The writer is FIFO: ``fn`` commits before any
        write queued after it, and ``close()`` drains it.
        """
        loop = asyncio.get_running_loop()
        op = _WriteOp(future=loop.create_future(), raw=fn)
        if self._closing or self._writer is None:
            return None
        self._queue.put_nowait(op)
        return op.future

    async def scrub(self) -> bool:
        """Rewrite the database without free space (VACUUM), then empty its write-ahead
        log (checkpoint, TRUNCATE): no byte of a deleted row is left in either file.

        Runs in the writer's turn, after the writes queued before it commit and before
        those queued after it (they wait; readers go on). True when the log was emptied;
        False when a reader kept it busy past the busy timeout (the text is then still in
        the log until its next checkpoint).
        """
        loop = asyncio.get_running_loop()
        done: bool = await self._enqueue(
            _WriteOp(future=loop.create_future(), alone=self._scrub_sync)
        )
        return done

    def _scrub_sync(self) -> bool:
        # A connection of its own: the writer's is between batches and holds no lock, and
        # VACUUM must run outside a transaction (the writer's begins one for any statement).
        conn = sqlite3.connect(self.path, timeout=self._settings.busy_timeout_ms / 1000)
        try:
            conn.isolation_level = None
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("VACUUM")
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return not busy
        finally:
            conn.close()

    async def _enqueue(self, op: _WriteOp) -> Any:
        if self._closing or self._writer is None:
            raise Unavailable("the store is closed; the daemon is shutting down")
        self._queue.put_nowait(op)
        return await op.future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                writes = [op for op in batch if op.alone is None]
                if writes:
                    await self._commit_batch(writes)
                for op in batch:
                    if op.alone is not None:
                        await self._run_alone(op)
            except Exception as exc:
                # A bug in one write must not stop every later write: its callers
                # get the error, the batch is rolled back, the writer goes on.
                log.exception("a batch of %d writes failed", len(batch))
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(TaleError(f"internal error while writing: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_batch(self, batch: list[_WriteOp]) -> None:
        if all(op.raw is not None for op in batch):
            await self._commit_raw(batch)
            return
        conn = self._wconn
        assert conn is not None and self._driver is not None
        rows = [op for op in batch if op.insert is not None]
        writes = [op for op in batch if op.fn is not None or op.raw is not None]
        # A write through SQLAlchemy gets a savepoint of its own (two more statements,
        # each a round trip to the driver's thread) only beside another write: alone,
        # the transaction is its undo, and the rows it takes with it when it fails are
        # written again on their own.
        isolate = len(writes) > 1
        results: list[tuple[_WriteOp, Any, BaseException | None]] = []
        committed = False
        try:
            async with conn.begin() as transaction:
                grouped: dict[InsertMany, list[_WriteOp]] = {}
                for op in rows:
                    assert op.insert is not None
                    grouped.setdefault(op.insert, []).append(op)
                for insert, ops in grouped.items():
                    await insert(conn, [op.row for op in ops if op.row is not None])
                for op in writes:
                    if op.raw is not None:
                        [(value, error)] = await self._driver.call(
                            functools.partial(_apply_raw, fns=[op.raw])
                        )
                        results.append((op, value, error and self._write_error(error)))
                        continue
                    assert op.fn is not None
                    undo = await conn.begin_nested() if isolate else transaction
                    try:
                        value = await op.fn(conn)
                    except (TaleError, SQLAlchemyError) as exc:
                        await undo.rollback()
                        results.append((op, None, self._write_error(exc)))
                    else:
                        if isolate:
                            await undo.commit()
                        results.append((op, value, None))
                undone = not transaction.is_active
            committed = not undone
            if committed:
                results.extend((op, None, None) for op in rows)
        except (SQLAlchemyError, sqlite3.Error) as exc:
            self._fail(batch, exc)
            return
        finally:
            if self._on_settled is not None:
                self._on_settled(committed)
        self._answer(results)
        if rows and not committed:
            await self._commit_batch(rows)

    async def _commit_raw(self, batch: list[_WriteOp]) -> None:
        """A batch of raw writes: BEGIN to COMMIT in one trip to SQLite's thread."""
        assert self._driver is not None
        fns = [op.raw for op in batch if op.raw is not None]
        committed = False
        try:
            committed, outcomes = await self._driver.call(functools.partial(_transact_raw, fns=fns))
        except sqlite3.Error as exc:
            self._fail(batch, exc)
            return
        finally:
            if self._on_settled is not None:
                self._on_settled(committed)
        self._answer(
            [
                (op, value, error and self._write_error(error))
                for op, (value, error) in zip(batch, outcomes, strict=True)
            ]
        )

    def _fail(self, batch: list[_WriteOp], exc: BaseException) -> None:
        """A batch that did not commit: every caller gets the store's error."""
        failure = self._write_error(exc)
        if isinstance(failure, DiskFull | StoreDamaged):
            # Expected, and said once per batch: a traceback would say nothing more.
            log.warning("%d writes not committed: %s", len(batch), failure.message)
        else:
            log.exception("group commit of %d writes failed", len(batch))
        for op in batch:
            if not op.future.done():
                op.future.set_exception(failure)

    @staticmethod
    def _answer(results: list[tuple[_WriteOp, Any, BaseException | None]]) -> None:
        """Answer the callers of a committed batch (only now is everything durable)."""
        for op, value, error in results:
            if op.future.done():
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)

    async def _run_alone(self, op: _WriteOp) -> None:
        """Run an operation that needs the database to itself (no transaction open)."""
        assert op.alone is not None
        try:
            value = await asyncio.to_thread(op.alone)
        except (sqlite3.Error, OSError) as exc:
            failure: TaleError | None = DiskFull(str(self.path)) if _disk_full(exc) else None
            failure = failure or self._damaged(exc)
            op.future.set_exception(
                failure or TaleError(f"the store could not rewrite {self.path}: {exc}")
            )
        else:
            op.future.set_result(value)

    def _write_error(self, exc: BaseException) -> BaseException:
        """A driver's error as the store's own: DiskFull when the disk is full, else
        a TaleError with the database's message (never SQLAlchemy's URL)."""
        if not isinstance(exc, SQLAlchemyError | sqlite3.Error):
            return exc
        cause = getattr(exc, "orig", None) or exc
        if _disk_full(cause):
            return DiskFull(str(self.path))
        damaged = self._damaged(exc)
        if damaged is not None:
            return damaged
        return TaleError(f"the store could not write to {self.path}: {cause}")

    # -- readers -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A reader connection (``async with database.read() as conn``)."""
        if self._reader_engine is None:
            raise Unavailable("the store is not open")
        try:
            async with self._reader_engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            # A damaged page found by a query: say so, not the driver's SQL statement.
            damaged = self._damaged(exc)
            if damaged is None:
                raise
            raise damaged from exc

    async def read_now(self, fn: RawRead[T]) -> T:
        """Run ``fn`` with SQLite's own connection at once, on the event loop's thread.

        For the point reads a person polls (a task by its id, and its subtasks). SQLite
        answers one from its cache in tens of µs, less than the loop spends on a trip to
        a reader's thread; and the answer waits for no other thread to be scheduled,
        which on a machine whose cores llama.cpp holds takes milliseconds
        (docs/benchmarks.md). Never for a read that scans: the loop waits for it.

        A read the file refuses for the moment (SQLITE_BUSY: a checkpoint truncating the
        log, a recovery) is run again on a reader's thread, which waits as readers do.
        """
        if self._now is None:
            raise Unavailable("the store is not open")
        try:
            return fn(self._now)
        except sqlite3.Error as exc:
            if not _busy(exc):
                raise self._read_error(exc) from exc
        async with self.read() as conn:
            reader = await _driver_of(conn)
            try:
                return await reader.call(fn)
            except sqlite3.Error as exc:
                raise self._read_error(exc) from exc

    def _read_error(self, exc: sqlite3.Error) -> TaleError:
        """A raw read's error as the store's own (StoreDamaged for a damaged file)."""
        return self._damaged(exc) or TaleError(f"the store could not read {self.path}: {exc}")

    def _damaged(self, exc: BaseException) -> StoreDamaged | None:
        """StoreDamaged when a driver's error says the file is damaged (logged once)."""
        cause = getattr(exc, "orig", None) or exc
        if not is_damage(cause):
            return None
        if not self._damage_logged:
            self._damage_logged = True
            log.error("the database %s is damaged: %s; %s", self.path, cause, DOCTOR_HINT)
        return StoreDamaged(f"the database {self.path} is damaged ({cause}); {DOCTOR_HINT}")

    # -- backups -----------------------------------------------------------

    async def backup(self, directory: Path, keep: int) -> Path | None:
        """Back the database up into ``directory``, keeping the newest ``keep`` backups.

        None when nothing changed since the newest backup. Runs in a thread with one
        read snapshot (see ``taled.doctor.take_backup``): the writer never waits for it.
        """
        async with self._backing_up:
            return await asyncio.to_thread(take_backup, self.path, directory, keep)

    async def replace_backups(self, directory: Path, *, take: bool) -> Path | None:
        """Replace the backups in ``directory`` by one taken now (``take``) or by none
        (see ``taled.doctor.replace_backups``); the fresh one's path.

        A backup under way (its snapshot maybe older than a deletion) finishes first, and
        goes with the others."""
        async with self._backing_up:
            return await asyncio.to_thread(replace_backups, self.path, directory, take=take)


async def _driver_of(conn: AsyncConnection) -> driver.Connection:
    """The aiosqlite connection (``taled.db.driver``) under a SQLAlchemy connection."""
    raw = await conn.get_raw_connection()
    assert isinstance(raw.driver_connection, driver.Connection)
    return raw.driver_connection


def _apply_raw(conn: sqlite3.Connection, fns: Sequence[RawWrite]) -> list[_Outcome]:
    """Run raw writes on SQLite's thread, inside an open transaction, each in a
    savepoint of its own (on the thread it costs no trip): a failure is its outcome."""
    outcomes: list[_Outcome] = []
    for fn in fns:
        conn.execute("SAVEPOINT raw_write")
        try:
            value = fn(conn)
        except (sqlite3.Error, TaleError) as exc:
            conn.execute("ROLLBACK TO raw_write")
            conn.execute("RELEASE raw_write")
            outcomes.append((None, exc))
        else:
            conn.execute("RELEASE raw_write")
            outcomes.append((value, None))
    return outcomes


def _transact_raw(conn: sqlite3.Connection, fns: Sequence[RawWrite]) -> tuple[bool, list[_Outcome]]:
    """BEGIN IMMEDIATE, the raw writes, COMMIT, on SQLite's thread; (committed, outcomes).

    Alone, a write's undo is the transaction; beside others, a savepoint of its own.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if len(fns) == 1:
            try:
                outcomes: list[_Outcome] = [(fns[0](conn), None)]
            except (sqlite3.Error, TaleError) as exc:
                conn.execute("ROLLBACK")
                return False, [(None, exc)]
        else:
            outcomes = _apply_raw(conn, fns)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return True, outcomes


def _busy(error: sqlite3.Error) -> bool:
    """Whether SQLite refused for a lock held elsewhere (SQLITE_BUSY or SQLITE_LOCKED)."""
    return sqlite_code(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _disk_full(error: BaseException) -> bool:
    """Whether a database error is SQLite's SQLITE_FULL or an OS "no space" error."""
    if isinstance(error, sqlite3.Error):
        return sqlite_code(error) == sqlite3.SQLITE_FULL
    return is_no_space(error)
