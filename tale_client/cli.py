"""The ``tale`` command: a thin client of the daemon's MCP socket.

Stays thin on purpose: no ``mcp``, no ``taled``, no pydantic or rich tables on
the hot path (``tale list``); a test checks the modules it imports.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from tale_client import __version__, human, paths, protocol
from tale_client.output import (
    CliError,
    Exit,
    bell,
    emit,
    emit_json,
    emit_piece,
    emit_rich,
    fail,
    note,
)
from tale_client.rpc import Connection, DaemonUnreachable, RpcError

if TYPE_CHECKING:
    from tale_client.daemon import Started

__all__ = [
    "app",
    "complete_approval_id",
    "complete_schedule_id",
    "complete_task_id",
    "main",
    "task_id_completer",
]

P = ParamSpec("P")
R = TypeVar("R")

STATES = protocol.TASK_STATES
FINAL = protocol.FINAL_STATES

app = typer.Typer(
    name="tale",
    help="tale: a personal AI worker on your own machine.",
    epilog="An ID (a task's, an approval's, a schedule's) may be shortened to a unique "
    "prefix of at least 4 of its hex digits.",
    no_args_is_help=True,
    # --install-completion / --show-completion; ids complete from the daemon (below).
    add_completion=True,
    pretty_exceptions_enable=False,
)
daemon_app = typer.Typer(help="Start, stop and inspect the daemon.", no_args_is_help=True)
app.add_typer(daemon_app, name="daemon", rich_help_panel="Daemon")
schedules_app = typer.Typer(
    help="Tasks that run later or again (submit --at / --every): listed with their next "
    "run in local time; pause, resume, delete or show one by ID."
)
app.add_typer(schedules_app, name="schedules", rich_help_panel="Tasks")


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map client errors to messages on stderr and the CLI's exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CliError as exc:
            fail(exc.message, exc.code)
        except DaemonUnreachable as exc:
            fail(f"{exc}", Exit.UNREACHABLE)
        except paths.PathError as exc:
            fail(f"{exc}", Exit.USAGE)
        except RpcError as exc:
            if exc.code in protocol.USAGE_CODES:
                fail(exc.message, Exit.USAGE)
            if exc.code == protocol.UNAVAILABLE:
                fail(exc.message, Exit.UNREACHABLE)
            fail(exc.message, Exit.FAILED)
        except (KeyError, TypeError) as exc:
            # The daemon's answer lacks what this client expects: usually a daemon
            # started from an older tale that is still running.
            fail(
                f"unexpected answer from the daemon (missing {exc}); if it was started by an "
                "older tale, restart it: tale daemon stop",
                Exit.FAILED,
            )
        except KeyboardInterrupt:
            fail("interrupted", Exit.FAILED)

    return wrapper


def _connect(autostart: bool = True) -> Connection:
    from tale_client.daemon import connect

    return connect(autostart=autostart, on_start=_say_started)


def _say_started(started: Started) -> None:
    """Say on stderr that a command started the daemon, and which way."""
    from tale_client.daemon import Route

    if started.route is Route.SYSTEMD:
        note("tale: no daemon was running; started it with systemctl --user start taled")
    else:
        note(
            f"tale: no daemon was running; started taled (pid {started.pid}) in the background, "
            f"its log in {paths.log_file()}"
        )


# -- shell completion ------------------------------------------------------------

# Completion runs on every tab press: a daemon that does not answer at once is left
# alone (and none is ever started for it).
_COMPLETE_TIMEOUT_SECONDS = 1.0
UNFINISHED = tuple(s for s in protocol.TASK_STATES if s not in protocol.FINAL_STATES)


def _ask_quickly(tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """One tool call for completion: None on any failure, never an error or a start."""
    try:
        with Connection(paths.socket_path(), timeout=_COMPLETE_TIMEOUT_SECONDS) as conn:
            conn.initialize("tale-completion")
            return conn.call_tool(tool, args)
    except (DaemonUnreachable, RpcError, paths.PathError, OSError, ValueError):
        return None


def _completion_help(*parts: str) -> str:
    """One short line of help: whitespace folded, control characters dropped."""
    from tale_client.sanitize import printable

    text = " ".join(printable(" · ".join(p for p in parts if p)).split())
    return text if len(text) <= 60 else text[:59] + "…"


def task_id_completer(
    states: tuple[str, ...] = (),
) -> Callable[[str], list[tuple[str, str]]]:
    """A completion callback: ids of the daemon's tasks (in ``states``; all if empty),
    newest first, each with its state and text as help."""

    def complete(incomplete: str) -> list[tuple[str, str]]:
        found = _ask_quickly("list_tasks", {"limit": 200})
        try:
            tasks = found["tasks"] if found is not None else []
            return [
                (t["id"], _completion_help(t["state"], t["text"]))
                for t in tasks
                if t["id"].startswith(incomplete) and (not states or t["state"] in states)
            ]
        except (KeyError, TypeError, AttributeError):
            return []  # an answer of another shape (an older daemon): nothing to offer

    return complete


def complete_approval_id(incomplete: str) -> list[tuple[str, str]]:
    """A completion callback: the ids of what acting tasks wait for, with the summary."""
    found = _ask_quickly("list_approvals", {})
    try:
        waiting = found["approvals"] if found is not None else []
        return [
            (a["id"], _completion_help(a["kind"], a["summary"]))
            for a in waiting
            if a["id"].startswith(incomplete)
        ]
    except (KeyError, TypeError, AttributeError):
        return []


def complete_schedule_id(incomplete: str) -> list[tuple[str, str]]:
    """A completion callback: schedule ids, with when they run and their text."""
    found = _ask_quickly("list_schedules", {})
    try:
        schedules = found["schedules"] if found is not None else []
        return [
            (s["id"], _completion_help(_when(s), s["text"]))
            for s in schedules
            if s["id"].startswith(incomplete)
        ]
    except (KeyError, TypeError, AttributeError):
        return []


complete_task_id = task_id_completer()


def _version(value: bool) -> None:
    if value:
        emit(f"tale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """tale: a personal AI worker on your own machine."""


# -- tasks -------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
FileOpt = Annotated[
    str | None,
    typer.Option("--file", "-f", help="Read the text from this UTF-8 file (- for stdin)."),
]


def _read_text(text: str | None, file: str | None, what: str) -> str:
    """The text given as the argument, or read from stdin (``-``) or from ``--file``.

    Anything that cannot be read, is not UTF-8 or is empty is a usage error (exit 2)
    raised before the daemon is contacted, so nothing is submitted.
    """
    if text is not None and file is not None:
        raise CliError(f"give the {what} or --file, not both", Exit.USAGE)
    if text is None and file is None:
        raise CliError(f"missing the {what}: give it, - to read stdin, or --file PATH", Exit.USAGE)
    if text is not None and text != "-":
        return text
    source = "-" if file is None else file
    if source == "-":
        name, data = "stdin", sys.stdin.buffer.read()
    else:
        name = source
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CliError(f"cannot read {source}: {exc.strerror or exc}", Exit.USAGE) from None
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(
            f"{name} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})", Exit.USAGE
        ) from None
    if not content.strip():
        raise CliError(f"{name} is empty; it should hold the {what}", Exit.USAGE)
    return content


@app.command(rich_help_panel="Tasks")
@handle_errors
def submit(
    text: Annotated[
        str | None,
        typer.Argument(help="What to do (1..10,000 characters); - reads it from stdin."),
    ] = None,
    file: FileOpt = None,
    priority: Annotated[
        int | None, typer.Option("--priority", "-p", help="0..100, higher runs first (default 50).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the task and print its result.")
    ] = False,
    no_bell: Annotated[
        bool,
        typer.Option(
            "--no-bell", help="With --wait: do not ring the terminal's bell when the task ends."
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Run on this model instead of the task model: backend:model, e.g. "
            "ollama:qwen2.5:14b (loaded on demand).",
        ),
    ] = None,
    done: Annotated[
        list[str] | None,
        typer.Option(
            "--done",
            "-d",
            help="A done criterion the result must pass (repeatable): python, contains:TEXT, "
            "regex:PATTERN, assert:CODE, output:TEXT, run:COMMAND (exits 0 in the workspace).",
        ),
    ] = None,
    in_dir: Annotated[
        str | None,
        typer.Option(
            "--in",
            metavar="DIR",
            help="Act on a copy of this directory with tools (read, write, edit, search, "
            "run); `tale diff` / `tale apply` bring the change back.",
        ),
    ] = None,
    act: Annotated[
        bool, typer.Option("--act", help="Give the task tools in a fresh scratch workspace.")
    ] = False,
    after: Annotated[
        list[str] | None,
        typer.Option(
            "--after",
            metavar="ID[,ID]",
            help="Wait until these tasks complete (ids or unique prefixes; repeatable), then "
            "run with their results; fail if one fails or is cancelled.",
        ),
    ] = None,
    after_any: Annotated[
        bool,
        typer.Option(
            "--after-any",
            help="With --after: run once those tasks finished whatever became of them, told "
            "which failed.",
        ),
    ] = False,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="WHEN",
            help="Run it once, later: 07:00 (its next occurrence), 'tomorrow 07:00', 'in 20m', "
            "or an ISO date-time (local unless it has an offset). Prints the schedule's id.",
        ),
    ] = None,
    every: Annotated[
        str | None,
        typer.Option(
            "--every",
            metavar="SPEC",
            help="Run it again and again: a cron expression ('30 8 * * 1-5') or 'mon-fri "
            "08:30', 'daily 07:00', 'hourly', 'every 2h', 'every 15m'. Prints the schedule's id.",
        ),
    ] = None,
    missed: Annotated[
        str | None,
        typer.Option(
            "--missed",
            metavar="POLICY",
            help="With --at/--every: run_once (one run at start for the times missed while "
            "the daemon was down) or skip; default: the daemon's schedules.missed.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Queue a task and print its id (or, with --wait, follow it and print its result).

    With --at or --every it is scheduled instead: each run is a task of its own.
    """
    when = _schedule_args(at, every, missed, wait)
    waits_for = [ref.strip() for refs in after or () for ref in refs.split(",") if ref.strip()]
    if after is not None and not waits_for:
        raise CliError("--after: give the ids of the tasks to run after", Exit.USAGE)
    if after_any and not waits_for:
        raise CliError("--after-any goes with --after", Exit.USAGE)
    if waits_for and when:
        raise CliError(
            "--after goes with a task that runs now, not with --at or --every", Exit.USAGE
        )
    text = _read_text(text, file, "task text")
    if not text.strip():
        raise CliError("task text is empty; say what you want done", Exit.USAGE)
    if priority is not None and not 0 <= priority <= 100:
        raise CliError(f"priority must be between 0 and 100, not {priority}", Exit.USAGE)
    args: dict[str, Any] = {"text": text}
    if priority is not None:
        args["priority"] = priority
    if model is not None:
        args["model"] = model
    if done:
        args["criteria"] = done
    if in_dir is not None:
        where = os.path.abspath(os.path.expanduser(in_dir))
        if not os.path.isdir(where):
            raise CliError(f"--in {in_dir}: no such directory", Exit.USAGE)
        args["workspace"] = where
    if act:
        args["act"] = True
    if waits_for:
        args["after"] = waits_for
    if after_any:
        args["after_any"] = True
    if when:
        _submit_schedule({**args, **when}, json_out)
        return
    with _connect() as conn:
        task = conn.call_tool("submit_task", args)
        if not wait:
            emit_json({"id": task["id"]}) if json_out else emit(task["id"])
            return
        task = _follow(conn, task["id"], quiet=json_out)
    _ended(task, quiet=json_out, ring=not no_bell)
    _print_final(task, json_out)


def _schedule_args(
    at: str | None, every: str | None, missed: str | None, wait: bool
) -> dict[str, str]:
    """The schedule arguments of a submit (none for a task now); usage errors first."""
    if at is not None and every is not None:
        raise CliError("give --at (once) or --every (again and again), not both", Exit.USAGE)
    if at is None and every is None:
        if missed is not None:
            raise CliError("--missed goes with --at or --every", Exit.USAGE)
        return {}
    if wait:
        raise CliError(
            "--wait follows a task that runs now; a scheduled one runs later "
            "(`tale schedules` shows when)",
            Exit.USAGE,
        )
    if missed is not None and missed not in ("run_once", "skip"):
        raise CliError(f"--missed must be run_once or skip, not {missed!r}", Exit.USAGE)
    found: dict[str, str] = {"at": at} if at is not None else {"every": every or ""}
    if missed is not None:
        found["missed"] = missed
    # The zone the person reads times in, when their shell names one; else the daemon's.
    zone = os.environ.get("TZ", "").lstrip(":")
    if re.fullmatch(r"[A-Za-z_]+(?:/[A-Za-z0-9_+\-]+)*", zone):
        found["timezone"] = zone
    return found


def _submit_schedule(args: dict[str, Any], json_out: bool) -> None:
    with _connect() as conn:
        schedule = conn.call_tool("submit_task", args)
    if json_out:
        emit_json(schedule)
        return
    emit(schedule["id"])
    note(
        f"scheduled ({_when(schedule)}): next run {human.local_day(schedule['next_run'])}; "
        "`tale schedules` lists it"
    )


def _follow(conn: Connection, task_id: str, quiet: bool) -> dict[str, Any]:
    """Follow a task until it ends; live progress on stderr (a bar on a terminal)."""
    show = _progress_view(task_id, quiet)
    try:
        with show:
            return conn.call_tool("watch_task", {"id": task_id}, on_event=show.update)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following; task {task_id} goes on in the background "
            f"(`tale status {task_id}`)",
            Exit.FAILED,
        ) from None
    except TimeoutError:
        raise CliError(
            f"the daemon stopped reporting on task {task_id}; `tale status {task_id}` "
            "shows where it is",
            Exit.FAILED,
        ) from None


class _Lines:
    """Progress as plain lines on stderr, one per change of state (logs, pipes)."""

    def __init__(self, task_id: str, quiet: bool) -> None:
        self._task_id = task_id
        self._quiet = quiet
        self._state = ""

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, _step: float, _total: float | None, message: str) -> None:
        state = message.split(" · ", 1)[0]
        if state != self._state and not self._quiet:
            self._state = state
            note(f"task {self._task_id} {message}")


def _progress_view(task_id: str, quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return _Lines(task_id, quiet)
    # Imported here: rich's progress machinery is only worth loading for a live bar.
    from tale_client.live import ProgressBar

    return ProgressBar(task_id)


def _ended(task: dict[str, Any], quiet: bool, ring: bool) -> None:
    """A followed task ended: ring the bell (on a terminal, unless --no-bell) and say so
    in one line on stderr (a failure's line is its error, from ``_print_final``). Only
    on a terminal: there the live bar vanishes; into a pipe the progress lines already
    ended with the task's "completed after N s"."""
    if ring:
        bell()
    if task["state"] == "completed" and not quiet and sys.stderr.isatty():
        start, end = (human.parse(task.get(k)) for k in ("created_at", "updated_at"))
        took = f" in {(end - start).total_seconds():.0f} s" if start and end else ""
        note(f"task {task['id']} completed{took}")


def _print_final(task: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(task)
    elif task["state"] == "completed":
        emit(task["result"] or "")
    if task["state"] == "failed":
        raise CliError(
            f"task {task['id']} failed: {task.get('error') or 'no reason recorded'}", Exit.FAILED
        )
    if task["state"] == "cancelled":
        raise CliError(f"task {task['id']} was cancelled", Exit.FAILED)


@app.command(rich_help_panel="Tasks")
@handle_errors
def status(
    task_id: Annotated[
        str | None,
        typer.Argument(
            metavar="[ID]",
            help="A task id; omit for a summary.",
            autocompletion=complete_task_id,
        ),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow the task until it ends.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """One task (state, result, transitions, tokens) or a summary of all."""
    with _connect() as conn:
        if task_id is None:
            info = conn.call_tool("daemon_status")
            if json_out:
                emit_json(info)
            else:
                _print_summary(info)
            return
        task = (
            _follow(conn, task_id, quiet=json_out)
            if watch
            else conn.call_tool("get_task", {"id": task_id})
        )
    if json_out:
        emit_json(task)
    else:
        _print_task(task)


def _print_summary(info: dict[str, Any]) -> None:
    tasks = info.get("tasks", {})
    counts = "  ".join(f"{s} {tasks.get(s, 0)}" for s in STATES if tasks.get(s))
    workers = info.get("workers", {})
    emit(f"tasks    {counts or 'none yet'}")
    emit(f"workers  {workers.get('busy', 0)}/{workers.get('limit', 0)} busy")
    if info.get("waiting_for_you"):
        emit(f"waiting  {info['waiting_for_you']} for you (`tale approvals`)")
    # Workers that cannot work (an older daemon reports none): down, or blocked waiting.
    for kind in ("down", "blocked"):
        for w in workers.get(kind, []):
            emit(f"worker   {w['worker']} {kind}: {w['reason']}")
    for m in info.get("models", []):
        # An older daemon reports no health, only whether the model is loaded.
        health = m.get("health") or ("ok" if m["loaded"] else "not loaded")
        emit(f"model    {m['role']}: {m['backend']}:{m['model']} ({health})")


def _print_task(task: dict[str, Any]) -> None:
    tokens = task.get("tokens", {})
    emit(f"id        {task['id']}")
    emit(f"state     {task['state']}")
    emit(f"priority  {task['priority']}")
    emit(f"created   {human.local_moment(task['created_at'])}")
    emit(f"tokens    {tokens.get('prompt', 0)} prompt + {tokens.get('completion', 0)} completion")
    emit(f"text      {task['text']}")
    if task.get("criteria"):
        emit(f"done when {'; '.join(task['criteria'])}")
    progress = task.get("progress")
    if progress and task["state"] not in FINAL:
        eta = progress.get("eta_seconds")
        emit(
            f"progress  step {min(progress['step'] + 1, progress['steps'])}/{progress['steps']}"
            f" · {progress['doing']} · {progress['tokens']} tokens"
            f" · {progress['elapsed_seconds']:.0f} s" + (f" · ETA {eta:.0f} s" if eta else "")
        )
    if task.get("after"):
        anyway = " (whatever becomes of them)" if task.get("after_any") else ""
        emit(f"after     {', '.join(task['after'])}{anyway}")
    if task.get("waiting_for") and task["state"] == "queued":
        emit(f"progress  waiting for {', '.join(task['waiting_for'])}")
    if task.get("workspace"):
        emit(f"works on  a copy of {task['workspace']}")
    if task.get("schedule_id"):
        sid = task["schedule_id"]
        emit(f"schedule  a run of {sid} (`tale schedules show {sid}`)")
    if task.get("approvals"):
        emit("waiting for you")
        for a in task["approvals"]:
            how = "tale answer" if a["kind"] == "question" else "tale approve|deny"
            emit(f"  {a['id'][:8]}  {a['summary']}   ({how} {a['id'][:8]})")
    if task.get("tool_calls"):
        emit("tool calls")
        for c in task["tool_calls"]:
            detail = "  " + " ".join(c["detail"].split())[:120] if c.get("detail") else ""
            emit(f"  {c['tool']:<12} {c['outcome']:<11} {c['duration_ms']:>8.0f} ms{detail}")
    if task.get("subtasks"):
        emit("subtasks")
        _print_tree(task["subtasks"], "  ")
    emit("history")
    transitions = task.get("transitions", [])
    times = human.clocks([t["at"] for t in transitions])
    for at, t in zip(times, transitions, strict=True):
        emit(f"  {at}  {t['from'] or '-':>9} → {t['to']:<9} {t['reason']}")
    if task.get("error"):
        emit(f"error     {task['error']}")
    if task.get("result") is not None:
        emit("result")
        emit(task["result"])


def _print_tree(subtasks: list[dict[str, Any]], indent: str) -> None:
    steps = {t["id"]: t.get("step") or t["id"] for t in subtasks}
    for t in subtasks:
        needs = ", ".join(sorted(steps.get(n, n) for n in t.get("needs", [])))
        after = f"  (after {needs})" if needs else ""
        emit(
            f"{indent}{t.get('step') or '-':<4} {t['id']}  {t['state']:<9} {t.get('title') or ''}"
            f"{after}"
        )
        last = (t.get("transitions") or [{}])[-1]
        if last.get("reason"):
            emit(f"{indent}     {human.clock(last.get('at'))}  {last['reason']}")
        if t.get("subtasks"):
            _print_tree(t["subtasks"], indent + "  ")


@app.command("list", rich_help_panel="Tasks")
@handle_errors
def list_(
    state: Annotated[
        str | None,
        typer.Option("--state", "-s", help=f"Only tasks in this state: {', '.join(STATES)}."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most tasks shown (1..1000).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Tasks, newest first."""
    if state is not None and state not in STATES:
        raise CliError(f"unknown state {state!r}; one of: {', '.join(STATES)}", Exit.USAGE)
    if limit < 1:
        raise CliError(f"--limit must be at least 1, not {limit}", Exit.USAGE)
    args: dict[str, Any] = {"limit": limit}
    if state is not None:
        args["state"] = state
    with _connect() as conn:
        tasks = conn.call_tool("list_tasks", args)["tasks"]
    if json_out:
        emit_json({"tasks": tasks})
        return
    if not tasks:
        emit("no tasks")
        return
    width = 60
    emit(f"{'ID':<12}  {'STATE':<9}  {'PRI':>3}  {'AGE':>5}  TEXT")
    now = datetime.now(UTC)
    for t in tasks:
        text = " ".join(t["text"].split())
        if t.get("waiting_for") and t["state"] == "queued":
            text = f"(waiting for {', '.join(i[:8] for i in t['waiting_for'])}) {text}"
        text = text if len(text) <= width else text[: width - 1] + "…"
        age = _age(t["created_at"], now)
        emit(f"{t['id']:<12}  {t['state']:<9}  {t['priority']:>3}  {age:>5}  {text}")


def _age(stamp: str, now: datetime) -> str:
    then = human.parse(stamp)
    if then is None:
        return "-"
    seconds = (now - then).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0))}s"


@app.command(rich_help_panel="Tasks")
@handle_errors
def checkpoints(
    task_id: Annotated[
        str, typer.Argument(metavar="ID", help="The task.", autocompletion=complete_task_id)
    ],
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Most checkpoints shown.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """A task's checkpoints, newest first: commit, time, step, kind, message."""
    if limit is not None and limit < 1:
        raise CliError(f"--limit must be at least 1, not {limit}", Exit.USAGE)
    args: dict[str, Any] = {"id": task_id}
    if limit is not None:
        args["limit"] = limit
    with _connect() as conn:
        found = conn.call_tool("list_checkpoints", args)
    if json_out:
        emit_json(found)
        return
    if not found["checkpoints"]:
        emit(f"task {found['task_id']} has no checkpoints yet")
        return
    times = human.clocks([c["at"] for c in found["checkpoints"]], header="TIME")
    emit(f"{'COMMIT':<12}  {'TIME':<{len(times[0])}}  {'STEP':<14}  {'KIND':<14}  MESSAGE")
    for at, c in zip(times, found["checkpoints"], strict=True):
        kind = c.get("kind", "")  # a daemon before checkpoint kinds sends none
        emit(f"{c['commit'][:12]:<12}  {at}  {c['step']:<14}  {kind:<14}  {c['message']}")


@app.command(rich_help_panel="Tasks")
@handle_errors
def restore(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="A paused or failed task.",
            autocompletion=task_id_completer(("paused", "failed")),
        ),
    ],
    commit: Annotated[
        str | None,
        typer.Argument(
            metavar="[COMMIT]",
            help="A checkpoint from `tale checkpoints ID` (default: the newest that is not "
            "a failed attempt).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Rewind a paused or failed task to a checkpoint and queue it again."""
    args: dict[str, Any] = {"id": task_id}
    if commit is not None:
        args["commit"] = commit
    with _connect() as conn:
        done = conn.call_tool("restore_checkpoint", args)
    if json_out:
        emit_json(done)
        return
    c = done["checkpoint"]
    task = done["task"]
    # The message names the checkpoint gone back to; the commit is the restore's own.
    emit(f"task {task['id']} {task['state']}: {c['message']}; saved as {c['commit'][:12]}")


@app.command(rich_help_panel="Tasks")
@handle_errors
def cancel(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="The task to cancel.", autocompletion=task_id_completer(UNFINISHED)
        ),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Cancel a task that has not finished (a running model call stops)."""
    _task_action("cancel_task", {"id": task_id}, json_out)


@app.command(rich_help_panel="Tasks")
@handle_errors
def pause(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="The task to pause.",
            autocompletion=task_id_completer(("queued", "running", "waiting")),
        ),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Pause a queued, running or waiting task (a running answer stops; resume continues it)."""
    _task_action("pause_task", {"id": task_id}, json_out)


@app.command(rich_help_panel="Tasks")
@handle_errors
def resume(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="The paused task.", autocompletion=task_id_completer(("paused",))
        ),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Put a paused task back in the queue."""
    _task_action("resume_task", {"id": task_id}, json_out)


@app.command(rich_help_panel="Tasks")
@handle_errors
def priority(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="The task.", autocompletion=task_id_completer(UNFINISHED)
        ),
    ],
    value: Annotated[int, typer.Argument(metavar="N", help="0..100, higher runs first.")],
    json_out: JsonOpt = False,
) -> None:
    """Change an unfinished task's priority."""
    if not 0 <= value <= 100:
        raise CliError(f"priority must be between 0 and 100, not {value}", Exit.USAGE)
    task = _task_action("set_priority", {"id": task_id, "priority": value}, json_out, quiet=True)
    if not json_out:
        emit(f"task {task['id']} {task['state']}, priority {task['priority']}")


# The daemon's taled.retention.age.AGE_PATTERN (a test pins the two equal): checked here
# too, so a typo is exit 2 without a daemon being started.
AGE_PATTERN = r"([1-9][0-9]{0,5})([smhdw])"


@app.command(rich_help_panel="Tasks")
@handle_errors
def delete(
    task_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="A finished top-level task.", autocompletion=task_id_completer(FINAL)
        ),
    ],
    json_out: JsonOpt = False,
) -> None:
    """Forget a finished task everywhere: its text, result, checkpoints, workspace and
    the conversation turns that submitted it (token counts are kept, anonymous).

    A live task is refused: `tale cancel ID` first. docs/operations.md says what goes.
    """
    with _connect() as conn:
        done = conn.call_tool("delete_task", {"id": task_id})
    if json_out:
        emit_json(done)
        return
    subtasks = len(done["tasks"]) - 1
    more = f" and its {human.count(subtasks, 'subtask', 'subtasks')}" if subtasks else ""
    emit(f"task {done['id']}{more} forgotten; token counts kept")
    _scrub_notes(done["scrubbed"])


@app.command(rich_help_panel="Tasks")
@handle_errors
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Forget finished tasks last updated longer ago than this: 90m, 12h, 30d, "
            "2w (s, m, h, d, w).",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be forgotten.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Forget every finished top-level task older than AGE, as `tale delete` does.

    `retention.keep_days` in the config does this by itself.
    """
    if re.fullmatch(AGE_PATTERN, older_than.strip()) is None:
        raise CliError(
            f"--older-than {older_than!r}: give a whole number and a unit, like 90m, 12h, "
            "30d or 2w (units: s, m, h, d, w)",
            Exit.USAGE,
        )
    with _connect() as conn:
        done = conn.call_tool("purge_tasks", {"older_than": older_than, "dry_run": dry_run})
    if json_out:
        emit_json(done)
        return
    times = human.clocks([t["updated_at"] for t in done["tasks"]])
    for at, t in zip(times, done["tasks"], strict=True):
        text = f"  {t['text']}" if "text" in t else ""
        emit(f"{t['id']:<12}  {t['state']:<9}  {at}{text}".rstrip())
    for s in done["skipped"]:
        note(f"kept {s['id']}: {s['reason']}")
    verb = "would forget" if done["dry_run"] else "forgot"
    tasks = human.count(len(done["tasks"]), "task", "tasks")
    note(f"{verb} {tasks} last updated before {human.local_moment(done['cutoff'])}")
    if done.get("scrubbed"):
        _scrub_notes(done["scrubbed"])


def _scrub_notes(scrubbed: dict[str, Any]) -> None:
    """Say on stderr what a forgetting could not scrub yet (the log says why)."""
    if not scrubbed.get("database", True):
        note("the database's log was busy; the text leaves it at its next checkpoint")
    if not scrubbed.get("checkpoint_objects", True):
        note("the checkpoint repository was busy; its objects go at the daemon's next start")
    backups = str(scrubbed.get("backups", ""))
    if backups.startswith("not"):
        note(f"backups {backups}")


def _task_action(
    tool: str, args: dict[str, Any], json_out: bool, quiet: bool = False
) -> dict[str, Any]:
    """Call a tool that acts on one task and print the task's new state."""
    with _connect() as conn:
        task = conn.call_tool(tool, args)
    if json_out:
        emit_json(task)
    elif not quiet:
        emit(f"task {task['id']} {task['state']}")
    return task


@app.command(rich_help_panel="Acting")
@handle_errors
def approvals(
    task_id: Annotated[
        str | None,
        typer.Argument(
            metavar="[ID]",
            help="Only this task's.",
            autocompletion=task_id_completer(("waiting", "running")),
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """What acting tasks wait for: tool calls to approve, questions to answer."""
    args: dict[str, Any] = {} if task_id is None else {"task": task_id}
    with _connect() as conn:
        found = conn.call_tool("list_approvals", args)
    if json_out:
        emit_json(found)
        return
    if not found["approvals"]:
        emit("nothing is waiting for you")
        return
    emit(f"{'ID':<8}  {'TASK':<12}  {'KIND':<8}  WHAT")
    for a in found["approvals"]:
        emit(f"{a['id'][:8]:<8}  {a['task_id']:<12}  {a['kind']:<8}  {a['summary']}")
    emit("tale approve ID [--always] · tale deny ID [REASON] · tale answer ID TEXT")


ApprovalId = Annotated[
    str,
    typer.Argument(
        metavar="ID", help="From `tale approvals`.", autocompletion=complete_approval_id
    ),
]


@app.command(rich_help_panel="Acting")
@handle_errors
def approve(
    approval_id: ApprovalId,
    always: Annotated[
        bool, typer.Option("--always", help="Also allow calls like it from now on.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Let a waiting tool call run."""
    args: dict[str, Any] = {"id": approval_id}
    if always:
        args["always"] = True
    _decide("approve", args, json_out)


@app.command(rich_help_panel="Acting")
@handle_errors
def deny(
    approval_id: ApprovalId,
    reason: Annotated[
        str | None, typer.Argument(help="Why, or what to do instead (the model reads it).")
    ] = None,
    always: Annotated[
        bool, typer.Option("--always", help="Also deny calls like it from now on.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Refuse a waiting tool call; the reason goes to the task's model."""
    args: dict[str, Any] = {"id": approval_id}
    if reason:
        args["reason"] = reason
    if always:
        args["always"] = True
    _decide("deny", args, json_out)


@app.command(rich_help_panel="Acting")
@handle_errors
def answer(
    approval_id: ApprovalId,
    text: Annotated[str, typer.Argument(help="Your answer to the task's question.")],
    json_out: JsonOpt = False,
) -> None:
    """Answer a task's question."""
    if not text.strip():
        raise CliError("the answer is empty", Exit.USAGE)
    _decide("answer", {"id": approval_id, "text": text}, json_out)


def _decide(tool: str, args: dict[str, Any], json_out: bool) -> None:
    with _connect() as conn:
        done = conn.call_tool(tool, args)
    if json_out:
        emit_json(done)
        return
    emit(f"{done['id'][:8]} {done['state']}: {done['summary']} (task {done['task_id']} goes on)")


@app.command(rich_help_panel="Acting")
@handle_errors
def diff(
    task_id: Annotated[
        str, typer.Argument(metavar="ID", help="An acting task.", autocompletion=complete_task_id)
    ],
    json_out: JsonOpt = False,
) -> None:
    """What an acting task changed, as a unified diff."""
    with _connect() as conn:
        found = conn.call_tool("task_diff", {"id": task_id})
    if json_out:
        emit_json(found)
        return
    if not found["diff"]:
        emit(f"task {found['task_id']} changed nothing")
        return
    # The diff shows files a model wrote: control sequences in them must not reach the
    # terminal (emit strips them, keeping lines).
    emit(found["diff"].rstrip("\n"))


@app.command("apply", rich_help_panel="Acting")
@handle_errors
def apply_(
    task_id: Annotated[
        str, typer.Argument(metavar="ID", help="An acting task.", autocompletion=complete_task_id)
    ],
    json_out: JsonOpt = False,
) -> None:
    """Bring an acting task's change into the directory it was given (conflicts refused)."""
    with _connect() as conn:
        done = conn.call_tool("apply_task", {"id": task_id})
    if json_out:
        emit_json(done)
        return
    if not done["applied"] and not done["unchanged"]:
        emit(f"nothing to apply: task {done['task_id']} changed nothing")
        return
    if not done["applied"]:
        emit(f"nothing to apply: {done['target']} already has task {done['task_id']}'s change")
        return
    for c in done["applied"]:
        emit(f"{c['kind']:<9} {c['path']}")
    emit(f"applied {human.count(len(done['applied']), 'change', 'changes')} to {done['target']}")


@app.command(rich_help_panel="Acting")
@handle_errors
def tools(json_out: JsonOpt = False) -> None:
    """The tools tasks may use, their permission rules, and your MCP servers."""
    with _connect() as conn:
        found = conn.call_tool("list_tools")
    if json_out:
        emit_json(found)
        return
    for t in found["builtin"]:
        emit(f"{t['name']:<12} {t['policy']:<6} {t['description']}")
    for server in found["servers"]:
        error = f"  ({server['last_error']})" if server.get("last_error") else ""
        emit(f"mcp:{server['name']:<8} {server['state']:<8} {server.get('tools', 0)} tools{error}")
        # A server's own descriptions can run to paragraphs: their first line.
        for t in server.get("offered", []):  # an older daemon sends the count only
            about = (t["description"].strip().splitlines() or [""])[0]
            emit(f"  {t['name']:<22} {t['policy']:<6} {about}")
        for refused in server.get("notes", []):
            emit(f"  not offered: {refused}")
    for key, decision in sorted(found.get("rules", {}).items()):
        emit(f"rule {key} = {decision} (added with --always)")


@app.command(rich_help_panel="Ledger")
@handle_errors
def usage(
    json_out: JsonOpt = False,
    days: Annotated[
        int | None,
        typer.Option(
            "--days", help="Only today and the N-1 days before (1..3650); default: all history."
        ),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option("--top", help="Tasks, conversations and violations listed (1..100)."),
    ] = None,
) -> None:
    """Where the tokens went (model, role, day, complexity, top tasks), how well budgets
    predict, what tale saved (an estimate against a naive single-model design), and the
    performance targets it missed. docs/usage.md explains each number."""
    if days is not None and not 1 <= days <= 3650:
        raise CliError(f"--days must be between 1 and 3650, not {days}", Exit.USAGE)
    if top is not None and not 1 <= top <= 100:
        raise CliError(f"--top must be between 1 and 100, not {top}", Exit.USAGE)
    args: dict[str, Any] = {}
    if days is not None:
        args["days"] = days
    if top is not None:
        args["top"] = top
    with _connect() as conn:
        report = conn.call_tool("usage", args)
    if json_out:
        emit_json(report)
        return
    from tale_client.sanitize import printable_doc
    from tale_client.usage_view import render

    emit_rich(render(printable_doc(report)))


# -- schedules ----------------------------------------------------------------

SCHEDULE_STATES = protocol.SCHEDULE_STATES
ScheduleId = Annotated[
    str,
    typer.Argument(
        metavar="ID",
        help="A schedule id, or a unique prefix of 4+ digits.",
        autocompletion=complete_schedule_id,
    ),
]


@schedules_app.callback(invoke_without_command=True)
@handle_errors
def schedules(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option("--state", "-s", help=f"Only schedules: {', '.join(SCHEDULE_STATES)}."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Most schedules shown.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Schedules: active ones by next run (local time), then paused, then done."""
    if ctx.invoked_subcommand is not None:
        return
    if state is not None and state not in SCHEDULE_STATES:
        raise CliError(f"unknown state {state!r}; one of: {', '.join(SCHEDULE_STATES)}", Exit.USAGE)
    if limit is not None and limit < 1:
        raise CliError(f"--limit must be at least 1, not {limit}", Exit.USAGE)
    args: dict[str, Any] = {}
    if state is not None:
        args["state"] = state
    if limit is not None:
        args["limit"] = limit
    with _connect() as conn:
        found = conn.call_tool("list_schedules", args)["schedules"]
    if json_out:
        emit_json({"schedules": found})
        return
    if not found:
        emit("no schedules (tale submit --at WHEN or --every SPEC makes one)")
        return
    width = max([len("WHEN"), *(len(_when(s)) for s in found)])
    emit(f"{'ID':<12}  {'NEXT RUN':<24}  {'WHEN':<{width}}  {'STATE':<6}  {'RUNS':>4}  TEXT")
    for s in found:
        text = " ".join(s["text"].split())
        text = text if len(text) <= 40 else text[:39] + "…"
        emit(
            f"{s['id']:<12}  {_next_run(s):<24}  {_when(s):<{width}}  "
            f"{s['state']:<6}  {s['runs']:>4}  {text}"
        )


def _next_run(s: dict[str, Any]) -> str:
    """When a schedule runs next, in local time; "-" while paused (its stored time is
    the one it stopped at: resuming takes the first one after now)."""
    return "-" if s["state"] == "paused" else human.local_day(s["next_run"])


def _when(s: dict[str, Any]) -> str:
    """How a person says when: ``at 07:00``, ``every mon-fri 08:30``, ``hourly``."""
    expression = s["expression"]
    first = (expression.split() or [""])[0].lower()
    if s["kind"] == "every" and (first in ("every", "hourly", "daily") or first[:1] == "@"):
        return str(expression)
    return f"{s['kind']} {expression}"


@schedules_app.command("show")
@handle_errors
def schedules_show(schedule_id: ScheduleId, json_out: JsonOpt = False) -> None:
    """One schedule, and what became of each of its due times (ran, caught up, skipped)."""
    with _connect() as conn:
        s = conn.call_tool("get_schedule", {"id": schedule_id})
    if json_out:
        emit_json(s)
        return
    cron = f"cron {s['cron']}, " if s.get("cron") else ""
    emit(f"id        {s['id']}")
    emit(f"when      {_when(s)}  ({cron}{s['timezone']})")
    emit(f"state     {s['state']}")
    paused = f" (`tale schedules resume {s['id']}` runs it again)" if s["state"] == "paused" else ""
    emit(f"next run  {_next_run(s)}{paused}")
    last = f", last task {s['last_task_id']}" if s["last_task_id"] else ""
    emit(f"runs      {s['runs']}{last}")
    emit(f"missed    {s['missed_runs']} (policy {s['missed_policy']})")
    emit(f"text      {s['text']}")
    if s.get("history"):
        emit("history")
        for r in s["history"]:
            task = f"task {r['task_id']}" if r["task_id"] else "no task"
            missed = f"  ({r['missed']} missed)" if r["missed"] else ""
            emit(f"  due {human.local_day(r['due_at']):<24}  {r['outcome']:<9}  {task}{missed}")


@schedules_app.command("pause")
@handle_errors
def schedules_pause(schedule_id: ScheduleId, json_out: JsonOpt = False) -> None:
    """Stop a schedule from running until resumed."""
    _schedule_action("pause_schedule", schedule_id, json_out)


@schedules_app.command("resume")
@handle_errors
def schedules_resume(schedule_id: ScheduleId, json_out: JsonOpt = False) -> None:
    """Run a paused schedule again, from its next time after now."""
    _schedule_action("resume_schedule", schedule_id, json_out)


@schedules_app.command("delete")
@handle_errors
def schedules_delete(schedule_id: ScheduleId, json_out: JsonOpt = False) -> None:
    """Delete a schedule; the tasks it already ran stay."""
    _schedule_action("delete_schedule", schedule_id, json_out)


def _schedule_action(tool: str, schedule_id: str, json_out: bool) -> None:
    with _connect() as conn:
        s = conn.call_tool(tool, {"id": schedule_id})
    if json_out:
        emit_json(s)
    elif s.get("deleted"):
        ran = human.count(s["runs"], "task", "tasks")
        emit(f"schedule {s['id']} deleted ({ran} it ran kept)")
    elif s["state"] == "active":
        emit(f"schedule {s['id']} active, next run {human.local_day(s['next_run'])}")
    else:
        emit(f"schedule {s['id']} {s['state']}")


# -- talking ------------------------------------------------------------------


@app.command(rich_help_panel="Conversation")
@handle_errors
def ask(
    text: Annotated[
        str | None,
        typer.Argument(help="What you say (1..4,000 characters); - reads it from stdin."),
    ] = None,
    file: FileOpt = None,
    conversation: Annotated[
        str | None,
        typer.Option(
            "--conversation",
            "-c",
            help="Continue this conversation (an id from `tale ask --json` or the TUI's "
            "history); default: the most recent one.",
        ),
    ] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new conversation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """One chat turn with tale's agent; the reply streams to stdout.

    A request for work is queued as a task (the reply names its id); questions
    like "how is my task doing?" are answered from the task store.
    """
    if conversation is not None and not re.fullmatch(
        rf"[0-9a-f]{{{protocol.ID_DIGITS}}}", conversation
    ):
        # `tale ask -c "next question"` reads as "continue": say what -c takes.
        raise CliError(
            f"--conversation takes a conversation's id ({protocol.ID_DIGITS} hex digits, as "
            f"`tale ask --json` shows), not {conversation!r}; without it `tale ask` "
            "continues the most recent conversation",
            Exit.USAGE,
        )
    text = _read_text(text, file, "chat message")
    if not text.strip():
        raise CliError("chat message is empty; say something", Exit.USAGE)
    if conversation is not None and new:
        raise CliError("give --conversation or --new, not both", Exit.USAGE)
    args: dict[str, Any] = {"text": text, "new": new}
    if conversation is not None:
        args["conversation"] = conversation
    with _connect() as conn:
        if json_out:
            emit_json(conn.call_tool("chat", args))
            return
        reply = conn.call_tool("chat", args, on_progress=emit_piece)
    if not reply["text"].endswith("\n"):
        emit("")  # end the streamed line


@app.command(rich_help_panel="Models")
@handle_errors
def models(json_out: JsonOpt = False) -> None:
    """The model pool: every model, its health, memory, and calls and tokens since start."""
    with _connect() as conn:
        report = conn.call_tool("models_status")
    if json_out:
        emit_json(report)
        return
    rows = report["models"]
    width = max([len("MODEL"), *(len(r["spec"]) for r in rows)])
    emit(
        f"{'ROLE':<8} {'MODEL':<{width}} {'PINNED':<6} {'HEALTH':<8} {'MEMORY':>9} "
        f"{'CALLS':>6} {'TOKENS':>8}"
    )
    for r in rows:
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        emit(
            f"{r['role']:<8} {r['spec']:<{width}} {'yes' if r['pinned'] else 'no':<6} "
            f"{r['health']:<8} {_memory(r):>9} {r['calls']:>6} {tokens:>8}"
        )
        for line in _model_details(r):
            emit(f"{'':<8} - {line}")


def _memory(r: dict[str, Any]) -> str:
    if not r["memory_bytes"]:
        return "-" if r["memory_local"] else "remote"
    size = f"{r['memory_bytes'] / 2**20:.0f} MiB"
    return size if r["memory_local"] else f"{size} rem"


def _model_details(r: dict[str, Any]) -> list[str]:
    """Lines under a model's row: what is wrong with it and what tale does about it."""
    lines = []
    if r["serving"]:
        since = (
            time.strftime("%H:%M:%S", time.localtime(r["down_since"])) if r["down_since"] else ""
        )
        who = "calls wait for it" if r["serving"] == "waiting" else f"served by {r['serving']}"
        lines.append(f"down since {since}: {r['last_error']}; {who}")
        if r["next_reload_at"]:
            lines.append(f"next reload in {max(r['next_reload_at'] - time.time(), 0):.0f} s")
    elif r["last_error"]:
        lines.append(f"last error: {r['last_error']}")
    if r["vram_bytes"]:
        lines.append(f"{r['vram_bytes'] / 2**20:.0f} MiB of it in VRAM")
    events = [
        human.count(r[key], one, f"{one}s")
        for key, one in (
            ("reloads", "reload"),
            ("unexpected_loads", "unexpected backend reload"),
            ("evictions", "eviction"),
        )
        if r[key]
    ]
    if events:
        lines.append(", ".join(events))
    return lines


# -- the TUI -------------------------------------------------------------------

StartOpt = Annotated[
    bool,
    typer.Option(
        "--start/--no-start",
        help="Start the daemon if it is not running (default), or only wait for it.",
    ),
]


def _run_tui(screen: str, start: bool) -> None:
    if screen not in ("chat", "board", "dashboard"):
        raise CliError(f"unknown screen {screen!r}; one of: chat, board, dashboard", Exit.USAGE)
    # Imported here: Textual is the heaviest import of the client, and only the
    # full-screen commands need it.
    from tale_client.tui.app import build_app

    build_app(screen=screen, autostart=start).run()


@app.command(rich_help_panel="Conversation")
@handle_errors
def tui(
    screen: Annotated[
        str, typer.Option("--screen", "-s", help="Open on: chat, board or dashboard.")
    ] = "chat",
    start: StartOpt = True,
) -> None:
    """The full-screen app: chat, task board, dashboard (F1, F2, F3; ctrl+p for commands).

    While the daemon is down it says so and reconnects by itself when it is back.
    """
    _run_tui(screen, start)


@app.command("chat", rich_help_panel="Conversation")
@handle_errors
def chat_(start: StartOpt = True) -> None:
    """The full-screen app, opened on the chat (same as `tale tui`)."""
    _run_tui("chat", start)


@app.command(rich_help_panel="Ledger")
@handle_errors
def dashboard(start: StartOpt = True) -> None:
    """The full-screen app, opened on the live dashboard: pool, queue, tokens, latency."""
    _run_tui("dashboard", start)


# -- the bridge ----------------------------------------------------------------


@app.command(rich_help_panel="Editors")
@handle_errors
def mcp() -> None:
    """Bridge stdio to the daemon's MCP socket (for editors that launch MCP servers)."""
    from tale_client.bridge import run_bridge
    from tale_client.daemon import start_daemon

    try:
        run_bridge(paths.socket_path())
    except DaemonUnreachable:
        start_daemon()
        run_bridge(paths.socket_path())


# -- the daemon ------------------------------------------------------------------


@daemon_app.command("start")
@handle_errors
def daemon_start() -> None:
    """Start the daemon in the background (no-op if it runs).

    When the systemd user unit is installed (`tale daemon install`) and `systemctl --user`
    works, this is `systemctl --user start taled`, so systemd keeps the daemon; otherwise
    tale starts it itself, logging to a file. The output says which.
    """
    from tale_client.daemon import Route, daemon_pid, probe, start_daemon

    pid = daemon_pid()
    if pid is not None:
        by = " under systemd (taled.service)" if probe().active else ""
        emit(f"taled already running (pid {pid}){by}")
        return
    started = start_daemon()
    if started.route is Route.SYSTEMD:
        pid_note = f", pid {started.pid}" if started.pid is not None else ""
        emit(f"taled started by systemd (systemctl --user start taled{pid_note})")
        emit(f"socket {paths.socket_path()}")
        emit("log    journalctl --user -u taled (or: tale daemon logs)")
        return
    emit(f"taled started (pid {started.pid}) by tale, not systemd: {started.why}")
    emit(f"socket {paths.socket_path()}")
    emit(f"log    {paths.log_file()}")


@daemon_app.command("stop")
@handle_errors
def daemon_stop() -> None:
    """Stop the daemon gracefully (running tasks go back to the queue).

    `systemctl --user stop taled` when systemd runs it, else SIGTERM.
    """
    from tale_client.daemon import Route, stop_daemon

    stopped = stop_daemon()
    pid = f" (pid {stopped.pid})" if stopped.pid is not None else ""
    if stopped.route is Route.SYSTEMD:
        emit(f"taled stopped{pid} by systemd (systemctl --user stop taled)")
    elif stopped.pid is None:
        emit("taled is not running")
    else:
        emit(f"taled stopped{pid}")


@daemon_app.command("status")
@handle_errors
def daemon_status(json_out: JsonOpt = False) -> None:
    """Whether the daemon runs, and its models, workers and tasks."""
    with _connect(autostart=False) as conn:
        info = conn.call_tool("daemon_status")
    if json_out:
        emit_json(info)
        return
    emit(
        f"taled {info['version']} running (pid {info['pid']}), up {info['uptime_seconds']:.0f} s, "
        f"ready in {info['ready_seconds'] or 0:.2f} s"
    )
    emit(f"socket   {info['socket']}")
    emit(f"database {info['database']}")
    _print_summary(info)


@app.command(rich_help_panel="Daemon")
@handle_errors
def doctor(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Repair what can be repaired: restore the database from its newest good "
            "backup, move a damaged checkpoint ref back or drop it, rebuild full-text "
            "indexes. The daemon must be stopped.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check tale's data (database, backups, checkpoints); --repair fixes what it can.

    Works while the daemon is down, as when it will not start. Exit code 0 healthy,
    1 problems found (or not all repaired), 2 --repair while the daemon runs.
    docs/operations.md explains each check and repair.
    """
    # Run by the daemon's own code, in a process of its own: this must work when the
    # daemon will not start.
    argv = ["taled.doctor"]
    argv += ["--repair"] if repair else []
    argv += ["--json"] if json_out else []
    _run_daemon_code("tale doctor", argv)


def _run_daemon_code(command: str, argv: list[str]) -> None:
    """``python -m ARGV...`` of the daemon's package, its output passed through and its
    exit code kept: the thin client never imports taled."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("taled") is None:
        raise CliError(f"{command} needs the daemon (taled) installed beside tale", Exit.FAILED)
    run = [sys.executable, "-m", *argv]
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    if done.stdout:
        emit_piece(done.stdout)
    if done.stderr:
        note(done.stderr.rstrip("\n"))
    if done.returncode:
        raise typer.Exit(done.returncode)


@daemon_app.command("install")
@handle_errors
def daemon_install() -> None:
    """Write the systemd user unit for this environment's taled."""
    from tale_client.daemon import install_unit

    path = install_unit()
    emit(f"wrote {path}")
    emit("enable it with: systemctl --user daemon-reload && systemctl --user enable --now taled")


@daemon_app.command("logs")
@handle_errors
def daemon_logs(
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many of the last lines (0: none).")
    ] = 50,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Then print new lines as they come, until ctrl+c."),
    ] = False,
) -> None:
    """The end of the daemon's log.

    While systemd runs the daemon this is `journalctl --user -u taled` (with -n, -f);
    otherwise the log file of a daemon tale started (-f follows it across rotations).
    """
    import shutil

    from tale_client.daemon import Route, follow_log, journal_argv, logs_route, probe, tail_lines

    if lines < 0:
        raise CliError(f"--lines must be 0 or more, not {lines}", Exit.USAGE)
    log = paths.log_file()
    if logs_route(probe(), log.exists()) is Route.SYSTEMD:
        argv = journal_argv(lines, follow)
        journalctl = shutil.which(argv[0])
        if journalctl is None:
            raise CliError(
                "systemd runs taled, so its log is in the journal, but journalctl is not installed",
                Exit.FAILED,
            )
        sys.stdout.flush()
        try:
            # Replaced by journalctl: its paging, colours, ctrl+c and exit status are the user's.
            os.execv(journalctl, argv)
        except OSError as exc:
            raise CliError(f"cannot run {journalctl}: {exc.strerror or exc}", Exit.FAILED) from None
    if follow:
        if not log.exists():
            note(f"tale: waiting for {log} (a daemon started by tale writes it)")
        with contextlib.suppress(KeyboardInterrupt):
            for line in follow_log(log, lines):
                emit(line)
        return
    if not log.exists():
        note(f"tale: no log yet at {log} (a daemon started by tale writes it)")
        return
    for line in tail_lines(log, lines):
        emit(line)


@daemon_app.command("config")
@handle_errors
def daemon_config(
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="PATH",
            help="Read this config file (it must exist) instead of "
            "$XDG_CONFIG_HOME/tale/taled.toml.",
        ),
    ] = None,
) -> None:
    """The settings a daemon started now would run with, as TOML, each value marked with
    where it came from: default, the config file, or a TALE_* variable.

    Runs `taled --print-config` with this shell's environment (a daemon under systemd has
    the unit's: `systemctl --user show-environment`). Secrets print as "***".
    """
    argv = ["taled", "--print-config"]
    argv += ["--config", config] if config is not None else []
    _run_daemon_code("tale daemon config", argv)


def _summaries_on_one_line(group: typer.Typer) -> None:
    """List each command by its docstring's first paragraph on one line.

    Typer's rich help keeps that paragraph's line breaks in a group's command list (a
    command's own --help joins them), so `tale --help` broke summaries mid-sentence.
    """
    for info in group.registered_commands:
        doc = info.help or inspect.getdoc(info.callback) or ""
        if info.short_help is None and doc:
            info.short_help = " ".join(doc.split("\n\n")[0].split())
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _summaries_on_one_line(sub.typer_instance)


_summaries_on_one_line(app)


def main() -> None:
    """Entry point of the ``tale`` console script."""
    app(prog_name="tale")


if __name__ == "__main__":
    main()
