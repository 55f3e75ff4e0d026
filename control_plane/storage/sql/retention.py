"""Deletion and retention: removing a finished run with everything stored under it, and
purging what aged out in small batches.

Every delete of a run is guarded in its own statement (`DELETE FROM runs … AND status IN
(terminal)`), so a run that is still going, or that started again meanwhile, is never
touched, whatever the caller read before. A batch is one short write transaction: the
write lock is held for one batch, never for a whole purge.
"""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.model.retention import (
    COMPUTE_LOGS,
    OUTPUTS,
    RUN_TABLES,
    RUNS,
    TICKS,
    Purge,
    PurgeResult,
    RetentionSnapshot,
    take_batch,
)
from control_plane.model.runs import Run
from control_plane.model.statuses import TERMINAL_STATUSES
from control_plane.storage.errors import RunActive, RunHasLiveChildren, UnknownRun
from control_plane.storage.logstore import LogStore
from control_plane.storage.sql.base import SqlBase, Tx, in_chunks, marks
from control_plane.storage.sql.transitions import get_run

TERMINAL = tuple(sorted(str(s) for s in TERMINAL_STATUSES))
TICK_END_STATUSES = ("SUCCESS", "SKIPPED", "FAILURE")
IN_TERMINAL = f"status IN ({marks(TERMINAL)})"
NO_LIVE_CHILD = (
    "NOT EXISTS (SELECT 1 FROM runs c WHERE c.parent_run_id = runs.run_id"
    f" AND c.status NOT IN ({marks(TERMINAL)}))"
)
# Approximate bytes of a row's text, per table a run's deletion empties.
ROW_BYTES = {
    "events": "LENGTH(message) + LENGTH(data)",
    "compute_logs": "LENGTH(text) + COALESCE(file_length, 0)",
    "step_outputs": "size",
    "run_attempts": "0",
    "run_tags": "LENGTH(key) + LENGTH(value)",
    "run_status_changes": "0",
    "step_tasks": "LENGTH(tags) + LENGTH(inputs) + COALESCE(LENGTH(outcome), 0)",
}


class RetentionQueries(SqlBase):
    logs: LogStore  # the text of deleted runs' logs goes too (storage/logstore.py)

    async def delete_run(self, run_id: str) -> Run:
        async with self._write() as db:
            run = await get_run(db, run_id)
            if run is None:
                raise UnknownRun(run_id)
            if run.status not in TERMINAL_STATUSES:
                raise RunActive(f"run {run_id} is {run.status}: cancel it or wait for its end")
            live = await db.fetch(
                "SELECT run_id, status FROM runs WHERE parent_run_id = ?"
                f" AND status NOT IN ({marks(TERMINAL)}) LIMIT 5",
                (run_id, *TERMINAL),
            )
            if live:
                named = ", ".join(f"{child} ({status})" for child, status in live)
                raise RunHasLiveChildren(
                    f"run {run_id} is the parent of runs that have not ended: {named};"
                    " delete it once they end"
                )
            deleted = await _delete_runs(db, [run_id], PurgeResult())
            if not deleted:
                raise RunActive(f"run {run_id} is no longer finished")
        await self.logs.forget(deleted)
        return run

    async def retention_snapshot(self) -> RetentionSnapshot:
        reader = self._reader
        oldest: dict[tuple[str, str | None], float | None] = {}
        for status in TERMINAL:
            rows = await reader.fetch("SELECT MIN(end_time) FROM runs WHERE status = ?", (status,))
            oldest[(RUNS, status)] = rows[0][0]
        rows = await reader.fetch("SELECT time FROM compute_logs ORDER BY id LIMIT 1")
        oldest[(COMPUTE_LOGS, None)] = rows[0][0] if rows else None
        rows = await reader.fetch("SELECT MIN(create_time) FROM step_outputs")
        oldest[(OUTPUTS, None)] = rows[0][0]
        for status in TICK_END_STATUSES:
            rows = await reader.fetch("SELECT MIN(end_time) FROM ticks WHERE status = ?", (status,))
            oldest[(TICKS, status)] = rows[0][0]
        return RetentionSnapshot(oldest)

    async def purge(self, purge: Purge, max_runs: int, max_rows: int) -> PurgeResult:
        result = PurgeResult()
        async with self._write() as db:
            if purge.target == RUNS:
                await _purge_runs(db, purge, max_runs, max_rows, result)
            elif purge.target == COMPUTE_LOGS:
                await _purge_logs(db, purge.before, max_rows, result)
            elif purge.target == OUTPUTS:
                await _purge_outputs(db, purge.before, max_rows, result)
            elif purge.target == TICKS:
                await _purge_ticks(db, purge, max_rows, result)
            else:
                raise ValueError(f"unknown purge target {purge.target!r}")
        await self.logs.forget(result.emptied_runs)
        return result

    async def reclaim_space(self, pages: int) -> None:
        """Give freed pages back to the file system (a database that can, SQLite)."""


async def _delete_runs(db: Tx, run_ids: Sequence[str], result: PurgeResult) -> list[str]:
    """Delete these runs where they are finished (guarded here), then their rows."""
    deleted: list[str] = []
    for chunk, places in in_chunks(run_ids):
        rows = await db.fetch(
            f"DELETE FROM runs WHERE run_id IN ({places}) AND {IN_TERMINAL} RETURNING run_id",
            (*chunk, *TERMINAL),
        )
        deleted.extend(row[0] for row in rows)
    result.add("runs", len(deleted), 0)
    result.emptied_runs.extend(deleted)
    for chunk, places in in_chunks(deleted):
        for table in RUN_TABLES:
            size = await db.fetch(
                f"SELECT COUNT(*), COALESCE(SUM({ROW_BYTES[table]}), 0) FROM {table}"
                f" WHERE run_id IN ({places})",
                chunk,
            )
            count = await db.execute(f"DELETE FROM {table} WHERE run_id IN ({places})", chunk)
            result.add(table, count, int(size[0][1]))
    return deleted


async def _purge_runs(
    db: Tx, purge: Purge, max_runs: int, max_rows: int, result: PurgeResult
) -> None:
    candidates = await db.fetch(
        "SELECT run_id, last_event_seq FROM runs WHERE status = ? AND end_time < ?"
        f" AND {NO_LIVE_CHILD} ORDER BY end_time LIMIT ?",
        (purge.status, purge.before, *TERMINAL, max_runs),
    )
    batch = take_batch([(r[0], int(r[1])) for r in candidates], max_runs, max_rows)
    await _delete_runs(db, batch, result)
    result.more = len(candidates) == max_runs or len(batch) < len(candidates)


async def _purge_logs(db: Tx, before: float, max_rows: int, result: PurgeResult) -> None:
    """Chunks written before `before`, of finished runs. Ids ascend with time, so the scan
    stops at the first young chunk instead of reading the whole table."""
    young = await db.fetch(
        "SELECT id FROM compute_logs WHERE time >= ? ORDER BY id LIMIT 1", (before,)
    )
    bound = "AND c.id < ?" if young else ""
    rows = await db.fetch(
        "SELECT c.id, LENGTH(c.text) + COALESCE(c.file_length, 0), c.run_id"
        " FROM compute_logs c JOIN runs r ON r.run_id = c.run_id"
        f" WHERE c.time < ? {bound} AND r.{IN_TERMINAL} ORDER BY c.id LIMIT ?",
        (before, *([young[0][0]] if young else []), *TERMINAL, max_rows),
    )
    ids = [row[0] for row in rows]
    for chunk, places in in_chunks(ids):
        await db.execute(f"DELETE FROM compute_logs WHERE id IN ({places})", chunk)
    result.add("compute_logs", len(ids), sum(int(row[1]) for row in rows))
    result.more = len(ids) == max_rows
    touched = sorted({row[2] for row in rows})
    kept: set[str] = set()
    for chunk, places in in_chunks(touched):
        found = await db.fetch(
            f"SELECT DISTINCT run_id FROM compute_logs WHERE run_id IN ({places})", chunk
        )
        kept.update(row[0] for row in found)
    result.emptied_runs.extend(r for r in touched if r not in kept)


async def _purge_outputs(db: Tx, before: float, max_rows: int, result: PurgeResult) -> None:
    rows = await db.fetch(
        "SELECT o.run_id, o.step, o.size FROM step_outputs o JOIN runs r ON r.run_id = o.run_id"
        f" WHERE o.create_time < ? AND r.{IN_TERMINAL} ORDER BY o.create_time LIMIT ?",
        (before, *TERMINAL, max_rows),
    )
    await db.executemany(
        "DELETE FROM step_outputs WHERE run_id = ? AND step = ?", [(r[0], r[1]) for r in rows]
    )
    result.add("step_outputs", len(rows), sum(int(row[2]) for row in rows))
    result.more = len(rows) == max_rows


async def _purge_ticks(db: Tx, purge: Purge, max_rows: int, result: PurgeResult) -> None:
    rows = await db.fetch(
        "SELECT id, LENGTH(COALESCE(error, '')) + LENGTH(run_ids) FROM ticks"
        " WHERE status = ? AND end_time < ? ORDER BY end_time LIMIT ?",
        (purge.status, purge.before, max_rows),
    )
    ids = [row[0] for row in rows]
    for chunk, places in in_chunks(ids):
        await db.execute(f"DELETE FROM ticks WHERE id IN ({places})", chunk)
    result.add("ticks", len(ids), sum(int(row[1]) for row in rows))
    result.more = len(ids) == max_rows
