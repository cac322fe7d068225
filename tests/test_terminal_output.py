"""Text from the daemon never reaches the terminal as escape sequences; --json stays exact."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tale_client.sanitize import json_safe, printable
from tale_client.tui.model import Task
from tests.harness import Daemon, running_daemon

# A terminal title change (OSC, BEL-terminated), clear screen (CSI), a C1 CSI
# setting red, a carriage return that would overwrite the line, a backspace.
HOSTILE = "say hi\x1b]0;pwned\x07\r \x1b[2J\x9b31mend\x08"
VISIBLE = "say hi end"
CONTROLS = {chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


@pytest.fixture(scope="module")
def hostile_task() -> Iterator[tuple[Daemon, str]]:
    """A daemon holding one task whose text is full of terminal escape sequences."""
    with running_daemon() as daemon:
        task = daemon.call("submit_task", text=HOSTILE)
        daemon.call("cancel_task", id=task["id"])
        yield daemon, task["id"]


def test_tale_status_strips_escape_sequences(hostile_task: tuple[Daemon, str]) -> None:
    """`tale status ID` shows the task's text without its escape and control characters."""
    daemon, task_id = hostile_task
    proc = daemon.home.tale("status", task_id)
    assert proc.returncode == 0, proc.stderr
    assert f"text      {VISIBLE}\n" in proc.stdout
    assert not CONTROLS & set(proc.stdout)


def test_tale_list_strips_escape_sequences(hostile_task: tuple[Daemon, str]) -> None:
    """`tale list` shows the task's text without its escape and control characters."""
    daemon, _task_id = hostile_task
    proc = daemon.home.tale("list")
    assert proc.returncode == 0, proc.stderr
    assert VISIBLE in proc.stdout
    assert not CONTROLS & set(proc.stdout)


def test_json_output_keeps_the_text_exact(hostile_task: tuple[Daemon, str]) -> None:
    """`tale status --json` parses back to the exact text, with C1 characters escaped."""
    daemon, task_id = hostile_task
    proc = daemon.home.tale("status", task_id, "--json")
    assert json.loads(proc.stdout)["text"] == HOSTILE
    assert not CONTROLS - {"\n"} & set(proc.stdout)


def test_the_tui_model_strips_escape_sequences() -> None:
    """The TUI renders from model objects, whose strings come without escape sequences."""
    task = Task.from_dict(
        {"id": "t1", "text": HOSTILE, "result": "ok\x1b[1A\x1b[2K", "error": None}
    )
    assert (task.text, task.result) == (VISIBLE, "ok")


@given(st.text(alphabet=st.characters(max_codepoint=0x200)))
def test_printable_leaves_no_control_character_but_newline_and_tab(text: str) -> None:
    """Whatever the input, printable() keeps no C0, DEL or C1 character except \\n and \\t."""
    assert not CONTROLS & set(printable(text))


@given(st.text())
def test_json_safe_is_the_same_document(text: str) -> None:
    """json_safe() changes how a JSON text is written, never what it means."""
    encoded = json.dumps({"t": text}, ensure_ascii=False)
    assert json.loads(json_safe(encoded)) == {"t": text}
