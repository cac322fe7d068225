"""Loop detection: an answer that has started repeating itself word for word is done.

Small models at low temperature often finish their answer and then loop — the
same sentence, paragraph or line of code again and again — until ``max_tokens``.
Every token of the loop is paid for and adds nothing. ``LoopGuard`` watches an
answer as it streams and says when its tail is one unit of text repeated: a unit
of at least ``min_chars`` characters (with at least two words, so rules, tables
and padding are not loops) seen ``repeats`` times in a row, or twice when the unit
is at least ``long_chars`` long. The answer is then cut after the unit's first
copy: what the model wrote before it started looping. A unit the request itself
contains ("write 'I like green apples.' ten times") is what was asked for, not a loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taled.settings import LoopSettings

__all__ = ["LoopGuard", "loop_start"]

_WORD = re.compile(r"\w+")


def loop_start(
    text: str, *, min_chars: int, max_chars: int, repeats: int, long_chars: int
) -> int | None:
    """Where the text's looping tail begins to repeat (``text[:i]`` keeps one copy).

    None when the end of ``text`` is not a unit of ``min_chars..max_chars``
    characters repeated ``repeats`` times in a row (twice for a unit of at least
    ``long_chars``). The shortest such unit is taken.
    """
    found = _loop(text, min_chars, max_chars, repeats, long_chars)
    return None if found is None else found[0]


def _loop(
    text: str, min_chars: int, max_chars: int, repeats: int, long_chars: int
) -> tuple[int, str] | None:
    """(where to cut, the repeated unit) of a looping tail, or None."""
    n = len(text)
    for p in range(max(min_chars, 1), min(max_chars, n // 2) + 1):
        copies = 2 if p >= long_chars else repeats
        if p * copies > n:
            break
        # The last p·copies characters have period p.
        if text[n - p * (copies - 1) :] != text[n - p * copies : n - p]:
            continue
        start = n - p * copies
        while start > 0 and text[start - 1] == text[start - 1 + p]:
            start -= 1
        if len(_WORD.findall(text[start : start + p])) < 2:
            continue
        # Any rotation of the unit is a unit too: end the kept copy where a line or a
        # sentence ends, not mid-word. A boundary at q (past the first copy's start)
        # recurs at q + p; one right at the first copy's end is where it stops.
        unit = text[start : start + p]
        for q in range(start + 1, start + p + 1):
            if _boundary(text, q):
                return (q if q == start + p else q + p), unit
        return start + p, unit
    return None


def _boundary(text: str, i: int) -> bool:
    """Whether a line or sentence ends just before ``text[i]``."""
    before = text[i - 1]
    return before == "\n" or (before == " " and i >= 2 and text[i - 2] in ".!?:;")


@dataclass
class LoopGuard:
    """Watches one streamed answer for a loop (see the module docstring)."""

    min_chars: int
    max_chars: int
    repeats: int
    long_chars: int
    check_every: int
    """Characters of new text between two looks (bounds the cost per token)."""
    request: str = ""
    """The request being answered: a unit it contains is asked-for repetition."""
    cut: int | None = None
    """Where the answer was cut once a loop was seen."""
    _checked: int = 0

    @classmethod
    def from_settings(cls, settings: LoopSettings, request: str = "") -> LoopGuard:
        """A fresh guard for one answer to ``request``."""
        return cls(
            min_chars=settings.min_chars,
            max_chars=settings.max_chars,
            repeats=settings.repeats,
            long_chars=settings.long_chars,
            check_every=settings.check_every_chars,
            request=request.casefold(),
        )

    def looped(self, text: str) -> bool:
        """Whether ``text`` (the answer so far) has started looping."""
        if self.cut is not None:
            return True
        # Looked at every check_every characters exactly, whatever the pieces: the
        # verdict and the cut do not depend on how the stream was split (a lagging
        # consumer gets merged pieces).
        while len(text) - self._checked >= self.check_every:
            self._checked += self.check_every
            seen = text[: self._checked]
            found = _loop(seen, self.min_chars, self.max_chars, self.repeats, self.long_chars)
            if found is not None and not _asked_for(found[1], self.request):
                self.cut = found[0]
                return True
        return False

    def trimmed(self, text: str) -> str:
        """The answer without its loop (unchanged if none was seen)."""
        return text if self.cut is None else text[: self.cut].rstrip()


def _asked_for(unit: str, request: str) -> bool:
    """Whether every word of the unit is in the request: repetition that was asked for."""
    words = set(_WORD.findall(unit.casefold()))
    return bool(words) and words <= set(_WORD.findall(request))
