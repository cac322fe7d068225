"""Text embeddings for the similar-task memory: one model behind one small interface.

``learning.embeddings`` names the model in the ``[models]`` forms:

    llamacpp:NAME       an embedded llama.cpp model, in a ``Llama`` instance of its own
                        (embedding mode is fixed when a context is made), run on the
                        compute thread the chat models share
    ollama:NAME         Ollama's ``/api/embed``, through the official client's ``embed``
    openai:URL#MODEL    ``POST URL/embeddings`` in OpenAI's format, over httpx

``EmbeddingService`` owns that embedder for the daemon (``taled/app.py`` starts,
warms and stops it) and is what the similar-task memory calls. Embeddings are advice:
a call that fails or runs past ``learning.embedding_timeout_seconds`` returns None and
the lookup uses bm25 alone. The first failure of an outage is logged once (a warning),
its end once (info); while the embedder is down it is tried again at most every
``learning.embedding_retry_seconds``, so a dead server does not cost each lookup a
timeout. Every vector is float32 and L2-normalised here, whatever the backend sent, so
a cosine is a dot product.

Errors inside the embedders follow ``taled.errors``: ``BackendDown`` when the
backend is unreachable or broken, ``ModelError`` when it refuses the request (an
unknown model) or answers something that is not embeddings.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx
import numpy as np
import numpy.typing as npt
from ollama import AsyncClient

from taled.errors import BackendDown, ModelError, ModelTimeout, TaleError
from taled.models.backends.compute import COMPUTE
from taled.models.backends.llamacpp import machine_threads, model_params, resolve_model_path
from taled.models.backends.ollama import (
    DEFAULT_HOST,
    canonical_name,
    describe_error,
    parse_keep_alive,
    translated_errors,
)
from taled.settings import (
    LearningSettings,
    LlamaCppSettings,
    ModelsSettings,
    OllamaSettings,
    OpenAISettings,
    parse_model_spec,
)

__all__ = [
    "Embedder",
    "EmbeddingService",
    "LlamaCppEmbedder",
    "OllamaEmbedder",
    "OpenAIEmbedder",
    "embedder_for",
    "normalised",
]

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]

# The embedded embedder's context, in tokens: learning.embedding_max_chars (1000) is
# about 250 English tokens, so this leaves room; a text that still has more is cut
# here (llama-cpp-python's embed truncates to n_batch). Larger costs KV memory and,
# at 2048, seconds per long text on one core.
_LLAMA_CONTEXT_TOKENS = 512
# llama.cpp's poolings that give one vector per text (mean, CLS, last token) as a
# GGUF's metadata writes them; none (one per token) and rank (a score) do not.
_POOLINGS = frozenset({"1", "2", "3"})
# Longest piece of an error body quoted in a message.
_ERROR_TEXT_CHARS = 300


class Embedder(Protocol):
    """One embedding model. Raise ``BackendDown`` or ``ModelError`` (see the module)."""

    key: str
    """The model as its vectors are stored (``backend:model``)."""

    async def start(self) -> None:
        """Make clients; nothing that can fail on the network."""

    async def warm(self) -> None:
        """Load what the first call would (the model); raise as ``embed`` does."""

    async def stop(self) -> None:
        """Release the model and clients."""

    async def embed(self, texts: Sequence[str]) -> Sequence[Sequence[float]] | Matrix:
        """One vector per text, in order."""
        ...


def normalised(raw: Sequence[Sequence[float]] | Matrix, count: int, key: str) -> Matrix:
    """``raw`` as a ``(count, d)`` float32 matrix of unit rows; ModelError if it is not one."""
    try:
        matrix = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{key} answered something that is not a list of vectors: {exc}") from exc
    if matrix.ndim != 2 or matrix.shape[0] != count or matrix.shape[1] == 0:
        raise ModelError(
            f"{key} answered embeddings of shape {matrix.shape} for {count} texts; "
            "one vector per text was expected (is it an embedding model?)"
        )
    if not np.isfinite(matrix).all():
        raise ModelError(f"{key} answered an embedding with NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ModelError(f"{key} answered an all-zero embedding")
    out: Matrix = (matrix / norms).astype(np.float32)
    return out


# -- llama.cpp -------------------------------------------------------------------


class LlamaCppEmbedder:
    """An embedded llama.cpp model in embedding mode, in its own ``Llama`` instance.

    The pool's chat instances cannot serve: embedding mode is a context parameter,
    fixed at load. The instance loads in a worker thread when ``warm`` is called
    (``taled/app.py`` does so in the background right after READY) or on the first
    ``embed``, whichever comes first; not before READY, whose target (3 s with both
    chat models) has no room for another load, and not only on first use, which would
    make the first task's assessment wait for it.

    Pooling: the GGUF's own when it names one (an embedding model such as
    nomic-embed-text does); otherwise mean pooling over the tokens' last hidden
    states, as a chat model such as SmolLM2 has none (llama.cpp would give one vector
    per token). One instance is not safe for concurrent use: calls take a lock and
    run on the chat models' compute thread (taled.models.backends.compute: one OpenMP
    team for the process), one text at a time (llama-cpp-python's batch of several texts
    needs a context with as many sequences).
    """

    def __init__(self, model: str, settings: LlamaCppSettings, threads: int = 0) -> None:
        """``threads``: CPU threads (0: one per core)."""
        self.model = model
        self.key = f"llamacpp:{model}"
        self._settings = settings
        self._threads = threads or machine_threads()
        self._llm: Any = None
        self._lock = asyncio.Lock()
        self.dimension: int | None = None

    async def start(self) -> None:
        """Nothing to do until the model loads."""

    async def warm(self) -> None:
        """Load the model now (a no-op once loaded)."""
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> Any:
        if self._llm is None:
            path = resolve_model_path(self.model, self._settings)
            started = time.perf_counter()
            try:
                self._llm = await anyio.to_thread.run_sync(self._load_sync, path)
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelError(f"cannot load {path} for embeddings: {exc}") from exc
            self.dimension = int(self._llm.n_embd())
            log.info(
                "loaded %s for embeddings (%d dimensions) in %.0f ms",
                self.model,
                self.dimension,
                (time.perf_counter() - started) * 1000,
            )
        return self._llm

    def _load_sync(self, path: Path) -> Any:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_UNSPECIFIED, Llama

        def load(pooling: int) -> Any:
            with model_params(repack=self._settings.repack_weights):
                return Llama(
                    model_path=str(path),
                    embedding=True,
                    pooling_type=pooling,
                    n_ctx=_LLAMA_CONTEXT_TOKENS,
                    # A non-causal model must see a whole text in one batch and micro-batch.
                    n_batch=_LLAMA_CONTEXT_TOKENS,
                    n_ubatch=_LLAMA_CONTEXT_TOKENS,
                    n_threads=self._threads,
                    # Embedding a text is a prompt read (left unset: every CPU).
                    n_threads_batch=self._threads,
                    verbose=False,
                )

        llm = load(LLAMA_POOLING_TYPE_MEAN)
        # The metadata is only readable once loaded: a model whose own pooling is not
        # mean (CLS, last token) is loaded again with it; mean-pooled and chat models
        # (SmolLM2 names none) load once.
        arch = llm.metadata.get("general.architecture", "")
        own = llm.metadata.get(f"{arch}.pooling_type")
        if own in _POOLINGS and own != str(LLAMA_POOLING_TYPE_MEAN):
            llm.close()
            llm = load(LLAMA_POOLING_TYPE_UNSPECIFIED)
        return llm

    async def stop(self) -> None:
        """Free the model (after a call in progress)."""
        async with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await anyio.to_thread.run_sync(llm.close)

    async def embed(self, texts: Sequence[str]) -> Matrix:
        """Each text's mean-pooled (or the model's own) embedding, computed a text a step
        on the compute thread (a reply waits for at most one text).

        The lock is taken per text, so a lookup waits behind at most one text of a
        backfill. llama.cpp cannot be interrupted mid-decode: a call past its timeout
        fails when the text in progress is done (the thread is never abandoned, so
        the model is never used by two threads at once).
        """
        rows = []
        for text in texts:
            async with self._lock:
                llm = await self._ensure()
                try:
                    rows.append(await COMPUTE.run(functools.partial(_llama_embed, llm, [text])))
                except (ValueError, RuntimeError) as exc:
                    # A failed decode leaves the context in an unknown state: load afresh.
                    self._llm = None
                    await anyio.to_thread.run_sync(llm.close)
                    raise BackendDown(f"{self.model} failed while embedding: {exc}") from exc
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(rows)


def _llama_embed(llm: Any, texts: list[str]) -> Matrix:
    """Each text's pooled embedding: what ``Llama.embed`` computes, one text at a time.

    Not ``Llama.embed`` itself: it marks only a text's last token as an output, and
    llama.cpp, which pools over every token, then logs a warning on each call (into the
    daemon's log) before marking them all. The same calls, with every token an output.
    """
    import llama_cpp

    n_embd = int(llm.n_embd())
    out = np.empty((len(texts), n_embd), dtype=np.float32)
    for i, text in enumerate(texts):
        # Cut to the context: a non-causal model must see a text in one batch.
        tokens = llm.tokenize(text.encode("utf-8"))[: llm.n_batch]
        llm._batch.reset()
        llm._batch.add_sequence(tokens, 0, True)
        llama_cpp.llama_kv_self_clear(llm._ctx.ctx)
        try:
            llm._ctx.decode(llm._batch)
            pointer = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            out[i] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
        finally:
            llm._batch.reset()
            llama_cpp.llama_kv_self_clear(llm._ctx.ctx)
    return out


# -- Ollama ----------------------------------------------------------------------


class OllamaEmbedder:
    """A model served by Ollama, asked through ``/api/embed`` (the client's ``embed``).

    Requests carry the ``num_ctx`` every tale call to that model carries
    (``models.ollama``), so a model that is also a role is not reloaded by them, and
    ``keep_alive`` -1 when it is a pinned role's model (a request's keep_alive
    replaces the model's expiry), else ``models.ollama.optional_keep_alive``.
    Ollama truncates a text over the model's context (``truncate``).
    """

    def __init__(self, model: str, settings: OllamaSettings, *, pinned: bool) -> None:
        self.model = model
        self.key = f"ollama:{canonical_name(model)}"
        self._settings = settings
        self.host = settings.host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self._num_ctx = settings.model_num_ctx.get(model, settings.num_ctx)
        self._keep_alive: float | str = (
            -1 if pinned else parse_keep_alive(settings.optional_keep_alive)
        )
        self._client: AsyncClient | None = None

    async def start(self) -> None:
        """Make the client (it connects on the first call)."""
        s = self._settings
        self._client = AsyncClient(
            host=self.host,
            timeout=httpx.Timeout(s.read_timeout_seconds, connect=s.connect_timeout_seconds),
        )

    async def warm(self) -> None:
        """Have Ollama load the model: an empty input only loads it."""
        await self.embed([])

    async def stop(self) -> None:
        """Close the client."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()  # type: ignore[no-untyped-call]

    async def embed(self, texts: Sequence[str]) -> Sequence[Sequence[float]]:
        """Ollama's (normalised) embeddings of the texts."""
        if self._client is None:
            raise BackendDown(f"the Ollama embedder for {self.model} is not started")
        with translated_errors(self.host, self.model, "embedding with"):
            response = await self._client.embed(
                self.model,
                input=list(texts),
                truncate=True,
                options={"num_ctx": self._num_ctx},
                keep_alive=self._keep_alive,
            )
        return response.embeddings


# -- OpenAI-compatible -----------------------------------------------------------


class OpenAIEmbedder:
    """A model on an OpenAI-compatible server: ``POST {base_url}/embeddings``.

    The bearer token and the timeouts are those of ``models.openai``.
    """

    def __init__(self, base_url: str, model: str, settings: OpenAISettings) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.key = f"openai:{self.base_url}#{model}"
        self._settings = settings
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Make the connection pool (it connects on the first call)."""
        s = self._settings
        token = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=httpx.Timeout(s.read_timeout_seconds, connect=s.connect_timeout_seconds),
        )

    async def warm(self) -> None:
        """Nothing to load: the server owns the model."""

    async def stop(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def embed(self, texts: Sequence[str]) -> Sequence[Sequence[float]]:
        """The server's embeddings of the texts, in their order (``data[].index``)."""
        if self._client is None:
            raise BackendDown(f"the embedder for {self.key} is not started")
        if not texts:
            return []
        url = f"{self.base_url}/embeddings"
        body = {"model": self.model, "input": list(texts), "encoding_format": "float"}
        try:
            response = await self._client.post(url, json=body)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BackendDown(f"POST {url} failed: {describe_error(exc)}") from exc
        except httpx.InvalidURL as exc:
            raise ModelError(f"{url} is not a valid URL: {exc}") from exc
        try:
            answer: Any = json.loads(response.text)
        except ValueError:
            answer = None
        if response.status_code >= 400:
            # OpenAI and vLLM: {"error": {"message": ...}}; FastAPI: {"detail": ...}.
            error = None
            if isinstance(answer, dict):
                error = answer.get("error") or answer.get("detail")
            if isinstance(error, dict):
                error = error.get("message") or error
            text = str(error or response.text)[:_ERROR_TEXT_CHARS]
            message = f"{url} answered {response.status_code} for {self.model!r}: {text}"
            if response.status_code >= 500:
                raise BackendDown(message)
            raise ModelError(message)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not all(
            isinstance(item, dict) and isinstance(item.get("embedding"), list) for item in data
        ):
            raise ModelError(
                f"{url} did not answer an OpenAI embedding list (data[].embedding): "
                f"{response.text[:_ERROR_TEXT_CHARS]!r}"
            )
        ordered = sorted(enumerate(data), key=lambda p: (p[1].get("index", p[0]), p[0]))
        return [item["embedding"] for _, item in ordered]


def embedder_for(spec: str, models: ModelsSettings, threads: int = 0) -> Embedder:
    """The embedder a ``learning.embeddings`` spec names (the spec is already validated);
    ``threads`` for an embedded one (0: one per core)."""
    parsed = parse_model_spec(spec)
    if parsed.backend == "llamacpp":
        return LlamaCppEmbedder(parsed.model, models.llamacpp, threads)
    if parsed.backend == "ollama":
        roles = {models.ux, models.task}
        pinned = any(
            p.backend == "ollama" and canonical_name(p.model) == canonical_name(parsed.model)
            for p in map(parse_model_spec, roles)
        )
        return OllamaEmbedder(parsed.model, models.ollama, pinned=pinned)
    assert parsed.base_url is not None
    return OpenAIEmbedder(parsed.base_url, parsed.model, models.openai)


# -- the service -----------------------------------------------------------------


class EmbeddingService:
    """The daemon's embedder, with timeouts, outage tracking and counters."""

    def __init__(
        self,
        embedder: Embedder,
        settings: LearningSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._embedder = embedder
        self._settings = settings
        self._clock = clock
        self._started = False
        self._loaded = False
        self._down = False
        self._retry_at = 0.0
        self.calls = 0
        """Embedding calls that succeeded."""
        self.failures = 0
        """Calls that failed or timed out."""
        self.skipped = 0
        """Calls not made because the embedder was down and not due for a retry."""
        self.outages = 0
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, learning: LearningSettings, models: ModelsSettings) -> EmbeddingService:
        """The service for ``learning.embeddings`` (which must be set)."""
        return cls(embedder_for(learning.embeddings, models, learning.embedding_threads), learning)

    @property
    def key(self) -> str:
        """The model's key (``backend:model``), as stored with its vectors."""
        return self._embedder.key

    @property
    def down(self) -> bool:
        """Whether the last attempt failed (lookups use bm25 alone meanwhile)."""
        return self._down

    async def start(self) -> None:
        """Make the embedder's clients (no network yet: start-up never waits for it)."""
        await self._embedder.start()
        self._started = True

    async def warm(self) -> None:
        """Load the model (in the background after READY); a failure starts an outage."""
        await self._load()

    async def _load(self) -> bool:
        """Load the model unless it is; False when that failed (counted, logged once).

        A load is not a call: it is bounded by ``embedding_load_timeout_seconds``, not
        by the call timeout (on a busy machine the embedded model can take seconds).
        """
        if self._loaded:
            return True
        try:
            with anyio.fail_after(self._settings.embedding_load_timeout_seconds):
                await self._embedder.warm()
        except TimeoutError:
            self._failed(
                ModelTimeout(
                    f"{self.key} did not load within "
                    f"{self._settings.embedding_load_timeout_seconds} s "
                    "(learning.embedding_load_timeout_seconds)"
                )
            )
            return False
        except TaleError as exc:
            self._failed(exc)
            return False
        self._loaded = True
        self._recovered()
        return True

    async def stop(self) -> None:
        """Release the model and clients."""
        if self._started:
            self._started = False
            await self._embedder.stop()

    async def embed(self, texts: Sequence[str]) -> Matrix | None:
        """Unit vectors for ``texts`` (each cut to ``embedding_max_chars``), one row each;
        None when the embedder failed, timed out or is down (counted, logged once)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self._down and self._clock() < self._retry_at:
            self.skipped += 1
            return None
        if not await self._load():
            return None
        cut = [t[: self._settings.embedding_max_chars] for t in texts]
        try:
            with anyio.fail_after(self._settings.embedding_timeout_seconds):
                raw = await self._embedder.embed(cut)
            vectors = normalised(raw, len(cut), self.key)
        except TimeoutError:
            self._failed(
                ModelTimeout(
                    f"{self.key} took over {self._settings.embedding_timeout_seconds} s "
                    "(learning.embedding_timeout_seconds)"
                )
            )
            return None
        except TaleError as exc:
            self._failed(exc)
            return None
        self._recovered()
        self.calls += 1
        return vectors

    def _failed(self, exc: TaleError) -> None:
        # Loaded again (a no-op if still loaded) before the next call: a failed call may
        # have dropped the model (llama.cpp) or the server may have lost it.
        self._loaded = False
        self.failures += 1
        self.last_error = exc.message
        self._retry_at = self._clock() + self._settings.embedding_retry_seconds
        if not self._down:
            self._down = True
            self.outages += 1
            log.warning(
                "embeddings by %s are unavailable; similar tasks use bm25 alone until they "
                "are back (retried every %.0f s): %s",
                self.key,
                self._settings.embedding_retry_seconds,
                exc.message,
            )

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            log.info("embeddings by %s work again", self.key)

    def status(self) -> dict[str, Any]:
        """Model, state and counters (part of the learning engine's status)."""
        return {
            "model": self.key,
            "state": "down" if self._down else "up",
            "loaded": self._loaded,
            "calls": self.calls,
            "failures": self.failures,
            "skipped": self.skipped,
            "outages": self.outages,
            "last_error": self.last_error,
        }
