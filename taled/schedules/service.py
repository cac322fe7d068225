"""Schedules: tasks that run later (``--at``) or again (``--every``), and the scheduler.

    create    read the time (taled.schedules.timing), check the task as submit would,
              store the schedule with its first run; bad input writes nothing
    run       the scheduler, for the daemon's life: fire what is due, then sleep until
              the earliest next run (one index lookup, however many schedules) or until
              a schedule is added or resumed; errors are logged and it goes on
    missed    a due time that passed while the daemon was down (before this scheduler
              was made, or more than ``grace_seconds`` ago) follows the schedule's
              policy: run_once creates one task now standing for all the missed times,
              skip creates none; both are recorded with how many times were missed

Each due time is fired by ``ScheduleRecords.fire``: the task, the record of the time
and the next run in one transaction, conditional on the schedule still being due at
that time — so a kill -9 at any moment neither loses a run nor makes one twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from taled.db.schedules import (
    Firing,
    MissedPolicy,
    NewSchedule,
    RunOutcome,
    Schedule,
    ScheduleKind,
    ScheduleRecords,
    ScheduleRun,
    ScheduleState,
)
from taled.db.store import TaskFields
from taled.errors import IllegalTransition, InvalidInput, TaleError
from taled.schedules.clock import Clock, SystemClock
from taled.schedules.timing import (
    count_between,
    format_local,
    local_zone,
    next_after,
    read_at,
    read_every,
    zone_named,
    zone_or_utc,
)
from taled.settings import ScheduleSettings
from taled.tasks.queue import TaskQueue
from taled.text import count

__all__ = ["ScheduleRequest", "Schedules", "Tick", "describe"]

log = logging.getLogger(__name__)

# Due schedules fired per pass; a fuller backlog takes more passes, without sleeping.
_BATCH = 256
# Missed due times are counted up to this many (an every-minute schedule down for a
# month would otherwise cost its start-up a count of 40,000).
_MISSED_CAP = 1000


@dataclass(frozen=True)
class ScheduleRequest:
    """What a person asked for: the task, and when."""

    task: TaskFields
    at: str | None = None
    every: str | None = None
    timezone: str | None = None
    """An IANA zone name; None: the daemon's local zone."""
    missed: MissedPolicy | None = None
    """None: the configured ``schedules.missed``."""


@dataclass
class Tick:
    """What one pass of the scheduler did."""

    runs: list[ScheduleRun] = field(default_factory=list)
    failed: int = 0
    """Due schedules that could not be fired (logged; tried again later)."""
    more: bool = False
    """The pass stopped at its batch size: more may be due."""


class Schedules:
    """Schedules and the scheduler that fires them."""

    def __init__(
        self,
        records: ScheduleRecords,
        queue: TaskQueue,
        settings: ScheduleSettings,
        clock: Clock | None = None,
    ) -> None:
        self.records = records
        self._queue = queue
        self._settings = settings
        self._clock: Clock = clock or SystemClock()
        # Due times before this instant passed while no scheduler ran: they were missed.
        self._started = self._clock.now()
        self._wake = asyncio.Event()

    # -- what people ask -----------------------------------------------------

    async def create(self, request: ScheduleRequest) -> Schedule:
        """Check and store a schedule; InvalidInput saying what is wrong, nothing written."""
        if not self._settings.enabled:
            raise InvalidInput(
                "schedules are turned off in the daemon's configuration "
                "(schedules.enabled = false); nothing was scheduled"
            )
        if (request.at is None) == (request.every is None):
            raise InvalidInput("give either at (one time) or every (again and again), not both")
        zone = zone_named(request.timezone) if request.timezone else local_zone()
        now = self._clock.now()
        if request.at is not None:
            kind, expression, cron = ScheduleKind.AT, " ".join(request.at.split()), None
            first = read_at(request.at, now, zone)
        else:
            assert request.every is not None
            kind, expression = ScheduleKind.EVERY, " ".join(request.every.split())
            cron = read_every(request.every)
            first = next_after(cron, zone, now)
        policy = request.missed or MissedPolicy(self._settings.missed)
        schedule = await self.records.create(
            NewSchedule(request.task, kind, expression, cron, zone.name, first, policy)
        )
        log.info(
            "schedule %s (%s) created; first run %s",
            schedule.id,
            describe(kind, expression),
            format_local(first, zone),
        )
        self.wake()
        return schedule

    async def pause(self, ref: str) -> Schedule:
        """Stop an active schedule from firing until resumed."""
        found = await self.records.get(ref)
        if found.state != ScheduleState.ACTIVE:
            raise IllegalTransition(
                f"schedule {found.id} is {found.state.value}; only an active schedule can be paused"
            )
        return await self.records.move(found.id, {ScheduleState.ACTIVE}, ScheduleState.PAUSED)

    async def resume(self, ref: str) -> Schedule:
        """Make a paused schedule active again, from its next time after now: times that
        passed while it was paused are not run (they were not missed, they were held)."""
        found = await self.records.get(ref)
        if found.state != ScheduleState.PAUSED:
            raise IllegalTransition(
                f"schedule {found.id} is {found.state.value}; only a paused schedule can be resumed"
            )
        now = self._clock.now()
        zone = zone_named(found.timezone)
        if found.kind == ScheduleKind.EVERY:
            assert found.cron is not None
            next_run = next_after(found.cron, zone, now)
        else:
            next_run = found.next_run or now
            if next_run <= now:
                raise IllegalTransition(
                    f"schedule {found.id} was to run once at {format_local(next_run, zone)}, "
                    "which passed while it was paused; delete it, or submit the task again "
                    "with a new --at"
                )
        resumed = await self.records.move(
            found.id, {ScheduleState.PAUSED}, ScheduleState.ACTIVE, next_run=next_run
        )
        self.wake()
        return resumed

    async def delete(self, ref: str) -> Schedule:
        """Remove a schedule (the tasks it created stay); returns it as it was."""
        found = await self.records.get(ref)
        await self.records.delete(found.id)
        log.info("schedule %s deleted", found.id)
        return found

    # -- the scheduler ---------------------------------------------------------

    def wake(self) -> None:
        """Tell the scheduler that the schedules changed (it re-reads the next due time)."""
        self._wake.set()

    async def run(self) -> None:
        """Fire what is due, then sleep until the next due time or a change; for ever.

        The first pass applies the missed-run policy to what came due while the daemon
        was down. An error is logged and the pass tried again after a back-off.
        """
        ceiling = self._settings.max_sleep_seconds
        backoff = 0.0
        while True:
            self._wake.clear()
            try:
                tick = await self.tick()
                if tick.failed:
                    backoff = min(max(backoff * 2, 1.0), ceiling)
                    delay = backoff
                elif tick.more:
                    delay = 0.0
                else:
                    backoff = 0.0
                    delay = await self._until_next(ceiling)
            except TaleError as exc:
                backoff = min(max(backoff * 2, 1.0), ceiling)
                delay = backoff
                log.warning("the scheduler could not run (again in %.0f s): %s", delay, exc.message)
            except Exception:
                backoff = min(max(backoff * 2, 1.0), ceiling)
                delay = backoff
                log.exception("the scheduler failed; it tries again in %.0f s", delay)
            await self._nap(delay)

    async def _until_next(self, ceiling: float) -> float:
        due = await self.records.next_due()
        if due is None:
            return ceiling
        return min(max(due - self._clock.now(), 0.0), ceiling)

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds`` of the clock's time, or until ``wake()``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken = asyncio.ensure_future(self._wake.wait())
        slept = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({woken, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()

    async def tick(self) -> Tick:
        """One pass: fire every schedule due now (up to a batch), earliest first.

        The firings are handed to the store's writer together, so a backlog (a start
        after a long stop) commits in a few group commits, each firing still a
        transaction of its own (a savepoint) that happens whole or not at all.
        """
        now = self._clock.now()
        done = Tick()
        due = await self.records.due(now, _BATCH)
        done.more = len(due) == _BATCH
        decided: list[tuple[Schedule, Firing]] = []
        for schedule in due:
            try:
                decided.append((schedule, self._decide(schedule, now)))
            except Exception as exc:  # noqa: BLE001 - one schedule must not stop the others
                done.failed += 1
                self._log_failure(schedule, exc)
        fired = await asyncio.gather(
            *(self.records.fire(firing, now) for _, firing in decided), return_exceptions=True
        )
        for (schedule, _), run in zip(decided, fired, strict=True):
            if isinstance(run, Exception):
                done.failed += 1
                self._log_failure(schedule, run)
            elif isinstance(run, BaseException):
                raise run
            elif run is not None:  # None: paused, deleted or fired meanwhile
                done.runs.append(run)
                self._log_run(schedule, run)
        if any(r.task_id is not None for r in done.runs):
            self._queue.wake()
        return done

    @staticmethod
    def _log_failure(schedule: Schedule, exc: Exception) -> None:
        if isinstance(exc, TaleError):
            log.warning("schedule %s could not fire (tried again): %s", schedule.id, exc.message)
        else:
            log.error("schedule %s could not fire (tried again)", schedule.id, exc_info=exc)

    def _decide(self, schedule: Schedule, now: float) -> Firing:
        """What to do about a schedule's due time, now."""
        assert schedule.next_run is not None
        due = schedule.next_run
        zone = zone_named(schedule.timezone)
        if schedule.kind == ScheduleKind.EVERY:
            assert schedule.cron is not None
            later = count_between(schedule.cron, zone, due, now, _MISSED_CAP)
            next_run: float | None = next_after(schedule.cron, zone, max(due, now))
        else:
            later, next_run = 0, None
        missed = due < self._started or now - due > self._settings.grace_seconds
        what = f"{describe(schedule.kind, schedule.expression)} (schedule {schedule.id})"
        when = format_local(due, zone)
        if not missed:
            reason = f"scheduled: {what}, due {when}"
            if later:
                passed = count(later, "later due time", "later due times")
                reason += f"; no run for {passed} that passed before it ran"
            return Firing(schedule.id, due, RunOutcome.RAN, later, next_run, reason)
        missed_runs = 1 + later
        if schedule.missed_policy == MissedPolicy.SKIP:
            return Firing(schedule.id, due, RunOutcome.SKIPPED, missed_runs, next_run, "")
        reason = (
            f"scheduled: {what} missed {count(missed_runs, 'run', 'runs')} while the daemon was "
            "down (first due "
            f"{when}); this one run stands for them (missed policy run_once)"
        )
        return Firing(schedule.id, due, RunOutcome.CAUGHT_UP, missed_runs, next_run, reason)

    def _log_run(self, schedule: Schedule, run: ScheduleRun) -> None:
        zone = zone_or_utc(schedule.timezone)
        due = format_local(run.due_at, zone)
        if run.outcome == RunOutcome.RAN:
            log.info("schedule %s due %s: task %s queued", schedule.id, due, run.task_id)
        elif run.outcome == RunOutcome.CAUGHT_UP:
            log.warning(
                "schedule %s missed %s while the daemon was down (first due %s): "
                "task %s queued once for them",
                schedule.id,
                count(run.missed, "run", "runs"),
                due,
                run.task_id,
            )
        else:
            log.warning(
                "schedule %s missed %s while the daemon was down (first due %s): "
                "skipped (missed policy skip)",
                schedule.id,
                count(run.missed, "run", "runs"),
                due,
            )


def describe(kind: ScheduleKind, expression: str) -> str:
    """How a person says when: ``at 07:00``, ``every mon-fri 08:30``, ``hourly``."""
    if kind == ScheduleKind.AT:
        return f"at {expression}"
    first = expression.split()[0].lower() if expression.split() else ""
    if first in ("every", "hourly", "daily") or first.startswith("@"):
        return expression
    return f"every {expression}"
