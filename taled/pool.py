"""The model pool: which loaded model serves which role, and every call's ledger row.

Two pinned roles: ``ux`` answers people, ``task`` does the work. Each has its own
backend instance, loaded at start and never unloaded, so a chat reply never
waits behind a running task. (More backends, health checks, fallback and
optional models grow from here.) All model calls go through
``ModelPool.stream``/``complete``, so each one is timed out, cancellable and
recorded in the token ledger in exactly one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from taled.backends.base import Backend, CancelToken, ChatMessage, Completion
from taled.backends.llamacpp import LlamaCppBackend
from taled.errors import InvalidInput, ModelError, ModelTimeout
from taled.settings import ModelsSettings, Role, parse_model_spec
from taled.store import CallRecord, Store

__all__ = ["ModelPool", "RoleStatus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleStatus:
    """What ``tale models`` shows for one role."""

    role: str
    backend: str
    model: str
    pinned: bool
    loaded: bool
    model_bytes: int | None
    threads: int | None


def _make_backend(role: Role, spec: str, settings: ModelsSettings) -> Backend:
    parsed = parse_model_spec(spec)
    if parsed.backend == "ollama":
        from taled.backends.ollama import OllamaBackend

        return OllamaBackend(parsed.model, settings.ollama, pinned=True)
    if parsed.backend == "openai":
        from taled.backends.openai import OpenAIBackend

        assert parsed.base_url is not None
        return OpenAIBackend(parsed.base_url, parsed.model, settings.openai)
    threads = settings.llamacpp.role_threads.get(role, 0)
    return LlamaCppBackend(parsed.model, settings.llamacpp, n_threads=threads)


class ModelPool:
    """Loads the configured role models and runs calls on them."""

    def __init__(self, settings: ModelsSettings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._backends: dict[str, Backend] = {
            "ux": _make_backend("ux", settings.ux, settings),
            "task": _make_backend("task", settings.task, settings),
        }

    async def start(self) -> None:
        """Load every role's model; raises ModelError if one cannot load."""
        for role, backend in self._backends.items():
            log.info("loading %s model %s:%s", role, backend.kind, backend.model)
            await backend.load()

    async def stop(self) -> None:
        """Unload every model (waits for calls in flight)."""
        for backend in self._backends.values():
            await backend.unload()

    def backend(self, role: str) -> Backend:
        """The backend serving ``role``."""
        try:
            return self._backends[role]
        except KeyError:
            raise InvalidInput(
                f"unknown role {role!r}; roles: {', '.join(self._backends)}"
            ) from None

    def status(self) -> list[RoleStatus]:
        """Role bindings and whether each model is loaded (both roles are pinned)."""
        return [
            RoleStatus(role, b.kind, b.model, True, b.loaded, b.memory().bytes, b.threads())
            for role, b in self._backends.items()
        ]

    async def stream(
        self,
        role: str,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout: float,
        task_id: str | None = None,
        cancel: CancelToken | None = None,
        result: Completion | None = None,
    ) -> AsyncIterator[str]:
        """Stream one call's text; it lands in the ledger however it ends."""
        backend = self.backend(role)
        cancel = cancel or CancelToken()
        out = result if result is not None else Completion.empty()
        started = time.perf_counter()
        error: str | None = None
        pieces = backend.stream(
            messages, max_tokens=max_tokens, temperature=temperature, cancel=cancel, result=out
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                # The deadline covers each wait for the backend, never our consumer's
                # code between pieces (a cancel scope must not span a yield).
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        break
                yield piece
        except TimeoutError:
            error = f"timed out after {timeout:g} s"
            raise ModelTimeout(
                f"{backend.kind}:{backend.model} did not finish within {timeout:g} s "
                "(runner.call_timeout_seconds)"
            ) from None
        except ModelError as exc:
            error = exc.message
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pieces.aclose()
            total_ms = (time.perf_counter() - started) * 1000
            if error is None and out.finish_reason == "cancelled":
                error = "cancelled"
            self._store.record_call(
                CallRecord(
                    role=role,
                    backend=backend.kind,
                    model=backend.model,
                    task_id=task_id,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    load_ms=out.load_ms,
                    prompt_ms=out.prompt_ms,
                    generation_ms=out.generation_ms,
                    total_ms=total_ms,
                    success=error is None,
                    error=error,
                )
            )

    async def complete(
        self,
        role: str,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout: float,
        task_id: str | None = None,
        cancel: CancelToken | None = None,
    ) -> Completion:
        """Run one call to the end and return its text, counts and timings."""
        out = Completion.empty()
        async for _piece in self.stream(
            role,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout=timeout,
            task_id=task_id,
            cancel=cancel,
            result=out,
        ):
            pass  # the text accumulates in ``out``
        return out
