"""Schedule tick times: croniter over local wall-clock time, mapped to instants the way
Dagster does around daylight-saving changes.

croniter is run on naive local times (wall-clock arithmetic); each wall time is then
placed in the time zone:
- in a spring-forward gap (the wall time does not exist), a cron whose hour field is
  fixed runs once, at the end of the gap; an hourly cron (hour field with `*`) skips it;
- in a fall-back overlap (the wall time exists twice), a fixed-hour cron runs once, at
  the later instant; an hourly cron runs at both.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

_MAX_GAP = timedelta(hours=3)


def _is_hourly(cron: str) -> bool:
    return "*" in cron.split()[1]


def _exists(wall: datetime, tz: ZoneInfo) -> bool:
    """Whether a naive wall time exists in `tz` (not inside a spring-forward gap)."""
    aware = wall.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall


def _ambiguous(wall: datetime, tz: ZoneInfo) -> bool:
    return (
        wall.replace(tzinfo=tz, fold=0).utcoffset() != wall.replace(tzinfo=tz, fold=1).utcoffset()
    )


def _gap_end(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first wall time (whole minute) after `wall` that exists: the end of the gap."""
    probe = wall.replace(second=0, microsecond=0)
    while not _exists(probe, tz) and probe - wall < _MAX_GAP:
        probe += timedelta(minutes=1)
    return probe.replace(tzinfo=tz)


def _instants(wall: datetime, tz: ZoneInfo, hourly: bool) -> list[datetime]:
    if not _exists(wall, tz):
        return [] if hourly else [_gap_end(wall, tz)]
    if _ambiguous(wall, tz):
        later = wall.replace(tzinfo=tz, fold=1)
        return [wall.replace(tzinfo=tz, fold=0), later] if hourly else [later]
    return [wall.replace(tzinfo=tz)]


def ticks_after(cron: str, timezone: str, after: float) -> Iterator[float]:
    """Tick instants (Unix seconds) strictly after `after`, in order, forever."""
    tz = ZoneInfo(timezone)
    hourly = _is_hourly(cron)
    start = datetime.fromtimestamp(after, UTC).astimezone(tz).replace(tzinfo=None)
    walls = croniter(cron, start - timedelta(hours=3))  # wide enough to see a fold again
    last = after
    while True:
        wall = walls.get_next(datetime)
        for instant in _instants(wall, tz, hourly):
            ts = instant.timestamp()
            if ts > last:
                last = ts
                yield ts


def next_tick(cron: str, timezone: str, after: float) -> float:
    return next(ticks_after(cron, timezone, after))


def due_ticks(cron: str, timezone: str, last: float, now: float, catchup: int) -> list[float]:
    """The ticks to run now, oldest first: those in (last, now]; after downtime only the
    latest one, or the latest `catchup` of them. Walks back from `now`, so a long outage
    costs no more than the ticks it keeps."""
    tz = ZoneInfo(timezone)
    hourly = _is_hourly(cron)
    keep = max(catchup, 1)
    end = datetime.fromtimestamp(now, UTC).astimezone(tz).replace(tzinfo=None)
    walls = croniter(cron, end + timedelta(hours=3))
    found: set[float] = set()
    while len(found) < keep:
        wall = walls.get_prev(datetime)
        instants = sorted((i.timestamp() for i in _instants(wall, tz, hourly)), reverse=True)
        for ts in instants:
            if ts <= last:
                return sorted(found)
            if ts <= now:
                found.add(ts)
    return sorted(found)[-keep:]
