"""The permission policy: whether a tool call may run (``allow``), must wait for a
person (``ask``), or is refused (``deny``).

Rules come from ``[tools.policy]`` (safe defaults: reads and workspace writes allowed,
``run`` asks, every MCP server's tools ask) and from rules people added with
``tale approve --always``, which win over the configured ones. Keys, most specific
first: for ``run``, ``run:PREFIX`` (the longest prefix of the command's words wins),
then ``run``; for an MCP tool ``SERVER.tool``, then ``mcp:SERVER``, then ``mcp``; for a
built-in tool its name. No key matching: ``ask``.

A command prefix only allows a simple command: one with shell control operators
(``;``, ``&&``, ``|``, ``$(``, redirections...) is not "a command starting with
``pytest``", so an allow rule for ``run:pytest`` does not cover ``pytest; rm -rf ~``
(a part of it that its own rules deny still refuses the whole).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from taled.settings import Decision
from taled.tools.base import ToolCall

__all__ = ["Policy", "Verdict", "command_of"]

# Shell syntax that chains, substitutes or redirects: a command holding any of these is
# more than the command its first words name.
_COMPOUND = re.compile(r"[;&|`<>\n]|\$\(")
_SPLIT = re.compile(r"&&|\|\||[;&|\n]|\$\(|`")


@dataclass(frozen=True)
class Verdict:
    """What the policy said, and why."""

    decision: Decision
    rule: str
    """The key that decided (``run:pytest``, ``run``, ``mcp:fs``), or ``default``."""
    always: str | None
    """The key ``tale approve --always`` adds for a call like this one."""


def command_of(call: ToolCall) -> str:
    """The command of a ``run`` call ('' when it has none)."""
    command = call.arguments.get("command")
    return command.strip() if isinstance(command, str) else ""


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # unbalanced quotes: the plain split is good enough to match on
        return command.split()


def _prefix_matches(prefix: str, command: str) -> bool:
    want, have = _words(prefix), _words(command)
    return bool(want) and have[: len(want)] == want


class Policy:
    """Decides tool calls from the configured rules and the ones people added."""

    def __init__(self, configured: Mapping[str, Decision], added: Mapping[str, Decision]) -> None:
        self._rules: dict[str, Decision] = {**configured, **added}

    def with_rule(self, key: str, decision: Decision) -> Policy:
        """This policy with one more rule (people's rules win)."""
        return Policy(self._rules, {key: decision})

    def decide(self, call: ToolCall, server: str | None = None) -> Verdict:
        """The verdict on ``call``; ``server`` names the MCP server of a namespaced tool."""
        if server is not None:
            return self._decide_mcp(call, server)
        if call.name == "run":
            return self._decide_run(command_of(call))
        decision = self._rules.get(call.name)
        if decision is not None:
            return Verdict(decision, call.name, call.name)
        return Verdict("ask", "default", call.name)

    def _decide_mcp(self, call: ToolCall, server: str) -> Verdict:
        for key in (call.name, f"mcp:{server}", "mcp"):
            decision = self._rules.get(key)
            if decision is not None:
                return Verdict(decision, key, call.name)
        return Verdict("ask", "default", call.name)

    def _decide_run(self, command: str) -> Verdict:
        always = _always_key(command)
        if not _COMPOUND.search(command):
            key = self._longest("run:", command, {"allow", "ask", "deny"})
            if key is not None:
                return Verdict(self._rules[key], key, always)
        else:
            # A part of a compound command that its own rules deny refuses the whole.
            for part in (p.strip() for p in _SPLIT.split(command)):
                key = self._longest("run:", part, {"allow", "ask", "deny"}) if part else None
                if key is not None and self._rules[key] == "deny":
                    return Verdict("deny", key, always)
        decision = self._rules.get("run")
        if decision is not None:
            return Verdict(decision, "run", always)
        return Verdict("ask", "default", always)

    def _longest(self, kind: str, command: str, decisions: set[str]) -> str | None:
        best: str | None = None
        for key, decision in self._rules.items():
            if not key.startswith(kind) or decision not in decisions:
                continue
            if _prefix_matches(key[len(kind) :], command) and (
                best is None or len(_words(key[len(kind) :])) > len(_words(best[len(kind) :]))
            ):
                best = key
        return best


# Programs whose second word picks what they do (``git status`` is not ``git push``):
# ``--always`` keeps that word in the rule it adds.
_SUBCOMMANDS = frozenset(
    {
        "git",
        "npm",
        "pnpm",
        "yarn",
        "cargo",
        "go",
        "pip",
        "pip3",
        "uv",
        "poetry",
        "docker",
        "podman",
        "kubectl",
        "make",
        "npx",
        "bundle",
        "gem",
        "dotnet",
        "mvn",
        "gradle",
    }
)
_PYTHONS = frozenset({"python", "python3"})


def _always_key(command: str) -> str | None:
    """The rule ``--always`` adds for ``command``: its program, with the subcommand of a
    program that has them (``run:git status``), or the module of ``python -m``
    (``run:python -m pytest``). None for a compound command: no prefix covers it."""
    if not command or _COMPOUND.search(command):
        return None
    words = _words(command)
    if not words:
        return None
    kept = words[:1]
    if words[0] in _SUBCOMMANDS and len(words) > 1 and not words[1].startswith("-"):
        kept = words[:2]
    elif words[0] in _PYTHONS and len(words) > 2 and words[1] == "-m":
        kept = words[:3]
    return "run:" + " ".join(shlex.quote(w) for w in kept)
