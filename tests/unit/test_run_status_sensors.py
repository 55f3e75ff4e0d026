"""Which run-status changes a run status sensor is evaluated for (`watched_changes`), and
what the control plane accepts of one as an agent describes it."""

from __future__ import annotations

from control_plane.daemon.sensors import CHANGES_BYTES_PER_TICK, watched_changes
from control_plane.model.runs import Run, StatusChange
from control_plane.model.statuses import RunStatus
from protocol.messages import CodeLocationInfo, SensorInfo
from protocol.validation import location_problem

FAILURE = RunStatus.FAILURE


def change(number: int, job: str = "etl", location: str = "loc", **tags: str) -> tuple:
    run = Run(f"r{number}", job, location, FAILURE, dict(tags), {}, create_time=0.0)
    return StatusChange(number, run.run_id, FAILURE, float(number)), run


def test_by_default_a_sensor_watches_every_job_of_its_own_location() -> None:
    sensor = SensorInfo("s", "", run_status="FAILURE")
    read = [change(1), change(2, job="other"), change(3, location="elsewhere")]
    watched, position = watched_changes(sensor, "loc", read)
    assert [c.id for c, _ in watched] == [1, 2] and position == 3


def test_monitored_jobs_and_all_locations() -> None:
    read = [change(1), change(2, job="other"), change(3, location="elsewhere")]
    only_etl = SensorInfo("s", "", run_status="FAILURE", monitored_jobs=["etl"])
    assert [c.id for c, _ in watched_changes(only_etl, "loc", read)[0]] == [1]
    everywhere = SensorInfo("s", "", run_status="FAILURE", monitor_all_locations=True)
    assert [c.id for c, _ in watched_changes(everywhere, "loc", read)[0]] == [1, 2, 3]
    nothing, position = watched_changes(only_etl, "loc", read[1:])
    assert nothing == [] and position == 3  # passed over: the cursor moves past them


def test_one_tick_carries_at_most_about_a_megabyte_and_stops_before_the_rest() -> None:
    big = "x" * 400_000
    read = [change(n, payload=big) for n in range(1, 6)]
    watched, position = watched_changes(SensorInfo("s", "", run_status="FAILURE"), "loc", read)
    assert 1 <= len(watched) < 5 and position == watched[-1][0].id
    assert sum(len(r.tags["payload"]) for _, r in watched) <= CHANGES_BYTES_PER_TICK


def test_what_an_agent_may_describe() -> None:
    def problem(**fields: object) -> str | None:
        sensor = SensorInfo("s", **fields)  # type: ignore[arg-type]
        return location_problem(CodeLocationInfo("loc", sensors=[sensor]))

    assert problem(job="", run_status="FAILURE") is None
    assert "sensor 's' job must match" in (problem(job="") or "")
    assert "run_status must be one of" in (problem(job="j", run_status="DONE") or "")
    assert "monitored_jobs 'a b' must match" in (
        problem(job="j", run_status="SUCCESS", monitored_jobs=["a b"]) or ""
    )
