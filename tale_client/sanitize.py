"""Text from the daemon made safe to show on a terminal.

A task's result, a chat reply or a task's text is whatever a model or a user
wrote; printed raw, an escape sequence in it could retitle the terminal, clear the
screen, move the cursor over earlier output or (on some terminals) answer back as
keyboard input. Every human-readable output strips them: escape sequences whole
(ESC and the C1 introducers), other C0 and C1 control characters and DEL one by
one. Newlines and tabs stay; a carriage return goes (it could overwrite the line
it ends). ``--json`` output keeps the text exact and escapes them instead.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["json_safe", "printable", "printable_doc"]

# Escape sequences, after ECMA-48: CSI (ESC [ or the C1 byte 0x9b) with its
# parameters; OSC, DCS, SOS, PM and APC strings (ESC ] P X ^ _ or 0x9d 0x90 0x98
# 0x9e 0x9f) up to their terminator (BEL, ESC \ or 0x9c) or the end of the text;
# and ESC followed by intermediates and one final byte. A sequence cut off by the
# end of a streamed piece loses its ESC here, and its tail is plain text.
_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x9d\x90\x98\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
# What is left: C0 controls but tab and newline, DEL, C1 controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# In JSON text these can only appear inside strings; json.dump leaves DEL and C1 raw.
_JSON_RAW = re.compile(r"[\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (but \\n and \\t)."""
    if text.isprintable():
        return text  # the common case, and the fast one
    return _CONTROLS.sub("", _SEQUENCES.sub("", text))


def printable_doc(doc: Any) -> Any:
    """A copy of a JSON document with every string (keys too) made ``printable``."""
    if isinstance(doc, str):
        return printable(doc)
    if isinstance(doc, dict):
        return {printable_doc(k): printable_doc(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [printable_doc(v) for v in doc]
    return doc


def json_safe(text: str) -> str:
    """JSON text with DEL and C1 characters written as ``\\u00XX`` (the same document)."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
