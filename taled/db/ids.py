"""Finding a record by its id, or by a unique prefix of it: the one rule for every id a
person types (a task after another, an approval, a schedule).

A reference is trimmed and lower-cased; it must be at least ``MIN_PREFIX`` hex digits,
else ``InvalidInput``. It then names the one record whose id starts with it:
``NotFound`` when none does, ``InvalidInput`` when several do. A full id that is also
the prefix of a longer one is ambiguous too (there is no "exact match wins"): ids are
all 12 digits (``new_task_id``), so it cannot happen, and refusing is the safe answer
if it ever did.

Each caller words the three errors its own way (the messages are part of the CLI's
output), through an ``IdMessages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taled.errors import InvalidInput, NotFound

__all__ = ["MIN_PREFIX", "IdMessages", "by_prefix", "normalise"]

MIN_PREFIX = 4
"""The fewest hex digits that may name a record."""

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class IdMessages:
    """What a lookup says when a reference is no id, matches nothing, or matches several.

    Each is a ``str.format`` template, given ``given`` (the reference as typed), ``ref``
    (trimmed, lower-case), ``min`` (``MIN_PREFIX``) and, in ``ambiguous``, ``first`` and
    ``second`` (two of the ids it matches).
    """

    invalid: str
    """Raised as InvalidInput: too short, or not hex."""
    missing: str
    """Raised as NotFound: no id starts with it."""
    ambiguous: str
    """Raised as InvalidInput: more than one id starts with it."""


def normalise(given: str, messages: IdMessages) -> str:
    """``given`` trimmed and lower-cased; InvalidInput if it cannot name a record."""
    ref = given.strip().lower()
    if len(ref) < MIN_PREFIX or not set(ref) <= _HEX:
        raise InvalidInput(messages.invalid.format(given=given, ref=ref, min=MIN_PREFIX))
    return ref


async def by_prefix(
    conn: AsyncConnection, column: sa.Column[str], given: str, messages: IdMessages
) -> sa.Row[Any]:
    """The row of ``column``'s table whose id starts with ``given``; InvalidInput /
    NotFound worded by ``messages`` when there is not exactly one."""
    ref = normalise(given, messages)
    # Two rows are enough to tell one from several. autoescape: a reference is hex, but
    # LIKE's wildcards must never reach the pattern whatever a caller passes.
    rows = (
        await conn.execute(
            sa.select(column.table).where(column.startswith(ref, autoescape=True)).limit(2)
        )
    ).all()
    if not rows:
        raise NotFound(messages.missing.format(given=given, ref=ref, min=MIN_PREFIX))
    if len(rows) > 1:
        first, second = (getattr(r, column.name) for r in rows)
        raise InvalidInput(
            messages.ambiguous.format(
                given=given, ref=ref, min=MIN_PREFIX, first=first, second=second
            )
        )
    return rows[0]
