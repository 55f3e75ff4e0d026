"""Agent restarts that lose nothing (agent/channel.py, agent/worker/lease.py): a run
worker outlives its agent, a restarted agent adopts it under the same lease and
delivers what it wrote meanwhile, once and in order; a worker nobody adopts stops
itself before the control plane can start another attempt; an agent hands its workers
over to the next version.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    REPO,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    start_process,
    wait_for,
    write_agent_config,
)
from tests.faultproxy import FaultProxy

JOBS = {"adoption": FIXTURES / "adoption_jobs.py"}
BINARY = REPO / "dist" / "fleetrun-agent"
REPEATS = 5 if os.environ.get("FLEETRUN_LONG_FAULTS") == "1" else 1


def proxy_target(cp: ControlPlaneProc) -> tuple[str, int]:
    target = urllib.parse.urlsplit(cp.url)
    assert target.hostname and target.port, cp.url
    return target.hostname, target.port


def monitoring(timeout: float) -> str:
    return f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout}\n"


def marks(folder: Path, lease: int) -> dict[str, float]:
    path = folder / f"exec-{lease}"
    lines = path.read_text().split("\n") if path.exists() else []
    return {kind: float(value) for kind, value in (line.split() for line in lines if line)}


def log_lines(cp: ControlPlaneProc, run_id: str) -> list[str]:
    text = "".join(c["text"] for c in cp.get(f"/api/v1/runs/{run_id}/logs")["logs"])
    return [line for line in text.splitlines() if line.startswith("line ")]


def started(cp: ControlPlaneProc, run_id: str, folder: Path) -> int:
    """Wait for the run's op to be printing; its lease."""
    run = wait_for(
        lambda: (r := cp.get(f"/api/v1/runs/{run_id}"))["status"] == "STARTED" and r,
        what="the run to start",
    )
    wait_for(lambda: len(log_lines(cp, run_id)) > 5, what="the op's first lines")
    return int(run["lease"])


def assert_once_in_order(cp: ControlPlaneProc, run_id: str) -> None:
    """Every event once, numbered without gaps, one attempt; every line once, in order."""
    events = cp.events(run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types.count("RUN_STARTING") == 1 and types.count("RUN_START") == 1, types
    assert types.count("RUN_SUCCESS") == 1 and "RUN_FAILURE" not in types, types
    lines = log_lines(cp, run_id)
    numbers = [int(re.match(r"line (\d+)", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert numbers == list(range(len(numbers))), numbers[:50]
    assert lines[-1].endswith("(last)")


@pytest.mark.parametrize("launcher", ["forkserver", "subprocess"])
def test_a_killed_agent_restarted_in_time_adopts_its_worker(tmp_path: Path, launcher: str) -> None:
    cp = start_control_plane(tmp_path, monitoring(10))
    extra = f'run_launcher = "{launcher}"'
    agent = start_agent(cp, tmp_path, "a1", JOBS, extra)
    try:
        run_id = cp.submit("counting", config={"dir": str(tmp_path)})
        lease = started(cp, run_id, tmp_path)
        # When the agent is killed outright, its worker printing on, and starts again
        agent.popen.kill()
        agent.popen.wait(10)
        printed = len(log_lines(cp, run_id))
        time.sleep(0.5)  # the fault itself: the agent stays dead while the op prints
        restarted = time.monotonic()
        agent = start_agent(cp, tmp_path, "a1", JOBS, extra)
        wait_for(lambda: "adopting the worker of run" in agent.log(), what="the adoption")
        wait_for(lambda: len(log_lines(cp, run_id)) > printed + 25, what="lines from meanwhile")
        caught_up = time.monotonic() - restarted
        print(
            f"\n[{launcher}] agent restarted -> the lines printed meanwhile stored: "
            f"{caught_up:.2f} s"
        )
        (tmp_path / "open").touch()
        # Then the run ends SUCCESS: one attempt under the same lease, one execution,
        # every event and every line once, in order
        run = cp.wait_run(run_id)
        assert (run["status"], run["lease"] in (lease, None)) == ("SUCCESS", True), run
        assert_once_in_order(cp, run_id)
        assert list(marks(tmp_path, lease)) == ["start", "end"]
        assert [p.name for p in tmp_path.glob("exec-*")] == [f"exec-{lease}"]
        state = tmp_path / "fleetrun-state" / "a1" / "workers"
        wait_for(lambda: not any(state.iterdir()), what="the channel to be removed")
    finally:
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("fault", ["killed", "frozen", "partitioned"])
def test_a_worker_nobody_adopts_stops_before_its_retry_starts(
    tmp_path: Path, fault: str, repeat: int
) -> None:
    """The agent is killed, frozen (SIGSTOP) or cut off from the control plane, and does
    not come back in time: its worker stops itself at its lease deadline, before the
    control plane's verdict; the retry on another agent runs once, and the two
    executions do not overlap (`make chaos` repeats each case and prints every gap)."""
    timeout = 4.0
    cp = start_control_plane(tmp_path, monitoring(timeout))
    proxy = FaultProxy(*proxy_target(cp)).start()
    a1 = start_agent(cp, tmp_path, "a1", JOBS, url=proxy.url)
    a2: Proc | None = None
    try:
        run_id = cp.submit(
            "counting", config={"dir": str(tmp_path)}, tags={"fleetrun/max_retries": "1"}
        )
        old = started(cp, run_id, tmp_path)
        a2 = start_agent(cp, tmp_path, "a2", JOBS)
        if fault == "killed":
            a1.popen.kill()
        elif fault == "frozen":
            os.kill(a1.popen.pid, signal.SIGSTOP)
        else:
            proxy.blackhole()
        failed = cp.wait_run(run_id, timeout=60)
        assert failed["failure_kind"] == "agent_lost", failed
        retry = wait_for(
            lambda: cp.get(f"/api/v1/runs?tag=fleetrun/parent_run_id:{run_id}")["runs"],
            what="the retry",
        )[0]
        new = int(wait_for(lambda: cp.get(f"/api/v1/runs/{retry['run_id']}")["lease"]))
        wait_for(lambda: "start" in marks(tmp_path, new), what="the retry's execution")
        (tmp_path / "open").touch()
        assert cp.wait_run(retry["run_id"])["status"] == "SUCCESS"
        first, second = marks(tmp_path, old), marks(tmp_path, new)
        assert "end" in first, "the old execution did not stop itself"
        gap = second["start"] - first["end"]
        print(
            f"\n[{fault} agent, T = {timeout:g} s] the old execution ended {gap:.3f} s "
            "before the retry started"
        )
        assert gap > 0, f"the executions overlapped by {-gap:.3f} s"
        assert sorted(p.name for p in tmp_path.glob("exec-*")) == sorted(
            [f"exec-{old}", f"exec-{new}"]
        )
    finally:
        if fault == "frozen":
            os.kill(a1.popen.pid, signal.SIGCONT)
        proxy.stop()
        for proc in (a1, a2, cp):
            if proc is not None:
                proc.stop()


def test_an_upgrade_in_place_hands_the_workers_to_the_new_build(tmp_path: Path) -> None:
    """The one-file agent binary runs with --handoff; SIGTERM (systemctl restart) makes
    it leave its worker running; the agent of another build (python -m) adopts it."""
    assert BINARY.exists(), "build the agent binary first: make binary"
    cp = start_control_plane(tmp_path, monitoring(10))
    config = write_agent_config(tmp_path, cp.url, "a1", JOBS)
    old = start_process(
        [str(BINARY), "run", "--handoff", "--config", str(config)], tmp_path / "old.log"
    )
    new: Proc | None = None
    try:
        wait_for(
            lambda: any(a["name"] == "a1" for a in cp.get("/api/v1/agents")["agents"]),
            what="the old build to register",
        )
        run_id = cp.submit("counting", config={"dir": str(tmp_path)})
        lease = started(cp, run_id, tmp_path)
        old.popen.send_signal(signal.SIGTERM)
        assert old.popen.wait(30) == 0
        assert "handing 1 run(s) over" in old.log()
        new = start_agent(cp, tmp_path, "a1", JOBS)
        wait_for(lambda: "adopting the worker of run" in new.log(), what="the adoption")
        (tmp_path / "open").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        assert_once_in_order(cp, run_id)
        assert list(marks(tmp_path, lease)) == ["start", "end"]
    finally:
        old.stop()
        if new is not None:
            new.stop()
        cp.stop()


def test_check_config_rejects_a_bad_lease_margin(tmp_path: Path) -> None:
    config = write_agent_config(
        tmp_path, "http://127.0.0.1:9", "a1", JOBS, "lease_margin_seconds = -1"
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2 and "lease_margin_seconds" in result.stderr
