"""The main job, end to end: the real CLI, daemon, socket and embedded model."""

from __future__ import annotations

import json

from tests.harness import Daemon, Home


def test_submit_wait_autostarts_daemon_and_prints_answer(home: Home) -> None:
    """With no daemon running, `tale submit --wait` starts one and prints the model's answer."""
    proc = home.tale("submit", "--wait", "Write hello world in Python")
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), "the model's answer is printed on stdout"
        assert "completed" in proc.stderr
        listed = json.loads(home.tale("list", "--json").stdout)
        [task] = listed["tasks"]
        assert task["state"] == "completed"
        assert task["result"].strip() == proc.stdout.strip()
        assert task["tokens"]["completion"] > 0
    finally:
        home.tale("daemon", "stop")


def test_submit_json_prints_only_the_id(daemon: Daemon) -> None:
    """`tale submit --json` prints one JSON document holding the new id."""
    proc = daemon.home.tale("submit", "--json", "Say hi")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"id"}
    assert daemon.call("get_task", id=doc["id"])["text"] == "Say hi"
