"""Per-step overhead of the executors: a 100-op chain (each op adds one to its input).

Submitted through a real control plane and agent; the figure is the time from the
worker's RUN_START to its RUN_SUCCESS (both stamped by the worker) / 100, so it includes
emitting each step's events and pickling and storing its output, not only the call. (The
control plane's own start and end times no longer serve: a run this fast now reaches it
in one batch, so both are stamped at the same instant.)
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.harness import FLEETRUN, chain_step_ms, fleet
from bench.harness import get as _get
from bench.harness import wait as _wait
from bench.monitoring import JOBS

STEPS = 100


def per_step_ms(executor: str, runs: int) -> list[float]:
    results = []
    with fleet("", agents=0, slots=1) as url:
        folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-exec-"))
        config = folder / "agent.toml"
        config.write_text(
            f'control_plane_url = "{url}"\nname = "exec"\n[[code_locations]]\n'
            f'name = "bench"\npython_file = "{JOBS}"\n'
        )
        agent = subprocess.Popen(
            [*FLEETRUN, "agent", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(
                lambda: any(a["code_locations"] for a in _get(f"{url}/api/v1/agents")["agents"]),
                60,
                "the agent",
            )
            results += [chain_step_ms(url, "chain_100", executor, STEPS) for _ in range(runs)]
        finally:
            agent.terminate()
            agent.wait(20)
    return results


def report(runs: int = 5) -> None:
    print(f"executors: {STEPS}-op chain, ms per step over {runs} runs")
    print(f"  {'executor':<28}{'p50':>8}{'max':>8}")
    for executor in ("in_process", "multiprocess"):
        ms = per_step_ms(executor, runs)
        print(f"  {executor:<28}{statistics.median(ms):>8.2f}{max(ms):>8.2f}")
