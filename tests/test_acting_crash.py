"""Acting tasks under fault injection: kill -9 the daemon at seeded random moments, at
least 20 times, while tasks run commands with side effects.

Each command appends its step's name to a log in the workspace and then takes a while,
so kills land before, during and after tool calls. Afterwards every task has completed,
no step's side effect happened twice (a call cut off by a kill is reported to the model
as interrupted, never run again), the tool ledger has each call once, and the checkpoint
repository passes ``git fsck``.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from typing import Any

from tests.harness import Daemon, Home
from tests.standins.openai_scripted import scripted_server

KILLS = 20
SEED = 20261205
TASKS = 6
STEPS = 5


def _script() -> dict[str, Any]:
    turns: list[dict[str, Any]] = []
    for k in range(1, STEPS + 1):
        command = f"echo s{k} >> calls.log; sleep 0.4"
        turns.append({"tool_calls": [{"name": "run", "arguments": {"command": command}}]})
        turns.append(
            {
                "tool_calls": [
                    {"name": "write_file", "arguments": {"path": f"w{k}.txt", "content": f"{k}\n"}}
                ]
            }
        )
    turns.append({"tool_calls": [{"name": "finish", "arguments": {"result": "all steps"}}]})
    return {"crash": turns}


def test_kill_9_at_random_moments_never_repeats_a_tool_call_and_loses_no_task() -> None:
    rng = random.Random(SEED)
    home = Home()
    home.write_config('[tools.policy]\nrun = "allow"\n\n[tools.agent]\nmax_steps = 20\n')
    with scripted_server(_script()) as server:
        home.env["TALE_MODELS__TASK"] = server.spec
        daemon = Daemon(home).start()
        try:
            ids = [
                daemon.call("submit_task", text=f"[[script:crash]] job {i}", act=True)["id"]
                for i in range(TASKS)
            ]
            kills = 0
            while kills < KILLS:
                time.sleep(rng.uniform(0.2, 1.5))
                daemon.kill9()
                kills += 1
                daemon.start()
                states = {daemon.call("get_task", id=i)["state"] for i in ids}
                if states <= {"completed"} and kills < KILLS:
                    # Everything finished early: more work for the remaining kills.
                    ids.append(
                        daemon.call("submit_task", text="[[script:crash]] more", act=True)["id"]
                    )
            done = [daemon.wait_for(i, timeout=300) for i in ids]
        finally:
            daemon.stop()
    try:
        assert [t["state"] for t in done] == ["completed"] * len(done), [
            (t["id"], t["state"], t.get("error")) for t in done
        ]
        interrupted = 0
        for task in done:
            log = home.data / "workspaces" / task["id"] / "calls.log"
            lines = log.read_text().split() if log.exists() else []
            assert len(lines) == len(set(lines)), f"a command ran twice in {task['id']}: {lines}"
            assert lines == sorted(lines), lines
            calls = [c["call_id"] for c in task["tool_calls"]]
            assert len(calls) == len(set(calls)), calls
            outcomes = [c["outcome"] for c in task["tool_calls"]]
            interrupted += outcomes.count("interrupted")
            # Every proposed step was settled once: run/write pairs and the finish.
            assert len(calls) == 2 * STEPS + 1, outcomes
        # The kills really landed mid-call for some tasks.
        assert interrupted >= 1
        fsck = subprocess.run(
            ["git", "--git-dir", str(home.data / "checkpoints.git"), "fsck", "--strict"],
            capture_output=True,
            text=True,
            env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
        )
        assert fsck.returncode == 0, fsck.stderr
    finally:
        home.cleanup()
