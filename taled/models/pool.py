"""The model pool: which model serves which role, its health, and every call's ledger row.

Two pinned roles: ``ux`` answers people, ``task`` does the work. Each has its own
backend instance, loaded at start and never unloaded, so a chat reply never
waits behind a running task. Optional models (the ``fallback``, per-task
overrides) load on demand and are evicted least-recently-used while available
memory is below ``models.pool.memory_floor_mb``; pinned ones never are.

Health: every loaded model is probed every ``health_interval_seconds``; a probe
that fails or hangs, or a call that raises ``BackendDown``, marks it down. A
pinned model is then reloaded (a fresh backend instance) with exponential
backoff; meanwhile its role's calls go to the fallback, or wait up to
``down_wait_seconds`` for it to come back. A call that failed before the caller
saw any text is retried once on wherever the role now routes.

All model calls go through ``ModelPool.stream``/``complete``, each as one
``ModelCall`` (``taled/models/call.py``) built by the caller, so each one is
timed out, cancellable and recorded in the token ledger in exactly one place,
with how its model was chosen (``route``: role, override or fallback).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import anyio
import psutil

from taled.db.store import CallRecord, Store
from taled.errors import BackendDown, InvalidInput, ModelError, ModelTimeout, RoleDown
from taled.models.backends.base import Backend, CancelToken, Completion, continuation
from taled.models.backends.llamacpp import LlamaCppBackend
from taled.models.call import ModelCall
from taled.models.repetition import LoopGuard
from taled.settings import BackendSpec, LoopSettings, ModelsSettings, Role, parse_model_spec

__all__ = ["ModelCall", "ModelPool", "ModelStatus", "make_backend"]

log = logging.getLogger(__name__)

Health = Literal["ok", "loading", "down", "unloaded"]
RouteKind = Literal["role", "override", "fallback"]

_MIB = 1024 * 1024
# How often a call waiting for a down role looks at its cancel token.
_CANCEL_POLL_SECONDS = 0.1
ROLES: tuple[Role, ...] = ("ux", "task")


def make_backend(
    role: str,
    spec: BackendSpec,
    pinned: bool,
    settings: ModelsSettings,
    yield_to: threading.Event | None = None,
) -> Backend:
    """A fresh, unloaded backend instance for ``spec``.

    ``yield_to`` pauses an embedded model's generation while clear (UX priority).
    """
    if spec.backend == "ollama":
        from taled.models.backends.ollama import OllamaBackend

        return OllamaBackend(spec.model, settings.ollama, pinned=pinned)
    if spec.backend == "openai":
        from taled.models.backends.openai import OpenAIBackend

        assert spec.base_url is not None
        return OpenAIBackend(spec.base_url, spec.model, settings.openai)
    threads = settings.llamacpp.role_threads.get(role, 0) if role in ROLES else 0
    return LlamaCppBackend(spec.model, settings.llamacpp, n_threads=threads, yield_to=yield_to)


@dataclass(eq=False)
class _Slot:
    """One model instance the pool manages, and what it has seen."""

    key: str
    spec: BackendSpec
    pinned: bool
    backend: Backend
    health: Health = "unloaded"
    last_error: str | None = None
    down_since: float | None = None
    next_reload_at: float | None = None
    reloads: int = 0
    unexpected_loads: int = 0
    evictions: int = 0
    calls: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_use: int = 0
    last_used: float = 0.0
    load_ms: float | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reloader: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class ModelStatus:
    """What ``tale models`` shows for one model."""

    role: str
    """'ux', 'task', 'fallback' or 'optional'."""
    backend: str
    model: str
    spec: str
    pinned: bool
    loaded: bool
    health: str
    serving: str | None
    """Who answers this role's calls while it is down (a spec, or 'waiting')."""
    memory_bytes: int | None
    vram_bytes: int | None
    memory_local: bool
    threads: int | None
    calls: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    last_error: str | None
    down_since: float | None
    next_reload_at: float | None
    reloads: int
    unexpected_loads: int
    evictions: int
    load_ms: float | None
    idle_seconds: float | None


class ModelPool:
    """Loads the role models, keeps them healthy, and runs calls on them."""

    def __init__(
        self, settings: ModelsSettings, store: Store, *, loops: LoopSettings | None = None
    ) -> None:
        """``loops``: stop every call whose answer starts repeating itself (None: never)."""
        self._settings = settings
        self._pool = settings.pool
        self._store = store
        self._loops = loops if loops is not None and loops.enabled else None
        # Set while no UX call is generating on the ux model; embedded models of
        # other roles pause between tokens while it is clear (models.pool.ux_priority).
        self._ux_idle = threading.Event()
        self._ux_idle.set()
        self._ux_calls = 0
        self._roles: dict[str, _Slot] = {}
        for role in ROLES:
            spec = parse_model_spec(getattr(settings, role))
            self._roles[role] = _Slot(role, spec, True, self._backend(role, spec, True))
        self._fallback = parse_model_spec(settings.fallback) if settings.fallback else None
        self._optional: dict[str, _Slot] = {}
        if self._fallback is not None:
            self._optional[self._fallback.label] = self._new_optional(self._fallback)
        self._health: asyncio.Task[None] | None = None
        self._discarding: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Load both pinned models and start health checks.

        Raises ModelError if a pinned model cannot load. The one exception: a
        backend that is unreachable (BackendDown) while a fallback is configured
        starts down, and is reloaded in the background like any failed model.
        """
        for slot in self._roles.values():
            log.info("loading %s model %s", slot.key, slot.spec.label)
            try:
                await self._load(slot)
            except BackendDown as exc:
                if self._fallback is None:
                    raise
                log.warning("%s model is down at start (%s); using the fallback", slot.key, exc)
                slot.down_since = time.time()
                self._start_reload(slot)
        self._health = asyncio.create_task(self._health_loop(), name="pool-health")

    async def stop(self) -> None:
        """Stop health checks and reloads, and unload every model."""
        tasks = [t for t in (self._health, *(s.reloader for s in self._slots())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._discarding, return_exceptions=True)
        for slot in self._slots():
            await slot.backend.unload()

    def _backend(self, key: str, spec: BackendSpec, pinned: bool) -> Backend:
        yield_to = None if key == "ux" or not self._pool.ux_priority else self._ux_idle
        return make_backend(key, spec, pinned, self._settings, yield_to)

    def _slots(self) -> list[_Slot]:
        return [*self._roles.values(), *self._optional.values()]

    # -- loading, eviction, health ------------------------------------------

    async def _load(self, slot: _Slot) -> None:
        async with slot.load_lock:
            if slot.health == "ok":
                return
            slot.health = "loading"
            started = time.perf_counter()
            try:
                await slot.backend.load()
            except ModelError as exc:
                slot.health = "down" if slot.pinned else "unloaded"
                slot.last_error = exc.message
                raise
            slot.load_ms = (time.perf_counter() - started) * 1000
            slot.health = "ok"
            slot.down_since = None
            slot.up.set()
        log.info("%s model %s loaded in %.0f ms", slot.key, slot.spec.label, slot.load_ms)

    async def _unload(self, slot: _Slot, why: str) -> None:
        async with slot.load_lock:
            if slot.health != "ok" or slot.in_use:
                return
            slot.health = "unloaded"
            slot.up.clear()
            log.info("unloading %s: %s", slot.spec.label, why)
            await slot.backend.unload()

    async def _optional_slot(self, spec: BackendSpec) -> _Slot:
        """The on-demand slot for ``spec``, loaded, with ``in_use`` already taken."""
        slot = self._optional.get(spec.label)
        if slot is None:
            slot = self._optional[spec.label] = self._new_optional(spec)
        slot.in_use += 1
        try:
            if slot.health != "ok":
                # Make room first: the model about to load needs the memory now.
                await self.evict(keep=slot)
                started = time.perf_counter()
                await self._load(slot)
                log.info(
                    "switched to %s: ready in %.0f ms",
                    spec.label,
                    (time.perf_counter() - started) * 1000,
                )
        except BaseException:
            slot.in_use -= 1
            raise
        return slot

    def _new_optional(self, spec: BackendSpec) -> _Slot:
        backend = self._backend("optional", spec, False)
        return _Slot(spec.label, spec, False, backend)

    async def evict(self, keep: _Slot | None = None) -> list[str]:
        """Unload idle optional models, least recently used first, while memory is short.

        Returns the specs evicted. Pinned models are never candidates, nor are
        models on another machine (unloading them frees nothing here).
        """
        floor = self._pool.memory_floor_mb * _MIB
        evicted: list[str] = []
        candidates = sorted(
            (
                s
                for s in self._optional.values()
                if s is not keep and s.health == "ok" and s.in_use == 0 and s.backend.memory().local
            ),
            key=lambda s: s.last_used,
        )
        for slot in candidates:
            available = psutil.virtual_memory().available
            if available >= floor:
                break
            await self._unload(
                slot,
                f"available memory {available / _MIB:.0f} MiB is below "
                f"models.pool.memory_floor_mb = {self._pool.memory_floor_mb}",
            )
            if slot.health == "unloaded":
                slot.evictions += 1
                evicted.append(slot.spec.label)
        return evicted

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._pool.health_interval_seconds)
            await self.check_health()

    async def check_health(self) -> None:
        """Probe every loaded model at once, then evict if memory is short."""
        await asyncio.gather(*(self._probe(s) for s in self._slots() if s.health == "ok"))
        await self.evict()

    async def _probe(self, slot: _Slot) -> None:
        backend = slot.backend
        timeout = self._pool.probe_timeout_seconds
        try:
            with anyio.fail_after(timeout):
                await backend.probe()
        except BackendDown as exc:
            problem = exc.message
        except TimeoutError:
            problem = (
                f"health probe hung for over {timeout:g} s (models.pool.probe_timeout_seconds)"
            )
        else:
            return
        self._mark_down(slot, problem, backend)

    def _mark_down(self, slot: _Slot, problem: str, backend: Backend) -> None:
        """Take a model out of service; a pinned one starts reloading.

        ``backend`` is the instance that failed: if the slot has moved on to a
        fresh one meanwhile (a late failure of a replaced instance), nothing changes.
        """
        if slot.backend is not backend or slot.health in ("down", "unloaded"):
            return
        log.warning("%s model %s is down: %s", slot.key, slot.spec.label, problem)
        slot.health = "down" if slot.pinned else "unloaded"
        slot.last_error = problem
        slot.down_since = time.time()
        slot.up.clear()
        # Never reuse a broken instance: a fresh one loads, the old one is released
        # once its calls end (or abandoned if it is hung).
        self._discard(slot.backend)
        slot.backend = self._backend(slot.key, slot.spec, slot.pinned)
        if slot.pinned:
            self._start_reload(slot)

    def _start_reload(self, slot: _Slot) -> None:
        if slot.reloader is None or slot.reloader.done():
            slot.reloader = asyncio.create_task(self._reload(slot), name=f"reload-{slot.key}")

    def _discard(self, backend: Backend) -> None:
        async def release() -> None:
            with anyio.move_on_after(self._pool.probe_timeout_seconds) as scope:
                try:
                    await backend.unload()
                except ModelError as exc:
                    log.info("releasing a failed %s instance: %s", backend.kind, exc.message)
            if scope.cancelled_caught:
                log.warning("a hung %s instance of %s was abandoned", backend.kind, backend.model)

        task = asyncio.create_task(release())
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def _reload(self, slot: _Slot) -> None:
        delay = self._pool.reload_backoff_seconds
        while slot.health != "ok":
            slot.next_reload_at = time.time() + delay
            await asyncio.sleep(delay)
            slot.next_reload_at = None
            try:
                await self._load(slot)
                with anyio.fail_after(self._pool.probe_timeout_seconds):
                    await slot.backend.probe()
            except (ModelError, TimeoutError) as exc:
                problem = exc.message if isinstance(exc, ModelError) else "probe hung after reload"
                slot.health = "down"
                slot.up.clear()
                slot.last_error = f"reload failed: {problem}"
                log.warning("reloading %s model %s failed: %s", slot.key, slot.spec.label, problem)
                self._discard(slot.backend)
                slot.backend = self._backend(slot.key, slot.spec, True)
                delay = min(delay * 2, self._pool.reload_backoff_max_seconds)
                continue
            slot.reloads += 1
            log.info("%s model %s is back", slot.key, slot.spec.label)

    # -- routing -------------------------------------------------------------

    def _pinned_for(self, role: str, spec: BackendSpec) -> _Slot | None:
        # An override naming a pinned model uses that instance (the role's own first).
        own = self._roles[role]
        if own.spec == spec:
            return own
        return next((s for s in self._roles.values() if s.spec == spec), None)

    async def _acquire(
        self, role: str, model: str | None, cancel: CancelToken
    ) -> tuple[_Slot, RouteKind]:
        """The slot that serves this call, with ``in_use`` taken."""
        if role not in self._roles:
            raise InvalidInput(f"unknown role {role!r}; roles: {', '.join(self._roles)}")
        if model is not None:
            try:
                spec = parse_model_spec(model)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            pinned = self._pinned_for(role, spec)
            if pinned is None:
                return await self._optional_slot(spec), "override"
            slot = pinned
        else:
            slot = self._roles[role]
        if slot.health != "ok" and self._fallback is not None:
            try:
                return await self._optional_slot(self._fallback), "fallback"
            except ModelError as exc:
                log.warning("the fallback %s is unavailable too: %s", self._fallback.label, exc)
        if slot.health != "ok":
            with anyio.move_on_after(self._pool.down_wait_seconds):
                await self._until_up(slot, cancel)
        if slot.health != "ok":
            raise RoleDown(
                f"the {slot.key} model {slot.spec.label} is down ({slot.last_error}); "
                f"tale is reloading it. Waited {self._pool.down_wait_seconds:g} s "
                "(models.pool.down_wait_seconds); set models.fallback to keep working meanwhile"
            )
        slot.in_use += 1
        return slot, "role"

    @staticmethod
    async def _until_up(slot: _Slot, cancel: CancelToken) -> None:
        # The cancel token is a thread-safe flag, not awaitable: look at it often.
        while slot.health != "ok" and not cancel.cancelled:
            with anyio.move_on_after(_CANCEL_POLL_SECONDS):
                await slot.up.wait()

    async def wait_until_served(self, role: str, cancel: CancelToken) -> bool:
        """Wait until ``role``'s calls can be served (its model is up, or a fallback is set).

        Returns False if ``cancel`` was set first.
        """
        slot = self._roles[role]
        if self._fallback is None:
            await self._until_up(slot, cancel)
        return not cancel.cancelled

    def busy(self, role: str) -> bool:
        """Whether the role's model is serving a call now (a new one would wait for it)."""
        slot = self._roles.get(role)
        return slot is not None and slot.in_use > 0

    def thinks(self, role: str) -> bool:
        """Whether the role's model has a thinking mode a call can switch (Ollama's think)."""
        slot = self._roles.get(role)
        return slot is not None and bool(getattr(slot.backend, "thinks", False))

    # -- calls ---------------------------------------------------------------

    def stream(self, call: ModelCall, result: Completion | None = None) -> AsyncIterator[str]:
        """Stream one call's text; it lands in the ledger however it ends.

        If the backend fails before any text reached the caller, the call runs
        once more wherever the role now routes (the fallback, or the reloaded
        model). Once text has been delivered, the failure is raised.
        ``result`` (filled in as the call runs) gets the call's text, counts and
        timings.
        """
        out = result if result is not None else Completion.empty()
        return self._run(call, out, restartable=False)

    async def complete(self, call: ModelCall) -> Completion:
        """Run one call to the end and return its text, counts and timings.

        Nobody has seen partial text, so a backend failing mid-answer restarts the
        call (once) on wherever the role now routes. ``call.on_piece`` sees each piece
        as it arrives (for progress), ``call.on_restart`` hears that the pieces seen so
        far are void (the call starts over); ``call.key`` names the step, and which
        attempt at it, in the ledger; ``call.think`` switches a thinking model's
        reasoning (backends without one ignore it).
        ``call.partial`` is an answer of the model's own, cut off, to continue: the
        result's text is what follows it (see ``backends.base.continuation``, chosen per
        backend because a fallback may serve the call). A cancelled call returns what it
        had produced, with finish_reason 'cancelled'.
        ``call.tools``: the model may call them, in its backend's native form; the calls
        are the result's ``tool_calls`` (the embedded model always makes one).
        ``call.schema``: a JSON Schema the reply's text must satisfy. Either way the loop
        guard stays off: a cut would break the JSON. Neither goes with ``partial``
        (``ModelCall`` refuses that).
        """
        out = Completion.empty()
        async for piece in self._run(call, out, restartable=True):
            # The text accumulates in ``out``; the callback only watches.
            if call.on_piece is not None:
                call.on_piece(piece)
        return out

    async def _run(
        self, call: ModelCall, out: Completion, *, restartable: bool
    ) -> AsyncIterator[str]:
        role, cancel = call.role, call.cancel
        retried = False
        while True:
            slot, route = await self._acquire(role, call.model, cancel)
            backend = slot.backend
            delivered = False
            # A person is waiting on this reply: other embedded models pause meanwhile.
            priority = role == "ux" and slot is self._roles["ux"] and not call.background
            if priority:
                self._ux_calls += 1
                self._ux_idle.clear()
            try:
                async for piece in self._call(call, slot, backend, route, out):
                    delivered = True
                    yield piece
                return
            except BackendDown as exc:
                self._mark_down(slot, exc.message, backend)
                if retried or (delivered and not restartable) or cancel.cancelled:
                    raise
                log.warning("retrying the %s call after: %s", role, exc.message)
                retried = True
                _reset(out)
                if call.on_restart is not None:
                    call.on_restart()
            finally:
                slot.in_use -= 1
                slot.last_used = time.monotonic()
                if priority:
                    self._ux_calls -= 1
                    if not self._ux_calls:
                        self._ux_idle.set()

    async def _call(
        self, call: ModelCall, slot: _Slot, backend: Backend, route: RouteKind, out: Completion
    ) -> AsyncIterator[str]:
        role, timeout = call.role, call.timeout
        started = time.perf_counter()
        error: str | None = None
        note = None
        if route == "fallback":
            down = self._roles[role]
            note = f"{role} model {down.spec.label} was down: {down.last_error}"
        guard = None
        if self._loops is not None and not call.structured:
            asked = next((m["content"] for m in reversed(call.messages) if m["role"] == "user"), "")
            guard = LoopGuard.from_settings(self._loops, asked)
        # The guard stops the backend through a token of its own: the caller's token
        # being set means "the caller stopped it", which a loop is not.
        cancel = CancelToken(parent=call.cancel) if guard is not None else call.cancel
        pieces = backend.stream(
            continuation(call.messages, call.partial, native=backend.continues_final_message),
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            cancel=cancel,
            result=out,
            think=call.think,
            tools=call.tools,
            schema=call.schema,
            keep_prefix=call.keep_prefix,
            background=call.background,
        )
        deadline = time.monotonic() + timeout
        so_far = ""
        try:
            while True:
                # The deadline covers each wait for the backend, never our consumer's
                # code between pieces (a cancel scope must not span a yield).
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        break
                if guard is not None and guard.cut is None:
                    so_far += piece
                    if guard.looped(so_far):
                        cancel.cancel()
                yield piece
        except TimeoutError:
            error = f"timed out after {timeout:g} s"
            raise ModelTimeout(
                f"{slot.spec.label} did not finish within {timeout:g} s "
                "(runner.call_timeout_seconds)"
            ) from None
        except ModelError as exc:
            error = exc.message
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pieces.aclose()
            looped = False
            if guard is not None and guard.cut is not None and not call.cancel.cancelled:
                looped = True
                out.text = guard.trimmed(out.text)
                out.finish_reason = "stop"
                kept = f"stopped repeating itself; kept {len(out.text)} characters"
                note = f"{note}; {kept}" if note else kept
            total_ms = (time.perf_counter() - started) * 1000
            if error is None and out.finish_reason == "cancelled":
                error = "cancelled"
            if slot.pinned and out.load_ms > self._pool.unexpected_load_ms:
                # A pinned model is never unloaded by us: the backend dropped it.
                slot.unexpected_loads += 1
                note = (
                    f"the backend reloaded this pinned model ({out.load_ms:.0f} ms): "
                    "it had been unloaded behind tale's back"
                )
                log.warning("%s model %s: %s", slot.key, slot.spec.label, note)
            slot.calls += 1
            slot.prompt_tokens += out.prompt_tokens
            slot.completion_tokens += out.completion_tokens
            if error is not None and error != "cancelled":
                slot.failures += 1
                slot.last_error = error
            log.debug(
                "%s call %s: %d prompt tokens (%d still cached) read in %.0f ms, %d generated",
                slot.key,
                call.key,
                out.prompt_tokens,
                out.cached_tokens,
                out.prompt_ms,
                out.completion_tokens,
            )
            self._store.record_call(
                CallRecord(
                    role=role,
                    backend=backend.kind,
                    # A model id alone does not say which server answered.
                    model=(
                        f"{slot.spec.base_url}#{slot.spec.model}"
                        if slot.spec.backend == "openai"
                        else backend.model
                    ),
                    task_id=call.task_id,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    load_ms=out.load_ms,
                    prompt_ms=out.prompt_ms,
                    generation_ms=out.generation_ms,
                    total_ms=total_ms,
                    success=error is None,
                    error=error,
                    route=route,
                    note=note,
                    counts_exact=out.counts_exact,
                    key=call.key,
                    conversation_id=call.conversation_id,
                    saved_tokens=call.saved_tokens,
                    looped=looped,
                    cached_tokens=out.cached_tokens,
                )
            )

    # -- status --------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        """Every role and loaded-or-known optional model, with health and counters."""
        rows = [self._status(slot.key, slot) for slot in self._roles.values()]
        fallback_key = self._fallback.label if self._fallback else None
        for key, slot in self._optional.items():
            rows.append(self._status("fallback" if key == fallback_key else "optional", slot))
        return rows

    def _status(self, role: str, slot: _Slot) -> ModelStatus:
        memory = slot.backend.memory()
        serving = None
        if slot.pinned and slot.health != "ok":
            serving = self._fallback.label if self._fallback else "waiting"
        return ModelStatus(
            role=role,
            backend=slot.spec.backend,
            model=slot.spec.model,
            spec=slot.spec.label,
            pinned=slot.pinned,
            loaded=slot.health == "ok",
            health=slot.health,
            serving=serving,
            memory_bytes=memory.bytes,
            vram_bytes=memory.vram_bytes,
            memory_local=memory.local,
            threads=slot.backend.threads(),
            calls=slot.calls,
            failures=slot.failures,
            prompt_tokens=slot.prompt_tokens,
            completion_tokens=slot.completion_tokens,
            last_error=slot.last_error,
            down_since=slot.down_since,
            next_reload_at=slot.next_reload_at,
            reloads=slot.reloads,
            unexpected_loads=slot.unexpected_loads,
            evictions=slot.evictions,
            load_ms=None if slot.load_ms is None else round(slot.load_ms, 1),
            idle_seconds=(round(time.monotonic() - slot.last_used, 1) if slot.last_used else None),
        )


def _reset(out: Completion) -> None:
    """Empty a result before a call starts over."""
    fresh = Completion.empty()
    for name in vars(fresh):
        setattr(out, name, getattr(fresh, name))
