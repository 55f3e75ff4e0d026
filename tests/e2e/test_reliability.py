"""Faults of the control plane itself: nothing acknowledged is lost when it dies, and
its own freezes and clock jumps are never blamed on the agents.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.clocks import OffsetClock
from tests.conftest import (
    FIXTURES,
    ControlPlaneProc,
    ThreadedControlPlane,
    free_port,
    http,
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
    """Given a run in flight, when the control plane is killed, the run finishes on the
    agent while it is down, and then the agent is killed too, then after both restart
    the run ends SUCCESS with its whole event log, exactly once: the records waited in
    the agent's spool and were re-sent before the agent registered again."""
    port = free_port()
    cp = start_control_plane(tmp_path, port=port)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    state = tmp_path / "fleetrun-state" / "agent-1"
    gate = tmp_path / "gate"
    try:
        run_id = cp.submit("gated", config={"gate": str(gate)})
        wait_for(
            lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="the run to start"
        )
        # When the control plane dies and the run finishes meanwhile
        cp.popen.kill()
        cp.popen.wait(10)
        gate.write_text("open")
        wait_for(
            lambda: any(b"RUN_SUCCESS" in body for body in spooled_types(state)),
            what="the run's end to be spooled",
        )
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


TIMEOUT = "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n"


def start_gated_run(cp: ControlPlaneProc, gate: Path, tags: dict[str, str] | None = None) -> str:
    run_id = cp.submit("gated", config={"gate": str(gate)}, tags=tags or {})
    wait_for(
        lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="the run to start"
    )
    return run_id


def assert_finished_cleanly(cp: ControlPlaneProc, run_id: str) -> None:
    run = cp.wait_run(run_id)
    assert run["status"] == "SUCCESS", run
    types = [e["type"] for e in cp.events(run_id)]
    assert "RUN_FAILURE" not in types and types.count("RUN_SUCCESS") == 1
    assert [a["status"] for a in cp.get("/api/v1/agents")["agents"]] == ["ONLINE"]


def test_a_control_plane_frozen_past_the_timeout_blames_no_agent(tmp_path: Path) -> None:
    """(The run keeps going whatever happens: by default its worker would stop itself
    at its lease deadline, which this freeze passes.)"""
    cp = start_control_plane(tmp_path, TIMEOUT)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    try:
        run_id = start_gated_run(cp, tmp_path / "gate", {"fleetrun/on_lost_contact": "continue"})
        # When the control plane is frozen for twice the heartbeat timeout
        os.kill(cp.popen.pid, signal.SIGSTOP)
        try:
            time.sleep(6.0)  # the fault itself: 2 x the 3 s timeout
        finally:
            os.kill(cp.popen.pid, signal.SIGCONT)
        # Then, thawed, it gives the agent a new timeout instead of failing its run
        wait_for(lambda: "did not run for" in cp.log(), what="the stall to be noticed")
        (tmp_path / "gate").write_text("open")
        assert_finished_cleanly(cp, run_id)
    finally:
        agent.stop()
        cp.stop()


def test_a_wall_clock_jump_blames_no_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleetrun.stallwatch")
    clock = OffsetClock()
    cp = ThreadedControlPlane.start(tmp_path, clock)  # 30 s timeout: heartbeats every 5 s
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    gate = tmp_path / "gate"
    try:
        run_id = start_gated_run(cp, gate)
        # When the control plane's wall clock steps an hour ahead (then back), and the
        # monitor looks at once (a cancel wakes it), before the next heartbeat lands
        for step in (3600.0, -3600.0):
            clock.offset += step
            other = cp.submit("gated", config={"gate": str(gate)})
            assert cp.call("POST", f"/api/v1/runs/{other}/cancel", {})[0] == 200
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED"
                time.sleep(0.1)
        # Then the run was never failed, and finishes
        gate.write_text("open")
        assert_finished_cleanly(cp, run_id)
        assert "the wall clock jumped by +3600" in caplog.text
    finally:
        agent.stop()
        cp.stop()


def test_kill_9_of_the_control_plane_mid_burst_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Every run the API acknowledged (201) before, during or after a `kill -9` of the
    control plane runs exactly once; a submission whose answer was lost is reported as
    such, not retried blindly."""
    port = free_port()
    marks = tmp_path / "executions"
    cp = start_control_plane(tmp_path, port=port)
    agent = start_agent(cp, tmp_path, "agent-1", {"count": FIXTURES / "count_jobs.py"})
    acked: list[str] = []
    unknown = 0
    stop = threading.Event()

    def submit_forever() -> None:
        nonlocal unknown
        for _ in range(2000):  # bounded: stops long before, when told
            if stop.is_set():
                return
            try:
                status, body = http(
                    "POST",
                    f"{cp.url}/api/v1/runs",
                    {"job": "counted", "config": {"file": str(marks)}},
                )
            except OSError:
                unknown += 1
                time.sleep(0.05)
                continue
            assert status == 201, body
            acked.append(body["run_id"])
            time.sleep(0.02)

    submitter = threading.Thread(target=submit_forever, daemon=True)
    submitter.start()
    try:
        wait_for(lambda: len(acked) >= 10, what="runs before the kill")
        cp.popen.kill()  # mid-burst: submissions, dispatches and event batches in flight
        cp.popen.wait(10)
        cp = start_control_plane(tmp_path, port=port)
        wait_for(lambda: len(acked) >= 40, what="runs after the restart")
        stop.set()
        submitter.join(30)
        stored = {r["run_id"] for r in cp.get("/api/v1/runs?limit=1000")["runs"]}
        assert set(acked) <= stored  # nothing acknowledged was lost
        for run_id in stored:  # acked, or created by a submission whose answer was lost
            assert cp.wait_run(run_id)["status"] == "SUCCESS", run_id
            seqs = [e["seq"] for e in cp.events(run_id)]
            assert seqs == list(range(1, len(seqs) + 1)), run_id
        executions = Counter(line.split()[0] for line in marks.read_text().splitlines())
        assert executions == dict.fromkeys(stored, 1)  # each ran once, none twice
    finally:
        stop.set()
        agent.stop()
        cp.stop()


def test_a_frozen_worker_is_not_a_lost_agent(tmp_path: Path) -> None:
    """SIGSTOP of a run worker past the heartbeat timeout: its agent is alive, so no
    verdict; thawed, the run finishes (only max runtime bounds a stuck worker)."""
    cp = start_control_plane(tmp_path, TIMEOUT)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    try:
        run_id = start_gated_run(cp, tmp_path / "gate")
        started = next(e for e in cp.events(run_id) if e["type"] == "RUN_START")
        worker = int(started["message"].split("pid ")[1].split()[0])
        os.kill(worker, signal.SIGSTOP)
        try:
            time.sleep(6.0)  # the fault itself: 2 x the 3 s timeout
            assert cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED"
        finally:
            os.kill(worker, signal.SIGCONT)
        (tmp_path / "gate").write_text("open")
        assert_finished_cleanly(cp, run_id)
    finally:
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("frozen", ["control-plane", "agent"])
def test_a_freeze_shorter_than_the_timeout_changes_nothing(tmp_path: Path, frozen: str) -> None:
    cp = start_control_plane(tmp_path, TIMEOUT)
    agent = start_agent(cp, tmp_path, "agent-1", GATES)
    try:
        run_id = start_gated_run(cp, tmp_path / "gate")
        pid = (cp if frozen == "control-plane" else agent).popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # the fault itself: half the 3 s timeout
        finally:
            os.kill(pid, signal.SIGCONT)
        (tmp_path / "gate").write_text("open")
        assert_finished_cleanly(cp, run_id)
        assert "agent lost" not in cp.log()
    finally:
        agent.stop()
        cp.stop()
