"""Schedules and sensors end to end: a real control plane (in a thread of this process, so
its clock can be shifted) and a real agent process evaluating the user code.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest

import control_plane.daemon.instigators
from control_plane.daemon.instigators import Instigator, Instigators
from tests.clocks import OffsetClock
from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    ThreadedControlPlane,
    http,
    start_agent,
    wait_for,
)

JOBS = {"daemon": FIXTURES / "daemon_jobs.py"}


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    clock = OffsetClock()
    cp = ThreadedControlPlane.start(tmp_path, clock)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    yield cp, agent, clock, inbox
    agent.stop()
    cp.stop()


def ticks(cp: ControlPlaneProc, kind: str, name: str) -> list[dict]:
    return cp.get(f"/api/v1/{kind}s/{name}/ticks")["ticks"]


def failed_tick(cp: ControlPlaneProc) -> dict | None:
    return next((t for t in ticks(cp, "sensor", "inbox") if t["status"] == "FAILURE"), None)


def cli(cp: ControlPlaneProc, *args: str) -> str:
    result = subprocess.run(
        [*FLEETRUN, "--url", cp.url, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_schedule_ticks_on_time_once_and_stops(fleet: tuple) -> None:
    cp, _agent, clock, _ = fleet
    # Given the control plane's clock 1.5 s before a minute boundary, the schedule (re)started
    clock.offset += (60 - clock.time() % 60) - 1.5
    boundary = (clock.time() // 60 + 1) * 60
    assert cli(cp, "schedules", "start", "every_minute").strip() == "every_minute RUNNING"
    # Then the every-minute schedule (RUNNING by default) ticks at the boundary
    tick = wait_for(
        lambda: next(
            (t for t in ticks(cp, "schedule", "every_minute") if t["status"] != "STARTED"), None
        ),
        timeout=60,
        what="the tick",
    )
    assert tick["status"] == "SUCCESS" and len(tick["run_ids"]) == 1, tick["error"]
    scheduled = datetime.fromisoformat(tick["scheduled_time"].replace("Z", "+00:00"))
    assert scheduled.timestamp() == boundary
    run = cp.wait_run(tick["run_ids"][0])
    assert run["status"] == "SUCCESS"
    assert run["tags"]["fleetrun/schedule"] == "every_minute"
    assert run["tags"]["fleetrun/tick"] == str(tick["tick_id"])
    assert run["tags"]["source"] == "cron" and run["tags"]["fleetrun/job"] == "noted"
    assert run["config"]["scheduled"].endswith("+01:00")  # aware, in Europe/Berlin
    # The list shows status and next ticks; stopping it stops the ticks
    listed = {s["name"]: s for s in cp.get("/api/v1/schedules")["schedules"]}
    assert listed["every_minute"]["status"] == "RUNNING"
    assert len(listed["every_minute"]["next_ticks"]) == 3
    assert listed["nightly"]["status"] == "STOPPED" and listed["nightly"]["next_ticks"] == []
    assert "every_minute" in cli(cp, "schedules", "list")
    assert cli(cp, "schedules", "stop", "every_minute").strip() == "every_minute STOPPED"
    clock.offset += 120  # two more minutes pass; wait for a scheduler pass after that
    wait_for(
        lambda: (
            (r := http("GET", f"{cp.url}/readyz"))[0] == 200
            and r[1]["loops"]["scheduler"]["seconds_since_beat"] < 5
        ),
        what="a scheduler pass",
    )
    assert len(ticks(cp, "schedule", "every_minute")) == 1
    code, body = http("POST", f"{cp.url}/api/v1/schedules/nope/start", {})
    assert (code, body["error"]["code"]) == (404, "unknown_schedule")


def test_a_sensor_requests_each_run_key_once_and_survives_its_own_failure(fleet: tuple) -> None:
    cp, _agent, _clock, inbox = fleet
    # Given a sensor that sees files in its inbox (evaluated every 0.3 s)
    wait_for(
        lambda: any(t["status"] == "SKIPPED" for t in ticks(cp, "sensor", "inbox")),
        what="a tick with no files",
    )
    (inbox / "file-a").touch()
    (inbox / "file-b").touch()

    def runs_by_key() -> dict[str, list[str]]:
        runs = cp.get("/api/v1/runs?tag=fleetrun/sensor:inbox&limit=100")["runs"]
        found: dict[str, list[str]] = {}
        for run in runs:
            found.setdefault(run["tags"]["fleetrun/run_key"], []).append(run["run_id"])
        return found

    wait_for(lambda: set(runs_by_key()) == {"file-a", "file-b"}, what="a run per file")
    # When more ticks see the same files, and then the sensor raises
    count = len(ticks(cp, "sensor", "inbox"))
    wait_for(lambda: len(ticks(cp, "sensor", "inbox")) >= count + 3, what="more ticks")
    (inbox / "boom").touch()
    failure = wait_for(lambda: failed_tick(cp), what="a failed tick")
    assert "the inbox sensor blew up" in failure["error"]
    (inbox / "boom").unlink()
    (inbox / "file-c").touch()
    # Then each file ran exactly once, the cursor moved only with good ticks
    wait_for(lambda: "file-c" in runs_by_key(), what="the run for file-c")
    assert {key: len(ids) for key, ids in runs_by_key().items()} == {
        "file-a": 1,
        "file-b": 1,
        "file-c": 1,
    }
    sensor = cp.get("/api/v1/sensors/inbox")
    assert sensor["cursor"] == "file-a,file-b,file-c" and sensor["status"] == "RUNNING"
    skipped = [t for t in ticks(cp, "sensor", "inbox") if t["status"] == "SKIPPED"]
    assert any("runs already requested" in (t["skip_reason"] or "") for t in skipped)
    assert "inbox" in cli(cp, "sensors", "list")


def test_no_agent_hosting_the_location_fails_the_tick_with_a_reason(
    fleet: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp, agent, _clock, _ = fleet
    monkeypatch.setattr(control_plane.daemon.instigators, "WAIT_FOR_AGENT_SECONDS", 1.0)
    monkeypatch.setattr(control_plane.daemon.instigators, "EVALUATION_TIMEOUT_SECONDS", 2.0)
    # The fixture's first tick was requested before the patch, with the 60 s timeout: an
    # agent stopped while evaluating it (its reply lost) would leave it waiting that out.
    wait_for(
        lambda: any(t["status"] != "STARTED" for t in ticks(cp, "sensor", "inbox")),
        what="the first sensor tick to end",
    )
    agent.stop()  # it drains first: the location has no live host
    reason = "no online agent hosting location daemon took the evaluation within 1 s"
    wait_for(
        lambda: any(t["error"] == reason for t in ticks(cp, "sensor", "inbox")),
        timeout=60,
        what="a tick that found no agent",
    )


def test_readiness_names_a_stuck_daemon_loop(fleet: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    cp, _agent, clock, _ = fleet
    status, body = http("GET", f"{cp.url}/readyz")
    assert status == 200 and {"scheduler", "sensors", "run-queue", "monitor", "retries"} <= set(
        body["loops"]
    )
    entered = threading.Event()

    load = Instigators.load

    async def hang(self: Instigators, now: float) -> list[Instigator]:
        if self.loop != "scheduler":
            return await load(self, now)
        entered.set()
        await asyncio.Event().wait()  # the scheduler's pass never returns
        return []

    monkeypatch.setattr(Instigators, "load", hang)
    assert cli(cp, "schedules", "start", "nightly")  # wakes the scheduler into `hang`
    assert entered.wait(30)
    clock.offset += 120  # two minutes later the scheduler still has not come back
    # Then, once the other loops have beaten again, readiness names only the stuck one
    expected = (
        503,
        {"error": {"code": "daemon_stale", "message": "daemon loops not running: scheduler"}},
    )
    wait_for(
        lambda: http("GET", f"{cp.url}/readyz") == expected,
        timeout=60,
        what="readyz to name the stuck scheduler",
    )


@pytest.fixture
def reactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """A control plane whose ticks are evaluated again twice, with the reaction fixtures."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    clock = OffsetClock()
    cp = ThreadedControlPlane.start(tmp_path, clock, "[daemon]\nmax_tick_retries = 2\n")
    agent = start_agent(cp, tmp_path, "a1", {"reactions": FIXTURES / "reaction_jobs.py"})
    yield cp, clock, inbox
    agent.stop()
    cp.stop()


def test_a_sensor_tick_with_a_bad_run_request_fails_whole(reactions: tuple) -> None:
    """Every request of a tick is checked as a submission is, before any run is made:
    a bad one fails the tick, creates nothing, and leaves the cursor where it was."""
    cp, _clock, inbox = reactions
    good = {"run_key": "k1", "run_config": {"n": 1}}
    cases = [
        ({"job_name": "no_such_job"}, "location reactions has no job 'no_such_job'"),
        ({"tags": {"fleetrun/priority": "high"}}, "tag fleetrun/priority must be an integer"),
        ({"tags": {"fleetrun/parent_run_id": "x"}}, "tag fleetrun/parent_run_id is set by"),
    ]
    assert cli(cp, "sensors", "start", "requests").strip() == "requests RUNNING"
    for index, (bad, reason) in enumerate(cases):
        (inbox / f"request-{index}.json").write_text(json.dumps([good, bad]))
        failed = wait_for(partial(failed_by, cp, reason), what=f"a tick failed by {reason!r}")
        assert failed[0]["status"] == "FAILURE" and failed[0]["run_ids"] == [], failed
        assert failed[0]["failure_count"] == 0  # a refused request is not evaluated again
        assert cp.get("/api/v1/runs?tag=fleetrun/sensor:requests")["runs"] == []
        assert cp.get("/api/v1/sensors/requests")["cursor"] is None
        (inbox / f"request-{index}.json").unlink()
    # A good request makes its run, tagged with its run key
    (inbox / "request-ok.json").write_text(json.dumps([good]))
    (run_id,) = wait_for(
        lambda: [r["run_id"] for r in cp.get("/api/v1/runs?tag=fleetrun/sensor:requests")["runs"]],
        what="the good request's run",
    )
    run = cp.wait_run(run_id)
    assert run["tags"]["fleetrun/run_key"] == "k1" and run["status"] == "SUCCESS"
    assert cp.get("/api/v1/sensors/requests")["cursor"] == "request-ok.json"


def failed_by(cp: ControlPlaneProc, reason: str) -> list[dict]:
    return [t for t in ticks(cp, "sensor", "requests") if reason in (t["error"] or "")]


def test_runs_a_schedule_requests_with_a_run_key_carry_it(reactions: tuple) -> None:
    cp, clock, _inbox = reactions
    clock.offset += (60 - clock.time() % 60) - 1.0
    assert cli(cp, "schedules", "start", "keyed_minutely")
    tick = wait_for(
        lambda: next(
            (t for t in ticks(cp, "schedule", "keyed_minutely") if t["status"] != "STARTED"),
            None,
        ),
        timeout=60,
        what="the keyed schedule's tick",
    )
    assert tick["status"] == "SUCCESS", tick
    run = cp.get(f"/api/v1/runs/{tick['run_ids'][0]}")
    assert run["tags"]["fleetrun/run_key"].startswith("minute-"), run["tags"]
    assert run["tags"]["fleetrun/schedule"] == "keyed_minutely"


def test_a_raising_evaluation_is_retried_within_its_tick(reactions: tuple) -> None:
    """[daemon] max_tick_retries = 2: two failures then a success make one SKIPPED tick
    with failure_count 2; a sensor that keeps raising makes a FAILURE tick after 3."""
    cp, _clock, inbox = reactions
    (inbox / "flaky-fails").write_text("2")
    cli(cp, "sensors", "start", "flaky")
    first = wait_for(
        lambda: next((t for t in ticks(cp, "sensor", "flaky") if t["status"] != "STARTED"), None),
        what="the flaky sensor's first tick",
    )
    assert (first["status"], first["failure_count"]) == ("SKIPPED", 2), first
    assert first["skip_reason"] == "evaluation 3 went through"
    (inbox / "flaky-fails").write_text("1000")
    failed = wait_for(
        lambda: next((t for t in ticks(cp, "sensor", "flaky") if t["status"] == "FAILURE"), None),
        what="a tick that failed three times",
    )
    assert failed["failure_count"] == 3 and "the upstream API timed out" in failed["error"]
    (shown,) = [line for line in cli(cp, "sensors", "list").splitlines() if "flaky" in line]
    assert "RUNNING" in shown
