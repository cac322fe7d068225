"""Take secrets out of text before it travels back to a model.

What sandboxed code printed is fed back to the model after a failed gate, and the
model may run on another machine (an ``openai:`` backend). The sandbox keeps the
user's files out of reach; this is the second line: anything in that text that
looks like a credential is replaced by ``[REDACTED]`` first.

Three kinds of match:

* well-known token shapes (PEM private keys, OpenAI/Anthropic/GitHub/GitLab/Slack/
  AWS/Google/Hugging Face keys, JWTs);
* ``name = value`` where the name says key, token, secret or password (the name is
  kept, so the model still sees which setting was wrong);
* the values of the daemon's own environment variables whose names say the same
  (``OPENAI_API_KEY`` ...), wherever they appear;

plus long runs that mix upper case, lower case and digits (40+ characters), the
shape of most random keys. False positives cost a model one token of context;
false negatives leak a key, so the rules lean towards redacting.
"""

from __future__ import annotations

import functools
import os
import re

__all__ = ["REDACTED", "redact"]

REDACTED = "[REDACTED]"

_SECRET_NAME = (
    r"(?:api[_-]?key|secret|token|passw(?:or)?d|private[_-]?key|access[_-]?key|credential)"
)

_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
        re.DOTALL,
    ),
    re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
)
# name = value / name: value / "name": "value" — the value goes, the name stays.
_ASSIGNMENT = re.compile(
    rf"(?i)(\b[\w.-]*{_SECRET_NAME}[\w.-]*[\"']?\s*[:=]\s*)"
    r"(\"[^\"\n]+\"|'[^'\n]+'|[^\s\"',;]{6,})"
)
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_=-]{40,}")
_MIXED = (re.compile(r"[a-z]"), re.compile(r"[A-Z]"), re.compile(r"[0-9]"))
_ENV_NAME = re.compile(rf"(?i){_SECRET_NAME}")
_MIN_ENV_SECRET = 8


def redact(text: str) -> str:
    """``text`` with everything that looks like a credential replaced by ``[REDACTED]``."""
    for value in _environment_secrets():
        text = text.replace(value, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = _ASSIGNMENT.sub(_keep_name, text)
    return _LONG_RUN.sub(_random_looking, text)


def _keep_name(match: re.Match[str]) -> str:
    value = match.group(2)
    quote = value[0] if value[0] in "\"'" else ""
    return match.group(1) + quote + REDACTED + quote


def _random_looking(match: re.Match[str]) -> str:
    run = match.group(0)
    return REDACTED if all(p.search(run) for p in _MIXED) else run


@functools.cache
def _environment_secrets() -> tuple[str, ...]:
    """Values of the daemon's environment variables named like secrets, longest first."""
    values = {
        value
        for name, value in os.environ.items()
        if _ENV_NAME.search(name) and len(value) >= _MIN_ENV_SECRET
    }
    return tuple(sorted(values, key=len, reverse=True))
