"""Processes a run leaves behind end with it: a real control plane and agent, both ways
of tracking them (a cgroup per worker; the process group plus a sweep)."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from agent.launchers import OUTPUT_GRACE_SECONDS
from agent.processes import parse_stat
from agent.tracking import open_tracking
from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    start_process,
    wait_for,
    write_agent_config,
)

LOCATIONS = {"procs": FIXTURES / "process_jobs.py"}


@pytest.fixture(params=["cgroup", "sweep"])
def tracking(request: pytest.FixtureRequest) -> str:
    if request.param == "cgroup":
        try:
            probe = open_tracking("cgroup")
        except ValueError as exc:
            pytest.skip(f"this machine offers no writable cgroup v2: {exc}")
        asyncio.run(probe.close())
    return request.param


@pytest.fixture
def fleet(tmp_path: Path, tracking: str) -> Iterator[tuple[ControlPlaneProc, Proc]]:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", LOCATIONS, f'process_tracking = "{tracking}"')
    try:
        yield cp, agent
    finally:
        agent.stop()
        cp.stop()


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())[0] == "Z"
    except FileNotFoundError:
        return True


def the_report(events: list[dict], pid: int, tracking: str, result: str) -> dict:
    """The run's ENGINE_EVENT naming daemon `pid`, checked to come right before `result`."""
    types = [e["type"] for e in events]
    assert types[-2:] == ["ENGINE_EVENT", result], types
    report = events[-2]
    assert report["message"] == f"killed 1 process the run left behind: {pid} (sleep 300)"
    assert report["data"] == {
        "killed": [{"pid": pid, "command": "sleep 300"}],
        "count": 1,
        "tracking": tracking,
    }
    assert report["step"] is None
    return report


def test_a_daemon_that_escaped_the_process_group_ends_with_the_run(
    fleet: tuple[ControlPlaneProc, Proc], tmp_path: Path, tracking: str
) -> None:
    cp, agent = fleet
    assert f"process tracking: {tracking} (" in agent.log()  # chosen once, at start
    run_id = cp.submit("setsid_daemon", config={"dir": str(tmp_path)})
    assert cp.wait_run(run_id)["status"] == "SUCCESS"
    pid = int((tmp_path / "daemon-pid").read_text())
    wait_for(lambda: gone(pid), timeout=5, what=f"daemon {pid} to end")
    the_report(cp.events(run_id), pid, tracking, "RUN_SUCCESS")
    wait_for(
        lambda: f"run {run_id}: killed 1 process the run left behind: {pid}" in agent.log(),
        timeout=10,
        what="the agent's warning",
    )


def test_a_daemon_holding_the_run_output_does_not_hold_the_run(
    fleet: tuple[ControlPlaneProc, Proc], tmp_path: Path, tracking: str
) -> None:
    cp, agent = fleet
    run_id = cp.submit("daemon_holding_stdout", config={"dir": str(tmp_path)})
    assert cp.wait_run(run_id)["status"] == "SUCCESS"
    pid = int((tmp_path / "daemon-pid").read_text())
    wait_for(lambda: gone(pid), timeout=5, what=f"daemon {pid} to end")
    events = cp.events(run_id)
    report = the_report(events, pid, tracking, "RUN_SUCCESS")
    (step_done,) = [e for e in events if e["type"] == "STEP_SUCCESS"]
    ended_after = datetime.fromisoformat(report["time"]) - datetime.fromisoformat(step_done["time"])
    assert ended_after.total_seconds() < OUTPUT_GRACE_SECONDS  # nobody waited for the pipe
    assert "still holds its output" not in agent.log()
    logs = cp.get(f"/api/v1/runs/{run_id}/logs?step=leave_a_daemon_on_stdout")["logs"]
    assert f"started daemon {pid}" in "".join(c["text"] for c in logs)


def cgroup2_mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if " - cgroup2 " in line]


def without_cgroup2(command: list[str]) -> list[str]:
    """`command` in a private mount namespace where no cgroup2 file system is mounted."""
    umounts = " && ".join(f"umount {shlex.quote(m)}" for m in cgroup2_mounts())
    return ["unshare", "-m", "sh", "-c", f"{umounts} && exec {shlex.join(command)}"]


def test_without_cgroup_v2_auto_falls_back_to_the_sweep_and_cgroup_will_not_start(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or not cgroup2_mounts():
        pytest.skip("hiding cgroup v2 from an agent needs root, unshare and a cgroup2 mount")
    cp = start_control_plane(tmp_path)
    try:
        strict = write_agent_config(
            tmp_path, cp.url, "strict", LOCATIONS, 'process_tracking = "cgroup"'
        )
        refused = subprocess.run(
            without_cgroup2([*FLEETRUN, "agent", "--config", str(strict)]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, refused.stderr
        assert (
            f'config error: {strict}: process_tracking: "cgroup" needs a writable cgroup '
            "v2: no cgroup2 file system shows"
        ) in refused.stderr
        config = write_agent_config(tmp_path, cp.url, "auto", LOCATIONS)
        agent = start_process(
            without_cgroup2([*FLEETRUN, "agent", "--config", str(config)]), tmp_path / "auto.log"
        )
        try:
            wait_for(lambda: "registered as auto" in agent.log(), what="the agent to register")
            assert (
                "process tracking: sweep (process groups, a subreaper and a /proc sweep; "
                "no usable cgroup v2: no cgroup2 file system shows"
            ) in agent.log()
            run_id = cp.submit("setsid_daemon", config={"dir": str(tmp_path)})
            assert cp.wait_run(run_id)["status"] == "SUCCESS"
            pid = int((tmp_path / "daemon-pid").read_text())
            the_report(cp.events(run_id), pid, "sweep", "RUN_SUCCESS")
        finally:
            agent.stop()
    finally:
        cp.stop()
