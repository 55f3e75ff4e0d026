"""What ages out of an instance: the purges the retention loop asks storage for, what it
sees of storage before deciding, and what a purge removed.

A purge names one kind of data (`target`), for runs and ticks one status, and a cutoff
time: what ended (a run, a tick) or was written (a log chunk, an output) before it goes.
Storage carries out one purge in small batches; the decision of which purges are due
lives in `daemon/retention.py` and is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

RUNS = "runs"  # whole runs: the run and everything stored under it
COMPUTE_LOGS = "compute_logs"  # log chunks of finished runs that are kept
OUTPUTS = "outputs"  # stored step outputs of finished runs that are kept
TICKS = "ticks"  # schedule and sensor ticks
PURGE_TARGETS = (RUNS, COMPUTE_LOGS, OUTPUTS, TICKS)

# The tables a run's deletion empties of its rows, `runs` last but guarded first.
RUN_TABLES = (
    "events",
    "compute_logs",
    "step_outputs",
    "run_attempts",
    "run_tags",
    "run_status_changes",
    "step_tasks",
)


@dataclass(frozen=True)
class Purge:
    """Remove `target` rows (of `status`, for runs and ticks) older than `before`."""

    target: str
    status: str | None
    before: float


@dataclass(frozen=True)
class RetentionSnapshot:
    """The oldest candidate time of each (target, status), None where there is none."""

    oldest: dict[tuple[str, str | None], float | None] = field(default_factory=dict)


@dataclass
class PurgeResult:
    """What one batch removed: rows by table, approximate bytes of their text, and
    whether more may be left (the batch was full)."""

    rows: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    more: bool = False
    emptied_runs: list[str] = field(default_factory=list)  # runs left with no log chunk

    def add(self, table: str, count: int, size: int) -> None:
        if count:
            self.rows[table] = self.rows.get(table, 0) + count
        self.bytes += size

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def take_batch(candidates: Sequence[tuple[str, int]], max_runs: int, max_rows: int) -> list[str]:
    """The runs of one purge batch, oldest first: at most `max_runs`, and stop before
    their events pass `max_rows` (always at least one run), so that no transaction
    deletes much more than `max_rows` rows. `candidates` pairs a run with its events."""
    taken: list[str] = []
    rows = 0
    for run_id, events in candidates[:max_runs]:
        if taken and rows + events > max_rows:
            break
        taken.append(run_id)
        rows += events
    return taken
