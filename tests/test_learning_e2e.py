"""The learning engine in a real daemon: persistence, routing by success rates, budgets."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from tests.harness import Daemon, Home, running_daemon
from tests.standins.ollama_server import OllamaStandIn

# At temperature 0 SmolLM2 writes on to max_tokens (48 in tests) on this prompt.
LONG = "Write a very long story about a dragon, at least 2000 words."
TINY_BUDGET = {
    "TALE_LEARNING__PRIOR_TOKENS": json.dumps({"simple": 8, "medium": 8, "complex": 8}),
    "TALE_LEARNING__MIN_BUDGET": "8",
    "TALE_LEARNING__BUDGET_MIN_HISTORY": "0",
    "TALE_LEARNING__MARGIN_SPREADS": "0",
    "TALE_LEARNING__EXPLORE_RATE": "0",
}


def _db(home: Home) -> sqlite3.Connection:
    db = sqlite3.connect(home.data / "tale.db")
    db.row_factory = sqlite3.Row
    return db


def _rows(home: Home, sql: str, *args: Any) -> list[sqlite3.Row]:
    with _db(home) as db:
        return db.execute(sql, args).fetchall()


def _outcome(home: Home, task_id: str, timeout: float = 10) -> sqlite3.Row:
    """The task's outcome row (written just after it reaches its final state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _rows(home, "SELECT * FROM task_outcomes WHERE task_id = ?", task_id)
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no outcome recorded for {task_id}")


def _seed_ux_history(home: Home, successes: int, failures: int) -> None:
    """Finished simple tasks run on ux, written into a stopped daemon's database."""
    now = time.time()
    with _db(home) as db:
        for i in range(successes + failures):
            task_id = f"{i:012x}"
            text = f"Say hello to friend number {i}"
            ok = i < successes
            db.execute(
                "INSERT INTO tasks (id, text, state, priority, result, created_at, updated_at)"
                " VALUES (?, ?, 'completed', 50, 'hello', ?, ?)",
                (task_id, text, now, now),
            )
            db.execute(
                "INSERT INTO task_outcomes (task_id, at, text, features, predicted_level,"
                " confidence, level, predicted_tokens, budget_tokens, completion_tokens,"
                " success, role, backend, model) VALUES"
                " (?, ?, ?, '{}', 'simple', 0.9, 'simple', 20, 25, 12, ?, 'ux',"
                " 'llamacpp', 'smollm2-135m')",
                (task_id, now, text, ok),
            )
            db.execute("INSERT INTO task_memory (task_id, text) VALUES (?, ?)", (task_id, text))


def _route_of_a_new_simple_task(home: Home, successes: int, failures: int) -> set[str]:
    Daemon(home).start().stop()  # creates the database
    _seed_ux_history(home, successes, failures)
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text="Say hello to my friend")["id"]
        assert daemon.wait_for(task_id)["state"] == "completed"
        roles = {
            r["role"]
            for r in _rows(home, "SELECT role FROM model_calls WHERE task_id = ?", task_id)
        }
        assert _outcome(home, task_id)["role"] in roles
        return roles
    finally:
        daemon.stop()


def test_learning_persists_across_a_restart(home: Home) -> None:
    """After a restart, a task like earlier ones is predicted from their recorded outcomes."""
    daemon = Daemon(home).start()
    first = [
        daemon.call("submit_task", text=f"Name three colours of a {thing}")["id"]
        for thing in ("rainbow", "sunset")
    ]
    for task_id in first:
        assert daemon.wait_for(task_id)["state"] == "completed"
        _outcome(home, task_id)
    assert daemon.stop() == 0

    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text="Name three colours of a rainbow, please")["id"]
        task = daemon.wait_for(task_id)
        estimate = task["estimate"]
        assert set(estimate["similar"]) <= set(first) and estimate["similar"]
        past = [r["completion_tokens"] for r in _rows(home, "SELECT * FROM task_outcomes")]
        assert max(past) <= 48  # the test answers' limit: far below the 120-token prior
        assert estimate["predicted_tokens"] < 120
    finally:
        daemon.stop()


def test_simple_tasks_move_to_ux_when_its_success_rate_is_high(home: Home) -> None:
    """With ux's recorded success on simple tasks above the bar, a simple task runs on ux."""
    home.env["TALE_LEARNING__EXPLORE_RATE"] = "0"
    assert _route_of_a_new_simple_task(home, successes=12, failures=0) == {"ux"}


def test_simple_tasks_stay_on_the_task_model_when_ux_fails_them(home: Home) -> None:
    """With ux's recorded success on simple tasks below the bar, a simple task runs on task."""
    home.env["TALE_LEARNING__EXPLORE_RATE"] = "0"
    assert _route_of_a_new_simple_task(home, successes=4, failures=8) == {"task"}


def test_a_task_that_fails_on_ux_escalates_to_the_task_model(home: Home) -> None:
    """A simple task routed to ux whose answer fails its gate is retried on the task model."""
    home.env["TALE_LEARNING__EXPLORE_RATE"] = "0"
    home.env["TALE_GATES__ATTEMPTS"] = "1"
    Daemon(home).start().stop()
    _seed_ux_history(home, successes=12, failures=0)
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call(
            "submit_task", text="Say hello to my friend", criteria=["contains:XYZZY-never"]
        )["id"]
        assert daemon.wait_for(task_id)["state"] == "failed"
        calls = _rows(
            home,
            "SELECT role, step, attempt FROM model_calls WHERE task_id = ? ORDER BY seq",
            task_id,
        )
        assert [(c["role"], c["step"], c["attempt"]) for c in calls] == [
            ("ux", "answer", 1),
            ("task", "answer", 2),
        ]
        outcome = _outcome(home, task_id)
        assert outcome["role"] == "ux"  # counted against ux, which failed it
        assert outcome["success"] == 0 and outcome["retries"] == 1
        assert outcome["level"] == "medium"
    finally:
        daemon.stop()


def test_an_answer_cut_by_its_budget_is_continued_and_counted(home: Home) -> None:
    """An answer cut at a budget below max_tokens is continued to max_tokens and counted."""
    home.env.update(TINY_BUDGET)
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text=LONG)["id"]
        task = daemon.wait_for(task_id)
        assert task["state"] == "completed"
        assert task["estimate"]["budget"] == 8
        calls = _rows(
            home,
            "SELECT step, attempt, completion_tokens FROM model_calls"
            " WHERE task_id = ? ORDER BY seq",
            task_id,
        )
        # One attempt, continued: both calls are its first attempt at the answer.
        assert [(c["step"], c["attempt"]) for c in calls] == [("answer", 1), ("answer", 1)]
        assert calls[0]["completion_tokens"] == 8
        assert calls[1]["completion_tokens"] == 48 - 8
        # Continued, not restarted: the answer's opening is not written a second time.
        opening = task["result"][:20]
        assert task["result"].count(opening) == 1, task["result"]
        outcome = _outcome(home, task_id)
        assert outcome["truncations"] == 1
        assert outcome["completion_tokens"] == 48
        steps = [c["step"] for c in daemon.call("list_checkpoints", id=task_id)["checkpoints"]]
        assert "budget cut" in steps
    finally:
        daemon.stop()


def test_learning_disabled_keeps_the_fixed_budget(home: Home) -> None:
    """With learning.enabled = false the answer gets max_tokens at once, never a budget."""
    home.env.update({**TINY_BUDGET, "TALE_LEARNING__ENABLED": "false"})
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", text=LONG)["id"]
        assert daemon.wait_for(task_id)["state"] == "completed"
        calls = _rows(home, "SELECT completion_tokens FROM model_calls WHERE task_id = ?", task_id)
        assert [c["completion_tokens"] for c in calls] == [48]
        outcome = _outcome(home, task_id)
        assert outcome["truncations"] == 0
        assert outcome["budget_tokens"] is None
    finally:
        daemon.stop()


def _thinking_run(standin: OllamaStandIn) -> tuple[list[dict[str, Any]], sqlite3.Row]:
    """Run one task on the stand-in with thinking wanted at every level."""
    env = {
        "TALE_MODELS__TASK": "ollama:smollm2:135m",
        "TALE_MODELS__OLLAMA__HOST": standin.url,
        "TALE_LEARNING__THINK_FOR": json.dumps(["simple", "medium", "complex"]),
        "TALE_LEARNING__EXPLORE_RATE": "0",
    }
    with running_daemon(env) as daemon:
        task_id = daemon.call("submit_task", text="Write a haiku about rain.")["id"]
        assert daemon.wait_for(task_id)["state"] == "completed"
        outcome = _outcome(daemon.home, task_id)
        daemon.stop()
    chats = [body for _, path, body in standin.requests if path == "/api/chat"]
    return chats, outcome


def test_a_thinking_model_is_asked_to_think_at_the_configured_levels() -> None:
    """On an Ollama model with the thinking capability, think_for levels send think: true."""
    with OllamaStandIn(["smollm2:135m"], thinking=["smollm2:135m"]) as standin:
        chats, outcome = _thinking_run(standin)
    assert chats and all(body.get("think") is True for body in chats)
    assert outcome["thinking"] == 1


def test_a_model_without_thinking_is_never_sent_think() -> None:
    """A model without the capability gets no think field (Ollama would refuse it)."""
    with OllamaStandIn(["smollm2:135m"]) as standin:
        chats, outcome = _thinking_run(standin)
    assert chats and not any("think" in body for body in chats)
    assert outcome["thinking"] == 0


def _seed_tactic_history(home: Home, tactic_column: str, uses: int, worked: bool) -> None:
    """Finished simple tasks on the task model that used a tactic (300 tokens each), in a
    stopped daemon, after ten that passed on their first answer for 100 tokens each (the
    yardstick: a tactic may spend 1,000 tokens per task it carries)."""
    now = time.time()
    with _db(home) as db:
        for i in range(10):
            task_id = f"{i + 100:012x}"
            text = f"Name the colour of fruit number {i}"
            db.execute(
                "INSERT INTO tasks (id, text, state, priority, result, created_at, updated_at)"
                " VALUES (?, ?, 'completed', 50, '', ?, ?)",
                (task_id, text, now, now),
            )
            db.execute(
                "INSERT INTO task_outcomes (task_id, at, text, features, predicted_level,"
                " confidence, level, predicted_tokens, budget_tokens, prompt_tokens,"
                " completion_tokens, success, role, backend, model, planned, retried,"
                " retry_worked, decomposed) VALUES (?, ?, ?, '{}', 'simple', 0.9, 'simple',"
                " 20, 48, 50, 50, 1, 'task', 'llamacpp', 'smollm2-135m', 0, 0, 0, 0)",
                (task_id, now, text),
            )
            db.execute("INSERT INTO task_memory (task_id, text) VALUES (?, ?)", (task_id, text))
        for i in range(uses):
            task_id = f"{i:012x}"
            text = f"Tell me the name of river number {i}"
            db.execute(
                "INSERT INTO tasks (id, text, state, priority, result, created_at, updated_at)"
                " VALUES (?, ?, ?, 50, '', ?, ?)",
                (task_id, text, "completed" if worked else "failed", now, now),
            )
            db.execute(
                "INSERT INTO task_outcomes (task_id, at, text, features, predicted_level,"
                " confidence, level, predicted_tokens, budget_tokens, completion_tokens,"
                f" success, role, backend, model, {tactic_column}, retry_worked) VALUES"
                " (?, ?, ?, '{}', 'simple', 0.9, 'medium', 20, 48, 300, ?, 'task',"
                " 'llamacpp', 'smollm2-135m', 1, ?)",
                (task_id, now, text, worked, worked),
            )
            db.execute("INSERT INTO task_memory (task_id, text) VALUES (?, ?)", (task_id, text))


# A simple task whose gate cannot pass: every recovery stage runs, or is skipped.
HOPELESS = {"text": "Say hello to my friend", "criteria": ["contains:XYZZY-never"]}
DECOMPOSING = {
    "TALE_PLANNER__DECOMPOSE": "true",
    "TALE_PLANNER__DECOMPOSE_LEVELS": '["simple", "medium", "complex"]',
    "TALE_LEARNING__TACTIC_EXPLORE_RATE": "0",
}


def _steps_of_a_hopeless_task(home: Home) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    daemon = Daemon(home).start()
    try:
        task_id = daemon.call("submit_task", **HOPELESS)["id"]
        task = daemon.wait_for(task_id)
        assert task["state"] == "failed"
        steps = [
            (r["step"], r["attempt"])
            for r in _rows(
                home,
                "SELECT m.step, m.attempt FROM model_calls m JOIN tasks t ON t.id = m.task_id"
                " WHERE t.id = ? OR t.parent_id = ? ORDER BY m.seq",
                task_id,
                task_id,
            )
        ]
        return steps, task
    finally:
        daemon.stop()


def test_a_simple_task_is_not_decomposed_by_default(home: Home) -> None:
    """A simple task whose answers fail is not planned into subtasks (a one-part task has
    nothing to split: planner.decompose_levels), and its error says so."""
    home.env.update({"TALE_PLANNER__DECOMPOSE": "true"})
    steps, task = _steps_of_a_hopeless_task(home)
    assert steps == [("answer", 1), ("answer", 2)]
    assert "decompose: not for this level (planner.decompose_levels)" in task["error"]


def test_decomposing_is_skipped_where_it_never_rescued_a_task(home: Home) -> None:
    """After five simple tasks that decomposition failed to rescue on this model, a simple
    task whose answers fail is not planned into subtasks, and its error says why."""
    home.env.update(DECOMPOSING)
    Daemon(home).start().stop()
    _seed_tactic_history(home, "decomposed", uses=5, worked=False)
    steps, task = _steps_of_a_hopeless_task(home)
    assert steps == [("answer", 1), ("answer", 2)]
    assert "not tried, from history: decompose skipped: it carried 0 of 5" in task["error"]
    assert task["estimate"]["skip"] == ["decompose"]


def test_decomposing_is_kept_where_it_rescued_tasks(home: Home) -> None:
    """The control: with decomposition's record on this model good, the same task decomposes."""
    home.env.update(DECOMPOSING)
    Daemon(home).start().stop()
    _seed_tactic_history(home, "decomposed", uses=5, worked=True)
    steps, task = _steps_of_a_hopeless_task(home)
    assert ("plan", 1) in steps
    assert task["estimate"]["skip"] == []


def test_a_retry_is_skipped_where_retries_never_passed(home: Home) -> None:
    """Retries that never passed on this model at this level are not tried again."""
    home.env.update({"TALE_LEARNING__TACTIC_EXPLORE_RATE": "0"})
    Daemon(home).start().stop()
    _seed_tactic_history(home, "retried", uses=6, worked=False)
    steps, task = _steps_of_a_hopeless_task(home)
    assert steps == [("answer", 1)]
    assert "retry skipped: it carried 0 of 6" in task["error"]


def test_tactics_used_are_recorded_with_the_outcome(home: Home) -> None:
    """A task retried and then decomposed has both recorded in its outcome."""
    home.env.update(DECOMPOSING)
    _, task = _steps_of_a_hopeless_task(home)
    outcome = _outcome(home, task["id"])
    assert outcome["retried"] == 1 and outcome["retry_worked"] == 0
    assert outcome["decomposed"] == 1 and outcome["planned"] == 0
    # Their costs: the retry's call, and every call of the plan, subtasks and aggregation.
    calls = _rows(
        home,
        "SELECT m.task_id, m.step, m.attempt, m.prompt_tokens + m.completion_tokens AS n"
        " FROM model_calls m JOIN tasks t ON t.id = m.task_id WHERE t.id = ? OR t.parent_id = ?",
        task["id"],
        task["id"],
    )
    mine = [c for c in calls if c["task_id"] == task["id"]]
    direct = [c for c in mine if c["step"] == "answer"]
    retries = sum(c["n"] for c in direct if c["attempt"] > 1)
    direct = sum(c["n"] for c in direct)
    assert outcome["retry_tokens"] == retries > 0
    assert outcome["plan_tokens"] == sum(c["n"] for c in calls) - direct > 0


def test_a_rescued_task_records_its_first_answers_tokens_apart(home: Home) -> None:
    """answer_tokens is the first direct answer's completion tokens, well under the
    whole task's once retries and decomposition have spent on it."""
    home.env.update(DECOMPOSING)
    _, task = _steps_of_a_hopeless_task(home)
    outcome = _outcome(home, task["id"])
    (first,) = _rows(
        home,
        "SELECT SUM(completion_tokens) AS n FROM model_calls"
        " WHERE task_id = ? AND step = 'answer' AND attempt = 1",
        task["id"],
    )
    assert outcome["answer_tokens"] == first["n"] > 0
    assert outcome["completion_tokens"] > outcome["answer_tokens"]
