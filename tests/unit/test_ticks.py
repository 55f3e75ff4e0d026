"""Schedule ticks around daylight-saving changes, catch-up, as pure functions of time."""

from __future__ import annotations

from datetime import datetime
from itertools import islice
from zoneinfo import ZoneInfo

import pytest

from control_plane.daemon.ticks import due_ticks, ticks_after


def local(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).strftime("%m-%d %H:%M %Z")


def ticks(cron: str, tz: str, start: str, count: int) -> list[str]:
    after = datetime.fromisoformat(start).replace(tzinfo=ZoneInfo(tz)).timestamp()
    return [local(ts, tz) for ts in islice(ticks_after(cron, tz, after), count)]


BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


@pytest.mark.parametrize(("tz", "day"), [(BERLIN, "2026-03-27"), (NEW_YORK, "2026-03-06")])
def test_spring_forward_daily_runs_once_at_the_end_of_the_gap(tz: str, day: str) -> None:
    times = [t.split()[1] for t in ticks("30 2 * * *", tz, f"{day} 12:00", 3)]
    assert times == ["02:30", "03:00", "02:30"]  # 02:30 does not exist: once, at the gap's end


@pytest.mark.parametrize(("tz", "day"), [(BERLIN, "2026-03-29"), (NEW_YORK, "2026-03-08")])
def test_spring_forward_hourly_skips_the_missing_hour(tz: str, day: str) -> None:
    hours = [t.split()[1] for t in ticks("0 * * * *", tz, f"{day} 00:30", 3)]
    assert hours == ["01:00", "03:00", "04:00"]


def test_spring_forward_several_ticks_in_the_gap_run_once() -> None:
    got = ticks("*/15 2 * * *", BERLIN, "2026-03-29 00:00", 2)
    assert got == ["03-29 03:00 CEST", "03-30 02:00 CEST"]


FALL_BACK = [(BERLIN, "2026-10-25", "02"), (NEW_YORK, "2026-11-01", "01")]


@pytest.mark.parametrize(("tz", "day", "hour"), FALL_BACK)
def test_fall_back_daily_runs_once_at_the_later_instant(tz: str, day: str, hour: str) -> None:
    (tick,) = ticks(f"30 {hour} * * *", tz, f"{day} 00:00", 1)
    standard = "CET" if tz == BERLIN else "EST"
    assert tick.split()[1:] == [f"{hour}:30", standard]  # the second occurrence


@pytest.mark.parametrize(
    ("tz", "day", "hour", "zones"),
    [(BERLIN, "2026-10-25", "02", ("CEST", "CET")), (NEW_YORK, "2026-11-01", "01", ("EDT", "EST"))],
)
def test_fall_back_hourly_runs_for_both_hours(
    tz: str, day: str, hour: str, zones: tuple[str, str]
) -> None:
    got = ticks("0 * * * *", tz, f"{day} {int(hour) - 1:02d}:30", 3)
    assert [t.split()[1:] for t in got[:2]] == [[f"{hour}:00", zones[0]], [f"{hour}:00", zones[1]]]


def test_catch_up_after_downtime() -> None:
    tz = "UTC"
    start = datetime(2026, 11, 24, 10, 0, tzinfo=ZoneInfo(tz)).timestamp()
    now = start + 5 * 3600 + 60  # five hourly ticks missed
    assert [local(t, tz) for t in due_ticks("0 * * * *", tz, start, now, 0)] == ["11-24 15:00 UTC"]
    assert [local(t, tz) for t in due_ticks("0 * * * *", tz, start, now, 3)] == [
        "11-24 13:00 UTC",
        "11-24 14:00 UTC",
        "11-24 15:00 UTC",
    ]
    assert due_ticks("0 * * * *", tz, now, now + 10, 3) == []
    a_year_later = start + 365 * 86400  # walks back from now: cheap even then
    assert len(due_ticks("* * * * *", tz, start, a_year_later, 2)) == 2
