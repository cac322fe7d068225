"""The CLI contract: daemon life, status, usage, exit codes."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

from tests.harness import LOCAL_ZONE, Daemon, Home, local_clock


def test_version_prints_the_version(home: Home) -> None:
    """`tale --version` prints `tale X.Y.Z` and starts no daemon."""
    proc = home.tale("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("tale 0.")
    assert not home.socket.exists()


def test_daemon_status_without_a_daemon_exits_3(home: Home) -> None:
    """`tale daemon status` reports a missing daemon with exit 3 and does not start one."""
    proc = home.tale("daemon", "status")
    assert proc.returncode == 3
    assert "no daemon" in proc.stderr
    assert not home.socket.exists()


def test_daemon_start_status_stop_round_trip(home: Home) -> None:
    """start brings the daemon up, status describes it, stop ends it and removes the socket."""
    started = home.tale("daemon", "start")
    try:
        assert started.returncode == 0, started.stderr
        assert "started" in started.stdout
        again = home.tale("daemon", "start")
        assert "already running" in again.stdout
        status = json.loads(home.tale("daemon", "status", "--json").stdout)
        assert status["models"] == [
            {
                "role": role,
                "backend": "llamacpp",
                "model": "smollm2-135m",
                "loaded": True,
                "health": "ok",
            }
            for role in ("ux", "task")
        ]
        assert status["workers"]["limit"] == 2
        assert status["socket"] == str(home.socket)
    finally:
        stopped = home.tale("daemon", "stop")
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert not home.socket.exists()
    assert "not running" in home.tale("daemon", "stop").stdout


def test_autostart_failure_exits_3_with_the_daemons_reason(home: Home) -> None:
    """When the daemon cannot start, the client exits 3 and shows why (from the daemon's log)."""
    home.write_config("[queue]\nworkerz = 2\n")
    proc = home.tale("list")
    assert proc.returncode == 3
    assert "failed to start" in proc.stderr
    assert "queue.workerz" in proc.stderr


def test_status_watch_follows_a_task_to_its_end(daemon: Daemon) -> None:
    """`tale status ID --watch --json` returns once the task is final, with its result."""
    task_id = daemon.call("submit_task", text="Answer yes or no: is 2 > 1?")["id"]
    proc = daemon.home.tale("status", task_id, "--watch", "--json")
    assert proc.returncode == 0, proc.stderr
    task = json.loads(proc.stdout)
    assert task["state"] == "completed"
    assert task["result"]
    assert [t["to"] for t in task["transitions"]] == ["queued", "running", "completed"]


def test_status_json_has_the_contract_fields(daemon: Daemon) -> None:
    """A task in --json has id, state, priority, text, result, timestamps, transitions, tokens."""
    task_id = daemon.call("submit_task", text="Say hi", priority=3)["id"]
    task = json.loads(daemon.home.tale("status", task_id, "--json").stdout)
    required = {
        "id",
        "state",
        "priority",
        "text",
        "result",
        "created_at",
        "updated_at",
        "transitions",
        "tokens",
    }
    assert required <= set(task)
    assert task["priority"] == 3


def test_a_task_is_named_by_a_unique_prefix_of_its_id(daemon: Daemon) -> None:
    """`tale status`, `tale priority` and `tale cancel` take the first digits of an id,
    as `--after` and `tale approve` do; a short or unknown prefix exits 2 saying why."""
    task_id = daemon.call("submit_task", text="Say hi", priority=1)["id"]
    daemon.call("pause_task", id=task_id)  # unfinished, whatever the model's speed
    status = daemon.home.tale("status", task_id[:6], "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == task_id
    assert daemon.home.tale("priority", task_id[:5], "7").returncode == 0
    waiting = daemon.home.tale("approvals", task_id[:4])
    assert (waiting.returncode, waiting.stdout) == (0, "nothing is waiting for you\n")
    cancelled = daemon.home.tale("cancel", task_id[:4], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    task = json.loads(cancelled.stdout)
    assert (task["id"], task["priority"]) == (task_id, 7)
    short = daemon.home.tale("status", task_id[:3])
    assert short.returncode == 2, short.stderr
    assert "or a unique prefix of at least 4" in short.stderr
    unknown = "0000" if not task_id.startswith("0000") else "ffff"
    missing = daemon.home.tale("status", unknown)
    assert missing.returncode == 2, missing.stderr
    assert f"no task id starts with {unknown}" in missing.stderr


def test_status_prints_its_times_in_local_time(daemon: Daemon) -> None:
    """`tale status ID` says when the task was made (date, time, zone) and when each
    transition happened in this machine's local time, as `tale schedules` does; --json
    keeps the daemon's UTC."""
    task_id = daemon.call("submit_task", text="Say hi", priority=1)["id"]
    daemon.call("pause_task", id=task_id)
    daemon.home.env["TZ"] = LOCAL_ZONE
    proc = daemon.home.tale("status", task_id)
    assert proc.returncode == 0, proc.stderr
    task = json.loads(daemon.home.tale("status", task_id, "--json").stdout)
    assert task["created_at"].endswith("Z")
    created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
    made = created.astimezone(ZoneInfo(LOCAL_ZONE))
    assert f"created   {made:%Y-%m-%d %H:%M:%S} IST\n" in proc.stdout
    history = proc.stdout.split("history\n", 1)[1].splitlines()
    for line, t in zip(history, task["transitions"], strict=False):
        shown = local_clock(t["at"], LOCAL_ZONE)
        assert line.startswith(f"  {shown} ") and f"→ {t['to']}" in line, line


def test_status_without_id_summarises(daemon: Daemon) -> None:
    """`tale status` with no id shows tasks by state, workers and models."""
    daemon.call("submit_task", text="Say hi")
    proc = daemon.home.tale("status")
    assert proc.returncode == 0
    assert "workers" in proc.stdout
    assert "llamacpp:smollm2-135m" in proc.stdout


def test_usage_json_totals_match_the_tasks(daemon: Daemon) -> None:
    """`tale usage --json` totals equal the sum of the tasks' token counts."""
    ids = [daemon.call("submit_task", text=f"Say the number {i}")["id"] for i in range(2)]
    tasks = [daemon.wait_for(i) for i in ids]
    usage = json.loads(daemon.home.tale("usage", "--json").stdout)
    assert usage["total"]["calls"] == 2
    assert usage["total"]["prompt_tokens"] == sum(t["tokens"]["prompt"] for t in tasks)
    assert usage["total"]["completion_tokens"] == sum(t["tokens"]["completion"] for t in tasks)
    [by_role] = usage["by_role"]
    assert by_role["role"] == "task"


def test_list_filters_by_state_and_limits(daemon: Daemon) -> None:
    """`tale list --state --limit --json` returns `{"tasks": [...]}`, newest first, filtered."""
    first = daemon.call("submit_task", text="Say one")["id"]
    second = daemon.call("submit_task", text="Say two")["id"]
    daemon.call("cancel_task", id=second)
    listed = json.loads(daemon.home.tale("list", "--json", "--limit", "5").stdout)["tasks"]
    assert [t["id"] for t in listed][:2] == [second, first]
    cancelled = json.loads(daemon.home.tale("list", "--json", "--state", "cancelled").stdout)
    assert [t["id"] for t in cancelled["tasks"]] == [second]


def test_daemon_logs_shows_the_auto_started_daemons_log(home: Home) -> None:
    """After an auto-start, `tale daemon logs` prints the daemon's own log lines."""
    assert home.tale("list").returncode == 0
    try:
        proc = home.tale("daemon", "logs", "--lines", "20")
        assert proc.returncode == 0
        assert "taled ready in" in proc.stdout
    finally:
        home.tale("daemon", "stop")


# -- the text from stdin or a file -----------------------------------------------------


def _text_of(daemon: Daemon, task_id: str) -> str:
    proc = daemon.home.tale("status", task_id, "--json")
    assert proc.returncode == 0, proc.stderr
    text: str = json.loads(proc.stdout)["text"]
    return text


def test_submit_dash_reads_the_task_text_from_stdin(shared_daemon: Daemon) -> None:
    """`tale submit -` queues the text piped to it, not the text "-"."""
    proc = shared_daemon.home.tale("submit", "-", input="Name a colour\nfrom stdin\n")
    assert proc.returncode == 0, proc.stderr
    assert _text_of(shared_daemon, proc.stdout.strip()).strip() == "Name a colour\nfrom stdin"


def test_submit_file_reads_the_task_text_from_the_file(shared_daemon: Daemon) -> None:
    """`tale submit --file PATH` queues the file's UTF-8 text."""
    path = shared_daemon.home.root / "task.txt"
    path.write_text("Name a colour, café\n", encoding="utf-8")
    proc = shared_daemon.home.tale("submit", "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    assert _text_of(shared_daemon, proc.stdout.strip()).strip() == "Name a colour, café"


def test_submit_file_over_the_limit_exits_2_like_the_argument(shared_daemon: Daemon) -> None:
    """A file of 10,001 characters is refused with exit 2, as the same text given inline is."""
    path = shared_daemon.home.root / "long.txt"
    path.write_text("x" * 10_001)
    proc = shared_daemon.home.tale("submit", "--file", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "10000" in proc.stderr.replace(",", "").replace("_", "")


def test_submit_dash_with_empty_stdin_exits_2_submitting_nothing(home: Home) -> None:
    """`tale submit -` with nothing on stdin exits 2 saying so, before any daemon is reached."""
    proc = home.tale("submit", "-", input="")
    assert proc.returncode == 2
    assert "stdin is empty" in proc.stderr
    assert not home.socket.exists()


def test_ask_dash_with_empty_stdin_exits_2_sending_nothing(home: Home) -> None:
    """`tale ask -` reads stdin too: an empty one exits 2 before any daemon is reached."""
    proc = home.tale("ask", "-", input=" \n")
    assert proc.returncode == 2
    assert "stdin is empty" in proc.stderr
    assert not home.socket.exists()


def test_ask_c_with_a_question_instead_of_an_id_says_what_c_takes(home: Home) -> None:
    """`tale ask -c "what did I ask?"` (read as "continue"): exit 2 saying -c takes a
    conversation's id and that `tale ask` continues the latest one, before any daemon."""
    proc = home.tale("ask", "-c", "what did I ask?")
    assert proc.returncode == 2
    assert "--conversation takes a conversation's id (12 hex digits" in proc.stderr
    assert "continues the most recent conversation" in proc.stderr
    assert not home.socket.exists()


def test_submit_missing_file_exits_2_naming_it(home: Home) -> None:
    """`tale submit --file` of a file that does not exist exits 2 naming the path."""
    missing = home.root / "no-such.txt"
    proc = home.tale("submit", "--file", str(missing), input="")
    assert proc.returncode == 2
    assert f"cannot read {missing}: No such file or directory" in proc.stderr
    assert not home.socket.exists()


def test_submit_file_that_is_not_utf8_exits_2_saying_so(home: Home) -> None:
    """A --file in Latin-1 is refused with exit 2 saying it is not UTF-8, nothing submitted."""
    path = home.root / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    proc = home.tale("submit", "--file", str(path), input="")
    assert proc.returncode == 2
    assert f"{path} is not UTF-8 text" in proc.stderr
    assert not home.socket.exists()


def test_submit_with_both_text_and_file_exits_2(home: Home) -> None:
    """Text given twice, as the argument and with --file, is a usage error, not a guess."""
    proc = home.tale("submit", "do this", "--file", "/dev/null", input="")
    assert proc.returncode == 2
    assert "not both" in proc.stderr
    assert not home.socket.exists()
