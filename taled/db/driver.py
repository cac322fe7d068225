"""aiosqlite with one round trip to SQLite's thread per statement.

SQLAlchemy's aiosqlite adapter makes a statement three or four round trips to the
connection's thread: it opens a cursor, executes, fetches the rows and closes the cursor,
each awaited on its own. A round trip is a wake of that thread and then of the event
loop (~60 µs on an idle machine; while llama.cpp's threads hold both cores each wake
waits for one), and SQLite itself needs ~10 µs for a point read or write. The cursor
here does all four in one job on the thread: ``execute`` runs the statement and fetches
its rows there, and ``fetch*`` and ``close`` hand back what it kept, without a trip.

It is the adapter's own aiosqlite connection, with only ``cursor()`` replaced, so
everything else (transactions, isolation level, closing) is aiosqlite's, as the adapter
expects. ``taled.db.engine`` gives it to SQLAlchemy as the engine's ``async_creator``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite

__all__ = ["Connection", "connect"]

P = ParamSpec("P")
T = TypeVar("T")

_Description = tuple[tuple[Any, ...], ...] | None
_Outcome = tuple[list[Any], _Description, int, int | None]


class _Cursor:
    """The part of aiosqlite's cursor SQLAlchemy's adapter uses, one trip per statement."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._rows: list[Any] = []
        self.description: _Description = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> _Cursor:
        outcome = await self._connection.run(_run, self._connection, sql, parameters)
        self._take(outcome)
        return self

    async def executemany(self, sql: str, parameters: Sequence[Sequence[Any]]) -> _Cursor:
        outcome = await self._connection.run(_run, self._connection, sql, parameters, many=True)
        self._take(outcome)
        return self

    def _take(self, outcome: _Outcome) -> None:
        self._rows, self.description, self.rowcount, self.lastrowid = outcome

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        size = self.arraysize if size is None else size
        taken, self._rows = self._rows[:size], self._rows[size:]
        return taken

    async def fetchall(self) -> list[Any]:
        taken, self._rows = self._rows, []
        return taken

    async def close(self) -> None:
        # The sqlite3 cursor was closed on the thread, right after its statement.
        self._rows = []


def _run(
    connection: Connection, sql: str, parameters: Sequence[Any] | None, *, many: bool = False
) -> _Outcome:
    cursor = connection._conn.cursor()
    try:
        if many:
            cursor.executemany(sql, parameters or ())
        elif parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, parameters)
        return _outcome(cursor)
    finally:
        cursor.close()


def _outcome(cursor: sqlite3.Cursor) -> _Outcome:
    rows = cursor.fetchall() if cursor.description else []
    return rows, cursor.description, cursor.rowcount, cursor.lastrowid


class Connection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors take one trip per statement."""

    def cursor(self) -> _Cursor:  # type: ignore[override]
        return _Cursor(self)

    async def rollback(self) -> None:
        """Roll back the open transaction, if there is one.

        SQLAlchemy ends every use of a connection with a rollback, even a lone read's
        that began no transaction (the reader engine sends no BEGIN); that would be a
        trip to the thread for nothing. ``in_transaction`` is SQLite's autocommit flag,
        safe to read here: no job of this connection runs while its user asks this.
        """
        if self._conn.in_transaction:
            await super().rollback()

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the connection's thread, with SQLite's own connection."""
        return await self.run(_with_connection, self, fn)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` on the connection's thread (aiosqlite's own queue)."""
        result: T = await self._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]
        return result


def _with_connection(connection: Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    return fn(connection._conn)


async def connect(path: Path) -> Connection:
    """An open connection to ``path``.

    Opened as SQLAlchemy's adapter opens one: ``check_same_thread`` off, since the
    adapter sets the isolation level from the event loop's thread; the worker a daemon
    thread, so a connection left open cannot hold the interpreter at exit.
    """
    connection = Connection(
        lambda: sqlite3.connect(path, check_same_thread=False), iter_chunk_size=64
    )
    connection._thread.daemon = True
    await connection
    return connection
