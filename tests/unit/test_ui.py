"""The step timeline of the run page: each attempt of a step is its own bar."""

from __future__ import annotations

from control_plane.http.ui import gantt
from control_plane.model.runs import Event, Run
from control_plane.model.statuses import RunStatus


def run(status: RunStatus, end: float | None) -> Run:
    return Run("r", "job", "loc", status, {}, {}, create_time=0.0, start_time=1.0, end_time=end)


def event(seq: int, time: float, kind: str, step: str | None) -> Event:
    return Event(seq, time, kind, step, "")


def test_a_retried_step_has_a_bar_per_attempt() -> None:
    events = [
        event(1, 1.0, "RUN_START", None),
        event(2, 1.0, "STEP_REUSED", "extract"),
        event(3, 1.0, "STEP_START", "load"),
        event(4, 2.0, "STEP_UP_FOR_RETRY", "load"),
        event(5, 3.0, "STEP_RESTARTED", "load"),
        event(6, 5.0, "STEP_SUCCESS", "load"),
        event(7, 5.0, "STEP_START", "report"),
        event(8, 6.0, "STEP_FAILURE", "report"),
    ]
    chart = gantt(run(RunStatus.FAILURE, 6.0), events, now=100.0)
    assert chart["rows"] == ["extract", "load", "report"]
    bars = [(b.step, b.row, b.start, b.end, b.outcome) for b in chart["bars"]]
    assert bars == [
        ("extract", 0, 1.0, 1.0, "reused"),
        ("load", 1, 1.0, 2.0, "retry"),
        ("load", 1, 3.0, 5.0, "success"),
        ("report", 2, 5.0, 6.0, "failure"),
    ]
    # the axis spans the run's steps: 1 s .. 6 s drawn over 1000 units
    assert chart["span"] == 5.0
    assert [b.x for b in chart["bars"]] == [0.0, 0.0, 400.0, 800.0]
    assert [b.width for b in chart["bars"]] == [2.0, 200.0, 400.0, 200.0]


def test_an_unfinished_attempt_runs_to_now_or_fails_with_the_run() -> None:
    events = [event(1, 1.0, "STEP_START", "a")]
    (live,) = gantt(run(RunStatus.STARTED, None), events, now=4.0)["bars"]
    assert (live.end, live.outcome) == (4.0, "running")
    (ended,) = gantt(run(RunStatus.CANCELED, 2.5), events, now=4.0)["bars"]
    assert (ended.end, ended.outcome) == (2.5, "failure")
    assert gantt(run(RunStatus.QUEUED, None), [], now=4.0)["bars"] == []
