"""Whether a task that names no workspace plainly asks to act: to make or change files,
or to run commands. Conservative on purpose: a question or a request for text gets a
plain answer with no tool overhead; only a request that names a file to write or a
command to run gets tools (and a scratch workspace)."""

from __future__ import annotations

import re

__all__ = ["needs_tools"]

_FILE = re.compile(
    r"(?<![\w/.-])[\w./-]*\w\.(?:py|pyi|js|mjs|ts|tsx|jsx|md|rst|txt|json|ya?ml|toml|csv|tsv|"
    r"html?|css|scss|sh|bash|rs|go|c|h|cc|cpp|hpp|java|kt|rb|php|ini|cfg|conf|sql|xml|lock)\b",
    re.IGNORECASE,
)
_RUN = re.compile(
    r"\b(?:run|execute)\s+(?:the\s+)?(?:tests?|test suite|pytest|`[^`]+`|command|script)\b"
    r"|\bmake\s+(?:the\s+)?(?:tests?|pytest)\s+pass\b",
    re.IGNORECASE,
)


# A file named as where the result goes: "write ... to hello.py", "save it as notes.md",
# "... into summary.md", "create a file hello.txt". A file merely mentioned ("add type
# hints to utils.py" with no workspace) is not enough: there is nothing to edit.
_TARGET = re.compile(
    r"\b(?:into|as|named|called)\s+[`'\"]?"
    + _FILE.pattern
    + r"|\b(?:create|write|save|generate|make)\b[^.?!\n]{0,80}?\bto\s+(?:a\s+)?(?:file\s+)?[`'\"]?"
    + _FILE.pattern
    + r"|\bcreate\s+(?:a\s+|the\s+)?(?:new\s+)?(?:file\s+)?[`'\"]?"
    + _FILE.pattern,
    re.IGNORECASE,
)


def needs_tools(text: str) -> bool:
    """True when ``text`` names a file to write the result to, or a command to run."""
    return bool(_RUN.search(text) or _TARGET.search(text))
