"""Text people send (task texts, chat messages) checked, and counts said as words."""

from __future__ import annotations

from taled.errors import InvalidInput

__all__ = ["clean_text", "count", "one_line", "word_set"]


def clean_text(text: str, *, what: str, limit: int, empty_hint: str, too_long_hint: str) -> str:
    """``text`` stripped; InvalidInput naming ``what`` if it is empty or over ``limit``."""
    stripped = text.strip()
    if not stripped:
        raise InvalidInput(f"{what} is empty; {empty_hint}")
    if len(stripped) > limit:
        raise InvalidInput(
            f"{what} is {len(stripped)} characters; the limit is {limit}{too_long_hint}"
        )
    return stripped


def word_set(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text``, for word lists written as prose."""
    return frozenset(text.split())


def one_line(text: str, limit: int) -> str:
    """``text`` on one line (whitespace runs as one space), cut to ``limit`` characters with
    an ellipsis: how a conversation is titled after its first message."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def count(value: int, one: str, many: str) -> str:
    """``value`` and the noun that goes with it: "1 problem", "3 task refs"."""
    return f"{value} {one if value == 1 else many}"
