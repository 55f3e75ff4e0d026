"""Nothing acknowledged is lost when processes die: the agent's spool.

Given a run in flight, when the control plane is killed, the run finishes on the agent
while it is down, and then the agent is killed too, then after both restart the run
ends SUCCESS with its whole event log, exactly once: the records waited in the agent's
spool and were re-sent before the agent registered again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    free_port,
    start_agent,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.e2e
GATES = {"gates": FIXTURES / "gate_jobs.py"}


def spooled_types(state_dir: Path) -> list[bytes]:
    path = state_dir / "spool.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return [body for (body,) in db.execute("SELECT body FROM records ORDER BY lease, seq")]


def test_a_run_that_ends_while_everything_is_down_is_not_lost(tmp_path: Path) -> None:
    port = free_port()
    cp = start_control_plane(tmp_path, port=port)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    state = tmp_path / "fleetrun-state" / "agent-1"
    gate = tmp_path / "gate"
    try:
        run_id = cp.submit("gated", config={"gate": str(gate)})
        wait_for(lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED",
                 what="the run to start")  # fmt: skip
        # When the control plane dies and the run finishes meanwhile
        cp.popen.kill()
        cp.popen.wait(10)
        gate.write_text("open")
        wait_for(lambda: any(b"RUN_SUCCESS" in body for body in spooled_types(state)),
                 what="the run's end to be spooled")  # fmt: skip
        # and then the agent dies too (its in-memory state is gone)
        agent.popen.kill()
        agent.popen.wait(10)
        # Then, once both are back, the run ends as it did
        cp = start_control_plane(tmp_path, port=port)
        agent = start_agent(cp, tmp_path, "agent-1", GATES)
        run = cp.wait_run(run_id)
        assert run["status"] == "SUCCESS", run
        events = cp.events(run_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        types = [e["type"] for e in events]
        assert types.count("RUN_SUCCESS") == 1 and "RUN_FAILURE" not in types
        assert spooled_types(state) == []  # acknowledged, so gone from the spool
    finally:
        agent.stop()
        cp.stop()
