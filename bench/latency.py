"""Workloads 1 and 2: how fast a run gets from submission to a running worker.

1. Idle: the `hello` one-op example job submitted `runs` times, one after the other, to
   one agent. Per run, from `t0` taken just before the POST: submit -> launch received
   (RUN_START's `launch_received_time`, stamped by the agent when the launch reached it)
   and submit -> STARTED (the run's `start_time`, stamped by the control plane when the
   worker's RUN_START arrived).
2. Burst: `runs` runs of `hello` submitted at once (8 client threads) through 4 agents x
   8 slots: runs/s from the first submit to the last end, and each run's time in queue
   (RUN_STARTING - create_time).
Everything runs on this machine over loopback: `fleetrun serve` and `fleetrun agent`
subprocesses, SQLite in a temporary folder (or `storage_url`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.harness import Fleet, get, post, ts, wait


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


def burst(
    runs: int = 1000, agents: int = 4, slots: int = 8, storage_url: str = "sqlite:///b.db"
) -> tuple[float, list[float]]:
    """(runs/s, seconds in queue per run)."""
    config = f"[run_coordinator]\nmax_concurrent_runs = {agents * slots}\n"
    with Fleet(config, storage_url) as fleet:
        fleet.add_agents(agents, slots)
        url = fleet.url
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
        assert {r["status"] for r in done} == {"SUCCESS"}, "some runs of the burst failed"
        elapsed = max(ts(r["end_time"]) for r in done) - t0
        waits = []
        for run_id in ids:
            run = get(f"{url}/api/v1/runs/{run_id}")
            events = get(f"{url}/api/v1/runs/{run_id}/events?limit=3")["events"]
            starting = next(e for e in events if e["type"] == "RUN_STARTING")
            waits.append(ts(starting["time"]) - ts(run["create_time"]))
    return runs / elapsed, waits
