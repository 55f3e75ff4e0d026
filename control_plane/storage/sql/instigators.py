"""Schedules' and sensors' state, and their ticks (each finished with its runs, created
once by idempotency key, in one transaction)."""

from __future__ import annotations

import json

from control_plane.model.instigators import InstigatorState, Tick
from control_plane.model.runs import NewRun, Run
from control_plane.storage.sql.base import TICK_COLUMNS, SqlBase, tick_from_row
from control_plane.storage.sql.transitions import insert_run


class InstigatorQueries(SqlBase):
    async def instigator_states(self) -> dict[tuple[str, str, str], InstigatorState]:
        rows = await self._reader.fetch(
            "SELECT location, name, kind, status, cursor, last_run_key, last_tick_time"
            " FROM instigators"
        )
        return {
            (loc, name, kind): InstigatorState(loc, name, kind, status, cursor, key, last)
            for loc, name, kind, status, cursor, key, last in rows
        }

    async def set_instigator(
        self,
        location: str,
        name: str,
        kind: str,
        *,
        status: str | None = None,
        last_tick_time: float | None = None,
    ) -> None:
        """Record a start/stop (status) or where ticking resumes from (last_tick_time)."""
        async with self._write() as db:
            await db.execute(
                "INSERT INTO instigators (location, name, kind, status, last_tick_time)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                " status = COALESCE(excluded.status, instigators.status),"
                " last_tick_time = COALESCE(excluded.last_tick_time, instigators.last_tick_time)",
                (location, name, kind, status, last_tick_time),
            )

    async def start_tick(
        self, location: str, name: str, kind: str, scheduled_time: float | None, now: float
    ) -> Tick | None:
        """A STARTED tick; for a schedule, the existing one for that time if it has not
        finished (a retry after a crash), or None if it has."""
        async with self._write() as db:
            if scheduled_time is not None:
                rows = await db.fetch(
                    f"SELECT {TICK_COLUMNS} FROM ticks WHERE location = ? AND name = ?"
                    " AND kind = ? AND scheduled_time = ?",
                    (location, name, kind, scheduled_time),
                )
                if rows:
                    tick = tick_from_row(rows[0])
                    return tick if tick.status == "STARTED" else None
            ((tick_id,),) = await db.fetch(
                "INSERT INTO ticks (location, name, kind, scheduled_time, status, start_time)"
                " VALUES (?, ?, ?, ?, 'STARTED', ?) RETURNING id",
                (location, name, kind, scheduled_time, now),
            )
            if kind == "sensor":  # sensors tick start-to-start
                await db.execute(
                    "INSERT INTO instigators (location, name, kind, last_tick_time)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                    " last_tick_time = excluded.last_tick_time",
                    (location, name, kind, now),
                )
            rows = await db.fetch(f"SELECT {TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            return tick_from_row(rows[0])

    async def finish_tick(
        self,
        tick_id: int,
        status: str,
        runs: list[NewRun],
        now: float,
        skip_reason: str | None = None,
        error: str | None = None,
        cursor: str | None = None,
        failure_count: int = 0,
    ) -> tuple[Tick, list[Run]]:
        """End a tick: create its runs (each once, by idempotency key), record the outcome
        and move the schedule's position or the sensor's cursor, in one transaction."""
        async with self._write() as db:
            rows = await db.fetch(f"SELECT {TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            tick = tick_from_row(rows[0])
            created, repeated = [], []
            for run in runs:
                if run.idempotency_key is not None and await db.fetch(
                    "SELECT 1 FROM runs WHERE idempotency_key = ?", (run.idempotency_key,)
                ):
                    repeated.append(run.run_key or run.idempotency_key)
                    continue
                created.append(await insert_run(db, run, now))
            if status == "SUCCESS" and not created:
                status = "SKIPPED"
                skip_reason = f"runs already requested: {', '.join(repeated)}"
            run_ids = [r.run_id for r in created]
            await db.execute(
                "UPDATE ticks SET status = ?, skip_reason = ?, error = ?, run_ids = ?,"
                " cursor = ?, end_time = ?, failure_count = ? WHERE id = ?",
                (
                    status,
                    skip_reason,
                    error,
                    json.dumps(run_ids),
                    cursor,
                    now,
                    failure_count,
                    tick_id,
                ),
            )
            key = (tick.location, tick.name, tick.kind)
            if tick.kind == "schedule" and tick.scheduled_time is not None:
                await db.execute(
                    "INSERT INTO instigators (location, name, kind, last_tick_time)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (location, name, kind) DO UPDATE SET"
                    " last_tick_time = CASE WHEN instigators.last_tick_time"
                    " > excluded.last_tick_time THEN instigators.last_tick_time"
                    " ELSE excluded.last_tick_time END",
                    (*key, tick.scheduled_time),
                )
            if tick.kind == "sensor" and status in ("SUCCESS", "SKIPPED"):
                last_key = next((r.run_key for r in reversed(runs) if r.run_key), None)
                await db.execute(
                    "UPDATE instigators SET cursor = ?,"
                    " last_run_key = COALESCE(?, last_run_key)"
                    " WHERE location = ? AND name = ? AND kind = ?",
                    (cursor, last_key, *key),
                )
            rows = await db.fetch(f"SELECT {TICK_COLUMNS} FROM ticks WHERE id = ?", (tick_id,))
            return tick_from_row(rows[0]), created

    async def list_ticks(self, location: str, name: str, kind: str, limit: int) -> list[Tick]:
        rows = await self._reader.fetch(
            f"SELECT {TICK_COLUMNS} FROM ticks WHERE location = ? AND name = ? AND kind = ?"
            " ORDER BY id DESC LIMIT ?",
            (location, name, kind, limit),
        )
        return [tick_from_row(r) for r in rows]

    async def unfinished_ticks(self) -> list[Tick]:
        rows = await self._reader.fetch(
            f"SELECT {TICK_COLUMNS} FROM ticks WHERE status = 'STARTED' ORDER BY id"
        )
        return [tick_from_row(r) for r in rows]
