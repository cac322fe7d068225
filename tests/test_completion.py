"""Shell completion: typer's scripts, and task ids completed from the running daemon."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tale_client.cli import complete_task_id, task_id_completer
from tests.harness import Daemon, Home


def _point_at(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's path rules find ``home``'s socket, as the shell's tale would."""
    monkeypatch.delenv("TALE_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", home.env["XDG_RUNTIME_DIR"])


@pytest.fixture
def two_tasks(shared_daemon: Daemon) -> Iterator[tuple[str, str]]:
    """A cancelled task and a queued-or-later one in the shared daemon: (cancelled, other)."""
    other = shared_daemon.call("submit_task", text="Say the word completion")["id"]
    cancelled = shared_daemon.call("submit_task", text="Name a tab key")["id"]
    shared_daemon.call("cancel_task", id=cancelled)
    yield cancelled, other


def test_task_ids_complete_with_their_text_as_help(
    shared_daemon: Daemon, two_tasks: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback offers the daemon's task ids, each with its state and text as help."""
    _point_at(shared_daemon.home, monkeypatch)
    offered = dict(complete_task_id(""))
    cancelled, _ = two_tasks
    assert offered[cancelled] == "cancelled · Name a tab key"


def test_task_ids_complete_only_those_with_the_typed_prefix(
    shared_daemon: Daemon, two_tasks: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only ids that start with what was typed are offered."""
    _point_at(shared_daemon.home, monkeypatch)
    cancelled, _ = two_tasks
    offered = [task_id for task_id, _help in complete_task_id(cancelled[:10])]
    assert offered and all(task_id.startswith(cancelled[:10]) for task_id in offered)


def test_a_command_completes_only_tasks_in_the_states_it_acts_on(
    shared_daemon: Daemon, two_tasks: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tale delete`'s completion (finished tasks) offers the cancelled task, `tale resume`'s
    (paused tasks) does not."""
    _point_at(shared_daemon.home, monkeypatch)
    cancelled, _ = two_tasks
    assert cancelled in dict(task_id_completer(("completed", "failed", "cancelled"))(""))
    assert cancelled not in dict(task_id_completer(("paused",))(""))


def test_without_a_daemon_completion_is_empty_fast_and_starts_none(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no daemon the callback returns [] at once and starts no daemon."""
    _point_at(home, monkeypatch)
    began = time.monotonic()
    assert complete_task_id("") == []
    assert time.monotonic() - began < 0.5
    assert not home.socket.exists()


def test_the_shell_gets_ids_and_help_through_typers_completion_protocol(
    shared_daemon: Daemon, two_tasks: tuple[str, str]
) -> None:
    """The real `tale`, asked as fish asks it to complete `tale status `, prints each id with
    its help after a tab."""
    cancelled, _ = two_tasks
    done = subprocess.run(
        [sys.executable, "-m", "tale_client.cli"],
        env={
            **shared_daemon.home.env,
            "_TALE_COMPLETE": "complete_fish",
            "_TYPER_COMPLETE_ARGS": "tale status ",
            "_TYPER_COMPLETE_FISH_ACTION": "get-args",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"{cancelled}\tcancelled · Name a tab key" in done.stdout.splitlines()


def test_show_completion_prints_a_bash_script(home: Home) -> None:
    """`tale --show-completion bash` prints a bash script that calls tale back to complete."""
    home.env["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    done = home.tale("--show-completion", "bash")
    assert done.returncode == 0, done.stderr
    assert "complete -o default -F _tale_completion tale" in done.stdout
    assert "_TALE_COMPLETE=complete_bash" in done.stdout


def test_help_offers_installing_completion(home: Home) -> None:
    """`tale --help` lists --install-completion and --show-completion."""
    done = home.tale("--help")
    assert "--install-completion" in done.stdout
    assert "--show-completion" in done.stdout
