"""Dispatch latency and throughput of a real control plane with real agents.

1. Idle: the `hello` one-op example job submitted N times one after the other. Measures
   submit -> launch received by the agent (RUN_START's `launch_received_time`, stamped
   by the agent) and submit -> STARTED (the run's `start_time`, stamped by the control
   plane when RUN_START arrives), from `t0` taken just before the POST.
2. Burst: M runs of `hello` submitted at once through 2 agents x 8 slots
   (max_concurrent_runs = 16): runs/s from the first submit to the last end, and time in
   queue (RUN_STARTING - create_time).
Everything runs on this machine over loopback: `fleetrun serve` and `fleetrun agent`
subprocesses, SQLite in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FLEETRUN = [sys.executable, "-m", "control_plane.cli"]
EXAMPLES = REPO / "examples" / "demo_jobs.py"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def fleet(control_plane_toml: str, agents: int, slots: int) -> Iterator[str]:
    """A control plane and `agents` agents with `slots` slots each; yields the URL."""
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    (folder / "cp.toml").write_text(
        f'[server]\nport = 0\n[storage]\nurl = "sqlite:///b.db"\n{control_plane_toml}'
    )
    procs = []
    with open(folder / "cp.log", "wb") as cp_log:
        procs.append(subprocess.Popen([*FLEETRUN, "serve", "--config", str(folder / "cp.toml")],
                                      stdout=cp_log, stderr=subprocess.STDOUT))  # fmt: skip
    try:
        match = _wait(
            lambda: re.search(r"listening on (http://\S+)", (folder / "cp.log").read_text()),
            60, "the control plane",
        )  # fmt: skip
        url = match.group(1)
        for i in range(agents):
            path = folder / f"agent{i}.toml"
            path.write_text(
                f'control_plane_url = "{url}"\nname = "bench{i}"\nmax_concurrent_runs = {slots}\n'
                f'[[code_locations]]\nname = "examples"\npython_file = "{EXAMPLES}"\n'
            )
            procs.append(
                subprocess.Popen(
                    [*FLEETRUN, "agent", "--config", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait(lambda: len([a for a in _get(f"{url}/api/v1/agents")["agents"]
                           if a["code_locations"]]) == agents, 60, "the agents")  # fmt: skip
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(20)


def idle(runs: int) -> dict[str, list[float]]:
    received, started, finished = [], [], []
    with fleet("", agents=1, slots=4) as url:
        for _ in range(runs):
            t0 = time.time()
            run_id = _post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]
            run = _wait(
                lambda rid=run_id: (r := _get(f"{url}/api/v1/runs/{rid}"))["end_time"] and r,
                60, "the run",
            )  # fmt: skip
            assert run["status"] == "SUCCESS", run
            events = _get(f"{url}/api/v1/runs/{run_id}/events")["events"]
            start = next(e for e in events if e["type"] == "RUN_START")
            received.append(start["data"]["launch_received_time"] - t0)
            started.append(_ts(run["start_time"]) - t0)
            finished.append(_ts(run["end_time"]) - t0)
    return {
        "submit -> launch received": received,
        "submit -> STARTED": started,
        "submit -> SUCCESS": finished,
    }


def burst(runs: int) -> tuple[float, list[float]]:
    config = "[run_coordinator]\nmax_concurrent_runs = 16\n"
    with fleet(config, agents=2, slots=8) as url:
        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: _post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"],
                                range(runs)))  # fmt: skip

        def all_done() -> list[dict] | None:
            page = _get(f"{url}/api/v1/runs?status=SUCCESS,FAILURE&limit=1000")["runs"]
            return page if len(page) == runs else None

        done = _wait(all_done, 600, "the burst")
        assert {r["status"] for r in done} == {"SUCCESS"}
        elapsed = max(_ts(r["end_time"]) for r in done) - t0
        waits = []
        for run_id in ids:
            run = _get(f"{url}/api/v1/runs/{run_id}")
            events = _get(f"{url}/api/v1/runs/{run_id}/events?limit=3")["events"]
            starting = next(e for e in events if e["type"] == "RUN_STARTING")
            waits.append(_ts(starting["time"]) - _ts(run["create_time"]))
    return runs / elapsed, waits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="idle runs")
    parser.add_argument("--burst", type=int, default=500, help="runs in the burst")
    parser.add_argument("--trials", type=int, default=20, help="agent-death trials")
    parser.add_argument("--simulated", type=int, default=500, help="simulated idle agents")
    args = parser.parse_args(argv)
    print(f"idle: one-op job, {args.runs} sequential runs, 1 agent (ms)")
    print(f"  {'measure':<28}{'p50':>8}{'p99':>8}{'max':>8}")
    for name, values in idle(args.runs).items():
        ms = [v * 1000 for v in values]
        print(f"  {name:<28}{statistics.median(ms):>8.1f}{_pct(ms, 0.99):>8.1f}{max(ms):>8.1f}")
    rate, waits = burst(args.burst)
    ms = [w * 1000 for w in waits]
    print(f"burst: {args.burst} one-op runs at once, 2 agents x 8 slots")
    print(f"  throughput {rate:.1f} runs/s; time in queue p50 {statistics.median(ms):.0f} ms,"
          f" p99 {_pct(ms, 0.99):.0f} ms")  # fmt: skip
    from bench.monitoring import TIMEOUT, agent_death

    print(f"agent killed -> run FAILURE, heartbeat timeout {TIMEOUT:g} s, {args.trials} trials (s)")
    print(f"  {'other agents':<28}{'p50':>8}{'p99':>8}{'max':>8}")
    for simulated in (0, args.simulated):
        lags = agent_death(args.trials, simulated)
        label = f"{simulated} simulated idle"
        print(f"  {label:<28}{statistics.median(lags):>8.2f}{_pct(lags, 0.99):>8.2f}"
              f"{max(lags):>8.2f}")  # fmt: skip
    from bench.executors import report

    report()
    from bench.daemon import report as daemon_report

    daemon_report()


if __name__ == "__main__":
    main()
