"""The savings benchmark of issue #6: tale as designed vs a naive single-model design.

    python tests/bench/bench_savings.py [--short N] [--out DIR]

Replays ``tests/data/workload.json`` (tasks with done criteria and chat turns in
several conversations, in order) twice on the same GGUF, in one run:

- **tale**: a real taled in a throw-away XDG home with its default settings, except
  what reproducibility needs (temperature 0, a fixed seed, quiet logs). Tasks go
  through ``submit_task`` with their criteria and are waited to a final state;
  chat turns go through ``chat`` in their conversation (the agent may hand off,
  answer from the store, summarise). The token ledger is read afterwards.
- **naive**: one ``llama_cpp.Llama`` on the same GGUF with the daemon's n_ctx and
  batch, temperature 0: every item is the next user turn of ONE running
  conversation with its whole history, answered with the runner's fixed
  ``max_tokens``; when the history no longer fits, the oldest messages are dropped
  (counted).

Both answers to an item with criteria are checked by the same ``taled.tasks.gates.gates.check``.
The report (JSON in ``--out``, a Markdown table on stdout, a PNG) gives task-model
and total tokens with the share saved, gate pass rates, the budget-prediction MAPE
over the replay (from the learning engine's ``task_outcomes``) and on a fixed set of
held-back tasks as the history a fresh engine learnt from grows (the replay's windows
also change with what each stretch of the workload asks), truncation rates and both
wall times. A full run (no ``--short``) also writes ``docs/savings.png`` and
replaces the results block in ``docs/benchmarks.md``. Missed targets are printed
as missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from tale_client.rpc import Connection, RpcError
from taled.db.store import Store
from taled.learning.engine import LearningEngine, Outcome, predictable_tokens
from taled.models.backends.llamacpp import embedded_model_path
from taled.settings import (
    ChatSettings,
    GateSettings,
    LearningSettings,
    LlamaCppSettings,
    ModelsSettings,
    RunnerSettings,
    Settings,
    StoreSettings,
)
from taled.tasks.gates.gates import check, parse_criteria
from tests.bench.bench_core import direct_llama, machine
from tests.harness import TEST_SETTINGS, Daemon, Home

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ROOT / "tests" / "data" / "workload.json"
DOCS = ROOT / "docs"
BEGIN = "<!-- bench_savings:results:begin -->"
END = "<!-- bench_savings:results:end -->"

TARGET_SAVED_PCT = 60.0
TARGET_TRUNCATION_PCT = 5.0
# The held-back curve: every HELD_EVERY-th outcome of the replay is predicted from
# the others' history, at HELD_STEPS + 1 history sizes from none to all of it.
HELD_EVERY = 4
HELD_STEPS = 6
# Fresh task ids change which tasks explore a route or a tactic, and with them a few
# predictions: each history size is measured this many times, the errors pooled.
HELD_REPEATS = 3
FINAL = ("completed", "failed", "cancelled")
SEED = 0

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the workload -------------------------------------------------------------------


def load_workload(path: Path = WORKLOAD, short: int | None = None) -> list[dict[str, Any]]:
    """The workload's items in replay order (the first ``short`` of them if given)."""
    items: list[dict[str, Any]] = json.loads(path.read_text())["items"]
    for item in items:
        if item["kind"] not in ("task", "chat"):
            raise ValueError(f"item {item['id']}: kind must be task or chat")
        parse_criteria(item.get("criteria", []))
    return items[:short] if short else items


def gate(answer: str, criteria: list[str], scratch: Path) -> bool:
    """Whether ``answer`` passes ``criteria``: the daemon's own gate code, in its sandbox."""
    outcome = asyncio.run(
        check(answer, parse_criteria(criteria), GateSettings(), scratch_root=scratch)
    )
    return outcome.passed


# --- tale as designed ---------------------------------------------------------------


def tale_env(max_tokens: int | None, chat_max_tokens: int | None) -> dict[str, str]:
    """What is pinned for the tale run; everything else is the daemon's default."""
    env = {
        "TALE_RUNNER__TEMPERATURE": "0",
        "TALE_CHAT__TEMPERATURE": "0",
        "TALE_MODELS__LLAMACPP__SEED": str(SEED),
        "TALE_DAEMON__LOG_LEVEL": "warning",
    }
    if max_tokens is not None:
        env["TALE_RUNNER__MAX_TOKENS"] = str(max_tokens)
    if chat_max_tokens is not None:
        env["TALE_CHAT__MAX_TOKENS"] = str(chat_max_tokens)
    return env


def _wait(conn: Connection, task_id: str, timeout: float) -> tuple[dict[str, Any], bool]:
    """The task once final; on timeout it is cancelled (and reported as timed out)."""
    deadline = time.monotonic() + timeout
    while True:
        task = conn.call_tool("get_task", {"id": task_id})
        if task["state"] in FINAL:
            return task, False
        if time.monotonic() > deadline:
            with contextlib.suppress(RpcError):  # it may have finished meanwhile
                conn.call_tool("cancel_task", {"id": task_id})
            end = time.monotonic() + 60
            while task["state"] not in FINAL and time.monotonic() < end:
                time.sleep(0.2)
                task = conn.call_tool("get_task", {"id": task_id})
            return task, True
        time.sleep(0.2)


def _cut(task: dict[str, Any]) -> bool:
    """Whether the task's final answer was cut at its token budget."""
    reasons = [t["reason"] for t in task.get("transitions", []) if t["to"] == "completed"]
    return any("answer cut at max_tokens" in r for r in reasons)


def run_tale(
    items: list[dict[str, Any]],
    env: dict[str, str],
    timeout: float,
    scratch: Path,
    out: Path,
    log: Log = _log,
) -> dict[str, Any]:
    """Replay the workload through a real daemon; per-item records plus the ledger."""
    home = Home(env)
    for key in TEST_SETTINGS:  # the test suite's short answers are not tale's defaults
        if key not in env:
            home.env.pop(key, None)
    daemon = Daemon(home)
    records: list[dict[str, Any]] = []
    conversations: dict[str, str] = {}
    started = time.perf_counter()
    try:
        daemon.start()
        ready = time.perf_counter() - started
        with Connection(home.socket, timeout=max(timeout, 600)) as conn:
            conn.initialize("bench_savings")
            for i, item in enumerate(items):
                t0 = time.perf_counter()
                rec: dict[str, Any] = {"id": item["id"], "kind": item["kind"], "at": time.time()}
                task: dict[str, Any] | None = None
                timed_out = False
                if item["kind"] == "task":
                    args: dict[str, Any] = {"text": item["text"]}
                    if item.get("criteria"):
                        args["criteria"] = item["criteria"]
                    task_id = conn.call_tool("submit_task", args)["id"]
                    task, timed_out = _wait(conn, task_id, timeout)
                    answer = task["result"] or ""
                else:
                    name = item["conversation"]
                    args = {"text": item["text"]}
                    if name in conversations:
                        args["conversation"] = conversations[name]
                    else:
                        args["new"] = True
                    try:
                        reply = conn.call_tool("chat", args)
                    except RpcError as exc:  # e.g. the reply's timeout on a busy machine
                        reply = {"text": "", "handed_off": False, "error": str(exc)}
                        rec["error"] = str(exc)
                    conversations.setdefault(name, reply.get("conversation", ""))
                    if not conversations[name]:
                        del conversations[name]
                    answer = reply["text"]
                    rec["intent"] = reply.get("intent", {}).get("kind")
                    if reply["handed_off"] and reply["task"]:
                        task, timed_out = _wait(conn, reply["task"]["id"], timeout)
                        rec["handed_off"] = True
                if task is not None:
                    rec.update(
                        task_id=task["id"],
                        state=task["state"],
                        cut=_cut(task),
                        task_tokens=task["tokens"]["total"],
                    )
                rec["timed_out"] = timed_out
                if item.get("criteria"):
                    rec["passed"] = bool(
                        task is not None
                        and task["state"] == "completed"
                        and gate(answer, item["criteria"], scratch)
                    )
                rec["seconds"] = time.perf_counter() - t0
                rec["answer"] = answer[:2000]
                records.append(rec)
                _progress(log, "tale", i, len(items), item, rec, started)
        daemon.stop()
    finally:
        daemon.kill_if_running()
        wall = time.perf_counter() - started
        db = home.data / "tale.db"
        copy = out / "tale.db"
        if db.exists():
            _backup(db, copy)
        daemon_log = daemon.log_text()
        home.cleanup()
    (out / "taled.log").write_text(daemon_log)
    ledger = read_ledger(copy)
    _attribute(records, ledger["calls"])
    return {
        "wall_seconds": wall,
        "ready_seconds": ready,
        "items": records,
        "ledger": {k: v for k, v in ledger.items() if k != "calls"},
        "db": str(copy),
    }


def _backup(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def read_ledger(db: Path) -> dict[str, Any]:
    """Token sums by role and model, every call (time, tokens), and the task outcomes."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        by_role: dict[str, dict[str, int]] = {}
        for r in conn.execute(
            "SELECT role, COUNT(*) AS calls, SUM(prompt_tokens) AS p, "
            "SUM(completion_tokens) AS c, SUM(saved_tokens) AS s FROM model_calls GROUP BY role"
        ):
            by_role[r["role"]] = _sums(r["calls"], r["p"], r["c"], saved=r["s"])
        # What the task model did for conversations (chat's summaries, made there since
        # they moved off the UX model): chat work, outside the comparison on both sides,
        # so not in tale's task-model tokens for its tasks (reported beside them).
        chat_on_task = conn.execute(
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM model_calls "
            "WHERE role = 'task' AND conversation_id IS NOT NULL AND task_id IS NULL"
        ).fetchone()
        by_model = {
            r["model"]: _sums(r["calls"], r["p"], r["c"])
            for r in conn.execute(
                "SELECT model, COUNT(*) AS calls, SUM(prompt_tokens) AS p, "
                "SUM(completion_tokens) AS c FROM model_calls GROUP BY model"
            )
        }
        calls = [
            (r["at"], r["role"], r["prompt_tokens"] + r["completion_tokens"])
            for r in conn.execute(
                "SELECT at, role, prompt_tokens, completion_tokens FROM model_calls ORDER BY at"
            )
        ]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        outcomes = (
            [
                dict(r)
                for r in conn.execute(
                    "SELECT task_id, at, predicted_level, level, predicted_tokens, budget_tokens,"
                    " completion_tokens, answer_tokens, truncations, retries, gate_passed,"
                    " success, role"
                    " FROM task_outcomes ORDER BY at"
                )
            ]
            if "task_outcomes" in tables
            else []
        )
    conn.close()
    total = _sums(
        sum(v["calls"] for v in by_role.values()),
        sum(v["prompt"] for v in by_role.values()),
        sum(v["completion"] for v in by_role.values()),
        saved=sum(v.get("saved", 0) for v in by_role.values()),
    )
    return {
        "by_role": by_role,
        "chat_on_task_model": _sums(*chat_on_task),
        "by_model": by_model,
        "total": total,
        "outcomes": outcomes,
        "calls": calls,
    }


# Where tale's tokens go, by what each call was for.
STEP_KINDS = (
    "answer",  # a task's first direct answer
    "retry",  # another attempt after a failed gate, same model: its base prompt
    "gate feedback",  # the retry prompt's share that quotes the failed answer and the gate
    "fallback",  # attempts on another model (the fallback, or ux escalated to task)
    "plan",  # planning a complex task up front, or after its answers failed
    "subtasks",  # the planned subtasks' own calls (answers, retries)
    "aggregate",  # joining the subtasks' results
    "chat",  # chat replies
    "chat side calls",  # intent votes, summaries, prefills
)


def breakdown(db: Path) -> dict[str, Any]:
    """Every call's tokens by step kind, and each top-level task's tokens with whether it
    passed on its first answer (the happy path)."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        calls = conn.execute(
            "SELECT c.task_id, c.role, c.route, c.step, c.attempt, c.prompt_tokens, "
            "c.completion_tokens, c.success, t.parent_id, t.state FROM model_calls c "
            "LEFT JOIN tasks t ON t.id = c.task_id ORDER BY c.seq"
        ).fetchall()
        parents = {r["id"]: r["parent_id"] for r in conn.execute("SELECT id, parent_id FROM tasks")}
    conn.close()

    def top(task_id: str) -> str:
        while parents.get(task_id):
            task_id = parents[task_id]
        return task_id

    kinds = {k: _sums(0, 0, 0) for k in STEP_KINDS}
    per_task: dict[str, dict[str, Any]] = {}
    first_prompt: dict[tuple[str, str], int] = {}
    first_role: dict[tuple[str, str], str] = {}

    def add(kind: str, prompt: int, completion: int, calls: int = 1) -> None:
        k = kinds[kind]
        k["calls"] += calls
        k["prompt"] += prompt
        k["completion"] += completion
        k["total"] += prompt + completion

    for c in calls:
        p, comp = int(c["prompt_tokens"]), int(c["completion_tokens"])
        if c["task_id"] is None:
            add("chat" if c["step"] is None else "chat side calls", p, comp)
            continue
        root = top(c["task_id"])
        task = per_task.setdefault(root, {"tokens": 0, "calls": 0, "first_answer_only": True})
        task["tokens"] += p + comp
        task["calls"] += 1
        step, attempt = c["step"] or "answer", int(c["attempt"] or 1)
        if c["parent_id"] is not None:
            kind = "subtasks"
        elif step in ("plan", "aggregate"):
            kind = step
        elif attempt == 1:
            kind = "answer"
            first_prompt[(c["task_id"], step)] = p
            first_role[(c["task_id"], step)] = c["role"]
        elif c["route"] != "role" or c["role"] != first_role.get((c["task_id"], step), "task"):
            kind = "fallback"
        else:
            kind = "retry"
        if kind != "answer":
            task["first_answer_only"] = False
        if kind == "retry":
            base = min(p, first_prompt.get((c["task_id"], step), p))
            add("retry", base, comp)
            add("gate feedback", p - base, 0, calls=0)
        else:
            add(kind, p, comp)
    return {"by_kind": kinds, "tasks": per_task}


def _sums(
    calls: int, prompt: int | None, completion: int | None, **extra: int | None
) -> dict[str, int]:
    p, c = int(prompt or 0), int(completion or 0)
    out = {"calls": int(calls), "prompt": p, "completion": c, "total": p + c}
    out.update({k: int(v or 0) for k, v in extra.items()})
    return out


def _attribute(records: list[dict[str, Any]], calls: list[tuple[float, str, int]]) -> None:
    """Give each item the tokens of every call made while it was being replayed.

    Items run one after another, so a call belongs to the last item that started
    before it (its own calls, its subtasks, a summary its chat turn caused).
    """
    starts = [r["at"] for r in records]
    for r in records:
        r["tokens"] = 0
        r["task_model_tokens"] = 0
    j = 0
    for at, role, tokens in calls:
        while j + 1 < len(starts) and starts[j + 1] <= at:
            j += 1
        if records:
            records[j]["tokens"] += tokens
            if role == "task":
                records[j]["task_model_tokens"] += tokens


# --- the naive single-model baseline ------------------------------------------------


def run_naive(
    items: list[dict[str, Any]], max_tokens: int, scratch: Path, log: Log = _log
) -> dict[str, Any]:
    """Every item to the task model, as the next turn of one conversation with all history."""
    s = LlamaCppSettings()
    started = time.perf_counter()
    llm = direct_llama(seed=SEED)
    system = {"role": "system", "content": RunnerSettings().system_prompt}
    budget = s.n_ctx - max_tokens
    history: list[dict[str, str]] = []
    sizes: list[int] = []  # tokens of each history message, with its template overhead

    def size(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False, special=True)) + 6

    system_size = size(system["content"]) + 1
    records: list[dict[str, Any]] = []
    dropped_total = 0
    try:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            history.append({"role": "user", "content": item["text"]})
            sizes.append(size(item["text"]))
            dropped = 0
            while True:
                while len(history) > 1 and system_size + sum(sizes) > budget:
                    del history[0], sizes[0]
                    dropped += 1
                try:
                    done = cast(
                        "dict[str, Any]",
                        llm.create_chat_completion(
                            cast(Any, [system, *history]),
                            max_tokens=max_tokens,
                            temperature=0,
                            seed=SEED,
                        ),
                    )
                    break
                except ValueError:  # our count was short of the template's: drop one more
                    if len(history) <= 1:
                        raise
                    del history[0], sizes[0]
                    dropped += 1
            choice = done["choices"][0]
            answer = choice["message"]["content"] or ""
            usage = done["usage"]
            history.append({"role": "assistant", "content": answer})
            sizes.append(size(answer))
            dropped_total += dropped
            rec: dict[str, Any] = {
                "id": item["id"],
                "kind": item["kind"],
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "task_model_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "cut": choice["finish_reason"] == "length",
                "dropped_messages": dropped,
            }
            if item.get("criteria"):
                rec["passed"] = gate(answer, item["criteria"], scratch)
            rec["seconds"] = time.perf_counter() - t0
            rec["answer"] = answer[:2000]
            records.append(rec)
            _progress(log, "naive", i, len(items), item, rec, started)
    finally:
        llm.close()
    prompt = sum(r["prompt_tokens"] for r in records)
    completion = sum(r["completion_tokens"] for r in records)
    sums = _sums(len(records), prompt, completion)
    return {
        "wall_seconds": time.perf_counter() - started,
        "items": records,
        "ledger": {
            "by_role": {"task": sums},
            "by_model": {ModelsSettings().task: sums},
            "total": sums,
        },
        "context_truncated_turns": sum(1 for r in records if r["dropped_messages"]),
        "dropped_messages": dropped_total,
    }


# --- the stateless baselines: what a sensible user runs without tale ----------------

# max_tokens a careful user would try when right-sizing the stateless calls.
RIGHT_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def run_stateless(
    items: list[dict[str, Any]],
    max_tokens: int,
    scratch: Path,
    log: Log = _log,
    label: str = "stateless",
) -> dict[str, Any]:
    """Every task a fresh call to the same GGUF (the runner's system prompt and the task's
    text, ``max_tokens``, temperature 0, seed 0); every chat turn the chat system prompt
    and its own conversation's history only, at the chat reply's max_tokens."""
    started = time.perf_counter()
    llm = direct_llama(seed=SEED)
    task_system = {"role": "system", "content": RunnerSettings().system_prompt}
    chat = ChatSettings()
    chat_system = {"role": "system", "content": chat.system_prompt}
    histories: dict[str, list[dict[str, str]]] = {}
    records: list[dict[str, Any]] = []
    try:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            if item["kind"] == "task":
                messages = [task_system, {"role": "user", "content": item["text"]}]
                limit = max_tokens
            else:
                history = histories.setdefault(item["conversation"], [])
                history.append({"role": "user", "content": item["text"]})
                # The oldest exchanges go when the history no longer fits (counted).
                messages = [chat_system, *history]
                limit = chat.max_tokens
            done = cast(
                "dict[str, Any]",
                llm.create_chat_completion(
                    cast(Any, messages), max_tokens=limit, temperature=0, seed=SEED
                ),
            )
            choice = done["choices"][0]
            answer = choice["message"]["content"] or ""
            usage = done["usage"]
            if item["kind"] == "chat":
                histories[item["conversation"]].append({"role": "assistant", "content": answer})
            rec: dict[str, Any] = {
                "id": item["id"],
                "kind": item["kind"],
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "task_model_tokens": usage["prompt_tokens"] + usage["completion_tokens"]
                if item["kind"] == "task"
                else 0,
                "cut": choice["finish_reason"] == "length",
            }
            if item.get("criteria"):
                rec["passed"] = gate(answer, item["criteria"], scratch)
            rec["seconds"] = time.perf_counter() - t0
            rec["answer"] = answer[:4000]
            records.append(rec)
            _progress(log, label, i, len(items), item, rec, started)
    finally:
        llm.close()
    return _baseline(records, time.perf_counter() - started, max_tokens=max_tokens)


def _baseline(records: list[dict[str, Any]], wall: float, **extra: Any) -> dict[str, Any]:
    tasks = [r for r in records if r["kind"] == "task"]
    task_sums = _sums(
        len(tasks),
        sum(r["prompt_tokens"] for r in tasks),
        sum(r["completion_tokens"] for r in tasks),
    )
    total = _sums(
        len(records),
        sum(r["prompt_tokens"] for r in records),
        sum(r["completion_tokens"] for r in records),
    )
    return {
        "wall_seconds": wall,
        "items": records,
        "ledger": {"by_role": {"task": task_sums}, "total": total},
        **extra,
    }


def right_size(
    items: list[dict[str, Any]], stateless: dict[str, Any], scratch: Path
) -> dict[str, Any]:
    """The max_tokens a careful user would pick on the workload's first half of tasks:
    the smallest that passes as many of them as the full limit did.

    Greedy decoding makes an answer at max_tokens k the first k tokens of the one at the
    full limit, so each candidate is judged on the stateless run's answers cut to k
    tokens; the chosen value is then run for real on the whole workload.
    """
    tasks = [(i, r) for i, r in zip(items, stateless["items"], strict=True) if i["kind"] == "task"]
    first_half = tasks[: len(tasks) // 2]
    llm = direct_llama(seed=SEED, vocab_only=True)
    try:

        def passes(k: int) -> int:
            n = 0
            for item, rec in first_half:
                if not item.get("criteria"):
                    continue
                ids = llm.tokenize(rec["answer"].encode(), add_bos=False, special=True)
                answer = (
                    llm.detokenize(ids[:k]).decode("utf-8", "ignore")
                    if len(ids) > k
                    else rec["answer"]
                )
                n += gate(answer, item["criteria"], scratch)
            return n

        full = sum(1 for item, rec in first_half if rec.get("passed"))
        tried = {k: passes(k) for k in RIGHT_SIZES if k < stateless["max_tokens"]}
    finally:
        llm.close()
    chosen = min((k for k, n in tried.items() if n >= full), default=stateless["max_tokens"])
    return {"chosen": chosen, "first_half_tasks": len(first_half), "full": full, "tried": tried}


def _progress(
    log: Log,
    run: str,
    i: int,
    n: int,
    item: dict[str, Any],
    rec: dict[str, Any],
    started: float,
) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / (i + 1) * (n - i - 1)
    passed = rec.get("passed")
    verdict = "-" if passed is None else "pass" if passed else "FAIL"
    state = rec.get("state", "")
    log(
        f"[{run} {i + 1}/{n}] {item['id']:<6} {item['kind']:<4} {state:<9} gate={verdict:<4} "
        f"{rec['seconds']:5.1f}s  elapsed {elapsed / 60:5.1f} min, eta {eta / 60:5.1f} min"
    )


# --- the report ---------------------------------------------------------------------


def _pct_saved(ours: int, theirs: int) -> float | None:
    return None if theirs <= 0 else (1 - ours / theirs) * 100


def _rate(records: list[dict[str, Any]], key: str) -> tuple[int, int, float | None]:
    judged = [r for r in records if key in r]
    hits = sum(1 for r in judged if r[key])
    return hits, len(judged), (hits / len(judged) if judged else None)


def _ape(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual * 100


def _actual(outcome: dict[str, Any]) -> int:
    """What a prediction is held to (taled.learning.engine.predictable_tokens)."""
    return predictable_tokens(outcome.get("answer_tokens"), outcome.get("completion_tokens") or 0)


def read_outcomes(db: Path) -> list[Outcome]:
    """The replay's task outcomes, in the order they finished, as the engine stores them."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        stored = {r[1] for r in conn.execute("PRAGMA table_info(task_outcomes)")}
        names = [f.name for f in fields(Outcome) if f.name in stored]
        rows = conn.execute(f"SELECT {', '.join(names)} FROM task_outcomes ORDER BY at").fetchall()
    conn.close()
    return [Outcome(**dict(r)) for r in rows]


async def _predict_held(
    history: list[Outcome], held: list[Outcome], settings: LearningSettings, scratch: Path
) -> list[float]:
    """Absolute % errors of a fresh engine that learnt ``history``, on ``held``."""
    store = Store(scratch, StoreSettings(synchronous="normal"), write_batch_max=256)
    await store.open()
    try:
        engine = LearningEngine(
            store, settings, ModelsSettings(), ceiling=RunnerSettings().max_tokens
        )
        await engine.start()
        for outcome in history:
            task = await store.submit(outcome.text, 50)
            await engine.ingest(replace(outcome, task_id=task.id))
        errors = []
        for outcome in held:
            assessment = await engine.assess(await store.submit(outcome.text, 50))
            actual = predictable_tokens(outcome.answer_tokens, outcome.completion_tokens)
            errors.append(_ape(assessment.predicted_tokens, actual))
        await engine.stop()
    finally:
        await store.close()
    return errors


def held_back_curve(
    db: Path,
    settings: LearningSettings,
    every: int = HELD_EVERY,
    steps: int = HELD_STEPS,
    repeats: int = HELD_REPEATS,
) -> dict[str, Any]:
    """Budget error on a fixed held-back set as the engine's history grows.

    The replay's windows mix learning with what each stretch of the workload asks; this
    holds the tasks fixed: every ``every``-th outcome is predicted by a fresh engine
    (the bench's settings) that has learnt the first n of the other outcomes, in replay
    order, for n from none to all of them.
    """
    outcomes = [
        o for o in read_outcomes(db) if predictable_tokens(o.answer_tokens, o.completion_tokens) > 0
    ]
    held = [o for i, o in enumerate(outcomes) if i % every == every - 1]
    history = [o for i, o in enumerate(outcomes) if i % every != every - 1]
    if not held or not history:
        return {"points": [], "held": len(held), "falls": None, "note": "too few outcomes"}
    sizes = sorted({round(len(history) * k / steps) for k in range(steps + 1)})
    points = []
    with tempfile.TemporaryDirectory(prefix="bench_savings-held-") as tmp:
        for n in sizes:
            errors = [
                e
                for r in range(repeats)
                for e in asyncio.run(
                    _predict_held(history[:n], held, settings, Path(tmp) / f"h{n}-{r}.db")
                )
            ]
            mape = sum(errors) / len(errors)
            points.append({"history": n, "mape": mape, "median": statistics.median(errors)})
    return {
        "held": len(held),
        "every": every,
        "repeats": repeats,
        "points": points,
        "falls": points[-1]["mape"] < points[0]["mape"],
        "note": "",
    }


def mape_curve(outcomes: list[dict[str, Any]], window: int | None) -> dict[str, Any]:
    """Budget prediction error over the replay: MAPE of consecutive windows of outcomes."""
    rows = [o for o in outcomes if o.get("predicted_tokens") is not None and _actual(o) > 0]
    if not rows:
        return {
            "outcomes": len(outcomes),
            "predicted": 0,
            "window": window,
            "points": [],
            "first": None,
            "last": None,
            "falls": None,
            "note": "no predictions: task_outcomes is empty or has no predicted_tokens",
        }
    w = window or max(3, len(rows) // 8)
    errors = [_ape(o["predicted_tokens"], _actual(o)) for o in rows]
    points: list[dict[str, Any]] = []
    for start in range(0, len(errors), w):
        chunk = errors[start : start + w]
        if len(chunk) < max(2, w // 2) and points:
            points[-1]["mape"] = (points[-1]["mape"] * points[-1]["n"] + sum(chunk)) / (
                points[-1]["n"] + len(chunk)
            )
            points[-1]["n"] += len(chunk)
            points[-1]["upto"] = start + len(chunk)
            points[-1]["median"] = statistics.median(errors[points[-1]["upto"] - points[-1]["n"] :])
            continue
        points.append(
            {
                "upto": start + len(chunk),
                "n": len(chunk),
                "mape": sum(chunk) / len(chunk),
                "median": statistics.median(chunk),
            }
        )
    first, last = points[0]["mape"], points[-1]["mape"]
    return {
        "outcomes": len(outcomes),
        "predicted": len(rows),
        "window": w,
        "points": points,
        "errors": errors,
        "first": first,
        "last": last,
        "falls": (last < first) if len(points) > 1 else None,
        "note": "" if len(points) > 1 else "one window only: too few outcomes for a curve",
    }


def _task_model_for_tasks(ledger: dict[str, Any]) -> dict[str, int]:
    """The task model's tokens, less what it did for conversations (a ledger read before
    that was counted has none)."""
    task = ledger["by_role"].get("task", _sums(0, 0, 0))
    chat = ledger.get("chat_on_task_model", _sums(0, 0, 0))
    return _sums(
        task["calls"] - chat["calls"],
        task["prompt"] - chat["prompt"],
        task["completion"] - chat["completion"],
    )


def summarise(
    items: list[dict[str, Any]],
    tale: dict[str, Any],
    naive: dict[str, Any],
    meta: dict[str, Any],
    window: int | None,
) -> dict[str, Any]:
    """The report: both runs side by side, savings, learning curve and verdicts."""
    t_tok, n_tok = _task_model_for_tasks(tale["ledger"]), naive["ledger"]["total"]
    outcomes = tale["ledger"].get("outcomes", [])
    t_pass = _rate(tale["items"], "passed")
    n_pass = _rate(naive["items"], "passed")
    t_tasks = [r for r in tale["items"] if "state" in r]
    t_cut = _rate(t_tasks, "cut")
    n_cut = _rate(naive["items"], "cut")
    retried = {o["task_id"] for o in outcomes if (o.get("truncations") or 0) > 0}
    truncated = sum(1 for r in t_tasks if r["cut"] or r["task_id"] in retried)
    curve = mape_curve(outcomes, window)
    saved_task = _pct_saved(t_tok["total"], n_tok["total"])
    saved_total = _pct_saved(tale["ledger"]["total"]["total"], n_tok["total"])
    trunc_pct = truncated / len(t_tasks) * 100 if t_tasks else None
    verdicts = {
        "task_tokens_saved": _verdict(saved_task is not None and saved_task >= TARGET_SAVED_PCT),
        "total_tokens_saved": _verdict(saved_total is not None and saved_total >= TARGET_SAVED_PCT),
        "pass_rate_not_lower": _verdict(
            t_pass[2] is not None and n_pass[2] is not None and t_pass[2] >= n_pass[2]
        ),
        "mape_falls": "not measured" if curve["falls"] is None else _verdict(curve["falls"]),
        "truncation_below_5pct": "not measured"
        if trunc_pct is None
        else _verdict(trunc_pct < TARGET_TRUNCATION_PCT),
    }
    return {
        **meta,
        "items": len(items),
        "tasks": sum(1 for i in items if i["kind"] == "task"),
        "chats": sum(1 for i in items if i["kind"] == "chat"),
        "gated": sum(1 for i in items if i.get("criteria")),
        "tale": {
            "wall_seconds": tale["wall_seconds"],
            "ready_seconds": tale["ready_seconds"],
            "tokens": tale["ledger"],
            "task_model_tokens": t_tok["total"],
            "total_tokens": tale["ledger"]["total"]["total"],
            "gate_passed": t_pass[0],
            "gate_judged": t_pass[1],
            "pass_rate": t_pass[2],
            "completed": sum(1 for r in t_tasks if r["state"] == "completed"),
            "task_runs": len(t_tasks),
            "handoffs": sum(1 for r in tale["items"] if r.get("handed_off")),
            "timeouts": sum(1 for r in tale["items"] if r.get("timed_out")),
            "errors": sum(1 for r in tale["items"] if r.get("error")),
            "final_answer_cut": t_cut[0],
            "truncated_tasks": truncated,
            "truncation_retried_tasks": len(retried),
            "truncation_pct": trunc_pct,
            "truncation_source": "tasks cut at their budget: final answer or a retried attempt"
            if outcomes
            else "final answers cut (no task_outcomes)",
            "items_detail": tale["items"],
            "db": tale["db"],
        },
        "naive": {
            "wall_seconds": naive["wall_seconds"],
            "tokens": naive["ledger"],
            "task_model_tokens": n_tok["total"],
            "total_tokens": n_tok["total"],
            "gate_passed": n_pass[0],
            "gate_judged": n_pass[1],
            "pass_rate": n_pass[2],
            "final_answer_cut": n_cut[0],
            "truncation_pct": n_cut[2] * 100 if n_cut[2] is not None else None,
            "context_truncated_turns": naive["context_truncated_turns"],
            "dropped_messages": naive["dropped_messages"],
            "items_detail": naive["items"],
        },
        "savings": {"task_tokens_pct": saved_task, "total_tokens_pct": saved_total},
        "mape": curve,
        "verdicts": verdicts,
    }


# The goal of issue #19: more passes than the stateless baseline for at most this many
# times its task-model tokens; and a task that passes on its first answer costs at most
# this much over its stateless call.
GOAL_TOKEN_RATIO = 1.5
HAPPY_PATH_RATIO = 1.10


def _run_numbers(run: dict[str, Any]) -> dict[str, Any]:
    passed, judged, _ = _rate(run["items"], "passed")
    task_tokens = _task_model_for_tasks(run["ledger"])["total"]
    return {
        "task_model_tokens": task_tokens,
        "total_tokens": run["ledger"]["total"]["total"],
        "passed": passed,
        "judged": judged,
        "pass_rate": passed / judged if judged else None,
        "task_tokens_per_pass": task_tokens / passed if passed else None,
        "wall_seconds": run["wall_seconds"],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def compare(
    items: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    stateless: dict[str, Any],
    sized: dict[str, Any],
    sizing: dict[str, Any],
) -> dict[str, Any]:
    """tale's runs against the stateless baselines: tokens, passes, the goal, the happy
    path and where tale's tokens went (by step kind, per run)."""
    base = _run_numbers(stateless)
    right = _run_numbers(sized)
    numbers = [_run_numbers(r) for r in runs]
    ratios = [n["task_model_tokens"] / base["task_model_tokens"] for n in numbers]
    goal = [
        n["pass_rate"] is not None
        and base["pass_rate"] is not None
        and n["pass_rate"] > base["pass_rate"]
        and ratio <= GOAL_TOKEN_RATIO
        for n, ratio in zip(numbers, ratios, strict=True)
    ]
    by_id = {r["id"]: r for r in stateless["items"]}
    happy = []
    for run in runs:
        steps = breakdown(Path(run["db"]))
        tale_tokens = stateless_tokens = n = 0
        for rec in run["items"]:
            task = steps["tasks"].get(rec.get("task_id", ""))
            if rec["kind"] != "task" or task is None or not rec.get("passed"):
                continue
            if task["first_answer_only"] and task["calls"] == 1:
                n += 1
                tale_tokens += task["tokens"]
                stateless_tokens += by_id[rec["id"]]["tokens"]
        happy.append(
            {
                "tasks": n,
                "tale_tokens": tale_tokens,
                "stateless_tokens": stateless_tokens,
                "ratio": tale_tokens / stateless_tokens if stateless_tokens else None,
                "by_kind": steps["by_kind"],
            }
        )
    return {
        "stateless": {**base, "max_tokens": stateless["max_tokens"]},
        "right_sized": {**right, "max_tokens": sized["max_tokens"], "sizing": sizing},
        "runs": numbers,
        "spread": {
            key: _spread([float(n[key]) for n in numbers if n[key] is not None])
            for key in ("task_model_tokens", "total_tokens", "pass_rate", "task_tokens_per_pass")
            if any(n[key] is not None for n in numbers)
        },
        "token_ratio": _spread(ratios),
        "goal_met_runs": sum(goal),
        "happy_path": happy,
        "verdicts": {
            "goal": _verdict(statistics.median([float(g) for g in goal]) >= 0.5),
            "happy_path": _verdict(
                all(h["ratio"] is not None and h["ratio"] <= HAPPY_PATH_RATIO for h in happy)
            ),
        },
    }


def compare_markdown(c: dict[str, Any], runs: int) -> str:
    """The comparison with the stateless baselines, as Markdown."""
    st, rs = c["stateless"], c["right_sized"]

    def row(name: str, n: dict[str, Any]) -> str:
        per = n["task_tokens_per_pass"]
        return (
            f"| {name} | {n['task_model_tokens']:,} | {n['total_tokens']:,} "
            f"| {rate(n['pass_rate'])} ({n['passed']}/{n['judged']}) "
            f"| {'—' if per is None else f'{per:,.0f}'} |"
        )

    def spread(key: str, fmt: str) -> str:
        sp = c["spread"].get(key)
        if sp is None:
            return "—"
        return " / ".join(fmt.format(sp[k]) for k in ("min", "median", "max"))

    lines = [
        "| run | task-model tokens | all tokens | gate pass rate | task-model tokens per pass |",
        "| --- | --- | --- | --- | --- |",
        row(f"stateless single calls (max_tokens {st['max_tokens']})", st),
        row(
            f"stateless, right-sized (max_tokens {rs['max_tokens']}, chosen on the first "
            f"{rs['sizing']['first_half_tasks']} tasks)",
            rs,
        ),
    ]
    lines += [row(f"tale, run {i + 1}", n) for i, n in enumerate(c["runs"])]
    ratio = c["token_ratio"]
    lines += [
        "",
        f"tale over {runs} runs (min / median / max): task-model tokens "
        f"{spread('task_model_tokens', '{:,.0f}')}, pass rate "
        f"{spread('pass_rate', '{:.1%}')}, task-model tokens per pass "
        f"{spread('task_tokens_per_pass', '{:,.0f}')}; "
        f"{ratio['min']:.2f}x / {ratio['median']:.2f}x / {ratio['max']:.2f}x the stateless "
        f"baseline's task-model tokens. Goal (pass rate above stateless at ≤ "
        f"{GOAL_TOKEN_RATIO}x its task-model tokens): met in {c['goal_met_runs']} of {runs} "
        f"runs, **{c['verdicts']['goal']}**.",
        "",
        "Happy path (tasks that passed on their one first answer), tale's tokens against the "
        "same tasks' stateless calls: "
        + "; ".join(
            f"run {i + 1}: {h['tasks']} tasks, {h['tale_tokens']:,} vs {h['stateless_tokens']:,}"
            + ("" if h["ratio"] is None else f" ({h['ratio']:.2f}x)")
            for i, h in enumerate(c["happy_path"])
        )
        + f" (target ≤ {HAPPY_PATH_RATIO:.2f}x: {c['verdicts']['happy_path']}).",
        "",
        "Where tale's tokens went, by step kind (calls, tokens; run 1"
        + (f" of {runs}" if runs > 1 else "")
        + "):",
        "",
        "| step kind | calls | prompt | completion | total |",
        "| --- | --- | --- | --- | --- |",
    ]
    kinds = c["happy_path"][0]["by_kind"] if c["happy_path"] else {}
    lines += [
        f"| {k} | {v['calls']:,} | {v['prompt']:,} | {v['completion']:,} | {v['total']:,} |"
        for k, v in kinds.items()
        if v["total"] or v["calls"]
    ]
    return "\n".join(lines)


def add_held_back(report: dict[str, Any]) -> None:
    """Measure the held-back curve on the report's tale database, and its verdict."""
    db = Path(report["tale"]["db"])
    settings = report.get("learning_settings")
    if settings is None or not db.exists():
        held: dict[str, Any] = {
            "points": [],
            "falls": None,
            "note": "no tale database or no learning settings",
        }
    else:
        held = held_back_curve(db, LearningSettings(**settings))
    report["held_back"] = held
    report["verdicts"]["held_back_mape_falls"] = (
        "not measured" if held["falls"] is None else _verdict(held["falls"])
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def rate(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f} %"


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} %"


def markdown(r: dict[str, Any]) -> str:
    """The results as a Markdown block (the docs section's body)."""
    t, n, v, m = r["tale"], r["naive"], r["verdicts"], r["mape"]
    saved = r["savings"]
    curve = " → ".join(f"{p['mape']:.0f} %" for p in m["points"]) if m["points"] else m["note"]
    windows = f" (windows of {m['window']} outcomes)" if m["points"] else ""
    medians = " → ".join(f"{p['median']:.0f} %" for p in m["points"] if "median" in p) or "—"
    h = r.get("held_back", {"points": [], "note": "not measured"})
    held_n = h.get("held", 0)
    held_sizes = ", ".join(str(p["history"]) for p in h["points"]) or "—"
    held_curve = " → ".join(f"{p['mape']:.0f} %" for p in h["points"]) or h["note"]
    held_medians = " → ".join(f"{p['median']:.0f} %" for p in h["points"]) or "—"
    lines = [
        f"`{r['command']}` on {r['machine']}, {r['date']}; {r['items']} items "
        f"({r['tasks']} tasks, {r['chats']} chat turns, {r['gated']} with done criteria), "
        f"task model {r['model']}, learning engine {r['learning']}.",
        "",
        "| what | tale | naive | target | verdict |",
        "| --- | --- | --- | --- | --- |",
        f"| task-model tokens | {t['task_model_tokens']:,} | {n['task_model_tokens']:,} "
        f"| ≥ 60 % saved | {v['task_tokens_saved']} ({_fmt_pct(saved['task_tokens_pct'])} saved) |",
        f"| all tokens (both roles) | {t['total_tokens']:,} | {n['total_tokens']:,} "
        f"| ≥ 60 % saved | {v['total_tokens_saved']} "
        f"({_fmt_pct(saved['total_tokens_pct'])} saved) |",
        f"| gate pass rate | {rate(t['pass_rate'])} ({t['gate_passed']}/{t['gate_judged']}) "
        f"| {rate(n['pass_rate'])} ({n['gate_passed']}/{n['gate_judged']}) "
        f"| tale not lower | {v['pass_rate_not_lower']} |",
        f"| budget MAPE over the replay{windows} | {curve} | — | falls | {v['mape_falls']} |",
        f"| the same windows' median error | {medians} | — | | |",
        f"| budget MAPE on {held_n} held-back tasks, by history learnt ({held_sizes} outcomes)"
        f" | {held_curve} | — | falls | {v.get('held_back_mape_falls', 'not measured')} |",
        f"| held-back median error | {held_medians} | — | | |",
        f"| truncation rate | {_fmt_pct(t['truncation_pct'])} "
        f"({t['truncated_tasks']}/{t['task_runs']} tasks cut at their budget) "
        f"| {_fmt_pct(n['truncation_pct'])} answers cut at max_tokens | < 5 % "
        f"| {v['truncation_below_5pct']} |",
        f"| wall time | {t['wall_seconds'] / 60:.1f} min "
        f"| {n['wall_seconds'] / 60:.1f} min | — | |",
        "",
        f"tale: {t['completed']}/{t['task_runs']} tasks completed, {t['handoffs']} chat "
        f"hand-offs, {t['timeouts']} tasks timed out, {t.get('errors', 0)} chat turns failed; "
        f"{t['final_answer_cut']} final answers cut at "
        f"their budget and {t['truncation_retried_tasks']} tasks with a cut attempt retried "
        f"with more; tokens by role: "
        + ", ".join(
            f"{k} {x['total']:,} in {x['calls']} calls" for k, x in t["tokens"]["by_role"].items()
        )
        + f". naive: history cut to fit n_ctx on {n['context_truncated_turns']} turns "
        f"({n['dropped_messages']} oldest messages dropped), {n['final_answer_cut']} answers "
        f"cut at max_tokens.",
    ]
    return "\n".join(lines)


def _full_markdown(report: dict[str, Any]) -> str:
    md = markdown(report)
    if "baselines" in report:
        runs = len(report["baselines"]["runs"])
        md += (
            "\n\nAgainst the stateless baselines (the same GGUF, every task a fresh call; "
            "chat turns with their own conversation's history only):\n\n"
            + compare_markdown(report["baselines"], runs)
        )
    return md


def plot(r: dict[str, Any], path: Path) -> None:
    """Two panels: the MAPE learning curve, and cumulative tokens tale vs naive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    m = r["mape"]
    if m["points"]:
        left.plot(
            [p["upto"] for p in m["points"]],
            [p["mape"] for p in m["points"]],
            "C0-o",
            label=f"replay, MAPE of windows of {m['window']}",
        )
        held = r.get("held_back", {}).get("points", [])
        if held:
            n = r["held_back"]["held"]
            x = [p["history"] for p in held]
            left.plot(x, [p["mape"] for p in held], "C2-s", label=f"{n} held-back tasks, MAPE")
            left.plot(x, [p["median"] for p in held], "C2--", label=f"{n} held-back, median")
        left.set_xlabel("task outcomes learnt (replay order)")
        left.set_ylabel("budget prediction error (%)")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, m["note"], ha="center", va="center", wrap=True, fontsize=9)
        left.set_axis_off()
    left.set_title("token-budget prediction error")
    for name, key, label, style in (
        ("tale", "task_model_tokens", "tale, task model", "C0-"),
        ("tale", "tokens", "tale, both models", "C0--"),
        ("naive", "task_model_tokens", "naive single model", "C3-"),
    ):
        totals, run = [], 0
        for rec in r[name]["items_detail"]:
            run += rec[key]
            totals.append(run)
        right.plot(range(1, len(totals) + 1), totals, style, label=label)
    right.set_xlabel("workload items replayed")
    right.set_ylabel("cumulative tokens")
    saved = r["savings"]["task_tokens_pct"]
    right.set_title(f"task-model tokens ({_fmt_pct(saved)} saved)")
    right.legend()
    fig.suptitle(f"tale vs naive, {r['items']} items, {r['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(md: str, date: str, doc: Path = DOCS / "benchmarks.md") -> None:
    """Replace the results block of the savings section (append one if it is missing)."""
    text = doc.read_text()
    block = f"{BEGIN}\n### Results, {date}\n\n{md}\n\n![savings](savings.png)\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = (
        pattern.sub(lambda _m: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    )
    doc.write_text(text)


# --- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, metavar="N", help="replay only the first N items")
    parser.add_argument("--out", type=Path, help="report directory (default: a temp dir)")
    parser.add_argument("--workload", type=Path, default=WORKLOAD)
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="task answers' max_tokens for both runs (default: the runner's, "
        f"{RunnerSettings().max_tokens})",
    )
    parser.add_argument(
        "--chat-max-tokens", type=int, help="tale's chat replies (default: its own)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tale task")
    parser.add_argument(
        "--runs",
        type=int,
        help="tale runs, each with its own exploration seed (default: 3, or 1 with --short)",
    )
    parser.add_argument("--window", type=int, help="outcomes per MAPE window")
    parser.add_argument("--docs", action="store_true", help="write docs/ even in short mode")
    parser.add_argument(
        "--from-report",
        type=Path,
        metavar="JSON",
        help="run nothing: print, plot (and with --docs, record) an earlier report.json",
    )
    args = parser.parse_args(argv)
    if args.from_report:
        report: dict[str, Any] = json.loads(args.from_report.read_text())
        if "held_back" not in report:
            add_held_back(report)
            args.from_report.write_text(json.dumps(report, indent=2))
        md = _full_markdown(report)
        plot(report, args.from_report.with_name("savings.png"))
        if args.docs:
            plot(report, DOCS / "savings.png")
            update_docs(md, report["date"])
        print(md)
        return report

    items = load_workload(args.workload, args.short)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_savings-"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "sandbox"
    max_tokens = args.max_tokens or RunnerSettings().max_tokens
    env = tale_env(args.max_tokens, args.chat_max_tokens)
    learning = "learning" in Settings.model_fields
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "date": date,
        "machine": machine(),
        "command": "python tests/bench/bench_savings.py"
        + (f" --short {args.short}" if args.short else ""),
        "mode": "short" if args.short else "full",
        "model": f"{ModelsSettings().task} ({embedded_model_path().name})",
        "learning": "on (default settings)" if learning else "absent (no [learning] settings)",
        "learning_settings": Settings().model_dump(mode="json").get("learning"),
        "tale_env": env,
        "naive": {
            "max_tokens": max_tokens,
            "n_ctx": LlamaCppSettings().n_ctx,
            "temperature": 0,
            "chat_max_tokens_default": ChatSettings().max_tokens,
        },
    }
    _log(f"bench_savings: {len(items)} items; report in {out}")
    # An idle 2-core machine: ~3-5 s an item for tale (more for gate retries), ~4-6 s
    # for the naive run once its history fills the context (the prompt is re-read
    # every turn); far more on a busy machine, where llama.cpp's threads starve.
    _log(
        f"estimate: ~{len(items) * 7 / 60:.0f}-{len(items) * 11 / 60:.0f} min for both runs "
        "on an idle 2-core machine"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the daemon is stopped
    runs = []
    for i in range(args.runs or (1 if args.short else 3)):
        run_dir = out / f"run{i + 1}"
        run_dir.mkdir(exist_ok=True)
        # Each run explores with its own seed: the spread is what exploration changes.
        seeded = {**env, "TALE_LEARNING__EXPLORE_SEED": str(i)}
        runs.append(run_tale(items, seeded, args.timeout, scratch, run_dir))
    tale = runs[0]
    stateless = run_stateless(items, max_tokens, scratch)
    sizing = right_size(items, stateless, scratch)
    sized = run_stateless(items, sizing["chosen"], scratch, label="right-sized")
    naive = run_naive(items, max_tokens, scratch)
    report = summarise(items, tale, naive, meta, args.window)
    add_held_back(report)
    report["baselines"] = compare(items, runs, stateless, sized, sizing)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = _full_markdown(report)
    plot(report, out / "savings.png")
    if not args.short or args.docs:
        plot(report, DOCS / "savings.png")
        update_docs(md, date)
    print(md)
    missed = [k for k, v in report["verdicts"].items() if v == "MISSED"] + [
        f"stateless {k}" for k, v in report["baselines"]["verdicts"].items() if v == "MISSED"
    ]
    print(
        "\nmissed targets: " + ", ".join(missed) if missed else "\nevery measured target met",
    )
    _log(f"report: {out / 'report.json'}; plot: {out / 'savings.png'}")
    return report


if __name__ == "__main__":
    main()
