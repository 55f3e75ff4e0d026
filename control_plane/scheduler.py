"""The scheduler daemon: cron schedules turned into runs, on time, exactly once per tick.

It sleeps until the next due tick (not a fixed minute loop). A due tick is recorded
(STARTED) before it is evaluated on an agent (`EvaluationBroker`); its runs are created
with an idempotency key (schedule, tick time, request) in the transaction that finishes
the tick, so a tick retried after a crash never makes a second run. Tick times come from
`control_plane/ticks.py` (croniter, IANA zones, Dagster's DST rules).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control_plane.clock import Clock
from control_plane.evaluations import EvaluationBroker
from control_plane.health import DaemonHealth
from control_plane.storage import CodeCatalog, InstigatorState, NewRun, Run, Storage, Tick
from control_plane.submission import (
    DEFAULT_RUN_RULES,
    RunRefused,
    RunRules,
    check_new_run,
    new_run,
)
from control_plane.ticks import due_ticks, next_tick
from protocol.messages import EvaluationResult, ScheduleInfo, SensorInfo
from protocol.tags import RUN_KEY_TAG, SCHEDULE_TAG, SENSOR_TAG, TICK_TAG, tag_problem

log = logging.getLogger("fleetrun.scheduler")

MAX_SLEEP_SECONDS = 10.0
WAIT_FOR_AGENT_SECONDS = 30.0
EVALUATION_TIMEOUT_SECONDS = 60.0


@dataclass
class Instigator:
    """A schedule or sensor as the control plane sees it: definition, state, hosts."""

    location: str
    name: str
    kind: str  # "schedule" | "sensor"
    definition: ScheduleInfo | SensorInfo | None  # None: its location no longer defines it
    state: InstigatorState
    hosts: set[str] = field(default_factory=set)  # live agents hosting the location
    hosting: set[str] = field(default_factory=set)  # every agent hosting it (woken to evaluate)

    @property
    def status(self) -> str:
        if self.definition is None:
            return "ORPHANED"
        return self.state.status or self.definition.default_status

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"


async def load_instigators(
    storage: Storage, now: float, heartbeat_timeout: float
) -> list[Instigator]:
    """Every schedule and sensor the fleet's code locations define, plus orphans."""
    defining = [
        loc for loc in (await storage.code_catalog()).locations
        if loc.info.error is None and (loc.info.schedules or loc.info.sensors)
    ]  # fmt: skip
    live = {
        a.agent_id for a in (await storage.get_agents({loc.agent_id for loc in defining})).values()
        if a.status == "ONLINE" and now - a.last_heartbeat <= heartbeat_timeout
    }  # fmt: skip
    states = await storage.instigator_states()
    found: dict[tuple[str, str, str], Instigator] = {}
    for loc in defining:
        info = loc.info
        definitions: list[tuple[str, ScheduleInfo | SensorInfo]] = [
            *(("schedule", s) for s in info.schedules),
            *(("sensor", s) for s in info.sensors),
        ]
        for kind, definition in definitions:
            key = (info.name, definition.name, kind)
            state = states.get(key) or InstigatorState(*key)
            inst = found.setdefault(key, Instigator(*key, definition, state))
            if loc.agent_id in live:
                inst.hosts.add(loc.agent_id)
            inst.hosting.add(loc.agent_id)
    for key, state in states.items():
        found.setdefault(key, Instigator(*key, None, state))
    return sorted(found.values(), key=lambda i: (i.kind, i.name, i.location))


def runs_for(
    inst: Instigator,
    tick: Tick,
    result: EvaluationResult,
    key_prefix: str,
    catalog: CodeCatalog,
    rules: RunRules = DEFAULT_RUN_RULES,
) -> tuple[list[NewRun], str | None]:
    """The runs a tick's result asks for, or the problem that fails the tick (checked
    as a submission is, for every request before any run is created)."""
    runs = []
    for index, request in enumerate(result.runs):
        where = f"run request {index + 1}"
        info = catalog.job_info(inst.location, request.job)
        if info is None:
            return [], f"{where}: location {inst.location} has no job {request.job!r}"
        own = {SENSOR_TAG if inst.kind == "sensor" else SCHEDULE_TAG: inst.name,
               TICK_TAG: str(tick.id)}  # fmt: skip
        if request.run_key is not None:
            own[RUN_KEY_TAG] = request.run_key
        problem = tag_problem(request.tags, rules.tags)
        if problem is not None:
            return [], f"{where}: {problem}"
        key_part = request.run_key if inst.kind == "sensor" else f"{tick.scheduled_time}/{index}"
        run = new_run(
            str(uuid.uuid4()), request.job, inst.location, request.tags, request.config,
            own_tags=own, job_own_tags=dict(info.tags), run_key=request.run_key,
            idempotency_key=None if key_part is None else f"{key_prefix}/{key_part}",
        )  # fmt: skip
        try:
            check_new_run(run, rules)
        except RunRefused as exc:
            return [], f"{where}: {exc.message}"
        runs.append(run)
    return runs, None


async def run_tick(
    storage: Storage,
    broker: EvaluationBroker,
    clock: Clock,
    inst: Instigator,
    tick: Tick,
    rules: RunRules = DEFAULT_RUN_RULES,
    **request_fields: object,
) -> tuple[Tick, list[Run]]:
    """Evaluate one tick on an agent and record its outcome (and its runs)."""
    request = broker.new_request(inst.location, inst.kind, inst.name,
                                 timeout_seconds=EVALUATION_TIMEOUT_SECONDS,
                                 **request_fields)  # fmt: skip
    result = await broker.evaluate(request, inst.hosting, WAIT_FOR_AGENT_SECONDS)
    now = clock.time()
    if result.error is not None:
        return await storage.finish_tick(tick.id, "FAILURE", [], now, error=result.error,
                                         cursor=inst.state.cursor)  # fmt: skip
    prefix = f"{inst.kind}/{inst.location}/{inst.name}"
    catalog = await storage.code_catalog()
    runs, problem = runs_for(inst, tick, result, prefix, catalog, rules)
    if problem is not None:
        return await storage.finish_tick(tick.id, "FAILURE", [], now, error=problem,
                                         cursor=inst.state.cursor)  # fmt: skip
    status = "SUCCESS" if runs else "SKIPPED"
    return await storage.finish_tick(tick.id, status, runs, now, skip_reason=result.skip_reason,
                                     cursor=result.cursor)  # fmt: skip


class DaemonLoop:
    """What the scheduler and sensor daemons share: their inputs, and a loop that runs a
    pass, beats its health, and sleeps until the pass's next due time or a wake-up."""

    name = "daemon"
    max_sleep = MAX_SLEEP_SECONDS
    run_rules = DEFAULT_RUN_RULES

    def __init__(
        self,
        storage: Storage,
        broker: EvaluationBroker,
        clock: Clock,
        health: DaemonHealth,
        heartbeat_timeout: float,
        on_runs: Callable[[list[Run]], None],
    ) -> None:
        self.storage = storage
        self.broker = broker
        self.clock = clock
        self.health = health
        self.heartbeat_timeout = heartbeat_timeout
        self.on_runs = on_runs
        self.may_act: Callable[[], bool] = lambda: True  # leader election's say
        self._wakeup = asyncio.Event()
        self._hosting: set[str] = set()  # agents hosting a schedule or sensor, last pass

    def wake(self) -> None:
        """Started or stopped, or a location changed: look again now."""
        self._wakeup.set()

    def agent_registered(self, agent_id: str) -> None:
        """An agent whose locations define no schedule or sensor registered: it matters
        only if it hosted one before (a fleet of thousands registering costs no pass)."""
        if agent_id in self._hosting:
            self.wake()

    async def instigators(self, now: float) -> list[Instigator]:
        found = await load_instigators(self.storage, now, self.heartbeat_timeout)
        self._hosting = {agent_id for inst in found for agent_id in inst.hosting}
        return found

    async def pass_once(self) -> float:
        """Start what is due; return when the next thing is due."""
        raise NotImplementedError

    async def loop_forever(self) -> None:
        while True:
            self._wakeup.clear()
            self.health.beat(self.name)
            try:
                with self.health.timed(self.name):
                    wake_at = (
                        await self.pass_once()
                        if self.may_act()
                        else self.clock.time() + self.max_sleep
                    )
            except Exception as exc:
                self.health.failed(self.name, exc)
                wake_at = self.clock.time() + self.max_sleep
            sleep = min(self.max_sleep, max(0.0, wake_at - self.clock.time()))
            try:
                await asyncio.wait_for(self._wakeup.wait(), sleep)
            except TimeoutError:
                pass


class ScheduleDaemon(DaemonLoop):
    name = "scheduler"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: dict[tuple[str, str, float], asyncio.Task[None]] = {}

    async def _tick(self, inst: Instigator, scheduled_time: float) -> None:
        try:
            tick = await self.storage.start_tick(inst.location, inst.name, "schedule",
                                                 scheduled_time, self.clock.time())  # fmt: skip
            if tick is None:
                return  # already done (before a restart)
            tick, runs = await run_tick(self.storage, self.broker, self.clock, inst, tick,
                                        self.run_rules, scheduled_time=scheduled_time)  # fmt: skip
            log.info("schedule %s tick %s: %s", inst.name, tick.id, tick.status)
            if runs:
                self.on_runs(runs)
        except Exception as exc:
            self.health.failed(self.name, exc)
        finally:
            self._in_flight.pop((inst.location, inst.name, scheduled_time), None)

    def _start(self, inst: Instigator, scheduled_time: float) -> None:
        key = (inst.location, inst.name, scheduled_time)
        if key not in self._in_flight:
            self._in_flight[key] = asyncio.create_task(self._tick(inst, scheduled_time))

    async def pass_once(self) -> float:
        """Start every due tick; returns when the next one is due."""
        now = self.clock.time()
        wake_at = now + MAX_SLEEP_SECONDS
        for inst in await self.instigators(now):
            if inst.kind != "schedule" or not inst.running:
                continue
            assert isinstance(inst.definition, ScheduleInfo)
            cron, tz = inst.definition.cron, inst.definition.timezone
            last = inst.state.last_tick_time
            if last is None:  # just turned on: from now, no backfill
                await self.storage.set_instigator(inst.location, inst.name, "schedule",
                                                  last_tick_time=now)  # fmt: skip
                last = now
            for ts in due_ticks(cron, tz, last, now, inst.definition.catchup):
                self._start(inst, ts)
            wake_at = min(wake_at, next_tick(cron, tz, max(last, now)))
        return wake_at

    async def resume_unfinished(self) -> None:
        """Ticks a crash left STARTED are evaluated again (their runs are not duplicated)."""
        now = self.clock.time()
        instigators = await self.instigators(now)
        by_key = {(i.location, i.name, i.kind): i for i in instigators}
        for tick in await self.storage.unfinished_ticks():
            inst = by_key.get((tick.location, tick.name, tick.kind))
            if tick.kind == "schedule" and inst is not None and tick.scheduled_time is not None:
                self._start(inst, tick.scheduled_time)
            elif inst is not None:
                error = "the control plane restarted during this tick"
                await self.storage.finish_tick(
                    tick.id, "FAILURE", [], now, error=error, cursor=inst.state.cursor
                )

    async def run_forever(self) -> None:
        try:
            await self.resume_unfinished()
        except Exception as exc:
            self.health.failed(self.name, exc)
        await self.loop_forever()
