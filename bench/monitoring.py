"""Agent death -> run FAILURE: how long the control plane takes to notice and act.

Each trial starts a real agent, runs the `sleepy` job on it, kills the agent (and its
worker) with SIGKILL, and measures from the kill to the run's end_time (stamped by the
control plane when it applied the verdict). Heartbeat timeout 3 s, so the floor is 3 s.
Run with no other agents, then with N simulated idle agents (bench/simagents.py, a
separate process) registered, heartbeating and long-polling meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import FLEETRUN, fleet
from bench.harness import get as _get
from bench.harness import post as _post
from bench.harness import ts as _ts
from bench.harness import wait as _wait

JOBS = Path(__file__).resolve().parent / "jobs.py"
TIMEOUT = 3.0


def _trial(url: str, folder: Path, index: int) -> float:
    name = f"victim{index}"
    config = folder / f"{name}.toml"
    config.write_text(
        f'control_plane_url = "{url}"\nname = "{name}"\nqueues = ["victims"]\n'
        f'[[code_locations]]\nname = "bench"\npython_file = "{JOBS}"\n'
    )
    agent = subprocess.Popen(
        [*FLEETRUN, "agent", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = 0
    try:
        _wait(
            lambda: any(
                a["name"] == name and a["status"] == "ONLINE" and a["code_locations"]
                for a in _get(f"{url}/api/v1/agents")["agents"]
            ),
            60,
            name,
        )
        body = {"job": "sleepy", "tags": {"fleetrun/queue": "victims"}}
        run_id = _post(f"{url}/api/v1/runs", body)["run_id"]
        _wait(lambda: _get(f"{url}/api/v1/runs/{run_id}")["status"] == "STARTED", 60, "start")
        events = _get(f"{url}/api/v1/runs/{run_id}/events")["events"]
        worker = next(e for e in events if e["type"] == "RUN_START")["data"]["pid"]
        killed = time.time()
        agent.kill()
        os.kill(worker, signal.SIGKILL)
        run = _wait(
            lambda: (r := _get(f"{url}/api/v1/runs/{run_id}"))["status"] == "FAILURE" and r,
            TIMEOUT + 60,
            "the verdict",
        )
        assert run["failure_kind"] == "agent_lost", run
        return _ts(run["end_time"]) - killed
    finally:
        agent.kill()
        agent.wait(20)
        if worker:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


def agent_death(trials: int, simulated: int) -> list[float]:
    """Seconds from agent kill to FAILURE, one per trial."""
    config = f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {TIMEOUT}\n"
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-monitor-"))
    with fleet(config, agents=0, slots=1) as url:
        sim = None
        if simulated:
            sim = subprocess.Popen(
                [sys.executable, "-m", "bench.simagents", url, str(simulated)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sim.stdout is not None and sim.stdout.readline().strip() == "ready"
        try:
            return [_trial(url, folder, i) for i in range(trials)]
        finally:
            if sim is not None:
                sim.terminate()
                sim.wait(20)
