"""Workload 4: event ingestion, 50 concurrent runs logging in batches.

The runs are real runs of the control plane (submitted, queued, dispatched, leased);
their agent is simulated (bench/ingest_load.py, a separate process) so that what is
measured is what the control plane can take in: every record is decoded, checked
against the run's lease and stored in its event log, and acknowledged, batch after
batch. events/s = records the control plane counted as stored
(fleetrun_records_ingested_total) / the time from the first batch to the last ack.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from bench.harness import Fleet, cpu_seconds, get, metric, post, spawn, wait


def stored_events(url: str) -> float:
    return metric(url, 'fleetrun_records_ingested_total{kind="event"}')


@dataclass
class IngestResult:
    runs: int
    events: int  # stored
    seconds: float
    cpu_percent: float  # the control plane's, of one core

    @property
    def per_second(self) -> float:
        return self.events / self.seconds


def measure(
    runs: int = 50,
    events_per_run: int = 4000,
    batch: int = 500,
    storage_url: str = "sqlite:///b.db",
) -> IngestResult:
    with Fleet(f"[run_coordinator]\nmax_concurrent_runs = {runs}\n", storage_url) as fleet:
        load = spawn(
            [
                sys.executable,
                "-m",
                "bench.ingest_load",
                fleet.url,
                str(runs),
                str(events_per_run),
                str(batch),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert load.stdout is not None
            if load.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the ingest load generator did not start ({load.wait(30)})")
            ids = [
                post(
                    f"{fleet.url}/api/v1/runs",
                    {"job": "chatty", "tags": {"fleetrun/queue": "ingest"}},
                )["run_id"]
                for _ in range(runs)
            ]
            before, cpu0 = stored_events(fleet.url), cpu_seconds(fleet.control_plane.pid)
            line = load.stdout.readline()  # bounded: the generator's calls time out
            cpu = cpu_seconds(fleet.control_plane.pid) - cpu0
            if not line:
                raise RuntimeError(f"the ingest load generator failed ({load.wait(30)})")
            times = json.loads(line)
            stored = stored_events(fleet.url) - before
            for run_id in ids:

                def succeeded(rid: str = run_id) -> bool:
                    return get(f"{fleet.url}/api/v1/runs/{rid}")["status"] == "SUCCESS"

                wait(succeeded, 60, "the run's end", 0.05)
        finally:
            load.terminate()
            load.wait(30)
    expected = runs * (events_per_run + 2)
    if stored != expected:
        raise RuntimeError(f"stored {stored:.0f} records, expected {expected}")
    seconds = times["finished"] - times["started"]
    return IngestResult(runs, int(stored), seconds, 100 * cpu / seconds)


if __name__ == "__main__":
    result = measure()
    print(
        f"{result.runs} runs: {result.events} events in {result.seconds:.2f} s = "
        f"{result.per_second:,.0f} events/s; control plane CPU {result.cpu_percent:.0f} %"
    )
