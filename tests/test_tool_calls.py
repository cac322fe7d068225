"""Tool calls in each backend's native form, and replies held to a JSON Schema.

The embedded SmolLM2 runs for real: under the grammar its calls must parse, name an
offered tool and satisfy that tool's schema, whatever the prompt (what is checked is
the machinery, not the model's judgement). OpenAI's form is checked against the
scripted stand-in (tests/standins/openai_scripted.py), which streams calls as OpenAI
does and refuses what OpenAI refuses; Ollama's against its stand-in running the real
model through the official client.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.db.store import Store
from taled.errors import PlanError
from taled.models.backends.base import (
    Backend,
    CancelToken,
    ChatMessage,
    Completion,
    tool_name,
    wire_name,
)
from taled.models.backends.llamacpp import LlamaCppBackend, bounded_schema, integer_rule
from taled.models.backends.ollama import OllamaBackend
from taled.models.backends.openai import OpenAIBackend
from taled.models.pool import ModelCall, ModelPool
from taled.settings import (
    LlamaCppSettings,
    LoopSettings,
    ModelsSettings,
    OllamaSettings,
    OpenAISettings,
    StoreSettings,
)
from taled.tasks.planning import planner
from taled.tools.base import ToolSpec
from tests.llama_server import ALIAS, LlamaServer
from tests.standins.ollama_server import OllamaStandIn
from tests.standins.openai_scripted import MODEL, ScriptedServer, Turn, scripted_server

PLANS = Path(__file__).parent / "data" / "plans_smollm2.json"
OPENAI_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# Tools shaped like the built-in ones and an MCP server's, and the schema features
# llama.cpp's converter reads: bounds, enum, const, bounded integers, booleans, arrays,
# nested objects, a type list, $defs, a tool with no arguments, a 1 MiB maxLength.
TOOLS = [
    ToolSpec(
        "read_file",
        "Read a text file of the workspace.",
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "maxLength": 4096},
                "start_line": {"type": "integer", "minimum": 1},
            },
            "required": ["path"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "write_file",
        "Create a file, or replace its whole content.",
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "maxLength": 4096},
                "content": {"type": "string", "maxLength": 1024 * 1024},
            },
            "required": ["path", "content"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "run",
        "Run a shell command in the workspace.",
        {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout": {"type": ["integer", "null"], "minimum": 1, "maximum": 600},
                "network": {"type": "boolean"},
            },
            "required": ["command"],
        },
    ),
    ToolSpec(
        "search",
        "Search the workspace's files for a regular expression.",
        {
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "minLength": 1},
                "paths": {"type": "array", "items": {"type": "string"}},
                "mode": {"enum": ["regex", "literal"]},
            },
            "required": ["pattern"],
        },
    ),
    ToolSpec(
        "git.commit",
        "Commit the staged changes (an MCP server's tool).",
        {
            "type": "object",
            "properties": {
                "message": {"type": "string", "maxLength": 200},
                "author": {"$ref": "#/$defs/person"},
            },
            "required": ["message"],
            "$defs": {
                "person": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                    "required": ["name"],
                }
            },
        },
    ),
    ToolSpec("clock.now", "Tell the current time.", {"type": "object"}),
    ToolSpec(
        "finish",
        "Finish the task with a summary of what was done.",
        {
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "status": {"const": "done"},
            },
            "required": ["summary", "status"],
        },
    ),
]
PROMPTS = [
    "Show me what is in README.md.",
    "Create hello.py that prints hello world.",
    "Run the test suite with pytest.",
    "Find every TODO comment in the code.",
    "Commit the changes with the message 'fix typo'.",
    "What time is it?",
    "The task is complete: say what you did.",
    "Replace the word colour with color in docs/intro.md.",
    "List the files of the src directory, then tell me which is biggest.",
    "Écris un poème de quatre vers sur la mer dans poeme.txt.",
]
SYSTEM = "You are tale, an agent that works in a workspace by calling tools."
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 200},
        "confidence": {"type": "integer"},
        "language": {"enum": ["en", "fr", "de"]},
        "sources": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["answer", "confidence", "language", "sources"],
    "additionalProperties": False,
}


def _spec(name: str) -> ToolSpec:
    return next(t for t in TOOLS if t.name == name)


async def _call(
    backend: Backend,
    messages: list[ChatMessage],
    *,
    max_tokens: int = 200,
    temperature: float = 0.7,
    **extra: Any,
) -> tuple[list[str], Completion]:
    out = Completion.empty()
    pieces = [
        piece
        async for piece in backend.stream(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            cancel=CancelToken(),
            result=out,
            **extra,
        )
    ]
    return pieces, out


def _ask(prompt: str) -> list[ChatMessage]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


# -- the embedded model ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> LlamaCppBackend:
    backend = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=3))
    asyncio.run(backend.load())
    return backend


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_embedded_model_always_makes_a_call_that_parses(
    smollm2: LlamaCppBackend, prompt: str
) -> None:
    """Whatever it is asked, SmolLM2 under the grammar makes exactly one call that names an
    offered tool and whose arguments satisfy that tool's schema; nothing is streamed."""
    pieces, out = asyncio.run(_call(smollm2, _ask(prompt), tools=TOOLS))
    assert (pieces, out.text, out.finish_reason) == ([], "", "stop")
    [call] = out.tool_calls
    assert not call.error, call.error
    assert call.name in {t.name for t in TOOLS}
    jsonschema.validate(call.arguments, _spec(call.name).input_schema)
    assert call.id.startswith("call_")
    assert out.completion_tokens > 0


def test_calls_get_ids_of_their_own(smollm2: LlamaCppBackend) -> None:
    """Two calls from the embedded model never share an id."""
    ids = {
        asyncio.run(_call(smollm2, _ask(p), tools=TOOLS))[1].tool_calls[0].id for p in PROMPTS[:3]
    }
    assert len(ids) == 3


def test_a_call_cut_off_by_max_tokens_comes_back_with_an_error(smollm2: LlamaCppBackend) -> None:
    """A call stopped by max_tokens before its JSON closed is one call with ``error`` saying
    so, and the tool's name when the model got that far."""
    tools = [TOOLS[1]]
    _, out = asyncio.run(_call(smollm2, _ask(PROMPTS[1]), tools=tools, max_tokens=12))
    assert out.finish_reason == "length"
    [call] = out.tool_calls
    assert "cut off" in call.error
    assert call.name == "write_file"
    assert call.arguments == {}


def test_tool_traffic_is_rendered_as_plain_turns(smollm2: LlamaCppBackend) -> None:
    """Tools are described in the system message, a call is the JSON the grammar makes the
    model write, and a result is a user turn naming its tool."""
    messages: list[ChatMessage] = [
        *_ask("Show me README.md."),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "name": "read_file", "arguments": {"path": "README.md"}}
            ],
        },
        {"role": "tool", "content": "# tale", "tool_call_id": "call_1", "name": "read_file"},
    ]
    prompt, _ = smollm2.render_prompt(messages, TOOLS)
    assert prompt.count("<|im_start|>system") == 1
    assert "- git.commit: Commit the staged changes" in prompt
    assert '{"tool": "read_file", "arguments": {"path": "README.md"}}' in prompt
    assert "<|im_start|>user\nResult of read_file: # tale<|im_end|>" in prompt


def test_a_schema_reply_parses_and_validates(smollm2: LlamaCppBackend) -> None:
    """With ``schema``, the reply's text (streamed as usual) is JSON the schema accepts."""
    messages = _ask("What is the capital of France? Answer as JSON.")
    pieces, out = asyncio.run(_call(smollm2, messages, schema=REPLY_SCHEMA, max_tokens=160))
    assert out.finish_reason == "stop"
    assert "".join(pieces) == out.text
    jsonschema.validate(json.loads(out.text), REPLY_SCHEMA)
    assert out.tool_calls == []


def test_unbounded_strings_and_arrays_get_bounds_that_only_narrow() -> None:
    """A schema's strings without maxLength get one (a megabyte one is capped), arrays get
    maxItems, and a type list becomes an anyOf keeping the rest of the schema."""
    bounded = bounded_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "string", "maxLength": 1 << 20},
                "c": {"type": ["string", "null"]},
                "d": {"type": "array", "items": {"type": "string", "maxLength": 3}},
                "e": {"enum": ["x"]},
            },
        },
        100,
    )
    props = bounded["properties"]
    assert props["a"]["maxLength"] == props["b"]["maxLength"] == 100
    assert props["c"] == {"anyOf": [{"type": "string", "maxLength": 100}, {"type": "null"}]}
    assert props["d"]["maxItems"] == 64
    assert props["d"]["items"]["maxLength"] == 3
    assert props["e"] == {"enum": ["x"]}


@given(
    st.one_of(st.none(), st.integers(-(10**7), 10**7)),
    st.one_of(st.none(), st.integers(-(10**7), 10**8)),
    st.lists(st.integers(-(10**9), 10**9), max_size=50),
)
def test_bounded_integers_are_spelled_exactly(
    low: int | None, high: int | None, numbers: list[int]
) -> None:
    """The grammar of an integer's minimum and maximum accepts exactly the integers
    between them, spelled as JSON spells them."""
    if low is not None and high is not None and low > high:
        low, high = high, low
    # The GBNF of digits and digit classes reads as a regular expression without quotes.
    spelled = re.compile(integer_rule(low, high).replace('"', "").replace(" ", ""))
    for n in [*numbers, *(b + d for b in (low, high, 0) if b is not None for d in (-1, 0, 1))]:
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(spelled.fullmatch(str(n))) == inside, n
    assert not any(spelled.fullmatch(s) for s in ("-0", "00", "01", "-01", "1.0", ""))


@pytest.mark.slow
def test_plans_under_plan_schema_parse() -> None:
    """The 20 planning prompts of the recorded fixture, asked again under PLAN_SCHEMA, give
    answers the schema accepts and plans parse_plan reads far more often than the recorded
    free answers did (9 of 20); every plan survives Plan.to_json/from_json."""
    fixture = json.loads(PLANS.read_text())
    backend = LlamaCppBackend("smollm2-135m", LlamaCppSettings(seed=fixture["plans"][0]["seed"]))
    asyncio.run(backend.load())
    valid = parsed = 0
    for case in fixture["plans"]:
        messages = planner.plan_messages(case["task"], fixture["max_steps"])
        _, out = asyncio.run(
            _call(
                backend,
                messages,
                max_tokens=fixture["max_tokens"],
                temperature=fixture["temperature"],
                schema=planner.PLAN_SCHEMA,
            )
        )
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), planner.PLAN_SCHEMA)
            valid += 1
        try:
            plan = planner.parse_plan(out.text, fixture["max_steps"])
        except PlanError:
            continue
        assert planner.Plan.from_json(plan.to_json()) == plan
        parsed += 1
    before = sum(_parses(case["output"], fixture["max_steps"]) for case in fixture["plans"])
    print(
        f"plans: {parsed}/20 parse with PLAN_SCHEMA ({before}/20 recorded without); "
        f"{valid}/20 are schema-valid JSON"
    )
    assert before == 9
    assert valid >= 16
    assert parsed >= 12


def _parses(text: str, max_steps: int) -> bool:
    try:
        planner.parse_plan(text, max_steps)
    except PlanError:
        return False
    return True


# -- wire names ------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40))
def test_wire_names_are_openai_safe_and_read_back(name: str) -> None:
    """Any tool name maps to a name OpenAI accepts, and back to itself."""
    wire = wire_name(name)
    assert OPENAI_NAME.fullmatch(wire)
    if len(wire) < 64:
        assert tool_name(wire) == name
    assert tool_name(wire, [ToolSpec(name, "", {})]) == name


@given(st.lists(st.text(min_size=1, max_size=80), min_size=2, max_size=6, unique=True))
def test_distinct_tool_names_get_distinct_wire_names(names: list[str]) -> None:
    """No two tool names share a wire name, long ones included."""
    assert len({wire_name(n) for n in names}) == len(names)


def test_dotted_names_stay_readable_on_the_wire() -> None:
    """An MCP server's ``server.tool`` is ``server--tool``; plain names are unchanged."""
    assert wire_name("git.commit") == "git--commit"
    assert wire_name("read_file") == "read_file"


# -- OpenAI ----------------------------------------------------------------------


@pytest.fixture
def openai_server() -> Iterator[ScriptedServer]:
    script: dict[str, Turn | list[Turn]] = {
        "two": {
            "tool_calls": [
                {"name": "read_file", "arguments": {"path": "README.md", "start_line": 2}},
                {"name": wire_name("git.commit"), "arguments": {"message": "fix: typo ü"}},
            ]
        },
        "loop": [
            {"tool_calls": [{"name": "read_file", "arguments": {"path": "a.txt"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "s", "status": "done"}}]},
            "All done.",
        ],
        "broken": {"name": "run", "raw_arguments": '{"command": "ls'},
        "listed": {"name": "run", "raw_arguments": '["ls"]'},
        "json": '{"answer": "Paris", "confidence": 9, "language": "en", "sources": []}',
    }
    with scripted_server(script) as server:
        yield server


async def _loaded_call(
    backend: Backend, messages: list[ChatMessage], **extra: Any
) -> tuple[list[str], Completion]:
    """Load, call, unload, in one event loop (a client belongs to the loop it ran in)."""
    await backend.load()
    try:
        return await _call(backend, messages, **extra)
    finally:
        await backend.unload()


def _openai_call(
    server: ScriptedServer, messages: list[ChatMessage], **extra: Any
) -> tuple[list[str], Completion]:
    backend = OpenAIBackend(server.base_url, MODEL, OpenAISettings())
    return asyncio.run(_loaded_call(backend, messages, **extra))


def test_openai_streamed_tool_calls_are_put_together(openai_server: ScriptedServer) -> None:
    """Calls streamed as OpenAI streams them (header delta, argument fragments, finish
    reason tool_calls) come back whole, in order, with the server's ids."""
    pieces, out = _openai_call(openai_server, _ask("[[script:two]] go"), tools=TOOLS)
    assert (pieces, out.text, out.finish_reason) == ([], "", "stop")
    assert [(c.name, c.arguments, c.error) for c in out.tool_calls] == [
        ("read_file", {"path": "README.md", "start_line": 2}, ""),
        ("git.commit", {"message": "fix: typo ü"}, ""),
    ]
    assert all(c.id.startswith("call_") for c in out.tool_calls)
    assert out.tool_calls[0].id != out.tool_calls[1].id
    assert out.counts_exact


def test_openai_tools_go_out_under_wire_safe_names(openai_server: ScriptedServer) -> None:
    """Each tool is an OpenAI function whose name OpenAI accepts (the stand-in refuses
    others, as OpenAI does), with its description and schema."""
    _openai_call(openai_server, _ask("[[script:two]] go"), tools=TOOLS)
    sent = openai_server.requests[-1]["tools"]
    assert all(t["type"] == "function" for t in sent)
    assert all(OPENAI_NAME.fullmatch(t["function"]["name"]) for t in sent)
    commit = next(t["function"] for t in sent if t["function"]["name"] == wire_name("git.commit"))
    assert commit["description"] == _spec("git.commit").description
    assert commit["parameters"] == _spec("git.commit").input_schema


def test_openai_tool_traffic_is_sent_in_openai_form(openai_server: ScriptedServer) -> None:
    """An assistant's calls go back with arguments as a JSON string and wire names, each
    result as a tool message with its call's id; the stand-in (OpenAI's checks) accepts
    them and answers the loop's next turn."""
    messages: list[ChatMessage] = [
        *_ask("[[script:loop]] go"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_a", "name": "git.commit", "arguments": {"message": "m"}},
                {"id": "call_b", "name": "read_file", "arguments": {"path": "a.txt"}},
            ],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "call_a", "name": "git.commit"},
        {"role": "tool", "content": "text", "tool_call_id": "call_b", "name": "read_file"},
    ]
    _, out = _openai_call(openai_server, messages, tools=TOOLS)
    sent = openai_server.requests[-1]["messages"]
    assert sent[2]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "git--commit", "arguments": '{"message": "m"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'},
        },
    ]
    assert sent[3] == {"role": "tool", "content": "ok", "tool_call_id": "call_a"}
    assert sent[4] == {"role": "tool", "content": "text", "tool_call_id": "call_b"}
    # Two tool messages: the script's third turn, plain text.
    assert (out.text, out.tool_calls) == ("All done.", [])


def test_openai_malformed_arguments_make_a_call_with_an_error(
    openai_server: ScriptedServer,
) -> None:
    """Arguments that are not JSON, or JSON but not an object, make a call with ``error``
    set and no arguments, for the loop to send back."""
    for key in ("broken", "listed"):
        _, out = _openai_call(openai_server, _ask(f"[[script:{key}]] go"), tools=TOOLS)
        [call] = out.tool_calls
        assert call.name == "run"
        assert call.arguments == {}
        assert "not a JSON object" in call.error


def test_openai_schema_is_sent_as_response_format(openai_server: ScriptedServer) -> None:
    """``schema`` is OpenAI's ``response_format`` of type json_schema."""
    _, out = _openai_call(openai_server, _ask("[[script:json]] go"), schema=REPLY_SCHEMA)
    assert openai_server.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": REPLY_SCHEMA},
    }
    jsonschema.validate(json.loads(out.text), REPLY_SCHEMA)


def test_a_schema_reaches_llama_cpp_server_in_the_form_it_knows() -> None:
    """llama-cpp-python's server refuses OpenAI's json_schema response format (with a 500
    naming it); the schema is sent again as its json_object form, the reply satisfies it,
    and the server is not taken for down."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    }
    server = LlamaServer().start()
    try:
        backend = OpenAIBackend(server.base_url, ALIAS, OpenAISettings())
        messages = _ask("Which city is the capital of France? JSON.")
        _, out = asyncio.run(_loaded_call(backend, messages, schema=schema, temperature=0))
    finally:
        server.stop()
    jsonschema.validate(json.loads(out.text), schema)


def test_the_openai_stand_in_refuses_what_openai_refuses(openai_server: ScriptedServer) -> None:
    """The stand-in answers 400, as OpenAI does, to a function name outside OpenAI's
    pattern, a tool message answering no call, and arguments that are not a string."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
    bodies: list[dict[str, Any]] = [
        {"tools": [{"type": "function", "function": {"name": "git.commit"}}]},
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]},
    ]
    for extra in bodies:
        body: dict[str, Any] = {"model": MODEL, "messages": _ask("hi"), **extra}
        answer = httpx.post(f"{openai_server.base_url}/chat/completions", json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error"


def test_openai_calls_without_tools_send_no_tool_fields(openai_server: ScriptedServer) -> None:
    """A call that offers no tools and no schema sends the body it always did."""
    _openai_call(openai_server, _ask("hello"))
    body = openai_server.requests[-1]
    assert set(body) == {
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "stream",
        "stream_options",
    }


# -- Ollama ----------------------------------------------------------------------

OLLAMA_MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn([OLLAMA_MODEL]) as server:
        yield server


def _ollama_call(
    server: OllamaStandIn, messages: list[ChatMessage], **extra: Any
) -> tuple[list[str], Completion]:
    settings = OllamaSettings(host=server.url, num_ctx=2048)
    backend = OllamaBackend(OLLAMA_MODEL, settings, pinned=False)
    return asyncio.run(_loaded_call(backend, messages, **extra))


def _chats(server: OllamaStandIn) -> list[dict[str, Any]]:
    return [body for _, path, body in server.requests if path == "/api/chat"]


def test_ollama_tool_calls_are_parsed(ollama: OllamaStandIn) -> None:
    """Ollama's calls (a message's tool_calls, arguments an object) become calls under
    tale's names; tools travel as Ollama's ``tools``."""
    server = ollama
    for prompt in PROMPTS[:4]:
        pieces, out = _ollama_call(server, _ask(prompt), tools=TOOLS)
        [call] = out.tool_calls
        assert (pieces, call.error) == ([], "")
        assert call.name in {t.name for t in TOOLS}
        assert isinstance(call.arguments, dict)
        assert out.completion_tokens > 0
    names = [t["function"]["name"] for t in _chats(server)[-1]["tools"]]
    assert names == [wire_name(t.name) for t in TOOLS]


def test_ollama_tool_traffic_is_sent_in_ollama_form(
    ollama: OllamaStandIn,
) -> None:
    """An assistant's calls go to Ollama with object arguments, each result as a tool
    message naming its tool."""
    server = ollama
    messages: list[ChatMessage] = [
        *_ask("Commit the change."),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_a", "name": "git.commit", "arguments": {"message": "m"}}],
        },
        {"role": "tool", "content": "committed", "tool_call_id": "call_a", "name": "git.commit"},
    ]
    _, out = _ollama_call(server, messages, tools=TOOLS)
    sent = _chats(server)[-1]["messages"]
    assert sent[2] == {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "git--commit", "arguments": {"message": "m"}}}],
    }
    assert sent[3] == {"role": "tool", "content": "committed", "tool_name": "git--commit"}
    assert len(out.tool_calls) == 1


def test_ollama_schema_is_sent_as_format_and_the_reply_validates(
    ollama: OllamaStandIn,
) -> None:
    """``schema`` is Ollama's ``format``; the reply's text satisfies it."""
    server = ollama
    messages = _ask("What is the capital of France? Answer as JSON.")
    pieces, out = _ollama_call(server, messages, schema=REPLY_SCHEMA, max_tokens=160)
    assert _chats(server)[-1]["format"] == REPLY_SCHEMA
    assert "".join(pieces) == out.text
    jsonschema.validate(json.loads(out.text), REPLY_SCHEMA)


# -- the pool --------------------------------------------------------------------

LOOPING = '{"answer": "' + "the same words over and over again, " * 8 + '"}'


@asynccontextmanager
async def _scripted_pool(server: ScriptedServer, tmp_path: Path) -> AsyncIterator[ModelPool]:
    """A pool whose roles are both the scripted model, loop guard on."""
    settings = ModelsSettings(ux=server.spec, task=server.spec)
    store = Store(tmp_path / "t.db", StoreSettings(), 64)
    await store.open()
    pool = ModelPool(settings, store, loops=LoopSettings())
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()
        await store.close()


def _complete(server: ScriptedServer, tmp_path: Path, prompt: str, **extra: Any) -> Completion:
    async def go() -> Completion:
        async with _scripted_pool(server, tmp_path) as pool:
            return await pool.complete(
                ModelCall("task", _ask(prompt), max_tokens=100, temperature=0, timeout=30, **extra)
            )

    return asyncio.run(go())


def test_the_pool_carries_tools_down_and_calls_back(
    openai_server: ScriptedServer, tmp_path: Path
) -> None:
    """``ModelPool.complete`` with a call's ``tools`` offers them and returns the model's calls."""
    out = _complete(openai_server, tmp_path, "[[script:two]] go", tools=TOOLS)
    assert [c.name for c in out.tool_calls] == ["read_file", "git.commit"]
    assert len(openai_server.requests[-1]["tools"]) == len(TOOLS)


def test_the_loop_guard_does_not_cut_a_reply_under_a_schema(tmp_path: Path) -> None:
    """A reply that repeats itself is cut by the loop guard, but not one held to a schema:
    cut, its JSON would not parse."""
    with scripted_server({"loop": LOOPING}) as server:
        free = _complete(server, tmp_path / "free", "[[script:loop]] go")
        held = _complete(server, tmp_path / "held", "[[script:loop]] go", schema={"type": "object"})
    assert len(free.text) < len(LOOPING)
    assert held.text == LOOPING
    assert json.loads(held.text)


def test_a_partial_answer_cannot_be_continued_under_tools() -> None:
    """Continuing a cut-off answer with tools or a schema is refused: the grammar would
    start over in the middle of the JSON."""
    ask = _ask("go")
    with pytest.raises(ValueError, match="partial"):
        ModelCall("task", ask, max_tokens=100, temperature=0, timeout=30, tools=TOOLS, partial="{")
    with pytest.raises(ValueError, match="partial"):
        ModelCall("task", ask, max_tokens=100, temperature=0, timeout=30, schema={}, partial="{")
