"""The built-in tools a task's model may call, bound from one table.

``BUILTIN`` maps each tool's name to its ``Builtin``: the spec a model sees (with a
JSON Schema that ``validate`` enforces), what kind of tool it is (the policy's and the
people's view: read, write, run, or loop control) and its handler. ``finish`` and
``ask_user`` have no handler: the agent loop answers them.

``call_builtin`` runs one call against a ``ToolContext`` and answers every mistake a
model can make (an unknown tool, invalid arguments, a path outside the workspace, a
missing file, an ambiguous edit) with an error result saying what to do instead; it
raises only for what the model cannot fix (``DiskFull``, ``Unavailable`` when the
sandbox cannot start).

File work runs in a worker thread so a big tree never stalls the event loop; ``search``
runs ``grep`` in the sandbox, so a hostile regular expression meets its time and memory
limits instead of hanging the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import anyio.to_thread
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from taled.errors import DiskFull, InvalidInput, is_no_space
from taled.sandbox.sandbox import CommandResult, run_command
from taled.settings import SandboxSettings, ToolsSettings
from taled.tools.base import ToolCall, ToolResult, ToolSpec
from taled.tools.workspace import Workspace

__all__ = ["BUILTIN", "Builtin", "Handler", "ToolContext", "ToolKind", "call_builtin", "validate"]

_KIB = 1024
_MIB = 1024 * _KIB
_MAX_PATH = 4096
_WRITE_MAX_BYTES = _MIB
"""Largest content write_file and edit_file take or make."""
_EDIT_MAX_BYTES = 8 * _MIB
"""Largest file edit_file opens (a bigger one is edited with ``run``)."""
_LIST_MAX_ENTRIES = 300
_LINE_MAX_CHARS = 2000
"""A longer line of read_file is cut (minified files)."""
_LINE_MAX_BYTES = 4 * _LINE_MAX_CHARS
_BINARY_PROBE = 8000
_NOTE_ROOM = 160
"""Characters kept free under the result budget for read_file's closing note."""
_SEARCH_MAX_MATCHES = 100
_SEARCH_LINE_CHARS = 300
_SEARCH_TIMEOUT = 30.0
_SEARCH_LINE_BYTES = 1200
"""Bytes of a matching line kept by ``cut`` (its file name and number included)."""
_SEARCH_OUTPUT_CHARS = 200_000
_STATUS_MARK = "tale-grep-status:"
_STATUS_RE = re.compile(re.escape(_STATUS_MARK) + r"(\d+)")
_MAX_LINE_NUMBER = 100_000_000


class ToolKind(StrEnum):
    """What a built-in does, as the policy and people see it."""

    READ = "read"
    """Reads the workspace, changes nothing."""
    WRITE = "write"
    """Changes files in the workspace."""
    RUN = "run"
    """Runs a command in the sandbox (it may change anything in the workspace)."""
    CONTROL = "control"
    """Steers the agent loop (``finish``, ``ask_user``); the loop answers it."""


@dataclass(frozen=True)
class ToolContext:
    """What a call acts on."""

    workspace: Workspace
    settings: ToolsSettings
    sandbox: SandboxSettings
    """Who isolates commands, and which Python is first on their PATH."""
    scratch_root: Path
    """Where a command's scratch directory (its HOME and TMPDIR) is made."""
    output_file: Path | None = None
    """Where ``run`` streams its output as it comes (the loop gives one per call)."""


Handler = Callable[[dict[str, Any], ToolContext], Awaitable[ToolResult]]


@dataclass(frozen=True)
class Builtin:
    """One built-in tool: its spec, its kind and its handler."""

    spec: ToolSpec
    kind: ToolKind
    handler: Handler | None
    """None for loop control (``finish``, ``ask_user``): the agent loop answers those."""


# --- validation ---------------------------------------------------------------------------


_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def validate(spec: ToolSpec, arguments: object) -> str | None:
    """Why ``arguments`` do not fit ``spec``'s schema, in one sentence naming the tool
    and the argument; None when they fit."""
    validator = Draft202012Validator(spec.input_schema)
    error = best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    return f"invalid arguments for {spec.name}: {_describe(error, spec, arguments)}"


def _describe(error: ValidationError, spec: ToolSpec, arguments: object) -> str:
    properties: dict[str, Any] = spec.input_schema.get("properties", {})
    takes = ", ".join(properties) or "no arguments"
    if not error.path:
        if error.validator == "type":
            return f"the arguments must be a JSON object ({takes}), not {_json_type(arguments)}"
        if error.validator == "required" and isinstance(arguments, dict):
            required = spec.input_schema.get("required", [])
            missing = [name for name in required if name not in arguments]
            return f"missing required argument {', '.join(repr(m) for m in missing)}"
        if error.validator == "additionalProperties" and isinstance(arguments, dict):
            unknown = [name for name in arguments if name not in properties]
            return f"unknown argument {', '.join(repr(u) for u in unknown)}; it takes {takes}"
        return error.message
    name = ".".join(str(part) for part in error.path)
    value: Any = error.instance
    bound: Any = error.validator_value
    if error.validator == "type":
        wanted = _JSON_TYPES.get(str(bound), str(bound))
        return f"argument {name!r} must be {wanted}, not {_json_type(value)}"
    if error.validator == "maxLength":
        return f"argument {name!r} is too long: {len(value)} characters, at most {bound}"
    if error.validator == "minLength":
        return f"argument {name!r} must not be empty"
    if error.validator == "minimum":
        return f"argument {name!r} must be at least {bound}, not {value}"
    if error.validator == "maximum":
        return f"argument {name!r} must be at most {bound}, not {value}"
    return f"argument {name!r}: {error.message[:300]}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- calling ------------------------------------------------------------------------------


async def call_builtin(call: ToolCall, ctx: ToolContext) -> ToolResult:
    """Run one call of a built-in tool in ``ctx``'s workspace.

    A model's mistake comes back as an error result it can act on; raises only for
    what it cannot fix: ``DiskFull``, ``Unavailable`` (the sandbox cannot start), and
    ``ValueError`` for a loop-control tool, which the agent loop must answer itself.
    """
    if call.error:
        return ToolResult(call.error, is_error=True)
    builtin = BUILTIN.get(call.name)
    if builtin is None:
        known = ", ".join(BUILTIN)
        return ToolResult(
            f"there is no tool named {call.name!r}; the tools are: {known}", is_error=True
        )
    if builtin.handler is None:
        raise ValueError(f"{call.name} steers the agent loop: the loop answers it, not a handler")
    problem = validate(builtin.spec, call.arguments)
    if problem is not None:
        return ToolResult(problem, is_error=True)
    try:
        return await builtin.handler(call.arguments, ctx)
    except InvalidInput as exc:
        return ToolResult(f"{call.name}: {exc.message}", is_error=True)


async def _in_thread(
    work: Callable[[dict[str, Any], ToolContext], ToolResult],
    args: dict[str, Any],
    ctx: ToolContext,
) -> ToolResult:
    """Run a tool's file work in a worker thread; an OS error becomes a message."""
    try:
        return await anyio.to_thread.run_sync(work, args, ctx)
    except OSError as exc:
        if is_no_space(exc):
            raise DiskFull(str(ctx.workspace.root), str(exc.strerror)) from exc
        where = _shown_path(exc, ctx.workspace)
        said = exc.strerror or str(exc)
        raise InvalidInput(f"{where}: {said}" if where else said) from None


def _shown_path(exc: OSError, workspace: Workspace) -> str:
    if exc.filename is None:
        return ""
    path = Path(os.fsdecode(exc.filename))
    if path.is_relative_to(workspace.root):
        return repr(workspace.relative(path))
    return ""  # a temporary file's or a system path: not the model's business


# --- list_files ---------------------------------------------------------------------------


async def _list_files(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return await _in_thread(_list_files_sync, args, ctx)


def _list_files_sync(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    ws = ctx.workspace
    where = ws.resolve(args.get("path", "."), must_exist=True)
    shown = ws.relative(where)
    if not where.is_dir():
        raise InvalidInput(f"{shown!r} is a file, not a directory: read it with read_file")
    recursive = bool(args.get("recursive", False))
    budget = ctx.settings.agent.result_chars - _NOTE_ROOM
    lines: list[str] = []
    used = 0
    stopped = False
    stack = [_entries(where, ws)]
    while stack and not stopped:
        if not stack[-1]:
            stack.pop()
            continue
        entry = stack[-1].pop()
        rel = ws.relative(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            line = rel + "/"
            if recursive:
                stack.append(_entries(Path(entry.path), ws))
        elif entry.is_symlink():
            line = f"{rel} -> {os.readlink(entry.path)}"
        else:
            line = rel
        if len(lines) >= _LIST_MAX_ENTRIES or used + len(line) + 1 > budget:
            stopped = True
            break
        lines.append(line)
        used += len(line) + 1
    if not lines and not stopped:
        return ToolResult(f"{shown!r} is an empty directory", data={"entries": 0})
    text = "\n".join(lines)
    if stopped:
        hint = "list a subdirectory" + (", or set recursive=false" if recursive else "")
        text += f"\n[listing stopped after {len(lines)} entries: {hint}]"
    return ToolResult(text, data={"entries": len(lines), "complete": not stopped})


def _entries(directory: Path, ws: Workspace) -> list[os.DirEntry[str]]:
    """A directory's entries, excluded names left out, in reverse order (for popping)."""
    try:
        with os.scandir(directory) as it:
            found = [e for e in it if e.name not in ws.exclude]
    except OSError:
        return []
    return sorted(found, key=lambda e: e.name, reverse=True)


# --- read_file ----------------------------------------------------------------------------


async def _read_file(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return await _in_thread(_read_file_sync, args, ctx)


def _read_file_sync(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    ws = ctx.workspace
    path = ws.resolve(args["path"], must_exist=True)
    shown = ws.relative(path)
    start: int = args.get("start_line", 1)
    end: int | None = args.get("end_line")
    if end is not None and end < start:
        raise InvalidInput(f"end_line ({end}) is before start_line ({start})")
    budget = max(ctx.settings.agent.result_chars - _NOTE_ROOM, ctx.settings.agent.result_chars // 2)
    with _open_regular(path, shown) as f:
        probe = f.read(_BINARY_PROBE)
        if _is_binary(probe):
            size = os.fstat(f.fileno()).st_size
            raise InvalidInput(
                f"{shown!r} is a binary file ({size} bytes); read_file reads text only"
            )
        f.seek(0)
        rows: list[str] = []
        used = 0
        seen = 0  # lines read so far
        cut_at: int | None = None
        for raw, more in _lines(f):
            seen += 1
            if seen < start:
                continue
            if end is not None and seen > end:
                break
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) > _LINE_MAX_CHARS or more:
                text = text[:_LINE_MAX_CHARS] + " [... the rest of this long line cut]"
            row = f"{seen:>6}\t{text}"
            if rows and used + len(row) + 1 > budget:
                cut_at = seen
                break
            rows.append(row[:budget])
            used += len(row) + 1
        if not rows:
            if seen == 0:
                return ToolResult(f"{shown!r} is empty", data={"path": shown, "lines": 0})
            raise InvalidInput(f"{shown!r} has {seen} lines; start_line {start} is past its end")
        text = "\n".join(rows)
        if cut_at is not None:
            total = seen + _count_lines(f)
            text += (
                f"\n[shown lines {start}-{cut_at - 1} of {total}; read on with start_line={cut_at}]"
            )
    return ToolResult(text, data={"path": shown, "complete": cut_at is None})


def _lines(f: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """Each line's first bytes, and whether it had more: a huge line (a minified file)
    is never held whole."""
    while head := f.readline(_LINE_MAX_BYTES):
        more = False
        ended = head.endswith(b"\n")
        while not ended and (rest := f.readline(_LINE_MAX_BYTES)):
            more = True
            ended = rest.endswith(b"\n")
        yield head, more


def _count_lines(f: BinaryIO) -> int:
    """The lines left in ``f`` (a last one without a newline counts)."""
    count = 0
    last = b"\n"
    while chunk := f.read(_MIB):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (last != b"\n")


@contextlib.contextmanager
def _open_regular(path: Path, shown: str) -> Iterator[BinaryIO]:
    """Open a regular file for reading; anything else (a FIFO would block) is refused."""
    if path.is_dir():
        raise InvalidInput(f"{shown!r} is a directory: list it with list_files")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput(f"{shown!r} is not a regular file")
        yield f


def _is_binary(probe: bytes) -> bool:
    """A NUL byte, or bytes that are not UTF-8 (a sequence cut at the end is fine)."""
    if b"\0" in probe:
        return True
    try:
        probe.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(probe) - 3
    return False


# --- write_file and edit_file -------------------------------------------------------------


async def _write_file(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return await _in_thread(_write_file_sync, args, ctx)


def _write_file_sync(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    ws = ctx.workspace
    data = str(args["content"]).encode("utf-8")
    if len(data) > _WRITE_MAX_BYTES:
        raise InvalidInput(
            f"content is {len(data)} bytes, more than write_file takes ({_WRITE_MAX_BYTES}): "
            "write the file in parts (write_file, then edit_file to add), or generate it with run"
        )
    path = ws.resolve(args["path"])
    shown = ws.relative(path)
    if path.is_dir():
        raise InvalidInput(f"{shown!r} is a directory; give a file's path")
    replaced = ws.write(path, data)
    said = "replaced its content" if replaced else "new file"
    return ToolResult(
        f"wrote {len(data)} bytes to {shown!r} ({said})",
        data={"path": shown, "bytes": len(data), "created": not replaced},
    )


async def _edit_file(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return await _in_thread(_edit_file_sync, args, ctx)


def _edit_file_sync(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    ws = ctx.workspace
    path = ws.resolve(args["path"], must_exist=True)
    shown = ws.relative(path)
    old: str = args["old_text"]
    new: str = args["new_text"]
    replace_all = bool(args.get("replace_all", False))
    if old == new:
        raise InvalidInput("old_text and new_text are the same: there is nothing to change")
    with _open_regular(path, shown) as f:
        data = f.read(_EDIT_MAX_BYTES + 1)
    if len(data) > _EDIT_MAX_BYTES:
        raise InvalidInput(
            f"{shown!r} is bigger than edit_file takes ({_EDIT_MAX_BYTES} bytes): edit it with run"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{shown!r} is not UTF-8 text; edit_file edits text only") from None
    count = text.count(old)
    if count == 0:
        hint = (
            " (it does occur with other whitespace or line breaks)"
            if _squeeze(old) and _squeeze(old) in _squeeze(text)
            else ""
        )
        raise InvalidInput(
            f"old_text was not found in {shown!r}{hint}: it must match the file exactly, "
            "including whitespace and indentation; read_file shows the current text"
        )
    lines = _lines_of(text, old)
    if count > 1 and not replace_all:
        raise InvalidInput(
            f"old_text occurs {count} times in {shown!r} (lines {lines}): add surrounding "
            "lines to old_text so it occurs once, or set replace_all=true to replace every one"
        )
    edited = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    out = edited.encode("utf-8")
    if len(out) > _EDIT_MAX_BYTES:
        raise InvalidInput(f"the edit would make {shown!r} bigger than {_EDIT_MAX_BYTES} bytes")
    ws.write(path, out)
    done = count if replace_all else 1
    at = f"line {lines.split(',')[0]}" if done == 1 else f"lines {lines}"
    return ToolResult(
        f"replaced {done} occurrence{'s' if done > 1 else ''} in {shown!r} ({at})",
        data={"path": shown, "replaced": done},
    )


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _lines_of(text: str, needle: str) -> str:
    """The lines where ``needle`` occurs, such as ``1, 5`` (ten at most, then ``...``)."""
    found: dict[int, None] = {}
    at = text.find(needle)
    while at != -1 and len(found) < 11:
        found[text.count("\n", 0, at) + 1] = None
        at = text.find(needle, at + len(needle))
    lines = [str(n) for n in found]
    return ", ".join(lines[:10]) + (", ..." if len(lines) > 10 else "")


# --- search -------------------------------------------------------------------------------


async def _search(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    ws = ctx.workspace
    pattern: str = args["pattern"]
    where = await anyio.to_thread.run_sync(
        lambda: ws.resolve(args.get("path", "."), must_exist=True)
    )
    shown = ws.relative(where)
    argv = ["grep", "-rnIE", "--null", "--no-messages", "--color=never"]
    argv += [f"--exclude-dir={name}" for name in sorted(ws.exclude)]
    glob = args.get("glob")
    if glob:
        argv.append(f"--include={glob}")
    argv += ["-e", pattern, "--", shown]
    # grep's matches go through cut (long lines) and head, which stops grep (SIGPIPE)
    # once there are more than enough; its status follows its matches, unless cut off.
    command = (
        f'{{ {shlex.join(argv)}; echo "{_STATUS_MARK}$?"; }} '
        f"| cut -b -{_SEARCH_LINE_BYTES} | head -n {_SEARCH_MAX_MATCHES + 2}"
    )
    run = ctx.settings.run
    limits = run.model_copy(
        update={
            "timeout_seconds": min(run.timeout_seconds, _SEARCH_TIMEOUT),
            "max_output_chars": max(run.max_output_chars, _SEARCH_OUTPUT_CHARS),
            "network": False,
        }
    )
    result = await run_command(
        command,
        workspace=ws.root,
        limits=limits,
        sandbox=ctx.sandbox,
        scratch_root=ctx.scratch_root,
    )
    return _search_result(result, pattern, shown, limits.timeout_seconds)


def _search_result(result: CommandResult, pattern: str, shown: str, timeout: float) -> ToolResult:
    if result.timed_out:
        return ToolResult(
            f"the search took longer than {timeout:g} s and was stopped: narrow it with path "
            "or glob, or simplify the pattern",
            is_error=True,
        )
    matches: list[str] = []
    said: list[str] = []
    status: int | None = None
    for line in result.output.splitlines():
        name, sep, rest = line.partition("\0")
        if sep:  # a match: only these hold a NUL (after the file's name)
            if len(rest) > _SEARCH_LINE_CHARS:
                rest = rest[:_SEARCH_LINE_CHARS] + " [...]"
            matches.append(f"{name.removeprefix('./')}:{rest}")
        elif found := _STATUS_RE.fullmatch(line):
            status = int(found[1])
        elif line.strip():
            said.append(line.strip().removeprefix("grep: "))
    if not matches:
        if status == 1:
            return ToolResult(f"no matches for {pattern!r} in {shown!r}", data={"matches": 0})
        why = "; ".join(said)[:300] or result.reason or f"grep's status was {status}"
        return ToolResult(f"the search failed: {why}", is_error=True)
    complete = status is not None and len(matches) <= _SEARCH_MAX_MATCHES
    text = "\n".join(matches[:_SEARCH_MAX_MATCHES])
    if not complete:
        text += (
            f"\n[more than {_SEARCH_MAX_MATCHES} matches, the first {_SEARCH_MAX_MATCHES} "
            "shown: narrow the search with path or glob, or a stricter pattern]"
        )
    return ToolResult(text, data={"matches": len(matches), "complete": complete})


# --- run ----------------------------------------------------------------------------------


async def _run(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    if ctx.output_file is not None:
        ctx.output_file.parent.mkdir(parents=True, exist_ok=True)
    result = await run_command(
        args["command"],
        workspace=ctx.workspace.root,
        limits=ctx.settings.run,
        sandbox=ctx.sandbox,
        scratch_root=ctx.scratch_root,
        output_file=ctx.output_file,
    )
    ok = result.exit_code == 0 and not result.timed_out
    # The reason says how it failed (and which limit it met); empty for a plain success.
    said = [result.reason] if result.reason else []
    if result.exit_code == 0:
        said.insert(0, "exited with status 0")
    head = f"[{'; '.join(said) or 'ended'} ({result.duration:.3g} s)]"
    output = result.output if result.output else "(no output)"
    return ToolResult(
        f"{head}\n{output}",
        is_error=not ok,
        data={
            "exit_code": result.exit_code,
            "signal": result.signal,
            "timed_out": result.timed_out,
            "duration": result.duration,
            "output_bytes": result.output_bytes,
        },
    )


# --- the table ----------------------------------------------------------------------------


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_PATH = {
    "type": "string",
    "minLength": 1,
    "maxLength": _MAX_PATH,
    "description": "A path relative to the workspace, such as 'src/main.py'.",
}
_DIR = {
    **_PATH,
    "description": "A directory relative to the workspace; '.' is the workspace itself.",
    "default": ".",
}
_LINE = {"type": "integer", "minimum": 1, "maximum": _MAX_LINE_NUMBER}

_TOOLS = (
    Builtin(
        ToolSpec(
            name="list_files",
            title="List files",
            description=(
                "List a directory of the workspace: one entry per line, directories end "
                "with '/'. Set recursive to list everything below it too."
            ),
            input_schema=_schema(
                {
                    "path": _DIR,
                    "recursive": {
                        "type": "boolean",
                        "default": False,
                        "description": "List subdirectories' contents too.",
                    },
                },
                [],
            ),
            read_only=True,
        ),
        ToolKind.READ,
        _list_files,
    ),
    Builtin(
        ToolSpec(
            name="read_file",
            title="Read a file",
            description=(
                "Read a text file of the workspace, each line with its number. A long file "
                "is cut; read the rest with start_line (and end_line)."
            ),
            input_schema=_schema(
                {
                    "path": _PATH,
                    "start_line": {**_LINE, "description": "First line to show (1-based)."},
                    "end_line": {**_LINE, "description": "Last line to show."},
                },
                ["path"],
            ),
            read_only=True,
        ),
        ToolKind.READ,
        _read_file,
    ),
    Builtin(
        ToolSpec(
            name="write_file",
            title="Write a file",
            description=(
                "Create a file, or replace a file's whole content, in the workspace "
                "(directories are made as needed). To change part of a file use edit_file."
            ),
            input_schema=_schema(
                {
                    "path": _PATH,
                    "content": {
                        "type": "string",
                        "maxLength": _WRITE_MAX_BYTES,
                        "description": "The file's whole new content.",
                    },
                },
                ["path", "content"],
            ),
            destructive=True,
        ),
        ToolKind.WRITE,
        _write_file,
    ),
    Builtin(
        ToolSpec(
            name="edit_file",
            title="Edit a file",
            description=(
                "Replace exact text in a file of the workspace: old_text must occur exactly "
                "once (include enough surrounding lines), or set replace_all to replace "
                "every occurrence."
            ),
            input_schema=_schema(
                {
                    "path": _PATH,
                    "old_text": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": _WRITE_MAX_BYTES,
                        "description": "The text to replace, exactly as in the file.",
                    },
                    "new_text": {
                        "type": "string",
                        "maxLength": _WRITE_MAX_BYTES,
                        "description": "The text to put in its place.",
                    },
                    "replace_all": {
                        "type": "boolean",
                        "default": False,
                        "description": "Replace every occurrence, not just one.",
                    },
                },
                ["path", "old_text", "new_text"],
            ),
        ),
        ToolKind.WRITE,
        _edit_file,
    ),
    Builtin(
        ToolSpec(
            name="search",
            title="Search files",
            description=(
                "Search the workspace's text files for a regular expression (POSIX "
                "extended, as grep -E); answers 'path:line:text' per match."
            ),
            input_schema=_schema(
                {
                    "pattern": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 1000,
                        "description": "The regular expression.",
                    },
                    "path": {**_DIR, "description": "The directory (or file) to search in."},
                    "glob": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 200,
                        "description": "Search only files whose name matches, such as '*.py'.",
                    },
                },
                ["pattern"],
            ),
            read_only=True,
        ),
        ToolKind.READ,
        _search,
    ),
    Builtin(
        ToolSpec(
            name="run",
            title="Run a command",
            description=(
                "Run a shell command (sh -c) in the workspace, in a sandbox: the workspace "
                "is the only place it can change, and there is no network unless allowed. "
                "Answers its exit status and output."
            ),
            input_schema=_schema(
                {
                    "command": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 20_000,
                        "description": "The shell command, such as 'python -m pytest -q'.",
                    },
                },
                ["command"],
            ),
            destructive=True,
        ),
        ToolKind.RUN,
        _run,
    ),
    Builtin(
        ToolSpec(
            name="finish",
            title="Finish the task",
            description=(
                "Finish the task: give the result for the user (what you did, what is "
                "where, anything left open). Call it once, when the work is done."
            ),
            input_schema=_schema(
                {
                    "result": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 100_000,
                        "description": "The result, for the user.",
                    },
                },
                ["result"],
            ),
            read_only=True,
        ),
        ToolKind.CONTROL,
        None,
    ),
    Builtin(
        ToolSpec(
            name="ask_user",
            title="Ask the user",
            description=(
                "Ask the user a question you cannot answer from the workspace; the task "
                "waits for the answer."
            ),
            input_schema=_schema(
                {
                    "question": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 2000,
                        "description": "The question, in one or two sentences.",
                    },
                },
                ["question"],
            ),
            read_only=True,
        ),
        ToolKind.CONTROL,
        None,
    ),
)

BUILTIN: Mapping[str, Builtin] = MappingProxyType({tool.spec.name: tool for tool in _TOOLS})
"""Every built-in tool by name, in the order a model is offered them."""
