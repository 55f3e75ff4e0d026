"""What the scheduler and the sensor daemon share: schedules and sensors as the fleet
defines them (`load_instigators`), and one tick's evaluation on an agent and outcome
(`run_tick`): evaluated again within the tick while it raises (`[daemon]
max_tick_retries`), its runs, each request checked as a submission is, created with its
tick.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from control_plane.bus import WakeBus, run_queued
from control_plane.daemon.driver import TaskSet
from control_plane.fleet.evaluations import EvaluationBroker
from control_plane.model.agents import ONLINE, agent_status
from control_plane.model.catalog import CodeCatalog
from control_plane.model.instigators import InstigatorState, Tick
from control_plane.model.runs import NewRun, Run
from control_plane.model.submission import (
    DEFAULT_RUN_RULES,
    RunRefused,
    RunRules,
    check_new_run,
    new_run,
)
from control_plane.storage.port import Storage
from protocol.messages import EvaluationResult, ScheduleInfo, SensorInfo
from protocol.tags import RUN_KEY_TAG, SCHEDULE_TAG, SENSOR_TAG, TICK_TAG, tag_problem

log = logging.getLogger("fleetrun.daemon")

WAIT_FOR_AGENT_SECONDS = 30.0
EVALUATION_TIMEOUT_SECONDS = 60.0
MAX_TICK_RETRY_PAUSE_SECONDS = 5.0


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


@dataclass
class Instigators:
    """What a scheduler or sensor pass works with; `hosting` is what the last pass saw:
    the agents hosting a schedule or sensor (so that a fleet of thousands registering
    costs no pass, only agents that hosted one wake it)."""

    loop: str  # the daemon loop it is for: "scheduler" or "sensors"
    storage: Storage
    broker: EvaluationBroker
    bus: WakeBus
    heartbeat_timeout: float
    rules: RunRules = DEFAULT_RUN_RULES
    tick_retries: int = 0  # [daemon] max_tick_retries
    tasks: TaskSet = field(default_factory=TaskSet)
    hosting: set[str] = field(default_factory=set)
    resumed: bool = False  # unfinished ticks picked up since this replica took over

    def woken_by(self, key: str | None) -> bool:
        """An INSTIGATORS wake-up concerns it: a start, a stop, a location change
        (no key), or the registration of an agent that hosted one."""
        return not key or key in self.hosting

    async def load(self, now: float) -> list[Instigator]:
        found = await load_instigators(self.storage, now, self.heartbeat_timeout)
        self.hosting = {agent_id for inst in found for agent_id in inst.hosting}
        return found


async def load_instigators(
    storage: Storage, now: float, heartbeat_timeout: float
) -> list[Instigator]:
    """Every schedule and sensor the fleet's code locations define, plus orphans."""
    defining = [
        loc
        for loc in (await storage.code_catalog()).locations
        if loc.info.error is None and (loc.info.schedules or loc.info.sensors)
    ]
    agents = await storage.get_agents({loc.agent_id for loc in defining})
    live = {
        a.agent_id for a in agents.values() if agent_status(a, now, heartbeat_timeout) == ONLINE
    }
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
        own = {
            SENSOR_TAG if inst.kind == "sensor" else SCHEDULE_TAG: inst.name,
            TICK_TAG: str(tick.id),
        }
        if request.run_key is not None:
            own[RUN_KEY_TAG] = request.run_key
        problem = tag_problem(request.tags, rules.tags)
        if problem is not None:
            return [], f"{where}: {problem}"
        key_part = request.run_key if inst.kind == "sensor" else f"{tick.scheduled_time}/{index}"
        run = new_run(
            str(uuid.uuid4()),
            request.job,
            inst.location,
            request.tags,
            request.config,
            own_tags=own,
            job_own_tags=dict(info.tags),
            run_key=request.run_key,
            idempotency_key=None if key_part is None else f"{key_prefix}/{key_part}",
        )
        try:
            check_new_run(run, rules)
        except RunRefused as exc:
            return [], f"{where}: {exc.message}"
        runs.append(run)
    return runs, None


async def run_tick(
    ctx: Instigators,
    inst: Instigator,
    tick: Tick,
    next_cursor: str | None = None,
    **request_fields: object,
) -> tuple[Tick, list[Run]]:
    """Evaluate one tick on an agent, again while it fails and retries are left, and
    record its outcome and its runs. A good tick leaves `next_cursor` if the control
    plane chose it (a run status sensor's place in the run-status history), else the
    cursor the function left."""
    broker, storage = ctx.broker, ctx.storage
    failures = 0
    while True:
        request = broker.new_request(
            inst.location,
            inst.kind,
            inst.name,
            timeout_seconds=EVALUATION_TIMEOUT_SECONDS,
            **request_fields,
        )
        result = await broker.evaluate(request, inst.hosting, WAIT_FOR_AGENT_SECONDS)
        if result.error is None:
            break
        failures += 1
        if failures > ctx.tick_retries:
            return await storage.finish_tick(
                tick.id,
                "FAILURE",
                [],
                broker.clock.time(),
                error=result.error,
                cursor=inst.state.cursor,
                failure_count=failures,
            )
        what = f"{inst.kind} {inst.name} tick {tick.id}"
        log.info("%s: evaluation %d failed, evaluating again", what, failures)
        await asyncio.sleep(min(0.5 * 2 ** (failures - 1), MAX_TICK_RETRY_PAUSE_SECONDS))
    now = broker.clock.time()
    prefix = f"{inst.kind}/{inst.location}/{inst.name}"
    catalog = await storage.code_catalog()
    runs, problem = runs_for(inst, tick, result, prefix, catalog, ctx.rules)
    if problem is not None:
        return await storage.finish_tick(
            tick.id,
            "FAILURE",
            [],
            now,
            error=problem,
            cursor=inst.state.cursor,
            failure_count=failures,
        )
    return await storage.finish_tick(
        tick.id,
        "SUCCESS" if runs else "SKIPPED",
        runs,
        now,
        skip_reason=result.skip_reason,
        cursor=result.cursor if next_cursor is None else next_cursor,
        failure_count=failures,
    )


async def tick_and_report(
    ctx: Instigators,
    inst: Instigator,
    tick: Tick,
    next_cursor: str | None = None,
    **request_fields: object,
) -> None:
    """Run one tick as a task of the loop: its runs queued, its failure logged."""
    tick, runs = await run_tick(ctx, inst, tick, next_cursor, **request_fields)
    log.info("%s %s tick %s: %s", inst.kind, inst.name, tick.id, tick.status)
    for run in runs:
        run_queued(ctx.bus, run)
