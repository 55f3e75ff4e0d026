"""The retention loop: purges what `[retention]` says has aged out, a small batch at a
time, so that submissions and ingestion never wait long for the write lock.

Each pass reads a snapshot (the oldest candidate of each kind, indexed reads), decides
which purges are due (`due_purges`, pure) and runs one batch of each, in order: whole
runs, then compute logs and outputs of the runs that are kept, then ticks. A full batch
means more may be left: the next pass comes after a short pause, in which other writers
take the lock. After a pass that removed rows, SQLite hands some free pages back to the
file system (incremental vacuum).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from control_plane.config import RetentionConfig
from control_plane.metrics import Metrics
from control_plane.model.retention import (
    COMPUTE_LOGS,
    OUTPUTS,
    RUNS,
    TICKS,
    Purge,
    PurgeResult,
    RetentionSnapshot,
)
from control_plane.storage.port import RetentionStore

log = logging.getLogger("fleetrun.retention")

DAY_SECONDS = 86400.0
BATCH_RUNS = 200  # runs per transaction at most
BATCH_ROWS = 5000  # events, log chunks, outputs or ticks per transaction, roughly
BATCH_PAUSE_SECONDS = 0.05  # between batches: other writers take the lock meanwhile
IDLE_SECONDS = 30.0  # between looks when nothing is due
VACUUM_PAGES = 2000  # pages handed back per pass (SQLite, auto_vacuum=INCREMENTAL)


def retention_rules(config: RetentionConfig, now: float) -> list[Purge]:
    """Every purge `config` asks for, with its cutoff as of `now`, in purge order."""
    limits = [
        (RUNS, "SUCCESS", config.success_days),
        (RUNS, "FAILURE", config.failure_days),
        (RUNS, "CANCELED", config.canceled_days),
        (COMPUTE_LOGS, None, config.compute_logs_days),
        (OUTPUTS, None, config.outputs_days),
        (TICKS, "SUCCESS", config.ticks_success_days),
        (TICKS, "SKIPPED", config.ticks_skipped_days),
        (TICKS, "FAILURE", config.ticks_failure_days),
    ]
    return [
        Purge(target, status, now - days * DAY_SECONDS)
        for target, status, days in limits
        if days > 0
    ]


def due_purges(config: RetentionConfig, now: float, snapshot: RetentionSnapshot) -> list[Purge]:
    """The purges with something older than their cutoff, in purge order."""
    due = []
    for purge in retention_rules(config, now):
        oldest = snapshot.oldest.get((purge.target, purge.status))
        if oldest is not None and oldest < purge.before:
            due.append(purge)
    return due


def enabled(config: RetentionConfig) -> bool:
    """Whether any data ages out at all (else the loop does not run)."""
    return bool(retention_rules(config, 0.0))


@dataclass
class Retention:
    """What the retention loop works with."""

    storage: RetentionStore
    config: RetentionConfig
    metrics: Metrics | None = None
    batch_runs: int = BATCH_RUNS
    batch_rows: int = BATCH_ROWS
    pause: float = BATCH_PAUSE_SECONDS


async def retention_pass(retention: Retention, now: float) -> float:
    """One batch of each due purge; soon again while batches come back full."""
    storage = retention.storage
    due = due_purges(retention.config, now, await storage.retention_snapshot())
    more = False
    removed = 0
    for purge in due:
        result = await storage.purge(purge, retention.batch_runs, retention.batch_rows)
        _count(retention.metrics, result)
        more = more or result.more
        removed += result.total_rows
    if removed:
        log.info("retention: purged %d rows", removed)
        await storage.reclaim_space(VACUUM_PAGES)
    return now + (retention.pause if more else IDLE_SECONDS)


def _count(metrics: Metrics | None, result: PurgeResult) -> None:
    if metrics is not None:
        metrics.purged(result.rows, result.bytes)
