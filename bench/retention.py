"""Workload 8: the longest write pause while the retention loop purges N runs.

An SQLite instance is filled in bulk (N finished runs, each with 10 events and 2
compute-log chunks, ended 40 days ago); the retention loop's pass then runs, with its
own batches and pauses, until nothing is due, while a writer submits a run every 10 ms.
Reported: the longest single purge transaction, and the longest a submission waited
(what a user would see), with the time the whole purge took.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from control_plane.config import RetentionConfig
from control_plane.daemon.retention import DAY_SECONDS, Retention, retention_pass
from control_plane.model.retention import Purge, PurgeResult
from control_plane.model.runs import NewRun
from control_plane.storage.sqlite import SqliteStorage

EVENTS_PER_RUN = 10
LOGS_PER_RUN = 2


@dataclass
class RetentionResult:
    runs: int
    longest_purge_s: float
    longest_submit_s: float
    median_submit_s: float
    total_s: float


class TimedStorage(SqliteStorage):
    """Times each purge transaction."""

    durations: list[float]

    async def purge(self, purge: Purge, max_runs: int, max_rows: int) -> PurgeResult:
        start = time.perf_counter()
        try:
            return await super().purge(purge, max_runs, max_rows)
        finally:
            self.durations.append(time.perf_counter() - start)


def fill(path: str, runs: int, ended: float) -> None:
    """N finished runs with their events and logs, in bulk (not through the API)."""
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO runs (run_id, job, location, status, tags, config, create_time,"
        " start_time, end_time, update_time, last_event_seq) VALUES"
        " (?, 'etl', 'loc', 'SUCCESS', '{}', '{}', ?, ?, ?, ?, ?)",
        ((f"run-{i}", ended, ended, ended, ended, EVENTS_PER_RUN) for i in range(runs)),
    )
    db.executemany(
        "INSERT INTO events (run_id, seq, time, type, step, message, data)"
        " VALUES (?, ?, ?, 'LOG', 'a', 'a line of the log of a step', '{}')",
        ((f"run-{i}", seq, ended) for i in range(runs) for seq in range(1, EVENTS_PER_RUN + 1)),
    )
    db.executemany(
        "INSERT INTO compute_logs (run_id, step, stream, time, text)"
        " VALUES (?, 'a', 'stdout', ?, 'some output of the step\n')",
        ((f"run-{i}", ended) for i in range(runs) for _ in range(LOGS_PER_RUN)),
    )
    db.commit()
    db.close()


async def _purge_while_submitting(path: str, now: float) -> tuple[list[float], list[float], float]:
    storage = TimedStorage(path)
    storage.durations = []
    await storage.open()
    retention = Retention(storage, RetentionConfig(success_days=30))
    waits: list[float] = []
    done = asyncio.Event()

    async def submit() -> None:
        n = 0
        while not done.is_set():
            start = time.perf_counter()
            await storage.create_run(NewRun(f"new-{n}", "etl", "loc", {}, {}), now)
            waits.append(time.perf_counter() - start)
            n += 1
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(submit())
    start = time.perf_counter()
    try:
        while True:
            next_at = await retention_pass(retention, now)
            if next_at > now + retention.pause:
                break
            await asyncio.sleep(retention.pause)
    finally:
        total = time.perf_counter() - start
        done.set()
        await writer
        await storage.close()
    return storage.durations, waits, total


def purge_runs(runs: int = 20_000) -> RetentionResult:
    now = time.time()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "fleetrun.db")
        asyncio.run(_migrate(path))
        fill(path, runs, now - 40 * DAY_SECONDS)
        purges, waits, total = asyncio.run(_purge_while_submitting(path, now))
    return RetentionResult(runs, max(purges), max(waits), statistics.median(waits), total)


async def _migrate(path: str) -> None:
    storage = SqliteStorage(path)
    await storage.open()
    await storage.close()


if __name__ == "__main__":
    print(purge_runs())
