"""Workload 5: what the agent costs its host.

One agent (the PyInstaller binary `dist/fleetrun-agent` when it has been built, else
`fleetrun agent` on this Python) registered with a control plane:
- idle: RSS of the agent and its fork server, and their CPU over `idle_seconds` while it
  long-polls and heartbeats with nothing to run;
- per run: the agent's own CPU per `hello` run (the run worker's is not the agent's),
  over `runs` runs one after another, and its RSS after them (it should not grow).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO, Fleet, children, cpu_seconds, get, post, rss_bytes, wait

BINARY = REPO / "dist" / "fleetrun-agent"


@dataclass
class Footprint:
    agent: str  # which agent was measured
    idle_rss_bytes: int
    idle_cpu_percent: float
    cpu_ms_per_run: float
    rss_after_runs_bytes: int


def _agent_processes(pid: int) -> tuple[list[int], list[int]]:
    """(the agent's own processes, its fork servers). The binary is PyInstaller's
    bootloader with the agent as its child; run workers (children of a fork server) come
    and go and are not the agent's cost."""
    own, servers, todo = [], [], [pid]
    while todo:
        proc = todo.pop()
        cmdline = Path(f"/proc/{proc}/cmdline").read_bytes()
        if b"_forkserver" in cmdline or b"agent.forkserver" in cmdline:
            servers.append(proc)
            continue
        own.append(proc)
        todo.extend(children(proc))
    return own, servers


def measure(idle_seconds: float = 30.0, runs: int = 100) -> Footprint:
    with Fleet() as fleet:
        command = [str(BINARY), "run"] if BINARY.exists() else None
        fleet.add_agents(1, 4, command=command)
        pid = fleet.agents[0].pid
        time.sleep(2.0)  # past registration and the first describe
        own, servers = _agent_processes(pid)
        cpu0 = sum(cpu_seconds(p) for p in own + servers)
        time.sleep(idle_seconds)
        idle_cpu = sum(cpu_seconds(p) for p in own + servers) - cpu0
        idle_rss = sum(rss_bytes(p) for p in own + servers)
        agent_cpu0 = sum(cpu_seconds(p) for p in own)
        for _ in range(runs):
            run_id = post(f"{fleet.url}/api/v1/runs", {"job": "hello"})["run_id"]

            def ended(rid: str = run_id) -> str | None:
                return get(f"{fleet.url}/api/v1/runs/{rid}")["end_time"]

            wait(ended, 60, "a run", 0.005)
        per_run = (sum(cpu_seconds(p) for p in own) - agent_cpu0) * 1000 / runs
        after = sum(rss_bytes(p) for p in own + servers)
    return Footprint(
        "binary" if command else "python", idle_rss, 100 * idle_cpu / idle_seconds, per_run, after
    )


if __name__ == "__main__":
    f = measure()
    print(
        f"agent ({f.agent}): idle RSS {f.idle_rss_bytes / 2**20:.0f} MiB, idle CPU "
        f"{f.idle_cpu_percent:.2f} %; {f.cpu_ms_per_run:.1f} ms of agent CPU per run; "
        f"RSS after the runs {f.rss_after_runs_bytes / 2**20:.0f} MiB"
    )
