"""Schedules: reading --at and --every, the scheduler on a clock the tests move, and the
real daemon firing them, exactly once, across kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from taled.db.schedules import (
    _NEXT_DUE,
    Firing,
    MissedPolicy,
    NewSchedule,
    RunOutcome,
    ScheduleKind,
    ScheduleRecords,
    ScheduleState,
)
from taled.db.store import Store, TaskFields
from taled.errors import IllegalTransition, InvalidInput
from taled.schedules.service import ScheduleRequest, Schedules
from taled.schedules.timing import next_after, read_at, read_every, zone_named
from taled.settings import QueueSettings, ScheduleSettings, StoreSettings
from taled.tasks.queue import TaskQueue
from tests.harness import Daemon, Home

T = TypeVar("T")

BERLIN = zone_named("Europe/Berlin")
NEW_YORK = zone_named("America/New_York")
UTC_ZONE = zone_named("UTC")
# 2026-12-05 10:00 in Berlin, a Saturday.
SATURDAY_10 = datetime(2026, 12, 5, 10, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()


def _local(ts: float, zone: ZoneInfo | None = None) -> str:
    return datetime.fromtimestamp(ts, zone or BERLIN.info).strftime("%Y-%m-%d %H:%M %Z")


# -- --every: readable forms and cron ---------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cron"),
    [
        ("mon-fri 08:30", "30 8 * * 1-5"),
        ("weekdays 08:30", "30 8 * * 1-5"),
        ("every monday at 9:00", "0 9 * * 1"),
        ("sat,sun 10:00", "0 10 * * 0,6"),
        ("weekends 10:00", "0 10 * * 0,6"),
        ("fri-mon 06:00", "0 6 * * 0,1,5,6"),
        ("daily 07:00", "0 7 * * *"),
        ("every day at 07:00", "0 7 * * *"),
        ("07:00", "0 7 * * *"),
        ("daily", "0 0 * * *"),
        ("hourly", "0 * * * *"),
        ("every hour", "0 * * * *"),
        ("every minute", "* * * * *"),
        ("every 2h", "0 */2 * * *"),
        ("every 2 hours", "0 */2 * * *"),
        ("every 15m", "*/15 * * * *"),
        ("every 15 minutes", "*/15 * * * *"),
        ("every 60m", "0 * * * *"),
        ("@weekly", "0 0 * * 0"),
        ("  Mon-Fri   08:30 ", "30 8 * * 1-5"),
        ("30 8 * * 1-5", "30 8 * * 1-5"),
        ("*/5  9-17 * * mon-fri", "*/5 9-17 * * mon-fri"),
    ],
)
def test_every_reads_readable_forms_and_cron_as_cron(spec: str, cron: str) -> None:
    """A readable --every is translated to the cron expression it means; cron passes through."""
    assert read_every(spec) == cron


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("61 * * * *", "not a valid cron expression"),
        ("* * * * * *", "has 5 fields"),
        ("0 0 30 2 *", "never matches"),
        ("mon-fry 08:30", "'fry' is not a day"),
        ("every 7m", "7 minutes does not divide an hour"),
        ("every 5h", "5 hours does not divide a day"),
        ("every tuesday", "give a time of day too"),
        ("daily 25:00", "25:00 is not a time of day"),
        ("banana", "cannot read 'banana'"),
        ("", "give a 5-field cron expression"),
    ],
)
def test_every_refuses_bad_input_naming_what_is_wrong(spec: str, says: str) -> None:
    """An unreadable --every is InvalidInput whose message names the problem."""
    with pytest.raises(InvalidInput, match=says):
        read_every(spec)


_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@given(
    days=st.sets(st.integers(0, 6), min_size=1),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
)
def test_readable_days_and_time_round_trip_through_cron(
    days: set[int], hour: int, minute: int
) -> None:
    """'mon,wed 08:30'-style forms mean exactly their days at their time (croniter's reading)."""
    spec = ",".join(_DAY_NAMES[d] for d in sorted(days)) + f" {hour:02d}:{minute:02d}"
    fields, _ = croniter.expand(read_every(spec))
    assert fields[0] == [minute]
    assert fields[1] == [hour]
    weekdays = set(range(7)) if fields[4] == ["*"] else {int(d) % 7 for d in fields[4]}
    assert weekdays == days


@settings(deadline=None, max_examples=60)
@given(
    minute=st.one_of(st.just("*"), st.integers(0, 59).map(str), st.sampled_from(["*/5", "0-30"])),
    hour=st.one_of(st.just("*"), st.integers(0, 23).map(str), st.just("9-17")),
    dom=st.one_of(st.just("*"), st.integers(1, 28).map(str)),
    dow=st.one_of(st.just("*"), st.sampled_from(["1-5", "0,6", "3"])),
    start=st.datetimes(datetime(2020, 1, 1), datetime(2035, 1, 1)),
)
def test_cron_passes_through_and_agrees_with_croniter_in_utc(
    minute: str, hour: str, dom: str, dow: str, start: datetime
) -> None:
    """A valid cron expression is kept as given, and its next time in UTC is croniter's."""
    cron = f"{minute} {hour} {dom} * {dow}"
    assert read_every(cron) == cron
    after = start.replace(tzinfo=UTC).timestamp()
    expected = croniter(cron, start.replace(tzinfo=UTC)).get_next(float)
    assert next_after(cron, UTC_ZONE, after) == expected


# -- --at ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("11:00", "2026-12-05 11:00 CET"),  # later today
        ("07:00", "2026-12-06 07:00 CET"),  # passed today: tomorrow
        ("at 07:00", "2026-12-06 07:00 CET"),
        ("tomorrow 07:00", "2026-12-06 07:00 CET"),
        ("today 23:59", "2026-12-05 23:59 CET"),
        ("in 20m", "2026-12-05 10:20 CET"),
        ("in 2 hours", "2026-12-05 12:00 CET"),
        ("2026-12-06T07:00", "2026-12-06 07:00 CET"),  # naive: local
        ("2026-12-06 07:00", "2026-12-06 07:00 CET"),
        ("2026-12-06T07:00+00:00", "2026-12-06 08:00 CET"),
        ("2026-12-06T07:00Z", "2026-12-06 08:00 CET"),
    ],
)
def test_at_reads_times_dates_and_offsets(spec: str, local: str) -> None:
    """--at reads a time of day (its next occurrence), today/tomorrow, in N, and ISO 8601."""
    assert _local(read_at(spec, SATURDAY_10, BERLIN)) == local


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("2026-12-01T07:00", "is in the past"),
        ("2026-12-05T09:59:59+01:00", "is in the past"),
        ("today 07:00", "is in the past"),
        ("2026-12-06", "is a date; give a time too"),
        ("25:00", "25:00 is not a time of day"),
        ("in 5 parsecs", "'parsecs' is not a unit"),
        ("in 0m", "is now, not later"),
        ("next tuesday", "cannot read 'next tuesday'"),
        ("2040-01-01T00:00", "more than 10 years away"),
    ],
)
def test_at_refuses_bad_input_naming_what_is_wrong(spec: str, says: str) -> None:
    """An unreadable or past --at is InvalidInput whose message names the problem."""
    with pytest.raises(InvalidInput, match=says):
        read_at(spec, SATURDAY_10, BERLIN)


def test_an_unknown_timezone_is_refused_by_name() -> None:
    """A zone that is no IANA name is InvalidInput naming it."""
    with pytest.raises(InvalidInput, match="'Mars/Olympus' is not an IANA time zone"):
        zone_named("Mars/Olympus")


# -- DST ---------------------------------------------------------------------------


def _times(cron: str, zone_name: str, start: datetime, n: int) -> list[float]:
    zone = zone_named(zone_name)
    t = start.replace(tzinfo=zone.info).timestamp()
    out = []
    for _ in range(n):
        t = next_after(cron, zone, t)
        out.append(t)
    return out


def test_a_daily_time_the_clocks_skip_runs_once_shifted_by_the_gap() -> None:
    """Daily 02:30 on the night Berlin skips 02:00-03:00 runs once, at 03:30."""
    got = [_local(t) for t in _times("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12), 3)]
    assert got == ["2026-03-29 03:30 CEST", "2026-03-30 02:30 CEST", "2026-03-31 02:30 CEST"]


def test_a_daily_time_that_happens_twice_runs_once_at_its_first() -> None:
    """Daily 02:30 on the night Berlin repeats 02:00-03:00 runs once, at the first 02:30."""
    got = [_local(t) for t in _times("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12), 3)]
    assert got == ["2026-10-25 02:30 CEST", "2026-10-26 02:30 CET", "2026-10-27 02:30 CET"]


def test_an_hourly_schedule_runs_in_both_repeated_hours() -> None:
    """Hourly (hour field *) runs at both 02:00s of the night the clocks go back."""
    start = datetime(2026, 10, 25, 0, 30)
    got = [_local(t) for t in _times("0 * * * *", "Europe/Berlin", start, 4)]
    assert got == [
        "2026-10-25 01:00 CEST",
        "2026-10-25 02:00 CEST",
        "2026-10-25 02:00 CET",
        "2026-10-25 03:00 CET",
    ]


@settings(deadline=None, max_examples=40)
@given(
    zone=st.sampled_from(
        ["Europe/Berlin", "America/New_York", "Australia/Sydney", "Australia/Lord_Howe"]
    ),
    start=st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1)),
    around_change=st.booleans(),
)
def test_every_30m_keeps_30_minutes_apart_across_clock_changes(
    zone: str, start: datetime, around_change: bool
) -> None:
    """'every 30m' runs every 30 real minutes, through the clock changes of DST zones too."""
    if around_change:
        # Start just before a change of the zone's offset (one is found within a year).
        info = ZoneInfo(zone)
        probe = start.replace(tzinfo=info)
        offset = probe.utcoffset()
        for _ in range(400):
            probe += timedelta(days=1)
            if probe.utcoffset() != offset:
                break
        start = (probe - timedelta(days=1)).replace(tzinfo=None)
    times = _times(read_every("every 30m"), zone, start, 60)
    assert all(b - a == 1800 for a, b in itertools.pairwise(times))


@settings(deadline=None, max_examples=15)
@given(
    zone=st.sampled_from(["Europe/Berlin", "America/New_York"]),
    hour=st.integers(0, 23),
    minute=st.sampled_from([0, 15, 30, 59]),
)
def test_a_daily_time_runs_once_every_local_day_of_a_year(
    zone: str, hour: int, minute: int
) -> None:
    """A daily fixed time runs on every local date of 2026, once, whatever DST does."""
    info = ZoneInfo(zone)
    times = _times(f"{minute} {hour} * * *", zone, datetime(2025, 12, 31, 23, 59), 365)
    dates = [datetime.fromtimestamp(t, info).date() for t in times]
    assert dates == [datetime(2026, 1, 1).date() + timedelta(days=i) for i in range(365)]


# -- the scheduler, on a clock the test moves -----------------------------------------


class ManualClock:
    """A Clock whose time moves only when the test says; sleepers wake when it passes."""

    def __init__(self, start: float) -> None:
        self.t = start
        self.naps: list[float] = []
        self._moved: asyncio.Event | None = None

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        end = self.t + seconds
        while self.t < end:
            if self._moved is None:
                self._moved = asyncio.Event()
            await self._moved.wait()

    def advance(self, seconds: float) -> None:
        self.t += seconds
        if self._moved is not None:
            self._moved.set()
            self._moved = None


@dataclass
class Rig:
    """A real store on a real SQLite file, with the scheduler over it."""

    path: Path
    store: Store
    queue: TaskQueue
    clock: ManualClock
    schedules: Schedules

    def restart(self, later: float, settings: ScheduleSettings | None = None) -> Schedules:
        """A new scheduler (the daemon started again) ``later`` seconds on."""
        self.clock.advance(later)
        self.schedules = Schedules(
            ScheduleRecords(self.store), self.queue, settings or ScheduleSettings(), self.clock
        )
        return self.schedules

    async def task_rows(self) -> list[tuple[str, str | None]]:
        async with self.store.read() as conn:
            rows = (
                await conn.exec_driver_sql("SELECT id, schedule_id FROM tasks ORDER BY created_at")
            ).all()
        return [(r[0], r[1]) for r in rows]


def _run(tmp_path: Path, body: Callable[[Rig], Awaitable[T]], **settings: Any) -> T:
    async def main() -> T:
        store = Store(tmp_path / "tale.db", StoreSettings(), write_batch_max=256)
        await store.open()
        clock = ManualClock(SATURDAY_10)
        queue = TaskQueue(store, QueueSettings())
        schedules = Schedules(ScheduleRecords(store), queue, ScheduleSettings(**settings), clock)
        try:
            return await body(Rig(tmp_path / "tale.db", store, queue, clock, schedules))
        finally:
            await store.close()

    return asyncio.run(main())


def _request(queue: TaskQueue, **when: Any) -> ScheduleRequest:
    return ScheduleRequest(queue.check("Say hello"), timezone="Europe/Berlin", **when)


def test_a_due_one_off_creates_exactly_one_task_linked_to_its_schedule(tmp_path: Path) -> None:
    """At its time a one-off schedule queues one task carrying its id, then is done."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, at="in 1h"))
        assert (await rig.schedules.tick()).runs == []  # not yet
        rig.clock.advance(3600)
        first = await rig.schedules.tick()
        again = await rig.schedules.tick()
        done = await rig.schedules.records.get(s.id)
        task = await rig.store.get_task(first.runs[0].task_id or "")
        return s, first, again, done, task, await rig.task_rows()

    s, first, again, done, task, rows = _run(tmp_path, body)
    assert [r.outcome for r in first.runs] == [RunOutcome.RAN]
    assert again.runs == []
    assert rows == [(task.id, s.id)]
    assert task.schedule_id == s.id and task.text == "Say hello"
    assert task.transitions[0].reason.startswith(f"scheduled: at in 1h (schedule {s.id})")
    assert (done.state, done.next_run, done.runs, done.last_task_id) == (
        ScheduleState.DONE,
        None,
        1,
        task.id,
    )


def test_a_recurring_schedule_advances_to_its_next_time_after_each_run(tmp_path: Path) -> None:
    """'daily 07:00' runs each morning and its next run moves a day on each time."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, every="daily 07:00"))
        seen = [s.next_run]
        for _ in range(3):
            assert s.next_run is not None
            rig.clock.advance(s.next_run - rig.clock.now())
            assert len((await rig.schedules.tick()).runs) == 1
            s = await rig.schedules.records.get(s.id)
            seen.append(s.next_run)
        return s, seen, await rig.task_rows()

    s, seen, rows = _run(tmp_path, body)
    assert [_local(t or 0) for t in seen] == [
        "2026-12-06 07:00 CET",
        "2026-12-07 07:00 CET",
        "2026-12-08 07:00 CET",
        "2026-12-09 07:00 CET",
    ]
    assert (s.runs, s.missed_runs, s.state) == (3, 0, ScheduleState.ACTIVE)
    assert [sid for _, sid in rows] == [s.id] * 3


def test_a_paused_schedule_does_not_run_and_resumes_from_its_next_time(tmp_path: Path) -> None:
    """Paused, its due times pass without a run or a 'missed'; resumed, it goes on from now."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, every="hourly"))
        paused = await rig.schedules.pause(s.id[:6])
        rig.clock.advance(5 * 3600)
        held = await rig.schedules.tick()
        resumed = await rig.schedules.resume(s.id)
        return paused, held, resumed, await rig.task_rows()

    paused, held, resumed, rows = _run(tmp_path, body)
    assert paused.state == ScheduleState.PAUSED
    assert held.runs == [] and rows == []
    assert resumed.state == ScheduleState.ACTIVE and resumed.missed_runs == 0
    assert _local(resumed.next_run or 0) == "2026-12-05 16:00 CET"


def test_pause_resume_and_delete_refuse_what_the_state_does_not_allow(tmp_path: Path) -> None:
    """Resuming an active schedule, pausing a paused one, or a one-off whose time passed
    while paused: IllegalTransition saying why."""

    async def body(rig: Rig) -> list[str]:
        every = await rig.schedules.create(_request(rig.queue, every="hourly"))
        once = await rig.schedules.create(_request(rig.queue, at="in 10m"))
        await rig.schedules.pause(once.id)
        rig.clock.advance(3600)
        errors = []
        for action in (
            lambda: rig.schedules.resume(every.id),
            lambda: rig.schedules.pause(once.id),
            lambda: rig.schedules.resume(once.id),
        ):
            with pytest.raises(IllegalTransition) as caught:
                await action()
            errors.append(caught.value.message)
        return errors

    errors = _run(tmp_path, body)
    assert "only a paused schedule can be resumed" in errors[0]
    assert "only an active schedule can be paused" in errors[1]
    assert "passed while it was paused" in errors[2]


def test_runs_missed_while_down_run_once_at_start_and_are_recorded(tmp_path: Path) -> None:
    """run_once: an hourly schedule down for 5 hours gets one task at start, recorded as
    standing for the 5 missed times, and its next run is the next hour after now."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, every="hourly"))
        restarted = rig.restart(5 * 3600 + 60)
        tick = await restarted.tick()
        task = await rig.store.get_task(tick.runs[0].task_id or "")
        return s, tick, await restarted.records.get(s.id), await rig.task_rows(), task

    s, tick, after, rows, task = _run(tmp_path, body)
    assert [(r.outcome, r.missed) for r in tick.runs] == [(RunOutcome.CAUGHT_UP, 5)]
    assert "missed 5 runs while the daemon was down" in task.transitions[0].reason
    assert rows == [(tick.runs[0].task_id, s.id)]
    assert (after.runs, after.missed_runs) == (1, 5)
    assert _local(after.next_run or 0) == "2026-12-05 16:00 CET"


def test_runs_missed_while_down_are_skipped_under_skip_and_recorded(tmp_path: Path) -> None:
    """skip: no task for the times missed while down; the record says how many; the
    schedule waits for its next time."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(
            _request(rig.queue, every="hourly", missed=MissedPolicy.SKIP)
        )
        once = await rig.schedules.create(
            _request(rig.queue, at="in 30m", missed=MissedPolicy.SKIP)
        )
        restarted = rig.restart(3 * 3600 + 60)
        tick = await restarted.tick()
        history = await restarted.records.runs(s.id, 10)
        return (
            tick,
            await restarted.records.get(s.id),
            await restarted.records.get(once.id),
            history,
            await rig.task_rows(),
        )

    tick, every, once, history, rows = _run(tmp_path, body)
    assert rows == []
    assert sorted((r.outcome, r.missed) for r in tick.runs) == [
        (RunOutcome.SKIPPED, 1),
        (RunOutcome.SKIPPED, 3),
    ]
    assert (every.runs, every.missed_runs, every.state) == (0, 3, ScheduleState.ACTIVE)
    assert _local(every.next_run or 0) == "2026-12-05 14:00 CET"
    assert (once.state, once.runs, once.missed_runs) == (ScheduleState.DONE, 0, 1)
    assert [(h.outcome, h.task_id) for h in history] == [(RunOutcome.SKIPPED, None)]


def test_a_due_time_reached_later_than_the_grace_counts_as_missed(tmp_path: Path) -> None:
    """A running scheduler that reaches a due time past grace_seconds (a suspended
    machine) treats it as missed: one run standing for them (run_once)."""

    async def body(rig: Rig) -> Any:
        await rig.schedules.create(_request(rig.queue, every="every 15m"))
        rig.clock.advance(15 * 60 + 10)  # 10 s late: on time
        on_time = await rig.schedules.tick()
        rig.clock.advance(3600)  # suspended for an hour
        late = await rig.schedules.tick()
        return on_time, late

    on_time, late = _run(tmp_path, body, grace_seconds=60)
    assert [(r.outcome, r.missed) for r in on_time.runs] == [(RunOutcome.RAN, 0)]
    assert [(r.outcome, r.missed) for r in late.runs] == [(RunOutcome.CAUGHT_UP, 4)]


def test_a_due_time_is_fired_once_however_often_it_is_fired(tmp_path: Path) -> None:
    """The same firing carried out twice (and two passes at once) makes one task: fire
    checks the schedule is still due at that time, in the transaction that fires it."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, every="hourly"))
        assert s.next_run is not None
        firing = Firing(s.id, s.next_run, RunOutcome.RAN, 0, s.next_run + 3600, "scheduled")
        first = await rig.schedules.records.fire(firing, rig.clock.now())
        second = await rig.schedules.records.fire(firing, rig.clock.now())
        rig.clock.advance(2 * 3600)
        together = await asyncio.gather(*(rig.schedules.tick() for _ in range(4)))
        return first, second, together, await rig.task_rows()

    first, second, together, rows = _run(tmp_path, body)
    assert first is not None and second is None
    assert sum(len(t.runs) for t in together) == 1
    assert len(rows) == 2


def test_a_schedule_that_cannot_fire_does_not_stop_the_others(tmp_path: Path) -> None:
    """A stored schedule whose zone the system no longer knows fails alone, logged; the
    other due schedules fire in the same pass."""

    async def body(rig: Rig) -> Any:
        good = await rig.schedules.create(_request(rig.queue, at="in 1h"))
        bad = NewSchedule(
            TaskFields("bad", 50),
            ScheduleKind.EVERY,
            "hourly",
            "0 * * * *",
            "Mars/Olympus",
            rig.clock.now() + 60,
            MissedPolicy.RUN_ONCE,
        )
        await rig.schedules.records.create(bad)
        rig.clock.advance(3600)
        return good, await rig.schedules.tick(), await rig.task_rows()

    good, tick, rows = _run(tmp_path, body)
    assert tick.failed == 1
    assert rows == [(tick.runs[0].task_id, good.id)]


def test_deleting_a_schedule_keeps_the_tasks_it_ran(tmp_path: Path) -> None:
    """Delete removes the schedule and its record; its tasks stay, no longer linked."""

    async def body(rig: Rig) -> Any:
        s = await rig.schedules.create(_request(rig.queue, every="hourly"))
        rig.clock.advance(3600)
        await rig.schedules.tick()
        await rig.schedules.delete(s.id)
        listed = await rig.schedules.records.find(None, 10)
        return listed, await rig.task_rows()

    listed, rows = _run(tmp_path, body)
    assert listed == []
    assert len(rows) == 1 and rows[0][1] is None


def test_the_scheduler_sleeps_until_the_next_due_time_and_wakes_for_a_new_one(
    tmp_path: Path,
) -> None:
    """The loop sleeps the whole way to the earliest next run (no polling below
    max_sleep_seconds), is woken by a new schedule, and fires it when the time comes."""

    async def body(rig: Rig) -> Any:
        loop = asyncio.create_task(rig.schedules.run())
        try:
            await _until(lambda: len(rig.clock.naps) >= 1)
            idle = rig.clock.naps[-1]
            s = await rig.schedules.create(_request(rig.queue, at="in 2h"))
            await _until(lambda: len(rig.clock.naps) >= 2)
            planned = rig.clock.naps[-1]
            rig.clock.advance(7200)

            async def fired() -> bool:
                return len(await rig.task_rows()) == 1

            await _until_async(fired)
            return idle, planned, s, await rig.task_rows()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    idle, planned, s, rows = _run(tmp_path, body, max_sleep_seconds=86_400)
    assert idle == 86_400  # nothing scheduled: the longest nap
    assert planned == pytest.approx(7200)
    assert rows[0][1] == s.id


def test_next_due_is_one_lookup_in_the_partial_index(tmp_path: Path) -> None:
    """The scheduler's wake-up query reads the schedules_due index, not the table, so it
    stays flat however many schedules there are."""
    _run(tmp_path, lambda rig: asyncio.sleep(0))  # creates and migrates the file
    sql = str(_NEXT_DUE.compile(dialect=sqlite.dialect()))
    with contextlib.closing(sqlite3.connect(tmp_path / "tale.db")) as db:
        plan = [str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
    assert plan == ["SEARCH schedules USING INDEX schedules_due"]


async def _until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _until_async(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- through the real daemon -------------------------------------------------------------


def _db_rows(home: Home, sql: str) -> list[tuple[Any, ...]]:
    uri = f"file:{home.data / 'tale.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return list(db.execute(sql).fetchall())


def _scheduled_tasks(home: Home) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in _db_rows(home, "SELECT id, schedule_id FROM tasks WHERE schedule_id IS NOT NULL")
    ]


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def schedules_daemon() -> Iterator[Daemon]:
    """One daemon for the read-mostly daemon tests of this module."""
    home = Home()
    daemon = Daemon(home).start()
    try:
        yield daemon
    finally:
        daemon.kill_if_running()
        home.cleanup()


def test_submit_at_a_few_seconds_ahead_runs_once_linked_to_its_schedule(daemon: Daemon) -> None:
    """`tale submit --at` a time 4 s ahead: one task runs then, carrying the schedule's id;
    `tale schedules` shows the schedule done with one run."""
    home = daemon.home
    when = (datetime.now().astimezone() + timedelta(seconds=4)).isoformat(timespec="seconds")
    done = home.tale("submit", "--at", when, "Answer yes or no: is 2 > 1?")
    assert done.returncode == 0, done.stderr
    schedule_id = done.stdout.strip()
    assert "next run" in done.stderr
    _wait(lambda: len(_scheduled_tasks(home)) == 1, 30, "the scheduled run")
    ((task_id, linked),) = _scheduled_tasks(home)
    assert linked == schedule_id
    task = daemon.wait_for(task_id)
    assert task["state"] == "completed" and task["schedule_id"] == schedule_id
    status = home.tale("status", task_id)
    assert f"a run of {schedule_id}" in status.stdout
    time.sleep(1.5)  # a second run would have come by now
    assert len(_scheduled_tasks(home)) == 1
    listed = home.tale("schedules", "--json")
    (row,) = json.loads(listed.stdout)["schedules"]
    assert (row["id"], row["state"], row["runs"], row["last_task_id"]) == (
        schedule_id,
        "done",
        1,
        task_id,
    )
    table = home.tale("schedules")
    assert schedule_id in table.stdout and "done" in table.stdout


def test_submit_every_is_listed_with_its_next_run_and_can_be_paused_resumed_deleted(
    schedules_daemon: Daemon,
) -> None:
    """`tale submit --every "mon-fri 08:30"` makes an active schedule `tale schedules`
    lists with its cron and next run; pause, resume and delete work by id prefix."""
    home = schedules_daemon.home
    made = home.tale("submit", "--every", "mon-fri 08:30", "Draft my stand-up notes")
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    found = json.loads(home.tale("schedules", "--json").stdout)["schedules"]
    row = next(s for s in found if s["id"] == sid)
    assert (row["kind"], row["cron"], row["state"]) == ("every", "30 8 * * 1-5", "active")
    next_run = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))
    local = datetime.fromisoformat(row["next_run_local"])
    assert next_run > datetime.now(UTC) and next_run == local
    assert (local.hour, local.minute, local.isoweekday() <= 5) == (8, 30, True)
    table = home.tale("schedules").stdout
    assert sid in table and "every mon-fri 08:30" in table
    assert home.tale("schedules", "pause", sid[:6]).stdout.strip() == f"schedule {sid} paused"
    # Paused, its stored time is no promise: the table shows none, `show` says how to resume.
    paused_row = next(x for x in home.tale("schedules").stdout.splitlines() if x.startswith(sid))
    assert paused_row.split()[1] == "-"
    paused = home.tale("schedules", "show", sid).stdout
    assert f"next run  - (`tale schedules resume {sid}`" in paused
    assert "active, next run" in home.tale("schedules", "resume", sid).stdout
    shown = home.tale("schedules", "show", sid)
    assert "cron 30 8 * * 1-5" in shown.stdout
    assert "deleted" in home.tale("schedules", "delete", sid).stdout
    assert sid not in home.tale("schedules").stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--at", "25:00"], "25:00 is not a time of day"),
        (["--at", "2020-01-01T09:00"], "is in the past"),
        (["--at", "whenever"], "cannot read 'whenever'"),
        (["--every", "61 * * * *"], "not a valid cron expression"),
        (["--every", "banana"], "cannot read 'banana'"),
        (["--every", "every 7m"], "does not divide an hour"),
        (["--at", "in 1h", "--every", "hourly"], "not both"),
        (["--at", "in 1h", "--wait"], "--wait follows a task that runs now"),
        (["--missed", "skip"], "--missed goes with --at or --every"),
        (["--every", "hourly", "--missed", "never"], "run_once or skip"),
    ],
)
def test_bad_schedule_input_exits_2_and_writes_nothing(
    schedules_daemon: Daemon, args: list[str], says: str
) -> None:
    """Unreadable times and cron, a past time, conflicting options: exit 2, the problem
    named on stderr, and no schedule or task in the database."""
    home = schedules_daemon.home
    before = _db_rows(home, "SELECT (SELECT count(*) FROM schedules), (SELECT count(*) FROM tasks)")
    done = home.tale("submit", *args, "Say hello")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr
    assert done.stdout == ""
    after = _db_rows(home, "SELECT (SELECT count(*) FROM schedules), (SELECT count(*) FROM tasks)")
    assert after == before


def test_mcp_submit_task_with_at_returns_the_schedule_and_bad_input_is_32602(
    schedules_daemon: Daemon,
) -> None:
    """submit_task with `every` answers with the schedule (next run in UTC and in its
    zone); a bad `every`, `timezone` or schedule id is a -32602 error naming it, an
    unknown id -32001."""
    from tale_client.rpc import RpcError

    made = schedules_daemon.call(
        "submit_task", text="Say hello", every="daily 07:00", timezone="America/New_York"
    )
    assert (made["cron"], made["timezone"], made["state"]) == (
        "0 7 * * *",
        "America/New_York",
        "active",
    )
    assert made["next_run_local"].endswith(("-05:00", "-04:00"))
    assert "T07:00:00" in made["next_run_local"]
    for bad, says in (
        ({"every": "0 0 30 2 *"}, "never matches"),
        ({"at": "in 1h", "timezone": "Mars/Olympus"}, "not an IANA time zone"),
    ):
        with pytest.raises(RpcError) as caught:
            schedules_daemon.call("submit_task", text="Say hello", **bad)
        assert caught.value.code == -32602 and says in caught.value.message
    with pytest.raises(RpcError) as caught:
        schedules_daemon.call("pause_schedule", id="zz")
    assert caught.value.code == -32602 and "not a schedule id" in caught.value.message
    with pytest.raises(RpcError) as caught:
        schedules_daemon.call("pause_schedule", id="ffff0000")
    assert caught.value.code == -32001 and "no schedule with id ffff0000" in caught.value.message
    schedules_daemon.call("delete_schedule", id=made["id"])


def test_kill_9_before_a_due_time_runs_it_exactly_once_after_restart(home: Home) -> None:
    """A schedule due while the daemon is dead (kill -9) runs once when it is back,
    recorded as caught up for the missed time: never twice, never lost."""
    daemon = Daemon(home).start()
    made = home.tale("submit", "--at", "in 3s", "Answer yes or no: is 2 > 1?")
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    daemon.kill9()
    time.sleep(4)  # its time passes while no daemon runs
    assert _scheduled_tasks(home) == []
    daemon.start()
    try:
        _wait(lambda: len(_scheduled_tasks(home)) == 1, 30, "the caught-up run")
        time.sleep(1.5)
        assert [s for _, s in _scheduled_tasks(home)] == [sid]
        shown = daemon.call("get_schedule", id=sid)
        assert (shown["state"], shown["runs"], shown["missed_runs"]) == ("done", 1, 1)
        assert [(h["outcome"], h["missed"]) for h in shown["history"]] == [("caught_up", 1)]
    finally:
        daemon.kill_if_running()


def test_kill_9_while_schedules_fire_runs_each_exactly_once(home: Home) -> None:
    """Schedules coming due one after another while the daemon is killed among them:
    after restart each has run exactly once (its task, its record), none twice."""
    daemon = Daemon(home).start()
    start = time.time() + 3.0
    ids = []
    with daemon.client() as conn:
        for i in range(12):
            at = datetime.fromtimestamp(start + i * 0.1, UTC).isoformat(timespec="milliseconds")
            ids.append(conn.call_tool("submit_task", {"text": f"Say {i}", "at": at})["id"])
    time.sleep(max(start + 0.6 - time.time(), 0))  # about half of them have fired
    daemon.kill9()
    daemon.start()
    try:

        def all_done() -> bool:
            return _db_rows(home, "SELECT count(*) FROM schedules WHERE state = 'done'")[0][0] == 12

        _wait(all_done, 30, "every schedule's run")
        per_schedule = dict(
            _db_rows(
                home,
                "SELECT schedule_id, count(*) FROM tasks WHERE schedule_id IS NOT NULL "
                "GROUP BY schedule_id",
            )
        )
        records = dict(
            _db_rows(home, "SELECT schedule_id, count(*) FROM schedule_runs GROUP BY schedule_id")
        )
        assert per_schedule == dict.fromkeys(ids, 1)
        assert records == dict.fromkeys(ids, 1)
    finally:
        daemon.kill_if_running()
