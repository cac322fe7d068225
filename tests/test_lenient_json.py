"""The lenient JSON reader: finding JSON in a model's answer and repairing it."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from taled.tasks.planning.lenient_json import (
    MAX_DEPTH,
    Candidate,
    JsonTooDeep,
    extract_json,
    json_candidates,
)
from tests import strategies


def repairs(text: str) -> frozenset[str]:
    """The repairs made reading the first candidate in ``text``."""
    return next(json_candidates(text)).read().repairs


# ---------------------------------------------------------------------------
# Finding the JSON
# ---------------------------------------------------------------------------


def test_json_in_prose_is_found() -> None:
    """The first object in an answer is read, whatever prose surrounds it."""
    assert extract_json('Sure! Here it is: {"a": [1, 2]} Hope this helps {"b": 3}') == {"a": [1, 2]}


def test_fenced_blocks_come_before_spans_outside_them() -> None:
    """A ```json block is read before a bracket that comes earlier in the prose."""
    text = 'Steps [see below]:\n```json\n{"a": 1}\n```\n'
    assert extract_json(text) == {"a": 1}
    assert [c.read().value for c in json_candidates(text)] == [{"a": 1}, ["see", "below"], {"a": 1}]


def test_a_list_inside_a_broken_object_is_not_a_candidate_of_its_own() -> None:
    """The next span starts where the previous value ends, even a cut-off one."""
    text = '{"steps": [{"id": "s1", "do": "Blog", "examples": ["one thing", "another thing", '
    assert [c.start for c in json_candidates(text)] == [0]


def test_text_without_brackets_holds_no_json() -> None:
    """Prose without an object or array gives None, even if it is a JSON scalar."""
    assert extract_json("I think you should just do it yourself.") is None
    assert extract_json('"just a string"') is None


def test_a_candidate_must_start_at_a_bracket() -> None:
    """Making a Candidate anywhere but at a { or [ is a caller error."""
    with pytest.raises(ValueError, match="no"):
        Candidate("abc {}", 1)


# ---------------------------------------------------------------------------
# Repairs
# ---------------------------------------------------------------------------


def test_strict_json_needs_no_repair() -> None:
    """Valid JSON is read exactly as json reads it, with no repairs."""
    text = '{"a": [1, 2.5, true, null, "\\u00e9\\ud83d\\ude00"]}'
    assert extract_json(text) == json.loads(text)
    assert repairs(text) == frozenset()


def test_single_quotes_bare_words_trailing_commas_and_comments_are_repaired() -> None:
    """Python-ish JSON with comments reads as the JSON it was meant to be."""
    text = """{'steps': [
        {'id': 's1', 'do': 'Write the parser',}, // first
        {id: s2, do: 'Test the parser', needs: [s1], done: False,},  # second
    ],}"""
    assert extract_json(text) == {
        "steps": [
            {"id": "s1", "do": "Write the parser"},
            {"id": "s2", "do": "Test the parser", "needs": ["s1"], "done": False},
        ]
    }
    assert repairs(text) == {"quotes", "bare words", "comments"}


def test_typographic_quotes_are_read_as_quotes() -> None:
    """Curly quotes, as word processors and some models write them, delimit strings."""
    assert extract_json("{\u201ctitle\u201d: \u2018Draft it\u2019}") == {"title": "Draft it"}


def test_an_answer_cut_off_mid_value_is_closed() -> None:
    """An answer cut at max_tokens keeps every complete value and the start of the last."""
    full = json.dumps({"steps": [{"do": "Design the schema"}, {"do": "Benchmark it all"}]})
    cut = full[: full.index("it all")]
    assert extract_json(cut) == {"steps": [{"do": "Design the schema"}, {"do": "Benchmark "}]}
    assert repairs(cut) == {"cut off"}


def test_missing_commas_and_mismatched_brackets_are_tolerated() -> None:
    """Values without commas between them and a list closed with } still read."""
    text = '{"steps": [{"id": "s1" "do": "Draft"} {"id": "s2", "do": "Edit", "needs": ["s1"]}}'
    assert extract_json(text) == {
        "steps": [{"id": "s1", "do": "Draft"}, {"id": "s2", "do": "Edit", "needs": ["s1"]}]
    }
    assert repairs(text) == {"missing commas", "brackets"}


def test_escaped_surrogate_pairs_in_repaired_json_make_one_character() -> None:
    """\\ud83d\\ude00 is one emoji in broken JSON too, as in strict JSON."""
    assert extract_json("['\\ud83d\\ude00', '\\ud83d']") == ["\U0001f600", "\ud83d"]


def test_long_integers_in_repaired_json_stay_integers() -> None:
    """An integer too long for a float keeps every digit."""
    assert extract_json("[12345678901234567890123, 'x',]") == [12345678901234567890123, "x"]


def test_json_nested_too_deeply_to_repair_is_refused() -> None:
    """Broken JSON past MAX_DEPTH raises JsonTooDeep, never RecursionError."""
    text = "[" * 100_000
    with pytest.raises(JsonTooDeep):
        next(json_candidates(text)).read()
    assert extract_json(text) is None


def test_deep_strict_json_is_still_read() -> None:
    """Valid JSON deeper than MAX_DEPTH is read as json reads it."""
    depth = MAX_DEPTH * 2
    assert extract_json("[" * depth + "]" * depth) is not None


# ---------------------------------------------------------------------------
# Any input
# ---------------------------------------------------------------------------

json_values = strategies.json_values(max_key_size=8, max_leaves=20)
# JSON text has an object or an array at the top (extract_json finds nothing else).
documents = st.lists(json_values, max_size=5) | st.dictionaries(
    st.text(max_size=8), json_values, max_size=5
)
# Prose around the JSON: no brackets before it, no code fences anywhere.
prose = st.text(alphabet=st.characters(blacklist_characters="{[`"), max_size=40)


def with_trailing_commas(value: Any, ensure_ascii: bool) -> str:
    """``value`` as JSON with a comma after every member and item."""
    if isinstance(value, list):
        return "[" + "".join(f"{with_trailing_commas(v, ensure_ascii)}," for v in value) + "]"
    if isinstance(value, dict):
        members = (
            f"{json.dumps(k, ensure_ascii=ensure_ascii)}: {with_trailing_commas(v, ensure_ascii)},"
            for k, v in value.items()
        )
        return "{" + "".join(members) + "}"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def nesting(value: Any) -> int:
    """How many values deep ``value`` goes: 1 for a scalar or an empty container."""
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list) and children:
        return 1 + max(nesting(c) for c in children)
    return 1


@settings(max_examples=300)
@given(
    value=documents,
    trailing_commas=st.booleans(),
    ensure_ascii=st.booleans(),
    indent=st.none() | st.integers(0, 2),
    wrapping=st.sampled_from(["bare", "prose", "fence"]),
    before=prose,
    after=prose,
)
def test_any_json_reads_back_equal(
    value: Any,
    trailing_commas: bool,
    ensure_ascii: bool,
    indent: int | None,
    wrapping: str,
    before: str,
    after: str,
) -> None:
    """json.dumps output, with trailing commas, in prose or a fence, reads back the same."""
    if trailing_commas:
        assume(nesting(value) <= MAX_DEPTH + 1)
        text = with_trailing_commas(value, ensure_ascii)
    else:
        text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    if wrapping == "fence":
        assume("```" not in text)
        text = f"{before}\n```json\n{text}\n```\n{after}"
    elif wrapping == "prose":
        text = f"{before}{text}{after}"

    read = extract_json(text)

    assert read == value
    assert json.dumps(read) == json.dumps(value)  # the same types too: True is not 1
    if not trailing_commas:
        assert repairs(text) == frozenset()


json_ish = st.text(alphabet="{}[]:,\"'\\/*#`\n u0123456789.eE+-truefalsnTFN\u201c\u201d")


@settings(max_examples=300)
@given(text=st.text() | json_ish | json_values.map(json.dumps))
def test_any_text_is_read_without_raising(text: str) -> None:
    """Arbitrary text gives an object, an array or None; candidates raise only JsonTooDeep."""
    found = extract_json(text)
    assert found is None or isinstance(found, dict | list)
    for candidate in json_candidates(text):
        with contextlib.suppress(JsonTooDeep):
            assert isinstance(candidate.read().value, dict | list)
