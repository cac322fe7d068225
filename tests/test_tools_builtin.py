"""The built-in tools, called as a model would, on real files in a temp workspace;
``search`` and ``run`` go through the real sandbox."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from taled.settings import SandboxSettings, ToolsSettings
from taled.tools.base import ToolCall, ToolResult
from taled.tools.builtin import BUILTIN, ToolContext, ToolKind, call_builtin, validate
from taled.tools.workspace import Workspace


def make_ctx(tmp_path: Path, **tools: Any) -> ToolContext:
    settings = ToolsSettings.model_validate(tools)
    ws = Workspace.empty(tmp_path / "ws", settings.workspace)
    return ToolContext(
        workspace=ws,
        settings=settings,
        sandbox=SandboxSettings(),
        scratch_root=tmp_path / "scratch",
        output_file=tmp_path / "outputs" / "call-1.log",
    )


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    """A scratch workspace with a few files, and default settings."""
    c = make_ctx(tmp_path)
    root = c.workspace.root
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("def main():\n    return 1\n\n\nmain()\n")
    (root / "README.md").write_text("# Demo\n")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "lib.js").write_text("main()\n")
    return c


def call(ctx: ToolContext, name: str, **arguments: Any) -> ToolResult:
    """Call a built-in as the agent loop does."""
    return asyncio.run(call_builtin(ToolCall("call-1", name, arguments), ctx))


# --- the table ------------------------------------------------------------------------


def test_every_schema_is_valid_and_closed() -> None:
    """Each tool's schema is a valid JSON Schema for an object that refuses extra keys."""
    for name, tool in BUILTIN.items():
        Draft202012Validator.check_schema(tool.spec.input_schema)
        assert tool.spec.name == name
        assert tool.spec.input_schema["type"] == "object"
        assert tool.spec.input_schema["additionalProperties"] is False


def test_loop_control_tools_have_no_handler() -> None:
    """finish and ask_user are loop control, answered by the loop; the rest have handlers."""
    control = {name for name, t in BUILTIN.items() if t.kind == ToolKind.CONTROL}
    assert control == {"finish", "ask_user"}
    assert all(BUILTIN[n].handler is None for n in control)
    assert all(t.handler is not None for n, t in BUILTIN.items() if n not in control)
    assert BUILTIN["run"].kind == ToolKind.RUN and BUILTIN["read_file"].spec.read_only


def test_calling_a_control_tool_is_a_bug(ctx: ToolContext) -> None:
    """Handing finish to call_builtin raises: the loop must answer it itself."""
    with pytest.raises(ValueError, match="agent loop"):
        call(ctx, "finish", result="done")


# --- mistakes -------------------------------------------------------------------------


def test_unknown_tool_lists_the_tools(ctx: ToolContext) -> None:
    """An unknown tool's name is an error result listing the real tools."""
    result = call(ctx, "delete_everything")
    assert result.is_error
    assert "no tool named 'delete_everything'" in result.content
    assert "read_file" in result.content


def test_missing_argument_is_named(ctx: ToolContext) -> None:
    """A missing required argument is named."""
    result = call(ctx, "read_file")
    assert result.is_error
    assert result.content == "invalid arguments for read_file: missing required argument 'path'"


def test_wrong_type_is_named(ctx: ToolContext) -> None:
    """An argument of the wrong type is named with the type wanted and the type given."""
    result = call(ctx, "read_file", path="README.md", start_line="3")
    assert result.content == (
        "invalid arguments for read_file: argument 'start_line' must be an integer, not a string"
    )


def test_unknown_argument_is_named(ctx: ToolContext) -> None:
    """An argument the tool does not take is named, with the ones it takes."""
    result = call(ctx, "write_file", path="a", content="x", mode="0755")
    assert result.is_error
    assert "unknown argument 'mode'; it takes path, content" in result.content


def test_bounds_are_enforced(ctx: ToolContext) -> None:
    """A value out of its schema's bounds is refused, saying the bound."""
    result = call(ctx, "read_file", path="README.md", start_line=0)
    assert "argument 'start_line' must be at least 1, not 0" in result.content


def test_validate_refuses_non_object_arguments() -> None:
    """Arguments that are not an object are refused, listing what the tool takes."""
    problem = validate(BUILTIN["read_file"].spec, ["README.md"])
    assert problem is not None and "must be a JSON object" in problem


def test_unreadable_call_is_answered_with_its_error(ctx: ToolContext) -> None:
    """A call the backend could not parse comes back with the parse error."""
    bad = ToolCall("c", "read_file", {}, error="arguments are not a JSON object")
    result = asyncio.run(call_builtin(bad, ctx))
    assert result.is_error and result.content == "arguments are not a JSON object"


def test_path_outside_is_an_error_result(ctx: ToolContext, tmp_path: Path) -> None:
    """A path leading outside the workspace is refused as an error result, not raised."""
    (tmp_path / "secret").write_text("key")
    for path in ("../secret", str(tmp_path / "secret")):
        result = call(ctx, "read_file", path=path)
        assert result.is_error
        assert "key" not in result.content
    assert "outside the workspace" in call(ctx, "read_file", path="../secret").content


# --- list_files -------------------------------------------------------------------------


def test_list_files_sorts_and_marks_dirs(ctx: ToolContext) -> None:
    """Entries are sorted, directories end with '/', excluded directories are hidden."""
    result = call(ctx, "list_files")
    assert result.content == "README.md\nsrc/"


def test_list_files_recursive(ctx: ToolContext) -> None:
    """Recursive listing shows what is below, as paths relative to the workspace."""
    assert call(ctx, "list_files", path="src", recursive=True).content == "src/app.py"
    assert call(ctx, "list_files", recursive=True).content == "README.md\nsrc/\nsrc/app.py"


def test_list_files_is_capped(ctx: ToolContext) -> None:
    """A huge directory's listing stops at the cap and says how to see the rest."""
    many = ctx.workspace.root / "many"
    many.mkdir()
    for i in range(400):
        (many / f"f{i:03}").touch()
    result = call(ctx, "list_files", path="many")
    lines = result.content.splitlines()
    assert lines[0] == "many/f000"
    assert len(lines) <= 301
    assert "listing stopped" in lines[-1]
    assert result.data is not None and result.data["complete"] is False


def test_list_files_of_a_file_is_refused(ctx: ToolContext) -> None:
    """Listing a file says to read it instead."""
    result = call(ctx, "list_files", path="README.md")
    assert result.is_error and "read it with read_file" in result.content


# --- read_file --------------------------------------------------------------------------


def test_read_file_numbers_lines(ctx: ToolContext) -> None:
    """read_file shows each line with its number."""
    result = call(ctx, "read_file", path="src/app.py")
    assert result.content.splitlines()[:2] == ["     1\tdef main():", "     2\t    return 1"]


def test_read_file_range(ctx: ToolContext) -> None:
    """start_line and end_line select lines."""
    result = call(ctx, "read_file", path="src/app.py", start_line=2, end_line=2)
    assert result.content == "     2\t    return 1"


def test_read_file_is_cut_to_the_result_budget(tmp_path: Path) -> None:
    """A long file is cut at a whole line, saying where to read on."""
    c = make_ctx(tmp_path, agent={"result_chars": 600})
    (c.workspace.root / "long.txt").write_text("".join(f"line {i}\n" for i in range(1, 1001)))
    result = call(c, "read_file", path="long.txt")
    assert len(result.content) <= 600
    last = result.content.splitlines()[-1]
    assert "of 1000" in last and "read on with start_line=" in last
    on = int(last.rsplit("=", 1)[1].rstrip("]"))
    assert result.content.splitlines()[-2].endswith(f"line {on - 1}")
    again = call(c, "read_file", path="long.txt", start_line=on)
    assert again.content.startswith(f"{on:>6}\tline {on}")


def test_read_file_cuts_a_huge_line(ctx: ToolContext) -> None:
    """A very long line (a minified file) is cut, and the next line still numbered right."""
    (ctx.workspace.root / "min.js").write_text("x" * 1_000_000 + "\nsecond\n")
    result = call(ctx, "read_file", path="min.js")
    first, second = result.content.splitlines()
    assert first.endswith("[... the rest of this long line cut]") and len(first) < 2100
    assert second == "     2\tsecond"


def test_read_file_refuses_binary(ctx: ToolContext) -> None:
    """A binary file is refused, saying so."""
    (ctx.workspace.root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    result = call(ctx, "read_file", path="logo.png")
    assert result.is_error and "binary file" in result.content


def test_read_file_missing_or_directory(ctx: ToolContext) -> None:
    """A missing file and a directory are refused with a message naming them."""
    assert "no such file or directory: 'nope.py'" in call(ctx, "read_file", path="nope.py").content
    assert "is a directory" in call(ctx, "read_file", path="src").content


def test_read_file_past_the_end(ctx: ToolContext) -> None:
    """A start_line past the end says how many lines the file has."""
    result = call(ctx, "read_file", path="src/app.py", start_line=50)
    assert result.is_error and "has 5 lines" in result.content


# --- write_file ----------------------------------------------------------------------------


def test_write_file_creates_parents(ctx: ToolContext) -> None:
    """write_file makes missing directories and writes the content."""
    result = call(ctx, "write_file", path="pkg/sub/mod.py", content="x = 1\n")
    assert not result.is_error and "new file" in result.content
    assert (ctx.workspace.root / "pkg" / "sub" / "mod.py").read_text() == "x = 1\n"


def test_write_file_keeps_the_mode(ctx: ToolContext) -> None:
    """Replacing an executable file keeps it executable."""
    script = ctx.workspace.root / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    result = call(ctx, "write_file", path="run.sh", content="#!/bin/sh\necho hi\n")
    assert "replaced its content" in result.content
    assert script.read_text().endswith("echo hi\n")
    assert os.stat(script).st_mode & 0o777 == 0o755


def test_write_file_caps_the_size(ctx: ToolContext) -> None:
    """Content over 1 MiB (in UTF-8) is refused, with what to do instead."""
    result = call(ctx, "write_file", path="big.txt", content="é" * 600_000)
    assert result.is_error and "more than write_file takes" in result.content
    assert not (ctx.workspace.root / "big.txt").exists()


def test_write_file_to_excluded_dir_is_refused(ctx: ToolContext) -> None:
    """Writing into an excluded directory is refused, naming the setting."""
    result = call(ctx, "write_file", path="node_modules/x.js", content="")
    assert result.is_error and "tools.workspace.exclude" in result.content


# --- edit_file -------------------------------------------------------------------------------


def test_edit_file_replaces_once(ctx: ToolContext) -> None:
    """An exact, unique old_text is replaced, and the line is reported."""
    result = call(ctx, "edit_file", path="src/app.py", old_text="return 1", new_text="return 2")
    assert result.content == "replaced 1 occurrence in 'src/app.py' (line 2)"
    assert "return 2" in (ctx.workspace.root / "src" / "app.py").read_text()


def test_edit_file_not_found_says_so(ctx: ToolContext) -> None:
    """old_text that is not in the file is an error saying it must match exactly."""
    result = call(ctx, "edit_file", path="src/app.py", old_text="return 3", new_text="x")
    assert result.is_error
    assert "old_text was not found in 'src/app.py'" in result.content
    assert "exactly" in result.content


def test_edit_file_not_found_hints_at_whitespace(ctx: ToolContext) -> None:
    """old_text that matches but for whitespace gets a hint saying so."""
    result = call(ctx, "edit_file", path="src/app.py", old_text="def  main():", new_text="x")
    assert "other whitespace" in result.content


def test_edit_file_ambiguous_says_how_many(ctx: ToolContext) -> None:
    """old_text found more than once is an error with the count, the lines, and the ways out."""
    result = call(ctx, "edit_file", path="src/app.py", old_text="main()", new_text="run()")
    assert result.is_error
    assert "occurs 2 times in 'src/app.py' (lines 1, 5)" in result.content
    assert "replace_all" in result.content and "surrounding lines" in result.content
    assert "run()" not in (ctx.workspace.root / "src" / "app.py").read_text()


def test_edit_file_replace_all(ctx: ToolContext) -> None:
    """replace_all replaces every occurrence."""
    result = call(
        ctx, "edit_file", path="src/app.py", old_text="main()", new_text="run()", replace_all=True
    )
    assert result.content == "replaced 2 occurrences in 'src/app.py' (lines 1, 5)"
    assert (ctx.workspace.root / "src" / "app.py").read_text().count("run()") == 2


def test_edit_file_same_text_is_refused(ctx: ToolContext) -> None:
    """An edit that changes nothing is refused."""
    result = call(ctx, "edit_file", path="README.md", old_text="Demo", new_text="Demo")
    assert result.is_error and "nothing to change" in result.content


# --- search ----------------------------------------------------------------------------------


def test_search_finds_matches(ctx: ToolContext) -> None:
    """search answers path:line:text for each match; excluded directories are skipped."""
    result = call(ctx, "search", pattern=r"main\(\)")
    assert result.content == "src/app.py:1:def main():\nsrc/app.py:5:main()"


def test_search_glob_and_path(ctx: ToolContext) -> None:
    """glob and path narrow the search."""
    assert call(ctx, "search", pattern="Demo", glob="*.py").content.startswith("no matches")
    assert call(ctx, "search", pattern="Demo", path="src").content.startswith("no matches")
    assert call(ctx, "search", pattern="Demo", glob="*.md").content == "README.md:1:# Demo"


def test_search_bad_pattern_is_an_error(ctx: ToolContext) -> None:
    """A pattern grep cannot compile comes back as an error with grep's reason."""
    result = call(ctx, "search", pattern="(unclosed")
    assert result.is_error and "Unmatched" in result.content


def test_search_caps_matches(ctx: ToolContext) -> None:
    """Many matches are cut to the first hundred, saying there are more."""
    (ctx.workspace.root / "many.txt").write_text("hit\n" * 5000)
    result = call(ctx, "search", pattern="hit")
    lines = result.content.splitlines()
    assert len(lines) == 101 and lines[0] == "many.txt:1:hit"
    assert "more than 100 matches" in lines[-1]


def test_hostile_regex_does_not_block(tmp_path: Path) -> None:
    """A catastrophically slow pattern is stopped at the time limit while the event loop
    keeps running."""
    c = make_ctx(tmp_path, run={"timeout_seconds": 2.0})
    (c.workspace.root / "slow.txt").write_text("a" * 200 + "xb\n")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    async def main() -> tuple[ToolResult, float]:
        beat = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            pattern = r"^(.*)(.*)(.*)(.*)(.*)\5\4\3\2\1b"
            result = await call_builtin(ToolCall("c", "search", {"pattern": pattern}), c)
        finally:
            beat.cancel()
        return result, time.monotonic() - started

    result, took = asyncio.run(main())
    assert result.is_error and "took longer than 2 s" in result.content
    assert took < 15
    assert ticks >= 20  # the loop ticked all along (about one per 50 ms)


# --- run ---------------------------------------------------------------------------------------


def test_run_changes_the_workspace(ctx: ToolContext) -> None:
    """A command runs in the workspace: the file it writes is there afterwards, and its
    output is streamed to the output file."""
    result = call(ctx, "run", command="echo made > made.txt && ls && echo done")
    assert not result.is_error
    assert (ctx.workspace.root / "made.txt").read_text() == "made\n"
    assert result.content.splitlines()[0].startswith("[exited with status 0")
    assert "made.txt" in result.content and "done" in result.content
    assert ctx.output_file is not None
    assert "done" in ctx.output_file.read_text()
    assert result.data is not None and result.data["exit_code"] == 0


def test_run_reports_failure(ctx: ToolContext) -> None:
    """A failing command is an error result with its exit status and output."""
    result = call(ctx, "run", command="echo oops >&2; exit 3")
    assert result.is_error
    assert "exited with status 3" in result.content.splitlines()[0]
    assert "oops" in result.content
    assert result.data is not None and result.data["exit_code"] == 3


def test_run_cannot_write_outside(ctx: ToolContext, tmp_path: Path) -> None:
    """The workspace is the only place a command can change."""
    outside = tmp_path / "outside.txt"
    result = call(ctx, "run", command=f"echo x > {outside}")
    assert result.is_error
    assert not outside.exists()
