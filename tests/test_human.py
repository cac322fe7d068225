"""Times and counts as the client prints them for a person (``tale_client.human``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tale_client.human import clock, clocks, count, local_day, local_moment, parse

# 2026-12-06 04:58:21 UTC is 10:28:21 the same day in India (the tests' zone, UTC+05:30).
STAMP = "2026-12-06T04:58:21.250Z"


def test_a_time_today_is_shown_as_the_local_time_of_day(local_zone: None) -> None:
    assert clock(STAMP, today=date(2026, 12, 6)) == "10:28:21"


def test_a_time_on_another_day_is_shown_with_its_local_date(local_zone: None) -> None:
    assert clock(STAMP, today=date(2026, 12, 7)) == "2026-12-06 10:28:21"


def test_the_day_is_the_local_one_not_utcs(local_zone: None) -> None:
    """20:00 UTC on the 5th is already the 6th in India: shown as today's 01:30."""
    assert clock("2026-12-05T20:00:00Z", today=date(2026, 12, 6)) == "01:30:00"


def test_a_moment_has_date_seconds_and_zone(local_zone: None) -> None:
    assert local_moment(STAMP) == "2026-12-06 10:28:21 IST"


def test_a_planned_time_has_weekday_minute_and_zone(local_zone: None) -> None:
    assert local_day(STAMP) == "Sun 2026-12-06 10:28 IST"


@pytest.mark.parametrize("shown", [clock, local_moment, local_day])
def test_what_is_not_a_time_is_shown_as_it_came_and_nothing_as_a_dash(
    shown: Callable[[str | None], str],
) -> None:
    assert shown("soon") == "soon"
    assert shown(None) == "-"
    assert shown("") == "-"


def test_a_time_without_a_zone_is_the_daemons_utc() -> None:
    assert parse("2026-12-06T04:58:21") == datetime(2026, 12, 6, 4, 58, 21, tzinfo=UTC)


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
    )
)
def test_every_iso_time_the_daemon_writes_is_read_back_as_the_same_moment(
    moment: datetime,
) -> None:
    """The daemon writes ``...Z`` or ``+00:00``; either reads back to the instant."""
    utc = moment.astimezone(UTC)
    assert parse(utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")) == utc.replace(
        microsecond=utc.microsecond // 1000 * 1000
    )
    assert parse(moment.isoformat()) == moment


@pytest.mark.parametrize(
    ("value", "said"),
    [(0, "0 tasks"), (1, "1 task"), (2, "2 tasks"), (1204, "1,204 tasks"), (None, "- tasks")],
)
def test_a_count_takes_the_noun_that_goes_with_it(value: int | None, said: str) -> None:
    assert count(value, "task", "tasks") == said


def test_a_column_of_times_is_one_width_when_some_are_dated(local_zone: None) -> None:
    """Dated and undated times, and a header, padded to the widest of them."""
    today = datetime.now().astimezone().replace(hour=12, minute=0, second=0)
    stamps = [today.isoformat(), (today - timedelta(days=2)).isoformat()]
    shown = clocks(stamps, header="TIME")
    assert [s.rstrip() for s in shown] == [clock(stamps[0]), clock(stamps[1])]
    assert len(shown[0]) == len(shown[1]) == len("YYYY-MM-DD HH:MM:SS")
    assert clocks([today.isoformat()], header="A LONGER HEADER") == [
        clock(today.isoformat()).ljust(len("A LONGER HEADER"))
    ]
