"""Workload 1, hop by hop: where an idle submit -> STARTED goes, and this machine's floor.

The `hello` one-op job is submitted `runs` times, one after the other, to one agent
with 4 slots. The client waits on the run's event log with the API's long-poll (no
polling loop of its own to load the machine). Each hop is the difference of two
stamps taken on the path, all with this host's clock:

  submit           t0, the client, just before the POST
  accepted         the run's create_time: the control plane took the request
  assigned         RUN_STARTING's time: the run queue woke, planned and assigned it
                   (after the submission's fsync'd commit)
  launch received  the agent decoded the poll reply holding the launch
  worker forked    the agent got the worker's pid back (channel files, its cgroup, the
                   fork server's round trip)
  worker began     the forked worker reached agent.worker.main (it runs meanwhile, so
                   this hop is the agent's lag behind it, and may be negative)
  RUN_START        the worker wrote RUN_START (it loaded the job's code first)
  STARTED          the run's start_time: the control plane took RUN_START from the
                   agent (which tails the worker's channel)
  stored           the client's long-poll returned RUN_START: it was committed
                   (fsync'd) and its watchers woken

plus the client's own view of the submission (POST until its 201, which comes after
the run's commit). The floor is what the path cannot do without on this machine: one
`fork()` (with the child's exit reaped) and one fsync'd SQLite commit (WAL,
synchronous=FULL, the control plane's settings), each measured here `FLOOR_SAMPLES`
times.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Fleet, get, post, ts

STAMPS = (
    "submit",
    "accepted",
    "assigned",
    "launch received",
    "worker forked",
    "worker began",
    "RUN_START",
    "STARTED",
    "stored",
)
HOPS = [f"{a} -> {b}" for a, b in itertools.pairwise(STAMPS)]
FLOOR_SAMPLES = 200
TERMINAL = {"RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED"}


def _follow(url: str, run_id: str) -> tuple[list[dict[str, Any]], float]:
    """The run's events up to its end, and when the client first saw RUN_START."""
    events: list[dict[str, Any]] = []
    seen = 0.0
    deadline = time.monotonic() + 60
    while not events or events[-1]["type"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not end within 60 s")
        after = events[-1]["seq"] if events else 0
        page = get(f"{url}/api/v1/runs/{run_id}/events?after={after}&wait=10")["events"]
        now = time.time()
        if not seen and any(e["type"] == "RUN_START" for e in page):
            seen = now
        events += page
    return events, seen


def one_run(url: str) -> dict[str, float]:
    """One `hello` run's stamps (seconds since the epoch) and its POST round trip."""
    t0 = time.time()
    run_id = post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]
    acked = time.time()
    events, seen = _follow(url, run_id)
    assert events[-1]["type"] == "RUN_SUCCESS", events[-1]
    run = get(f"{url}/api/v1/runs/{run_id}")
    first = {e["type"]: e for e in reversed(events)}
    start = first["RUN_START"]
    data = start["data"]
    return {
        "submit": t0,
        "accepted": ts(run["create_time"]),
        "assigned": ts(first["RUN_STARTING"]["time"]),
        "launch received": data["launch_received_time"],
        "worker forked": data["worker_spawned_time"],
        "worker began": data["worker_began_time"],
        "RUN_START": ts(start["time"]),
        "STARTED": ts(run["start_time"]),
        "stored": seen,
        "POST round trip": acked - t0,
    }


def idle(runs: int = 100, storage_url: str = "sqlite:///b.db") -> dict[str, list[float]]:
    """Seconds per run for each hop ("a -> b"), submit -> STARTED, submit -> stored and
    the POST round trip."""
    found: dict[str, list[float]] = {}
    with Fleet(storage_url=storage_url) as fleet:
        fleet.add_agents(1, 4)
        one_run(fleet.url)  # the first run warms the code location's imports up
        for _ in range(runs):
            stamps = one_run(fleet.url)
            for a, b in itertools.pairwise(STAMPS):
                found.setdefault(f"{a} -> {b}", []).append(stamps[b] - stamps[a])
            found.setdefault("submit -> STARTED", []).append(stamps["STARTED"] - stamps["submit"])
            found.setdefault("submit -> stored", []).append(stamps["stored"] - stamps["submit"])
            found.setdefault("POST round trip", []).append(stamps["POST round trip"])
    return found


def fork_seconds(samples: int = FLOOR_SAMPLES) -> list[float]:
    """A bare fork: fork, the child exits at once, the parent reaps it."""
    taken = []
    for _ in range(samples):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        taken.append(time.perf_counter() - t0)
    return taken


def commit_seconds(samples: int = FLOOR_SAMPLES) -> list[float]:
    """One small row inserted and committed, fsync'd, as the control plane commits."""
    with tempfile.TemporaryDirectory(prefix="fleetrun-floor-") as folder:
        db = sqlite3.connect(Path(folder) / "floor.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            taken = []
            for i in range(samples):
                t0 = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t (body) VALUES (?)", (f"row {i}",))
                db.execute("COMMIT")
                taken.append(time.perf_counter() - t0)
        finally:
            db.close()
    return taken


if __name__ == "__main__":
    import statistics
    import sys

    from bench.harness import pct

    measured = idle(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
    measured["floor: bare fork"] = fork_seconds()
    measured["floor: fsync'd commit"] = commit_seconds()
    for name, values in measured.items():
        print(
            f"{name:40} p50 {statistics.median(values) * 1000:7.2f} ms"
            f"  p99 {pct(values, 0.99) * 1000:7.2f} ms"
        )
