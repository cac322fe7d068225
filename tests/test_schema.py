"""The schema's two definitions, the tables and the migrations, pinned to each other."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from taled.db.schema import MIGRATIONS, metadata

# Full-text indexes' shadow tables are SQLite's own, not declared.
_FTS_SHADOWS = ("_data", "_idx", "_content", "_docsize", "_config")


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    """A database built by every migration, in order, and nothing else."""
    path: Path = tmp_path_factory.mktemp("schema") / "m.db"
    db = sqlite3.connect(path)
    for statements in MIGRATIONS:
        for statement in statements:
            db.execute(statement)
    yield db
    db.close()


def _made_tables(db: sqlite3.Connection) -> list[str]:
    return [
        name
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            " AND sql NOT LIKE 'CREATE VIRTUAL TABLE%'"
        )
        if not name.endswith(_FTS_SHADOWS)
    ]


def _affinity(declared: str) -> str:
    """SQLite's type affinity of a declared column type (section 3.1 of its datatype doc)."""
    kind = declared.upper()
    if "INT" in kind:
        return "INTEGER"
    if any(s in kind for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in kind or not kind:
        return "BLOB"
    if any(s in kind for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _default(column: sa.Column[object]) -> str | None:
    default = column.server_default
    return None if default is None else str(default.arg)  # type: ignore[attr-defined]


def test_the_migrations_build_exactly_the_tables_the_code_declares(
    migrated: sqlite3.Connection,
) -> None:
    """One schema is the truth: every table and column the SQLAlchemy tables declare is
    what the migrations make, and the migrations make nothing the tables do not name."""
    made = {
        name: {row[1] for row in migrated.execute(f"PRAGMA table_info({name})")}
        for name in _made_tables(migrated)
    }
    declared = {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    assert made == declared


def test_every_column_has_the_type_nullability_key_and_default_it_is_declared_with(
    migrated: sqlite3.Connection,
) -> None:
    """Each migrated column's type affinity, NOT NULL, primary key and default match
    its SQLAlchemy declaration."""
    made = {}
    declared = {}
    for table in metadata.sorted_tables:
        for _cid, name, kind, notnull, default, pk in migrated.execute(
            f"PRAGMA table_info({table.name})"
        ):
            plain = default.strip("'") if isinstance(default, str) else default
            made[table.name, name] = (_affinity(kind), bool(notnull or pk), pk > 0, plain)
        for column in table.columns:
            kind = column.type.compile(dialect=sqlite.dialect())
            declared[table.name, column.name] = (
                _affinity(kind),
                not column.nullable,
                column.primary_key,
                _default(column),
            )
    assert made == declared


def test_every_foreign_key_the_tables_declare_is_what_the_migrations_make(
    migrated: sqlite3.Connection,
) -> None:
    """The migrations' REFERENCES clauses are exactly the declared foreign keys."""
    made = {
        (table.name, row[3], row[2], row[4])
        for table in metadata.sorted_tables
        for row in migrated.execute(f"PRAGMA foreign_key_list({table.name})")
    }
    declared = {
        (table.name, fk.parent.name, fk.column.table.name, fk.column.name)
        for table in metadata.sorted_tables
        for fk in table.foreign_keys
    }
    assert made == declared
