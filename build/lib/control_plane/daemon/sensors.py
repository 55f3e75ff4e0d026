"""The sensor daemon: sensors evaluated on agents, start-to-start, with a durable cursor.

A run_key a sensor already used never makes a second run (its idempotency key is the
sensor and the run key), also within one tick and across restarts. The cursor moves only
with a SUCCESS or SKIPPED tick; a sensor that raises records a FAILURE tick with the
error and keeps its interval.
"""

from __future__ import annotations

from control_plane.daemon.instigators import Instigator, Instigators, tick_and_report
from protocol.messages import SensorInfo

MAX_SLEEP_SECONDS = 5.0


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
    assert tick is not None
    await tick_and_report(
        ctx, inst, tick, cursor=inst.state.cursor, last_run_key=inst.state.last_run_key
    )
