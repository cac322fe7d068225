"""Is a chat message a task to hand off, conversation, or unclear?

Two sources are combined. Cheap signals come first: named text features
(a work verb leading the request, an artefact to produce, a greeting, a
question, vagueness...), each adding weight to one of three kinds, turned into
probabilities with a softmax. Only when they leave the top two kinds close does
the UX model get asked for its judgement, one word, which adds its weight to
the kind it names. Questions about the user's own tasks ("how is my task
doing?", "cancel it") are recognised as conversation with an ``action``, which
the agent answers from the store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from taled.text import word_set

__all__ = [
    "ACTIONS",
    "KINDS",
    "Intent",
    "IntentDetector",
    "Signals",
    "judge_messages",
    "parse_vote",
    "read_signals",
]

Kind = Literal["chat", "task", "unclear"]
KINDS: tuple[Kind, ...] = ("chat", "task", "unclear")
ACTIONS = (
    "last_request",
    "task_status",
    "task_result",
    "cancel_task",
    "pause_task",
    "resume_task",
)

TASK_ID = re.compile(r"\b[0-9a-f]{12}\b")

_GREETING = r"(?:hi|hello|hey|hiya|yo|howdy|good (?:morning|afternoon|evening|night)|greetings|sup)"
_POLITE_LEAD = re.compile(
    r"^(?:(?:" + _GREETING + r")\b[\s,!.:;()\-pD]*)?"
    r"(?:(?:ok(?:ay)?|so|now|alright|right|hmm+|um+|uh+|well|oh)\b[\s,]*)?"
    r"(?:(?:please|pls|plz|kindly)\b\s*)?"
    r"(?:(?:can|could|would|will) you\s+(?:please\s+)?|"
    r"i (?:need|want|would like|'d like) you to\s+|"
    r"(?:i need|i want|i'd like|i would like) to\s+|help me\s+|let's\s+|go ahead and\s+)?"
    r"(?:(?:please|pls|plz)\b\s*)?",
)
_WORK_VERBS = word_set(
    """write build create make implement generate draft compose code develop design refactor
    convert translate summarise summarize analyse analyze plan produce outline prepare research
    rewrite port document automate optimise optimize setup scaffold sketch propose compile
    add fix debug test list give find count parse extract migrate deploy program script
    construct assemble edit proofread sort review improve clean tidy organise organize format
    calculate compute benchmark profile simulate train model plot chart draw devise craft
    brainstorm suggest devise compare explore investigate evaluate estimate"""
)
_ARTEFACTS = re.compile(
    r"\b(?:function|script|program|class|module|library|cli|app|application|api|website|"
    r"web ?page|component|service|server|bot|tool|report|email|e-mail|letter|essay|article|"
    r"post|story|poem|haiku|limericks?|song|plan|itinerary|guide|changelog|makefile|"
    r"dockerfile|converter|parser|questions|ideas|list|table|tests?|test suite|regex|query|"
    r"queries|schema|deck|slides?|outline|summary|proposal|policy|resume|cv|cover letter|"
    r"recipe|checklist|spreadsheet|template|diagram|game|timer|calculator|"
    r"implementation|algorithm|cache|trie|queue|stack|linked list|endpoint|"
    r"migration|workflow|pipeline|config|documentation|readme|tutorial|lesson|course)\b"
)
_SHOW_CODE = re.compile(
    r"\b(?:show (?:me )?(?:the )?(?:full |whole |complete |working )?"
    r"(?:code|program|script|implementation|solution)|with (?:the )?code|full program|"
    r"complete program|working code|code example|step[- ]by[- ]step|"
    r"(?:complete|full|working|runnable) (?:working )?example|example code|sample code)\b"
)
_COUNTED = re.compile(r"\b(?:\d+|ten|twenty|five|three|a few|several)\s+\w+")
_FILE = re.compile(
    r"\b[\w-]+\.(?:py|js|ts|rs|go|md|txt|csv|json|ya?ml|toml|xml|html|c|h|java)\b|\w/"
)
_LANGS = re.compile(
    r"\b(?:python|javascript|typescript|rust|go|golang|java|kotlin|swift|c\+\+|c#|ruby|php|"
    r"haskell|bash|shell|sql|html|css|react|vue|django|flask|node|markdown|yaml|json|"
    r"english|french|german|spanish|italian|japanese|chinese|portuguese)\b"
)
_SMALLTALK = re.compile(
    r"^(?:" + _GREETING + r"|thanks?(?: you)?|thx|ty|cheers|appreciate it|bye|goodbye|see ya|"
    r"see you|good ?night|ok(?:ay)?|cool|nice|great|awesome|lol|haha|yes|no|sure|"
    r"how are you|how's it going|how are things|how's your day|what's up|whats up|"
    r"who are you|what are you|what can you do|how do you work|are you there|"
    r"tell me (?:a|another) joke|tell me something|do you\b|are you\b|what's your name|"
    r"nice work|good job|well done|you're|morning|evening|afternoon|perfect|exactly|brilliant|"
    r"lovely|wonderful|excellent|amazing|ugh|meh|yay|wow|oh no|omg|damn|phew|hmm+ ok|"
    r"that's (?:great|perfect|exactly|awesome|nice|cool|funny|hilarious)|happy (?:friday|monday))"
)
_QUESTION_LEAD = re.compile(
    r"^(?:what|who|when|where|why|how|which|is|are|was|were|whats|what's|who's|how's|"
    r"(?:do|does|did|can|could|should|would|will) (?:you|i|we|they|it)|explain|define|"
    r"describe|tell me)\b"
)
_BRIEF = re.compile(
    r"\b(?:in a nutshell|in one sentence|in a sentence|briefly|in short|quick question|"
    r"in (?:a )?few words|eli5|tl;?dr)\b"
)
_OPINION = re.compile(
    r"^(?:i (?:love|like|hate|think|feel|enjoy|prefer|miss|am|'m|just|finally|got|did|was)|"
    r"i'm|my \w+ (?:is|are|was|were|has|have|just|finally)\b|\w+ (?:is|are) "
    r"(?:so |really |pretty |kind of )?(?:weird|hard|great|cool|fun|boring|awesome|annoying|"
    r"confusing|nice|amazing|overrated|underrated|difficult|easy))"
)
_VAGUE_OBJECT = re.compile(r"\b(?:it|this|that|these|those|something|anything|stuff|things?|one)\b")
_NEED = re.compile(r"^(?:i need|i want|i'd like|i would like|we need|need) (?:a|an|some|the)\b")
_ASKS_WORK = re.compile(
    r"\b(?:(?:can|could|would|will) you (?:please )?|and (?:then )?|then )"
    r"(?:write|build|create|implement|code|generate|draft|make|devise)\b"
)
_TROUBLE = re.compile(
    r"^(?:my|the|our|this) [\w' -]{1,40}?(?:doesn't|does not|isn't|won't|can't|is broken|"
    r"broke|fails|keeps failing|crashes|is not working|stopped working)"
)
_CLAUSE = re.compile(r"[.!?:;\n]+(?:\s|$)|[^\w\s',./#+\-?!:;()\"]+|\s-\s")
# Imperatives answered in a line ("name three colours", "say yes").
_QUICK = re.compile(r"^(?:name|say|guess|pick|choose|spell|define|recommend|remind me)\b")


# "rewrite this: <the text>" names its object after the colon or in quotes.
_PAYLOAD = re.compile(r":\s*\S.{20,}|\"[^\"]{20,}\"|'[^']{20,}'")
_VAGUE_NEED = re.compile(
    r"^(?:help me|i need|i want|something|anything|do that|do it|fix it|make it|"
    r"do (?:something|anything|stuff)|i have (?:an idea|a project|a question|something)|"
    r"(?:got a (?:minute|sec|second)\W+)?i need (?:a hand|help|some help)|"
    r"(?:this|that|it)(?:'s| is| was| looks| feels| seems) (?:too|not|so|really|kinda|a bit)\b)"
)
_STOP = word_set(
    """a an the my our your his her their its this that these those some any of for to in on
    at by with and or but me i you we it is are be do does did can could would will please
    pls so up out about from into as than then just really very all again different
    something thing stuff one need want like have has"""
)

_ACTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "task_result",
        re.compile(
            r"\b(?:what (?:did|has|have) (?:you|it|task \w+|[0-9a-f]{12}|the \w+(?: \w+)?) "
            r"(?:produce|produced|come up with|make|made|write|wrote|return|returned|output|"
            r"find|found|give|gave|get|got)|(?:show|give|send) me (?:the |its |your )?"
            r"(?:result|output|answer|what you (?:made|wrote|produced|came up with))|"
            r"show me what you|(?:the |its )?(?:result|output|answer) (?:of|from|for) "
            r"(?:task|the|that|my|it)|what(?:'s| is| was) the (?:result|output|answer)|"
            r"let me see (?:the |what)|what came out|"
            r"\b(?:task|job)\b.*\b(?:produced|generated|returned|came up with)\b|"
            r"show me the (?:finished|final|completed|done) |"
            r"(?:print|paste|dump|display|send) (?:me )?(?:the |its )?(?:result|output|answer))"
        ),
    ),
    (
        "cancel_task",
        re.compile(
            r"^(?:(?:please |pls |ok(?:ay)?,? |actually,? |no,? |never ?mind,? |"
            r"forget (?:it|that|the \w+),? )?"
            r"(?:cancel|abort|kill|stop|drop|scrap|terminate|nuke|scratch)\b"
            r"(?:\s+(?:it|that|this|everything|all|the (?:\w+ ){0,3}"
            r"(?:task|job|one|thing|request|work)|that (?:task|job|one|thing)|"
            r"(?:task |job )?[0-9a-f]{12}|whatever|my (?:task|job|request|last)))?)"
            r"|\bcancel (?:that|it|the|my|task)\b|\bnever ?mind (?:the|that) (?:task|job)\b|"
            r"\bdon't bother (?:finishing|with (?:it|that|the))|\bno need to finish\b|"
            r"\bstop working on (?:it|that|the|my)\b"
        ),
    ),
    (
        "pause_task",
        re.compile(
            r"\b(?:pause|suspend|hold off(?: on)?|put (?:\w+ ){1,4}on hold|"
            r"freeze)\b"
        ),
    ),
    (
        "resume_task",
        re.compile(
            r"\b(?:(?:resume|unpause|un-pause) (?:it|that|this|the|my|task|job|work|working|"
            r"now|[0-9a-f]{12})|unpause|un-pause|carry on|continue (?:with )?(?:it|that|"
            r"the task|the job|working)|pick (?:it|that) back up|pick up where|keep going|"
            r"start (?:it|that) again|restart (?:it|that))\b|"
            r"^(?:ok(?:ay)?,? )?(?:you can |please |go ahead and )?(?:continue|resume)\b"
            r"(?! (?:on|at|in|from)\b)(?!$)|^resume[.!]*$"
        ),
    ),
    (
        "last_request",
        re.compile(
            r"\b(?:(?:last|previous|latest|most recent|prior)(?: \w+)? "
            r"(?:request|ask|question|thing i|message|task|submission)|"
            r"what (?:did|was it) i (?:just |last )?(?:ask|say|request|submit|send)|"
            r"(?:remind me |tell me )?what i (?:asked|said|requested|submitted|sent)(?: \w+)? "
            r"(?:last|before|earlier|previously)|"
            r"which (?:request|task|job) did i|what was my (?:last|previous)|"
            r"(?:last|previous|latest) (?:job|task|thing|request) i (?:queued|submitted|gave|"
            r"sent|asked)|"
            r"what did i (?:ask|submit|send) (?:you )?(?:last|before|earlier))"
        ),
    ),
    (
        "task_status",
        re.compile(
            r"\b(?:hows? (?:my |the |that |your )?(?:\w+ )?"
            r"(?:task|job|work|it|things|that|thing|script|request|[0-9a-f]{12})(?: \w+)? "
            r"(?:going|doing|coming along|progressing|looking|getting on|coming on)|"
            r"how(?:'s| is| are) (?:my |the |that |your )?(?:\w+ )?"
            r"(?:task|job|work|it|things|that|thing|script|request|[0-9a-f]{12})(?: \w+)? "
            r"(?:going|doing|coming along|progressing|looking|getting on|coming on)|"
            r"(?:are|is) (?:you|it) still (?:working|busy|running)|still working on|"
            r"how(?:'s| is) it going with|status of|progress (?:on|of)|"
            r"^(?:is|are|has|have) (?:it|that|my|the|task|[0-9a-f]{12}).*\b"
            r"(?:done|finished|ready|complete|completed|over|running|stuck|working)\b|"
            r"^did (?:it|that|my|the|task).*\b(?:finish|complete|work|succeed|run|pass|fail)|"
            r"what are you (?:working on|doing|busy with|up to)|"
            r"where are (?:we|you) (?:at|with)|any (?:news|progress|update))"
        ),
    ),
)


@dataclass(frozen=True)
class Signals:
    """What the cheap signals say: a weight per kind and the features that fired."""

    weights: dict[Kind, float]
    features: tuple[str, ...]
    action: str | None = None


@dataclass(frozen=True)
class Intent:
    """How a message was read: its kind, how sure, and what was consulted."""

    kind: Kind
    confidence: float
    probabilities: dict[Kind, float]
    action: str | None = None
    features: tuple[str, ...] = ()
    model_vote: Kind | None = None
    """What the UX model said, when it was asked."""
    task_ids: tuple[str, ...] = field(default=())
    """Task ids named in the message."""


# Phrasal verbs read as the one work verb they mean.
_PHRASAL = re.compile(
    r"\b(?:put together|come up with|write up|set up|work out|figure out|knock up|whip up|"
    r"spin up|flesh out|lay out|map out|sketch out|draw up|think up)\b"
)


def _normal(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = _PHRASAL.sub("devise", text)
    text = re.sub(r"\bu\b", "you", text)
    return " ".join(text.split())


def _lead(text: str) -> str:
    """The request with greetings and politeness taken off its front."""
    return _POLITE_LEAD.sub("", text, count=1).strip(" ,!.")


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9+#'_./-]+", text) if w not in _STOP and len(w) > 1]


def read_signals(text: str) -> Signals:
    """The cheap signals of one message (pure: no model, no store)."""
    plain = " ".join(re.sub(r"\bu\b", "you", text.lower().replace("\u2019", "'")).split())
    norm = _normal(text)
    words = re.findall(r"[a-z0-9+#'_./-]+", norm)
    weights: dict[Kind, float] = {"chat": 0.0, "task": 0.0, "unclear": 0.0}
    fired: list[str] = []

    def add(kind: Kind, weight: float, name: str) -> None:
        weights[kind] += weight
        fired.append(name)

    for action, pattern in _ACTION_PATTERNS:
        if pattern.search(plain):
            add("chat", 4.0, f"asks about its tasks ({action})")
            return Signals(weights, tuple(fired), action)

    lead = _request_clause(norm)
    lead_words = re.findall(r"[a-z0-9+#'_./-]+", lead)
    first = lead_words[0] if lead_words else ""
    after_verb = _content_words(" ".join(lead_words[1:]))
    work_verb = first in _WORK_VERBS
    asks_work = bool(_ASKS_WORK.search(norm))
    artefact = bool(_ARTEFACTS.search(norm))
    specific = (
        len(after_verb) >= 3
        or bool(_FILE.search(norm))
        or bool(_COUNTED.search(lead))
        or (len(after_verb) >= 2 and bool(_LANGS.search(norm)))
        or bool(_PAYLOAD.search(norm))
    )
    question_word = bool(_QUESTION_LEAD.match(lead))
    question = norm.endswith("?") or question_word

    if work_verb and specific:
        add("task", 3.0, "a work verb leads a specific request")
    elif work_verb:
        add("unclear", 2.0, "a work verb with a vague object")
        if artefact:
            add("task", 1.0, "names something to produce")
    elif artefact and specific and not question_word:
        add("task", 1.5, "names something specific to produce")
    needs = _NEED.match(_lead(norm))
    if needs and artefact and (specific or len(_content_words(norm)) >= 5):
        add("task", 3.0, "needs something specific made")
    if not work_verb and asks_work:
        add("task", 2.0, "asks for work further on")
    if _TROUBLE.match(lead):
        add("unclear", 2.5, "reports a problem without saying what to do")
    if _SHOW_CODE.search(norm):
        add("task", 3.0, "asks for the code")
    if _FILE.search(norm):
        add("task", 0.5, "names a file")
    if len(_content_words(norm)) >= 8 and (work_verb or artefact):
        add("task", 0.5, "a long, detailed request")

    if not (work_verb and specific) and (_SMALLTALK.match(lead) or _SMALLTALK.match(norm)):
        add("chat", 3.0, "small talk")
    if question and not work_verb and not asks_work:
        add("chat", 2.0 if question_word else 1.0, "a question")
        if len(words) <= 12:
            add("chat", 0.5, "a short question")
    if _QUICK.match(lead) and not (work_verb and specific):
        add("chat", 2.5, "asks for a quick answer")
    if _BRIEF.search(norm):
        add("chat", 1.5, "asks for a brief answer")
    if _OPINION.match(norm) and not (work_verb or asks_work or _TROUBLE.match(lead)):
        add("chat", 2.0, "an opinion or a statement")

    if len(words) <= 2 and not fired:
        add("unclear", 3.0, "a word or two, no request")
    elif not fired and len(words) <= 6:
        add("unclear", 2.0, "a phrase with no request in it")
    if _VAGUE_NEED.match(lead) or _VAGUE_NEED.match(norm):
        add("unclear", 1.0, "a need with no specifics")
        if not specific:
            add("unclear", 1.0, "nothing specific to act on")
    if work_verb and _VAGUE_OBJECT.search(" ".join(lead_words[1:4])) and not specific:
        add("unclear", 1.0, "refers to something not named")
    if not fired:
        add("chat", 1.0, "nothing asks for work")
    return Signals(weights, tuple(fired))


def _request_clause(norm: str) -> str:
    """The clause carrying the request: the first led by a work verb, else the first.

    "cheers, that worked. next one: write a unit file for ..." asks in its
    third clause; greetings, thanks and emoji before it are not the request.
    """
    clauses = [c for c in (_lead(c) for c in _CLAUSE.split(norm)) if c]
    asking = [c for c in clauses if c.split(" ", 1)[0] in _WORK_VERBS]
    if asking:
        # "I need a script that ... . can you write it?": the fuller clause says what.
        return max(asking, key=lambda c: (len(_content_words(c)), -asking.index(c)))
    return clauses[0] if clauses else ""


def _softmax(weights: dict[Kind, float]) -> dict[Kind, float]:
    top = max(weights.values())
    exps = {k: math.exp(v - top) for k, v in weights.items()}
    total = sum(exps.values())
    return {k: exps[k] / total for k in KINDS}


def judge_messages(text: str) -> list[dict[str, str]]:
    """The prompt asking the UX model for its one-word judgement."""
    return [
        {
            "role": "system",
            "content": "Decide what the user wants. Answer with one word. "
            "TASK: they ask you to produce something (code, a script, a document, a plan, "
            "an analysis). CHAT: a greeting, small talk, or a quick question. "
            "UNCLEAR: too vague to act on.",
        },
        {"role": "user", "content": text},
    ]


def parse_vote(answer: str) -> Kind | None:
    """The kind the model named first in its answer, if any."""
    found = re.search(r"\b(task|chat|unclear)\b", answer.lower())
    return None if found is None else found.group(1)  # type: ignore[return-value]


Judge = Callable[[str], Awaitable[str]]


class IntentDetector:
    """Cheap signals first; the UX model's judgement when they are close."""

    def __init__(self, *, consult_margin: float, model_weight: float) -> None:
        self._consult_margin = consult_margin
        self._model_weight = model_weight

    async def detect(self, text: str, judge: Judge | None = None) -> Intent:
        """Read one message; ``judge`` asks the UX model (None: signals only)."""
        signals = read_signals(text)
        weights = dict(signals.weights)
        probs = _softmax(weights)
        ranked = sorted(probs.values(), reverse=True)
        vote: Kind | None = None
        if (
            judge is not None
            and signals.action is None
            and ranked[0] - ranked[1] < (self._consult_margin)
        ):
            vote = parse_vote(await judge(text))
            if vote is not None:
                weights[vote] += self._model_weight
                probs = _softmax(weights)
        kind = max(KINDS, key=lambda k: probs[k])
        return Intent(
            kind=kind,
            confidence=round(probs[kind], 3),
            probabilities={k: round(v, 3) for k, v in probs.items()},
            action=signals.action if kind == "chat" else None,
            features=signals.features,
            model_vote=vote,
            task_ids=tuple(TASK_ID.findall(text.lower())),
        )
