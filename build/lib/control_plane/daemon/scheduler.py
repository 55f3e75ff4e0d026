"""The scheduler: cron schedules turned into runs, on time, exactly once per tick.

Its pass asks to run again when the next tick is due (not a fixed minute loop). A due
tick is recorded (STARTED) before it is evaluated on an agent; its runs are created with
an idempotency key (schedule, tick time, request) in the transaction that finishes the
tick, so a tick retried after a crash never makes a second run. Tick times come from
`ticks.py` (croniter, IANA zones, Dagster's DST rules).
"""

from __future__ import annotations

from control_plane.daemon.instigators import Instigator, Instigators, tick_and_report
from control_plane.daemon.ticks import due_ticks, next_tick
from protocol.messages import ScheduleInfo

MAX_SLEEP_SECONDS = 10.0


async def schedule_pass(ctx: Instigators, now: float) -> float:
    """Start every due tick (as a task of the loop); returns when the next one is due.
    The first pass after this replica took over resumes what a crash left unfinished."""
    if not ctx.resumed:
        await resume_unfinished(ctx, now)
        ctx.resumed = True
    wake_at = now + MAX_SLEEP_SECONDS
    for inst in await ctx.load(now):
        if inst.kind != "schedule" or not inst.running:
            continue
        assert isinstance(inst.definition, ScheduleInfo)
        cron, tz = inst.definition.cron, inst.definition.timezone
        last = inst.state.last_tick_time
        if last is None:  # just turned on: from now, no backfill
            await ctx.storage.set_instigator(
                inst.location, inst.name, "schedule", last_tick_time=now
            )
            last = now
        for ts in due_ticks(cron, tz, last, now, inst.definition.catchup):
            _start(ctx, inst, ts, now)
        wake_at = min(wake_at, next_tick(cron, tz, max(last, now)))
    return wake_at


def _start(ctx: Instigators, inst: Instigator, scheduled_time: float, now: float) -> None:
    key = (inst.location, inst.name, scheduled_time)
    if not ctx.tasks.running(key):
        ctx.tasks.start(key, _tick(ctx, inst, scheduled_time, now))


async def _tick(ctx: Instigators, inst: Instigator, scheduled_time: float, now: float) -> None:
    tick = await ctx.storage.start_tick(inst.location, inst.name, "schedule", scheduled_time, now)
    if tick is not None:  # None: already done (before a restart)
        await tick_and_report(ctx, inst, tick, scheduled_time=scheduled_time)


async def resume_unfinished(ctx: Instigators, now: float) -> None:
    """Ticks a crash left STARTED are evaluated again (their runs are not duplicated)."""
    by_key = {(i.location, i.name, i.kind): i for i in await ctx.load(now)}
    for tick in await ctx.storage.unfinished_ticks():
        inst = by_key.get((tick.location, tick.name, tick.kind))
        if tick.kind == "schedule" and inst is not None and tick.scheduled_time is not None:
            _start(ctx, inst, tick.scheduled_time, now)
        elif inst is not None:
            error = "the control plane restarted during this tick"
            await ctx.storage.finish_tick(
                tick.id, "FAILURE", [], now, error=error, cursor=inst.state.cursor
            )
