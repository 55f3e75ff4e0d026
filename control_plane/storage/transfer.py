"""Moving an instance between databases: `fleetrun migrate --from URL --to URL`.

Copies everything an instance remembers - runs with their tags, attempts (leases),
events, compute logs and outputs; agents and code locations; schedules' and sensors'
state and ticks; tokens; the alerts outbox and its cursors (so no alert is sent twice);
pool limits and the slots runs hold or wait for - from one storage to another of either
kind, keeping every id, so leases stay fenced and cursors stay valid. Leader leases and
evaluations in flight are not copied: they belong to running processes. Stop the control
plane first; the destination must hold no instance yet.
"""

from __future__ import annotations

from collections.abc import Callable

from control_plane.storage import open_storage
from control_plane.storage.sql import SqlStorage

BATCH = 500

# Each table: its key (rows are read in key order, a page after the last key seen) and
# its other columns. Leases (run_attempts.attempt_id) and every other id keep their value.
TABLES: list[tuple[str, str, str]] = [
    (
        "runs",
        "id",
        "run_id, job, location, status, status_reason, tags, config, priority,"
        " queue, agent_id, lease, create_time, start_time, end_time, update_time,"
        " last_event_seq, status_time, not_before, failure_kind, retry_pending, parent_run_id,"
        " root_run_id, resume_count, reuse_outputs, launch_acked, idempotency_key,"
        " code_retries, code_version, wanted_code_version",
    ),
    ("run_tags", "run_id, key", "value, run_pk"),
    ("run_attempts", "attempt_id", "run_id, agent_id, create_time, acked_seq"),
    ("events", "id", "run_id, seq, time, type, step, message, data, attempt"),
    ("run_status_changes", "id", "run_id, status, time"),
    ("compute_logs", "id", "run_id, attempt, step, stream, time, text, file_offset, file_length"),
    ("step_outputs", "run_id, step", "attempt, size, data, create_time"),
    (
        "agents",
        "agent_id",
        "name, hostname, status, queues, max_concurrent_runs, version,"
        " last_heartbeat, registered_time, capabilities, token_name, operator_drain,"
        " labels, resources, reload_request",
    ),
    ("code_locations", "agent_id, name", "info"),
    ("instigators", "location, name, kind", "status, cursor, last_run_key, last_tick_time"),
    (
        "ticks",
        "id",
        "location, name, kind, scheduled_time, status, skip_reason, error,"
        " run_ids, cursor, start_time, end_time, failure_count",
    ),
    ("tokens", "token_id", "name, kind, role, salt, hash, create_time, last_used, revoked_time"),
    (
        "alert_deliveries",
        "id",
        "rule, event, dedup_key, payload, status, attempts, next_attempt_at, last_error,"
        " created_at, sent_at",
    ),
    ("alert_cursors", "name", "value"),
    ("pool_limits", "name", "slot_limit, update_time"),
    (
        "pool_slots",
        "id",
        "pool, run_id, lease, step, attempt, priority, create_time, granted_time, noted",
    ),
    (
        "step_tasks",
        "task_id",
        "run_id, run_lease, step, attempt, queue, tags, inputs, status, create_time,"
        " agent_id, lease, start_time, end_time, outcome",
    ),
]
# What is not copied, and why: the destination makes its own.
NOT_COPIED = {
    "schema_version": "the destination's migrations write it",
    "leader_leases": "they belong to running replicas",
    "evaluations": "they belong to running replicas",
    "catalog": "a version number each process compares with its own copy",
    "agents.catalog_version": "the same version number, per agent",
}
IDENTITY = {
    "runs": "id",
    "run_attempts": "attempt_id",
    "events": "id",
    "run_status_changes": "id",
    "compute_logs": "id",
    "ticks": "id",
    "alert_deliveries": "id",
    "pool_slots": "id",
    "step_tasks": "task_id",
}  # the columns whose sequences continue after the copied ids


class TransferError(Exception):
    pass


async def migrate_schema(url: str) -> tuple[int, int]:
    """Apply pending migrations to the storage at `url`; (version before, after)."""
    storage = open_storage(url)
    storage.auto_migrate = False
    await storage.open()
    try:
        return await storage.migrate()
    finally:
        await storage.close()


async def copy_instance(
    source_url: str, dest_url: str, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy every table from `source_url` to `dest_url` (both migrated first); the
    number of rows copied per table."""
    source, dest = open_storage(source_url), open_storage(dest_url)
    await source.open()
    try:
        await dest.open()
        try:
            assert isinstance(source, SqlStorage) and isinstance(dest, SqlStorage)
            return await _copy(source, dest, progress)
        finally:
            await dest.close()
    finally:
        await source.close()


async def _copy(
    source: SqlStorage, dest: SqlStorage, progress: Callable[[str, int], None] | None
) -> dict[str, int]:
    for table, _, _ in TABLES:
        if await dest._reader.fetch(f"SELECT 1 FROM {table} LIMIT 1"):
            raise TransferError(
                f"the destination already holds an instance ({table} is not "
                "empty); copy into an empty database or schema"
            )
    copied: dict[str, int] = {}
    for table, key, rest in TABLES:
        columns = f"{key}, {rest}"
        width = len(key.split(","))
        marks = ", ".join("?" * len(columns.split(",")))
        after = ", ".join("?" * width)
        select = f"SELECT {columns} FROM {table}"
        last: tuple | None = None
        count = 0
        while True:
            if last is None:
                sql, args = f"{select} ORDER BY {key} LIMIT ?", (BATCH,)
            else:
                sql = f"{select} WHERE ({key}) > ({after}) ORDER BY {key} LIMIT ?"
                args = (*last, BATCH)
            rows = await source._reader.fetch(sql, args)
            if not rows:
                break
            async with dest._write() as db:
                await db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            count += len(rows)
            last = rows[-1][:width]
        copied[table] = count
        if progress is not None:
            progress(table, count)
    await dest.continue_ids(IDENTITY)
    return copied
