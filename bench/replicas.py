"""Workload 7: submit -> launch received when the run goes to a replica that does not
lead the run queue.

Two `fleetrun serve` replicas on one PostgreSQL schema: replica a starts first and
leads every daemon loop; one agent polls replica b only. The `hello` job is submitted
`runs` times, one after the other, to b. Per run, from `t0` taken just before the POST,
to RUN_START's `launch_received_time` (stamped by the agent when the launch reached it).
Every hop crosses replicas: b stores the run and wakes the run queue on a (NOTIFY), a
assigns it and wakes the agent's poll held by b (NOTIFY).
"""

from __future__ import annotations

from bench.harness import Fleet, get, wait
from bench.latency import one_hello

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
LOOPS = {"run-queue", "retries", "scheduler", "sensors", "monitor"}


def non_leader(runs: int = 50, storage_url: str = POSTGRES_URL) -> list[float]:
    """Seconds per run: submit to the replica that does not lead -> launch received."""
    with Fleet(storage_url=storage_url) as fleet:
        leader = fleet.url
        wait(lambda: set(get(f"{leader}/readyz")["leading"]) == LOOPS, 30, "a to lead")
        other = fleet.add_replica()
        fleet.add_agents(1, 4, url=other)
        return [one_hello(other)[0] for _ in range(runs)]
