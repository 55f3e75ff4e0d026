"""Deleting runs and retention, end to end: a real control plane and agent, the API, the
CLI (as a user's shell runs it) and the retention loop."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    ControlPlaneProc,
    start_agent,
    start_control_plane,
    wait_for,
)
from tests.e2e.test_cli import fleetrun, ok

pytestmark = pytest.mark.e2e
GATES = {"gates": FIXTURES / "gate_jobs.py"}
TOMORROW = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()


def start_fleet(tmp_path: Path, extra_config: str = "") -> Iterator[ControlPlaneProc]:
    cp = start_control_plane(tmp_path, extra_config)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    yield cp
    # Cancel what is still running, so that the agent stops at once instead of draining
    for run in cp.get("/api/v1/runs?status=STARTED")["runs"]:
        cp.call("POST", f"/api/v1/runs/{run['run_id']}/cancel", {})
        cp.wait_run(run["run_id"])
    agent.stop()
    cp.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    yield from start_fleet(tmp_path)


def started(cp: ControlPlaneProc, tmp_path: Path) -> str:
    """A run that waits on a gate that never opens."""
    run_id = cp.submit("gated", config={"gate": str(tmp_path / "never")})
    wait_for(lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="STARTED")
    return run_id


def test_the_api_deletes_a_finished_run_and_refuses_a_live_one(
    fleet: ControlPlaneProc, tmp_path: Path
) -> None:
    done = fleet.submit("quick")
    assert fleet.wait_run(done)["status"] == "SUCCESS"
    live = started(fleet, tmp_path)
    # An active run is refused, and stays
    status, body = fleet.call("DELETE", f"/api/v1/runs/{live}")
    assert (status, body["error"]["code"]) == (409, "run_active")
    # A finished one goes, with its events
    status, body = fleet.call("DELETE", f"/api/v1/runs/{done}")
    assert (status, body) == (200, {"run_id": done, "deleted": True})
    assert fleet.call("GET", f"/api/v1/runs/{done}")[0] == 404
    assert fleet.call("GET", f"/api/v1/runs/{done}/events")[0] == 404
    assert fleet.call("DELETE", f"/api/v1/runs/{done}")[0] == 404
    # A parent is refused while its re-execution runs; once it ended, the chain of the
    # re-execution shows the parent as deleted
    fleet.call("POST", f"/api/v1/runs/{live}/cancel", {})
    assert fleet.wait_run(live)["status"] == "CANCELED"
    status, body = fleet.call("POST", f"/api/v1/runs/{live}/reexecute", {})
    child = body["run_id"]
    wait_for(lambda: fleet.get(f"/api/v1/runs/{child}")["status"] == "STARTED", what="child")
    status, body = fleet.call("DELETE", f"/api/v1/runs/{live}")
    assert (status, body["error"]["code"]) == (409, "run_has_live_children")
    assert child in body["error"]["message"]
    fleet.call("POST", f"/api/v1/runs/{child}/cancel", {})
    fleet.wait_run(child)
    assert fleet.call("DELETE", f"/api/v1/runs/{live}")[0] == 200
    chain = fleet.get(f"/api/v1/runs/{child}")["chain"]
    assert (chain[0]["run_id"], chain[0]["status"], chain[1]["run_id"]) == (live, "DELETED", child)


def test_the_cli_deletes_by_id_and_by_filter(fleet: ControlPlaneProc, tmp_path: Path) -> None:
    runs = [fleet.submit("quick") for _ in range(3)]
    for run_id in runs:
        fleet.wait_run(run_id)
    live = started(fleet, tmp_path)
    # By id: an active run is refused (exit 1, the reason named), a finished one goes
    refused = fleetrun(fleet.url, "runs", "delete", live)
    assert refused.returncode == 1 and "run_active" in refused.stderr
    ok(fleetrun(fleet.url, "runs", "delete", runs[0]))
    assert fleet.call("GET", f"/api/v1/runs/{runs[0]}")[0] == 404
    # By filter: first what it would delete, then, with --yes, the deletion
    preview = ok(fleetrun(fleet.url, "runs", "delete", "--status", "SUCCESS", "--before", TOMORROW))
    assert runs[1] in preview and runs[2] in preview and "2 runs would be deleted" in preview
    assert fleet.call("GET", f"/api/v1/runs/{runs[1]}")[0] == 200
    args = ("runs", "delete", "--status", "SUCCESS", "--before", TOMORROW, "--job", "quick")
    assert "deleted 2 runs" in ok(fleetrun(fleet.url, *args, "--yes"))
    assert [fleet.call("GET", f"/api/v1/runs/{r}")[0] for r in runs[1:]] == [404, 404]
    assert fleet.get(f"/api/v1/runs/{live}")["status"] == "STARTED"
    bad = fleetrun(fleet.url, "runs", "delete", "--status", "STARTED", "--before", TOMORROW)
    assert bad.returncode == 1 and "--status takes finished statuses" in bad.stderr


def test_retention_purges_finished_runs_and_leaves_live_ones(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path, "[retention]\nsuccess_days = 0.00003\n")  # 2.6 s
    cp = next(fleet)
    try:
        live = started(cp, tmp_path)
        done = cp.submit("quick")
        cp.wait_run(done)
        wait_for(
            lambda: cp.call("GET", f"/api/v1/runs/{done}")[0] == 404,
            timeout=90,
            what="the retention loop to purge the run",
        )
        assert cp.get(f"/api/v1/runs/{live}")["status"] == "STARTED"
        with urllib.request.urlopen(f"{cp.url}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        assert 'fleetrun_retention_rows_purged_total{table="runs"} 1.0' in metrics
    finally:
        next(fleet, None)
