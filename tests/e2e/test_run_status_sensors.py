"""Run status sensors end to end: a real control plane (restarted in the middle) and
real agents (one killed and replaced) evaluating `run_failure_sensor` and
`run_status_sensor` from tests/fixtures/reaction_jobs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    ControlPlaneProc,
    free_port,
    start_agent,
    start_control_plane,
    wait_for,
)

JOBS = {"reactions": FIXTURES / "reaction_jobs.py"}


def seen(inbox: Path) -> list[dict]:
    path = inbox / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cleanups(cp: ControlPlaneProc) -> dict[str, list[str]]:
    runs = cp.get("/api/v1/runs?tag=fleetrun/sensor:on_extract_failure&limit=100")["runs"]
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run["tags"]["fleetrun/run_key"], []).append(run["run_id"])
    return found


def sensor_ticks(cp: ControlPlaneProc, name: str) -> list[dict]:
    return cp.get(f"/api/v1/sensors/{name}/ticks?limit=100")["ticks"]


def test_a_run_failure_sensor_sees_each_failure_once_from_now_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    port = free_port()
    cp = start_control_plane(tmp_path, port=port)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        # Given a failure from before the sensor was turned on
        before = cp.submit("extract", config={"fail": True})
        assert cp.wait_run(before)["status"] == "FAILURE"
        for name in ("on_extract_failure", "after_cleanup"):
            assert cp.call("POST", f"/api/v1/sensors/{name}/start", {})[0] == 200
        first = wait_for(
            lambda: [t for t in sensor_ticks(cp, "on_extract_failure") if t["status"] != "STARTED"],
            what="the sensor's first tick",
        )
        assert first[-1]["skip_reason"].startswith("watching for runs that reach FAILURE from now")
        # When an extract fails, another succeeds, and a job nobody watches fails
        failed = cp.submit("extract", config={"fail": True})
        cp.submit("extract")
        cp.submit("unwatched")
        wait_for(lambda: failed in cleanups(cp), what="the cleanup chained to the failure")
        # Then the sensor saw that one failure, with its failed step and error
        (record,) = seen(inbox)
        assert record["run_id"] == failed and record["job"] == "extract"
        assert (record["status"], record["failure_kind"]) == ("FAILURE", "op_failure")
        assert record["steps"][0][0] == "load" and "the warehouse refused" in record["steps"][0][1]
        (cleanup,) = cleanups(cp)[failed]
        assert cp.wait_run(cleanup)["status"] == "SUCCESS"
        assert cp.get(f"/api/v1/runs/{cleanup}")["config"] == {"failed": failed}
        # and the SUCCESS sensor (side effects only) saw the cleanup succeed
        wait_for(lambda: (inbox / f"cleaned-{failed}").exists(), what="the after_cleanup effect")

        # When the control plane restarts, and the agent is killed and replaced
        cp.stop()
        agent.popen.kill()
        agent.popen.wait(30)
        cp = start_control_plane(tmp_path, port=port)
        agent = start_agent(cp, tmp_path, "a2", JOBS)
        again = cp.submit("extract", config={"fail": True})
        wait_for(lambda: again in cleanups(cp), timeout=90, what="the failure after restarts")
        # Then each failure since the sensor started was handled once, none before it
        by_key = cleanups(cp)
        assert {key: len(ids) for key, ids in by_key.items()} == {failed: 1, again: 1}
        assert {r["run_id"] for r in seen(inbox)} == {failed, again}
        assert before not in by_key
    finally:
        agent.stop()
        cp.stop()


def test_a_failing_run_status_sensor_keeps_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick that raises leaves the cursor: the same failures come back next tick."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        assert cp.call("POST", "/api/v1/sensors/on_extract_failure/start", {})[0] == 200
        wait_for(lambda: cp.get("/api/v1/sensors/on_extract_failure")["cursor"] is not None)
        (inbox / "failures.jsonl").mkdir()  # the sensor's write now raises
        failed = cp.submit("extract", config={"fail": True})
        error = wait_for(
            lambda: next(
                (t["error"] for t in sensor_ticks(cp, "on_extract_failure") if t["error"]), None
            ),
            what="a failed tick",
        )
        assert "IsADirectoryError" in error and cleanups(cp) == {}
        (inbox / "failures.jsonl").rmdir()
        wait_for(lambda: failed in cleanups(cp), what="the failure handled after the fix")
        assert [r["run_id"] for r in seen(inbox)] == [failed]
    finally:
        agent.stop()
        cp.stop()
