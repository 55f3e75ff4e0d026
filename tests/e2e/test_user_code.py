"""User code that cannot be loaded, end to end (real control plane, real agent): a
stop order during the import ends the run CANCELED, and a code location that does not
import puts the run back in the queue ([run_coordinator] max_user_code_failure_retries)
before it fails with failure kind code_unreachable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ControlPlaneProc, start_agent, start_control_plane, wait_for

JOBS = {"slow": FIXTURES / "slow_import_jobs.py"}
RETRIES = "[run_retries]\nmax_retries = 2\n"


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "gate"
    folder.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_GATE", str(folder))
    return folder


def types_of(cp: ControlPlaneProc, run_id: str) -> list[str]:
    return [e["type"] for e in cp.events(run_id)]


def test_a_cancel_while_the_code_loads_ends_canceled_and_is_not_retried(
    tmp_path: Path, gate: Path
) -> None:
    cp = start_control_plane(tmp_path, RETRIES)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        (gate / "hold").touch()
        run_id = cp.submit("loads_slowly")
        wait_for(lambda: (gate / f"loading-{run_id}").exists(), what="the import to start")
        status, _ = cp.call("POST", f"/api/v1/runs/{run_id}/cancel", {})
        assert status == 200
        run = cp.wait_run(run_id)
        assert run["status"] == "CANCELED", run
        assert "import" not in (run["status_reason"] or "")
        types = types_of(cp, run_id)
        assert "STEP_START" not in types and "RUN_FAILURE" not in types, types
        assert cp.get(f"/api/v1/runs?tag=fleetrun/parent_run_id:{run_id}")["runs"] == []
    finally:
        (gate / "hold").unlink(missing_ok=True)
        agent.stop()
        cp.stop()


def test_unreachable_code_is_retried_in_place_and_the_queue_says_why(
    tmp_path: Path, gate: Path
) -> None:
    cp = start_control_plane(
        tmp_path,
        "[run_coordinator]\nmax_user_code_failure_retries = 2\n"
        "user_code_failure_retry_delay_seconds = 1.5\n",
    )
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        (gate / "broken").touch()
        # Given a location that fails to import: the run is put back, and waits
        recovers = cp.submit("loads_slowly")
        requeued = wait_for(
            lambda: [e for e in cp.events(recovers) if e["type"] == "RUN_REQUEUED"],
            what="the run to be put back in the queue",
        )
        assert "the warehouse client is not installed" in requeued[0]["message"]
        assert requeued[0]["data"]["failure_kind"] == "code_unreachable"
        waiting = wait_for(
            lambda: {r["run_id"]: r["waiting_for"] for r in cp.get("/api/v1/queue")["runs"]}.get(
                recovers
            ),
            what="the queue view of the waiting run",
        )
        assert waiting.startswith("waiting for its code location slow"), waiting
        # When the code is fixed, the same run succeeds: no new run, no run retry
        (gate / "broken").unlink()
        assert cp.wait_run(recovers)["status"] == "SUCCESS"
        assert "RUN_RETRY" not in types_of(cp, recovers)

        # And a location that stays broken fails after 1 + 2 attempts, as code_unreachable
        (gate / "broken").touch()
        gives_up = cp.submit("loads_slowly")
        run = cp.wait_run(gives_up)
        assert (run["status"], run["failure_kind"]) == ("FAILURE", "code_unreachable"), run
        types = types_of(cp, gives_up)
        assert types.count("RUN_REQUEUED") == 2 and types.count("RUN_STARTING") == 3, types
    finally:
        agent.stop()
        cp.stop()


def test_by_default_unreachable_code_fails_the_run_at_once(tmp_path: Path, gate: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        (gate / "broken").touch()
        run = cp.wait_run(cp.submit("loads_slowly"))
        assert (run["status"], run["failure_kind"]) == ("FAILURE", "code_unreachable"), run
        assert "RUN_REQUEUED" not in types_of(cp, run["run_id"])
    finally:
        agent.stop()
        cp.stop()
