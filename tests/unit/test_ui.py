"""Pure parts of the UI: the run page's step timeline (each attempt of a step is its
own bar) and step table, and the job page's op-graph layout."""

from __future__ import annotations

from control_plane.http.ui import gantt
from control_plane.http.ui.graph import layout, op_depths
from control_plane.http.ui.render import when_ms
from control_plane.http.ui.steps import step_rows
from control_plane.model.runs import Event, Run
from control_plane.model.statuses import RunStatus
from protocol.messages import OpInfo


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
    assert (ended.end, ended.outcome) == (2.5, "canceled")
    (crashed,) = gantt(run(RunStatus.FAILURE, 2.5), events, now=4.0)["bars"]
    assert (crashed.end, crashed.outcome) == (2.5, "failure")
    assert gantt(run(RunStatus.QUEUED, None), [], now=4.0)["bars"] == []


def test_the_step_table_lists_every_step_of_the_job() -> None:
    events = [
        event(1, 1.0, "STEP_REUSED", "extract"),
        event(2, 1.0, "STEP_START", "load"),
        event(3, 2.0, "STEP_UP_FOR_RETRY", "load"),
        event(4, 3.0, "STEP_RESTARTED", "load"),
        event(5, 5.5, "STEP_SUCCESS", "load"),
        event(6, 5.5, "STEP_START", "report"),
    ]
    rows = step_rows(["extract", "load", "report", "publish"], run(RunStatus.STARTED, None), events)
    table = [(r.step, r.status, r.attempts, r.start, r.end, r.duration(9.0)) for r in rows]
    assert table == [
        ("extract", "reused", 0, 1.0, 1.0, 0.0),
        ("load", "success", 2, 1.0, 5.5, 4.5),
        ("report", "running", 1, 5.5, None, 3.5),
        ("publish", "not started", 0, None, None, None),
    ]


def test_a_step_interrupted_by_a_cancel_is_canceled_not_failed() -> None:
    events = [event(1, 1.0, "STEP_START", "wait"), event(2, 2.0, "STEP_UP_FOR_RETRY", "retried")]
    canceled = step_rows(["wait", "retried", "later"], run(RunStatus.CANCELED, 4.0), events)
    assert [(r.status, r.end) for r in canceled] == [
        ("canceled", 4.0),
        ("canceled", 4.0),
        ("not started", None),
    ]
    failed = step_rows(["wait"], run(RunStatus.FAILURE, 4.0), events[:1])
    assert [r.status for r in failed] == ["failure"]


def test_steps_only_the_events_name_come_after_the_jobs() -> None:
    rows = step_rows(["a"], run(RunStatus.STARTED, None), [event(1, 1.0, "STEP_START", "old")])
    assert [(r.step, r.status) for r in rows] == [("a", "not started"), ("old", "running")]


def test_ops_are_drawn_in_columns_by_upstream_depth() -> None:
    ops = [
        OpInfo("extract"),
        OpInfo("clean", ["extract"]),
        OpInfo("lookup"),
        OpInfo("join", ["clean", "lookup"]),
        OpInfo("report", ["join", "extract"], {"team": "data"}),
    ]
    assert op_depths(ops) == {"extract": 0, "clean": 1, "lookup": 0, "join": 2, "report": 3}
    graph = layout(ops)
    assert [(n.name, n.column, n.row) for n in graph.nodes] == [
        ("extract", 0, 0),
        ("clean", 1, 0),
        ("lookup", 0, 1),
        ("join", 2, 0),
        ("report", 3, 0),
    ]
    assert [(e.source, e.target) for e in graph.edges] == [
        ("extract", "clean"),
        ("clean", "join"),
        ("lookup", "join"),
        ("join", "report"),
        ("extract", "report"),
    ]
    assert graph.edges[0].path.startswith("M192,32 ")  # the right middle of extract's box
    assert (graph.width, graph.height) == (24 + 4 * 180 + 3 * 70, 24 + 2 * 40 + 18)


def test_a_cycle_or_an_unknown_upstream_does_not_hang_the_layout() -> None:
    ops = [OpInfo("a", ["b", "ghost"]), OpInfo("b", ["a"]), OpInfo("c", ["c"])]
    depths = op_depths(ops)
    assert set(depths) == {"a", "b", "c"} and depths["c"] == 0
    assert [(e.source, e.target) for e in layout(ops).edges] == [("b", "a"), ("a", "b")]
    assert layout([]).nodes == []


def test_times_to_the_millisecond() -> None:
    assert when_ms("2024-05-01T10:00:01.234567Z") == "2024-05-01 10:00:01.234"
    assert when_ms("2024-05-01T10:00:01Z") == "2024-05-01 10:00:01.000"
    assert when_ms(None) == ""
