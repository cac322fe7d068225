"""The embedding path of the similar-task memory: embedders, the blend, the daemon end to end.

Everything here runs real parts: the embedded SmolLM2 GGUF in llama.cpp's embedding
mode, the Ollama stand-in's ``/api/embed`` (the same GGUF, a real HTTP server), a
real SQLite store, and real daemons in throw-away homes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from taled.db.schema import MIGRATIONS, SCHEMA_VERSION
from taled.db.store import Store
from taled.errors import BackendDown, ConfigError, ModelError
from taled.learning.embeddings import (
    EmbeddingService,
    LlamaCppEmbedder,
    OllamaEmbedder,
    OpenAIEmbedder,
    normalised,
)
from taled.learning.engine import LearningEngine, Outcome
from taled.learning.memory import (
    SimilarTasks,
    VectorIndex,
    blend,
    cosine,
    cosine_part,
    jaccard,
    words,
)
from taled.models.backends.llamacpp import embedded_model_path
from taled.settings import (
    LearningSettings,
    LlamaCppSettings,
    ModelsSettings,
    OllamaSettings,
    OpenAISettings,
    StoreSettings,
    load_settings,
)
from tests.harness import Daemon, Home, running_daemon
from tests.llama_server import free_port
from tests.standins.ollama_server import OllamaStandIn
from tests.standins.openai_embeddings import OpenAIEmbeddingsStandIn

EMBEDDED = "llamacpp:smollm2-135m"
OLLAMA_MODEL = "smollm2:135m"
NUM_CTX = 512
# Past tasks and a paraphrase of the first that shares none of their words: only an
# embedding can make it a neighbour (bm25 matches words).
PAST = [
    "Write a haiku about rivers",
    "What is the capital of Spain?",
    "Give me three synonyms for happy",
]
PARAPHRASE = "Compose a short poem on streams"


def _dimension() -> int:
    """SmolLM2-135M's hidden size, read from the GGUF's own metadata."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_model_path()), vocab_only=True, verbose=False)
    try:
        return int(llm.metadata["llama.embedding_length"])
    finally:
        llm.close()


# What is tested is behaviour, not speed: on a busy shared machine an embedding of the
# 135M model can take seconds, so calls here get far more time than the default.
SLOW = {"embedding_timeout_seconds": 300.0}


def _service(embedder: Any, **learning: Any) -> EmbeddingService:
    return EmbeddingService(embedder, LearningSettings(**{**SLOW, **learning}))


@pytest.fixture(scope="module")
def llama_service() -> Iterator[EmbeddingService]:
    """The embedded SmolLM2 in embedding mode, loaded once for the module."""
    service = _service(LlamaCppEmbedder("smollm2-135m", LlamaCppSettings()))
    asyncio.run(service.start())
    yield service
    asyncio.run(service.stop())


def _embed(service: EmbeddingService, texts: list[str]) -> np.ndarray:
    vectors = asyncio.run(service.embed(texts))
    assert vectors is not None, service.status()
    return vectors


# -- llama.cpp -----------------------------------------------------------------


def test_llamacpp_vectors_have_the_models_dimension(llama_service: EmbeddingService) -> None:
    """One unit vector per text, as long as the model's hidden size."""
    vectors = _embed(llama_service, PAST)
    assert vectors.shape == (len(PAST), _dimension())
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_llamacpp_embeddings_are_deterministic(llama_service: EmbeddingService) -> None:
    """The same text embeds to the same vector, call after call."""
    first = _embed(llama_service, [PAST[0]])
    again = _embed(llama_service, [PAST[0]])
    assert np.array_equal(first, again)


def test_identical_texts_have_cosine_one_and_others_less(llama_service: EmbeddingService) -> None:
    """Two copies of a text are at cosine 1; different texts below it."""
    a, b, c = _embed(llama_service, [PAST[0], PAST[0], PAST[1]])
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-5)
    assert cosine(a, c) < 0.99


def test_a_paraphrase_is_nearer_than_an_unrelated_task(llama_service: EmbeddingService) -> None:
    """Even the weak chat-model embedding puts the paraphrase nearest its original."""
    vectors = _embed(llama_service, [*PAST, PARAPHRASE])
    cosines = vectors[:-1] @ vectors[-1]
    assert int(np.argmax(cosines)) == 0


def test_a_missing_gguf_is_an_outage_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """A llamacpp name that is no file fails the calls (logged once), never the caller."""
    service = _service(LlamaCppEmbedder("/nonexistent/model.gguf", LlamaCppSettings()))

    async def run() -> list[Any]:
        await service.start()
        out = [await service.embed(["hello"]) for _ in range(3)]
        await service.stop()
        return out

    with caplog.at_level(logging.WARNING, logger="taled.learning.embeddings"):
        assert asyncio.run(run()) == [None, None, None]
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    assert service.down and "neither a known name" in (service.last_error or "")


# -- the Ollama stand-in's /api/embed -------------------------------------------


@pytest.fixture(scope="module")
def standin() -> Iterator[OllamaStandIn]:
    """The Ollama stand-in on a free loopback port, serving smollm2:135m."""
    with OllamaStandIn([OLLAMA_MODEL]) as server:
        yield server


def _client(standin: OllamaStandIn) -> ollama.Client:
    return ollama.Client(host=standin.url, timeout=300)


def test_standin_embeds_a_string_as_ollama_answers(standin: OllamaStandIn) -> None:
    """A string input gets one normalised vector, with Ollama's durations and count."""
    answer = _client(standin).embed(OLLAMA_MODEL, input=PAST[0], options={"num_ctx": NUM_CTX})
    assert answer.model == OLLAMA_MODEL
    assert len(answer.embeddings) == 1 and len(answer.embeddings[0]) == _dimension()
    assert np.linalg.norm(answer.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    assert answer.total_duration and answer.total_duration > 0
    assert answer.load_duration is not None and answer.load_duration >= 0
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0


def test_standin_embeds_a_list_in_order(standin: OllamaStandIn) -> None:
    """A list input gets one vector per text, in order; a repeat is the same vector."""
    client = _client(standin)
    many = client.embed(
        OLLAMA_MODEL, input=[PAST[0], PAST[1], PAST[0]], options={"num_ctx": NUM_CTX}
    )
    one = client.embed(OLLAMA_MODEL, input=PAST[1], options={"num_ctx": NUM_CTX})
    vectors = np.array(many.embeddings)
    assert vectors.shape == (3, _dimension())
    assert np.allclose(vectors[0], vectors[2]) and np.allclose(vectors[1], one.embeddings[0])


def test_standin_empty_input_only_loads_the_model(standin: OllamaStandIn) -> None:
    """An empty input answers no embeddings, and the model is then loaded (/api/ps)."""
    answer = _client(standin).embed(
        OLLAMA_MODEL, input=[], keep_alive=-1, options={"num_ctx": NUM_CTX}
    )
    assert list(answer.embeddings) == []
    assert any(m["name"] == OLLAMA_MODEL for m in standin.loaded())


def test_standin_dimensions_cut_and_renormalise(standin: OllamaStandIn) -> None:
    """``dimensions`` keeps that many leading values, normalised again."""
    client = _client(standin)
    full = client.embed(OLLAMA_MODEL, input=PAST[2], options={"num_ctx": NUM_CTX}).embeddings[0]
    cut = client.embed(
        OLLAMA_MODEL, input=PAST[2], dimensions=64, options={"num_ctx": NUM_CTX}
    ).embeddings[0]
    expected = np.array(full[:64]) / np.linalg.norm(full[:64])
    assert len(cut) == 64 and np.allclose(cut, expected, atol=1e-5)


def test_standin_unknown_model_is_ollamas_404(standin: OllamaStandIn) -> None:
    """Embedding with a model it does not serve is 404 "not found, try pulling it first"."""
    with pytest.raises(ollama.ResponseError) as caught:
        _client(standin).embed("nomic-embed-text", input="x")
    assert caught.value.status_code == 404
    assert "not found, try pulling it first" in caught.value.error


def test_standin_refuses_an_input_that_is_not_text(standin: OllamaStandIn) -> None:
    """An input that is neither a string nor a list of strings is 400 "invalid input type"."""
    import httpx

    answer = httpx.post(f"{standin.url}/api/embed", json={"model": OLLAMA_MODEL, "input": [1, 2]})
    assert answer.status_code == 400 and answer.json() == {"error": "invalid input type"}


def test_standin_truncate_false_refuses_an_over_long_text(standin: OllamaStandIn) -> None:
    """With truncate false a text over the context is a 400; by default it is cut."""
    client = _client(standin)
    long = "river " * (NUM_CTX + 50)
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(OLLAMA_MODEL, input=long, truncate=False, options={"num_ctx": NUM_CTX})
    assert caught.value.status_code == 400 and "exceeds the context length" in caught.value.error
    cut = client.embed(OLLAMA_MODEL, input=long, options={"num_ctx": NUM_CTX})
    assert cut.prompt_eval_count is not None and cut.prompt_eval_count <= NUM_CTX


# -- the Ollama embedder ---------------------------------------------------------


def _embed_once(embedder: Any, texts: list[str]) -> Any:
    """Start the embedder, embed the texts once, stop it."""

    async def run() -> Any:
        await embedder.start()
        try:
            return await embedder.embed(texts)
        finally:
            await embedder.stop()

    return asyncio.run(run())


def _ollama_service(host: str, model: str = OLLAMA_MODEL, **learning: Any) -> EmbeddingService:
    embedder = OllamaEmbedder(model, OllamaSettings(host=host, num_ctx=NUM_CTX), pinned=False)
    return _service(embedder, **learning)


def test_ollama_embedder_matches_the_embedded_model(
    standin: OllamaStandIn, llama_service: EmbeddingService
) -> None:
    """Through /api/embed the same GGUF gives the vectors the embedded path gives."""
    service = _ollama_service(standin.url)

    async def run() -> np.ndarray | None:
        await service.start()
        try:
            return await service.embed(PAST)
        finally:
            await service.stop()

    remote = asyncio.run(run())
    assert remote is not None and service.key == "ollama:smollm2:135m"
    local = _embed(llama_service, PAST)
    assert remote.shape == local.shape
    assert all(cosine(r, v) > 0.99 for r, v in zip(remote, local, strict=True))


def test_ollama_embedder_sends_num_ctx_keep_alive_and_truncate(standin: OllamaStandIn) -> None:
    """Each /api/embed carries the model's num_ctx, its keep_alive and truncate: true."""
    service = _ollama_service(standin.url)

    async def run() -> None:
        await service.start()
        await service.embed(["a task"])
        await service.stop()

    asyncio.run(run())
    _, _, body = [r for r in standin.requests if r[1] == "/api/embed"][-1]
    assert body["options"] == {"num_ctx": NUM_CTX}
    assert body["truncate"] is True and body["keep_alive"] == "5m"
    assert body["input"] == ["a task"]


def test_an_unknown_ollama_model_is_a_model_error(standin: OllamaStandIn) -> None:
    """Ollama's 404 becomes a ModelError that says to pull the model."""
    embedder = OllamaEmbedder("nomic-embed-text", OllamaSettings(host=standin.url), pinned=False)
    with pytest.raises(ModelError, match="ollama pull nomic-embed-text"):
        _embed_once(embedder, ["x"])


def test_nobody_listening_is_backend_down() -> None:
    """An Ollama URL nobody listens on is BackendDown, at once."""
    embedder = OllamaEmbedder(
        "nomic-embed-text", OllamaSettings(host=f"http://127.0.0.1:{free_port()}"), pinned=False
    )
    with pytest.raises(BackendDown, match="cannot reach Ollama"):
        _embed_once(embedder, ["x"])


def test_an_outage_is_logged_once_retried_later_and_its_end_noticed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While down, calls fail fast (skipped until the retry time), one warning is logged,
    and the first call after the server comes back succeeds and logs the recovery."""
    port = free_port()
    now = [0.0]
    embedder = OllamaEmbedder(
        OLLAMA_MODEL, OllamaSettings(host=f"http://127.0.0.1:{port}", num_ctx=NUM_CTX), pinned=False
    )
    service = EmbeddingService(
        embedder, LearningSettings(embedding_retry_seconds=30, **SLOW), clock=lambda: now[0]
    )

    async def calls(n: int) -> list[bool]:
        return [await service.embed(["a task"]) is not None for _ in range(n)]

    async def run() -> tuple[list[bool], list[bool], list[bool]]:
        await service.start()
        try:
            down = await calls(3)
            now[0] = 31.0
            still = await calls(1)
            with OllamaStandIn([OLLAMA_MODEL], port=port):
                now[0] = 62.0
                back = await calls(2)
            return down, still, back
        finally:
            await service.stop()

    with caplog.at_level(logging.INFO, logger="taled.learning.embeddings"):
        down, still, back = asyncio.run(run())
    assert (down, still, back) == ([False] * 3, [False], [True, True])
    assert (service.failures, service.skipped, service.outages, service.calls) == (2, 2, 1, 2)
    messages = [r.message for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("work again" in m for m in messages) == 1


# -- the OpenAI-compatible embedder ---------------------------------------------


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIEmbeddingsStandIn]:
    """An OpenAI-format embeddings server running the real SmolLM2, with an API key."""
    with OpenAIEmbeddingsStandIn("smollm2-embed", api_key="sekrit") as server:
        yield server


def _openai_embed(base_url: str, model: str, texts: list[str]) -> Any:
    settings = OpenAISettings(api_key_env="TALE_TEST_EMBED_KEY")
    return _embed_once(OpenAIEmbedder(base_url, model, settings), texts)


def test_openai_embedder_gets_one_vector_per_text_in_order(
    openai_server: OpenAIEmbeddingsStandIn,
    llama_service: EmbeddingService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /embeddings with the bearer token gives the texts' vectors, in their order."""
    monkeypatch.setenv("TALE_TEST_EMBED_KEY", "sekrit")
    remote = normalised(_openai_embed(openai_server.base_url, "smollm2-embed", PAST), 3, "m")
    local = _embed(llama_service, PAST)
    assert all(cosine(r, v) > 0.99 for r, v in zip(remote, local, strict=True))
    path, body, auth = openai_server.requests[-1]
    assert (path, auth) == ("/v1/embeddings", "Bearer sekrit")
    assert body == {"model": "smollm2-embed", "input": PAST, "encoding_format": "float"}


def test_openai_unknown_model_and_bad_key_are_model_errors(
    openai_server: OpenAIEmbeddingsStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's 404 and 401 become ModelErrors quoting its message."""
    monkeypatch.setenv("TALE_TEST_EMBED_KEY", "sekrit")
    with pytest.raises(ModelError, match=r"404.*does not exist"):
        _openai_embed(openai_server.base_url, "nomic-embed-text", ["x"])
    monkeypatch.setenv("TALE_TEST_EMBED_KEY", "wrong")
    with pytest.raises(ModelError, match=r"401.*Incorrect API key"):
        _openai_embed(openai_server.base_url, "smollm2-embed", ["x"])


def test_openai_server_gone_is_backend_down() -> None:
    """Nobody listening at the URL is BackendDown."""
    with pytest.raises(BackendDown, match=r"POST .*/embeddings failed"):
        _openai_embed(f"http://127.0.0.1:{free_port()}/v1", "m", ["x"])


# -- the similarity blend (hypothesis) ------------------------------------------

_vectors = hnp.arrays(
    np.float32,
    st.integers(1, 16).map(lambda n: (2, n)),
    elements=st.floats(-100, 100, width=32),
)


@given(_vectors)
def test_cosine_is_symmetric_and_bounded(pair: np.ndarray) -> None:
    """cos(a, b) = cos(b, a), within [-1, 1], 1 for a non-zero vector with itself."""
    a, b = pair
    assert cosine(a, b) == cosine(b, a)
    assert -1.0 <= cosine(a, b) <= 1.0
    if np.linalg.norm(a.astype(np.float64)) > 1e-3:
        assert cosine(a, a) == pytest.approx(1.0, abs=1e-6)


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    _vectors,
    st.floats(0, 1),
    st.floats(0, 0.999),
)
def test_the_blend_is_symmetric_and_within_zero_and_one(
    a: str, b: str, pair: np.ndarray, weight: float, floor: float
) -> None:
    """The similarity of two tasks is in [0, 1] and the same whichever is the new one."""
    u, v = pair
    ab = blend(jaccard(a, b), cosine(u, v), weight, floor)
    ba = blend(jaccard(b, a), cosine(v, u), weight, floor)
    assert ab == ba
    assert 0.0 <= ab <= 1.0
    assert 0.0 <= blend(jaccard(a, b), None, weight, floor) <= 1.0


@given(st.floats(-1, 1), st.floats(-1, 1), st.floats(0, 0.999))
def test_a_higher_cosine_never_means_less_alike(c1: float, c2: float, floor: float) -> None:
    """The cosine part grows with the cosine, 0 at or below the floor, 1 at cosine 1."""
    low, high = sorted((c1, c2))
    assert cosine_part(low, floor) <= cosine_part(high, floor)
    assert cosine_part(floor, floor) == 0.0
    assert cosine_part(1.0, floor) == pytest.approx(1.0)


@given(st.floats(0, 1), st.floats(0, 0.999))
def test_a_repeat_is_fully_alike(weight: float, floor: float) -> None:
    """Same words and cosine 1 give similarity 1, whatever the weight and floor."""
    assert blend(1.0, 1.0, weight, floor) == pytest.approx(1.0)


@given(
    hnp.arrays(np.float32, st.tuples(st.integers(2, 12), st.just(8)), elements=st.floats(-1, 1)),
    st.integers(1, 6),
)
@settings(deadline=None)
def test_the_index_ranks_as_brute_force_and_knows_its_mean_cosine(
    raw: np.ndarray, capacity_extra: int
) -> None:
    """top() returns the highest cosines in order; typical() is the mean pairwise cosine."""
    rows = raw[np.linalg.norm(raw, axis=1) > 1e-3]
    if len(rows) < 2:
        return
    unit = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    index = VectorIndex("m", len(unit) + capacity_extra)
    for i, v in enumerate(unit):
        index.add(str(i), v)
    query = unit[0]
    found = index.top(query, 3, -2.0)
    brute = sorted(((str(i), float(v @ query)) for i, v in enumerate(unit)), key=lambda p: -p[1])
    assert [c for _, c in found] == pytest.approx([c for _, c in brute[:3]], abs=1e-5)
    pairs = [float(unit[i] @ unit[j]) for i in range(len(unit)) for j in range(len(unit)) if i != j]
    assert index.typical() == pytest.approx(sum(pairs) / len(pairs), abs=1e-4)


def test_the_index_keeps_the_newest_up_to_its_capacity() -> None:
    """Past capacity the oldest vector goes; a task's new vector replaces its old one."""
    index = VectorIndex("m", 2)
    e = np.eye(3, dtype=np.float32)
    index.add("a", e[0])
    index.add("b", e[1])
    index.add("a", e[2])
    assert len(index) == 2 and index.cosine("a", e[2]) == pytest.approx(1.0)
    index.add("c", e[0])
    assert len(index) == 2 and index.cosine("a", e[2]) is None
    assert index.cosine("c", e[0]) == pytest.approx(1.0)


def test_a_zero_or_malformed_embedding_is_a_model_error() -> None:
    """What is not one finite, non-zero vector per text is refused, saying so."""
    with pytest.raises(ModelError, match="all-zero"):
        normalised([[0.0, 0.0]], 1, "m")
    with pytest.raises(ModelError, match="one vector per text"):
        normalised([[[0.1, 0.2]]], 1, "m")
    with pytest.raises(ModelError, match="NaN"):
        normalised([[float("nan"), 1.0]], 1, "m")


# -- the memory and the engine, in process ----------------------------------------


def _store(path: Path) -> Store:
    return Store(path, StoreSettings(synchronous="normal"), write_batch_max=256)


def _outcome(task_id: str, text: str) -> Outcome:
    return Outcome(
        task_id=task_id,
        text=text,
        predicted_level="simple",
        confidence=0.5,
        completion_tokens=40,
        success=True,
        role="task",
        backend="llamacpp",
        model="smollm2-135m",
    )


def test_a_paraphrase_is_found_only_through_its_embedding(
    tmp_path: Path, llama_service: EmbeddingService
) -> None:
    """Recorded tasks get vectors; a paraphrase with no shared word finds its original by
    embedding, and bm25 alone finds nothing."""

    async def run() -> tuple[Any, list[Any], int]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            engine = LearningEngine(
                store, LearningSettings(), ModelsSettings(), ceiling=512, embeddings=llama_service
            )
            await engine.start()
            ids = []
            for text in PAST:
                task = await store.submit(text, 50)
                await engine.ingest(_outcome(task.id, text))
                ids.append(task.id)
            # A fresh memory, as after a restart: its vectors come from the store.
            memory = SimilarTasks(store, llama_service, LearningSettings())
            await memory.start()
            found = await memory.lookup(PARAPHRASE, 5)
            lexical = await memory.nearest(PARAPHRASE, 5)
            async with store.read() as conn:
                stored = (
                    await conn.exec_driver_sql("SELECT COUNT(*) FROM task_embeddings")
                ).scalar_one()
            return found, [ids, lexical], int(stored)
        finally:
            await store.close()

    assert not any(set(words(PARAPHRASE)) & set(words(t)) for t in PAST)
    found, (ids, lexical), stored = asyncio.run(run())
    assert stored == len(PAST)
    assert lexical == []
    assert found.method == "bm25+embedding"
    assert found.neighbours[0].task_id == ids[0] and found.neighbours[0].via == "embedding"
    assert 0 < found.neighbours[0].similarity <= LearningSettings().embedding_weight


def test_tasks_recorded_before_embeddings_are_backfilled(
    tmp_path: Path, llama_service: EmbeddingService
) -> None:
    """Turned on over an existing history, the engine embeds the older tasks after start."""

    async def run() -> tuple[dict[str, Any], int, list[str], Any]:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            without = LearningEngine(store, LearningSettings(), ModelsSettings(), ceiling=512)
            await without.start()
            ids = []
            for text in PAST:
                task = await store.submit(text, 50)
                await without.ingest(_outcome(task.id, text))
                ids.append(task.id)
            engine = LearningEngine(
                store, LearningSettings(), ModelsSettings(), ceiling=512, embeddings=llama_service
            )
            await engine.start()
            await engine.warm()
            status = engine.status()["embeddings"]
            async with store.read() as conn:
                stored = (
                    await conn.exec_driver_sql("SELECT COUNT(*) FROM task_embeddings")
                ).scalar_one()
            paraphrase = await store.submit(PARAPHRASE, 50)
            return status, int(stored), ids, await engine.assess(paraphrase)
        finally:
            await store.close()

    status, stored, ids, assessment = asyncio.run(run())
    assert (status["backfilled"], status["vectors"], stored) == (3, 3, 3)
    assert assessment.similarity == "bm25+embedding"
    assert assessment.similar[0] == ids[0] and assessment.similar_via[0] == "embedding"


def test_a_version_5_database_gains_the_embeddings_table(tmp_path: Path) -> None:
    """Opening a schema-5 database migrates it to the current schema, adding
    task_embeddings (v6), the outcomes' tactic columns (v7), answer_tokens (v8) and the
    tasks' crash count and pending restore (v9), and the ledger's attempt and looped
    columns (v10)."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statements in MIGRATIONS[:5]:
        for statement in statements:
            db.execute(statement)
    db.execute("PRAGMA user_version=5")
    db.commit()
    db.close()

    async def run() -> int:
        store = _store(path)
        await store.open()
        try:
            return await store.schema_version()
        finally:
            await store.close()

    assert asyncio.run(run()) == SCHEMA_VERSION
    migrated = sqlite3.connect(path)
    columns = [r[1] for r in migrated.execute("PRAGMA table_info(task_embeddings)")]
    assert columns == ["task_id", "model", "dimension", "vector"]
    outcome_columns = [r[1] for r in migrated.execute("PRAGMA table_info(task_outcomes)")]
    assert outcome_columns[-7:] == [
        "planned",
        "retried",
        "retry_worked",
        "decomposed",
        "retry_tokens",
        "plan_tokens",
        "answer_tokens",
    ]


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nomic-embed-text", "must look like 'backend:model'"),
        ("gpt:embed", "unknown backend 'gpt'"),
        ("openai:http://box:8000/v1", "must name the model after '#'"),
    ],
)
def test_a_bad_embeddings_spec_is_an_error_naming_the_key(
    tmp_path: Path, value: str, problem: str
) -> None:
    """learning.embeddings is checked like a role's model spec, and the error names it."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text(f'[learning]\nembeddings = "{value}"\n')
    with pytest.raises(ConfigError, match=r"learning\.embeddings") as caught:
        load_settings(cfg)
    assert problem in caught.value.message


def test_embedding_specs_name_their_backend() -> None:
    """Each spec form builds the embedder of its backend, keyed as its vectors are stored."""
    from taled.learning.embeddings import embedder_for

    models = ModelsSettings()
    assert isinstance(embedder_for("llamacpp:smollm2-135m", models), LlamaCppEmbedder)
    ollama_embedder = embedder_for("ollama:nomic-embed-text", models)
    assert ollama_embedder.key == "ollama:nomic-embed-text:latest"
    remote = embedder_for("openai:http://box:8000/v1/#bge-small", models)
    assert (
        isinstance(remote, OpenAIEmbedder) and remote.key == "openai:http://box:8000/v1#bge-small"
    )


def test_taled_exits_2_on_a_bad_embeddings_value(home: Home) -> None:
    """taled refuses a malformed learning.embeddings with exit code 2, naming the key."""
    env = {**home.env, "TALE_LEARNING__EMBEDDINGS": "smollm2"}
    proc = subprocess.run(
        [sys.executable, "-m", "taled"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "learning.embeddings" in proc.stderr
    assert not home.socket.exists()


# -- end to end ----------------------------------------------------------------


def _run_tasks(daemon: Daemon, texts: list[str]) -> list[dict[str, Any]]:
    ids = [daemon.call("submit_task", text=t)["id"] for t in texts]
    return [daemon.wait_for(i) for i in ids]


def _learning(daemon: Daemon) -> dict[str, Any]:
    status: dict[str, Any] = daemon.call("daemon_status")["learning"]
    return status


def _embeddings_when(daemon: Daemon, done: Any, timeout: float = 10) -> dict[str, Any]:
    """The embeddings' status once ``done(status)`` holds: a task's outcome (and vector)
    is recorded just after it reaches its final state."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = _learning(daemon)["embeddings"]
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def _stored_vectors(home: Home, count: int, timeout: float = 10) -> list[Any]:
    """The rows of task_embeddings, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(home.data / "tale.db")) as db:
            rows = db.execute("SELECT task_id, model, dimension, vector FROM task_embeddings")
            found = rows.fetchall()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_daemon_with_embeddings_stores_reloads_and_finds_by_meaning() -> None:
    """With llamacpp embeddings: finished tasks' vectors are stored, a restart reloads them,
    and a paraphrase sharing no word with a past task gets it as a similar task."""
    home = Home(
        {"TALE_LEARNING__EMBEDDINGS": EMBEDDED, "TALE_LEARNING__EMBEDDING_TIMEOUT_SECONDS": "300"}
    )
    daemon = Daemon(home).start()
    try:
        past = _run_tasks(daemon, PAST)
        assert all(t["state"] == "completed" for t in past), past
        rows = _stored_vectors(home, len(PAST))
        dim = _dimension()
        assert sorted(r[0] for r in rows) == sorted(t["id"] for t in past)
        assert all(r[1] == EMBEDDED and r[2] == dim and len(r[3]) == 4 * dim for r in rows)
        assert daemon.stop() == 0

        daemon = Daemon(home).start()
        status = _learning(daemon)["embeddings"]
        assert (status["model"], status["vectors"], status["dimension"]) == (EMBEDDED, 3, dim)
        [new] = _run_tasks(daemon, [PARAPHRASE])
        estimate = new["estimate"]
        assert estimate["similarity"] == "bm25+embedding"
        assert past[0]["id"] in estimate["similar"]
        assert estimate["similar_via"][estimate["similar"].index(past[0]["id"])] == "embedding"
        assert not set(words(PARAPHRASE)) & set(words(PAST[0]))
        status = _embeddings_when(daemon, lambda s: s["vectors"] == 4)
        assert status["vectors"] == 4 and status["fallbacks"] == 0 and status["lookups"] == 1
    finally:
        daemon.kill_if_running()
        home.cleanup()


def test_a_dead_embedding_server_falls_back_to_bm25_and_counts_it() -> None:
    """Embeddings on an Ollama URL nobody listens on: tasks still run, similar tasks come
    from bm25, each lookup's fallback is counted, and the outage is logged once."""
    env = {
        "TALE_LEARNING__EMBEDDINGS": "ollama:nomic-embed-text",
        "TALE_MODELS__OLLAMA__HOST": f"http://127.0.0.1:{free_port()}",
        "TALE_LEARNING__EMBEDDING_RETRY_SECONDS": "0.01",
    }
    with running_daemon(env) as daemon:
        # One after the other: the second's lookup must see the first's outcome.
        [first] = _run_tasks(daemon, ["Write a haiku about rivers"])
        [second] = _run_tasks(daemon, ["Write a haiku about rain"])
        assert first["state"] == second["state"] == "completed"
        assert second["estimate"]["similarity"] == "bm25 (embedding unavailable)"
        assert first["id"] in second["estimate"]["similar"]
        status = _embeddings_when(daemon, lambda s: s["unembedded_records"] == 2)
        assert status["state"] == "down" and status["vectors"] == 0
        assert status["lookups"] == status["fallbacks"] == 2
        assert status["unembedded_records"] == 2
        log = daemon.log_text()
        assert log.count("are unavailable; similar tasks use bm25 alone") == 1
