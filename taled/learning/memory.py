"""Similar-task memory: the past tasks nearest to a new one, with their outcomes.

Every finished top-level task's text is in the FTS5 table ``task_memory``; a new
task's words are looked up there and ranked by bm25 (SQLite's own). The user's
text never reaches FTS5's query syntax: it is cut into word tokens, each quoted
as a string (``"word"``), joined with OR, so no text can be a syntax error.

With ``learning.embeddings`` set, every finished task's text is also embedded
(``task_embeddings``; the vectors of the configured model are held in memory as one
matrix, ``VectorIndex``), and a lookup takes the union of the bm25 matches and the
stored tasks whose cosine with the new text is above the floor. Each neighbour's
similarity then blends both signals (``blend``)::

    cosine part = clamp((cosine - floor) / (1 - floor), 0, 1)
    similarity  = w · cosine part + (1 - w) · word overlap           (w: embedding_weight)

    floor = max(embedding_min_cosine, mean cosine between the stored tasks)

The floor adapts to the model: a weak embedder (a chat model's mean-pooled states)
rates any two texts as fairly alike, so only a cosine above what two stored tasks
typically share says anything. A neighbour without a vector of this model (recorded
before embeddings were on, or while the embedder was down) is weighed by its word
overlap alone, as without embeddings. A paraphrase sharing no word with a past task
can only be found through its embedding.

Neighbours with the same text are one neighbour (their outcomes averaged), so a
task run many times does not crowd out every other match.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from taled.db.learning import LearningRecords, PastTask, Vector
from taled.db.store import Store
from taled.settings import LearningSettings
from taled.text import count

if TYPE_CHECKING:
    from taled.learning.embeddings import EmbeddingService

__all__ = [
    "Lookup",
    "Neighbour",
    "SimilarTasks",
    "Vector",
    "VectorIndex",
    "blend",
    "cosine",
    "cosine_part",
    "fts_query",
    "jaccard",
    "words",
]

log = logging.getLogger(__name__)

# At most this many distinct words of a task go into its query: enough to find
# its neighbours, small enough to keep the lookup a millisecond or two.
_MAX_QUERY_WORDS = 32
# Rows fetched before same-text neighbours are merged.
_OVERFETCH = 4
# Texts embedded per call while filling in the vectors of older tasks: small enough
# that a lookup waiting behind the backfill waits one short call.
_BACKFILL_BATCH = 8
# The adaptive floor never reaches 1 (float32 rounding puts a repeat just below it).
_MAX_FLOOR = 0.99
_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say anything about which tasks are alike.
_STOP_WORDS = """a an and are as at be but by can do for from how i in is it me my of on or
please that the this to was what with you your"""
_STOP = frozenset(_STOP_WORDS.split())


@dataclass(frozen=True)
class Neighbour:
    """A past task like the new one, and how it went."""

    task_id: str
    text: str
    score: float
    """bm25 relevance (higher is nearer; only comparable within one lookup; 0 for a task
    found only by its embedding)."""
    similarity: float
    """How alike it is, 0..1: the word overlap (Jaccard), blended with the embeddings'
    cosine when both texts have one (see the module docstring)."""
    tokens: float
    """Tokens of its first direct answer, or the whole task's when it had none
    (``taled.learning.engine.predictable_tokens``); the mean when the text ran more than once."""
    level: str
    success: float
    """Share of its runs that succeeded."""
    runs: int = 1
    cosine: float | None = None
    """Cosine of the two texts' embeddings; None without them."""
    via: str = "bm25"
    """How it was found: ``bm25``, ``embedding`` or ``bm25+embedding``."""


@dataclass(frozen=True)
class Lookup:
    """The neighbours of a text, and how they were found."""

    neighbours: list[Neighbour]
    vector: Vector | None
    """The text's embedding (None when embeddings are off or unavailable)."""
    method: str
    """``bm25``, ``bm25+embedding``, or ``bm25 (embedding unavailable)`` for a lookup that
    fell back to words alone because the embedder failed."""


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


def cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Cosine of two vectors, in [-1, 1]; 0.0 when either is zero, not finite or they differ
    in length."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        return 0.0
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if not (math.isfinite(nx) and math.isfinite(ny)) or nx == 0.0 or ny == 0.0:
        return 0.0
    value = float(np.dot(x, y)) / (nx * ny)
    return min(max(value, -1.0), 1.0) if math.isfinite(value) else 0.0


def cosine_part(value: float, floor: float) -> float:
    """What a cosine says about two texts, 0..1: how far it is above ``floor``, rescaled."""
    if not math.isfinite(value):
        return 0.0
    floor = min(max(floor, 0.0), 1.0)
    if floor >= 1.0:
        return 1.0 if value >= 1.0 else 0.0
    return min(max((value - floor) / (1.0 - floor), 0.0), 1.0)


def blend(overlap: float, cos: float | None, weight: float, floor: float) -> float:
    """A neighbour's similarity, 0..1: ``weight`` of its cosine part and the rest of its
    word overlap; the overlap alone without a cosine."""
    overlap = min(max(overlap, 0.0), 1.0) if math.isfinite(overlap) else 0.0
    if cos is None:
        return overlap
    w = min(max(weight, 0.0), 1.0)
    return w * cosine_part(cos, floor) + (1.0 - w) * overlap


class VectorIndex:
    """One embedding model's stored vectors as one in-memory matrix, oldest row first.

    At most ``capacity`` rows (``learning.history_limit``): 5,000 vectors of 768
    dimensions are 15 MB, and a lookup is one matrix-vector product (a millisecond).
    """

    def __init__(self, model: str, capacity: int) -> None:
        self.model = model
        self._capacity = max(capacity, 1)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._matrix: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)
        # The sum of the stored (unit) vectors gives their mean pairwise cosine in O(d).
        self._sum: npt.NDArray[np.float64] = np.zeros(0)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def dimension(self) -> int | None:
        """Length of the stored vectors (None while empty)."""
        return int(self._matrix.shape[1]) if self._ids else None

    def clear(self) -> None:
        """Forget every vector."""
        self._ids, self._rows = [], {}
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._sum = np.zeros(0)

    def add(self, task_id: str, vector: Vector) -> None:
        """Hold a task's vector (replacing its older one); the oldest row goes past capacity."""
        v = np.asarray(vector, dtype=np.float32)
        if self._ids and v.shape[0] != self._matrix.shape[1]:
            # The same name now serves another model (a re-pull, a new file): its old
            # vectors cannot be compared with new ones.
            log.info(
                "embeddings of %s changed dimension (%d -> %d): older vectors are set aside",
                self.model,
                self._matrix.shape[1],
                v.shape[0],
            )
            self.clear()
        n = len(self._ids)
        if n == 0:
            self._matrix = np.zeros((min(self._capacity, 16), v.shape[0]), dtype=np.float32)
            self._sum = np.zeros(v.shape[0])
        row = self._rows.get(task_id)
        if row is not None:
            self._sum += v - self._matrix[row]
            self._matrix[row] = v
            return
        if n == self._matrix.shape[0]:
            grown = np.zeros((min(2 * n, self._capacity + 1), v.shape[0]), dtype=np.float32)
            grown[:n] = self._matrix[:n]
            self._matrix = grown
        self._matrix[n] = v
        self._sum += v
        self._ids.append(task_id)
        self._rows[task_id] = n
        if len(self._ids) > self._capacity:
            self._sum -= self._matrix[0]
            self._matrix[: len(self._ids) - 1] = self._matrix[1 : len(self._ids)]
            del self._rows[self._ids.pop(0)]
            self._rows = {t: i for i, t in enumerate(self._ids)}

    def remove(self, task_id: str) -> bool:
        """Let go of a task's vector (a forgotten task); False if it held none."""
        row = self._rows.get(task_id)
        if row is None:
            return False
        n = len(self._ids)
        self._sum -= self._matrix[row]
        self._matrix[row : n - 1] = self._matrix[row + 1 : n]
        self._matrix[n - 1] = 0.0
        del self._ids[row]
        self._rows = {t: i for i, t in enumerate(self._ids)}
        if not self._ids:
            self.clear()
        return True

    def cosines(self, vector: Vector) -> npt.NDArray[np.float32]:
        """The cosine of ``vector`` with every stored one (empty if its length differs)."""
        if not self._ids or vector.shape[0] != self._matrix.shape[1]:
            return np.zeros(0, dtype=np.float32)
        out: npt.NDArray[np.float32] = self._matrix[: len(self._ids)] @ vector
        return out

    def cosine(self, task_id: str, vector: Vector) -> float | None:
        """The cosine of ``vector`` with a task's stored one; None if it has none."""
        row = self._rows.get(task_id)
        if row is None or vector.shape[0] != self._matrix.shape[1]:
            return None
        return float(np.dot(self._matrix[row], vector))

    def top(self, vector: Vector, k: int, floor: float) -> list[tuple[str, float]]:
        """Up to ``k`` stored tasks whose cosine with ``vector`` is above ``floor``, highest
        first."""
        values = self.cosines(vector)
        if k <= 0 or values.size == 0:
            return []
        # argpartition finds the k largest in O(n); only those are sorted.
        picked = np.argpartition(-values, k - 1)[:k] if values.size > k else np.arange(values.size)
        ranked = sorted(picked.tolist(), key=lambda i: (-float(values[i]), self._ids[i]))
        return [(self._ids[i], float(values[i])) for i in ranked if float(values[i]) > floor]

    def typical(self) -> float | None:
        """The mean cosine between two different stored vectors (None below two)."""
        n = len(self._ids)
        if n < 2:
            return None
        # Σᵢⱼ vᵢ·vⱼ = |Σ v|², and the n diagonal terms are 1 each.
        total = float(np.dot(self._sum, self._sum))
        return (total - n) / (n * (n - 1))


class SimilarTasks:
    """k-nearest past tasks by bm25 over ``task_memory``, and by embedding when configured."""

    def __init__(
        self,
        store: Store,
        embeddings: EmbeddingService | None = None,
        settings: LearningSettings | None = None,
    ) -> None:
        self._records = LearningRecords(store)
        self._settings = settings or LearningSettings()
        self._embeddings = embeddings
        self._index = (
            VectorIndex(embeddings.key, self._settings.history_limit)
            if embeddings is not None
            else None
        )
        self.lookups = 0
        """Lookups made with embeddings on."""
        self.fallbacks = 0
        """Of which fell back to bm25 alone because the embedder failed (or was down)."""
        self.unembedded = 0
        """Finished tasks recorded without a vector, the embedder failing then."""
        self.backfilled = 0
        """Vectors made for older tasks that had none (since start)."""

    @property
    def embedding(self) -> bool:
        """Whether embeddings are configured."""
        return self._embeddings is not None

    @property
    def model(self) -> str | None:
        """The embedding model's key (``backend:model``), None when off."""
        return self._embeddings.key if self._embeddings is not None else None

    async def start(self) -> None:
        """Load the stored vectors of the configured model (newest ``history_limit`` tasks)."""
        if self._index is None:
            return
        rows = await self._records.vectors(self._index.model, self._settings.history_limit)
        # The newest rows fix the dimension (an older model of the same name is set aside).
        dimension = rows[0].dimension if rows else 0
        for row in reversed(rows):
            if row.dimension == dimension and row.vector.shape[0] == dimension:
                self._index.add(row.task_id, row.vector)
        log.info(
            "similar tasks: %d stored embeddings by %s (%s dimensions)",
            len(self._index),
            self._index.model,
            self._index.dimension or "no",
        )

    async def embed(self, text: str) -> Vector | None:
        """``text``'s embedding; None when embeddings are off or the embedder failed."""
        if self._embeddings is None:
            return None
        vectors = await self._embeddings.embed([text])
        return None if vectors is None else vectors[0]

    def add(self, task_id: str, vector: Vector) -> None:
        """Hold a recorded task's vector (after it is committed with its outcome)."""
        if self._index is not None:
            self._index.add(task_id, vector)

    def drop(self, task_ids: Collection[str]) -> None:
        """Let go of forgotten tasks' vectors (their rows are deleted from the store)."""
        if self._index is not None:
            for task_id in task_ids:
                self._index.remove(task_id)

    def floor(self) -> float:
        """The cosine at or below which embeddings say nothing (see the module docstring)."""
        typical = self._index.typical() if self._index is not None else None
        # Capped below 1: when every stored task is one text, a repeat of it must still count.
        return max(self._settings.embedding_min_cosine, min(typical or 0.0, _MAX_FLOOR))

    async def lookup(self, text: str, k: int) -> Lookup:
        """Embed ``text`` (when configured) and find its neighbours; counts fallbacks."""
        if self._embeddings is None:
            return Lookup(await self.nearest(text, k), None, "bm25")
        self.lookups += 1
        vector = await self.embed(text)
        if vector is None:
            self.fallbacks += 1
            return Lookup(await self.nearest(text, k), None, "bm25 (embedding unavailable)")
        return Lookup(await self.nearest(text, k, vector), vector, "bm25+embedding")

    async def nearest(self, text: str, k: int, vector: Vector | None = None) -> list[Neighbour]:
        """Up to ``k`` past tasks nearest to ``text``, nearest first.

        Without ``vector``: bm25 matches ranked by bm25, weighed by word overlap. With
        it: those and the top cosine matches, ranked and weighed by the blend.
        """
        if k <= 0:
            return []
        query = fts_query(text)
        use_vector = vector is not None and self._index is not None
        if not query and not use_vector:
            return []
        if not use_vector:
            found = await self._records.similar(query, k * _OVERFETCH)
            return _merge(text, found.by_words, k, None)
        assert vector is not None and self._index is not None
        floor = self.floor()
        matches = self._index.top(vector, k * _OVERFETCH, floor)
        # The words' matches and the vectors' others, read together (one snapshot).
        found = await self._records.similar(
            query, k * _OVERFETCH, [task_id for task_id, _ in matches]
        )
        rows = found.by_words + found.by_id
        lexical = {r.task_id for r in found.by_words}
        scoring = _Scoring(
            cosines={
                r.task_id: c
                for r in rows
                if (c := self._index.cosine(r.task_id, vector)) is not None
            },
            lexical=lexical,
            semantic={task_id for task_id, _ in matches},
            weight=self._settings.embedding_weight,
            floor=floor,
        )
        return _merge(text, rows, k, scoring)

    async def backfill(self) -> int:
        """Embed the stored tasks (newest ``history_limit``) that have no vector of this model.

        Runs in the background after start-up; stops at the first failure (the next
        start goes on). Returns how many vectors it made.
        """
        if self._embeddings is None or self._index is None:
            return 0
        rows = await self._records.unembedded(self._index.model, self._settings.history_limit)
        if not rows:
            return 0
        older = count(len(rows), "older task", "older tasks")
        log.info("similar tasks: embedding %s in the background", older)
        made = 0
        model = self._index.model
        for start in range(0, len(rows), _BACKFILL_BATCH):
            batch = rows[start : start + _BACKFILL_BATCH]
            vectors = await self._embeddings.embed([r.text for r in batch])
            if vectors is None:
                log.info("similar tasks: backfill stopped after %d; the next start goes on", made)
                break
            pairs = [(r.task_id, vectors[i]) for i, r in enumerate(batch)]
            await self._records.save_vectors(model, pairs)
            for task_id, v in pairs:
                self._index.add(task_id, v)
            made += len(pairs)
            self.backfilled += len(pairs)
        return made

    def status(self) -> dict[str, Any] | None:
        """The embedding side of the memory for ``daemon_status`` (None when off)."""
        if self._embeddings is None or self._index is None:
            return None
        return {
            **self._embeddings.status(),
            "vectors": len(self._index),
            "dimension": self._index.dimension,
            "floor": round(self.floor(), 4),
            "lookups": self.lookups,
            "fallbacks": self.fallbacks,
            "unembedded_records": self.unembedded,
            "backfilled": self.backfilled,
        }


@dataclass(frozen=True)
class _Scoring:
    """How a lookup with embeddings weighs and labels its rows."""

    cosines: dict[str, float]
    lexical: set[str]
    semantic: set[str]
    weight: float
    floor: float


def _merge(text: str, rows: list[PastTask], k: int, scoring: _Scoring | None) -> list[Neighbour]:
    groups: dict[str, list[PastTask]] = {}
    for row in rows:
        groups.setdefault(row.text, []).append(row)
    out = []
    for same in groups.values():
        best = same[0]
        overlap = jaccard(text, best.text)
        cos: float | None = None
        via = "bm25"
        if scoring is not None:
            known = [scoring.cosines[r.task_id] for r in same if r.task_id in scoring.cosines]
            cos = max(known) if known else None
            hits = (
                ("bm25", any(r.task_id in scoring.lexical for r in same)),
                ("embedding", any(r.task_id in scoring.semantic for r in same)),
            )
            via = "+".join(name for name, hit in hits if hit) or "bm25"
        out.append(
            Neighbour(
                task_id=best.task_id,
                text=best.text,
                score=max(float(r.score) for r in same),
                similarity=(
                    blend(overlap, cos, scoring.weight, scoring.floor)
                    if scoring is not None
                    else overlap
                ),
                tokens=sum(float(r.tokens) for r in same) / len(same),
                level=best.level,
                success=sum(1.0 for r in same if r.success) / len(same),
                runs=len(same),
                cosine=cos,
                via=via,
            )
        )
    if scoring is None:
        out.sort(key=lambda n: (-n.score, n.task_id))
    else:
        out.sort(key=lambda n: (-n.similarity, -n.score, n.task_id))
    return out[:k]
