"""Done-gates: parsing criteria, finding a model's code, and checking real answers.

``check`` runs code in the real sandbox (short limits); the answers are shaped
like a small model's: prose around fenced blocks, sample output, cut-off fences.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.errors import InvalidInput
from taled.settings import GateSettings, SandboxSettings
from taled.tasks.gates.gates import (
    MAX_CRITERIA,
    MAX_CRITERION_CHARS,
    Criterion,
    GateOutcome,
    check,
    extract_python,
    parse_criteria,
)

GATES = GateSettings(sandbox=SandboxSettings(timeout_seconds=2, cpu_seconds=1))

ADD_OK = """Here is the function:

```python
def add(a, b):
    return a + b
```

It returns the sum of its arguments.
"""

ADD_WRONG = """Sure!

```python
def add(a, b):
    return a - b
```
"""

CRASHES = """Use this:

```python
def greet(name):
    return "Hello, " + name

print(greet(nme))
```
"""

PRINTS = """```py
for i in range(3):
    print(f"line {i}")
```
"""

PROSE = "Paris is the capital of France. It has been since the 10th century."


def gate(result: str, *criteria: str, settings: GateSettings = GATES) -> GateOutcome:
    """Check ``result`` against the criteria given as text."""
    return asyncio.run(check(result, parse_criteria(list(criteria)), settings))


# --- parse_criteria ------------------------------------------------------------------


def test_every_form_parses() -> None:
    """Each accepted form parses to its kind and argument, stripped."""
    parsed = parse_criteria(
        ["python", " contains: Paris ", "regex:^\\d+$", "assert:assert add(2, 3) == 5", "output:42"]
    )
    assert parsed == [
        Criterion("python"),
        Criterion("contains", "Paris"),
        Criterion("regex", "^\\d+$"),
        Criterion("assert", "assert add(2, 3) == 5"),
        Criterion("output", "42"),
    ]


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("run it", "'run it' is not a known kind"),
        ("contains:", "'contains' needs a value after the colon"),
        ("output", "'output' needs a value after the colon"),
        ("python:3", "'python' takes no argument"),
        ("regex:([a-z]", "the pattern does not compile"),
        ("regex:a{99999999999}", "the pattern does not compile"),
        ("assert:assert (", "the code is not valid Python"),
        ("contains:" + "x" * MAX_CRITERION_CHARS, f"longer than {MAX_CRITERION_CHARS}"),
    ],
)
def test_a_bad_criterion_is_refused_naming_it_and_the_forms(item: str, problem: str) -> None:
    """A malformed criterion raises InvalidInput that quotes it, says why and lists the forms."""
    with pytest.raises(InvalidInput) as caught:
        parse_criteria(["python", item])
    message = caught.value.message
    assert problem in message
    assert "accepted forms: python, contains:TEXT, regex:PATTERN, assert:CODE, output:TEXT" in (
        message
    )
    assert repr(item.strip())[:20] in message or item.strip() == ""


def test_too_many_criteria_are_refused() -> None:
    """More than MAX_CRITERIA criteria is an error saying the limit."""
    with pytest.raises(InvalidInput, match=f"at most {MAX_CRITERIA}"):
        parse_criteria(["python"] * (MAX_CRITERIA + 1))


def test_a_criterion_that_is_not_a_string_is_refused() -> None:
    """Input from JSON may be any type; a non-string item is InvalidInput, not a crash."""
    with pytest.raises(InvalidInput, match="not a string"):
        parse_criteria([3])  # type: ignore[list-item]


_KIND_LIKE = st.sampled_from(["python", "contains", "regex", "assert", "output", "Regex", "x"])
_ITEMS = st.one_of(
    st.text(max_size=60),
    st.builds(lambda kind, rest: f"{kind}:{rest}", _KIND_LIKE, st.text(max_size=60)),
)


@given(st.lists(_ITEMS, max_size=MAX_CRITERIA + 2))
def test_parse_criteria_raises_nothing_but_invalid_input(items: list[str]) -> None:
    """Whatever the strings, parsing succeeds or raises InvalidInput."""
    with contextlib.suppress(InvalidInput):
        parse_criteria(items)


_ARGUMENT = st.text(min_size=1, max_size=50).map(str.strip).filter(bool)
_CRITERIA = st.one_of(
    st.just(Criterion("python")),
    st.builds(Criterion, st.just("contains"), _ARGUMENT),
    st.builds(Criterion, st.just("output"), _ARGUMENT),
    st.builds(
        Criterion, st.just("regex"), st.from_regex(r"[a-z0-9 ]{1,20}", fullmatch=True)
    ).filter(lambda c: c.argument.strip() == c.argument and c.argument != ""),
    st.builds(
        Criterion,
        st.just("assert"),
        st.sampled_from(["assert True", "assert f(1) == 2", "x = 1\nassert x"]),
    ),
)


@given(st.lists(_CRITERIA, max_size=MAX_CRITERIA))
def test_criteria_round_trip_through_their_text(criteria: list[Criterion]) -> None:
    """Parsing each criterion's text gives the criterion back."""
    assert parse_criteria([c.text for c in criteria]) == criteria


# --- extract_python ------------------------------------------------------------------


def test_python_blocks_are_extracted_from_prose() -> None:
    """The code of a ```python block is found among prose."""
    assert extract_python(ADD_OK) == "def add(a, b):\n    return a + b\n"


def test_several_blocks_are_joined_in_order() -> None:
    """Blocks are joined, so a later block can use what an earlier one defined."""
    text = "First:\n```python\nx = 1\n```\nThen:\n```py\nprint(x)\n```\n"
    assert extract_python(text) == "x = 1\n\nprint(x)\n"


def test_an_unlabelled_block_that_is_python_is_extracted() -> None:
    """A bare ``` block is code if it parses as Python and does something."""
    assert (
        extract_python("```\nimport math\nprint(math.pi)\n```") == "import math\nprint(math.pi)\n"
    )


def test_sample_output_and_other_languages_are_not_code() -> None:
    """Output blocks (a lone value), shell and JSON blocks are left out."""
    text = (
        "```python\nprint(add(2, 3))\n```\nOutput:\n```\n5\n```\n"
        '```bash\npip install thing\n```\n```json\n{"a": 1}\n```\n```\nHello\n```\n'
    )
    assert extract_python(text) == "print(add(2, 3))\n"


def test_an_answer_without_code_has_none() -> None:
    """Plain prose, and prose with only non-Python blocks, have no code."""
    assert extract_python(PROSE) is None
    assert extract_python("Run:\n```bash\nls -la\n```\n") is None
    assert extract_python("") is None


def test_an_unterminated_final_fence_runs_to_the_end() -> None:
    """An answer cut at max_tokens keeps its last, unclosed block (broken as it is)."""
    text = "Here:\n```python\ndef f(x):\n    return (x +"
    assert extract_python(text) == "def f(x):\n    return (x +\n"


def test_an_interactive_session_becomes_the_code_typed() -> None:
    """>>> prompts are stripped and the echoed output dropped."""
    text = "```python\n>>> x = 2\n>>> for i in range(2):\n...     print(x * i)\n0\n2\n```"
    assert extract_python(text) == "x = 2\nfor i in range(2):\n    print(x * i)\n"


def test_an_indented_block_is_dedented() -> None:
    """A fence indented inside a list item gives its code without the indent."""
    text = "1. Write it:\n\n   ```python\n   def f():\n       return 1\n   ```\n"
    assert extract_python(text) == "def f():\n    return 1\n"


def test_an_answer_that_is_only_code_is_code() -> None:
    """A model that answers with bare code and no fence still has its code checked."""
    assert extract_python("def f():\n    return 1\n") == "def f():\n    return 1\n"


def test_bare_code_followed_by_its_explanation_is_code() -> None:
    """Small models write code without a fence and explain it after: the code is found."""
    text = 'print("Hello World")\n\nThis prints Hello World to the console.'
    assert extract_python(text) == 'print("Hello World")\n'


def test_bare_code_after_a_line_of_prose_keeps_its_blank_lines() -> None:
    """A "Here it is:" line is dropped; a blank line inside a function body is kept."""
    text = "Here it is:\ndef f(x):\n    y = 1\n\n    return x + y\n\nprint(f(2))\n\nIt prints 3."
    assert extract_python(text) == "def f(x):\n    y = 1\n\n    return x + y\n\nprint(f(2))\n"


def test_prose_without_fences_has_no_code() -> None:
    """A one-word answer or sentences are not code, even beside a lone name."""
    assert extract_python("Paris") is None
    assert extract_python("The capital of France is Paris.\n\nParis") is None


@given(st.text(max_size=300))
def test_extract_python_never_crashes(text: str) -> None:
    """Any text gives a string or None."""
    found = extract_python(text)
    assert found is None or isinstance(found, str)


_CODE_LINE = st.sampled_from(
    ["x = 1", "print(x)", "def f(a):", "    return a * 2", "import os", "y = f(3)", "# note"]
)


@given(
    st.lists(_CODE_LINE, min_size=1, max_size=8).map("\n".join),
    st.sampled_from(["python", "py", "python3"]),
    st.text(alphabet=st.characters(blacklist_characters="`~"), max_size=80),
)
def test_a_labelled_block_is_extracted_verbatim(code: str, label: str, prose: str) -> None:
    """Whatever the prose around it, a labelled block's body comes back unchanged."""
    text = f"{prose}\n```{label}\n{code}\n```\n{prose}"
    assert extract_python(text) == code + "\n"


# --- check -----------------------------------------------------------------------------


def test_the_default_gate_passes_code_that_runs() -> None:
    """With no criteria, an answer whose code runs passes."""
    outcome = gate(PRINTS)
    assert outcome.passed and outcome.feedback == ""
    assert [(c.criterion, c.passed) for c in outcome.checks] == [("python", True)]


def test_code_that_only_defines_functions_passes() -> None:
    """Defining a function without calling it is fine: it runs without error."""
    assert gate(ADD_OK).passed


def test_the_default_gate_fails_code_that_raises_with_useful_feedback() -> None:
    """A crash fails the gate; the feedback names the error and line, quotes stderr,
    and asks for a fixed, complete answer."""
    outcome = gate(CRASHES)
    assert not outcome.passed
    feedback = outcome.feedback
    assert feedback.startswith("Your previous answer failed its check: running its Python code")
    assert "NameError: name 'nme' is not defined (line 4)" in feedback
    assert "print(greet(nme))" in feedback  # the traceback's tail
    assert feedback.endswith("Fix it and answer again with the complete result.")


def test_the_default_gate_passes_an_answer_without_code() -> None:
    """No code, nothing to run: the default gate passes with no checks."""
    outcome = gate(PROSE)
    assert outcome.passed and outcome.checks == ()


def test_the_default_gate_can_be_turned_off() -> None:
    """With python_code off and no criteria, even broken code passes."""
    settings = GateSettings(python_code=False, sandbox=GATES.sandbox)
    assert gate(CRASHES, settings=settings).passed


def test_code_that_waits_for_input_does_not_hang() -> None:
    """Code reading stdin gets EOF at once and fails fast instead of waiting for the timeout."""
    outcome = gate("```python\nname = input('Name: ')\nprint(name)\n```")
    assert not outcome.passed
    assert "EOFError" in outcome.feedback
    assert "time limit" not in outcome.feedback


def test_an_answer_cut_off_mid_code_fails_with_its_syntax_error() -> None:
    """A truncated answer fails with a SyntaxError the model can act on."""
    outcome = gate("```python\ndef add(a, b):\n    return (a +")
    assert not outcome.passed
    assert "SyntaxError" in outcome.feedback


def test_an_infinite_loop_fails_with_the_time_limit() -> None:
    """Code that never ends fails the gate with the sandbox's time-limit reason."""
    outcome = gate("```python\nimport time\nwhile True:\n    time.sleep(0.1)\n```")
    assert not outcome.passed
    assert "exceeded the 2 s time limit" in outcome.feedback


def test_the_python_criterion_fails_an_answer_without_code() -> None:
    """An explicit python criterion needs code to be there."""
    outcome = gate(PROSE, "python")
    assert not outcome.passed
    assert "contains no Python code" in outcome.feedback


def test_contains_is_case_insensitive() -> None:
    """contains:TEXT passes whatever the case, fails when absent."""
    assert gate(PROSE, "contains:PARIS").passed
    outcome = gate(PROSE, "contains:Berlin")
    assert not outcome.passed
    assert "does not contain 'Berlin'" in outcome.feedback


def test_regex_searches_the_answer() -> None:
    """regex:PATTERN passes when re.search finds it anywhere."""
    assert gate(PROSE, r"regex:\d+th century").passed
    outcome = gate(PROSE, r"regex:^\d+$")
    assert not outcome.passed
    assert r"does not match the pattern /^\d+$/" in outcome.feedback


def test_a_runaway_regex_does_not_stall_the_daemon() -> None:
    """A catastrophically backtracking pattern is cut off by the sandbox's limits."""
    outcome = gate("a" * 40 + "!", "regex:^(a+)+$")
    assert not outcome.passed
    assert "could not be checked" in outcome.feedback
    assert "limit" in outcome.feedback


def test_assert_passes_correct_code() -> None:
    """assert:CODE runs after the answer's code and passes when it holds."""
    outcome = gate(ADD_OK, "assert:assert add(2, 3) == 5", "assert:assert add(-1, 1) == 0")
    assert outcome.passed
    assert [c.passed for c in outcome.checks] == [True, True]


def test_assert_fails_wrong_code_and_quotes_the_check() -> None:
    """A failing assertion fails the gate; the feedback quotes the check that broke."""
    outcome = gate(ADD_WRONG, "assert:assert add(2, 3) == 5")
    assert not outcome.passed
    assert "the check `assert add(2, 3) == 5` failed" in outcome.feedback
    assert "AssertionError" in outcome.feedback


def test_assert_fails_an_answer_without_code() -> None:
    """An assert criterion on prose fails, saying there was no code."""
    outcome = gate(PROSE, "assert:assert add(2, 3) == 5")
    assert not outcome.passed and "contains no Python code" in outcome.feedback


def test_output_passes_when_the_code_prints_it() -> None:
    """output:TEXT passes when running the code prints TEXT."""
    assert gate(PRINTS, "output:line 2").passed


def test_output_fails_and_says_what_was_printed() -> None:
    """output:TEXT fails when the text is not printed, quoting what was."""
    outcome = gate(PRINTS, "output:line 3")
    assert not outcome.passed
    assert "did not print 'line 3'" in outcome.feedback
    assert "line 0" in outcome.feedback


def test_every_failure_is_reported_at_once() -> None:
    """All criteria are checked; the feedback lists each failure."""
    outcome = gate(ADD_WRONG, "contains:sum", "assert:assert add(2, 3) == 5", "python")
    assert not outcome.passed
    assert [c.passed for c in outcome.checks] == [False, False, True]
    assert "does not contain 'sum'" in outcome.feedback
    assert "the check `assert add(2, 3) == 5` failed" in outcome.feedback
    assert re.match(r"Your previous answer failed its check: .+; .+\.", outcome.feedback)


def test_an_outcome_serializes_to_json_types() -> None:
    """to_dict gives plain data for task events and checkpoints."""
    outcome = gate(PROSE, "contains:paris")
    assert outcome.to_dict() == {
        "passed": True,
        "checks": [{"criterion": "contains:paris", "passed": True, "detail": "contains 'paris'"}],
        "feedback": "",
    }


def test_secrets_the_code_printed_are_redacted_from_the_feedback() -> None:
    """Feedback for the model quotes the code's error output with keys taken out."""
    key = "sk-proj-" + "Ab3" * 12
    pem = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        "b3BlbnNzaC1rZXktdjEAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----"
    )
    answer = (
        "```python\nimport sys\n"
        f"sys.stderr.write({pem!r} + '\\n')\n"
        f"raise ValueError('OPENAI_API_KEY={key}')\n```"
    )
    outcome = gate(answer)
    assert not outcome.passed
    assert key not in outcome.feedback
    assert "b3BlbnNzaC1rZXktdjEAAAA" not in outcome.feedback
    assert "OPENAI_API_KEY=[REDACTED]" in outcome.feedback
    assert "ValueError" in outcome.feedback
