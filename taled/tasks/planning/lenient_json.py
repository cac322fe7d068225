"""Reading JSON out of a small model's answer, however broken.

Why this exists: a small model asked for JSON (the SmolLM2-135M task model, say)
wraps it in prose or code fences, uses single or typographic quotes, bare words and
comments, leaves out or adds commas, mismatches brackets, and is cut off at
``max_tokens``. ``json`` rejects all of that. This reader takes strict JSON exactly
as ``json`` does and repairs the rest, saying what it repaired. It never raises on
arbitrary text: what it cannot read is not returned.

``extract_json`` gives the first object or array in a text. ``json_candidates``
lists every place one may start, for a caller that tries them in turn until one
holds what it is looking for (``taled.tasks.planning.planner.parse_plan`` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "Candidate",
    "JsonTooDeep",
    "Reading",
    "extract_json",
    "json_candidates",
]

# The repairing reader gives up on values nested deeper than this.
MAX_DEPTH = 40
# Spans outside code fences tried at most.
_MAX_SPANS = 12

_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


class JsonTooDeep(ValueError):
    """The JSON is nested deeper than ``MAX_DEPTH`` and is not valid as it stands."""

    def __init__(self) -> None:
        super().__init__("the JSON is nested too deeply")


@dataclass(frozen=True)
class Reading:
    """An object or array read from text, and the kinds of damage repaired to read it.

    ``repairs`` is empty for strict JSON (and for JSON whose only fault is extra
    commas); otherwise some of "bare words", "brackets", "comments", "cut off",
    "missing colons", "missing commas", "missing keys", "quotes", "stray characters".
    """

    value: dict[str, Any] | list[Any]
    repairs: frozenset[str]


@dataclass(frozen=True)
class Candidate:
    """A place in a text where a JSON object or array starts."""

    text: str = field(repr=False)
    start: int
    """Index of the ``{`` or ``[`` in ``text``."""

    def __post_init__(self) -> None:
        if self.text[self.start : self.start + 1] not in ("{", "["):
            raise ValueError(f"no {{ or [ at {self.start}")

    def read(self) -> Reading:
        """The value here: as ``json`` reads it if it can, else repaired; JsonTooDeep."""
        try:
            value, _ = json.JSONDecoder().raw_decode(self.text, self.start)
        except (ValueError, RecursionError):
            pass
        else:
            return Reading(value, frozenset())
        parser = _Parser(self.text, self.start)
        return Reading(parser.document(), frozenset(parser.repairs))


def extract_json(text: str) -> dict[str, Any] | list[Any] | None:
    """The first JSON object or array in ``text`` (see ``json_candidates``), or None."""
    for candidate in json_candidates(text):
        try:
            return candidate.read().value
        except JsonTooDeep:
            continue
    return None


def json_candidates(text: str) -> Iterator[Candidate]:
    """Where JSON may start, in the order to try: code fences, then ``{``/``[`` spans.

    Each span starts after the end of the one before, as the repairing reader sees
    it: a list inside a broken object is not offered on its own. At most 12 spans.
    """
    for match in _FENCE.finditer(text):
        body = match.group(1)
        start = _first_bracket(body, 0)
        if start is not None:
            yield Candidate(body, start)
    start = _first_bracket(text, 0)
    for _ in range(_MAX_SPANS):
        if start is None:
            break
        yield Candidate(text, start)
        start = _first_bracket(text, max(start + 1, _span_end(text, start)))


def _first_bracket(text: str, start: int) -> int | None:
    found = [i for i in (text.find("{", start), text.find("[", start)) if i >= 0]
    return min(found) if found else None


def _span_end(text: str, start: int) -> int:
    """Where the value at ``start`` ends, as the repairing reader sees it."""
    parser = _Parser(text, start)
    try:
        parser.document()
    except JsonTooDeep:
        return len(text)
    return parser.end


# ---------------------------------------------------------------------------
# The repairing reader
# ---------------------------------------------------------------------------

# Straight and typographic quotes, each with the quote that closes it.
_QUOTES = {
    '"': '"',
    "'": "'",
    "\u201c": "\u201d",
    "\u201d": "\u201d",
    "\u2018": "\u2019",
    "\u2019": "\u2019",
}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
# \uXXXX, and the low half of a surrogate pair if one follows.
_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})(?:\\u([dD][c-fC-F][0-9a-fA-F]{2}))?")
_BARE = re.compile(r"[A-Za-z0-9_.+\-$]+")
_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_JSON_LITERALS: dict[str, object] = {"true": True, "false": False, "null": None}
_PYTHON_LITERALS: dict[str, object] = {"True": True, "False": False, "None": None, "none": None}

# kind ("{", "}", "[", "]", ":", ",", "scalar" or "eof"), value, where it ends
_Token = tuple[str, object, int]


def _tokens(text: str, start: int, repairs: set[str]) -> Iterator[_Token]:
    """JSON tokens of ``text``; comments, other quotes and bare words allowed."""
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "{}[]:,":
            i += 1
            yield c, None, i
        elif text.startswith("//", i) or c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            repairs.add("comments")
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            repairs.add("comments")
        elif c in _QUOTES:
            value, i = _read_string(text, i, repairs)
            yield "scalar", value, i
        elif match := _BARE.match(text, i):
            i = match.end()
            yield "scalar", _bare_value(match.group(), repairs), i
        else:
            i += 1
            if c != "`":
                repairs.add("stray characters")


def _read_string(text: str, i: int, repairs: set[str]) -> tuple[str, int]:
    """The string whose opening quote is at ``i``, and where it ends."""
    close = _QUOTES[text[i]]
    if text[i] != '"':
        repairs.add("quotes")
    chars: list[str] = []
    j, n = i + 1, len(text)
    while j < n:
        c = text[j]
        if c == close:
            return "".join(chars), j + 1
        if c == "\\" and j + 1 < n:
            if escape := _UNICODE_ESCAPE.match(text, j):
                code = int(escape.group(1), 16)
                if escape.group(2) and 0xD800 <= code < 0xDC00:
                    low = int(escape.group(2), 16)
                    chars.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    j = escape.end()
                else:
                    chars.append(chr(code))
                    j += 6
                continue
            chars.append(_ESCAPES.get(text[j + 1], text[j + 1]))
            j += 2
            continue
        chars.append(c)
        j += 1
    repairs.add("cut off")
    return "".join(chars), n


def _bare_value(word: str, repairs: set[str]) -> object:
    if word in _JSON_LITERALS:
        return _JSON_LITERALS[word]
    if _INTEGER.fullmatch(word):
        try:
            return int(word)
        except ValueError:  # more digits than int() converts: read as a float
            pass
    if _FLOAT.fullmatch(word):
        return float(word)
    repairs.add("bare words")
    return _PYTHON_LITERALS.get(word, word)


_MISSING = object()


class _Parser:
    """Builds a value from tokens, closing what is left open and skipping stray commas."""

    def __init__(self, text: str, start: int) -> None:
        self.repairs: set[str] = set()
        self.end = start
        """Where the last token read ends."""
        self._tokens = _tokens(text, start, self.repairs)
        self._next: _Token | None = None

    def document(self) -> dict[str, Any] | list[Any]:
        """The object or array that starts with the first token."""
        value = self._value(0)
        assert isinstance(value, dict | list), "a candidate starts with { or ["
        return value

    def _peek(self) -> str:
        if self._next is None:
            self._next = next(self._tokens, ("eof", None, self.end))
        return self._next[0]

    def _take(self) -> object:
        self._peek()
        assert self._next is not None
        _, value, self.end = self._next
        self._next = None
        return value

    def _value(self, depth: int) -> object:
        """The next value, or _MISSING (nothing consumed) if none starts here."""
        if depth > MAX_DEPTH:
            raise JsonTooDeep
        kind = self._peek()
        if kind == "{":
            self._take()
            return self._object(depth)
        if kind == "[":
            self._take()
            return self._array(depth)
        if kind == "scalar":
            return self._take()
        return _MISSING

    def _object(self, depth: int) -> dict[str, object]:
        out: dict[str, object] = {}
        while True:
            kind = self._peek()
            if kind == "eof":
                self.repairs.add("cut off")
                return out
            if kind == "}":
                self._take()
                return out
            if kind == "]":  # mismatched: close this object, leave "]" to the parent
                self.repairs.add("brackets")
                return out
            if kind in (",", ":"):
                self._take()
                continue
            if kind in ("{", "["):
                self.repairs.add("missing keys")
                self._value(depth + 1)
                continue
            key = str(self._take())
            if self._peek() == ":":
                self._take()
            elif self._peek() in ("scalar", "{", "["):
                self.repairs.add("missing colons")
            if self._peek() == "eof":
                self.repairs.add("cut off")
                return out
            value = self._value(depth + 1)
            out[key] = None if value is _MISSING else value
            if self._peek() == ",":
                self._take()
            elif self._peek() not in ("}", "]", "eof"):
                self.repairs.add("missing commas")

    def _array(self, depth: int) -> list[object]:
        out: list[object] = []
        while True:
            kind = self._peek()
            if kind == "eof":
                self.repairs.add("cut off")
                return out
            if kind == "]":
                self._take()
                return out
            if kind == "}":  # mismatched: close this list, leave "}" to the parent
                self.repairs.add("brackets")
                return out
            if kind in (",", ":"):
                self._take()
                continue
            out.append(self._value(depth + 1))
            if self._peek() not in (",", "]", "}", "eof"):
                self.repairs.add("missing commas")
