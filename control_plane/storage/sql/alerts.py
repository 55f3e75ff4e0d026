"""The alerts outbox (one row per rule and occurrence, claimed before each attempt) and
what alert detection reads: its cursors, failed ticks, runs queued for long."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from control_plane.model.alerts import FAILED, PENDING, SENT, AlertDelivery, Occurrence
from control_plane.model.instigators import Tick
from control_plane.model.runs import Run
from control_plane.storage.sql.base import (
    RUN_COLUMNS,
    TICK_COLUMNS,
    SqlBase,
    run_from_row,
    tick_from_row,
)

DELIVERY_COLUMNS = (
    "id, rule, event, dedup_key, payload, status, attempts, next_attempt_at, last_error,"
    " created_at, sent_at"
)


def delivery_from_row(row: Iterable[Any]) -> AlertDelivery:
    id_, rule, event, key, payload, status, attempts, due, error, created, sent = row
    return AlertDelivery(
        id_, rule, event, key, json.loads(payload), status, attempts, due, error, created, sent
    )


class AlertQueries(SqlBase):
    async def record_alerts(
        self, occurrences: list[Occurrence], cursors: dict[str, float], now: float
    ) -> list[Occurrence]:
        """Store each occurrence its rule has not stored before (pending, due now) and
        move the cursors forward, in one transaction; the occurrences that were new."""
        new: list[Occurrence] = []
        async with self._write_row() as db:
            for found in occurrences:
                added = await db.execute(
                    "INSERT INTO alert_deliveries (rule, event, dedup_key, payload, status,"
                    " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (rule, dedup_key) DO NOTHING",
                    (
                        found.rule,
                        found.event,
                        found.key,
                        json.dumps(found.payload),
                        PENDING,
                        now,
                        now,
                    ),
                )
                if added:
                    new.append(found)
            for name, value in cursors.items():
                await db.execute(
                    "INSERT INTO alert_cursors (name, value) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = CASE WHEN excluded.value"
                    " > alert_cursors.value THEN excluded.value ELSE alert_cursors.value END",
                    (name, value),
                )
        return new

    async def alert_cursors(self) -> dict[str, float]:
        rows = await self._reader.fetch("SELECT name, value FROM alert_cursors")
        return {name: float(value) for name, value in rows}

    async def claim_deliveries(self, now: float, hold: float, limit: int) -> list[AlertDelivery]:
        """Pending deliveries due by `now`, oldest due first, each claimed for an attempt:
        its attempts counted and its next attempt put `hold` s away, so that no pass (on
        any replica) takes it while it is in flight, and one whose sender died falls due
        again by itself."""
        claimed: list[AlertDelivery] = []
        async with self._write_row() as db:
            rows = await db.fetch(
                f"SELECT {DELIVERY_COLUMNS} FROM alert_deliveries WHERE status = ?"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                (PENDING, now, limit),
            )
            for row in rows:
                due = delivery_from_row(row)
                taken = await db.execute(
                    "UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = ?"
                    " WHERE id = ? AND status = ? AND attempts = ?",
                    (now + hold, due.id, PENDING, due.attempts),
                )
                if taken:
                    claimed.append(replace(due, attempts=due.attempts + 1, next_attempt_at=now))
        return claimed

    async def settle_delivery(
        self,
        delivery: AlertDelivery,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> bool:
        """Record the outcome of the attempt `delivery` was claimed for: sent (no error),
        pending again from `retry_at`, or failed for good. False if that claim is no
        longer the latest (it expired and another attempt took the row)."""
        if error is None:
            status, due = SENT, now
        else:
            status, due = (PENDING, retry_at) if retry_at is not None else (FAILED, now)
        async with self._write_row() as db:
            changed = await db.execute(
                "UPDATE alert_deliveries SET status = ?, next_attempt_at = ?,"
                " last_error = COALESCE(?, last_error), sent_at = ?"
                " WHERE id = ? AND status = ? AND attempts = ?",
                (
                    *(status, due, error, now if status == SENT else None),
                    *(delivery.id, PENDING, delivery.attempts),
                ),
            )
        return changed > 0

    async def next_delivery_due(self) -> float | None:
        rows = await self._reader.fetch(
            "SELECT MIN(next_attempt_at) FROM alert_deliveries WHERE status = ?", (PENDING,)
        )
        return None if rows[0][0] is None else float(rows[0][0])

    async def recent_deliveries(self, limit: int) -> list[AlertDelivery]:
        rows = await self._reader.fetch(
            f"SELECT {DELIVERY_COLUMNS} FROM alert_deliveries ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [delivery_from_row(r) for r in rows]

    async def tick_horizon(self) -> int:
        """The highest tick id below which every tick has finished."""
        rows = await self._reader.fetch(
            "SELECT MAX(id), MIN(CASE WHEN status = 'STARTED' THEN id END) FROM ticks"
        )
        latest, unfinished = rows[0]
        if unfinished is not None:
            return int(unfinished) - 1
        return int(latest or 0)

    async def failed_ticks(
        self, after: int, upto: int, limit: int
    ) -> list[tuple[Tick, str | None]]:
        columns = ", ".join(f"t.{c.strip()}" for c in TICK_COLUMNS.split(","))
        rows = await self._reader.fetch(
            f"SELECT {columns}, (SELECT p.status FROM ticks p WHERE p.location = t.location"
            " AND p.name = t.name AND p.kind = t.kind AND p.id < t.id"
            " ORDER BY p.id DESC LIMIT 1) FROM ticks t"
            " WHERE t.id > ? AND t.id <= ? AND t.status = 'FAILURE' ORDER BY t.id LIMIT ?",
            (after, upto, limit),
        )
        return [(tick_from_row(r[:-1]), r[-1]) for r in rows]

    async def queued_before(self, since: float, limit: int) -> list[Run]:
        rows = await self._reader.fetch(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status = 'QUEUED'"
            " AND COALESCE(status_time, create_time) <= ?"
            " AND COALESCE(not_before, 0) <= ? ORDER BY id LIMIT ?",
            (since, since, limit),
        )
        return [run_from_row(r) for r in rows]
