"""The learning engine's estimators: classification, similar tasks, budgets, selection."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taled.db.schema import MIGRATIONS
from taled.db.store import Store
from taled.learning.assessment import Assessment
from taled.learning.budget import BudgetPredictor, clamp_budget
from taled.learning.complexity import (
    LEVELS,
    ComplexityModel,
    history_weight,
    label_outcome,
    prior_probabilities,
)
from taled.learning.engine import LearningEngine, Outcome
from taled.learning.memory import Neighbour, fts_query
from taled.learning.selection import TACTICS, Selector, Tactic, Tactics, explores
from taled.settings import LearningSettings, Level, ModelsSettings, StoreSettings
from taled.tasks.planning.planner import classify, features
from taled.tasks.progress import ProgressHub

LEARNING = LearningSettings()

# A stationary synthetic workload: task families, each with its own typical answer
# length (the outcome), and words that tell them apart. Code and explanations are
# longer than the rules guess from their short text; that is what must be learned.
_TOPICS = [
    "rivers",
    "volcanoes",
    "bees",
    "jazz",
    "chess",
    "tides",
    "comets",
    "bread",
    "glaciers",
    "owls",
    "tea",
    "bridges",
    "deserts",
    "coral",
    "lightning",
    "maps",
    "clocks",
    "ferns",
    "whales",
    "kites",
]
_THINGS = ["numbers", "words", "dates", "prices", "names", "files", "emails", "scores"]
_FAMILIES: list[tuple[str, float]] = [
    ("Translate the word {topic} into French", 12),
    ("Write a haiku about {topic}", 30),
    ("Write a Python function that sorts a list of {thing} and handles empty input", 260),
    ("Explain how {topic} work", 330),
    ("Summarise what is known about {topic} and {thing} in three paragraphs", 420),
    (
        "Build a small web app that tracks {thing} about {topic}, then write tests, "
        "a README and deploy it",
        900,
    ),
]


def _synthetic(rng: random.Random) -> tuple[str, float]:
    template, tokens = rng.choice(_FAMILIES)
    text = template.format(topic=rng.choice(_TOPICS), thing=rng.choice(_THINGS))
    return text, max(tokens * rng.lognormvariate(0, 0.15), 1.0)


def _label(tokens: float) -> Level:
    return label_outcome(LEARNING, completion_tokens=int(tokens), steps=1, retries=0, success=True)


def _accuracy(model: ComplexityModel, held_back: list[tuple[str, float]]) -> float:
    right = sum(model.predict(text).level == _label(tokens) for text, tokens in held_back)
    return right / len(held_back)


def _history(pairs: list[tuple[str, float]]) -> list[tuple[str, dict[str, float], Level]]:
    return [(text, features(text), _label(tokens)) for text, tokens in pairs]


# -- complexity ----------------------------------------------------------------


@given(st.integers(0, 100_000), st.integers(0, 1000), st.integers(1, 10_000))
def test_history_weight_never_decreases_as_history_grows(n: int, more: int, half: int) -> None:
    """The learned model's share grows (or stays) with every distinct task, within [0, 1)."""
    w, w_more = history_weight(n, half), history_weight(n + more, half)
    assert 0 <= w <= w_more < 1


@given(st.text(max_size=400))
def test_the_rule_prior_is_a_distribution(text: str) -> None:
    """The rules' verdict, as probabilities, sums to 1 with each in [0, 1]."""
    probs = prior_probabilities(classify(text))
    assert set(probs) == set(LEVELS)
    assert all(0 <= p <= 1 for p in probs.values())
    assert sum(probs.values()) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def fitted() -> ComplexityModel:
    rng = random.Random(7)
    model = ComplexityModel(LEARNING.history_half_weight)
    model.fit(_history([_synthetic(rng) for _ in range(150)]))
    return model


@given(st.text(max_size=400))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_a_classification_is_a_distribution_with_a_bounded_confidence(
    fitted: ComplexityModel, text: str
) -> None:
    """Blended probabilities sum to 1; the confidence is the chosen level's, in [0, 1]."""
    estimate = fitted.predict(text)
    assert sum(estimate.probabilities.values()) == pytest.approx(1.0)
    assert 0 <= estimate.confidence <= 1
    assert estimate.confidence == pytest.approx(estimate.probabilities[estimate.level], abs=1e-4)
    assert estimate.confidence == pytest.approx(max(estimate.probabilities.values()), abs=1e-4)


@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
@settings(max_examples=25, deadline=None)
def test_duplicate_tasks_do_not_move_the_classification(seed: int, copies: int) -> None:
    """Re-adding identical tasks with identical outcomes leaves every prediction as it was."""
    rng = random.Random(seed)
    history = _history([_synthetic(rng) for _ in range(40)])
    once, repeated = ComplexityModel(30), ComplexityModel(30)
    once.fit(history)
    repeated.fit(history + rng.sample(history, 15) * copies)
    for text, _, _ in history[:10]:
        a, b = once.predict(text), repeated.predict(text)
        assert a.level == b.level
        for level in LEVELS:
            assert a.probabilities[level] == pytest.approx(b.probabilities[level], abs=1e-6)


def test_classifier_accuracy_on_held_back_history_improves_with_more_history() -> None:
    """Fitted on more past outcomes, the classifier labels held-back tasks better."""
    rng = random.Random(2024)
    held_back = [_synthetic(rng) for _ in range(200)]
    stream = [_synthetic(rng) for _ in range(300)]
    accuracy = {}
    for n in (0, 10, 300):
        model = ComplexityModel(LEARNING.history_half_weight)
        model.fit(_history(stream[:n]))
        accuracy[n] = _accuracy(model, held_back)
    assert accuracy[0] <= accuracy[10] < accuracy[300]
    assert accuracy[300] >= 0.8 > accuracy[0]


@given(st.integers(0, 5000), st.integers(1, 20), st.integers(0, 5), st.booleans())
def test_outcome_labels_follow_the_thresholds(
    tokens: int, steps: int, retries: int, success: bool
) -> None:
    """Planned or long-answered tasks are complex; retried, failed or mid-length ones at
    least medium; a task decomposed only after retries is not complex by its steps."""
    level = label_outcome(
        LEARNING, completion_tokens=tokens, steps=steps, retries=retries, success=success
    )
    if (steps >= 2 and not retries) or tokens / (1 + retries) >= LEARNING.complex_min_tokens:
        assert level == "complex"
    elif tokens >= LEARNING.medium_min_tokens or retries or not success:
        assert level == "medium"
    else:
        assert level == "simple"


# -- similar tasks -------------------------------------------------------------


@pytest.fixture(scope="module")
def fts() -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(":memory:")
    fts_ddl = next(s for v in MIGRATIONS for s in v if "fts5" in s)
    db.execute(fts_ddl)
    db.executemany(
        "INSERT INTO task_memory (task_id, text) VALUES (?, ?)",
        [(str(i), f) for i, (f, _) in enumerate(_FAMILIES)],
    )
    yield db
    db.close()


@given(st.text(max_size=300))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_text_makes_an_unsafe_fts_query(fts: sqlite3.Connection, text: str) -> None:
    """Whatever a task says (quotes, NEAR, *, ^, column filters), its FTS5 query runs."""
    query = fts_query(text)
    if query:
        fts.execute(
            "SELECT task_id, bm25(task_memory) FROM task_memory WHERE task_memory MATCH ?",
            (query,),
        ).fetchall()


def test_fts_operators_in_a_task_are_searched_as_words(fts: sqlite3.Connection) -> None:
    """FTS5 syntax in a task's text is matched as plain words, not obeyed."""
    query = fts_query('haiku" OR task_id:1 NEAR(a b) AND NOT * ^"')
    rows = fts.execute(
        "SELECT task_id FROM task_memory WHERE task_memory MATCH ? ORDER BY bm25(task_memory)",
        (query,),
    ).fetchall()
    assert rows[0][0] == "1"


# -- budgets -------------------------------------------------------------------

_neighbours = st.lists(
    st.builds(
        Neighbour,
        task_id=st.text(min_size=1, max_size=4),
        text=st.text(max_size=20),
        score=st.floats(0, 50),
        similarity=st.floats(0, 1),
        tokens=st.floats(0, 200_000),
        level=st.sampled_from(LEVELS),
        success=st.floats(0, 1),
    ),
    max_size=8,
)


@given(
    _neighbours,
    st.sampled_from(LEVELS),
    st.integers(1, 131_072),
    st.integers(1, 4096),
    st.integers(0, 131_072),
    st.floats(0, 10),
    st.lists(st.floats(0, 100_000), max_size=20),
)
@settings(deadline=None)
def test_a_budget_stays_within_its_bounds(
    neighbours: list[Neighbour],
    level: Level,
    ceiling: int,
    min_budget: int,
    max_budget: int,
    margin: float,
    past: list[float],
) -> None:
    """The budget is never above the ceiling (or max_budget), nor below min_budget under it."""
    config = LearningSettings(
        min_budget=min_budget, max_budget=max_budget, margin_spreads=margin, budget_min_history=0
    )
    predictor = BudgetPredictor(config)
    for i, tokens in enumerate(past):
        predictor.observe("m", level, f"task {i}", tokens)
    prediction = predictor.predict("m", level, neighbours, ceiling)
    high = min(max_budget, ceiling) if max_budget else ceiling
    assert min(min_budget, high) <= prediction.budget <= high
    assert prediction.tokens >= 0
    assert 0 <= prediction.similarity <= 1


def test_a_guess_alone_never_limits_an_answer() -> None:
    """Until budget_min_history past tasks back the mean, the budget is the ceiling."""
    predictor = BudgetPredictor(LearningSettings(budget_min_history=3))
    budgets = []
    for i in range(4):
        budgets.append(predictor.predict("m", "simple", [], ceiling=1500).budget)
        predictor.observe("m", "simple", f"task {i}", 40)
    assert budgets[:3] == [1500, 1500, 1500]
    assert budgets[3] < 1500


@given(st.floats(0, 1e6), st.floats(1, 100), st.integers(1, 1000), st.integers(1, 100_000))
def test_clamping_keeps_the_margin_when_there_is_room(
    predicted: float, margin: float, low: int, high: int
) -> None:
    """Between the bounds, the budget is the prediction times its margin, rounded up."""
    budget = clamp_budget(predicted, margin, low, high)
    assert budget <= high
    wanted = predicted * margin
    if low <= wanted <= high - 1:
        assert wanted <= budget <= wanted + 1


@given(st.lists(st.floats(1, 5000), min_size=1, max_size=5), st.floats(0.05, 1))
def test_agreeing_similar_tasks_pull_the_prediction_to_their_tokens(
    tokens: list[float], similarity: float
) -> None:
    """The prediction lies between the prior and the neighbours' tokens, and moves toward
    the neighbours the more alike they are."""
    predictor = BudgetPredictor(LEARNING)
    prior = predictor.prior("m", "simple")
    same = [
        Neighbour(str(i), "t", 1.0, similarity, tokens[0], "simple", True)
        for i in range(len(tokens))
    ]
    closer = [
        Neighbour(str(i), "t", 1.0, 1.0, tokens[0], "simple", True) for i in range(len(tokens))
    ]
    loose = predictor.predict("m", "simple", same, ceiling=10**6).tokens
    tight = predictor.predict("m", "simple", closer, ceiling=10**6).tokens
    low, high = sorted((prior, tokens[0]))
    assert low - 1 <= loose <= high + 1
    assert abs(tight - tokens[0]) <= abs(loose - tokens[0]) + 1


@given(
    st.lists(st.tuples(st.sampled_from(LEVELS), st.floats(0, 50_000)), min_size=1, max_size=30),
    st.integers(1, 4),
)
def test_duplicate_tasks_do_not_move_the_prior(
    history: list[tuple[Level, float]], copies: int
) -> None:
    """Re-adding identical tasks with identical outcomes leaves the (model, level) mean put."""
    once, repeated = BudgetPredictor(LEARNING), BudgetPredictor(LEARNING)
    for i, (level, tokens) in enumerate(history):
        once.observe("m", level, f"task {i}", tokens)
        for _ in range(copies):
            repeated.observe("m", level, f"task {i}", tokens)
    for level in LEVELS:
        assert once.prior("m", level) == pytest.approx(repeated.prior("m", level))


def _store(path: Path) -> Store:
    return Store(path, StoreSettings(synchronous="normal"), write_batch_max=256)


def test_budget_error_falls_as_history_grows(tmp_path: Path) -> None:
    """Replaying a stationary workload, predictions of later tasks miss by less than early ones."""

    async def run() -> list[float]:
        store = _store(tmp_path / "t.db")
        await store.open()
        engine = LearningEngine(store, LEARNING, ModelsSettings(), ceiling=4096)
        await engine.start()
        errors = []
        rng = random.Random(11)
        try:
            for _ in range(120):
                text, tokens = _synthetic(rng)
                task = await store.submit(text, 50)
                assessment = await engine.assess(task)
                errors.append(abs(assessment.predicted_tokens - tokens) / tokens)
                await engine.ingest(_outcome(task.id, text, tokens, assessment.level))
        finally:
            await store.close()
        return errors

    errors = asyncio.run(run())
    early, late = errors[:20], errors[-20:]
    assert sum(late) / len(late) < 0.5 * sum(early) / len(early)


def test_a_rescued_task_teaches_its_first_answers_length_not_its_rescues(
    tmp_path: Path,
) -> None:
    """Similar tasks that took 8 tokens to answer (and 1,500 to rescue) predict about 8."""

    async def run() -> tuple[int, int]:
        predicted = []
        for answer_tokens in (8, None):
            store = _store(tmp_path / f"t{answer_tokens}.db")
            await store.open()
            engine = LearningEngine(store, LEARNING, ModelsSettings(), ceiling=4096)
            await engine.start()
            try:
                for n in range(12):
                    text = f"How many days are in {n + 2} weeks? Answer with the number only."
                    task = await store.submit(text, 50)
                    outcome = _outcome(task.id, text, 1500, "simple")
                    await engine.ingest(replace(outcome, answer_tokens=answer_tokens, steps=3))
                probe = await store.submit(
                    "How many days are in 20 weeks? Answer with the number only.", 50
                )
                predicted.append((await engine.assess(probe)).predicted_tokens)
            finally:
                await store.close()
        return predicted[0], predicted[1]

    rescued, whole = asyncio.run(run())
    assert rescued <= 16
    assert whole >= 500


def test_what_was_learned_survives_a_restart(tmp_path: Path) -> None:
    """A new engine on the same database predicts as the old one did."""
    rng = random.Random(3)

    async def run() -> tuple[list[int], list[int]]:
        store = _store(tmp_path / "t.db")
        await store.open()
        engine = LearningEngine(store, LEARNING, ModelsSettings(), ceiling=4096)
        await engine.start()
        probes = []
        for _ in range(40):
            text, tokens = _synthetic(rng)
            task = await store.submit(text, 50)
            await engine.ingest(_outcome(task.id, text, tokens, "simple"))
        for _ in range(5):
            probes.append(await store.submit(_synthetic(rng)[0], 50))
        before = [(await engine.assess(t)).predicted_tokens for t in probes]
        await store.close()
        store = _store(tmp_path / "t.db")
        await store.open()
        again = LearningEngine(store, LEARNING, ModelsSettings(), ceiling=4096)
        await again.start()
        after = [(await again.assess(t)).predicted_tokens for t in probes]
        await store.close()
        return before, after

    before, after = asyncio.run(run())
    assert before == after
    assert any(p != LEARNING.prior_tokens["simple"] for p in before)


def _outcome(task_id: str, text: str, tokens: float, level: str) -> Outcome:
    return Outcome(
        task_id=task_id,
        text=text,
        predicted_level=level,
        confidence=0.5,
        completion_tokens=round(tokens),
        success=True,
        role="task",
        backend="llamacpp",
        model="smollm2-135m",
    )


# -- selection -----------------------------------------------------------------


@given(st.integers(0, 200), st.integers(0, 200))
def test_simple_tasks_go_to_ux_only_on_enough_good_evidence(ok: int, bad: int) -> None:
    """Past min_samples, ux gets simple tasks exactly when its success rate meets the bar."""
    config = LearningSettings(explore_rate=0.0)
    selector = Selector(config)
    for _ in range(ok):
        selector.observe("ux", "simple", True)
    for _ in range(bad):
        selector.observe("ux", "simple", False)
    choice = selector.choose("abcdef012345", "simple")
    n = ok + bad
    enough = n >= config.ux_min_samples and ok / n >= config.ux_success_threshold
    assert (choice.role == "ux") == enough
    assert selector.choose("abcdef012345", "medium").role == "task"


def test_a_ux_task_rescued_by_the_task_model_counts_against_ux() -> None:
    """A ux task that completed only after escalating (a retry) is not a ux success."""
    selector = Selector(LEARNING)
    selector.observe("ux", "simple", True, retries=1)
    selector.observe("ux", "simple", True, retries=0)
    selector.observe("task", "simple", True, retries=1)
    assert selector.rate("ux", "simple") == (0.5, 2)
    assert selector.rate("task", "simple") == (1.0, 1)


def test_exploration_sends_about_its_rate_of_tasks_and_is_deterministic() -> None:
    """The explore rate picks that share of task ids, the same ones every time."""
    ids = [f"{i:012x}" for i in range(4000)]
    picked = [i for i in ids if explores(i, 0.1)]
    assert 0.08 < len(picked) / len(ids) < 0.12
    assert picked == [i for i in ids if explores(i, 0.1)]
    assert not any(explores(i, 0.0) for i in ids)


def test_exploration_is_chosen_by_the_task_text_and_the_seed() -> None:
    """The same texts explore under the same seed (a replay is reproducible); another
    seed picks about as many, but others."""
    texts = [f"What is the capital of country number {i}?" for i in range(4000)]
    seed0 = {t for t in texts if explores(t, 0.1, seed=0)}
    assert seed0 == {t for t in texts if explores(t, 0.1, seed=0)}
    seed1 = {t for t in texts if explores(t, 0.1, seed=1)}
    assert 0.08 < len(seed1) / len(texts) < 0.12
    assert len(seed0 & seed1) < len(seed0) / 2


def test_thinking_follows_the_configured_levels() -> None:
    """Only levels in think_for run with thinking on."""
    selector = Selector(LearningSettings(think_for=["medium", "complex"]))
    assert [selector.choose("a" * 12, lv).think for lv in LEVELS] == [False, True, True]


def _judged(config: LearningSettings, pass_tokens: int = 100) -> Tactics:
    """Tactics with a yardstick: ten tasks on model m that passed on their first answer,
    ``pass_tokens`` each."""
    tactics = Tactics(config)
    for _ in range(10):
        tactics.observe_pass("m", pass_tokens)
    return tactics


@given(
    st.sampled_from(TACTICS),
    st.integers(0, 60),
    st.integers(0, 60),
    st.integers(0, 5_000),
)
def test_a_tactic_is_kept_exactly_while_it_can_stay_within_its_cost_per_task_carried(
    tactic: Tactic, worked: int, failed: int, tokens: int
) -> None:
    """A tactic may spend tactic_max_cost_ratio times what a first-answer pass costs per
    task it carries: judged on its record once it has tactic_min_samples uses, and before
    that skipped only when even carrying every use still to come, at what its uses cost so
    far, could not bring it there."""
    config = LearningSettings(tactic_explore_rate=0.0)
    tactics = _judged(config)
    for i in range(worked + failed):
        tactics.observe("m", "simple", tactic, i < worked, tokens)
    allowed, reason = tactics.allows("abcdef012345", "m", "simple", tactic)
    n, limit = worked + failed, config.tactic_max_cost_ratio * 100
    to_come = max(config.tactic_min_samples - n, 0)
    carried = worked + to_come
    # With no use yet there is no cost to go by.
    cost = tokens * (n + to_come) if n else 0
    keeps = cost <= limit * carried if carried else False
    assert allowed == keeps
    assert tactic in reason
    # Another model has its own record (and no yardstick yet: everything is tried).
    assert tactics.allows("abcdef012345", "other", "simple", tactic)[0]
    # Another level with no record of its own is judged on the model's over every level.
    assert tactics.allows("abcdef012345", "m", "complex", tactic)[0] == allowed


def test_a_cheap_tactic_that_rarely_works_is_kept_and_a_costly_one_is_not() -> None:
    """One rescue in three is worth a 300-token retry (900 a rescue, within 10 x a
    100-token pass), not a 5,000-token decomposition."""
    tactics = _judged(LearningSettings(tactic_explore_rate=0.0))
    for i in range(9):
        tactics.observe("m", "simple", "retry", i % 3 == 0, 300)
        tactics.observe("m", "simple", "decompose", i % 3 == 0, 5000)
    assert tactics.allows("a" * 12, "m", "simple", "retry")[0]
    allowed, reason = tactics.allows("a" * 12, "m", "simple", "decompose")
    assert not allowed
    assert "it carried 3 of 9 simple tasks for 45,000 tokens, 15,000 per task carried" in reason
    assert "10 x the 100 tokens of a first-answer pass" in reason


def test_every_tactic_is_tried_until_a_first_answer_has_passed() -> None:
    """With nothing to hold its cost against, a tactic's record does not decide."""
    tactics = Tactics(LearningSettings(tactic_explore_rate=0.0))
    for _ in range(20):
        tactics.observe("m", "medium", "decompose", False, 5000)
    allowed, reason = tactics.allows("a" * 12, "m", "medium", "decompose")
    assert allowed
    assert "no task has passed on its first answer yet" in reason


def test_a_tactic_that_cannot_earn_back_what_it_spent_is_skipped_before_its_samples_are_in() -> (
    None
):
    """A 400-token retry that failed once could still pay if its next four carried their
    tasks (2,000 tokens for four: 500 each, within 1,000); a 3,500-token decomposition
    that failed once could not (17,500 for four), and is skipped at once."""
    tactics = _judged(LearningSettings(tactic_explore_rate=0.0, tactic_min_samples=5))
    tactics.observe("m", "medium", "retry", False, 400)
    assert tactics.allows("a" * 12, "m", "medium", "retry")[0]
    tactics.observe("m", "complex", "decompose", False, 3500)
    allowed, reason = tactics.allows("a" * 12, "m", "medium", "decompose")
    assert not allowed
    assert "it carried 0 of 1 tasks for 3,500 tokens" in reason
    assert "even if its next 4 uses carry theirs" in reason


def test_a_levels_own_record_decides_once_it_has_enough_samples() -> None:
    """Plans that pay on complex tasks and not on medium ones: kept for complex, skipped for
    medium, though the model's record over both levels would keep it."""
    tactics = _judged(LearningSettings(tactic_explore_rate=0.0, tactic_min_samples=5))
    for _ in range(20):
        tactics.observe("m", "complex", "plan", True, 600)
    for _ in range(5):
        tactics.observe("m", "medium", "plan", False, 600)
    assert tactics.allows("a" * 12, "m", "complex", "plan")[0]
    allowed, reason = tactics.allows("a" * 12, "m", "medium", "plan")
    assert not allowed
    assert "it carried 0 of 5 medium tasks" in reason
    # A level without its own samples goes by the model's: 20 of 25, 750 per task carried.
    assert tactics.allows("a" * 12, "m", "simple", "plan")[0]


def test_a_skipped_tactic_is_explored_less_the_more_its_uses_say_it_does_not_pay() -> None:
    """Just skipped, about tactic_explore_rate of tasks still try a tactic; after four times
    the minimum of failed uses, a quarter of that; the same tasks every time."""
    config = LearningSettings(tactic_explore_rate=0.2, tactic_min_samples=5)
    ids = [f"{i:012x}" for i in range(4000)]
    shares = []
    for uses in (5, 20):
        tactics = _judged(config)
        for _ in range(uses):
            tactics.observe("m", "simple", "decompose", False, 1000)
        tried = [i for i in ids if tactics.allows(i, "m", "simple", "decompose")[0]]
        assert tried == [i for i in ids if tactics.allows(i, "m", "simple", "decompose")[0]]
        shares.append(len(tried) / len(ids))
    assert 0.17 < shares[0] < 0.23
    assert 0.035 < shares[1] < 0.065


def test_a_skipped_tactic_is_explored_less_the_more_a_use_costs() -> None:
    """Skipped after two uses, a tactic that spends its limit per use is still tried on
    about tactic_explore_rate of tasks (not more: min_samples / uses is above one), one
    that spends four times its limit on a quarter of that."""
    config = LearningSettings(tactic_explore_rate=0.2, tactic_min_samples=5)
    ids = [f"{i:012x}" for i in range(4000)]
    shares = []
    for per_use in (1000, 4000):
        tactics = _judged(config)
        for _ in range(2):
            tactics.observe("m", "simple", "plan", False, per_use)
        shares.append(sum(tactics.allows(i, "m", "simple", "plan")[0] for i in ids) / len(ids))
    assert 0.17 < shares[0] < 0.23
    assert 0.035 < shares[1] < 0.065


# -- ETA -----------------------------------------------------------------------


def test_eta_before_the_first_step_comes_from_predicted_tokens_and_speed() -> None:
    """Before a step ends, the ETA is the predicted tokens still to come at the model's speed."""
    hub = ProgressHub()
    hub.start("t1", steps=1, doing="answering", step=0, tokens=0)
    started = hub.get("t1")
    assert started is not None and started.eta_seconds is None
    progress = hub.expect("t1", predicted_tokens=100, tokens_per_second=20.0)
    assert progress is not None and progress.eta_seconds == pytest.approx(5.0)
    progress = hub.update("t1", add_tokens=60)
    assert progress is not None and progress.eta_seconds == pytest.approx(2.0)
    progress = hub.update("t1", add_tokens=100)
    assert progress is not None and progress.eta_seconds == 0


def test_ux_evidence_belongs_to_the_model_it_was_earned_on() -> None:
    """A record earned by one ux model does not route tasks to a different ux model."""
    selector = Selector(LearningSettings(explore_rate=0.0))
    for _ in range(20):
        selector.observe("ux", "simple", True, model="llamacpp:smollm2-135m")
    assert selector.choose("a" * 12, "simple", "llamacpp:smollm2-135m").role == "ux"
    assert selector.choose("a" * 12, "simple", "ollama:qwen2.5:0.5b").role == "task"


def test_an_assessment_carries_the_rules_verdict_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's assessment is the one place a task is classified: the rules run once,
    on features computed once, and their verdict travels in the assessment (and its
    checkpoint form), so the runner need not classify again."""
    from taled.tasks.planning import planner

    calls = {"classify": 0, "features": 0}
    real_classify, real_features = planner.classify, planner.features

    def counted_classify(text: str, feats: dict[str, float] | None = None) -> planner.Complexity:
        calls["classify"] += 1
        return real_classify(text, feats)

    def counted_features(text: str) -> dict[str, float]:
        calls["features"] += 1
        return real_features(text)

    async def run() -> Assessment:
        store = _store(tmp_path / "t.db")
        await store.open()
        try:
            engine = LearningEngine(store, LEARNING, ModelsSettings(), ceiling=4096)
            await engine.start()
            task = await store.submit("Build a CLI, then write tests and a README for it.", 50)
            monkeypatch.setattr(planner, "classify", counted_classify)
            monkeypatch.setattr(planner, "features", counted_features)
            return await engine.assess(task)
        finally:
            await store.close()

    assessment = asyncio.run(run())
    assert calls == {"classify": 1, "features": 1}
    text = "Build a CLI, then write tests and a README for it."
    assert assessment.rules == classify(text)
    assert Assessment.from_json(assessment.to_json()).rules == classify(text)
