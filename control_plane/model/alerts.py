"""Alerts: what happened that an operator must hear of (an occurrence), and the outbox row
that carries it to a webhook (a delivery).

An occurrence is named by its event and a dedup key that stays the same however often
it is detected (`run_failure/<run id>`); storage keeps one delivery per rule and key, so
each rule announces each occurrence once, across replicas and restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.model.times import iso

RUN_FAILURE = "run_failure"
RUN_MAX_RUNTIME = "run_max_runtime"
RUN_QUEUED_TOO_LONG = "run_queued_too_long"
AGENT_OFFLINE = "agent_offline"
TICK_FAILURE = "tick_failure"
DAEMON_STALE = "daemon_stale"
ALERT_EVENTS = (
    RUN_FAILURE,
    RUN_MAX_RUNTIME,
    RUN_QUEUED_TOO_LONG,
    AGENT_OFFLINE,
    TICK_FAILURE,
    DAEMON_STALE,
)
RUN_EVENTS = frozenset({RUN_FAILURE, RUN_MAX_RUNTIME, RUN_QUEUED_TOO_LONG})

PENDING, SENT, FAILED = "pending", "sent", "failed"
DELIVERY_STATUSES = (PENDING, SENT, FAILED)


@dataclass(frozen=True)
class Occurrence:
    """One thing a rule announces: stored once per (rule, key), then delivered."""

    rule: str
    event: str
    key: str  # stable across detections, e.g. run_failure/<run id>
    payload: dict[str, Any]  # the webhook's JSON body


@dataclass(frozen=True)
class AlertDelivery:
    """An occurrence in the outbox, and how far its delivery got."""

    id: int
    rule: str
    event: str
    key: str
    payload: dict[str, Any]
    status: str  # pending | sent | failed
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "alert": self.rule,
            "event": self.event,
            "key": self.key,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.status == PENDING else None,
            "last_error": self.last_error,
            "created_at": iso(self.created_at),
            "sent_at": iso(self.sent_at),
            "text": str(self.payload.get("text", "")),
            "payload": self.payload,
        }
