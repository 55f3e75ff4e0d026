"""Workload 10: the docker launcher and executor, next to the process launchers.

A Docker daemon of the benchmark's own (tests/dockerd.py: no bridge, no iptables, its
files in a temporary folder) and the tests' worker image, built locally by `docker
import` (nothing is pulled). Then:

1. submit -> STARTED of the `hello` example, `runs` times one after the other, through
   one agent with each launcher: forkserver, subprocess, docker (network none). As in
   workload 1, from just before the POST to the control plane's start_time, which the
   worker's RUN_START sets: with docker, creating and starting the container, and the
   worker's interpreter start inside it.
2. Per-step overhead of the executors on a 10-op chain (bench/jobs.py chain_10), run by
   a forkserver agent: (RUN_SUCCESS - RUN_START) / 10, both stamped by the worker, for
   multiprocess and docker (a container per step).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench.harness import Fleet, chain_step_ms, ts
from bench.latency import one_hello
from tests.dockerd import IMAGE, build_worker_image, start_dockerd

JOBS = Path(__file__).resolve().parent / "jobs.py"
CHAIN_STEPS = 10
LAUNCHERS = ("forkserver", "subprocess", "docker")


def _agent_toml(socket_url: str, launcher: str) -> str:
    return (
        f'run_launcher = "{launcher}"\n[docker]\nimage = "{IMAGE}"\nsocket = "{socket_url}"\n'
        'network = "none"\npull = "never"\n'
    )


def _per_step_ms(fleet: Fleet, executor: str, runs: int) -> list[float]:
    return [chain_step_ms(fleet.url, "chain_10", executor, CHAIN_STEPS) for _ in range(runs)]


def measure(runs: int = 20, chain_runs: int = 3) -> dict[str, list[float]]:
    """Seconds submit -> STARTED per launcher, and ms per step per executor."""
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-docker-"))
    daemon = start_dockerd(folder)
    found: dict[str, list[float]] = {}
    try:
        build_worker_image(daemon)
        for launcher in LAUNCHERS:
            with Fleet() as fleet:
                fleet.add_agents(1, 4, extra_toml=_agent_toml(daemon.url, launcher))
                one_hello(fleet.url)  # the first run warms the image's page cache
                found[launcher] = []
                for _ in range(runs):
                    _, t0, run = one_hello(fleet.url)
                    found[launcher].append(ts(run["start_time"]) - t0)
        with Fleet() as fleet:
            fleet.add_agents(1, 1, JOBS, _agent_toml(daemon.url, "forkserver"))
            for executor in ("multiprocess", "docker"):
                found[f"{executor} executor"] = _per_step_ms(fleet, executor, chain_runs)
    finally:
        try:
            daemon.remove_all()
        finally:
            daemon.stop()
            shutil.rmtree(folder, ignore_errors=True)
    return found


if __name__ == "__main__":
    import statistics

    for name, values in measure(10, 2).items():
        print(f"{name:<24} p50 {statistics.median(values):.3f}  max {max(values):.3f}")
