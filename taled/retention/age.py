"""Ages as people write them: ``90m``, ``12h``, ``30d``, ``2w`` (and ``45s``)."""

from __future__ import annotations

import re

from taled.errors import InvalidInput

__all__ = ["AGE_PATTERN", "parse_age"]

AGE_PATTERN = r"([1-9][0-9]{0,5})([smhdw])"
"""A whole number (1..999999) and a unit: s, m, h, d or w. The client checks the same
pattern before it calls the daemon (a test pins the two equal)."""

_AGE = re.compile(AGE_PATTERN)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_age(text: str) -> float:
    """The seconds ``text`` stands for; InvalidInput saying how to write one otherwise."""
    found = _AGE.fullmatch(text.strip())
    if found is None:
        raise InvalidInput(
            f"older than {text!r}: give a whole number and a unit, like 90m, 12h, 30d or "
            "2w (units: s, m, h, d, w)"
        )
    return float(int(found.group(1)) * _SECONDS[found.group(2)])
