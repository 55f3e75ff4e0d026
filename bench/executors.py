"""Per-step overhead of the executors: a 100-op chain (each op adds one to its input)
and a 100-step fan-out (one root, 99 steps that take its output, all ready at once).

Submitted through a real control plane and agents; the figure is the time from the
worker's RUN_START to its RUN_SUCCESS (both stamped by the worker) / 100, so it includes
emitting each step's events and pickling and storing its output, not only the call. (The
control plane's own start and end times no longer serve: a run this fast now reaches it
in one batch, so both are stamped at the same instant.) `in_process` and `multiprocess`
run on one agent; `fleet` runs each step as a step task placed on any of 4 agents (its
chain's steps still run one after another: each waits for the one before).
"""

from __future__ import annotations

import statistics

from bench.harness import Fleet, chain_step_ms
from bench.monitoring import JOBS

STEPS = 100
FLEET_AGENTS = 4
SLOTS = 8  # per agent: the fan-out has room on each


def per_step_ms(executor: str, runs: int, job: str = "chain_100") -> list[float]:
    """`runs` runs of `job` under `executor`, each its ms per step."""
    agents = FLEET_AGENTS if executor == "fleet" else 1
    with Fleet() as running:
        running.add_agents(agents, SLOTS, location=JOBS)
        return [chain_step_ms(running.url, job, executor, STEPS) for _ in range(runs)]


CASES = [
    ("in_process", "chain_100"),
    ("multiprocess", "chain_100"),
    ("fleet", "chain_100"),
    ("in_process", "fan_out_100"),
    ("multiprocess", "fan_out_100"),
    ("fleet", "fan_out_100"),
]


def describe(executor: str, job: str) -> str:
    shape = "chain" if job == "chain_100" else "fan-out"
    where = f"{FLEET_AGENTS} agents" if executor == "fleet" else "1 agent"
    return f"{executor} executor, per step of a {STEPS}-step {shape} ({where})"


def report(runs: int = 5) -> None:
    print(f"executors: ms per step over {runs} runs")
    print(f"  {'executor':<14}{'job':<14}{'agents':>7}{'p50':>8}{'max':>8}")
    for executor, job in CASES:
        ms = per_step_ms(executor, runs, job)
        agents = FLEET_AGENTS if executor == "fleet" else 1
        print(f"  {executor:<14}{job:<14}{agents:>7}{statistics.median(ms):>8.2f}{max(ms):>8.2f}")


if __name__ == "__main__":
    report()
