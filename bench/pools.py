"""Workload 11: a freed pool slot -> the next waiting step started.

`runs` runs of `pooled_tick` (one op in pool `bench`) are submitted while the pool is
paused (limit 0), across 2 agents with a slot for each, so every run is STARTED and its
step waits for a slot. Then the limit goes to 1 and the steps run one at a time, each
handing its slot to the next in line. Per handover: the worker's STEP_SUCCESS time of
one step -> the worker's STEP_START time of the next (both stamped by workers on this
host): the record's way to the control plane, the transaction that stores it and frees
the slot, the grant pass, the waiting agent's long-poll, its worker's slot bell.
"""

from __future__ import annotations

import itertools
import json
import urllib.request

from bench.harness import JOBS, Fleet, get, post, ts, wait


def _put(url: str, body: dict) -> None:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="PUT")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60):
        pass


def handovers(runs: int = 40, storage_url: str = "sqlite:///b.db") -> list[float]:
    """Seconds from each step's end to the next step's start, `runs - 1` of them."""
    agents, slots = 2, runs // 2 + 1
    config = f"[run_coordinator]\nmax_concurrent_runs = {agents * slots}\n"
    with Fleet(config, storage_url) as fleet:
        fleet.add_agents(agents, slots, JOBS)
        url = fleet.url
        _put(f"{url}/api/v1/pools/bench", {"limit": 0})
        ids = [post(f"{url}/api/v1/runs", {"job": "pooled_tick"})["run_id"] for _ in range(runs)]

        def all_waiting() -> bool:
            pools = get(f"{url}/api/v1/pools")["pools"]
            return any(p["name"] == "bench" and p["waiting"] == runs for p in pools)

        wait(all_waiting, 120, "every step to wait for a slot", 0.05)
        _put(f"{url}/api/v1/pools/bench", {"limit": 1})

        def all_done() -> bool:
            return all(get(f"{url}/api/v1/runs/{r}")["end_time"] for r in ids)

        wait(all_done, 300, "every run to end", 0.1)
        steps = []
        for run_id in ids:
            events = get(f"{url}/api/v1/runs/{run_id}/events")["events"]
            kinds = {e["type"]: ts(e["time"]) for e in events}
            steps.append((kinds["STEP_START"], kinds["STEP_SUCCESS"]))
    steps.sort()
    return [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(steps)]
