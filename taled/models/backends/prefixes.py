"""Snapshots of an embedded model's KV cache, so a prompt seen before is not read again.

llama.cpp keeps one sequence in its KV cache and reuses the longest prefix a new prompt
shares with it. That is enough while one conversation talks to one instance, and lost
as soon as anything else runs there in between: the agent's intent vote, a summary,
another conversation, a task's call when both roles share a model. The next turn then
reads its whole history again, and its first token waits for that (measured: turn 30
of a conversation took 7.7x turn 2's first-token time).

So before a prompt replaces most of what the cache holds, the cache's sequence is
copied out (``llama_state_seq_get_data``: the keys and values of its tokens, about
23 KB a token for SmolLM2-135M), and a later prompt that shares more with a copy than
with the live cache gets it copied back. Copies are kept most recently used first,
within a byte budget (``models.llamacpp.prefix_cache_mb``); this module is that
bookkeeping, without llama.cpp, so it can be tested on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PrefixCache", "Snapshot", "shared_prefix"]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Snapshot:
    """A copy of the KV cache's sequence: the tokens it holds and their state (the
    buffer llama.cpp wrote it into; its length is its size in bytes)."""

    tokens: tuple[int, ...]
    state: Any


class PrefixCache:
    """Snapshots by the tokens they hold, least recently used dropped first.

    ``capacity`` bounds the states' bytes; a snapshot of fewer than ``min_tokens``
    tokens is not worth its copy (reading that many again costs less than a lookup).
    """

    def __init__(self, capacity: int, min_tokens: int) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._kept: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.hits = 0
        self.saves = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def size(self) -> int:
        """Bytes of the snapshots held."""
        return sum(len(s.state) for s in self._kept.values())

    def worth_keeping(
        self, tokens: Sequence[int], state_bytes: int, keep: Snapshot | None = None
    ) -> bool:
        """Whether a snapshot of ``tokens`` would be kept: long enough, and it fits, beside
        ``keep`` if that is held (the copy about to be restored is never dropped for it)."""
        beside = len(keep.state) if keep is not None and keep.tokens in self._kept else 0
        return len(tokens) >= self.min_tokens and 0 < state_bytes <= self.capacity - beside

    def best(self, prompt: Sequence[int]) -> tuple[Snapshot | None, int]:
        """The snapshot sharing the longest prefix with ``prompt``, and that length."""
        found: Snapshot | None = None
        longest = 0
        for snapshot in self._kept.values():
            n = shared_prefix(snapshot.tokens, prompt)
            if n > longest:
                found, longest = snapshot, n
        if found is not None:
            self._kept.move_to_end(found.tokens)
        return found, longest

    def add(self, snapshot: Snapshot, keep: Snapshot | None = None) -> None:
        """Keep ``snapshot``; one it extends (or repeats) is dropped, it holds more.

        ``keep`` (the snapshot about to be copied back) is never dropped to make room:
        if both do not fit, ``snapshot`` is not kept. Otherwise a conversation's copy
        would make way for what replaced it (a summary read ahead) just when the
        conversation's next turn needs it back.
        """
        if not self.worth_keeping(snapshot.tokens, len(snapshot.state), keep):
            return
        n = len(snapshot.tokens)
        for tokens in [t for t in self._kept if len(t) <= n and snapshot.tokens[: len(t)] == t]:
            del self._kept[tokens]
        self._kept[snapshot.tokens] = snapshot
        self.saves += 1
        for tokens in list(self._kept):
            if self.size <= self.capacity:
                break
            if keep is None or tokens != keep.tokens:
                del self._kept[tokens]

    def clear(self) -> None:
        """Forget every snapshot (the model was unloaded: they belong to its context)."""
        self._kept.clear()
