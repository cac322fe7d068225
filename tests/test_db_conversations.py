"""The conversations repository (taled/db/conversations.py) over a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from taled.db.conversations import ConversationRecords, NewMessage, Pending
from taled.db.store import Store
from taled.settings import StoreSettings

T = TypeVar("T")


def _run(tmp_path: Path, body: Callable[[Store, ConversationRecords], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=16)
        await store.open()
        try:
            return await body(store, ConversationRecords(store))
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_new_conversation_reads_back_empty(tmp_path: Path) -> None:
    """A created conversation is read back as created, with no messages; an unknown id
    reads as None."""

    async def body(_store: Store, records: ConversationRecords) -> None:
        made = await records.create("hello")
        assert await records.get(made.id) == made
        assert made.title == "hello" and made.messages == 0 and made.pending is None
        assert await records.get("000000000000") is None

    _run(tmp_path, body)


def test_a_draft_is_stored_with_its_first_message_and_not_before(tmp_path: Path) -> None:
    """A draft conversation is nobody's until its first message is added with it: then
    both are stored (in one write), the header active as of that message."""

    async def body(_store: Store, records: ConversationRecords) -> None:
        draft = records.draft("hello")
        assert not draft.stored and await records.get(draft.id) is None
        first = await records.add(NewMessage(draft.id, "user", "hello"), draft=draft)
        header = await records.get(draft.id)
        assert header is not None and header.stored
        assert (header.title, header.messages, header.updated_at) == ("hello", 1, first.at)
        assert await records.messages(draft.id) == [first]

    _run(tmp_path, body)


def test_messages_are_appended_in_order_and_counted(tmp_path: Path) -> None:
    """Added messages come back in order after a seq, and the header counts them and
    moves its ``updated_at`` to the last one."""

    async def body(_store: Store, records: ConversationRecords) -> None:
        conv = await records.create("hi")
        first = await records.add(NewMessage(conv.id, "user", "one", intent="task"))
        second = await records.add(NewMessage(conv.id, "assistant", "two"))
        assert [m.text for m in await records.messages(conv.id)] == ["one", "two"]
        assert await records.messages(conv.id, first.seq) == [second]
        header = await records.get(conv.id)
        assert header is not None and header.messages == 2
        assert header.updated_at == second.at

    _run(tmp_path, body)


def test_pending_and_summary_are_kept(tmp_path: Path) -> None:
    """A pending request round-trips and None clears it; a summary keeps its seq."""

    async def body(_store: Store, records: ConversationRecords) -> None:
        conv = await records.create("hi")
        await records.set_pending(conv.id, Pending("task", "do it"))
        await records.set_summary(conv.id, "so far", 3)
        header = await records.get(conv.id)
        assert header is not None and header.pending == Pending("task", "do it")
        assert (header.summary, header.summary_upto) == ("so far", 3)
        await records.set_pending(conv.id, None)
        cleared = await records.get(conv.id)
        assert cleared is not None and cleared.pending is None

    _run(tmp_path, body)


def test_a_tracked_task_keeps_its_place_and_its_last_state(tmp_path: Path) -> None:
    """Tracking a task again updates its reported state without moving it."""

    async def body(store: Store, records: ConversationRecords) -> None:
        conv = await records.create("hi")
        a, b = (await store.submit("a", 0)).id, (await store.submit("b", 0)).id
        await records.track_task(conv.id, a, "queued")
        await records.track_task(conv.id, b, "queued")
        await records.track_task(conv.id, a, "completed")
        assert await records.tracked(conv.id) == [(a, "completed"), (b, "queued")]

    _run(tmp_path, body)


def test_the_last_request_skips_actions_and_other_intents(tmp_path: Path) -> None:
    """The last request is the user's latest message read as no action, of the intents
    asked for, before the seq given, in the conversation given or in any."""

    async def body(_store: Store, records: ConversationRecords) -> None:
        conv = await records.create("hi")
        other = await records.create("other")
        work = await records.add(NewMessage(conv.id, "user", "build it", intent="task"))
        chat = await records.add(NewMessage(conv.id, "user", "thanks", intent="chat"))
        await records.add(NewMessage(conv.id, "user", "status?", action="task_status"))
        elsewhere = await records.add(NewMessage(other.id, "user", "x", intent="task"))
        end = elsewhere.seq + 1
        assert await records.last_request(end, conv.id) == chat
        assert await records.last_request(end, conv.id, ("task", "unclear")) == work
        assert await records.last_request(end) == elsewhere
        assert await records.last_request(work.seq, conv.id) is None

    _run(tmp_path, body)
