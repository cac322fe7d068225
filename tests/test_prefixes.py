"""The KV prefix cache: a conversation's history is not read again after another call.

The bookkeeping is tested on its own (hypothesis); the copies themselves on the real
embedded model, where the proof is that an answer after a restored prefix is the
same, token for token, as one read from scratch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.backends.llamacpp import LlamaCppBackend
from taled.models.backends.prefixes import PrefixCache, Snapshot, shared_prefix
from taled.settings import LlamaCppSettings

tokens = st.lists(st.integers(0, 3), min_size=0, max_size=12).map(tuple)


@given(tokens, tokens)
def test_shared_prefix_is_the_longest_common_start(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    n = shared_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


@given(st.lists(tokens, max_size=8), tokens)
def test_best_is_the_snapshot_sharing_most_with_the_prompt(
    kept: list[tuple[int, ...]], prompt: tuple[int, ...]
) -> None:
    cache = PrefixCache(capacity=10**9, min_tokens=0)
    for t in kept:
        cache.add(Snapshot(t, b"x" * (len(t) + 1)))
    found, n = cache.best(prompt)
    longest = max((shared_prefix(t, prompt) for t in kept), default=0)
    assert n == longest
    assert (found is None) == (longest == 0)
    if found is not None:
        assert shared_prefix(found.tokens, prompt) == n


@given(st.lists(tokens, max_size=12), st.integers(1, 40))
def test_the_cache_stays_within_its_bytes_dropping_the_least_recently_used(
    kept: list[tuple[int, ...]], capacity: int
) -> None:
    cache = PrefixCache(capacity=capacity, min_tokens=1)
    for t in kept:
        cache.add(Snapshot(t, b"x" * len(t)))
        assert cache.size <= capacity
    if kept and 1 <= len(kept[-1]) <= capacity:
        assert cache.best(kept[-1])[1] == len(kept[-1])  # the newest is always kept


@given(st.lists(tokens, min_size=1, max_size=12), tokens, st.integers(1, 40))
def test_the_copy_about_to_be_restored_is_never_dropped_to_make_room(
    kept: list[tuple[int, ...]], new: tuple[int, ...], capacity: int
) -> None:
    """A conversation's copy stays when what replaced it in the model is copied out:
    the new copy is kept only if both fit (or it holds the old one's tokens and more)."""
    cache = PrefixCache(capacity=capacity, min_tokens=1)
    for t in kept:
        cache.add(Snapshot(t, b"x" * len(t)))
    keep, _ = cache.best(kept[-1])
    cache.add(Snapshot(new, b"x" * len(new)), keep=keep)
    assert cache.size <= capacity
    if keep is not None:
        assert cache.best(keep.tokens)[1] == len(keep.tokens)


def test_a_snapshot_that_extends_another_replaces_it() -> None:
    cache = PrefixCache(capacity=1000, min_tokens=1)
    cache.add(Snapshot((1, 2, 3), b"abc"))
    cache.add(Snapshot((1, 2, 3, 4, 5), b"abcde"))
    assert len(cache) == 1
    assert cache.size == 5


def test_a_short_snapshot_is_not_kept() -> None:
    cache = PrefixCache(capacity=1000, min_tokens=4)
    cache.add(Snapshot((1, 2, 3), b"abc"))
    assert len(cache) == 0


# --- on the embedded model ---------------------------------------------------------

HISTORY: list[ChatMessage] = [
    {"role": "system", "content": "You are a helpful travel assistant. Answer briefly."},
    {"role": "user", "content": "I am planning a trip to Lisbon next month with my sister."},
    {
        "role": "assistant",
        "content": "Lovely! Lisbon is sunny and mild then; pack layers, comfortable shoes "
        "for the hills, and a light jacket for the evenings by the river.",
    },
    {"role": "user", "content": "How do the trams work, and do we need tickets in advance?"},
    {
        "role": "assistant",
        "content": "Tram 28 is the famous one. Buy a Viva Viagem card at any metro station "
        "and load it with zapping credit; it works on trams, buses and the metro.",
    },
]
ELSEWHERE: list[ChatMessage] = [
    {"role": "system", "content": "Classify the message as chat, task or unclear."},
    {"role": "user", "content": "Write a Python function that reverses a string."},
]


def _answer(
    backend: LlamaCppBackend, messages: list[ChatMessage], *, keep_prefix: bool = True
) -> Completion:
    out = Completion.empty()

    async def run() -> None:
        pieces: AsyncIterator[str] = backend.stream(
            messages,
            max_tokens=24,
            temperature=0,
            cancel=CancelToken(),
            result=out,
            keep_prefix=keep_prefix,
        )
        async for _ in pieces:
            pass

    asyncio.run(run())
    return out


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    b = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    asyncio.run(b.load())
    return b


def test_a_conversation_after_another_call_is_not_read_again(backend: LlamaCppBackend) -> None:
    """Turn, unrelated call, next turn: the next turn reads only what is new."""
    _answer(backend, HISTORY)
    _answer(backend, ELSEWHERE)
    turn = [*HISTORY, {"role": "user", "content": "Is tipping expected in restaurants?"}]
    out = _answer(backend, turn)
    history_tokens = backend.count_tokens(backend.render_prompt(HISTORY)[0])
    assert out.cached_tokens >= history_tokens
    assert out.prompt_tokens - out.cached_tokens < 25


def test_an_answer_after_a_restored_prefix_is_the_one_read_from_scratch(
    backend: LlamaCppBackend,
) -> None:
    turn = [*HISTORY, {"role": "user", "content": "What is a pastel de nata?"}]
    _answer(backend, HISTORY)
    _answer(backend, ELSEWHERE)
    restored = _answer(backend, turn)
    assert restored.cached_tokens > 0
    fresh_backend = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1, prefix_cache_mb=0))
    asyncio.run(fresh_backend.load())
    try:
        fresh = _answer(fresh_backend, turn)
    finally:
        asyncio.run(fresh_backend.unload())
    assert fresh.cached_tokens == 0
    assert restored.text == fresh.text


def test_with_the_cache_off_another_call_in_between_means_reading_it_all_again() -> None:
    b = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1, prefix_cache_mb=0))
    asyncio.run(b.load())
    try:
        _answer(b, HISTORY)
        _answer(b, ELSEWHERE)
        out = _answer(b, [*HISTORY, {"role": "user", "content": "Is tipping expected?"}])
    finally:
        asyncio.run(b.unload())
    assert out.cached_tokens < 10


def test_a_prompt_said_not_to_come_again_leaves_no_copy() -> None:
    """A call made with keep_prefix off (a summary, an intent vote) is not copied out
    when the next prompt replaces it: it takes no memory, and the next turn of that
    prompt would read it all again."""
    b = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=1))
    asyncio.run(b.load())
    try:
        _answer(b, HISTORY, keep_prefix=False)
        _answer(b, ELSEWHERE)
        assert b._prefixes is not None and len(b._prefixes) == 0
        out = _answer(b, [*HISTORY, {"role": "user", "content": "Is tipping expected?"}])
    finally:
        asyncio.run(b.unload())
    assert out.cached_tokens < 10
