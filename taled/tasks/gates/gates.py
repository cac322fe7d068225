"""Done-gates: the criteria a task's result must meet, and the check that applies them.

A model's answer is not done because the model stopped: a task may carry done
criteria (``contains:``, ``regex:``, ``python``, ``assert:``, ``output:``), and
by default any Python code in a result must at least run. ``check`` applies them
— code runs only in the sandbox (``taled.sandbox.sandbox``), never in the daemon — and
returns a ``GateOutcome`` whose ``feedback`` is written to be handed back to the
model for another attempt, so a failure says what broke and how.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from taled.errors import InvalidInput
from taled.sandbox.sandbox import SandboxResult, run_python
from taled.tasks.gates.redact import redact

if TYPE_CHECKING:
    from taled.settings import GateSettings

__all__ = [
    "MAX_CRITERIA",
    "MAX_CRITERION_CHARS",
    "Check",
    "Criterion",
    "CriterionKind",
    "GateOutcome",
    "RunCheck",
    "check",
    "extract_python",
    "parse_criteria",
]

RunCheck = Callable[[str], Awaitable[tuple[bool, str]]]
"""Runs a ``run:COMMAND`` criterion's command in a task's workspace: (exit 0, detail)."""

CriterionKind = Literal["python", "contains", "regex", "assert", "output", "run"]

MAX_CRITERIA = 20
MAX_CRITERION_CHARS = 2000

_FORMS = "python, contains:TEXT, regex:PATTERN, assert:CODE, output:TEXT, run:COMMAND"
_KINDS: frozenset[str] = frozenset(get_args(CriterionKind))
_PYTHON_LABELS = frozenset({"python", "py", "python3", "py3", "pycon"})
_PROMPTS = (">>> ", "... ")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)[^`]*$")
# Characters of stderr (its tail) quoted in feedback.
_FEEDBACK_STDERR = 800
_REGEX_PROGRAM = (
    "import re, sys\nprint('match' if re.search({pattern!r}, sys.stdin.read()) else 'no match')\n"
)


@dataclass(frozen=True)
class Criterion:
    """One parsed done criterion."""

    kind: CriterionKind
    argument: str = ""
    """TEXT, PATTERN or CODE (stripped); empty for ``python``."""

    @property
    def text(self) -> str:
        """The criterion as written (``parse_criteria([c.text]) == [c]``)."""
        return f"{self.kind}:{self.argument}" if self.argument else self.kind

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Check:
    """How one criterion fared."""

    criterion: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateOutcome:
    """The verdict on a result: every check, and feedback for the model if it failed."""

    passed: bool
    checks: tuple[Check, ...]
    feedback: str
    """Empty when passed; else one paragraph to send back to the model."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form (for task events and checkpoints)."""
        return {
            "passed": self.passed,
            "checks": [
                {"criterion": c.criterion, "passed": c.passed, "detail": c.detail}
                for c in self.checks
            ],
            "feedback": self.feedback,
        }


def parse_criteria(items: list[str]) -> list[Criterion]:
    """Parse done criteria; raise ``InvalidInput`` naming the bad item and the forms."""
    if not isinstance(items, list):
        raise InvalidInput(f"done criteria must be a list of strings; accepted forms: {_FORMS}")
    if len(items) > MAX_CRITERIA:
        raise InvalidInput(f"at most {MAX_CRITERIA} done criteria are allowed, got {len(items)}")
    return [_parse_one(item) for item in items]


def _parse_one(item: object) -> Criterion:
    if not isinstance(item, str):
        raise _bad(repr(item), "it is not a string")
    text = item.strip()
    if not text:
        raise _bad(repr(item), "it is empty")
    if len(text) > MAX_CRITERION_CHARS:
        raise _bad(_excerpt(text), f"it is longer than {MAX_CRITERION_CHARS} characters")
    head, colon, rest = text.partition(":")
    kind = head.strip().lower()
    if kind not in _KINDS:
        raise _bad(_excerpt(text), f"{head.strip()!r} is not a known kind")
    argument = rest.strip()
    if kind == "python":
        if argument:
            raise _bad(_excerpt(text), "'python' takes no argument")
        return Criterion("python")
    if not colon or not argument:
        raise _bad(_excerpt(text), f"{kind!r} needs a value after the colon")
    if kind == "regex":
        try:
            re.compile(argument)
        except (re.error, OverflowError, RecursionError) as exc:
            raise _bad(_excerpt(text), f"the pattern does not compile ({exc})") from None
    elif kind == "assert":
        try:
            compile(argument, "<criterion>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError) as exc:
            raise _bad(_excerpt(text), f"the code is not valid Python ({exc})") from None
    return Criterion(cast(CriterionKind, kind), argument)


def _bad(item: str, problem: str) -> InvalidInput:
    return InvalidInput(f"bad done criterion {item}: {problem}; accepted forms: {_FORMS}")


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


# --- finding the code --------------------------------------------------------------


def extract_python(text: str) -> str | None:
    """The Python code of a model's answer, or None if it has none.

    Code is taken from fenced blocks labelled ``python``/``py`` (kept even when
    broken: the gate should report it) and from unlabelled blocks that parse as
    Python and do something (not a lone value such as sample output). Several
    blocks are joined in order. A final fence left open (an answer cut at
    ``max_tokens``) runs to the end of the text. In an answer without any fence,
    small models often write the code bare and explain it after: its code is the
    paragraphs that are such Python (a paragraph may open with a line of prose,
    "Here it is:", which is dropped).
    """
    blocks = _fenced_blocks(text)
    if blocks is None:
        return _join(_bare_code(text))
    code = [
        _undoctest(body)
        for label, body in blocks
        if body.strip() and (label in _PYTHON_LABELS or (not label and _runnable(body)))
    ]
    return _join(code)


def _join(code: list[str]) -> str | None:
    return "\n\n".join(c.rstrip("\n") for c in code) + "\n" if code else None


def _bare_code(text: str) -> list[str]:
    """The runnable paragraphs of a text with no fences, in order."""
    paragraphs: list[list[str]] = []
    for chunk in re.split(r"\n[ \t]*\n", text.strip()):
        lines = chunk.splitlines()
        if paragraphs and lines and lines[0][:1] in (" ", "\t"):
            # An indented paragraph goes on with the one before (a blank line in a body).
            paragraphs[-1] += ["", *lines]
        elif lines:
            paragraphs.append(lines)
    code = []
    for lines in paragraphs:
        for start in range(min(len(lines), 2)):  # the whole, or after one line of prose
            body = "\n".join(lines[start:])
            if _runnable(body):
                code.append(body)
                break
    return code


def _fenced_blocks(text: str) -> list[tuple[str, str]] | None:
    """(label, body) of each fenced block; None when the text has no fence at all."""
    blocks: list[tuple[str, str]] = []
    lines = text.splitlines()
    opened: tuple[str, str, int] | None = None  # fence, label, indent
    body: list[str] = []
    seen_fence = False
    for line in lines:
        match = _FENCE.match(line)
        if opened is None:
            if match:
                seen_fence = True
                opened = (match["fence"], match["info"].lower(), len(match["indent"]))
                body = []
            continue
        fence, label, indent = opened
        if (
            match
            and not match["info"]
            and match["fence"][0] == fence[0]
            and len(match["fence"]) >= len(fence)
        ):
            blocks.append((label, _dedent(body, indent)))
            opened = None
            continue
        body.append(line)
    if opened is not None:
        blocks.append((opened[1], _dedent(body, opened[2])))
    return blocks if seen_fence else None


def _undoctest(body: str) -> str:
    """An interactive session (``>>> add(2, 3)`` then ``5``) as the code it typed."""
    lines = body.splitlines()
    if not any(line.lstrip().startswith(">>>") for line in lines):
        return body
    typed = []
    for line in lines:
        text = line.lstrip()
        if text.startswith(_PROMPTS) or text in (">>>", "..."):
            typed.append(text[4:])
    return "\n".join(typed) + "\n"


def _dedent(lines: list[str], indent: int) -> str:
    out = []
    for line in lines:
        strip = min(indent, len(line) - len(line.lstrip(" \t")))
        out.append(line[strip:])
    return "\n".join(out) + "\n"


def _runnable(code: str) -> bool:
    """Parses as Python and does something: not just a value (``42``, ``Hello``)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(
        not isinstance(node, ast.Expr)
        or isinstance(node.value, ast.Call | ast.Await | ast.Yield | ast.YieldFrom)
        for node in tree.body
    )


# --- checking -----------------------------------------------------------------------


async def check(
    result: str,
    criteria: list[Criterion],
    settings: GateSettings,
    *,
    scratch_root: Path | None = None,
    command: RunCheck | None = None,
) -> GateOutcome:
    """Check ``result`` against ``criteria`` (or the default gate when there are none).

    ``command`` runs a ``run:COMMAND`` criterion's command in the task's workspace (in the
    sandbox) and says whether it exited 0; without one (a task with no workspace) such a
    criterion fails, saying so.

    The default (``settings.python_code``): Python code in the result must run;
    a result with no code passes, as there is nothing to check. Every criterion
    is checked (no short cut), so the feedback names every failure at once.
    """
    code = extract_python(result)
    if not criteria:
        if not settings.python_code or code is None:
            return GateOutcome(passed=True, checks=(), feedback="")
        criteria = [Criterion("python")]
    runner = _Runner(settings, scratch_root, command)
    checks: list[Check] = []
    failures: list[str] = []
    stderr_tail = ""
    for criterion in criteria:
        passed, detail, run = await _apply(criterion, result, code, runner)
        checks.append(Check(criterion.text, passed, detail))
        if not passed:
            failures.append(detail)
            if run is not None and not stderr_tail and run.stderr.strip():
                stderr_tail = _tail(run.stderr, _FEEDBACK_STDERR)
    passed = not failures
    return GateOutcome(
        passed=passed,
        checks=tuple(checks),
        feedback="" if passed else _feedback(failures, stderr_tail),
    )


class _Runner:
    """Runs code in the sandbox, once per distinct program."""

    def __init__(
        self, settings: GateSettings, scratch_root: Path | None, command: RunCheck | None = None
    ) -> None:
        self._settings = settings
        self._scratch_root = scratch_root
        self._runs: dict[tuple[str, str], SandboxResult] = {}
        self.command = command

    async def run(self, code: str, stdin: str = "") -> SandboxResult:
        key = (code, stdin)
        if key not in self._runs:
            self._runs[key] = await run_python(
                code, self._settings.sandbox, scratch_root=self._scratch_root, stdin=stdin
            )
        return self._runs[key]


async def _apply(
    criterion: Criterion, result: str, code: str | None, runner: _Runner
) -> tuple[bool, str, SandboxResult | None]:
    """(passed, detail, the sandbox run if there was one) for one criterion."""
    arg = criterion.argument
    if criterion.kind == "run":
        if runner.command is None:
            return False, f"run:{arg} needs a workspace (submit the task with --in DIR)", None
        passed, detail = await runner.command(arg)
        return passed, detail, None
    if criterion.kind == "contains":
        if arg.casefold() in result.casefold():
            return True, f"contains {arg!r}", None
        return False, f"the answer does not contain {arg!r}", None
    if criterion.kind == "regex":
        # In the sandbox, not here: a pattern that backtracks for minutes must not
        # stall the daemon's event loop.
        run = await runner.run(_REGEX_PROGRAM.format(pattern=arg), stdin=result)
        if run.ok and run.stdout == "match\n":
            return True, f"matches /{arg}/", None
        if run.ok:
            return False, f"the answer does not match the pattern /{arg}/", None
        return False, f"the pattern /{arg}/ could not be checked: it {run.reason}", None
    if code is None:
        return False, "the answer contains no Python code (a ```python block)", None
    if criterion.kind == "python":
        run = await runner.run(code)
        if run.ok:
            return True, "its Python code ran without error", run
        return False, f"running its Python code {run.reason}", run
    if criterion.kind == "assert":
        run = await runner.run(f"{code}\n\n{arg}\n")
        if run.ok:
            return True, f"`{arg}` holds", run
        return False, f"the check `{arg}` failed: running it {run.reason}", run
    # output
    run = await runner.run(code)
    if not run.ok:
        return False, f"running its Python code {run.reason}", run
    if arg in run.stdout:
        return True, f"it printed {arg!r}", run
    printed = _excerpt(run.stdout.strip()) if run.stdout.strip() else "nothing"
    return False, f"its Python code did not print {arg!r} (it printed {printed})", run


def _feedback(failures: list[str], stderr_tail: str) -> str:
    # Both parts quote what the code printed, and this text goes to the model (maybe
    # on another machine): anything that looks like a credential is taken out first.
    text = "Your previous answer failed its check: " + "; ".join(failures) + "."
    if stderr_tail:
        text += f" The error output ended with:\n```\n{stderr_tail}\n```\n"
    else:
        text += " "
    return redact(text) + "Fix it and answer again with the complete result."


def _tail(text: str, chars: int) -> str:
    text = text.strip()
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    newline = cut.find("\n")
    return "..." + (cut[newline:] if 0 <= newline < chars // 2 else cut)
