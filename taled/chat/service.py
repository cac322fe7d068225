"""The conversation agent: one turn of a persisted conversation on the UX model.

A turn reads the message's intent (taled.chat.intent). A confident task is queued
and the reply names its id; a request too vague, or a task the signals are
unsure of, gets one clarifying question whose "yes" queues it; a question about
the user's own tasks is answered from the store (taled.chat.recall); anything else is
a streamed reply of the UX model over the conversation's summary and recent
messages. Tasks this conversation handed off report how they moved since the
last turn, first thing in the reply.

When the history outgrows ``chat.context_tokens``, its older part is folded
into a stored summary (one call, in the ledger with step ``summary``), and
each later call records in the ledger the prompt tokens the summary saved. The
fold is made ahead, in the background right after a reply, once the history
passes ``chat.summarise_ahead_share`` of the limit: the user reads the reply
while it runs, and the next turn's first token does not wait for it. The summary is
made on ``chat.summary_role``'s model while it is free (the task model, which pauses
while the UX model answers someone); the UX model then reads the folded prompt ahead,
and only once it has is the fold applied. A message that comes before that is
answered over the unfolded history, which the UX model still holds (up to
``chat.unfolded_max_share`` of the limit): it stops the read ahead, which runs again
after the reply. Only a turn past that share folds first, on the UX model (the person
is waiting: it is theirs), taking a summary already made if there is one. Between
folds, ``chat.read_ahead_after_seconds`` after a reply, the UX model reads the
conversation as its next turn will send it (the reply as text, not as the tokens it
was generated as).

Turns are laid out so the model reads little of each again: a fold takes the
history down to ``chat.fold_to_share`` of the limit (folds are rare), the UX model
reads the folded conversation right after the fold (step ``prefill``), and what
changes between turns, the handed-off tasks' states, comes last, just before the
newest message. llama.cpp then finds all but the new message in its cache (kept
across other calls by taled.models.backends.prefixes).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from taled.chat.conversations import Conversation, Conversations, Message, Pending
from taled.chat.intent import Intent, IntentDetector, judge_messages
from taled.chat.recall import Recall, task_update
from taled.db.store import Store, TaskRecord
from taled.errors import ContextOverflow, ModelError, TaleError
from taled.models.backends.base import CancelToken, ChatMessage, Completion
from taled.models.pool import ModelCall, ModelPool
from taled.models.routing import Router
from taled.settings import ChatSettings, Role
from taled.tasks.progress import ProgressHub
from taled.tasks.queue import TaskQueue
from taled.tasks.workstate import AttemptKey
from taled.text import clean_text

__all__ = ["ChatService", "Turn"]

log = logging.getLogger(__name__)

_YES = re.compile(
    r"^(?:y|yes|yep|yeah|yup|sure|ok|okay|please|please do|do it|go ahead|go for it|queue it|"
    r"as a task|sounds good|absolutely|yes please|definitely|correct|right)\b[\s.!]*$"
)
_NO = re.compile(
    r"^(?:n|no|nope|nah|don't|do not|never ?mind|just chat(?:ting)?|just talking|no thanks|"
    r"not now|forget it)\b[\s.!]*$"
)


@dataclass
class Turn:
    """What one chat turn did."""

    conversation: str
    text: str
    intent: Intent
    completion: Completion
    task: TaskRecord | None = None
    handed_off: bool = False
    """True when this turn queued ``task``."""
    updates: list[str] = field(default_factory=list)
    summarised: bool = False
    """Older messages were folded into the summary for this turn's prompt, or are being
    folded right after its reply (in the background)."""


@dataclass(frozen=True)
class _Made:
    """A summary made ahead, not yet applied: the UX model is to read its prompt first."""

    summary: str
    upto: int
    """The seq of the last message it covers."""
    over: int
    """The conversation's ``summary_upto`` when it was made: stale once that moved."""


# The latest hand-offs named in a chat prompt; the store has the rest.
_TASKS_IN_PROMPT = 5


def _chat_only(messages: list[Message]) -> list[Message]:
    """The plain conversation: exchanges whose user message was read as chat.

    Hand-offs, clarifying questions and answers from the store are worded by
    tale, not the model; the prompt names the handed-off tasks instead.
    """
    kept: list[Message] = []
    keep_reply = False
    for m in messages:
        if m.role == "user":
            keep_reply = m.intent == "chat" and m.action is None
            if keep_reply:
                kept.append(m)
        elif keep_reply:
            kept.append(m)
    return kept


def _after(messages: list[Message], seq: int) -> list[Message]:
    """The plain conversation after ``seq`` (what a summary up to ``seq`` leaves out)."""
    return _chat_only([m for m in messages if m.seq > seq])


class _Budget:
    """Characters per token, first guessed, then learned from the backend's counts."""

    def __init__(self, guess: float) -> None:
        self._chars = 0.0
        self._tokens = 0.0
        self._guess = guess

    def tokens(self, text: str) -> int:
        ratio = self._chars / self._tokens if self._tokens > 0 else self._guess
        return max(1, round(len(text) / ratio))

    def learn(self, chars: int, tokens: int) -> None:
        if tokens > 0:
            self._chars += chars
            self._tokens += tokens


class ChatService:
    """The UX agent behind the ``chat`` tool and ``tale ask``."""

    def __init__(
        self,
        pool: ModelPool,
        settings: ChatSettings,
        router: Router,
        store: Store,
        queue: TaskQueue,
        progress: ProgressHub,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._router = router
        self._queue = queue
        self._progress = progress
        self._store = store
        self.conversations = Conversations(store, settings.title_chars)
        self._recall = Recall(
            store, queue, self.conversations, progress, result_chars=settings.result_chars
        )
        self._detector = IntentDetector(
            consult_margin=settings.intent_consult_margin,
            model_weight=settings.intent_model_weight,
        )
        self._budget = _Budget(settings.chars_per_token)
        self._locks: dict[str, asyncio.Lock] = {}
        self._folds: dict[str, asyncio.Task[None]] = {}
        # Summaries made ahead and waiting to be applied; the token of the call a fold
        # is making on the UX model (the next turn stops it), by conversation.
        self._made: dict[str, _Made] = {}
        self._on_ux: dict[str, CancelToken] = {}
        # Reads of a conversation as its next turn will send it, after a reply.
        self._reads: dict[str, asyncio.Task[None]] = {}

    async def stop(self) -> None:
        """Cancel summaries and reads still being made ahead (the next turn makes them
        again)."""
        ahead = [*self._folds.values(), *self._reads.values()]
        for work in ahead:
            work.cancel()
        await asyncio.gather(*ahead, return_exceptions=True)

    def validate(self, text: str) -> str:
        """Strip and check a chat message; InvalidInput says what is wrong."""
        return clean_text(
            text,
            what="chat message",
            limit=self._settings.max_text_chars,
            empty_hint="say something",
            too_long_hint=" (submit long work as a task instead)",
        )

    async def detect(self, text: str, conversation_id: str | None = None) -> Intent:
        """How ``text`` reads: signals, and the UX model's judgement when they are close."""

        async def judge(message: str) -> str:
            answer = await self._side_call(
                judge_messages(message),  # type: ignore[arg-type]
                max_tokens=self._settings.intent_judge_tokens,
                key=AttemptKey("intent"),
                conversation_id=conversation_id,
            )
            return answer.text if answer is not None else ""

        return await self._detector.detect(text, judge)

    async def _side_call(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        key: AttemptKey,
        conversation_id: str | None,
        role: Role | None = None,
        cancel: CancelToken | None = None,
        keep_prefix: bool = False,
        background: bool = False,
    ) -> Completion | None:
        """A short call the agent makes for itself (its ledger step says which), on the
        UX model unless ``role`` says otherwise; None if it failed or was stopped. Its
        prompt is not kept in the model's prefix cache unless ``keep_prefix`` (a vote's
        or a summary's prompt never comes again).

        A failing model degrades the turn (no vote, no new summary), it does not fail it.
        """
        try:
            out = await self._pool.complete(
                ModelCall(
                    role or self._router.for_chat().role,
                    messages,
                    max_tokens=max_tokens,
                    temperature=0.0,
                    timeout=self._settings.call_timeout_seconds,
                    key=key,
                    conversation_id=conversation_id,
                    cancel=cancel or CancelToken(),
                    keep_prefix=keep_prefix,
                    background=background,
                )
            )
        except ModelError as exc:
            log.warning("conversation %s: the %s call failed: %s", conversation_id, key, exc)
            return None
        return None if out.finish_reason == "cancelled" else out

    async def turn(
        self,
        text: str,
        on_text: Callable[[str], Awaitable[None]],
        *,
        conversation: str | None = None,
        new: bool = False,
    ) -> Turn:
        """One turn: stream the reply to ``on_text`` and return what happened."""
        clean = self.validate(text)
        if new:
            conv = self.conversations.draft(clean)
        elif conversation is not None:
            conv = await self.conversations.get(conversation)
        else:
            conv = await self.conversations.latest() or self.conversations.draft(clean)
        lock = self._locks.setdefault(conv.id, asyncio.Lock())
        fold = self._folds.get(conv.id)
        if fold is not None and await self._must_fold(conv.id, clean):
            # Past what may be sent unfolded: this turn folds on the UX model itself
            # (taking the summary, if the fold had made it).
            fold.cancel()
        elif (on_ux := self._on_ux.get(conv.id)) is not None:
            # A person is waiting: what the fold does on the UX model gives way (the
            # model is theirs now) and goes on after this reply.
            on_ux.cancel()
        if (reading := self._reads.get(conv.id)) is not None:
            reading.cancel()  # made again after this reply
        async with lock:
            if conv.stored:
                # Re-read under the lock: a concurrent turn may have changed it (nothing
                # else knows a conversation made just now).
                conv = await self.conversations.get(conv.id)
            return await self._turn(conv, clean, on_text)

    async def _turn(
        self, conv: Conversation, text: str, on_text: Callable[[str], Awaitable[None]]
    ) -> Turn:
        # A conversation with no messages yet has handed nothing off.
        updates = await self._updates(conv.id) if conv.messages else []
        said: list[str] = []

        async def say(piece: str) -> None:
            said.append(piece)
            await on_text(piece)

        if updates:
            await say("\n".join(updates) + "\n\n")

        pending = conv.pending
        lowered = " ".join(text.lower().split())
        if pending is not None:
            await self.conversations.set_pending(conv.id, None)
        if pending is not None and _YES.match(lowered):
            intent = Intent(
                "task",
                1.0,
                {"chat": 0.0, "task": 1.0, "unclear": 0.0},
                features=("confirmed the clarifying question",),
            )
            message = await self._add_user(conv, text, intent)
            return await self._hand_off(conv, pending.text, intent, message, say, said, updates)
        if pending is not None and _NO.match(lowered):
            intent = Intent(
                "chat",
                1.0,
                {"chat": 1.0, "task": 0.0, "unclear": 0.0},
                features=("declined the clarifying question",),
            )
            await self._add_user(conv, text, intent)
            await say("Alright, I won't queue it. What would you like instead?")
            return await self._finish(conv.id, intent, said, updates)

        intent = await self.detect(text, conv.id)
        message = await self._add_user(conv, text, intent)
        if intent.kind == "task" and intent.confidence >= self._settings.handoff_min_confidence:
            return await self._hand_off(conv, text, intent, message, say, said, updates)
        if intent.kind in ("task", "unclear"):
            await self.conversations.set_pending(conv.id, Pending("task", text))
            await say(self._clarify(text, intent))
            return await self._finish(conv.id, intent, said, updates)
        if intent.action is not None:
            answer = await self._recall.answer(
                intent.action, text, intent.task_ids, conv.id, message
            )
            await say(answer.text)
            return await self._finish(conv.id, intent, said, updates, task=answer.task)
        streamed = len(said)
        completion, summarised = await self._reply(conv, message, say)
        # A reply stopped for repeating itself streamed more than it keeps (see
        # taled.models.repetition): the conversation stores what it keeps.
        said[streamed:] = [completion.text]
        turn = await self._finish(conv.id, intent, said, updates, completion=completion)
        # The conversation now holds this turn's message and its reply besides.
        turn.summarised = summarised or await self._fold_ahead(conv.id, conv.messages + 2)
        if not turn.summarised and conv.id not in self._reads:
            read = asyncio.create_task(self._read_on(conv.id))
            self._reads[conv.id] = read
            read.add_done_callback(lambda _t: self._reads.pop(conv.id, None))
        return turn

    async def _read_on(self, conversation_id: str) -> None:
        """Have the UX model read the conversation as the next turn will send it.

        The reply just streamed is in the model's cache as the tokens it generated, and
        the next prompt holds it as its text, which the tokenizer may split otherwise
        (or a reply stopped for repeating itself keeps less): llama.cpp then reads again
        from the first token that differs, up to the whole reply (measured: 85 and 125
        tokens, 0.3 and 0.55 s before a first token). Read now, while the person reads
        (``chat.read_ahead_after_seconds`` after the reply); a turn stops it.
        """
        await asyncio.sleep(self._settings.read_ahead_after_seconds)
        conv = await self.conversations.get(conversation_id)
        await self._read_ahead(conversation_id, conv.summary, conv.summary_upto)

    async def _fold_ahead(self, conversation_id: str, messages: int) -> bool:
        """Start folding the history in the background if it is past the ahead share
        (or a summary made ahead is still to be read); True if a fold is on its way.
        ``messages``: how many the conversation holds now."""
        share = self._settings.summarise_ahead_share
        if conversation_id in self._folds:
            return True
        if conversation_id not in self._made and messages <= self._settings.keep_recent_messages:
            return False  # nothing old enough to fold (the history is not read for it)
        if share >= 1:
            return False
        summary, recent = await self._unfolded(conversation_id)
        limit = int(self._settings.context_tokens * share)
        if conversation_id not in self._made and not self._over(summary, recent, limit):
            return False
        fold = asyncio.create_task(self._fold_later(conversation_id, limit))
        self._folds[conversation_id] = fold
        fold.add_done_callback(lambda _t: self._folds.pop(conversation_id, None))
        return True

    def _unfolded_max(self) -> int:
        """Most history tokens a turn sends while the fold made ahead is not ready."""
        return int(self._settings.context_tokens * self._settings.unfolded_max_share)

    async def _must_fold(self, conversation_id: str, text: str) -> bool:
        """Whether a turn saying ``text`` could not be answered without folding first."""
        summary, recent = await self._unfolded(conversation_id)
        return self._over(summary, recent, self._unfolded_max(), adding=text)

    async def _unfolded(self, conversation_id: str) -> tuple[str | None, list[Message]]:
        """The conversation's summary and the messages after what it covers."""
        conv = await self.conversations.get(conversation_id)
        everything = await self.conversations.messages(conversation_id)
        return conv.summary, _after(everything, conv.summary_upto)

    async def _fold_later(self, conversation_id: str, limit: int) -> None:
        """Make the summary, have the UX model read the prompt it gives, then apply it.

        Nothing here holds the conversation's lock while a model works: a turn in the
        meantime is answered over the unfolded history. The lock is taken only to apply
        the fold, and after a read a turn stopped: that turn has finished by then, and
        the read goes on with its messages.
        """
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        try:
            made = await self._made_ahead(conversation_id, limit)
            while made is not None:
                read = await self._read_ahead(conversation_id, made.summary, made.upto)
                async with lock:
                    conv = await self.conversations.get(conversation_id)
                    if conv.summary_upto != made.over:
                        self._made.pop(conversation_id, None)  # a turn folded itself
                        return
                    if read is not None:
                        await self._apply(conversation_id, made)
                        return
        except TaleError as exc:
            # The next turn folds it itself if it still must.
            log.warning("conversation %s: the summary ahead failed: %s", conversation_id, exc)

    async def _made_ahead(self, conversation_id: str, limit: int) -> _Made | None:
        """The summary made ahead: the one waiting to be applied, or a new one if the
        history is over ``limit``; None if there is nothing to fold or it failed."""
        conv = await self.conversations.get(conversation_id)
        if (made := self._waiting(conv)) is not None:
            return made
        recent = _after(await self.conversations.messages(conversation_id), conv.summary_upto)
        if not self._over(conv.summary, recent, limit):
            return None
        fold = self._to_fold(recent)
        ux = self._router.for_chat().role
        role = self._settings.summary_role
        if self._pool.busy(role):
            # A task's call holds it, maybe for minutes; the UX model is idle between
            # turns (and the next turn stops the summary there).
            role = ux
        summary = await self._summarise(conversation_id, conv.summary, fold, role, ahead=True)
        if summary is None and role != ux:
            summary = await self._summarise(conversation_id, conv.summary, fold, ux, ahead=True)
        if summary is None:
            return None
        made = _Made(summary, fold[-1].seq, conv.summary_upto)
        self._made[conversation_id] = made
        return made

    def _waiting(self, conv: Conversation) -> _Made | None:
        """The summary made ahead for ``conv`` as it is now, if any: one made before its
        summary moved on (a turn folded itself) is stale."""
        made = self._made.get(conv.id)
        return made if made is not None and made.over == conv.summary_upto else None

    async def _apply(self, conversation_id: str, made: _Made) -> None:
        """Store a summary made ahead (under the conversation's lock)."""
        await self.conversations.set_summary(conversation_id, made.summary, made.upto)
        self._made.pop(conversation_id, None)
        log.info("conversation %s: folded into its summary up to %d", conversation_id, made.upto)

    def _stoppable(self, conversation_id: str, role: Role) -> CancelToken:
        """The cancel token of a call the fold makes: the next turn stops it if it is
        on the UX model (see ``turn``)."""
        token = CancelToken()
        if role == self._router.for_chat().role:
            self._on_ux[conversation_id] = token
        return token

    async def _add_user(self, conv: Conversation, text: str, intent: Intent) -> Message:
        """Store the user's message (and its conversation with it, if new): every way
        through a turn does so first, and before this a new conversation is a draft."""
        return await self.conversations.add(
            conv.id,
            "user",
            text,
            intent=intent.kind,
            confidence=intent.confidence,
            action=intent.action,
            draft=None if conv.stored else conv,
        )

    async def _finish(
        self,
        conversation_id: str,
        intent: Intent,
        said: list[str],
        updates: list[str],
        *,
        task: TaskRecord | None = None,
        handed_off: bool = False,
        completion: Completion | None = None,
    ) -> Turn:
        reply = "".join(said)
        await self.conversations.add(
            conversation_id,
            "assistant",
            reply,
            task_id=task.id if handed_off and task is not None else None,
        )
        out = completion or Completion.empty()
        out.text = reply
        return Turn(conversation_id, reply, intent, out, task, handed_off, updates)

    def _clarify(self, text: str, intent: Intent) -> str:
        short = " ".join(text.split())
        short = short if len(short) <= 60 else short[:59].rstrip() + "…"
        if intent.kind == "task":
            return (
                f"Shall I queue “{short}” as a background task? "
                "Say yes to queue it, or no if you'd rather just talk."
            )
        return (
            f"What would you like me to do with “{short}”? Tell me what to make, "
            "for example “write a Python script that …”, and I'll queue it as a task "
            "(or say yes to queue it as it is)."
        )

    async def _hand_off(
        self,
        conv: Conversation,
        text: str,
        intent: Intent,
        message: Message,
        say: Callable[[str], Awaitable[None]],
        said: list[str],
        updates: list[str],
    ) -> Turn:
        task = await self._queue.submit(text)
        await self.conversations.track_task(conv.id, task.id, task.state)
        await say(
            f"On it: I queued that as task {task.id}. I'll tell you here how it goes; "
            "ask “how is my task doing?” any time."
        )
        return await self._finish(conv.id, intent, said, updates, task=task, handed_off=True)

    async def _updates(self, conversation_id: str) -> list[str]:
        """Natural-language news of handed-off tasks whose state changed since last said."""
        lines: list[str] = []
        for task_id, reported in await self.conversations.tracked(conversation_id):
            task = await self._store.get_task(task_id)
            if task.state == reported:
                continue
            await self.conversations.track_task(conversation_id, task_id, task.state)
            if task.state in ("queued", "running", "waiting") and reported in ("queued", "running"):
                # Starting to run is not news worth interrupting a conversation for.
                continue
            lines.append(task_update(task, self._progress))
        return lines

    async def _reply(
        self, conv: Conversation, message: Message, say: Callable[[str], Awaitable[None]]
    ) -> tuple[Completion, bool]:
        spoke = False

        async def saying(piece: str) -> None:
            nonlocal spoke
            spoke = True
            await say(piece)

        try:
            return await self._answer(conv, message, saying, fold=False)
        except ContextOverflow:
            # The unfolded history was too long for the model after all (the budget's
            # characters per token are learned, not exact): fold, and answer again.
            if spoke:
                raise
            log.info("conversation %s: too long for the model unfolded; folding", conv.id)
            # Read again: the first try may have stored a fold.
            conv = await self.conversations.get(conv.id)
            return await self._answer(conv, message, saying, fold=True)

    async def _answer(
        self,
        conv: Conversation,
        message: Message,
        say: Callable[[str], Awaitable[None]],
        fold: bool,
    ) -> tuple[Completion, bool]:
        """Stream the reply to ``message``; whether the history was folded for it.
        ``fold``: fold if over context_tokens, whatever a fold made ahead would do."""
        # Read once: the summary's fit, the prompt and the saving all come from it. A
        # conversation that had no messages (``conv`` is read before ``message`` was
        # added, under the lock) has this one alone.
        everything = [message] if conv.messages == 0 else await self.conversations.messages(conv.id)
        summary, upto = conv.summary, conv.summary_upto
        folded = await self._folded_for_turn(conv, _after(everything, upto), fold)
        if folded is not None:
            summary, upto = folded
        messages = self._history(summary, _after(everything, upto))
        handed = await self._handed_off(conv.id) if conv.messages else ""
        if handed:
            # Just before the newest message, not in the system prompt: the tasks' states
            # change between turns, and anything that changes is read again with all
            # that follows it (llama.cpp keeps the prompt's unchanged prefix).
            messages.insert(
                len(messages) - 1,
                {"role": "system", "content": "Tasks you queued for the user: " + handed},
            )
        saved = 0
        if upto:
            before = _chat_only([m for m in everything if m.seq <= upto])
            folded_tokens = sum(self._budget.tokens(m.text) for m in before)
            saved = max(0, folded_tokens - self._budget.tokens(summary or ""))
        result = Completion.empty()
        call = ModelCall(
            self._router.for_chat().role,
            messages,
            max_tokens=self._settings.max_tokens,
            temperature=self._settings.temperature,
            timeout=self._settings.call_timeout_seconds,
            conversation_id=conv.id,
            saved_tokens=saved,
        )
        async for piece in self._pool.stream(call, result):
            await say(piece)
        self._budget.learn(sum(len(m["content"]) for m in messages), result.prompt_tokens)
        return result, folded is not None

    async def _folded_for_turn(
        self, conv: Conversation, recent: list[Message], fold: bool
    ) -> tuple[str, int] | None:
        """The summary and its end for this turn's prompt, if the history is folded for
        it (under the conversation's lock); None to send it as it is.

        Over context_tokens, a fold on its way (being made, or made and being read
        ahead) is not waited for while the history is within the unfolded maximum: the
        UX model holds it already. Past that, a summary made ahead is applied, and
        without one the history is folded here, on the UX model.
        """
        limit = self._settings.context_tokens
        if not self._over(conv.summary, recent, limit):
            return None
        made = self._waiting(conv)
        coming = made is not None or conv.id in self._folds
        if coming and not fold and not self._over(conv.summary, recent, self._unfolded_max()):
            return None
        if made is not None:
            await self._apply(conv.id, made)
            return made.summary, made.upto
        return await self._fit(conv.id, conv.summary, recent, limit)

    def _history(self, summary: str | None, recent: list[Message]) -> list[ChatMessage]:
        """The prompt's part that stays the same from turn to turn until the next fold."""
        system = self._settings.system_prompt
        if summary:
            system += "\n\nThe conversation so far, in short: " + summary
        messages: list[ChatMessage] = [{"role": "system", "content": system}]
        messages += [
            {"role": "user" if m.role == "user" else "assistant", "content": m.text} for m in recent
        ]
        return messages

    async def _read_ahead(
        self, conversation_id: str, summary: str | None, upto: int
    ) -> Completion | None:
        """Have the UX model read the conversation's prompt with ``summary`` (covering up
        to ``upto``), now, while the person reads.

        A fold changes the prompt's start, so the next turn would read its whole history
        before its first token; read here (one token generated, in the ledger as step
        ``prefill``), the next turn finds it in the model's cache and reads only its own
        message. None if a turn stopped it (what was read may be kept in the model's
        prefix cache for the next try); a failed read is as good as done: the turn reads
        it all.
        """
        recent = _after(await self.conversations.messages(conversation_id), upto)
        if not recent:
            return Completion.empty()
        role = self._router.for_chat().role
        token = self._stoppable(conversation_id, role)
        try:
            read = await self._side_call(
                self._history(summary, recent),
                max_tokens=1,
                key=AttemptKey("prefill"),
                conversation_id=conversation_id,
                cancel=token,
                keep_prefix=True,  # the conversation's next turns start with it
                background=True,
            )
        finally:
            if self._on_ux.get(conversation_id) is token:
                del self._on_ux[conversation_id]
        if read is None and not token.cancelled:
            return Completion.empty()
        return read

    async def _handed_off(self, conversation_id: str) -> str:
        tracked = (await self.conversations.tracked(conversation_id))[-_TASKS_IN_PROMPT:]
        parts = []
        for task_id, _ in tracked:
            task = await self._store.get_task(task_id)
            parts.append(f"{task.id} “{' '.join(task.text.split())[:60]}” ({task.state})")
        return "; ".join(parts)

    def _over(
        self, summary: str | None, recent: list[Message], limit: int, adding: str | None = None
    ) -> bool:
        """Whether the history (with the message ``adding``, if one is about to join it) is
        over ``limit`` tokens with something old enough to fold."""
        added = [] if adding is None else [adding]
        if len(recent) + len(added) <= self._settings.keep_recent_messages:
            return False
        texts = [summary or "", *(m.text for m in recent), *added]
        return sum(self._budget.tokens(t) for t in texts) > limit

    async def _fit(
        self, conversation_id: str, summary: str | None, recent: list[Message], limit: int
    ) -> tuple[str, int] | None:
        """Fold the oldest of ``recent`` into the summary, on the UX model, if the history
        is over ``limit`` (a person is waiting on it; under the conversation's lock).

        Returns the new summary and the seq it covers up to, or None if nothing was folded.
        """
        if not self._over(summary, recent, limit):
            return None
        fold = self._to_fold(recent)
        new = await self._summarise(
            conversation_id, summary, fold, self._router.for_chat().role, ahead=False
        )
        if new is None:
            return None
        self._made.pop(conversation_id, None)
        await self.conversations.set_summary(conversation_id, new, fold[-1].seq)
        log.info("conversation %s: %d messages folded into its summary", conversation_id, len(fold))
        return new, fold[-1].seq

    def _to_fold(self, recent: list[Message]) -> list[Message]:
        """The oldest messages to fold: enough that the rest is within
        ``fold_to_share`` of the history's tokens, never the newest
        ``keep_recent_messages``.

        Folding down well below the limit is what makes folds rare: each one changes the
        prompt's start, and the turn after it reads the whole history again.
        """
        keep = self._settings.keep_recent_messages
        target = self._settings.context_tokens * self._settings.fold_to_share
        left = sum(self._budget.tokens(m.text) for m in recent)
        cut = 0
        while cut < len(recent) - keep and left > target:
            left -= self._budget.tokens(recent[cut].text)
            cut += 1
        return recent[: max(cut, 1)]

    async def _summarise(
        self,
        conversation_id: str,
        summary: str | None,
        fold: list[Message],
        role: Role,
        *,
        ahead: bool,
    ) -> str | None:
        """A summary of ``summary`` and the messages ``fold``, on ``role``'s model;
        ``ahead``: made in the background, nobody waiting on it."""
        lines = [f"{m.role}: {' '.join(m.text.split())}" for m in fold]
        body = "\n".join(lines)
        # The summary call must itself fit: keep the newest part of what is folded.
        limit = int(self._settings.context_tokens * self._settings.chars_per_token)
        if len(body) > limit:
            body = "…" + body[-limit:]
        prompt = (
            (f"Summary so far: {summary}\n\n" if summary else "")
            + "Conversation:\n"
            + body
            + "\n\nWrite a short summary of this conversation: who asked what, what was "
            "answered or decided, and any task ids. Plain sentences."
        )
        token = self._stoppable(conversation_id, role)
        try:
            out = await self._side_call(
                [
                    {"role": "system", "content": "You summarise conversations briefly."},
                    {"role": "user", "content": prompt},
                ],
                max_tokens=self._settings.summary_max_tokens,
                key=AttemptKey("summary"),
                conversation_id=conversation_id,
                role=role,
                cancel=token,
                background=ahead,
            )
        finally:
            if self._on_ux.get(conversation_id) is token:
                del self._on_ux[conversation_id]
        # Handed-off tasks need no place in it: every chat prompt names them anyway.
        return (out.text if out is not None else "").strip() or None
