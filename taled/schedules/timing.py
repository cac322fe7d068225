"""When a schedule runs: reading ``--at`` and ``--every``, and the next time after another.

``--at`` is one time: ``07:00`` (its next occurrence), ``today 07:00``, ``tomorrow
07:00``, ``in 20m``, or an ISO 8601 date and time (``2026-12-02T07:00``, with or
without an offset; without one it is local). ``--every`` is a 5-field cron expression
(croniter reads it) or a readable form, translated to cron here:

    hourly, every hour          0 * * * *
    every minute                * * * * *
    every 15m, every 15 minutes */15 * * * *   (a divisor of 60)
    every 2h, every 2 hours     0 */2 * * *    (a divisor of 24)
    daily                       0 0 * * *
    daily 07:00, 07:00          0 7 * * *
    mon-fri 08:30, weekdays 08:30, every monday at 9:00, sat,sun 10:00, weekends 10:00
    @hourly @daily @weekly @monthly @yearly

Times are wall-clock times in the schedule's zone (an IANA name, computed with
zoneinfo). Where the clocks change: a wall time the clocks skip (spring) runs at the
moment after the skip, shifted by the gap; a wall time that happens twice (autumn)
runs once, at its first occurrence — except in schedules whose hour field is ``*`` or
``*/N`` (every hour or more often), which run in both, as cron does.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from taled.errors import InvalidInput

__all__ = [
    "EVERY_HELP",
    "Zone",
    "count_between",
    "format_local",
    "local_zone",
    "next_after",
    "read_at",
    "read_every",
    "zone_named",
    "zone_or_utc",
]

EVERY_HELP = (
    "a 5-field cron expression (minute hour day-of-month month day-of-week, e.g. "
    "'30 8 * * 1-5') or a readable form: 'mon-fri 08:30', 'daily 07:00', 'hourly', "
    "'every 2h', 'every 15m'"
)
AT_HELP = (
    "a time ('07:00', its next occurrence), 'today 07:00', 'tomorrow 07:00', 'in 20m', "
    "or an ISO 8601 date and time ('2026-12-02T07:00', optionally with an offset such "
    "as +01:00 or Z)"
)

# The longest the scheduler looks ahead: an --at further away is refused, and so is a
# cron expression that never matches in as many years.
_MAX_YEARS = 10
# Clocks change by at most this much (two hours, in a few zones' history): the span
# around a change that the careful search covers.
_SHIFT = timedelta(hours=3)


@dataclass(frozen=True)
class Zone:
    """A time zone with the name it is stored under."""

    name: str
    """An IANA key (``Europe/Berlin``), or ``localtime`` for the system's zone file
    when it has no key."""
    info: ZoneInfo


@cache
def _system_file_zone() -> ZoneInfo:
    with open("/etc/localtime", "rb") as f:
        return ZoneInfo.from_file(f, key="localtime")


def zone_named(name: str) -> Zone:
    """The zone ``name``; InvalidInput naming it when it is no IANA zone."""
    clean = name.strip()
    if clean == "localtime":
        try:
            return Zone(clean, _system_file_zone())
        except (OSError, ValueError):
            return Zone("UTC", ZoneInfo("UTC"))
    try:
        return Zone(clean, ZoneInfo(clean))
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(
            f"timezone {name!r} is not an IANA time zone name (such as Europe/Berlin, "
            "America/New_York or UTC)"
        ) from None


def zone_or_utc(name: str) -> Zone:
    """The zone ``name``, or UTC when it names none (a stored zone the system no longer
    knows: shown in UTC rather than not at all)."""
    try:
        return zone_named(name)
    except InvalidInput:
        return Zone("UTC", ZoneInfo("UTC"))


def local_zone() -> Zone:
    """The daemon's local zone: ``$TZ`` when it names an IANA zone, else the system's
    (``/etc/localtime``), else UTC."""
    tz = os.environ.get("TZ", "").lstrip(":").strip()
    if tz:
        try:
            return zone_named(tz)
        except InvalidInput:
            pass  # a POSIX TZ rule ("CET-1CEST,..."): the system's zone file is the best guess
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        target = ""
    if "zoneinfo/" in target:
        try:
            return zone_named(target.split("zoneinfo/", 1)[1])
        except InvalidInput:
            pass
    try:
        key = Path("/etc/timezone").read_text(encoding="utf-8").strip()
    except OSError:
        key = ""
    if key:
        try:
            return zone_named(key)
        except InvalidInput:
            pass
    return zone_named("localtime") if Path("/etc/localtime").exists() else zone_named("UTC")


def format_local(ts: float, zone: Zone) -> str:
    """``2026-12-02 07:00:00 CET`` in ``zone``."""
    return datetime.fromtimestamp(ts, zone.info).strftime("%Y-%m-%d %H:%M:%S %Z")


# -- --at ----------------------------------------------------------------------

_CLOCK = r"(?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2}))?"
_AT_CLOCK = re.compile(rf"^(?:(?P<day>today|tomorrow)\s+)?(?:at\s+)?{_CLOCK}$")
_IN = re.compile(r"^in\s+(?P<n>\d+)\s*(?P<unit>[a-z]+)$")
_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _clock(h: str, m: str, s: str | None, what: str) -> tuple[int, int, int]:
    hour, minute, second = int(h), int(m), int(s or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise InvalidInput(f"{what}: {h}:{m} is not a time of day (00:00 to 23:59)")
    return hour, minute, second


def _wall(naive: datetime, zone: Zone) -> float:
    """A wall time in ``zone`` as a UTC epoch: its first occurrence when it happens
    twice, the moment after the skip (shifted by the gap) when the clocks skip it."""
    return naive.replace(tzinfo=zone.info, fold=0).timestamp()


def read_at(text: str, now: float, zone: Zone) -> float:
    """The UTC epoch ``--at`` means, strictly after ``now``; InvalidInput saying what is
    wrong (unreadable, or in the past)."""
    given = " ".join(text.split())
    spec = given.lower()
    if not spec:
        raise InvalidInput(f"at: give a time: {AT_HELP}")
    local_now = datetime.fromtimestamp(now, zone.info).replace(tzinfo=None)
    if m := _IN.match(spec):
        unit = _UNITS.get(m["unit"])
        if unit is None:
            raise InvalidInput(
                f"at {given!r}: {m['unit']!r} is not a unit; use s, m, h or d (in 20m, in 2h)"
            )
        seconds = int(m["n"]) * unit
        if seconds <= 0:
            raise InvalidInput(f"at {given!r} is now, not later; give a time in the future")
        if seconds > _MAX_YEARS * 366 * 86400:
            raise InvalidInput(f"at {given!r} is more than {_MAX_YEARS} years away")
        return now + seconds
    if m := _AT_CLOCK.match(spec):
        hour, minute, second = _clock(m["h"], m["m"], m["s"], f"at {given!r}")
        day = local_now.date() + timedelta(days=1 if m["day"] == "tomorrow" else 0)
        when = _wall(datetime(day.year, day.month, day.day, hour, minute, second), zone)
        if when > now:
            return when
        if m["day"] == "today":
            raise InvalidInput(
                f"at {given!r} is in the past: it is {format_local(now, zone)} now "
                f"(timezone {zone.name}); say tomorrow {m['h']}:{m['m']}, or just "
                f"{m['h']}:{m['m']} for its next occurrence"
            )
        if m["day"] is None:
            day += timedelta(days=1)
            return _wall(datetime(day.year, day.month, day.day, hour, minute, second), zone)
        raise InvalidInput(f"at {given!r} is in the past")
    if _DATE_ONLY.match(spec):
        raise InvalidInput(f"at {given!r} is a date; give a time too, e.g. {given}T09:00")
    try:
        parsed = datetime.fromisoformat(given.upper())
    except ValueError:
        raise InvalidInput(f"at: cannot read {given!r}; give {AT_HELP}") from None
    when = _wall(parsed, zone) if parsed.tzinfo is None else parsed.timestamp()
    if when <= now:
        raise InvalidInput(
            f"at {given!r} is in the past ({format_local(when, zone)}; it is "
            f"{format_local(now, zone)} now, timezone {zone.name})"
        )
    if when - now > _MAX_YEARS * 366 * 86400:
        raise InvalidInput(f"at {given!r} is more than {_MAX_YEARS} years away")
    return when


# -- --every -------------------------------------------------------------------

_DAY_NUMBERS = {
    "sun": 0,
    "mon": 1,
    "tue": 2,
    "wed": 3,
    "thu": 4,
    "fri": 5,
    "sat": 6,
}
_DAY_NAMES = {
    **_DAY_NUMBERS,
    "sunday": 0,
    "monday": 1,
    "tuesday": 2,
    "tues": 2,
    "wednesday": 3,
    "thursday": 4,
    "thur": 4,
    "thurs": 4,
    "friday": 5,
    "saturday": 6,
    "mondays": 1,
    "tuesdays": 2,
    "wednesdays": 3,
    "thursdays": 4,
    "fridays": 5,
    "saturdays": 6,
    "sundays": 0,
}
_DAY_SETS = {
    "daily": frozenset(range(7)),
    "day": frozenset(range(7)),
    "weekdays": frozenset(range(1, 6)),
    "weekday": frozenset(range(1, 6)),
    "weekends": frozenset({0, 6}),
    "weekend": frozenset({0, 6}),
}
_NAMED_CRON = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "hourly": "0 * * * *",
    "every hour": "0 * * * *",
    "every minute": "* * * * *",
    "daily": "0 0 * * *",
    "every day": "0 0 * * *",
}
_INTERVAL = re.compile(r"^every\s+(?P<n>\d+)\s*(?P<unit>[a-z]+)$")
_DAYS_AT = re.compile(rf"^(?:every\s+)?(?:(?P<days>[a-z,\- ]+?)\s+)?(?:at\s+)?{_CLOCK}$")
_CRON_FIELDS = 5


def _interval(n: int, unit: str, given: str) -> str:
    seconds = _UNITS.get(unit)
    if seconds == 60:
        if n in (1, 60) or (n > 0 and 60 % n == 0):
            return "* * * * *" if n == 1 else ("0 * * * *" if n == 60 else f"*/{n} * * * *")
        divisors = "1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30"
        raise InvalidInput(
            f"every {given!r}: {n} minutes does not divide an hour, so cron cannot say it; "
            f"use one of {divisors} minutes, or a cron expression"
        )
    if seconds == 3600:
        if n in (1, 24) or (n > 0 and 24 % n == 0):
            return "0 * * * *" if n == 1 else ("0 0 * * *" if n == 24 else f"0 */{n} * * *")
        raise InvalidInput(
            f"every {given!r}: {n} hours does not divide a day, so cron cannot say it; "
            "use one of 1, 2, 3, 4, 6, 8, 12 hours, or a cron expression"
        )
    if seconds == 86400:
        if n == 1:
            return "0 0 * * *"
        raise InvalidInput(
            f"every {given!r}: days do not divide a month evenly, so cron cannot say it; "
            f"use a cron expression such as '0 9 */{n} * *' (days 1, {1 + n}, {1 + 2 * n}... "
            "of each month)"
        )
    raise InvalidInput(
        f"every {given!r}: {unit!r} is not a unit here; use m or h (every 15m, every 2h), "
        "or a cron expression"
    )


def _days(spec: str, given: str) -> frozenset[int]:
    found: set[int] = set()
    for item in (p.strip() for p in spec.replace(" and ", ",").split(",")):
        if not item:
            continue
        if item in _DAY_SETS:
            found |= _DAY_SETS[item]
            continue
        if "-" in item:
            first, _, last = (p.strip() for p in item.partition("-"))
            for name in (first, last):
                if name not in _DAY_NAMES:
                    raise InvalidInput(f"every {given!r}: {name!r} is not a day (mon..sun)")
            day = _DAY_NAMES[first]
            while True:
                found.add(day)
                if day == _DAY_NAMES[last]:
                    break
                day = (day + 1) % 7
            continue
        if item not in _DAY_NAMES:
            raise InvalidInput(
                f"every {given!r}: {item!r} is not a day (mon..sun, weekdays, weekends, daily)"
            )
        found.add(_DAY_NAMES[item])
    if not found:
        raise InvalidInput(f"every {given!r}: name the days, e.g. mon-fri")
    return frozenset(found)


def _day_field(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "*"
    ordered = sorted(days)
    parts: list[str] = []
    run = [ordered[0]]
    for day in ordered[1:]:
        if day == run[-1] + 1:
            run.append(day)
            continue
        parts.append(_run_text(run))
        run = [day]
    parts.append(_run_text(run))
    return ",".join(parts)


def _run_text(run: list[int]) -> str:
    if len(run) >= 3:
        return f"{run[0]}-{run[-1]}"
    return ",".join(str(d) for d in run)


def _check_cron(cron: str, given: str) -> str:
    fields = cron.split()
    if len(fields) != _CRON_FIELDS:
        raise InvalidInput(
            f"every {given!r}: a cron expression has {_CRON_FIELDS} fields (minute hour "
            f"day-of-month month day-of-week), this has {len(fields)}; or give "
            "a readable form: 'mon-fri 08:30', 'daily 07:00', 'hourly', 'every 2h', 'every 15m'"
        )
    try:
        it = croniter(cron, datetime(2000, 1, 1), max_years_between_matches=_MAX_YEARS)
        it.get_next(datetime)
    except CroniterError as exc:
        reason = str(exc).replace(f"[{cron}] ", "").removeprefix("is not acceptable, ")
        if "failed to find next date" in reason:
            reason = f"it never matches a date in {_MAX_YEARS} years"
        raise InvalidInput(
            f"every {given!r} is not a valid cron expression: {reason} (minute 0-59, hour "
            "0-23, day-of-month 1-31, month 1-12, day-of-week 0-6 or sun-sat)"
        ) from None
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"every {given!r} is not a valid cron expression: {exc}") from None
    return " ".join(fields)


def read_every(text: str) -> str:
    """The 5-field cron expression ``--every`` means; InvalidInput saying what is wrong."""
    given = " ".join(text.split())
    spec = given.lower()
    if not spec:
        raise InvalidInput(f"every: give {EVERY_HELP}")
    if spec in _NAMED_CRON:
        return _NAMED_CRON[spec]
    if spec.startswith("@"):
        raise InvalidInput(
            f"every {given!r}: unknown shorthand; one of {', '.join(sorted(_NAMED_CRON)[:7])}"
        )
    if m := _INTERVAL.match(spec):
        return _interval(int(m["n"]), m["unit"], given)
    if m := _DAYS_AT.match(spec):
        hour, minute, second = _clock(m["h"], m["m"], m["s"], f"every {given!r}")
        if second:
            raise InvalidInput(f"every {given!r}: schedules run on whole minutes; drop :{second}")
        days = _days(m["days"], given) if m["days"] else frozenset(range(7))
        return f"{minute} {hour} * * {_day_field(days)}"
    if len(spec.split()) == _CRON_FIELDS or not re.search(r"[a-z]{4,}", spec):
        return _check_cron(given, given)
    named = spec.removeprefix("every ").removesuffix(" at")
    try:
        _days(named, given)
    except InvalidInput:
        pass
    else:
        raise InvalidInput(f"every {given!r}: give a time of day too, e.g. '{named} 09:00'")
    raise InvalidInput(f"every: cannot read {given!r}; give {EVERY_HELP}")


# -- the next time -----------------------------------------------------------------


def _instants(naive: datetime, zone: Zone, both_folds: bool) -> tuple[float, ...]:
    first = naive.replace(tzinfo=zone.info, fold=0).timestamp()
    if not both_folds:
        return (first,)
    second = naive.replace(tzinfo=zone.info, fold=1).timestamp()
    if second == first:
        return (first,)
    # Two readings of one wall time: the clocks skip it (neither reads back as it) or
    # it happens twice (both do); only the second kind runs twice.
    back = datetime.fromtimestamp(second, zone.info).replace(tzinfo=None)
    return (first, second) if back == naive else (first,)


def _offset(ts: float, zone: Zone) -> timedelta | None:
    return datetime.fromtimestamp(ts, zone.info).utcoffset()


def next_after(cron: str, zone: Zone, after: float) -> float:
    """The first time ``cron`` names in ``zone`` strictly after ``after`` (UTC epochs).

    InvalidInput when it names none in the next years (a date such as 30 February).
    """
    both = cron.split()[1].startswith("*")
    local = datetime.fromtimestamp(after, zone.info).replace(tzinfo=None)
    span = _SHIFT.total_seconds()
    try:
        calm = _offset(after - span, zone) == _offset(after + span, zone)
        if calm:
            # No clock change near ``after``: the next wall time is the answer unless
            # it is itself skipped or repeated.
            it = croniter(cron, local, max_years_between_matches=_MAX_YEARS)
            naive = it.get_next(datetime)
            found = _instants(naive, zone, True)
            back = datetime.fromtimestamp(found[0], zone.info).replace(tzinfo=None)
            if len(found) == 1 and back == naive and found[0] > after:
                return found[0]
        return _careful_next(cron, zone, after, local, both)
    except CroniterError:
        raise InvalidInput(
            f"cron {cron!r} names no time in the next {_MAX_YEARS} years after "
            f"{format_local(after, zone)}"
        ) from None


def _careful_next(cron: str, zone: Zone, after: float, local: datetime, both: bool) -> float:
    """``next_after`` near a clock change: wall times from a little before ``after``,
    each read as the instants it stands for, the earliest after ``after`` kept."""
    it = croniter(cron, local - _SHIFT, max_years_between_matches=_MAX_YEARS)
    best = math.inf
    for _ in range(100_000):
        naive = it.get_next(datetime)
        for t in _instants(naive, zone, both):
            if after < t < best:
                best = t
        # No later wall time can read as an instant earlier than this one's minus a shift.
        if best < math.inf and _wall(naive, zone) - _SHIFT.total_seconds() > best:
            break
    if best == math.inf:
        raise CroniterError("no match")
    return best


def count_between(cron: str, zone: Zone, start: float, end: float, cap: int) -> int:
    """How many times ``cron`` names in (start, end], counted up to ``cap``."""
    n = 0
    t = start
    while n < cap:
        t = next_after(cron, zone, t)
        if t > end:
            break
        n += 1
    return n
