"""The full-screen Textual app behind ``tale tui``, ``tale chat`` and ``tale dashboard``.

Imported only by those commands: Textual costs more start-up time than the rest
of the thin client together, so nothing else in ``tale_client`` imports it.
"""

from __future__ import annotations

__all__: list[str] = []
