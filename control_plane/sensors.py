"""The sensor daemon: sensors evaluated on agents, start-to-start, with a durable cursor.

A run_key a sensor already used never makes a second run (its idempotency key is the
sensor and the run key), also within one tick and across restarts. The cursor moves only
with a SUCCESS or SKIPPED tick; a sensor that raises records a FAILURE tick with the
error and keeps its interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from control_plane.scheduler import DaemonLoop, Instigator, run_tick
from protocol.messages import SensorInfo

log = logging.getLogger("fleetrun.sensors")

MAX_SLEEP_SECONDS = 5.0


class SensorDaemon(DaemonLoop):
    name = "sensors"
    max_sleep = MAX_SLEEP_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def _tick(self, inst: Instigator) -> None:
        try:
            tick = await self.storage.start_tick(inst.location, inst.name, "sensor", None,
                                                 self.clock.time())  # fmt: skip
            assert tick is not None
            tick, runs = await run_tick(self.storage, self.broker, self.clock, inst, tick,
                                        self.run_rules, cursor=inst.state.cursor,
                                        last_run_key=inst.state.last_run_key)  # fmt: skip
            log.info("sensor %s tick %s: %s", inst.name, tick.id, tick.status)
            if runs:
                self.on_runs(runs)
        except Exception as exc:
            self.health.failed(self.name, exc)
        finally:
            self._in_flight.pop((inst.location, inst.name), None)
            self._wakeup.set()  # its next evaluation time is known now

    async def pass_once(self) -> float:
        """Start every sensor whose interval has passed; returns when the next one is due."""
        now = self.clock.time()
        wake_at = now + MAX_SLEEP_SECONDS
        for inst in await self.instigators(now):
            if inst.kind != "sensor" or not inst.running:
                continue
            assert isinstance(inst.definition, SensorInfo)
            key = (inst.location, inst.name)
            if key in self._in_flight:
                continue
            due = (inst.state.last_tick_time or 0.0) + inst.definition.minimum_interval_seconds
            if due <= now:
                self._in_flight[key] = asyncio.create_task(self._tick(inst))
            else:
                wake_at = min(wake_at, due)
        return wake_at

    async def run_forever(self) -> None:
        await self.loop_forever()
