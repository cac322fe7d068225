"""Decomposing a task: classify it, plan it as a DAG of steps, pass context, aggregate.

Pure logic, no I/O and no model calls: the runner asks the task model with the
messages built here and hands the answers back. Everything here is deterministic.

Why the parser is so tolerant: the default task model (SmolLM2-135M) often writes
malformed JSON — single quotes, trailing or missing commas, answers cut off at
``max_tokens``, numbered lists instead of JSON. ``parse_plan`` extracts what it can
(the JSON through ``taled.tasks.planning.lenient_json``), repairs the graph (ids, dangling and self
needs, cycles, length) and says what it repaired in ``Plan.notes``; it raises
``PlanError`` and nothing else, so the runner can ask again or fall back to
``heuristic_plan``, which needs no model.

A ``Plan`` is valid by construction: unique ids, needs that exist, no cycles.
Plans from ``parse_plan`` and ``heuristic_plan`` list steps in a topological order
with ids ``s1..sN``, so "step i of n" follows the order steps can run in.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from taled.errors import PlanError
from taled.models.backends.base import ChatMessage
from taled.tasks.planning.lenient_json import MAX_DEPTH, JsonTooDeep, json_candidates

__all__ = [
    "PLAN_SCHEMA",
    "Complexity",
    "Plan",
    "PlanError",
    "Step",
    "aggregate_messages",
    "check_brief",
    "classify",
    "dependency_context",
    "features",
    "heuristic_plan",
    "parse_plan",
    "plan_messages",
    "results_context",
    "step_brief",
    "step_messages",
]

PLAN_VERSION = 1
# Longest step instruction and title kept; a plan step is a sentence or two.
MAX_INSTRUCTION_CHARS = 600
MAX_TITLE_CHARS = 60
# Task text put into a prompt; the embedded model's context is 2048 tokens.
_TASK_PROMPT_CHARS = 4000
# parse_plan reads at most this much of an answer, and at most this many steps.
_MAX_ANSWER_CHARS = 50_000
_MAX_RAW_STEPS = 500
_ELLIPSIS = "…"
# Room left over before results of indirect dependencies are passed on at all.
_MIN_FURTHER_CHARS = 200
# Steps sharing this fraction of their words (Jaccard) are one step written twice.
_REPEAT_OVERLAP = 0.8

Level = Literal["simple", "medium", "complex"]
_LEVELS: tuple[Level, ...] = get_args(Level)
Source = Literal["model", "repaired", "heuristic"]


def _key(name: object) -> str:
    """``name`` reduced for matching: letters and digits only, case-folded."""
    return "".join(re.findall(r"[^\W_]+", str(name).casefold()))


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------

# Verbs that open a request ("Write ...", "and then test ...").
_ACTION_VERBS = _wordset(
    """add analyse analyze benchmark build calculate check choose collect compare compile
    compute configure convert create debug define deploy describe design develop discuss
    document draft estimate evaluate explain extend find finish fix gather generate give
    group identify illustrate implement improve include install integrate investigate
    make measure migrate optimise optimize organise organize outline plan plot prepare
    profile propose prototype provide publish recommend refactor research review rewrite
    run set setup show sketch suggest summarise summarize test translate update validate
    verify write"""
)
# Verbs that usually mean a multi-part piece of work on their own.
_HEAVY_VERBS = _wordset(
    """architect build deploy design develop implement integrate migrate optimise optimize
    prototype refactor"""
)
# Separate things a request asks to hand over besides the main result.
_DELIVERABLES = _wordset(
    """benchmark benchmarks changelog chart charts diagram diagrams docs documentation
    dockerfile examples itinerary presentation readme report slides summary table tests
    tutorial"""
)
_SEQUENCERS = re.compile(
    r"\b(?:then|after that|afterwards|next|finally|lastly|also|as well as|followed by|"
    r"in addition|first|second|third|once done)\b",
    re.IGNORECASE,
)
_STEP_WORDS = re.compile(r"\b(?:steps?|stages?|phases?)\b", re.IGNORECASE)
_LIST_ITEM = re.compile(
    r"^\s*(?:(?:step\s*)?\d{1,2}\s*[.):]|\(\d{1,2}\)|[a-h][.)]|[-*•+])\s+(\S.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_VERBS_ALTERNATION = "|".join(sorted(_ACTION_VERBS))
_CLAUSE_BREAK = re.compile(
    rf"(?:,\s*(?:and\s+)?then\b|\band\s+then\b|;|\bthen\b|"
    rf"[,:]\s*(?:and\s+)?(?:also\s+)?(?=(?:{_VERBS_ALTERNATION})\b)|"
    rf"\s+and\s+(?:also\s+)?(?=(?:{_VERBS_ALTERNATION})\b))",
    re.IGNORECASE,
)
# Words skipped before a clause's verb: "and then also write ...".
_FILLERS = _wordset(
    """and also then please finally lastly next afterwards first second third now
    after that once done"""
)

# Classifier weights: each feature's contribution to the raw score (see classify).
_WEIGHTS: dict[str, float] = {
    "extra_requests": 0.45,
    "extra_verbs": 0.25,
    "heavy_verbs": 0.35,
    "deliverables": 0.35,
    "sequencers": 0.4,
    "extra_items": 0.35,
    "commas": 0.08,
    "step_words": 0.3,
    "extra_questions": 0.2,
    "length": 0.6,
}
_MEDIUM_AT = 0.3
_COMPLEX_AT = 0.6


@dataclass(frozen=True)
class Complexity:
    """How complex a task looks: a level, a 0..1 score, a confidence and the reasons."""

    level: Level
    score: float
    confidence: float
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The checkpoint form (a task's ``complexity``, an assessment's ``rules``)."""
        return {
            "level": self.level,
            "score": self.score,
            "confidence": self.confidence,
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_json(cls, data: object) -> Complexity:
        """The verdict ``to_json`` wrote; ValueError naming what is wrong if ``data`` is
        not exactly that. Numbers are kept as they were read (an ``int`` score stays one),
        so the form written back is the form read."""
        if not isinstance(data, dict) or set(data) != {"level", "score", "confidence", "reasons"}:
            raise ValueError("a complexity is an object of level, score, confidence, reasons")
        level, score, confidence, reasons = (
            data["level"],
            data["score"],
            data["confidence"],
            data["reasons"],
        )
        if level not in _LEVELS:
            raise ValueError(f"a complexity's level is {level!r}, not one of {list(_LEVELS)}")
        for name, value in (("score", score), ("confidence", confidence)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"a complexity's {name} is {value!r}, not a number")
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise ValueError("a complexity's reasons are not a list of strings")
        return cls(level, score, confidence, tuple(reasons))


def features(text: str) -> dict[str, float]:
    """Cheap text features of a task, the classifier's whole input (all counts).

    chars, words, sentences; requests (clauses opening with an action verb);
    verbs (distinct action verbs); heavy_verbs (build, implement, design, ...);
    deliverables (tests, README, report, ...); sequencers (then, also, finally, ...);
    items (enumerated or bulleted lines); commas; step_words; questions.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    vocabulary = set(words)
    sentences = [s for s in re.split(r"[.!?\n]+", text) if s.strip()]
    return {
        "chars": float(len(text)),
        "words": float(len(words)),
        "sentences": float(len(sentences)),
        "requests": float(sum(1 for clause in _clauses(text) if _opens_with_verb(clause))),
        "verbs": float(len(vocabulary & _ACTION_VERBS)),
        "heavy_verbs": float(len(vocabulary & _HEAVY_VERBS)),
        "deliverables": float(len(vocabulary & _DELIVERABLES)),
        "sequencers": float(len(_SEQUENCERS.findall(text))),
        "items": float(len(_LIST_ITEM.findall(text))),
        "commas": float(text.count(",")),
        "step_words": float(len(_STEP_WORDS.findall(text))),
        "questions": float(text.count("?")),
    }


def classify(text: str, feats: dict[str, float] | None = None) -> Complexity:
    """A first, rule-based complexity classifier over ``features(text)``.

    Each feature adds its weight in ``_WEIGHTS`` per unit beyond the first request,
    verb, item or question (one of each is what a simple task has); length adds up
    to 1.2 at 200 words. The score is ``1 - exp(-raw)``: simple below 0.3, complex
    from 0.6. Confidence is the score's distance from the nearest level boundary
    (0.5 on a boundary, 1.0 at 0.3 or more away): a margin, not a probability.
    The learning engine blends it with what history says (taled.learning.complexity),
    and is the one caller of it for a task (``Assessment.rules``); ``feats``, when
    given, are ``features(text)`` already computed.
    """
    f = feats if feats is not None else features(text)
    parts = {
        "extra_requests": max(f["requests"] - 1, 0),
        "extra_verbs": max(f["verbs"] - 1, 0),
        "heavy_verbs": f["heavy_verbs"],
        "deliverables": f["deliverables"],
        "sequencers": f["sequencers"],
        "extra_items": max(f["items"] - 1, 0),
        "commas": min(f["commas"], 10),
        "step_words": min(f["step_words"], 3),
        "extra_questions": max(f["questions"] - 1, 0),
        "length": min(f["words"] / 100, 2),
    }
    raw = sum(_WEIGHTS[name] * value for name, value in parts.items())
    score = 1 - math.exp(-raw)
    level: Level = (
        "complex" if score >= _COMPLEX_AT else "medium" if score >= _MEDIUM_AT else "simple"
    )
    margin = min(abs(score - _MEDIUM_AT), abs(score - _COMPLEX_AT))
    confidence = 0.5 + 0.5 * min(1.0, margin / 0.3)
    return Complexity(
        level=level,
        score=round(score, 4),
        confidence=round(confidence, 4),
        reasons=_reasons(f),
    )


def _reasons(f: Mapping[str, float]) -> tuple[str, ...]:
    reasons = []
    if f["requests"] > 1:
        reasons.append(f"{f['requests']:.0f} separate requests")
    if f["heavy_verbs"]:
        reasons.append(f"{f['heavy_verbs']:.0f} build/implement/design-type verbs")
    if f["deliverables"]:
        reasons.append(f"{f['deliverables']:.0f} extra deliverables (tests, docs, report, ...)")
    if f["sequencers"]:
        reasons.append(f"{f['sequencers']:.0f} sequencing words (then, also, ...)")
    if f["items"] > 1:
        reasons.append(f"{f['items']:.0f} enumerated items")
    if f["step_words"]:
        reasons.append("mentions steps or stages")
    if f["questions"] > 1:
        reasons.append(f"{f['questions']:.0f} questions")
    if f["words"] >= 60:
        reasons.append(f"long ({f['words']:.0f} words)")
    return tuple(reasons) or ("one short request",)


def _clauses(text: str) -> list[str]:
    """Sentences cut at "then", ";" and before ", <verb>", "and <verb>", ": <verb>"."""
    clauses: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        clauses.extend(c.strip() for c in _CLAUSE_BREAK.split(sentence) if c.strip())
    return clauses


def _opens_with_verb(clause: str) -> bool:
    for word in _WORD.findall(clause.lower())[:4]:
        if word in _ACTION_VERBS:
            return True
        if word not in _FILLERS:
            return False
    return False


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One subtask: what to do, and the ids of the steps whose results it needs."""

    id: str
    title: str
    instruction: str
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A DAG of steps; constructing an invalid one raises PlanError."""

    steps: tuple[Step, ...]
    source: Source
    notes: tuple[str, ...] = ()
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _check_steps(self.steps))
        if self.source not in ("model", "repaired", "heuristic"):
            raise PlanError(f"unknown plan source {self.source!r}")

    def step(self, step_id: str) -> Step:
        """The step with this id (KeyError if there is none)."""
        return self.steps[self._index[step_id]]

    def ready(self, done: set[str], running: set[str]) -> list[str]:
        """Steps not done or running whose needs are all done, in plan order."""
        return [
            s.id
            for s in self.steps
            if s.id not in done and s.id not in running and all(n in done for n in s.needs)
        ]

    def order(self) -> list[str]:
        """A topological order: each step after its needs, earlier-listed steps first."""
        needs = [[self._index[n] for n in s.needs] for s in self.steps]
        return [self.steps[i].id for i in _topological(needs)]

    def layers(self) -> list[list[str]]:
        """Steps grouped by depth: layer k's longest chain of needs has k steps."""
        depth: dict[str, int] = {}
        for step_id in self.order():
            depth[step_id] = max((depth[n] + 1 for n in self.step(step_id).needs), default=0)
        layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for s in self.steps:
            layers[depth[s.id]].append(s.id)
        return layers

    def ancestors(self, step_id: str) -> list[str]:
        """Every step ``step_id`` depends on, nearest first (direct needs in order)."""
        seen: set[str] = set()
        found: list[str] = []
        frontier = list(self.step(step_id).needs)
        while frontier:
            following: list[str] = []
            for n in frontier:
                if n not in seen:
                    seen.add(n)
                    found.append(n)
                    following.extend(self.step(n).needs)
            frontier = following
        return found

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for checkpoints); ``from_json`` reads it back."""
        return {
            "version": PLAN_VERSION,
            "source": self.source,
            "notes": list(self.notes),
            "steps": [
                {"id": s.id, "title": s.title, "instruction": s.instruction, "needs": list(s.needs)}
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> Plan:
        """The plan ``to_json`` wrote; PlanError if ``data`` is not exactly that."""
        if not isinstance(data, dict):
            raise PlanError("a saved plan must be a JSON object")
        if unknown := set(data) - {"version", "source", "notes", "steps"}:
            # Refused, not dropped: a plan read back must write back as it was read.
            raise PlanError(f"saved plan has unknown fields {sorted(unknown)}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"saved plan version {data.get('version')!r} is not {PLAN_VERSION}")
        source, notes, raw_steps = data.get("source"), data.get("notes"), data.get("steps")
        if source not in ("model", "repaired", "heuristic"):
            raise PlanError(f"saved plan has an unknown source {source!r}")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise PlanError("saved plan notes must be a list of strings")
        if not isinstance(raw_steps, list):
            raise PlanError("saved plan steps must be a list")
        steps = []
        for position, raw in enumerate(raw_steps, 1):
            if not isinstance(raw, dict) or set(raw) != {"id", "title", "instruction", "needs"}:
                raise PlanError(f"saved plan step {position} is not an id/title/instruction/needs")
            needs = raw["needs"]
            fields = (raw["id"], raw["title"], raw["instruction"])
            if not all(isinstance(v, str) for v in fields) or not (
                isinstance(needs, list) and all(isinstance(n, str) for n in needs)
            ):
                raise PlanError(f"saved plan step {position} has a field of the wrong type")
            steps.append(Step(raw["id"], raw["title"], raw["instruction"], tuple(needs)))
        return cls(tuple(steps), source, tuple(notes))


def _check_steps(steps: tuple[Step, ...]) -> dict[str, int]:
    """The id → position index of valid steps; PlanError naming the first fault."""
    if not steps:
        raise PlanError("a plan needs at least one step")
    index: dict[str, int] = {}
    for position, s in enumerate(steps):
        if not s.id or not s.id.strip():
            raise PlanError(f"step {position + 1} has no id")
        if s.id in index:
            raise PlanError(f"step id {s.id!r} is used twice")
        if not s.title.strip() or not s.instruction.strip():
            raise PlanError(f"step {s.id!r} has an empty title or instruction")
        index[s.id] = position
    for s in steps:
        if len(set(s.needs)) != len(s.needs):
            raise PlanError(f"step {s.id!r} lists a need twice")
        for n in s.needs:
            if n == s.id:
                raise PlanError(f"step {s.id!r} needs itself")
            if n not in index:
                raise PlanError(f"step {s.id!r} needs unknown step {n!r}")
    needs = [[index[n] for n in s.needs] for s in steps]
    if len(_topological(needs)) != len(steps):
        raise PlanError("the plan's needs form a cycle")
    return index


def _topological(needs: list[list[int]]) -> list[int]:
    """Kahn's order, earliest-listed ready node first; shorter than ``needs`` on a cycle."""
    waiting = [len(set(n)) for n in needs]
    users: list[list[int]] = [[] for _ in needs]
    for node, ns in enumerate(needs):
        for n in set(ns):
            users[n].append(node)
    ready = [node for node, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    return order


# ---------------------------------------------------------------------------
# Asking for a plan
# ---------------------------------------------------------------------------

_PLAN_SYSTEM = (
    "You split a task into a few steps. Reply with JSON only: "
    '{"steps": [{"id": "s1", "title": "...", "do": "...", "needs": []}]}. '
    '"needs" lists the ids of steps that must be finished first. '
    "A step never needs itself; the first step needs nothing."
)
_ExampleStep = tuple[str, str, tuple[str, ...]]  # title, instruction, needs
# Two worked examples: one fans out from a first step, one is a chain. Measured on
# SmolLM2-135M, two examples gave sensible plans more often than one, and no
# self-needs (see tests/data/plans_smollm2.json).
_EXAMPLES: tuple[tuple[str, tuple[_ExampleStep, ...]], ...] = (
    (
        "Write a Python function that checks whether a word is a palindrome, "
        "test it, and explain how it works.",
        (
            (
                "Function",
                "Write a Python function is_palindrome(word) returning True or False.",
                (),
            ),
            ("Tests", "Write pytest tests for is_palindrome.", ("s1",)),
            ("Explanation", "Explain in a short paragraph how is_palindrome works.", ("s1",)),
        ),
    ),
    (
        "Research electric cars, compare three models in a table, and then recommend one.",
        (
            ("Research", "List the main facts about three electric car models.", ()),
            ("Table", "Compare the three models in a table.", ("s1",)),
            ("Recommendation", "Recommend one model and say why.", ("s2",)),
        ),
    ),
)
_EXAMPLE_INSTRUCTIONS = frozenset(_key(do) for _, steps in _EXAMPLES for _, do, _ in steps)

# The most steps any plan may have (the ceiling of planner.max_steps in settings).
_MAX_PLAN_STEPS = 50
# Longest instruction a plan's schema lets a model write: shorter than parse_plan keeps,
# so that several steps fit in planner.plan_max_tokens (256) and the JSON gets closed.
_SCHEMA_INSTRUCTION_CHARS = 200
_STEP_IDS = [f"s{n}" for n in range(1, _MAX_PLAN_STEPS + 1)]
PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 2,
            "maxItems": _MAX_PLAN_STEPS,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"enum": _STEP_IDS},
                    "title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS},
                    "do": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": _SCHEMA_INSTRUCTION_CHARS,
                    },
                    "needs": {
                        "type": "array",
                        "items": {"enum": _STEP_IDS},
                        "maxItems": _MAX_PLAN_STEPS - 1,
                    },
                },
                "required": ["id", "title", "do", "needs"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["steps"],
    "additionalProperties": False,
}
"""The JSON Schema of the answer ``plan_messages`` asks for, for a model call's
``schema`` (a grammar on the embedded model, so its answer is JSON of this form unless
max_tokens cuts it): the form of its worked examples, ``{"steps": [{"id", "title",
"do", "needs"}]}``, 2 to 50 steps, ids ``s1``..``s50``, a title as long as
``parse_plan`` keeps and an instruction of at most 200 characters. The answer is still
read with ``parse_plan``: what a schema cannot say (unique ids, needs on earlier steps,
steps that differ) it repairs or refuses. Measured on SmolLM2-135M over the 20 tasks of
tests/data/plans_smollm2.json (tests/test_tool_calls.py): 17 answers are schema-valid
JSON (3 cut at max_tokens) and 14 make a plan, against 9 recorded without the schema."""


def _plan_request(task_text: str, max_steps: int) -> str:
    return f"Task: {task_text}\nSplit this task into 2 to {max_steps} steps. JSON only."


def _plan_json(steps: tuple[_ExampleStep, ...]) -> str:
    return json.dumps(
        {
            "steps": [
                {"id": f"s{i}", "title": title, "do": do, "needs": list(needs)}
                for i, (title, do, needs) in enumerate(steps, 1)
            ]
        }
    )


def plan_messages(task_text: str, max_steps: int) -> list[ChatMessage]:
    """Messages asking the task model for a plan as strict JSON, after two worked examples."""
    messages: list[ChatMessage] = [{"role": "system", "content": _PLAN_SYSTEM}]
    for example, steps in _EXAMPLES:
        messages.append({"role": "user", "content": _plan_request(example, max_steps)})
        messages.append({"role": "assistant", "content": _plan_json(steps)})
    task = _clip(task_text, _TASK_PROMPT_CHARS)
    messages.append({"role": "user", "content": _plan_request(task, max_steps)})
    return messages


# ---------------------------------------------------------------------------
# Reading a plan from a model's answer
# ---------------------------------------------------------------------------


class _Malformed(Exception):
    """Internal: this candidate holds no plan (the message says why)."""


@dataclass
class _RawStep:
    """A step as the model wrote it, before the graph is repaired."""

    id: str | None
    title: str
    instruction: str
    needs: list[object] | None  # None: the step had no needs field at all


_ID_KEYS = ("id", "stepid")
_TITLE_KEYS = ("title", "name", "summary", "label")
_DO_KEYS = (
    "do",
    "instruction",
    "instructions",
    "task",
    "description",
    "action",
    "text",
    "content",
    "details",
    "prompt",
    "goal",
)
_NEEDS_KEYS = (
    "needs",
    "dependson",
    "depends",
    "dependencies",
    "deps",
    "after",
    "requires",
    "prerequisites",
)
_LIST_KEYS = ("steps", "plan", "tasks", "subtasks", "items")


def parse_plan(text: str, max_steps: int) -> Plan:
    """The plan in a model's answer, repaired into a valid DAG; PlanError if there is none.

    Tries each JSON candidate in turn (fenced blocks, then ``{...}``/``[...]`` spans,
    broken JSON repaired), then a numbered or bulleted list as a linear plan. Repairs
    are listed in ``notes`` (source "repaired"); a plan of fewer than two steps is no
    plan.
    """
    if max_steps < 2:
        raise ValueError("max_steps must be at least 2")
    text = text[:_MAX_ANSWER_CHARS]
    reasons: list[str] = []  # why each candidate failed; the first is the telling one
    for candidate in json_candidates(text):
        try:
            reading = candidate.read()
            raws, notes = _interpret(reading.value)
            if reading.repairs:
                notes.insert(0, f"JSON repaired ({', '.join(sorted(reading.repairs))})")
            return _build(raws, notes, max_steps)
        except (_Malformed, JsonTooDeep) as exc:
            reasons.append(str(exc))
    items = [m.group(1) for m in itertools.islice(_LIST_ITEM.finditer(text), _MAX_RAW_STEPS)]
    if len(items) >= 2:
        raws = [_RawStep(None, "", _strip_markup(item), None) for item in items]
        try:
            return _build(raws, ["read a plain-text list as steps"], max_steps)
        except _Malformed as exc:
            reasons.append(str(exc))
    reason = reasons[0] if reasons else "it holds neither JSON nor a numbered list"
    raise PlanError(f"no usable plan in the model's answer: {reason}")


def _field(step: Mapping[str, object], names: tuple[str, ...]) -> object:
    keyed = {_key(k): v for k, v in step.items()}
    for name in names:
        if name in keyed:
            return keyed[name]
    return None


def _interpret(value: object) -> tuple[list[_RawStep], list[str]]:
    """Raw steps from a parsed JSON value: ``{"steps": [...]}``, a list, or id → step."""
    notes: list[str] = []
    for _ in range(3):  # {"plan": {"steps": [...]}} and the like
        if not isinstance(value, dict):
            break
        inner = _field(value, _LIST_KEYS)
        if isinstance(inner, list | dict):
            value = inner
        elif all(isinstance(v, dict) and _field(v, _DO_KEYS) for v in value.values()) and value:
            # {"s1": {"do": ...}, "s2": {...}}: the keys are the ids.
            value = [{"id": k, **v} for k, v in value.items() if isinstance(v, dict)]
        else:
            break
    if not isinstance(value, list):
        value = _nested_steps(value)
    if value is None:
        raise _Malformed("the JSON holds no list of steps")
    raws: list[_RawStep] = []
    for item in value[:_MAX_RAW_STEPS]:
        if isinstance(item, str):
            raws.append(_RawStep(None, "", item, None))
        elif isinstance(item, dict):
            raws.append(_raw_step(item))
        else:
            raws.append(_RawStep(None, "", "", None))
    if len(value) > _MAX_RAW_STEPS:
        notes.append(f"read only the first {_MAX_RAW_STEPS} of {len(value)} steps")
    return raws, notes


def _nested_steps(value: object) -> list[object] | None:
    """The first list, breadth first, holding at least two step-like objects."""
    frontier = [value]
    for _ in range(MAX_DEPTH):
        following: list[object] = []
        for v in frontier:
            if isinstance(v, list):
                if sum(isinstance(i, dict) and bool(_field(i, _DO_KEYS)) for i in v) >= 2:
                    return v
                following.extend(v)
            elif isinstance(v, dict):
                following.extend(v.values())
        if not following:
            break
        frontier = following
    return None


def _raw_step(item: Mapping[str, object]) -> _RawStep:
    step_id = _field(item, _ID_KEYS)
    step_field = _field(item, ("step",))
    if step_id is None and isinstance(step_field, int | str) and _looks_like_id(step_field):
        step_id = step_field
    title = _as_text(_field(item, _TITLE_KEYS))
    instruction = _as_text(_field(item, _DO_KEYS))
    if not instruction and isinstance(step_field, str) and not _looks_like_id(step_field):
        instruction = step_field
    needs = _field(item, _NEEDS_KEYS)
    has_needs = any(_key(k) in _NEEDS_KEYS for k in item)
    return _RawStep(
        id=None if step_id is None or isinstance(step_id, list | dict) else str(step_id),
        title=title,
        instruction=instruction or title,
        needs=_as_refs(needs) if has_needs else None,
    )


def _looks_like_id(value: object) -> bool:
    return bool(re.fullmatch(r"(?:s|step|t|task)?[ _-]?\d{1,4}", str(value).strip(), re.I))


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(v for v in value if isinstance(v, str))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _as_refs(value: object) -> list[object]:
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, str):
        refs = (r.strip() for r in re.split(r"[,;]|\band\b", value))
        return [r for r in refs if r and r.lower() not in ("none", "-")]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str | int) and not isinstance(v, bool)]
    if isinstance(value, int):
        return [value]
    return []


class _Notes:
    """Repairs counted by kind, a few examples each, rendered as short notes."""

    def __init__(self) -> None:
        self._seen: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self._seen.setdefault(kind, []).append(example)

    def render(self) -> list[str]:
        rendered = []
        for kind, examples in self._seen.items():
            shown = ", ".join(examples[:3]) + (", ..." if len(examples) > 3 else "")
            count = f" (x{len(examples)})" if len(examples) > 1 else ""
            rendered.append(f"{kind}{count}: {shown}")
        return rendered


def _build(raws: list[_RawStep], notes: list[str], max_steps: int) -> Plan:
    """Repair raw steps into a valid Plan (see parse_plan); _Malformed if too few remain."""
    repairs = _Notes()
    count = len(raws)
    instructions = [_clean(r.instruction, MAX_INSTRUCTION_CHARS) for r in raws]
    for i, r in enumerate(raws):
        if len(" ".join(r.instruction.split())) > MAX_INSTRUCTION_CHARS:
            repairs.add("instruction shortened", f"step {i + 1}")

    # Ids: the first use of an id names the step; a repeated one is renamed.
    by_id: dict[str, int] = {}
    for i, r in enumerate(raws):
        key = _key(r.id) if r.id is not None else ""
        if key and key in by_id:
            repairs.add("duplicate id renamed", repr(r.id))
        elif key:
            by_id[key] = i
    by_title: dict[str, int] = {}
    for i, r in enumerate(raws):
        by_title.setdefault(_key(r.title), i)

    def resolve(ref: object) -> int | None:
        key = _key(ref)
        if key in by_id:
            return by_id[key]
        number = re.fullmatch(r"(?:s|step|t|task)?(\d{1,4})", key)
        if number:
            n = int(number.group(1))
            for alias in (str(n), f"s{n}", f"step{n}", f"t{n}", f"task{n}"):
                if alias in by_id:
                    return by_id[alias]
            if 1 <= n <= count:
                return n - 1
        if key and key in by_title:
            return by_title[key]
        return None

    implicit = all(r.needs is None for r in raws)
    if implicit and count > 1:
        notes.append("no needs given: the steps run one after another")
    needs: list[list[int]] = []
    for i, r in enumerate(raws):
        if implicit:
            needs.append([i - 1] if i else [])
            continue
        resolved: list[int] = []
        for ref in r.needs or []:
            j = resolve(ref)
            if j is None:
                repairs.add("need on an unknown step dropped", repr(ref)[:40])
            elif j == i:
                repairs.add("need on itself dropped", f"step {i + 1}")
            elif j not in resolved:
                resolved.append(j)
        needs.append(resolved)

    # Empty steps go: whoever needed one needs what it needed instead. A step that
    # repeats an earlier one (nearly the same words) goes too: its users need the
    # earlier one. Small models often write the whole task out as every step.
    dropped: dict[int, int | None] = {}
    vocabularies: list[tuple[int, frozenset[str]]] = []
    for i in range(count):
        if not instructions[i]:
            dropped[i] = None
            repairs.add("empty step dropped", f"step {i + 1}")
            continue
        if _key(instructions[i]) in _EXAMPLE_INSTRUCTIONS:
            dropped[i] = None
            repairs.add("step copied from the prompt's example dropped", f"step {i + 1}")
            continue
        words = _vocabulary(instructions[i])
        same = next((j for j, other in vocabularies if _same_words(words, other)), None)
        if same is None:
            vocabularies.append((i, words))
        else:
            dropped[i] = same
            repairs.add("repeated step dropped", f"step {i + 1} = step {same + 1}")
    if dropped:
        needs = [
            [] if i in dropped else [j for j in _stand_ins(ns, needs, dropped) if j != i]
            for i, ns in enumerate(needs)
        ]
    empty = set(dropped)

    for node, n in _back_edges(needs, empty):
        needs[node].remove(n)
        repairs.add("cycle broken", f"step {node + 1} no longer needs step {n + 1}")

    kept = [i for i in _topological(needs) if i not in empty]
    if len(kept) > max_steps:
        repairs.add("plan cut", f"{len(kept)} steps cut to {max_steps}")
        kept = kept[:max_steps]
    if len(kept) < 2:
        copied = any(_key(instructions[i]) in _EXAMPLE_INSTRUCTIONS for i in range(count))
        raise _Malformed(
            "the answer copies the prompt's example instead of planning the task"
            if copied
            else f"{len(kept)} usable step{'s' if len(kept) != 1 else ''}; a plan needs at least 2"
        )
    new_id = {old: f"s{k}" for k, old in enumerate(kept, 1)}
    position = {old: k for k, old in enumerate(kept)}
    steps = tuple(
        Step(
            id=new_id[i],
            title=_clean(raws[i].title, MAX_TITLE_CHARS) or _title(instructions[i]),
            instruction=instructions[i],
            needs=tuple(new_id[j] for j in sorted(needs[i], key=position.__getitem__)),
        )
        for i in kept
    )
    notes.extend(repairs.render())
    return Plan(steps, "repaired" if notes else "model", tuple(notes))


def _vocabulary(text: str) -> frozenset[str]:
    words = set(re.findall(r"[^\W_]+", text.casefold())) - {"a", "an", "the"}
    return frozenset(words or {text})


def _same_words(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether two steps say nearly the same thing: 80% of their words shared."""
    return len(a & b) >= _REPEAT_OVERLAP * len(a | b)


def _stand_ins(ns: list[int], needs: list[list[int]], dropped: dict[int, int | None]) -> list[int]:
    """``ns`` with each dropped step replaced by its stand-in, or by its own needs."""
    out: list[int] = []
    seen: set[int] = set()
    stack = list(reversed(ns))
    while stack:
        j = stack.pop()
        if j in seen:
            continue
        seen.add(j)
        if j not in dropped:
            out.append(j)
        elif (stand_in := dropped[j]) is not None:
            stack.append(stand_in)
        else:
            stack.extend(reversed(needs[j]))
    return out


def _back_edges(needs: list[list[int]], skip: set[int]) -> list[tuple[int, int]]:
    """Edges closing a cycle, found by a DFS over needs in plan order (deterministic)."""
    state = [0] * len(needs)  # 0 unseen, 1 on the DFS stack, 2 finished
    back: list[tuple[int, int]] = []
    for root in range(len(needs)):
        if state[root] or root in skip:
            continue
        state[root] = 1
        stack = [(root, 0)]
        while stack:
            node, k = stack[-1]
            if k < len(needs[node]):
                stack[-1] = (node, k + 1)
                nxt = needs[node][k]
                if state[nxt] == 1:
                    back.append((node, nxt))
                elif state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                stack.pop()
    return back


def _clean(text: str, limit: int) -> str:
    """``text`` as one line of printable characters, at most ``limit`` long."""
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + _ELLIPSIS
    return text


def _title(instruction: str) -> str:
    words = instruction.split()
    title = " ".join(words[:6]).rstrip(".,;:")
    return _clean(title + (_ELLIPSIS if len(words) > 6 else ""), MAX_TITLE_CHARS) or "Step"


def _strip_markup(item: str) -> str:
    return re.sub(r"[*_`#]+", "", item).strip()


# ---------------------------------------------------------------------------
# A plan without the model
# ---------------------------------------------------------------------------

_BACK_REFERENCE = re.compile(
    r"\b(?:it|its|them|this|that|these|those|the result|the results|above)\b", re.IGNORECASE
)
_ORDER_WORDS = re.compile(
    r"\b(?:then|after|afterwards|next|finally|lastly|first|before|once)\b", re.IGNORECASE
)


def heuristic_plan(text: str, max_steps: int) -> Plan:
    """A plan from the task text alone, for when the model gives none.

    Enumerated items, or the requests in the text (clauses opening with a verb,
    split at "then", ";" and after a colon), become steps: a chain when they follow
    on from each other (order words, "it", "them"), otherwise parallel steps and a
    final one combining them (the text before the list or colon, if any). Nothing
    to split: work out the approach, then produce the result.
    """
    if max_steps < 2:
        raise ValueError("max_steps must be at least 2")
    head, items, how = _split_task(text)
    items = [i for i in (_clean(i, MAX_INSTRUCTION_CHARS) for i in items) if i]
    if len(items) < 2:
        return _generic_plan()
    chained = bool(_ORDER_WORDS.search(text)) or any(_BACK_REFERENCE.search(i) for i in items[1:])
    if not chained and max_steps >= 3:
        parts = _merge_tail(items, max_steps - 1)
        steps = [Step(f"s{k}", _title(p), p) for k, p in enumerate(parts, 1)]
        if head:
            title = _title(head)
            final = f"{head.rstrip('.')}: put the results of the previous steps together."
        else:
            title = "Combine the parts"
            final = "Combine the results of the previous steps into one complete result."
        final_id = f"s{len(parts) + 1}"
        steps.append(Step(final_id, title, final, tuple(s.id for s in steps)))
        note = f"split at {how}: independent parts, then a step combining them"
    else:
        parts = _merge_tail(items, max_steps)
        steps = [
            Step(f"s{k}", _title(p), p, (f"s{k - 1}",) if k > 1 else ())
            for k, p in enumerate(parts, 1)
        ]
        note = f"split at {how}: each step after the one before"
    return Plan(tuple(steps), "heuristic", (note,))


def _split_task(text: str) -> tuple[str, list[str], str]:
    """The task's heading (text before a list or colon, may be empty), its parts, and how."""
    matches = list(_LIST_ITEM.finditer(text))
    if len(matches) >= 2:
        head = _clean(text[: matches[0].start()], MAX_INSTRUCTION_CHARS).rstrip(":")
        return head, [_strip_markup(m.group(1)) for m in matches], "enumerated items"
    colon = re.match(r"\s*([^:\n]{3,200}):\s+(\S.*)", text, re.DOTALL)
    if colon:
        parts = _requests(colon.group(2))
        if len(parts) >= 2:
            head = _clean(colon.group(1), MAX_INSTRUCTION_CHARS)
            return head, parts, "the requests after the colon"
    return "", _requests(text), "the requests in the text"


def _requests(text: str) -> list[str]:
    """Clauses that open with an action verb; other clauses join the one before."""
    pieces: list[str] = []
    for clause in _clauses(text):
        if _opens_with_verb(clause) or not pieces:
            pieces.append(_drop_fillers(clause))
        else:
            pieces[-1] = f"{pieces[-1]}, {clause}"
    return pieces


def _drop_fillers(clause: str) -> str:
    words = clause.split()
    while words and words[0].lower().strip(",") in _FILLERS:
        words.pop(0)
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _merge_tail(items: list[str], limit: int) -> list[str]:
    if len(items) <= limit:
        return items
    return [*items[: limit - 1], " ".join(items[limit - 1 :])]


def _generic_plan() -> Plan:
    return Plan(
        (
            Step(
                "s1",
                "Work out the approach",
                "Work out how to do the task: list the parts of the answer "
                "and how to produce each, briefly.",
            ),
            Step(
                "s2",
                "Produce the result",
                "Produce the complete result of the task, following the approach worked out.",
                ("s1",),
            ),
        ),
        "heuristic",
        ("nothing to split: work out the approach, then produce the result",),
    )


# ---------------------------------------------------------------------------
# Context passing and aggregation
# ---------------------------------------------------------------------------


def dependency_context(plan: Plan, step_id: str, outputs: dict[str, str], max_chars: int) -> str:
    """What a step's dependencies produced, labelled by title, in at most ``max_chars``.

    Direct needs come first and share the room fairly (a short output leaves its
    unused share to the others; a long one keeps its head and tail around "…").
    Further ancestors are added, nearest first, only when every direct output fits
    whole. Every direct need is named whenever ``max_chars`` has room for the labels.
    """
    direct = list(plan.step(step_id).needs)
    if not direct:
        return ""
    text, whole = _blocks(plan, direct, outputs, max_chars)
    further = [a for a in plan.ancestors(step_id) if a not in direct]
    room = max_chars - len(text) - 2
    if whole and further and room >= _MIN_FURTHER_CHARS:
        more, _ = _blocks(plan, further, outputs, room)
        if more:
            text = f"{text}\n\n{more}"
    return text


def results_context(results: Sequence[tuple[str, str]], max_chars: int) -> str:
    """Titled results in at most ``max_chars``, sharing the room fairly as a step's
    dependencies do (``dependency_context``): what a task submitted to run after others
    is told they produced."""
    text, _ = _labelled([t for t, _ in results], [r for _, r in results], max_chars)
    return text


def _blocks(
    plan: Plan, ids: list[str], outputs: Mapping[str, str], max_chars: int
) -> tuple[str, bool]:
    """Labelled outputs of ``ids`` sharing ``max_chars`` fairly; and whether all fit whole."""
    titles = [plan.step(i).title for i in ids]
    return _labelled(titles, [outputs.get(i, "") for i in ids], max_chars)


def _labelled(titles: list[str], outputs: list[str], max_chars: int) -> tuple[str, bool]:
    """``outputs`` under their titles sharing ``max_chars`` fairly; whether all fit whole."""
    labels = [f"### {title}\n" for title in titles]
    room = max_chars - 2 * (len(titles) - 1) - sum(len(label) for label in labels)
    if room < 0:
        # Not even the labels fit: as many shortened labels as there is room for.
        kept: list[str] = []
        for title in titles:
            label = f"### {_clip(title, 24)}"
            if sum(len(k) + 2 for k in kept) + len(label) > max_chars:
                break
            kept.append(label)
        return "\n\n".join(kept), False
    bodies = [o.strip() or "(no result)" for o in outputs]
    shares = _fair_shares([len(b) for b in bodies], room)
    clipped = [_clip(b, share) for b, share in zip(bodies, shares, strict=True)]
    text = "\n\n".join(label + body for label, body in zip(labels, clipped, strict=True))
    return text, clipped == bodies


def _fair_shares(lengths: list[int], room: int) -> list[int]:
    """Max-min fair split of ``room``: nobody gets more than they need."""
    shares = [0] * len(lengths)
    left = room
    pending = sorted(range(len(lengths)), key=lambda i: lengths[i])
    while pending:
        share = left // len(pending)
        i = pending.pop(0)
        shares[i] = min(lengths[i], share)
        left -= shares[i]
    return shares


def _clip(text: str, limit: int) -> str:
    """``text`` if it fits ``limit``, else its head and tail joined by "…"."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = (limit - 1) * 2 // 3
    tail = limit - 1 - head
    return text[:head] + _ELLIPSIS + (text[-tail:] if tail else "")


def _system(system_prompt: str) -> list[ChatMessage]:
    return [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []


def step_messages(
    task_text: str, plan: Plan, step_id: str, context: str, system_prompt: str
) -> list[ChatMessage]:
    """Messages asking the task model to do one step, with its dependencies' results."""
    step = plan.step(step_id)
    position = [s.id for s in plan.steps].index(step_id) + 1
    parts = [
        f"Overall task: {_clip(task_text, _TASK_PROMPT_CHARS)}",
        f"You are doing step {position} of {len(plan.steps)}: {step.title}\n{step.instruction}",
    ]
    if context:
        parts.append(f"Results of earlier steps:\n{context}")
    parts.append("Do only this step and reply with its result.")
    return [*_system(system_prompt), {"role": "user", "content": "\n\n".join(parts)}]


def step_brief(task_text: str, plan: Plan, step_id: str, context: str) -> str:
    """What an acting step's loop reads after its instruction: the whole task, where the
    step stands in the plan, and its dependencies' results."""
    position = [s.id for s in plan.steps].index(step_id) + 1
    parts = [
        f"This is step {position} of {len(plan.steps)} of a larger task. The whole task: "
        f"{_clip(task_text, _TASK_PROMPT_CHARS)}"
    ]
    if context:
        parts.append(f"Results of earlier steps:\n{context}")
    parts.append("Do only this step, then call finish saying what you did.")
    return "\n\n".join(parts)


def check_brief(plan: Plan, outputs: dict[str, str], max_chars: int) -> str:
    """What an acting task's own loop reads once its planned steps are done."""
    results, _ = _blocks(plan, [s.id for s in plan.steps], outputs, max_chars)
    return (
        f"The task was done in {len(plan.steps)} planned steps, in this workspace. "
        f"What each step reported:\n\n{results}\n\n"
        "Check that the whole task is done (read the files; run its tests if it has "
        "any), fix what is missing, then call finish with a summary of the result."
    )


def aggregate_messages(
    task_text: str,
    plan: Plan,
    outputs: dict[str, str],
    max_chars: int,
    system_prompt: str,
) -> list[ChatMessage]:
    """Messages asking the task model for the final answer built from every step's result."""
    results, _ = _blocks(plan, [s.id for s in plan.steps], outputs, max_chars)
    content = (
        f"Task: {_clip(task_text, _TASK_PROMPT_CHARS)}\n\n"
        f"The task was done in {len(plan.steps)} steps. Their results:\n\n{results}\n\n"
        "Write the complete final answer to the task, combining these results. "
        "Do not mention the steps."
    )
    return [*_system(system_prompt), {"role": "user", "content": content}]
