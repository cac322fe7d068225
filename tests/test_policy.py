"""The permission policy: allow / ask / deny per tool, per MCP server, per command prefix."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from taled.settings import ToolsSettings
from taled.tools.base import ToolCall
from taled.tools.policy import Policy


def _run(command: str) -> ToolCall:
    return ToolCall("c1", "run", {"command": command})


def _defaults(**added: str) -> Policy:
    return Policy(ToolsSettings().policy, added)  # type: ignore[arg-type]


def test_the_defaults_allow_reads_and_workspace_writes_and_ask_for_commands() -> None:
    policy = _defaults()
    for name in ("list_files", "read_file", "search", "write_file", "edit_file"):
        assert policy.decide(ToolCall("c", name, {})).decision == "allow"
    assert policy.decide(_run("pytest -q")).decision == "ask"


def test_every_mcp_servers_tools_ask_by_default() -> None:
    verdict = _defaults().decide(ToolCall("c", "fs.read", {}), server="fs")
    assert (verdict.decision, verdict.rule, verdict.always) == ("ask", "mcp", "fs.read")


def test_the_most_specific_mcp_rule_wins() -> None:
    policy = _defaults(**{"mcp:fs": "allow", "fs.delete": "deny"})
    assert policy.decide(ToolCall("c", "fs.read", {}), server="fs").decision == "allow"
    assert policy.decide(ToolCall("c", "fs.delete", {}), server="fs").decision == "deny"


def test_a_command_prefix_rule_matches_whole_words_and_the_longest_wins() -> None:
    policy = _defaults(**{"run:git": "deny", "run:git status": "allow"})
    assert policy.decide(_run("git status --short")).decision == "allow"
    assert policy.decide(_run("git push")).decision == "deny"
    assert policy.decide(_run("gitk")).decision == "ask"


def test_an_allowed_prefix_does_not_cover_a_compound_command() -> None:
    policy = _defaults(**{"run:pytest": "allow"})
    assert policy.decide(_run("pytest -q")).decision == "allow"
    for sneaky in (
        "pytest; rm -rf ~",
        "pytest && curl x",
        "pytest | sh",
        "pytest $(rm x)",
        "pytest > /etc/passwd",
        "pytest `rm x`",
        "pytest\nrm x",
    ):
        assert policy.decide(_run(sneaky)).decision == "ask", sneaky


def test_a_denied_prefix_anywhere_in_a_compound_command_refuses_it() -> None:
    policy = _defaults(**{"run:rm": "deny"})
    assert policy.decide(_run("echo hi; rm -rf build")).decision == "deny"


def test_always_proposes_the_program_and_its_subcommand_or_module() -> None:
    policy = _defaults()
    assert policy.decide(_run("git status --short")).always == "run:git status"
    assert policy.decide(_run("pytest -q tests")).always == "run:pytest"
    assert policy.decide(_run("touch a.txt")).always == "run:touch"
    assert policy.decide(_run("python -m pytest -q")).always == "run:python -m pytest"
    assert policy.decide(_run("echo a; echo b")).always is None


def test_added_rules_win_over_configured_ones() -> None:
    policy = Policy({"run": "deny"}, {"run": "allow"})
    assert policy.decide(_run("make")).decision == "allow"


@given(st.text(max_size=80))
def test_an_allow_rule_for_a_program_never_allows_a_command_with_shell_operators(
    tail: str,
) -> None:
    policy = _defaults(**{"run:ls": "allow"})
    command = f"ls {tail}"
    verdict = policy.decide(_run(command))
    ran = command.strip()  # what runs: surrounding whitespace is dropped
    if any(op in ran for op in (";", "&", "|", "`", "$(", ">", "<", "\n")):
        assert verdict.decision == "ask"
