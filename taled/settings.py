"""The daemon's configuration: one pydantic-settings model.

Precedence, highest first: explicit arguments, ``TALE_*`` environment variables
(``__`` separates nested keys, e.g. ``TALE_QUEUE__WORKERS=4``), the user's
``$XDG_CONFIG_HOME/tale/taled.toml``, then the defaults below. ``etc/taled.toml``
is the commented copy of these defaults; a test pins the two equal.

Every table forbids unknown keys, so a typo is an error that names the key; a
``TALE_*`` variable that names no setting is one too (naming the variable), and
so is a value that is not a finite number. An error says where the bad value came
from: the variable or the file.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from taled.errors import ConfigError

__all__ = [
    "AgentSettings",
    "BackendSpec",
    "ChatSettings",
    "CheckpointSettings",
    "DaemonSettings",
    "Decision",
    "GateSettings",
    "HookSettings",
    "LearningSettings",
    "Level",
    "LlamaCppSettings",
    "LoopSettings",
    "McpServerSettings",
    "ModelsSettings",
    "NotificationSettings",
    "NotifyEvent",
    "OllamaSettings",
    "OpenAISettings",
    "PlannerSettings",
    "PoolSettings",
    "QueueSettings",
    "RetentionSettings",
    "Role",
    "RunToolSettings",
    "RunnerSettings",
    "SandboxSettings",
    "ScheduleSettings",
    "ServerSettings",
    "SettingOrigin",
    "SettingSources",
    "Settings",
    "StoreSettings",
    "ToolsSettings",
    "UsageSettings",
    "WorkspaceSettings",
    "is_secret",
    "load_settings",
    "parse_model_spec",
]

# inf and nan are valid TOML and valid Python floats; no setting means either
# (inf would pass "gt=0", nan fails every bound with a misleading message).
_STRICT = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

Role = Literal["ux", "task"]
# How the kernel schedules llama.cpp's threads (LlamaCppSettings.cpu_policy).
CpuPolicy = Literal["normal", "idle"]
"""The model roles: ``ux`` answers people, ``task`` does the work."""

DEFAULT_SYSTEM_PROMPT = (
    "You are tale, a careful assistant that completes the user's task. "
    "Answer with the finished result only. When the task asks for code, "
    "give complete, runnable code in one fenced block."
)


Level = Literal["simple", "medium", "complex"]
"""Task complexity levels, as the learning engine classifies them."""


def _parted_levels() -> list[Level]:
    return ["medium", "complex"]


class DaemonSettings(BaseModel):
    """How the daemon process behaves."""

    model_config = _STRICT

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log verbosity of the daemon."""
    shutdown_grace_seconds: float = Field(default=10.0, gt=0, le=600)
    """On SIGTERM, how long running model calls may finish before they are cancelled."""
    watchdog_fraction: float = Field(default=0.5, gt=0, lt=1)
    """WATCHDOG=1 is sent every WATCHDOG_USEC times this fraction (systemd asks for < 1)."""
    log_max_bytes: int = Field(default=10 * 2**20, ge=4096, le=2**40)
    """A daemon started by tale writes <data dir>/taled.log and rotates it at this size
    (under systemd the journal keeps the log instead)."""
    log_backups: int = Field(default=3, ge=1, le=100)
    """Rotated log files kept beside it: taled.log.1 (the newest) to taled.log.N."""
    log_repeats: int = Field(default=5, ge=1, le=10_000)
    """The same warning or error (from one place in the code) is logged at most this
    many times per log_repeat_seconds; the rest are counted and the count logged."""
    log_repeat_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """The window of log_repeats."""


class ServerSettings(BaseModel):
    """The MCP server on the Unix socket."""

    model_config = _STRICT

    max_frame_bytes: int = Field(default=1_048_576, ge=4096, le=64 * 1_048_576)
    """Longest accepted JSON-RPC line; a longer frame is answered with an error and dropped."""
    max_connections: int = Field(default=128, ge=1, le=10_000)
    """Concurrent client connections; more are refused with an error."""


class QueueSettings(BaseModel):
    """The durable task queue."""

    model_config = _STRICT

    workers: int = Field(default=2, ge=1, le=256)
    """Tasks run at the same time (the worker pool bound)."""
    default_priority: int = Field(default=50, ge=0, le=100)
    """Priority of a task submitted without one; higher runs first (0..100)."""
    max_text_chars: int = Field(default=10_000, ge=1, le=1_000_000)
    """Longest task text accepted, after stripping whitespace."""
    list_limit: int = Field(default=50, ge=1, le=10_000)
    """Tasks returned by list_tasks when no limit is given."""
    max_list_limit: int = Field(default=1000, ge=1, le=100_000)
    """Largest limit list_tasks accepts."""
    write_batch_max: int = Field(default=1024, ge=1, le=100_000)
    """Most queued writes group-committed in one SQLite transaction."""


class StoreSettings(BaseModel):
    """The SQLite store."""

    model_config = _STRICT

    synchronous: Literal["full", "normal"] = "full"
    """SQLite synchronous mode: 'full' survives power loss, 'normal' only process crashes."""
    busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)
    """How long a connection waits for a lock before failing."""
    read_connections: int = Field(default=4, ge=1, le=64)
    """Pooled read connections (writes go through one group-committing writer)."""
    check_on_start: bool = True
    """Before start-up, check the database (PRAGMA quick_check) and the checkpoint refs;
    a damaged one stops the daemon with a line naming it (then run: tale doctor)."""
    backup_interval_minutes: float = Field(default=60.0, ge=0, le=10_080)
    """Back the database up to <data>/backups this often, and at start-up and clean
    shutdown, when it changed since the last backup (0: no backups)."""
    backups_keep: int = Field(default=3, ge=1, le=1000)
    """How many backups to keep; the oldest goes when a new one is written."""


class RunnerSettings(BaseModel):
    """How a task is executed on the task model."""

    model_config = _STRICT

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System prompt of a task's model call."""
    max_tokens: int = Field(default=512, ge=1, le=131_072)
    """Most tokens a task's answer may have."""
    temperature: float = Field(default=0.2, ge=0, le=2)
    """Sampling temperature of task calls."""
    call_timeout_seconds: float = Field(default=600.0, gt=0)
    """A task's model call that runs longer is cancelled and the task fails."""
    partial_checkpoint_seconds: float = Field(default=30.0, ge=0)
    """While an answer is being generated, checkpoint what it has so far this often, so a
    crash loses at most this much of it (0: only on pause and shutdown)."""
    stop_wait_seconds: float = Field(default=10.0, gt=0, le=600)
    """Pause and cancel answer once the stopped call's partial answer is checkpointed,
    or after this long."""
    quarantine_after: int = Field(default=3, ge=0, le=100)
    """A task the daemon crashed on this many times (a fatal error such as a segfault
    while it ran, not a kill) is failed as quarantined instead of run again (0: never)."""
    disk_full_retry_seconds: float = Field(default=60.0, gt=0, le=3600)
    """A task parked by a full disk resumes once the disk shows room; a full disk it
    cannot see (a quota) is tried again after this long."""


class LoopSettings(BaseModel):
    """Loop detection: an answer that repeats itself word for word is stopped there."""

    model_config = _STRICT

    enabled: bool = True
    """Stop task answers and chat replies whose tail repeats, and drop the repeats."""
    min_chars: int = Field(default=16, ge=4, le=10_000)
    """Shortest repeating unit that counts (shorter ones are rules, padding, stutters)."""
    max_chars: int = Field(default=400, ge=4, le=100_000)
    """Longest repeating unit looked for."""
    repeats: int = Field(default=3, ge=2, le=100)
    """Copies in a row of a short unit that make a loop."""
    long_chars: int = Field(default=64, ge=4, le=100_000)
    """A unit at least this long is a loop after two copies."""
    check_every_chars: int = Field(default=16, ge=1, le=10_000)
    """New characters between two looks at an answer (bounds the cost per token)."""

    @model_validator(mode="after")
    def _ordered(self) -> LoopSettings:
        if not self.min_chars <= self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


class PlannerSettings(BaseModel):
    """How a complex task is decomposed into subtasks (a DAG) and aggregated."""

    model_config = _STRICT

    decompose: bool = True
    """Plan tasks classified as complex into subtasks; off runs every task as one step."""
    decompose_levels: list[Level] = Field(default_factory=_parted_levels)
    """Predicted levels whose tasks are decomposed into subtasks after their direct
    answers failed. Not simple ones by default: a one-part task has nothing to split, and
    the workload's replay showed decomposition carrying none of them at ~3,400 tokens each."""
    complex_min_score: float = Field(default=0.6, ge=0, le=1)
    """Complexity score (0..1, from the classifier) at or above which a task is planned."""
    max_steps: int = Field(default=6, ge=2, le=50)
    """Most subtasks a plan may have; longer plans are cut at this many."""
    plan_max_tokens: int = Field(default=256, ge=32, le=8192)
    """Most tokens the task model may spend writing a plan."""
    plan_attempts: int = Field(default=2, ge=0, le=5)
    """Times the model is asked for a plan before the runner builds one from the text
    itself (0 never asks: saves tokens on a model too small to plan)."""
    context_chars: int = Field(default=1500, ge=100, le=100_000)
    """Most characters of dependency results passed to a subtask (context passing)."""
    aggregate_chars: int = Field(default=3000, ge=100, le=200_000)
    """Most characters of the steps' results given to the final aggregation."""


class SandboxSettings(BaseModel):
    """The sandbox that runs a result's Python code for the default done-gate."""

    model_config = _STRICT

    python: str = ""
    """Interpreter that runs gated code; empty means the daemon's own."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Wall-clock limit of one run; the process group is killed after it."""
    cpu_seconds: int = Field(default=5, ge=1, le=3600)
    """CPU-time limit (RLIMIT_CPU)."""
    memory_mb: int = Field(default=256, ge=16, le=65_536)
    """Address-space limit (RLIMIT_AS) in MiB."""
    max_processes: int = Field(default=1, ge=1, le=4096)
    """Processes the sandboxed code may have (RLIMIT_NPROC; 1 refuses fork), where enforceable."""
    max_file_mb: int = Field(default=16, ge=1, le=65_536)
    """Largest file the code may write (RLIMIT_FSIZE) in MiB."""
    max_output_chars: int = Field(default=4000, ge=100, le=1_000_000)
    """Stdout/stderr kept from a run (the rest is cut) and fed back on failure."""
    network: Literal["namespace", "off"] = "namespace"
    """'namespace' runs code in a fresh network namespace (no network, not even
    loopback); 'off' shares the host's network, sockets refused only by the audit hooks."""
    isolation: Literal["auto", "bwrap", "builtin"] = "auto"
    """Who builds the namespaces and the minimal root: 'auto' uses bubblewrap (bwrap)
    when installed and the built-in unshare/pivot_root path otherwise; neither means
    the code is refused, never run unconfined."""
    tmp_mb: int = Field(default=64, ge=1, le=65_536)
    """Size of the run's private /tmp (a tmpfs, counted against memory) in MiB."""


class GateSettings(BaseModel):
    """Done-gates: checks a result must pass, and how failures are recovered."""

    model_config = _STRICT

    python_code: bool = True
    """The default gate: run a result's Python code blocks in the sandbox."""
    attempts: int = Field(default=2, ge=1, le=10)
    """Attempts per recovery stage (the gate's error is fed back each time)."""
    more_tokens_factor: float = Field(default=2.0, ge=1, le=16)
    """'Retry with more tokens' multiplies the step's max_tokens by this."""
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class CheckpointSettings(BaseModel):
    """Task checkpoints in a bare git repository under the data directory."""

    model_config = _STRICT

    fsync: bool = True
    """Make every checkpoint durable before its ref moves (off only for throwaway data)."""
    contention_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """How long a checkpoint keeps retrying while another writer holds the ref."""
    max_state_bytes: int = Field(default=4 * 2**20, ge=4096, le=2**30)
    """Largest serialized task state one checkpoint may hold."""
    keep_finished: int = Field(default=3, ge=1, le=10_000)
    """Newest checkpoints kept per finished task by compaction (the last is its final state)."""
    compact_after_seconds: float = Field(default=3600.0, ge=0)
    """A finished task's checkpoints are compacted this long after it finished."""
    maintenance_interval_seconds: float = Field(default=600.0, gt=0)
    """How often compaction (and an occasional repack) runs."""
    gc_every: int = Field(default=6, ge=1, le=10_000)
    """Repack and prune the repository every this many maintenance rounds."""


class LlamaCppSettings(BaseModel):
    """The embedded llama.cpp backend (llama-cpp-python)."""

    model_config = _STRICT

    n_ctx: int = Field(default=2048, ge=256, le=131_072)
    """Context window; llama-cpp-python's own default (512) is too small for real tasks."""
    n_threads: int = Field(default=0, ge=0, le=256)
    """CPU threads per model instance, for reading prompts and for generating; 0 means one
    per physical core this process may use (its CPU affinity, hyper-threads not counted)."""
    role_threads: dict[Role, Annotated[int, Field(ge=1, le=256)]] = Field(default_factory=dict)
    """Threads for one role's instance, overriding n_threads, e.g. {ux = 1, task = 1}."""
    n_batch: int = Field(default=256, ge=16, le=8192)
    """Prompt tokens evaluated per batch."""
    prompt_chunk_tokens: int = Field(default=32, ge=1, le=8192)
    """Prompt tokens read between looks for a cancel or a pause for the UX model: a
    call given up (a chat turn taking the model from a summary being read ahead) frees
    the instance within one chunk, and a task's long prompt pauses while a person's
    reply streams. On SmolLM2-135M 32 tokens take ~0.12 s, read 6 % slower than whole
    batches of 256 (64: 0.24 s, 2 %; docs/benchmarks.md); a bigger model may want fewer."""
    omp_spin_count: int = Field(default=-1, ge=-1)
    """How long llama.cpp's idle OpenMP threads spin before they sleep (GOMP_SPINCOUNT);
    -1 leaves libgomp's default (300,000). Spinning threads take the cores from the
    daemon's own loop: on 2 cores, get_task's p99 while the task model generates was
    7.0-7.6 ms at the default, 5.7-6.0 ms at 10,000 and 2.4-3.2 ms at 0, but at 0 a short
    reply while a task generates took 1.4-1.8 s instead of 0.3 s (docs/benchmarks.md,
    2026-12-06). An environment's own GOMP_SPINCOUNT wins."""
    cpu_policy: CpuPolicy = "normal"
    """How the kernel schedules llama.cpp's threads (all models share one compute thread
    and its OpenMP team): normal, or idle (Linux SCHED_IDLE: they run only on CPU time
    nothing else on the machine wants). Idle keeps the daemon's socket quick while a task
    generates (get_task's p99 0.8-1.0 ms against ~6 ms at normal on 2 cores,
    docs/benchmarks.md), but every other busy program on the machine then slows replies
    and tasks, and an unprivileged daemon cannot leave idle once in it; for a machine
    tale has to itself."""
    prefix_cache_mb: int = Field(default=32, ge=0, le=65_536)
    """Memory per instance for copies of its KV cache, so a conversation's history is
    not read again after another call used the instance in between; 0 turns it off."""
    seed: int = Field(default=-1, ge=-1)
    """Sampling seed; -1 draws a random one."""
    repack_weights: bool = False
    """Let llama.cpp copy the weights into the CPU's fastest layout (AMX on recent Intel
    Xeons: about 2x the tokens/s, and about 95 MB more memory per loaded GGUF for
    SmolLM2; roles naming the same file share it); off leaves the daemon well within its
    500 MB with both roles loaded."""
    models: dict[str, str] = Field(default_factory=dict)
    """Extra model names mapped to GGUF paths, e.g. {qwen = "/models/qwen.gguf"}."""


class ChatSettings(BaseModel):
    """Conversation turns on the UX model (the ``chat`` tool, ``tale ask``)."""

    model_config = _STRICT

    system_prompt: str = (
        "You are tale, a friendly assistant on the user's own machine. Answer briefly and plainly."
    )
    """System prompt of a chat turn."""
    max_tokens: int = Field(default=256, ge=1, le=131_072)
    """Most tokens a chat reply may have."""
    temperature: float = Field(default=0.3, ge=0, le=2)
    """Sampling temperature of chat replies."""
    call_timeout_seconds: float = Field(default=60.0, gt=0)
    """A chat reply that takes longer is stopped with an error."""
    max_text_chars: int = Field(default=4000, ge=1, le=1_000_000)
    """Longest chat message accepted, after stripping whitespace."""
    stream_interval_ms: int = Field(default=40, ge=0, le=10_000)
    """Streamed text is sent at most this often (the first piece at once); 0 sends every token."""
    handoff_min_confidence: float = Field(default=0.6, ge=0, le=1)
    """A message read as a task is queued at once when this sure; below, the agent asks first."""
    intent_consult_margin: float = Field(default=0.35, ge=0, le=1)
    """The UX model is asked for its judgement when the two likeliest intents are this close."""
    intent_model_weight: float = Field(default=1.0, ge=0, le=10)
    """How much the UX model's judgement weighs against the text signals (one signal is 1-4)."""
    intent_judge_tokens: int = Field(default=3, ge=1, le=64)
    """Most tokens of the UX model's one-word intent judgement."""
    context_tokens: int = Field(default=1024, ge=64, le=1_000_000)
    """History sent with a turn; above it, older messages are folded into the summary.
    Keep it below the UX model's context (models.llamacpp.n_ctx) minus max_tokens."""
    summarise_ahead_share: float = Field(default=0.8, gt=0, le=1)
    """Past this share of context_tokens, the history is folded right after a reply, in
    the background, so the next turn does not wait for it; 1 folds only when a turn
    must (before its reply)."""
    keep_recent_messages: int = Field(default=6, ge=1, le=1000)
    """Newest messages always sent verbatim, never folded into the summary."""
    fold_to_share: float = Field(default=0.4, gt=0, le=1)
    """A fold leaves this share of context_tokens unfolded (or keep_recent_messages, if
    more): folds are rare, and the turn after one reads its whole history again."""
    summary_max_tokens: int = Field(default=160, ge=16, le=8192)
    """Most tokens of a conversation summary."""
    summary_role: Role = "task"
    """The model that folds a history in the background, after a reply: the task model,
    which pauses while the UX model answers someone (models.pool.ux_priority), so a fold
    in progress never holds the UX model from the next turn; "ux" makes it there, and a
    turn then stops it. A fold a turn cannot do without is made on the UX model."""
    read_ahead_after_seconds: float = Field(default=0.5, ge=0, le=60)
    """After a reply, the UX model reads the conversation as its next turn will send it
    (the reply as text, not as the tokens it was generated as) once this long has passed
    with no new message: a person reads the reply first, and a client sending turns back
    to back would only stop the read."""
    unfolded_max_share: float = Field(default=1.5, ge=1, le=100)
    """While the fold made ahead is not ready, a turn is answered over the whole history
    up to this multiple of context_tokens instead of waiting for it. Keep it times
    context_tokens, plus max_tokens, within the UX model's context."""
    chars_per_token: float = Field(default=4.0, gt=0, le=20)
    """First guess of characters per token for budgeting; refined from the ledger's counts."""
    title_chars: int = Field(default=60, ge=8, le=1000)
    """A conversation's title is its first message, cut to this many characters."""
    result_chars: int = Field(default=3000, ge=100, le=1_000_000)
    """Most characters of a task's result quoted in a chat reply."""
    list_limit: int = Field(default=20, ge=1, le=10_000)
    """Conversations listed when no limit is asked for."""


class OllamaSettings(BaseModel):
    """The Ollama backend (the official ``ollama`` client, native API)."""

    model_config = _STRICT

    host: str = ""
    """Ollama's URL; empty means $OLLAMA_HOST, else http://127.0.0.1:11434."""
    num_ctx: int = Field(default=4096, ge=256, le=1_048_576)
    """Context window sent with every call; kept constant because a change makes Ollama reload."""
    model_num_ctx: dict[str, Annotated[int, Field(ge=256, le=1_048_576)]] = Field(
        default_factory=dict
    )
    """Context window for one model, overriding num_ctx, e.g. {"qwen2.5:14b" = 8192}."""
    optional_keep_alive: str = "5m"
    """How long Ollama keeps an optional (unpinned) model loaded after a call; pinned use -1."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """Connecting to Ollama longer than this counts as the backend being down."""
    read_timeout_seconds: float = Field(default=300.0, gt=0, le=86_400)
    """Longest silence between streamed chunks (a cold model load happens inside it)."""


class OpenAISettings(BaseModel):
    """The OpenAI-compatible backend (vLLM, llama.cpp's server, LM Studio) over httpx."""

    model_config = _STRICT

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the bearer token; unset or empty sends none."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """Connecting longer than this counts as the server being down."""
    read_timeout_seconds: float = Field(default=120.0, gt=0, le=86_400)
    """Longest silence between streamed events."""


class PoolSettings(BaseModel):
    """Pinning, optional models, health checks and fallback."""

    model_config = _STRICT

    memory_floor_mb: int = Field(default=1024, ge=0)
    """Evict optional models, least recently used first, while available memory is below this."""
    health_interval_seconds: float = Field(default=15.0, gt=0, le=86_400)
    """How often each loaded model is probed."""
    probe_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """A probe that takes longer counts as a hung backend."""
    reload_backoff_seconds: float = Field(default=1.0, gt=0, le=3600)
    """First wait before reloading a failed model; doubles after each failed attempt."""
    reload_backoff_max_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """Longest wait between reload attempts."""
    down_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    """With no fallback, how long a call waits for its role to come back before failing."""
    unexpected_load_ms: float = Field(default=1000.0, ge=0)
    """A pinned model's call that reports a load longer than this was unloaded behind our back."""
    ux_priority: bool = True
    """While the UX model answers someone, embedded models of other roles pause between
    tokens (off: their steps and the reply's take turns on the one compute thread)."""


class ModelsSettings(BaseModel):
    """Which model serves each role, as ``backend:model``.

    Forms: ``llamacpp:NAME`` (embedded; NAME is smollm2-135m, a name under
    [models.llamacpp.models] or a GGUF path), ``ollama:NAME[:TAG]``,
    ``openai:URL#MODEL`` (an OpenAI-compatible server's base URL and model id).
    """

    model_config = _STRICT

    ux: str = "llamacpp:smollm2-135m"
    """The small, fast model that answers people (chat); pinned, always loaded."""
    task: str = "llamacpp:smollm2-135m"
    """The model that executes tasks; pinned (its own instance, even if the same file)."""
    fallback: str = ""
    """Serves a role's calls while its model is down; loaded on demand. Empty: calls wait."""
    pool: PoolSettings = Field(default_factory=PoolSettings)
    """Pinning, eviction, health and fallback."""
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    """Options of the embedded llama.cpp backend."""
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    """Options of the Ollama backend."""
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    """Options of the OpenAI-compatible backend."""

    @field_validator("ux", "task")
    @classmethod
    def _valid_spec(cls, value: str) -> str:
        parse_model_spec(value)
        return value

    @field_validator("fallback")
    @classmethod
    def _valid_fallback(cls, value: str) -> str:
        if value:
            parse_model_spec(value)
        return value


BACKENDS = ("llamacpp", "ollama", "openai")


class BackendSpec(BaseModel):
    """A parsed ``backend:model`` binding."""

    model_config = ConfigDict(frozen=True)

    backend: Literal["llamacpp", "ollama", "openai"]
    model: str
    base_url: str | None = None
    """The server of an ``openai:`` spec."""

    @property
    def label(self) -> str:
        """The spec as written in config (``backend:model``)."""
        if self.base_url is not None:
            return f"{self.backend}:{self.base_url}#{self.model}"
        return f"{self.backend}:{self.model}"


def parse_model_spec(spec: str) -> BackendSpec:
    """Split ``backend:model``; raise ValueError naming what is wrong."""
    backend, sep, model = spec.strip().partition(":")
    if not sep or not model:
        raise ValueError(
            f"model {spec!r} must look like 'backend:model', e.g. 'llamacpp:smollm2-135m', "
            "'ollama:qwen2.5:14b' or 'openai:http://host:8000/v1#MODEL'"
        )
    if backend == "llamacpp":
        return BackendSpec(backend="llamacpp", model=model)
    if backend == "ollama":
        if any(c.isspace() for c in model) or model.startswith(":") or model.endswith(":"):
            raise ValueError(f"ollama model {model!r} in {spec!r} must look like NAME or NAME:TAG")
        return BackendSpec(backend="ollama", model=model)
    if backend == "openai":
        url, hash_, name = model.partition("#")
        if not hash_ or not name.strip():
            raise ValueError(
                f"{spec!r} must name the model after '#', e.g. "
                "'openai:http://gpu-box:8000/v1#Qwen2.5-32B-Instruct'"
            )
        if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
            raise ValueError(f"{spec!r}: the server URL must start with http:// or https://")
        return BackendSpec(backend="openai", model=name.strip(), base_url=url.rstrip("/"))
    raise ValueError(f"unknown backend {backend!r} in {spec!r}; backends: {', '.join(BACKENDS)}")


class WorkspaceSettings(BaseModel):
    """Where an acting task works: its own copy of the user's directory, or a scratch one."""

    model_config = _STRICT

    max_copy_mb: int = Field(default=512, ge=1, le=1_048_576)
    """A directory bigger than this (files copied, excludes left out) is refused for --in."""
    max_files: int = Field(default=20_000, ge=1, le=10_000_000)
    """A directory with more files than this is refused for --in."""
    exclude: list[str] = Field(
        default_factory=lambda: [".git", ".venv", "venv", "node_modules", "__pycache__", ".tox"]
    )
    """Directory names never copied into a workspace (nor diffed, nor applied back). ``.git``
    is always left out, listed or not."""
    git_worktree: bool = True
    """When --in names the top of a git work tree with a commit, the task works in a git
    worktree of it on branch ``tale/<task id>``, its result committed there; false (or no
    ``git`` on PATH, or no commit yet): a managed copy."""

    @field_validator("exclude")
    @classmethod
    def _git_always(cls, names: list[str]) -> list[str]:
        # A workspace's .git (a worktree's link to the repository, or a copied
        # repository's hooks) must never be snapshotted, restored or applied back.
        return names if ".git" in names else [*names, ".git"]


class RunToolSettings(BaseModel):
    """The ``run`` tool: a command in the sandbox, the workspace its only writable place."""

    model_config = _STRICT

    timeout_seconds: float = Field(default=120.0, gt=0, le=86_400)
    """Wall time a command may take before its process group is killed."""
    cpu_seconds: int = Field(default=120, ge=1, le=86_400)
    """CPU time (RLIMIT_CPU) a command may use."""
    memory_mb: int = Field(default=1024, ge=16, le=1_048_576)
    """Address space (RLIMIT_AS) of each process of a command."""
    max_processes: int = Field(default=64, ge=1, le=4096)
    """Processes a command may have at once (fork bombs stop here)."""
    max_file_mb: int = Field(default=256, ge=1, le=1_048_576)
    """Largest file a command may write (RLIMIT_FSIZE)."""
    max_output_chars: int = Field(default=8000, ge=100, le=10_000_000)
    """Output (stdout and stderr) kept and fed back; the middle of a longer one is cut."""
    network: bool = False
    """Whether commands may use the network (off: a namespace with loopback only)."""


class McpServerSettings(BaseModel):
    """One of the user's MCP servers, started and supervised by the daemon."""

    model_config = _STRICT

    command: str = ""
    """Program of a stdio server (found on PATH, or a path)."""
    args: list[str] = Field(default_factory=list)
    """Its arguments."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for it. The daemon's own is not passed: only PATH, HOME, LANG and the
    MCP SDK's basics (LOGNAME, SHELL, TERM, USER), then these."""
    url: str = ""
    """A streamable-HTTP server's URL instead of a command."""
    enabled: bool = True
    """False: listed, never started."""
    call_timeout_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """How long one tool call may take."""
    start_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How long the server may take to start and list its tools."""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if bool(self.command) == bool(self.url):
            raise ValueError("an MCP server needs exactly one of 'command' (stdio) or 'url'")
        return self


Decision = Literal["allow", "ask", "deny"]
"""What the permission policy says about a tool call."""


def _default_policy() -> dict[str, Decision]:
    return {
        "list_files": "allow",
        "read_file": "allow",
        "search": "allow",
        "write_file": "allow",
        "edit_file": "allow",
        "finish": "allow",
        "ask_user": "allow",
        "run": "ask",
        "mcp": "ask",
    }


class AgentSettings(BaseModel):
    """The agent loop: how far one acting task may go."""

    model_config = _STRICT

    max_steps: int = Field(default=30, ge=1, le=10_000)
    """Tool calls one task may make before it stops and fails, saying so."""
    max_tokens: int = Field(default=512, ge=16, le=131_072)
    """Tokens one model turn of the loop may write."""
    wall_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    """Wall time one task's loop may take (time waiting for a person is not counted)."""
    result_chars: int = Field(default=4000, ge=100, le=1_000_000)
    """A tool's result is cut to this many characters before it goes to the model."""
    max_repeats: int = Field(default=3, ge=0, le=1000)
    """The same call (tool and arguments) proposed this many times in a row stops the
    task, saying so; the second time, the model is told it repeats itself (0: off)."""
    history_chars: int = Field(default=6000, ge=500, le=10_000_000)
    """When the tool results of a loop add up to more, older ones are shortened (a small
    model's context is small)."""
    classify: bool = True
    """Let the classifier give tools (and a scratch workspace) to a task that names no
    workspace but plainly asks for files to be made or commands run."""
    plan: bool = True
    """Plan an acting task the classifier (or its history) judges complex, as planning.*
    plans an answering one: each step acts in the task's workspace in turn (never two at
    once), then the task checks the whole and finishes."""


class ToolsSettings(BaseModel):
    """Acting tasks: workspaces, the built-in tools, the user's MCP servers, permissions."""

    model_config = _STRICT

    workspace: WorkspaceSettings = Field(default_factory=WorkspaceSettings)
    """Workspaces: what is copied from a user's directory."""
    run: RunToolSettings = Field(default_factory=RunToolSettings)
    """The run tool's limits."""
    agent: AgentSettings = Field(default_factory=AgentSettings)
    """The agent loop's budget."""
    mcp: dict[str, McpServerSettings] = Field(default_factory=dict)
    """The user's MCP servers by name; their tools are offered as ``NAME.tool``."""
    policy: dict[str, Decision] = Field(default_factory=_default_policy)
    """Rules by key: a tool's name (``read_file``, ``run``), ``run:PREFIX`` for commands
    that start with PREFIX (the longest prefix wins), ``mcp`` for every MCP server's tools,
    ``mcp:NAME`` for one server's, ``NAME.tool`` for one of its tools. Keys you set are
    added to the defaults."""

    @field_validator("mcp")
    @classmethod
    def _server_names(cls, value: dict[str, McpServerSettings]) -> dict[str, McpServerSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", name):
                raise ValueError(
                    f"MCP server name {name!r}: use letters, digits, '_' or '-' "
                    "(up to 32, starting with a letter); it prefixes its tools' names"
                )
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _merge_policy(cls, value: object) -> object:
        # Keys the user sets add to (or override) the safe defaults, not replace them.
        if isinstance(value, dict):
            return {**_default_policy(), **value}
        return value


class MetricsSettings(BaseModel):
    """The live metrics (the ``metrics`` tool, the dashboard) and the spec's targets."""

    model_config = _STRICT

    window_minutes: int = Field(default=30, ge=1, le=10_080)
    """How far back the metrics look."""
    samples: int = Field(default=2000, ge=10, le=1_000_000)
    """Tool-call timings kept per tool for the latency percentiles."""
    violations: int = Field(default=100, ge=1, le=100_000)
    """Most recent target violations listed."""
    ux_first_token_ms: float = Field(default=250.0, gt=0)
    """Target: the UX model's first token, p95 (the spec's 250 ms)."""
    status_ms: float = Field(default=5.0, gt=0)
    """Target: a get_task answered by the daemon, p99 (the spec's 5 ms)."""
    ready_seconds: float = Field(default=3.0, gt=0)
    """Target: READY=1 after start with both embedded models."""
    rss_mb: float = Field(default=500.0, gt=0)
    """Target: the daemon's resident memory with both embedded models loaded."""
    check_interval_seconds: float = Field(default=15.0, gt=0, le=86_400)
    """How often the monitor checks the daemon's memory and the ledger's new chat replies."""
    record_interval_seconds: float = Field(default=60.0, ge=0, le=86_400)
    """Metrics measured continuously (status_ms, rss_mb) record at most one violation row per
    this interval; the row counts the occurrences it stands for."""
    recorded_keep: int = Field(default=10_000, ge=10, le=10_000_000)
    """Recorded violations kept; older rows are deleted."""


class UsageSettings(BaseModel):
    """The usage report (the ``usage`` tool, ``tale usage``)."""

    model_config = _STRICT

    top: int = Field(default=10, ge=1, le=100)
    """Tasks, conversations and recent violations listed when no ``top`` is asked for."""
    curve_outcomes: int = Field(default=200, ge=2, le=100_000)
    """Newest task outcomes the prediction-error curve is drawn over."""
    curve_points: int = Field(default=10, ge=1, le=1000)
    """Points of that curve (each the MAPE of consecutive outcomes)."""
    naive_max_tokens: int = Field(default=512, ge=1, le=131_072)
    """The naive baseline's fixed max_tokens, used by the savings estimate."""


def _default_prior_tokens() -> dict[Level, int]:
    return {"simple": 120, "medium": 320, "complex": 700}


def _default_think_for() -> list[Level]:
    return ["complex"]


class LearningSettings(BaseModel):
    """The learning engine: complexity, token budgets and model selection from outcomes."""

    model_config = _STRICT

    enabled: bool = True
    """Use what was learned: budgets, routing to ux, thinking. Off runs every task on the task
    model with the fixed runner.max_tokens (outcomes are still recorded)."""
    medium_min_tokens: int = Field(default=200, ge=1)
    """A finished task that generated at least this many tokens is labelled at least medium."""
    complex_min_tokens: int = Field(default=600, ge=1)
    """A finished task that generated at least this many tokens is labelled complex."""
    complex_min_steps: int = Field(default=2, ge=2, le=1000)
    """A task that ran in at least this many steps (it was planned) is labelled complex."""
    medium_min_retries: int = Field(default=1, ge=1, le=100)
    """A task with this many retries (a failed gate, a model error), or a failed task, is
    labelled at least medium."""
    history_half_weight: int = Field(default=30, ge=1, le=100_000)
    """Distinct past tasks at which the learned classifier weighs as much as the rules."""
    prior_tokens: dict[Level, Annotated[int, Field(ge=1)]] = Field(
        default_factory=_default_prior_tokens
    )
    """Initial guess of the tokens a task of each level generates, before any history."""
    prior_strength: float = Field(default=5.0, gt=0, le=10_000)
    """How many past tasks the initial guess counts as in a (model, level) average."""
    neighbour_shrink: float = Field(default=0.5, gt=0, le=1000)
    """Weight of the (model, level) mean against the similar tasks' (each weighs its
    similarity, 0..1): lower trusts similar tasks sooner."""
    margin_spreads: float = Field(default=2.0, ge=0, le=10)
    """Safety margin: the budget is this many spreads (in log tokens) above the prediction
    (2.0: about 98 % of answers fit if their tokens are log-normal)."""
    min_spread: float = Field(default=0.5, gt=0, le=5)
    """Smallest spread (in log tokens) a prediction is given, however alike its history."""
    min_budget: int = Field(default=32, ge=1, le=131_072)
    """Smallest max_tokens a budget gives an answer."""
    budget_min_history: int = Field(default=5, ge=0, le=100_000)
    """Past tasks on the model at the predicted level a budget must rest on before it
    limits max_tokens; until then answers get the fixed limit (the guess is only a guess)."""
    max_budget: int = Field(default=0, ge=0, le=131_072)
    """Largest budget; 0 means runner.max_tokens (a budget never exceeds that anyway)."""
    neighbours: int = Field(default=5, ge=1, le=100)
    """Similar past tasks (bm25 nearest neighbours, and embedding ones when embeddings
    are on) a prediction looks at."""
    ux_success_threshold: float = Field(default=0.8, ge=0, le=1)
    """Simple tasks go to the ux model once its success rate on them is at least this."""
    ux_min_samples: int = Field(default=10, ge=1, le=100_000)
    """Simple tasks the ux model must have finished before its success rate counts."""
    explore_rate: float = Field(default=0.1, ge=0, le=1)
    """While ux has fewer samples than that, this share of simple tasks goes to it anyway
    (chosen by a hash of the task's text and explore_seed) to gather the evidence."""
    explore_seed: int = Field(default=0, ge=0)
    """Which tasks explore (a ux route, a skipped tactic): the same seed picks the same
    texts, so a replayed workload is reproducible; another seed picks others."""
    tactic_min_samples: int = Field(default=5, ge=1, le=100_000)
    """Uses of a costly tactic (a retry, decomposing after failed answers, planning up
    front) on a model at a level before that level's own record decides whether to use
    it; until then the model's record over every level decides."""
    tactic_max_cost_ratio: float = Field(default=10.0, ge=0)
    """A tactic may spend per task it carries at most this many times what a task costs
    that passes on its first answer on the same model (prompt and answer tokens): a
    retry, a plan with its subtasks and aggregation, a decomposition. One that spends
    more, or never carried a task, is skipped on that model (at that level once the level
    has tactic_min_samples uses of its own). Raise it to trade tokens for passes; 0 skips
    a tactic after its first use (once a first answer has passed)."""
    tactic_explore_rate: float = Field(default=0.1, ge=0, le=1)
    """Share of tasks that still use a skipped tactic (chosen as explore_rate's are), so
    the evidence keeps coming if the model gets better at it; it shrinks as the uses grow
    (times tactic_min_samples / uses)."""
    think_for: list[Level] = Field(default_factory=_default_think_for)
    """Levels whose tasks run with thinking on, on models that support it (Ollama's think)."""
    history_limit: int = Field(default=5000, ge=10, le=1_000_000)
    """Newest outcomes the engine learns from at start."""
    embeddings: str = ""
    """Model that embeds task texts so similar tasks are found by meaning as well as by
    words, in the [models] forms: llamacpp:NAME (embedded), ollama:NAME (Ollama's
    /api/embed, e.g. ollama:nomic-embed-text), openai:URL#MODEL (POST URL/embeddings).
    Empty: similar tasks are found by their words alone (bm25)."""
    embedding_weight: float = Field(default=0.5, ge=0, le=1)
    """Share of a neighbour's similarity that comes from its embedding, the rest from its
    word overlap: w * cosine part + (1 - w) * overlap."""
    embedding_min_cosine: float = Field(default=0.3, ge=0, lt=1)
    """Cosine at or below which two texts' embeddings say nothing; the floor used is the
    higher of this and the mean cosine between stored tasks (a weak model finds all alike)."""
    embedding_max_chars: int = Field(default=1000, ge=16, le=1_000_000)
    """A text is cut to this many characters before it is embedded (its start says what it
    is about; a long text costs the embedded model seconds)."""
    embedding_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """An embedding call that takes longer fails; the lookup then uses bm25 alone."""
    embedding_load_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    """Longest wait for the embedding model to load (an embedded one in a thread; Ollama's
    on its server); a load that takes longer fails like a call."""
    embedding_threads: int = Field(default=1, ge=0, le=256)
    """CPU threads of an embedded (llamacpp:) embedding model; 0 means one per core. One
    keeps it off the chat models' cores for the milliseconds a short text takes."""
    embedding_retry_seconds: float = Field(default=30.0, gt=0, le=86_400)
    """While the embedding model is down it is tried again at most this often; lookups in
    between use bm25 alone without waiting for it."""

    @field_validator("embeddings")
    @classmethod
    def _valid_embeddings(cls, value: str) -> str:
        if value.strip():
            parse_model_spec(value)
        return value.strip()


class RetentionSettings(BaseModel):
    """Forgetting old tasks by themselves (what ``tale purge`` does, on a timer)."""

    model_config = _STRICT

    keep_days: float = Field(default=0.0, ge=0, le=36_500)
    """Finished top-level tasks last updated more than this many days ago are forgotten
    (text, results, conversation turns, checkpoints, workspaces; token counts are kept);
    0 keeps every task. Fractions count: 0.5 is twelve hours."""
    sweep_interval_hours: float = Field(default=6.0, gt=0, le=8760)
    """How often the daemon looks for tasks past keep_days (and once at start-up)."""


class ScheduleSettings(BaseModel):
    """Schedules: tasks that run later (tale submit --at) or again (--every)."""

    model_config = _STRICT

    enabled: bool = True
    """Run schedules. Off, the daemon keeps the schedules it has but fires none and takes
    no new ones; turned on again, the times that passed meanwhile follow ``missed``."""
    missed: Literal["skip", "run_once"] = "run_once"
    """What a schedule does about due times that passed while the daemon (or the machine)
    was down: run_once runs its task once, at start, standing for all of them; skip runs
    none and waits for its next time. Either is recorded (tale schedules show ID). A
    schedule may choose its own (tale submit --missed)."""
    grace_seconds: float = Field(default=300.0, ge=1, le=86_400)
    """A due time the running daemon reaches this late (a machine that was suspended, a
    clock set forward) counts as missed too, and follows ``missed``."""
    max_sleep_seconds: float = Field(default=60.0, ge=0.05, le=86_400)
    """The scheduler sleeps until the next due time, but reads the clock at least this
    often, so a suspend or a changed clock is noticed within it."""
    list_limit: int = Field(default=100, ge=1, le=100_000)
    """Schedules listed when no limit is asked for."""


NotifyEvent = Literal["completed", "failed", "cancelled", "waiting"]
"""What a top-level task did that a notification tells: ended one of three ways, or
stopped to wait for a person (an approval or a question)."""

_DEFAULT_NOTIFY_ON: list[NotifyEvent] = ["completed", "failed", "waiting"]


class NotificationSettings(BaseModel):
    """Desktop notifications when a task ends or waits for you (freedesktop, over D-Bus)."""

    model_config = _STRICT

    desktop: bool = True
    """Send them to the desktop's notification service on the D-Bus session bus
    (DBUS_SESSION_BUS_ADDRESS, else $XDG_RUNTIME_DIR/bus). Without a bus they are off,
    said once in the log."""
    on: list[NotifyEvent] = Field(default_factory=lambda: _DEFAULT_NOTIFY_ON.copy())
    """Which events of a top-level task notify: completed, failed, cancelled, waiting (for
    your approval or answer; not a planned task waiting for its steps)."""
    expire_seconds: int = Field(default=10, ge=0, le=86_400)
    """How long a notification stays on screen; 0 leaves it to the notification service.
    Most services keep a failed or waiting one (urgency critical) until you close it."""
    timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """How long sending one may take (connecting to the bus included) before it is given up."""
    body_chars: int = Field(default=200, ge=20, le=10_000)
    """A notification's body is the task's first line and the first line of its result,
    error or question, each cut to this many characters."""


class HookSettings(BaseModel):
    """Your commands, run when a top-level task ends or waits for you, with the task as
    JSON on stdin, in the sandbox (docs/notifications.md)."""

    model_config = _STRICT

    on_done: str = ""
    """Command line (run by /bin/sh -c) when a task completes; empty: none."""
    on_failed: str = ""
    """Command line when a task fails."""
    on_waiting: str = ""
    """Command line when a task waits for your approval or answer."""
    workdir: str = ""
    """The directory hooks run in, the only one they may write (~ is your home; made if
    missing). Empty: a fresh empty directory for each run, removed after it."""
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Wall time a hook may take before its process group is killed (the task is not
    affected either way). CPU, memory and process limits are [tools.run]'s."""
    network: bool = False
    """Whether hooks may use the network (a webhook needs it); off, they run in a network
    namespace of their own with loopback only."""
    queue_size: int = Field(default=100, ge=1, le=100_000)
    """Hook runs waiting for their turn (one runs at a time); past it a run is dropped,
    and the log says so."""

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: str) -> str:
        value = value.strip()
        if value and not Path(value).expanduser().is_absolute():
            raise ValueError(f"workdir {value!r} must be an absolute path (or start with ~)")
        return value


class Settings(BaseSettings):
    """Everything the daemon can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="TALE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        allow_inf_nan=False,
    )

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    loops: LoopSettings = Field(default_factory=LoopSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    gates: GateSettings = Field(default_factory=GateSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)
    """Acting tasks: workspaces, tools, MCP servers, permissions."""
    schedules: ScheduleSettings = Field(default_factory=ScheduleSettings)
    """Tasks that run later or again."""
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    """Forgetting old tasks by themselves."""
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    """Telling you when a task ends or waits for you, on the desktop."""
    hooks: HookSettings = Field(default_factory=HookSettings)
    """Your commands, run when a task ends or waits for you."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# pydantic-settings builds sources from the class, so the file to read is handed
# over here for the duration of one load_settings() call.
_TOML_FILE: dict[str, Path | None] = {"path": None}


# TALE_* variables that are not settings: the socket path (taled/paths.py and its
# client copy) and how long the client waits for a daemon it starts. A daemon
# started by the client inherits the client's environment, so both are allowed.
OTHER_VARIABLES = frozenset({"TALE_SOCKET", "TALE_START_TIMEOUT"})


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from defaults, ``config_file`` (if it exists), env and overrides.

    Raises ConfigError with every problem named by its dotted key and its source
    (the ``TALE_*`` variable or the file).
    """
    if config_file is not None and config_file.exists() and not config_file.is_file():
        # pydantic-settings would skip it without a word.
        raise ConfigError(f"configuration {config_file} is not a file")
    path = config_file if config_file is not None and config_file.exists() else None
    found = _scan_environment(os.environ)
    if found.malformed:
        raise ConfigError("invalid TALE_* environment: " + "; ".join(found.malformed))
    _TOML_FILE["path"] = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {_describe(err)}"
            f" ({_source(tuple(str(p) for p in err['loc']), found, path)})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except SettingsError as exc:
        # The variables were checked above, so this is the file (or a source's own bug).
        raise ConfigError(f"cannot read configuration {path or '(environment)'}: {exc}") from None
    except (OSError, ValueError) as exc:
        # tomllib.TOMLDecodeError is a ValueError: a syntax error in the file.
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    finally:
        _TOML_FILE["path"] = None
    # An OpenAI-compatible server's key may well live in a TALE_ variable.
    unknown = [u for name, u in found.unknown.items() if name != settings.models.openai.api_key_env]
    if unknown:
        raise ConfigError("invalid TALE_* environment: " + "; ".join(unknown))
    return settings


class _Environment:
    """What the TALE_* variables set, and what is wrong with them."""

    def __init__(self) -> None:
        self.paths: dict[tuple[str, ...], tuple[str, Any]] = {}
        """Dotted setting path -> (variable, its value parsed as JSON where it is JSON)."""
        self.unknown: dict[str, str] = {}
        """Variable -> what is wrong: it names no setting."""
        self.malformed: list[str] = []
        """A table or list variable whose value is not JSON."""


def _scan_environment(environ: Mapping[str, str]) -> _Environment:
    """Resolve every TALE_* variable to the setting it sets, as pydantic-settings will.

    pydantic-settings ignores a variable that matches no field (so TALE_QUEU__WORKERS
    would do nothing) and blames a bad JSON value on no source at all.
    """
    found = _Environment()
    for var, value in environ.items():
        if not var.upper().startswith("TALE_") or var.upper() in OTHER_VARIABLES:
            continue
        parts = tuple(var[len("TALE_") :].lower().split("__"))
        model: type[BaseModel] = Settings
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            field = model.model_fields.get(part)
            if field is None:
                found.unknown[var] = _unknown(var, parts[:depth], part, model)
                found.paths[parts] = (var, value)  # validation names it too, in a table
                break
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                if last:
                    _json(var, value, found, parts, table=True)
                model = kind
                continue
            if get_origin(kind) in (dict, list):
                # Deeper parts are the dict's keys, checked by validation.
                if last:
                    _json(var, value, found, parts, table=False)
                else:
                    found.paths[parts] = (var, value)
            elif not last:
                dotted = ".".join(parts[: depth + 1])
                found.malformed.append(f"{var}: {dotted} is one value, not a table of keys")
            else:
                found.paths[parts] = (var, value)
            break
    return found


def _json(
    var: str, value: str, found: _Environment, parts: tuple[str, ...], *, table: bool
) -> None:
    try:
        found.paths[parts] = (var, json.loads(value))
    except ValueError:
        form = f"a JSON object of its keys, or set one key: {var}__KEY=VALUE" if table else "JSON"
        found.malformed.append(f"{var}: its value must be {form}, not {value[:40]!r}")


def _unknown(var: str, table: tuple[str, ...], part: str, model: type[BaseModel]) -> str:
    where = f"in [{'.'.join(table)}]" if table else "at the top (settings are TALE_<TABLE>__<KEY>)"
    names = list(model.model_fields)
    close = difflib.get_close_matches(part, names, n=1)
    suggestion = ""
    if close:
        fixed = "__".join((*table, close[0])).upper()
        rest = var.upper().split("__")[len(table) + 1 :]
        suggestion = f"; did you mean {'__'.join(('TALE_' + fixed, *rest))}?"
    return (
        f"{var} names no setting: no {part!r} {where}{suggestion} (etc/taled.toml lists them all)"
    )


def _source(loc: tuple[str, ...], found: _Environment, path: Path | None) -> str:
    """Where the value at ``loc`` came from: the variable that set it, else the file."""
    for parts, (var, value) in found.paths.items():
        if loc[: len(parts)] == parts:
            inner: Any = value
            for key in loc[len(parts) :]:
                inner = inner.get(key) if isinstance(inner, dict) else None
            if inner is not None:
                return f"from {var}"
        elif parts[: len(loc)] == loc:
            return f"from {var}"  # a check of the whole table, one of whose keys it set
    return f"from {path}" if path is not None else "from the defaults"


def _describe(err: Any) -> str:
    if err.get("type") == "extra_forbidden":
        return "unknown key (check its spelling against etc/taled.toml)"
    if err.get("type") == "finite_number":
        return "must be a finite number (not inf or nan)"
    return str(err.get("msg", "invalid value"))


# -- where each value came from (taled --print-config) ---------------------------------


@dataclass(frozen=True)
class SettingOrigin:
    """Where one setting's effective value came from."""

    kind: Literal["default", "file", "env"]
    name: str = ""
    """The config file's path, or the environment variable's name."""

    def __str__(self) -> str:
        return self.kind if self.kind == "default" else f"{self.kind} {self.name}"


class SettingSources:
    """Where each setting's value comes from, layered as ``load_settings`` layers them:
    a ``TALE_*`` variable over the config file over the default.

    Ask about one value at a time by its dotted path (``("queue", "workers")``, a dict
    setting's key included: ``("tools", "policy", "run")``).
    """

    def __init__(self, config_file: Path | None, environ: Mapping[str, str] | None = None) -> None:
        self.config_file = (
            config_file if config_file is not None and config_file.is_file() else None
        )
        self._file: dict[str, Any] = (
            tomllib.loads(self.config_file.read_text(encoding="utf-8")) if self.config_file else {}
        )
        self._env = _scan_environment(os.environ if environ is None else environ)

    def origin(self, loc: tuple[str, ...]) -> SettingOrigin:
        """The source of the value at ``loc``."""
        for parts, (var, value) in self._env.paths.items():
            # A variable sets the value itself, or a table (as JSON) that holds it.
            if loc[: len(parts)] == parts and _dig(value, loc[len(parts) :]) is not None:
                return SettingOrigin("env", var)
        if self.config_file is not None and _dig(self._file, loc) is not None:
            return SettingOrigin("file", str(self.config_file))
        return SettingOrigin("default")


def _dig(doc: Any, keys: tuple[str, ...]) -> Any:
    """The value under ``keys`` in nested dicts, or None where a key is missing."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


# The last word of a name that holds a credential. The last word only: max_tokens and
# chars_per_token are numbers, api_key_env names a variable rather than holding a key.
_SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "passphrase", "credentials"}
)


def is_secret(name: str, value: object) -> bool:
    """Whether a setting (or a dict setting's entry, such as an MCP server's ``env``)
    holds a secret to keep off screens and logs: a SecretStr, or a string whose name
    ends in key, token, secret or password (``api_key``, ``GITHUB_TOKEN``)."""
    if isinstance(value, SecretStr):
        return True
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return isinstance(value, str) and bool(words) and words[-1] in _SECRET_WORDS
