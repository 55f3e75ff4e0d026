"""Workload 3: one control plane under N simulated agents (bench/simagents.py).

The simulated agents run in a separate load-generator process and speak the real
protocol: register, keep a long-poll open, heartbeat at the interval the control plane
asks for (agent_heartbeat_timeout / 6 = 5 s by default). Meanwhile one real agent runs
`hello` runs submitted one at a time, whose dispatch latency (submit -> launch received
by the agent) is what an operator would feel. Read off the control plane's process:
RSS, CPU (% of one core) over the measuring window, and the heartbeats it counted
(fleetrun_agent_heartbeats_received_total): first at the fleet's own pace, then with
every simulated agent heartbeating back to back (flood), which is its capacity.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench.harness import OPEN_FILES, Fleet, cpu_seconds, get, metric, post, rss_bytes, spawn, wait

SPARE_FILES = 1000  # the control plane's own: storage, the real agent, the bench


def open_files_limit() -> int:
    """How many files a bench subprocess may surely open: the hard limit, which the
    bench raises to OPEN_FILES only where the host lets it (bench/harness.py)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return OPEN_FILES if hard == resource.RLIM_INFINITY else max(hard, 0)


def most_agents() -> int:
    """The most simulated agents one control plane can serve here, in thousands: each
    holds two connections (its long-poll and its heartbeats)."""
    return (open_files_limit() - SPARE_FILES) // 2 // 1000 * 1000


def heartbeats_counted(url: str) -> float:
    return metric(url, "fleetrun_agent_heartbeats_received_total")


@dataclass
class ScaleResult:
    agents: int
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    heartbeats_per_s: float = 0.0
    flood_heartbeats_per_s: float = 0.0
    flood_cpu_percent: float = 0.0
    register_seconds: float = 0.0
    dispatch: list[float] = field(default_factory=list)  # seconds, submit -> received


def _dispatch_once(url: str) -> float:
    t0 = time.time()
    run_id = post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]
    run = wait(
        lambda: (r := get(f"{url}/api/v1/runs/{run_id}"))["end_time"] and r, 60, "a run", 0.01
    )
    assert run["status"] == "SUCCESS", run
    events = get(f"{url}/api/v1/runs/{run_id}/events?limit=10")["events"]
    start = next(e for e in events if e["type"] == "RUN_START")
    return start["data"]["launch_received_time"] - t0


def measure(agents: int, window: float = 30.0, runs: int = 60) -> ScaleResult:
    result = ScaleResult(agents)
    with Fleet() as fleet:
        fleet.add_agents(1, 4)
        started = time.monotonic()
        sim = spawn(
            [sys.executable, "-m", "bench.simagents", fleet.url, str(agents)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sim.stdout is not None
            line = sim.stdout.readline().strip()  # bounded: simagents' calls time out
            if line != "ready":
                raise RuntimeError(f"the simulated agents did not come up ({sim.wait(30)})")
            result.register_seconds = time.monotonic() - started
            time.sleep(6.0)  # one heartbeat interval: every agent is now on its own pace
            pid = fleet.control_plane.pid
            cpu0, beats0, t0 = cpu_seconds(pid), heartbeats_counted(fleet.url), time.monotonic()
            pause = window / runs
            for _ in range(runs):
                result.dispatch.append(_dispatch_once(fleet.url))
                time.sleep(max(0.0, pause - result.dispatch[-1]))
            elapsed = time.monotonic() - t0
            result.cpu_percent = 100 * (cpu_seconds(pid) - cpu0) / elapsed
            result.heartbeats_per_s = (heartbeats_counted(fleet.url) - beats0) / elapsed
            result.rss_bytes = rss_bytes(pid)
            sim.send_signal(signal.SIGUSR1)
            time.sleep(2.0)  # let the flood build up
            cpu0, beats0, t0 = cpu_seconds(pid), heartbeats_counted(fleet.url), time.monotonic()
            time.sleep(10.0)
            elapsed = time.monotonic() - t0
            result.flood_heartbeats_per_s = (heartbeats_counted(fleet.url) - beats0) / elapsed
            result.flood_cpu_percent = 100 * (cpu_seconds(pid) - cpu0) / elapsed
            result.rss_bytes = max(result.rss_bytes, rss_bytes(pid))
            if sim.poll() is not None:  # its figures would be a dead fleet's
                raise RuntimeError(f"the simulated agents exited ({sim.returncode})")
        finally:
            sim.terminate()
            sim.wait(30)
    return result


if __name__ == "__main__":
    from bench.harness import pct

    for n in [int(a) for a in sys.argv[1:]] or [1000, 5000]:
        r = measure(n)
        ms = [d * 1000 for d in r.dispatch]
        print(
            f"{n} agents: registered in {r.register_seconds:.1f} s, RSS "
            f"{r.rss_bytes / 2**20:.0f} MiB, CPU {r.cpu_percent:.0f} %, "
            f"{r.heartbeats_per_s:.0f} heartbeats/s; dispatch p50 {pct(ms, 0.5):.1f} ms "
            f"p99 {pct(ms, 0.99):.1f} ms; flood {r.flood_heartbeats_per_s:.0f} heartbeats/s "
            f"at {r.flood_cpu_percent:.0f} % CPU"
        )
