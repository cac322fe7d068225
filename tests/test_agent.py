"""The conversation agent, end to end through the socket with the real UX model."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tale_client.rpc import Connection, RpcError
from tests.harness import Daemon, running_daemon

DATA = Path(__file__).parent / "data"


def chat(daemon: Daemon, text: str, **args: Any) -> dict[str, Any]:
    # A reply plus a summary call can outlast the client's default 30 s on a loaded
    # machine; the daemon's own call timeout still bounds each model call.
    with Connection(daemon.home.socket, timeout=180) as conn:
        conn.initialize("tests")
        return conn.call_tool("chat", {"text": text, **args})


def ledger(daemon: Daemon, where: str) -> list[sqlite3.Row]:
    # `usage` waits for ledger rows still in flight; then read the file itself.
    daemon.call("usage")
    db = daemon.home.data / "tale.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(f"SELECT * FROM model_calls WHERE {where}").fetchall()


def test_a_request_for_work_is_queued_and_the_reply_names_the_task(shared_daemon: Daemon) -> None:
    turn = chat(shared_daemon, "Write a Python function that reverses a string", new=True)
    assert turn["intent"]["kind"] == "task"
    assert turn["handed_off"] is True
    task_id = turn["task"]["id"]
    assert task_id in turn["text"]
    stored = shared_daemon.call("get_task", id=task_id)
    assert stored["text"] == "Write a Python function that reverses a string"
    messages = shared_daemon.call("get_conversation", id=turn["conversation"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["task"] == task_id


def test_small_talk_is_answered_by_the_ux_model_and_queues_nothing(shared_daemon: Daemon) -> None:
    before = len(shared_daemon.call("list_tasks", limit=1000)["tasks"])
    turn = chat(shared_daemon, "hello! how are you?", new=True)
    assert turn["intent"]["kind"] == "chat"
    assert turn["task"] is None
    assert turn["tokens"]["completion"] > 0, "the reply came from the model"
    assert len(shared_daemon.call("list_tasks", limit=1000)["tasks"]) == before


def test_what_was_my_last_request_is_answered_from_the_store(shared_daemon: Daemon) -> None:
    first = chat(shared_daemon, "Draft a short email inviting the team to a picnic", new=True)
    conversation = first["conversation"]
    chat(shared_daemon, "how is my task doing?", conversation=conversation)
    turn = chat(shared_daemon, "what was my last request?", conversation=conversation)
    assert turn["intent"]["action"] == "last_request"
    assert "Draft a short email inviting the team to a picnic" in turn["text"]
    assert first["task"]["id"] in turn["text"]
    assert turn["tokens"]["completion"] == 0, "answered from the store, not generated"


def test_how_is_my_task_doing_reports_its_stored_state(shared_daemon: Daemon) -> None:
    first = chat(shared_daemon, "Write a haiku about autumn leaves", new=True)
    task_id = first["task"]["id"]
    turn = chat(shared_daemon, "how is my task doing?", conversation=first["conversation"])
    state = shared_daemon.call("get_task", id=task_id)["state"]
    assert turn["intent"]["action"] == "task_status"
    assert task_id in turn["text"]
    assert state in turn["text"] or (state == "completed" and "finished" in turn["text"])


def test_progress_of_a_handed_off_task_is_reported_back_in_the_conversation(
    shared_daemon: Daemon,
) -> None:
    first = chat(shared_daemon, "Write a limerick about a cat who codes", new=True)
    task_id = first["task"]["id"]
    task = shared_daemon.wait_for(task_id)
    turn = chat(shared_daemon, "thanks!", conversation=first["conversation"])
    assert any(task_id in u and "finished" in u for u in turn["updates"])
    assert turn["text"].startswith("Update: task " + task_id)
    # Said once: the next turn does not repeat it.
    again = chat(shared_daemon, "what did it produce?", conversation=first["conversation"])
    assert again["updates"] == []
    assert again["intent"]["action"] == "task_result"
    assert (task["result"] or "")[:40] in again["text"]


def test_cancel_it_cancels_the_task_this_conversation_handed_off() -> None:
    with running_daemon({"TALE_RUNNER__MAX_TOKENS": "2000"}) as daemon:
        first = chat(daemon, "Write a very long story about a dragon and a knight", new=True)
        task_id = first["task"]["id"]
        daemon.wait_for(task_id, ("running",))
        turn = chat(daemon, "cancel it", conversation=first["conversation"])
        assert turn["intent"]["action"] == "cancel_task"
        assert f"Cancelled task {task_id}" in turn["text"]
        assert daemon.call("get_task", id=task_id)["state"] == "cancelled"


def test_an_ambiguous_request_gets_one_clarifying_question_and_yes_queues_it(
    shared_daemon: Daemon,
) -> None:
    turn = chat(shared_daemon, "the spreadsheet", new=True)
    assert turn["intent"]["kind"] == "unclear"
    assert turn["task"] is None
    assert turn["text"].count("?") == 1
    conversation = shared_daemon.call("get_conversation", id=turn["conversation"])
    assert conversation["pending"] == "the spreadsheet"
    yes = chat(shared_daemon, "yes", conversation=turn["conversation"])
    assert yes["handed_off"] is True
    assert shared_daemon.call("get_task", id=yes["task"]["id"])["text"] == "the spreadsheet"


def test_no_to_the_clarifying_question_queues_nothing(shared_daemon: Daemon) -> None:
    turn = chat(shared_daemon, "logs", new=True)
    no = chat(shared_daemon, "no", conversation=turn["conversation"])
    assert no["task"] is None
    assert shared_daemon.call("get_conversation", id=turn["conversation"])["pending"] is None


def test_a_conversation_survives_a_daemon_restart(daemon: Daemon) -> None:
    first = chat(daemon, "Write a shell one-liner that counts lines in all .py files", new=True)
    conversation = first["conversation"]
    chat(daemon, "thanks, you are great", conversation=conversation)
    assert daemon.stop() == 0
    daemon.start()
    listed = daemon.call("list_conversations")["conversations"]
    assert listed[0]["id"] == conversation
    assert listed[0]["messages"] == 4
    # With no conversation named, the most recent one continues.
    turn = chat(daemon, "what was my last request?")
    assert turn["conversation"] == conversation
    assert "counts lines in all .py files" in turn["text"]


# Short replies and summaries, two messages kept verbatim: a few turns fill a history.
_SHORT_CHAT = {
    "TALE_CHAT__KEEP_RECENT_MESSAGES": "2",
    "TALE_CHAT__MAX_TOKENS": "40",
    "TALE_CHAT__SUMMARY_MAX_TOKENS": "40",
}
_MOON = (
    "what is the moon made of? I read that it is mostly rock and dust with a small "
    "iron core, and I would like to know more about its layers and its crust",
    "why does it have so many craters? is it because it has no air to burn up the "
    "rocks that fall on it, unlike the earth, where most of them burn up on the way",
    "how far away is it from the earth, and does that distance change over the year "
    "or over millions of years, as I once heard it is slowly moving away from us",
    "who walked on it first, and how many people have walked on it since then, and "
    "when was the last time anybody went there and came back to tell the story",
)


def test_a_long_conversation_is_summarised_and_the_saving_is_in_the_ledger() -> None:
    """Past context_tokens, a turn folds the older history into a summary before its
    reply (no summary ahead here), and later replies record what it saved."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "120",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "1",
    }
    with running_daemon(settings) as daemon:
        conversation = chat(daemon, "hello, tell me about the moon", new=True)["conversation"]
        summarised = False
        # Long questions: the history outgrows 120 tokens however briefly the model answers.
        for text in _MOON:
            summarised |= chat(daemon, text, conversation=conversation)["summarised"]
        assert summarised
        stored = daemon.call("get_conversation", id=conversation)
        assert stored["summary"]
        assert stored["summary_upto"] > 0
        summaries = ledger(daemon, f"conversation_id = '{conversation}' AND step = 'summary'")
        assert summaries and all(r["role"] == "ux" for r in summaries)
        replies = ledger(daemon, f"conversation_id = '{conversation}' AND step IS NULL")
        assert any(r["saved_tokens"] > 0 for r in replies), "the summary's saving is recorded"
        # Later prompts stay bounded: the last reply's prompt is smaller than the whole history.
        assert replies[-1]["prompt_tokens"] < sum(r["completion_tokens"] for r in replies) + 120


def _talk_until_folding_ahead(daemon: Daemon) -> str:
    """A conversation about the moon, up to the turn whose history passed the ahead share
    (its fold is being made in the background as this returns); its id."""
    conversation: str = chat(daemon, "hello, tell me about the moon", new=True)["conversation"]
    for text in _MOON:
        if chat(daemon, text, conversation=conversation)["summarised"]:
            return conversation
    pytest.fail("no turn passed the ahead share")


def _until_applied(daemon: Daemon, conversation: str) -> None:
    """Wait until the fold made ahead is applied (after the UX model read its prompt)."""
    deadline = time.monotonic() + 120
    while not daemon.call("get_conversation", id=conversation)["summary_upto"]:
        assert time.monotonic() < deadline, "the fold made ahead was never applied"
        time.sleep(0.2)


def test_the_summary_is_made_after_a_reply_not_before_the_next() -> None:
    """A turn that passes the ahead share has its summary made once its reply is out,
    on the task model, and applied before the next message is sent; that next reply is
    already folded."""
    # Ahead at 100 tokens, before a turn only past 200: one message and its reply
    # (under 100) cannot take a history under 100 past 200, so every fold is ahead.
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "200",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.5",
    }
    with running_daemon(settings) as daemon:
        conversation = _talk_until_folding_ahead(daemon)
        where = f"conversation_id = '{conversation}'"
        # Its own reply went out unfolded; the summary follows with nobody waiting on it.
        (reply,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert reply["saved_tokens"] == 0
        _until_applied(daemon, conversation)
        (summary,) = ledger(daemon, f"{where} AND step = 'summary'")
        assert summary["seq"] > reply["seq"]
        assert summary["role"] == "task"
        chat(daemon, "and what about its far side?", conversation=conversation)
        (after,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert after["saved_tokens"] > 0
        assert len(ledger(daemon, f"{where} AND step = 'summary' AND seq < {after['seq']}")) == 1


def test_a_conversations_next_turn_reads_only_what_is_new() -> None:
    """Another conversation using the UX model in between does not make the next turn
    read its history again: the ledger's cached_tokens covers the earlier prompt."""
    with running_daemon(_SHORT_CHAT) as daemon:
        first = chat(daemon, _MOON[0], new=True)["conversation"]
        chat(daemon, _MOON[1], new=True)
        chat(daemon, _MOON[2], conversation=first)
        replies = ledger(daemon, f"conversation_id = '{first}' AND step IS NULL ORDER BY seq")
        assert len(replies) == 2
        assert replies[1]["cached_tokens"] >= replies[0]["prompt_tokens"]
        assert replies[1]["prompt_tokens"] - replies[1]["cached_tokens"] < 80


def test_after_a_reply_the_conversation_is_read_as_its_next_turn_will_send_it() -> None:
    """Right after a reply the UX model reads the conversation with the reply as text
    (step prefill): the next turn reads little more than its own message, whatever
    tokens the reply was generated as."""
    with running_daemon(_SHORT_CHAT) as daemon:
        conversation = chat(daemon, _MOON[0], new=True)["conversation"]
        where = f"conversation_id = '{conversation}'"
        deadline = time.monotonic() + 120
        while not ledger(daemon, f"{where} AND step = 'prefill' AND success = 1"):
            assert time.monotonic() < deadline, "the conversation was not read after the reply"
            time.sleep(0.2)
        chat(daemon, "and its far side?", conversation=conversation)
        (reply,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert reply["prompt_tokens"] - reply["cached_tokens"] < 25


def test_a_fold_is_read_ahead_so_the_next_turn_finds_it_cached() -> None:
    """After a fold made ahead, the UX model reads the folded conversation at once
    (step prefill); the next turn's reply reads little more than its own message."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "200",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.5",
    }
    with running_daemon(settings) as daemon:
        conversation = _talk_until_folding_ahead(daemon)
        where = f"conversation_id = '{conversation}'"
        _until_applied(daemon, conversation)
        # The fold's read (turns before it had their own, of the unfolded history).
        (prefill,) = ledger(daemon, f"{where} AND step = 'prefill' ORDER BY seq DESC LIMIT 1")
        assert prefill["role"] == "ux"
        assert prefill["completion_tokens"] <= 1
        chat(daemon, "and what about its far side?", conversation=conversation)
        (after,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert after["saved_tokens"] > 0  # the reply is folded
        assert after["cached_tokens"] >= prefill["prompt_tokens"] - 2


def test_a_turn_does_not_wait_for_a_fold_it_can_do_without() -> None:
    """A message sent while the fold made ahead is still running gets its reply from the
    unfolded history (which still fits) instead of waiting for the summary."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "400",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.3",
        "TALE_CHAT__SUMMARY_MAX_TOKENS": "200",
    }
    with running_daemon(settings) as daemon:
        conversation = _talk_until_folding_ahead(daemon)
        where = f"conversation_id = '{conversation}'"
        # At once, while the summary is being made.
        chat(daemon, "and what about its far side?", conversation=conversation)
        (reply,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert reply["saved_tokens"] == 0, "the reply waited for the fold"
        made = ledger(daemon, f"{where} AND step = 'summary' AND success = 1")
        assert all(r["seq"] > reply["seq"] for r in made)


def test_a_turn_past_the_limit_is_answered_unfolded_while_its_fold_is_made() -> None:
    """A message whose history is over context_tokens, sent while the fold made ahead is
    still being made, is answered over the whole history (within unfolded_max_share)
    instead of waiting; the fold is applied after, and the turn after that is folded."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "120",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.5",
        "TALE_CHAT__UNFOLDED_MAX_SHARE": "20",
    }
    with running_daemon(settings) as daemon:
        conversation = _talk_until_folding_ahead(daemon)
        where = f"conversation_id = '{conversation}'"
        # At once: the history is over 120 tokens, and the fold is not ready.
        chat(daemon, _MOON[-1], conversation=conversation)
        (reply,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert reply["saved_tokens"] == 0, "the reply waited for the fold"
        assert reply["prompt_tokens"] > 120
        _until_applied(daemon, conversation)
        chat(daemon, "and what about its far side?", conversation=conversation)
        (after,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert after["saved_tokens"] > 0


def test_a_turn_past_the_unfolded_maximum_folds_first_on_the_ux_model() -> None:
    """With no room to answer unfolded (unfolded_max_share 1), a turn over the limit
    while its fold is made ahead does not answer over the whole history: it is folded
    for it, by a summary on the UX model."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "120",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.5",
        "TALE_CHAT__UNFOLDED_MAX_SHARE": "1",
        "TALE_CHAT__SUMMARY_MAX_TOKENS": "200",
    }
    with running_daemon(settings) as daemon:
        conversation = _talk_until_folding_ahead(daemon)
        where = f"conversation_id = '{conversation}'"
        chat(daemon, _MOON[-1], conversation=conversation)
        (reply,) = ledger(daemon, f"{where} AND step IS NULL ORDER BY seq DESC LIMIT 1")
        assert reply["saved_tokens"] > 0, "the reply was sent unfolded"
        made = ledger(
            daemon, f"{where} AND step = 'summary' AND success = 1 AND seq < {reply['seq']}"
        )
        assert made


def test_a_fold_made_while_a_task_holds_the_task_model_is_made_on_the_ux_model() -> None:
    """A summary made ahead goes to the task model only while it is free: behind a
    task's long call it would wait minutes, and the UX model is idle between turns."""
    settings = {
        **_SHORT_CHAT,
        "TALE_CHAT__CONTEXT_TOKENS": "200",
        "TALE_CHAT__SUMMARISE_AHEAD_SHARE": "0.5",
        "TALE_RUNNER__MAX_TOKENS": "1500",
    }
    with running_daemon(settings) as daemon:
        task_id = daemon.call(
            "submit_task", text="Write a very long story about a dragon, at least 2000 words."
        )["id"]
        daemon.wait_for(task_id, ("running",))
        conversation = _talk_until_folding_ahead(daemon)
        _until_applied(daemon, conversation)
        summaries = ledger(daemon, f"conversation_id = '{conversation}' AND step = 'summary'")
        assert [r["role"] for r in summaries] == ["ux"]
        assert daemon.call("get_task", id=task_id)["state"] == "running"
        daemon.call("cancel_task", id=task_id)


def test_bad_chat_arguments_get_clear_errors(shared_daemon: Daemon) -> None:
    with pytest.raises(RpcError, match="conversation") as bad_id:
        chat(shared_daemon, "hi", conversation="nope")
    assert bad_id.value.code == -32602
    with pytest.raises(RpcError, match="no conversation 000000000000"):
        chat(shared_daemon, "hi", conversation="000000000000")
    with pytest.raises(RpcError, match="chat message is empty"):
        chat(shared_daemon, "   ")


def test_tale_ask_continues_the_conversation_and_names_a_queued_task(
    shared_daemon: Daemon,
) -> None:
    proc = shared_daemon.home.tale("ask", "--new", "Write a Python script that prints the date")
    assert proc.returncode == 0, proc.stderr
    task_id = re.search(r"task ([0-9a-f]{12})", proc.stdout)
    assert task_id is not None, proc.stdout
    proc = shared_daemon.home.tale("ask", "--json", "what was my last request?")
    reply = json.loads(proc.stdout)
    assert "prints the date" in reply["text"]
    assert task_id.group(1) in reply["text"]


def test_intent_detection_is_at_least_90_percent_right_on_the_labelled_set(
    shared_daemon: Daemon,
) -> None:
    """The held-out labelled set, through the daemon's detector with the real UX model."""
    items = json.loads((DATA / "intents.json").read_text())["items"]
    assert len(items) >= 100
    right = {k: 0 for k in ("chat", "task", "unclear")}
    total = dict.fromkeys(right, 0)
    with shared_daemon.client() as conn:
        for item in items:
            got = conn.call_tool("detect_intent", {"text": item["text"]})
            total[item["intent"]] += 1
            right[item["intent"]] += got["kind"] == item["intent"]
    assert sum(right.values()) / len(items) >= 0.9, (right, total)
    for kind in right:
        assert right[kind] / total[kind] >= 0.8, (kind, right, total)
