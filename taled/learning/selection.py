"""Model and tactic selection from success rates, and thinking by complexity.

A simple task goes to ``ux`` when the ux model has finished at least
``ux_min_samples`` simple tasks and succeeded on at least ``ux_success_threshold``
of them. Until it has that many, ``explore_rate`` of simple tasks go to ux
anyway, or there would never be evidence; which ones is decided by a hash of
the task's text and ``explore_seed``, so the choice survives a restart and a
replayed workload explores the same tasks (another seed, other tasks). Levels here
are the *predicted* ones, the only ones known when the route is chosen.

The costly tactics a task can be carried with beyond one direct answer are kept
only while they pay off on the model (``Tactics``): a retry after a failed gate,
decomposing a task whose direct answers failed, planning a complex task up front.
Each is counted per (model, predicted level): how often it carried the task, and the
tokens its own calls spent. What it may spend per task it carries is measured against
what a task costs that passes on its first answer on the same model (its prompt and
answer): at most ``tactic_max_cost_ratio`` times that. A level's own record decides
once it has ``tactic_min_samples`` uses; before that, the model's record over every
level does (the evidence that a 135M model cannot decompose is the same for medium and
complex tasks). A tactic is skipped before its samples are in when it could not pay
even if every use still to come carried its task, at what its uses have cost so far. A
skipped tactic is still tried on a share of tasks (by the same hash, with the tactic),
so the evidence keeps coming if the model improves: ``tactic_explore_rate`` at first,
shrinking as the uses that say it does not pay accumulate (times min_samples / uses),
and for a tactic whose one use costs more than it may spend per task carried (times
that limit / its tokens per use).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

from taled.settings import LearningSettings, Level, Role

__all__ = ["TACTICS", "Choice", "Selector", "Tactic", "Tactics", "explores"]

Tactic = Literal["retry", "decompose", "plan"]
"""``retry``: another attempt after a failed gate, on the same model; ``decompose``:
planning a task into subtasks after its direct answers failed; ``plan``: planning a
task the classifier calls complex up front, instead of answering it directly."""
TACTICS: tuple[Tactic, ...] = get_args(Tactic)


@dataclass(frozen=True)
class Choice:
    """Where a task runs and whether the model thinks first, with the reason."""

    role: Role
    think: bool
    reason: str


def explores(key: str, rate: float, seed: int = 0) -> bool:
    """Whether the task ``key`` names (its text) is one of the ``rate`` share picked for
    exploration under ``seed``."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class Selector:
    """Success counts per (role, model, level) and the routing rule over them."""

    def __init__(self, settings: LearningSettings) -> None:
        self._settings = settings
        self._counts: dict[tuple[str, str, str], tuple[int, int]] = {}

    def observe(
        self, role: str, level: str, success: bool, retries: int = 0, model: str = ""
    ) -> None:
        """Count one finished task on the role (and the role's model) it was routed to.

        A ux task that needed a retry was escalated to the task model (see the
        runner's stages), so only a first-time success counts for ux. Counts are
        kept per model too, so evidence about one ux model is not taken for another.
        """
        ok = success and (role != "ux" or retries == 0)
        good, n = self._counts.get((role, model, level), (0, 0))
        self._counts[(role, model, level)] = (good + int(ok), n + 1)

    def clear(self) -> None:
        """Forget every count (before a refit)."""
        self._counts.clear()

    def rate(self, role: str, level: str, model: str = "") -> tuple[float | None, int]:
        """Success rate and sample count of ``role`` on ``model`` at ``level`` (None
        without samples)."""
        ok, n = self._counts.get((role, model, level), (0, 0))
        return (ok / n if n else None), n

    def choose(self, key: str, level: Level, ux_model: str = "") -> Choice:
        """The role and thinking mode for a top-level task (``key``: its text) of this
        predicted level, with ``ux_model`` the ux role's model now (its own record
        decides)."""
        s = self._settings
        think = level in s.think_for
        if level != "simple":
            return Choice("task", think, f"{level} tasks run on the task model")
        rate, n = self.rate("ux", "simple", ux_model)
        if n >= s.ux_min_samples:
            assert rate is not None
            if rate >= s.ux_success_threshold:
                return Choice("ux", think, f"ux succeeded on {rate:.0%} of {n} simple tasks")
            return Choice("task", think, f"ux succeeded on only {rate:.0%} of {n} simple tasks")
        if explores(key, s.explore_rate, s.explore_seed):
            return Choice("ux", think, f"exploring: ux has {n} of {s.ux_min_samples} samples")
        return Choice("task", think, f"ux has {n} of {s.ux_min_samples} samples on simple tasks")


class Tactics:
    """What each costly tactic cost and how often it carried a task, per (model,
    predicted level), what a task that passes on its first answer costs per model, and
    the rule that keeps or skips a tactic."""

    def __init__(self, settings: LearningSettings) -> None:
        self._settings = settings
        # (model, level, tactic) -> (uses that carried the task, uses, tokens of those uses)
        self._counts: dict[tuple[str, str, Tactic], tuple[int, int, int]] = {}
        # model -> (tasks that passed on their first answer, their tokens)
        self._passes: dict[str, tuple[int, int]] = {}

    def observe(self, model: str, level: str, tactic: Tactic, worked: bool, tokens: int) -> None:
        """Count one use of ``tactic`` on a finished task: whether it carried the task, and
        its cost (the tokens of the tactic's own calls)."""
        good, n, spent = self._counts.get((model, level, tactic), (0, 0, 0))
        self._counts[(model, level, tactic)] = (good + int(worked), n + 1, spent + tokens)

    def observe_pass(self, model: str, tokens: int) -> None:
        """Count one task that passed on its first answer on ``model`` with no tactic, and
        its tokens (prompt and answer): the yardstick a tactic's cost is held to."""
        n, spent = self._passes.get(model, (0, 0))
        self._passes[model] = (n + 1, spent + tokens)

    def clear(self) -> None:
        """Forget every count (before a refit)."""
        self._counts.clear()
        self._passes.clear()

    def pass_cost(self, model: str) -> float | None:
        """Mean tokens of a task that passed on its first answer on ``model`` (None: none yet)."""
        n, spent = self._passes.get(model, (0, 0))
        return spent / n if n else None

    def record(self, model: str, level: str | None, tactic: Tactic) -> tuple[int, int, int]:
        """(carried, uses, tokens) of ``tactic`` on ``model`` at ``level``; every level's
        summed with ``level`` None."""
        if level is not None:
            return self._counts.get((model, level, tactic), (0, 0, 0))
        rows = [v for (m, _, t), v in self._counts.items() if m == model and t == tactic]
        return (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows))

    def allows(self, key: str, model: str, level: str, tactic: Tactic) -> tuple[bool, str]:
        """Whether this task (``key``: its text) may use ``tactic`` on ``model``, and why."""
        s = self._settings
        own = self.record(model, level, tactic)
        good, n, spent = own if own[1] >= s.tactic_min_samples else self.record(model, None, tactic)
        tasks = f"{level} tasks" if own[1] >= s.tactic_min_samples else "tasks"
        yardstick = self.pass_cost(model)
        if yardstick is None:
            return True, f"{tactic}: no task has passed on its first answer yet to judge it by"
        limit = s.tactic_max_cost_ratio * yardstick
        record = f"it carried {good} of {n} {tasks} for {spent:,} tokens"
        to_come = max(s.tactic_min_samples - n, 0)
        per_use = spent / n if n else 0.0
        if to_come:
            # Could it pay if every use still to come carried its task, at what its uses
            # have cost so far? A plan that spent 4,000 tokens on one task it did not
            # carry cannot come within 1,200 a task in its next four.
            if (spent + to_come * per_use) / (good + to_come) <= limit:
                return True, f"{tactic}: {n} of {s.tactic_min_samples} samples ({record})"
            why = f"over {limit:,.0f} per task carried even if its next {to_come} uses carry theirs"
        else:
            cost = spent / good if good else math.inf
            if cost <= limit:
                return True, f"{tactic} kept: {record}, {cost:,.0f} per task carried"
            why = f"{cost:,.0f} per task carried, over {limit:,.0f}" if good else "none carried"
        # The more uses say it does not pay, the rarer a look at whether it has changed;
        # and a look costs what a use does, so one that costs more than a task it carries
        # may is looked at that much more rarely.
        share = (
            s.tactic_explore_rate
            * min(1.0, s.tactic_min_samples / max(n, 1))
            * min(1.0, limit / per_use if per_use else 1.0)
        )
        if explores(f"{key}:{tactic}", share, s.explore_seed):
            return True, f"{tactic} explored: {record}"
        return False, (
            f"{tactic} skipped: {record}, {why} (learning.tactic_max_cost_ratio: "
            f"{s.tactic_max_cost_ratio:g} x the {yardstick:,.0f} tokens of a first-answer pass)"
        )
