"""What every part of acting shares: a tool's spec, a call to it, and its result.

A model backend turns ``ToolSpec`` values into its native form (OpenAI and Ollama
``tools``; a JSON-Schema constraint for llama.cpp) and hands back ``ToolCall`` values;
the agent loop decides on them and answers each with a ``ToolResult``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "ToolResult", "ToolSpec", "arguments_digest"]


@dataclass(frozen=True)
class ToolSpec:
    """One tool as a model sees it."""

    name: str
    """``read_file``; an MCP server's tools are ``SERVER.tool``."""
    description: str
    input_schema: dict[str, Any]
    """A JSON Schema of type object for the arguments."""
    read_only: bool = False
    """It changes nothing (MCP's readOnlyHint)."""
    destructive: bool = False
    """It may destroy what exists (MCP's destructiveHint)."""
    title: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A call a model proposed."""

    id: str
    """The backend's call id (OpenAI ``call_…``), or one made up where it has none."""
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    """Set when the model's call could not be read (arguments not a JSON object): the
    loop answers it with this error, and the model may try again."""

    def as_json(self) -> dict[str, Any]:
        """The call as checkpoints and the wire keep it."""
        out: dict[str, Any] = {"id": self.id, "name": self.name, "arguments": self.arguments}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToolCall:
        """Read ``as_json``'s form back."""
        arguments = data.get("arguments")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            arguments=arguments if isinstance(arguments, dict) else {},
            error=str(data.get("error", "")),
        )


@dataclass(frozen=True)
class ToolResult:
    """What a tool call came to, as the model will read it."""

    content: str
    is_error: bool = False
    """The call failed (bad arguments, a refusal, a crash): the model reads why."""
    data: dict[str, Any] | None = None
    """Structured details kept for people (exit status, files written), not sent back."""


def arguments_digest(arguments: dict[str, Any]) -> str:
    """A short, stable digest of a call's arguments, for the ledger (never the arguments
    themselves: they may hold a file's whole text)."""
    text = json.dumps(arguments, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
