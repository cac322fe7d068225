"""Values as a person reads them: times in local time, counts with their noun.

The daemon speaks UTC ISO 8601 on the wire (``2026-12-06T07:56:55.123Z``) and ``--json``
passes that on unchanged. Everything printed for a person is in this machine's local
time, so `tale status`, `tale checkpoints`, `tale schedules` and the TUI agree with each
other and with the clock on the wall.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

__all__ = ["clock", "clocks", "count", "local_day", "local_moment", "parse"]


def parse(stamp: str | None) -> datetime | None:
    """An ISO time from the daemon as an aware datetime, or None when there is none or it
    does not read as one (a naive time is the daemon's UTC)."""
    if not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def clock(stamp: str | None, today: date | None = None) -> str:
    """Local ``HH:MM:SS``, with the date in front when it is not ``today`` (this machine's
    date unless given); the stamp as it came when it is not a time, "-" when empty."""
    moment = parse(stamp)
    if moment is None:
        return stamp or "-"
    here = moment.astimezone()
    if here.date() == (today or datetime.now().astimezone().date()):
        return here.strftime("%H:%M:%S")
    return here.strftime("%Y-%m-%d %H:%M:%S")


def clocks(stamps: list[str | None], header: str = "") -> list[str]:
    """``clock`` of each stamp, padded to one width (``header``'s at least) so a table's
    column stays straight when some times are dated and others are not."""
    shown = [clock(stamp) for stamp in stamps]
    width = max([len(header), *map(len, shown)])
    return [text.ljust(width) for text in shown]


def local_moment(stamp: str | None) -> str:
    """Local date, time to the second and zone: ``2026-12-06 08:56:55 CET``."""
    return _local(stamp, "%Y-%m-%d %H:%M:%S %Z")


def local_day(stamp: str | None) -> str:
    """Local weekday, date, minute and zone, for what is planned: ``Sun 2026-12-06 08:56
    CET``."""
    return _local(stamp, "%a %Y-%m-%d %H:%M %Z")


def _local(stamp: str | None, layout: str) -> str:
    """``stamp`` in local time laid out as ``layout``; as it came when it is not a time,
    "-" when empty."""
    moment = parse(stamp)
    if moment is None:
        return stamp or "-"
    return moment.astimezone().strftime(layout)


def count(value: int | None, one: str, many: str) -> str:
    """``value`` and the noun that goes with it: "1 task", "5 retries", "1,204 tasks";
    "-" and the plural when it is unknown."""
    shown = "-" if value is None else f"{value:,}"
    return f"{shown} {one if value == 1 else many}"
