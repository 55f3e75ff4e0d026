"""Workloads 1 and 2: how fast a run gets from submission to a running worker.

1. Idle: the `hello` one-op example job submitted `runs` times, one after the other, to
   one agent. Per run, from `t0` taken just before the POST: submit -> launch received
   (RUN_START's `launch_received_time`, stamped by the agent when the launch reached it)
   and submit -> STARTED (the run's `start_time`, stamped by the control plane when the
   worker's RUN_START arrived).
2. Burst: `runs` runs of `hello` submitted at once (8 client threads) through 4 agents x
   8 slots: runs/s from the first submit to the last end, and each run's time in queue
   (RUN_STARTING - create_time). CPU per run on each side, from /proc over the burst:
   the control plane's; the agents' own plus their fork servers' own; the run workers'
   (their fork servers' reaped children: a worker's CPU is counted when it is reaped);
   and the bench client's (submitting, then asking every 0.2 s whether all have ended).
Everything runs on this machine over loopback: `fleetrun serve` and `fleetrun agent`
subprocesses, SQLite in a temporary folder (or `storage_url`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import CLOCK_TICKS, Fleet, children, cpu_seconds, get, post, ts, wait


def one_hello(url: str) -> tuple[float, float, dict[str, Any]]:
    """Submit `hello` to the control plane at `url` and wait for its end: (seconds from
    submit to launch received, the time just before the submit, the ended run)."""
    t0 = time.time()
    run_id = post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]

    def ended() -> dict[str, Any] | None:
        run: dict[str, Any] = get(f"{url}/api/v1/runs/{run_id}")
        return run if run["end_time"] else None

    run = wait(ended, 60, "the run")
    assert run["status"] == "SUCCESS", run
    events = get(f"{url}/api/v1/runs/{run_id}/events?limit=10")["events"]
    start = next(e for e in events if e["type"] == "RUN_START")
    return start["data"]["launch_received_time"] - t0, t0, run


def idle(runs: int = 100, storage_url: str = "sqlite:///b.db") -> dict[str, list[float]]:
    """Seconds per run: submit -> launch received, -> STARTED, -> SUCCESS."""
    received, started, finished = [], [], []
    with Fleet(storage_url=storage_url) as fleet:
        fleet.add_agents(1, 4)
        for _ in range(runs):
            launch, t0, run = one_hello(fleet.url)
            received.append(launch)
            started.append(ts(run["start_time"]) - t0)
            finished.append(ts(run["end_time"]) - t0)
    return {
        "submit -> launch received": received,
        "submit -> STARTED": started,
        "submit -> SUCCESS": finished,
    }


def _reaped_children_seconds(pid: int) -> float:
    """CPU of a process's children that it has reaped (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS


def _cpu_by_side(fleet: Fleet) -> dict[str, float]:
    """CPU seconds so far: control plane, agents (with their fork servers), workers, and
    this bench client."""
    servers = [c for a in fleet.agents for c in children(a.pid)]
    usage = os.times()
    return {
        "control plane": cpu_seconds(fleet.control_plane.pid),
        "agent": sum(cpu_seconds(a.pid) for a in fleet.agents)
        + sum(cpu_seconds(s) for s in servers),
        "worker": sum(_reaped_children_seconds(s) for s in servers),
        "bench client": usage.user + usage.system,
    }


@dataclass
class BurstResult:
    runs_per_s: float
    queued: list[float]  # seconds in queue per run
    cpu_ms_per_run: dict[str, float]  # by side, as _cpu_by_side names them


def burst(
    runs: int = 1000, agents: int = 4, slots: int = 8, storage_url: str = "sqlite:///b.db"
) -> BurstResult:
    config = f"[run_coordinator]\nmax_concurrent_runs = {agents * slots}\n"
    with Fleet(config, storage_url) as fleet:
        fleet.add_agents(agents, slots)
        url = fleet.url
        cpu0 = _cpu_by_side(fleet)
        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            ids = list(
                pool.map(
                    lambda _: post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"], range(runs)
                )
            )

        def all_done() -> list[dict] | None:
            done, cursor = [], ""
            for _ in range(runs // 1000 + 2):
                page = get(f"{url}/api/v1/runs?status=SUCCESS,FAILURE&limit=1000{cursor}")
                done += page["runs"]
                if page["next_cursor"] is None:
                    break
                cursor = f"&cursor={page['next_cursor']}"
            return done if len(done) >= runs else None

        done = wait(all_done, 600, "the burst", 0.2)
        servers = [c for a in fleet.agents for c in children(a.pid)]
        wait(lambda: not any(children(s) for s in servers), 60, "the workers' exits", 0.01)
        cpu1 = _cpu_by_side(fleet)
        assert {r["status"] for r in done} == {"SUCCESS"}, "some runs of the burst failed"
        elapsed = max(ts(r["end_time"]) for r in done) - t0
        waits = []
        for run_id in ids:
            run = get(f"{url}/api/v1/runs/{run_id}")
            events = get(f"{url}/api/v1/runs/{run_id}/events?limit=3")["events"]
            starting = next(e for e in events if e["type"] == "RUN_STARTING")
            waits.append(ts(starting["time"]) - ts(run["create_time"]))
    per_run = {side: (cpu1[side] - cpu0[side]) * 1000 / runs for side in cpu0}
    return BurstResult(runs / elapsed, waits, per_run)
