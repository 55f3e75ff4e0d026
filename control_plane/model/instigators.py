"""Schedules and sensors as stored: their state, and each tick's outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.model.times import iso


@dataclass
class InstigatorState:
    """What the control plane remembers of a schedule or sensor (status None: default)."""

    location: str
    name: str
    kind: str
    status: str | None = None
    cursor: str | None = None
    last_run_key: str | None = None
    last_tick_time: float | None = None


@dataclass
class Tick:
    id: int
    location: str
    name: str
    kind: str
    scheduled_time: float | None
    status: str  # STARTED | SUCCESS | SKIPPED | FAILURE
    skip_reason: str | None
    error: str | None
    run_ids: list[str]
    cursor: str | None
    start_time: float
    end_time: float | None
    failure_count: int = 0  # evaluations of this tick that raised (retried: max_tick_retries)

    def to_json(self) -> dict[str, Any]:
        return {
            "tick_id": self.id,
            "scheduled_time": iso(self.scheduled_time),
            "status": self.status,
            "skip_reason": self.skip_reason,
            "error": self.error,
            "run_ids": self.run_ids,
            "cursor": self.cursor,
            "start_time": iso(self.start_time),
            "end_time": iso(self.end_time),
            "failure_count": self.failure_count,
        }
