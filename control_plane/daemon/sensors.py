"""The sensor daemon: sensors evaluated on agents, start-to-start, with a durable cursor.

A run_key a sensor already used never makes a second run (its idempotency key is the
sensor and the run key), also within one tick and across restarts. The cursor moves only
with a SUCCESS or SKIPPED tick; a sensor that raises records a FAILURE tick with the
error and keeps its interval.

A run status sensor's cursor is its place in the run-status history (storage numbers
every status change in commit order): each tick reads the changes after it, picks those
it watches (`watched_changes`), has the agent call the function once per run, and moves
the cursor in the transaction that records the tick and creates its runs; so each change
is handled once across restarts of either side, or again after a tick that failed. It
starts from the present, not from the beginning of history.
"""

from __future__ import annotations

import json

from control_plane.daemon.instigators import Instigator, Instigators, tick_and_report
from control_plane.model.instigators import Tick
from control_plane.model.runs import Run, StatusChange
from control_plane.model.statuses import RunStatus
from control_plane.storage.port import Storage
from protocol.messages import FailedStep, RunChange, SensorInfo

MAX_SLEEP_SECONDS = 5.0
CHANGES_READ_PER_TICK = 100
CHANGES_BYTES_PER_TICK = 1024 * 1024  # what one evaluation request may carry, roughly
MAX_FAILED_STEPS = 20
MAX_TEXT = 4096


async def sensor_pass(ctx: Instigators, now: float) -> float:
    """Start every sensor whose interval has passed (a task of the loop each, one at a
    time per sensor); returns when the next one is due."""
    wake_at = now + MAX_SLEEP_SECONDS
    for inst in await ctx.load(now):
        if inst.kind != "sensor" or not inst.running:
            continue
        assert isinstance(inst.definition, SensorInfo)
        key = (inst.location, inst.name)
        if ctx.tasks.running(key):
            continue
        due = (inst.state.last_tick_time or 0.0) + inst.definition.minimum_interval_seconds
        if due <= now:
            ctx.tasks.start(key, _tick(ctx, inst, now))
        else:
            wake_at = min(wake_at, due)
    return wake_at


async def _tick(ctx: Instigators, inst: Instigator, now: float) -> None:
    tick = await ctx.storage.start_tick(inst.location, inst.name, "sensor", None, now)
    assert tick is not None and isinstance(inst.definition, SensorInfo)
    if inst.definition.run_status is not None:
        await _run_status_tick(ctx, inst, tick, inst.definition)
        return
    await tick_and_report(
        ctx, inst, tick, cursor=inst.state.cursor, last_run_key=inst.state.last_run_key
    )


def watched_changes(
    sensor: SensorInfo, location: str, read: list[tuple[StatusChange, Run]]
) -> tuple[list[tuple[StatusChange, Run]], int]:
    """Of the status changes read after a run status sensor's cursor, those it is
    evaluated for (its monitored jobs, in its own location unless it watches every
    location), and the position it reaches: the last change taken, or passed over, within
    what one request may carry."""
    jobs = set(sensor.monitored_jobs)
    watched: list[tuple[StatusChange, Run]] = []
    position, size = 0, 0
    for change, run in read:
        if (sensor.monitor_all_locations or run.location == location) and (
            not jobs or run.job in jobs
        ):
            size += len(json.dumps(run.tags)) + len(run.status_reason or "") + 512
            if watched and size > CHANGES_BYTES_PER_TICK:
                break
            watched.append((change, run))
        position = change.id
    return watched, position


async def _run_status_tick(
    ctx: Instigators, inst: Instigator, tick: Tick, sensor: SensorInfo
) -> None:
    """One tick of a run status sensor: SKIPPED without asking an agent when no run it
    watches reached its status; else evaluated once per such run."""
    storage, now = ctx.storage, ctx.broker.clock.time()
    status = RunStatus(sensor.run_status or "")
    after = _position(inst.state.cursor)
    if after is None:
        start = await storage.last_status_change()
        reason = f"watching for runs that reach {status} from now on (history position {start})"
        await storage.finish_tick(
            tick.id, "SKIPPED", [], now, skip_reason=reason, cursor=str(start)
        )
        return
    read = await storage.status_changes(after, CHANGES_READ_PER_TICK, (status,))
    watched, position = watched_changes(sensor, inst.location, read)
    if not watched:
        reason = f"no monitored run reached {status} since the last tick"
        cursor = str(max(after, position))
        await storage.finish_tick(tick.id, "SKIPPED", [], now, skip_reason=reason, cursor=cursor)
        return
    changes = [await run_change(storage, change, run) for change, run in watched]
    await tick_and_report(
        ctx, inst, tick, str(position), cursor=inst.state.cursor, run_changes=changes
    )


def _position(cursor: str | None) -> int | None:
    """A run status sensor's cursor, or None to start from now (none yet, or one left
    by an ordinary sensor of the same name)."""
    try:
        return int(cursor) if cursor is not None else None
    except ValueError:
        return None


async def run_change(storage: Storage, change: StatusChange, run: Run) -> RunChange:
    """What the sensor's function sees of a run: for a failure, its failed steps."""
    failed = []
    if change.status == RunStatus.FAILURE:
        events = await storage.get_events(run.run_id, 0, MAX_FAILED_STEPS, ("STEP_FAILURE",))
        failed = [FailedStep(e.step or "", e.message[:MAX_TEXT]) for e in events]
    return RunChange(
        run_id=run.run_id,
        job=run.job,
        location=run.location,
        status=str(change.status),
        tags=dict(run.tags),
        status_reason=(run.status_reason or "")[:MAX_TEXT] or None,
        failure_kind=run.failure_kind,
        failure_steps=failed,
    )
