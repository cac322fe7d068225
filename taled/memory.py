"""Similar-task memory: the past tasks nearest to a new one, with their outcomes.

Every finished top-level task's text is in the FTS5 table ``task_memory``; a new
task's words are looked up there and ranked by bm25 (SQLite's own). The user's
text never reaches FTS5's query syntax: it is cut into word tokens, each quoted
as a string (``"word"``), joined with OR, so no text can be a syntax error.

Neighbours with the same text are one neighbour (their outcomes averaged), so a
task run many times does not crowd out every other match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from taled.store import Store

__all__ = ["Neighbour", "SimilarTasks", "fts_query", "jaccard", "words"]

# At most this many distinct words of a task go into its query: enough to find
# its neighbours, small enough to keep the lookup a millisecond or two.
_MAX_QUERY_WORDS = 32
# Rows fetched before same-text neighbours are merged.
_OVERFETCH = 4
_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say anything about which tasks are alike.
_STOP_WORDS = """a an and are as at be but by can do for from how i in is it me my of on or
please that the this to was what with you your"""
_STOP = frozenset(_STOP_WORDS.split())

_SEARCH = sa.text(
    """
    SELECT m.task_id AS task_id, -bm25(task_memory) AS score, o.text AS text,
           o.completion_tokens AS completion_tokens, o.level AS level, o.success AS success,
           o.role AS role, o.model AS model
    FROM task_memory AS m JOIN task_outcomes AS o ON o.task_id = m.task_id
    WHERE task_memory MATCH :query
    ORDER BY bm25(task_memory)
    LIMIT :limit
    """
)


@dataclass(frozen=True)
class Neighbour:
    """A past task like the new one, and how it went."""

    task_id: str
    text: str
    score: float
    """bm25 relevance (higher is nearer; only comparable within one lookup)."""
    similarity: float
    """Word overlap with the new task (Jaccard, 0..1)."""
    completion_tokens: float
    """Tokens it generated (the mean, when the same text ran more than once)."""
    level: str
    success: float
    """Share of its runs that succeeded."""
    runs: int = 1


def words(text: str) -> list[str]:
    """A text's distinct, case-folded word tokens without stop words, in order."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.casefold()):
        if w not in _STOP:
            seen.setdefault(w, None)
    return list(seen)


def fts_query(text: str) -> str:
    """A safe FTS5 query matching any of the text's words ("" when it has none)."""
    tokens = words(text)[:_MAX_QUERY_WORDS]
    # \\w never matches '"', so quoting cannot be broken out of.
    return " OR ".join(f'"{t}"' for t in tokens)


def jaccard(a: str, b: str) -> float:
    """Word overlap of two texts: shared words / all words (1.0 for two texts without words)."""
    x, y = set(words(a)), set(words(b))
    if not x and not y:
        return 1.0
    return len(x & y) / len(x | y)


class SimilarTasks:
    """k-nearest past tasks by bm25 over the store's ``task_memory``."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def nearest(self, text: str, k: int) -> list[Neighbour]:
        """Up to ``k`` past tasks nearest to ``text``, nearest first."""
        query = fts_query(text)
        if not query or k <= 0:
            return []
        async with self._store.read() as conn:
            rows = (await conn.execute(_SEARCH, {"query": query, "limit": k * _OVERFETCH})).all()
        return _merge(text, rows, k)


def _merge(text: str, rows: list[Any], k: int) -> list[Neighbour]:
    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(row.text, []).append(row)
    out = []
    for same in groups.values():
        best = same[0]
        out.append(
            Neighbour(
                task_id=best.task_id,
                text=best.text,
                score=max(float(r.score) for r in same),
                similarity=jaccard(text, best.text),
                completion_tokens=sum(float(r.completion_tokens) for r in same) / len(same),
                level=best.level,
                success=sum(1.0 for r in same if r.success) / len(same),
                runs=len(same),
            )
        )
    out.sort(key=lambda n: (-n.score, n.task_id))
    return out[:k]
