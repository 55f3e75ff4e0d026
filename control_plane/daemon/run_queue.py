"""The run queue (Dagster's run coordinator): which queued run goes to which agent under a
new lease, decided the moment anything changes (a submit, a finished run, an agent
arriving) rather than on a polling tick.

The policy is one pure function, `plan_dispatch`, over a `QueueSnapshot`. Storage runs
it inside the transaction that records the assignments, so two dispatch passes can never
both admit a run into the last slot of a limit; `GET /api/v1/queue` runs the same
function read-only to explain why each run still waits. The dispatcher
then hands each launch to its agent's long-poll (fleet/dispatch.py).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from control_plane.bus import AGENT, MONITOR, WakeBus, run_assigned, run_queued
from control_plane.config import ConcurrencyConfig, RunCoordinatorConfig, TagConcurrencyLimit
from control_plane.metrics import Metrics
from control_plane.model.agents import (
    DRAINING,
    LAUNCHER_CAPABILITY,
    ONLINE,
    Agent,
    agent_status,
)
from control_plane.model.pools import RUN_SLOT, Claim, run_pool_problem
from control_plane.model.runs import NewRun, Placement, QueueSnapshot, Run
from control_plane.model.steptasks import (
    FLEET_EXECUTOR,
    STEP_TASKS_CAPABILITY,
    StepPlacement,
    StepTask,
)
from control_plane.model.times import iso
from control_plane.storage.port import QueueStore, RunStore
from protocol.tags import CODE_VERSION_TAG, IMAGE_TAG, run_labels, run_resources

log = logging.getLogger("fleetrun.coordinator")
NO_POOLS = ConcurrencyConfig()


def run_executor(run: Run, job_executor: str) -> str:
    """The executor a run's worker will use: its run config's `execution`, else its
    job's."""
    override = run.config.get("execution")
    if isinstance(override, str):
        return override
    if isinstance(override, dict) and isinstance(override.get("name"), str):
        return str(override["name"])
    return job_executor


def required_capabilities(run: Run, executor: str = "") -> set[str]:
    """What an agent must support to take this run (older agents lack newer features; a
    run with a container image, the docker launcher; a fleet run, step tasks)."""
    needs = {"reuse_outputs"} if run.reuse_outputs else set()
    if IMAGE_TAG in run.tags:
        needs.add(f"{LAUNCHER_CAPABILITY}docker")
    if executor == FLEET_EXECUTOR:
        needs.add(STEP_TASKS_CAPABILITY)
    return needs


def limit_bucket(rule: TagConcurrencyLimit, tags: dict[str, str]) -> str | None:
    """The slot pool of `rule` that a run with `tags` draws from, or None if none."""
    if rule.key not in tags:
        return None
    if rule.per_unique_value:
        return f"{rule.key}={tags[rule.key]}"
    if rule.value is not None:
        return f"{rule.key}={rule.value}" if tags[rule.key] == rule.value else None
    return rule.key


@dataclass
class LimitUsage:
    name: str
    limit: int
    holders: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.name,
            "max": self.limit,
            "in_use": len(self.holders),
            "runs": self.holders,
        }


@dataclass
class Decision:
    """One queued run: the agent it goes to now (holding a slot of each of `pools`, at
    run granularity), or the reason it waits."""

    run: Run
    agent: Agent | None = None
    reason: str | None = None
    pools: tuple[str, ...] = ()


@dataclass
class StepDecision:
    """One waiting step task: the agent it runs on now, or the reason it waits."""

    task: StepTask
    agent: Agent | None = None
    reason: str | None = None


@dataclass
class DispatchPlan:
    decisions: list[Decision] = field(default_factory=list)
    limits: list[LimitUsage] = field(default_factory=list)
    next_wake: float | None = None  # the earliest time a delayed run may start
    step_decisions: list[StepDecision] = field(default_factory=list)

    @property
    def assignments(self) -> list[tuple[Run, Agent]]:
        return [(d.run, d.agent) for d in self.decisions if d.agent is not None]

    def placements(self) -> list[Placement]:
        steps: list[Placement] = [
            StepPlacement(d.task.task_id, d.agent.agent_id)
            for d in self.step_decisions
            if d.agent is not None
        ]
        return steps + [
            (d.run.run_id, d.agent.agent_id, d.pools) for d in self.decisions if d.agent is not None
        ]


def plan_dispatch(
    snapshot: QueueSnapshot,
    config: RunCoordinatorConfig,
    now: float,
    heartbeat_timeout: float,
    pools: ConcurrencyConfig = NO_POOLS,
) -> DispatchPlan:
    """Walk the queue in priority order and admit every run that no rule holds back.

    A run that a limit, a full pool (run granularity) or a missing agent holds back
    stays queued, and the runs behind it still go ahead (no head-of-line blocking). A
    run is placed only on an agent with the labels it requires and the resources it
    asks for free; what runs hold on an agent counts until they end.
    """
    plan = DispatchPlan()
    queued_mode = config.kind == "queued"
    global_limit = (
        config.max_concurrent_runs if queued_mode and config.max_concurrent_runs >= 0 else None
    )
    rules = config.tag_concurrency_limits if queued_mode else []
    active_ids = [r.run_id for r in snapshot.active]
    holders: dict[tuple[int, str], list[str]] = defaultdict(list)
    for run in snapshot.active:
        for i, rule in enumerate(rules):
            bucket = limit_bucket(rule, run.tags)
            if bucket is not None:
                holders[(i, bucket)].append(run.run_id)
    used = Counter(r.agent_id for r in snapshot.active)
    used.update(t.agent_id for t in snapshot.running_steps)
    held = held_resources(snapshot.active)
    for task in snapshot.running_steps:
        held[task.agent_id].update(run_resources(task.tags))
    by_pool = pools.granularity == "run"
    limits = pools.limits(snapshot.pool_limits)
    claims = list(snapshot.claims)
    agents = [a for a in snapshot.agents if agent_status(a, now, heartbeat_timeout) == ONLINE]
    draining = [a for a in snapshot.agents if agent_status(a, now, heartbeat_timeout) == DRAINING]

    # Step tasks first: their runs hold a slot already and wait for them.
    for task in snapshot.waiting_steps:
        reason, agent = _pick_step_agent(task, agents, snapshot.hosted, used, held)
        if agent is None:
            note = _draining_note(task.queue, task.location, draining, snapshot.hosted)
            plan.step_decisions.append(StepDecision(task, reason=f"{reason}{note}"))
            continue
        plan.step_decisions.append(StepDecision(task, agent=agent))
        used[agent.agent_id] += 1
        held[agent.agent_id].update(run_resources(task.tags))

    for run in snapshot.queued:
        if run.not_before is not None and run.not_before > now:
            plan.decisions.append(Decision(run, reason=_delay_reason(run, run.not_before)))
            plan.next_wake = min(plan.next_wake or run.not_before, run.not_before)
            continue
        reason = _held_back(run, global_limit, active_ids, rules, holders)
        run_pools = snapshot.job_pools.get((run.location, run.job), frozenset())
        if reason is None and by_pool and run_pools:
            reason = run_pool_problem(run_pools, claims, limits)
        if reason is None:
            executor = run_executor(run, snapshot.job_executors.get((run.location, run.job), ""))
            reason, agent = _pick_agent(
                run, agents, snapshot.hosted, used, held, snapshot.code_versions, executor
            )
            if agent is None:
                note = _draining_note(run.queue, run.location, draining, snapshot.hosted)
                reason = f"{reason}{note}"
            if agent is not None:
                taken = tuple(sorted(run_pools)) if by_pool else ()
                plan.decisions.append(Decision(run, agent=agent, pools=taken))
                used[agent.agent_id] += 1
                held[agent.agent_id].update(run_resources(run.tags))
                claims += [
                    Claim(0, pool, run.run_id, 0, RUN_SLOT, 0, 0, now, now) for pool in taken
                ]
                active_ids.append(run.run_id)
                for i, rule in enumerate(rules):
                    bucket = limit_bucket(rule, run.tags)
                    if bucket is not None:
                        holders[(i, bucket)].append(run.run_id)
                continue
        plan.decisions.append(Decision(run, reason=reason))

    if global_limit is not None:
        plan.limits.append(LimitUsage("max_concurrent_runs", global_limit, active_ids))
    for (i, bucket), ids in sorted(holders.items()):
        plan.limits.append(LimitUsage(f"tag {bucket}", rules[i].limit, ids))
    return plan


def _delay_reason(run: Run, not_before: float) -> str:
    if run.code_retries:
        return (
            f"waiting for its code location {run.location}, which could not be loaded: "
            f"tries again after {iso(not_before)} (retry {run.code_retries})"
        )
    return f"retry delay: starts after {iso(not_before)}"


def _held_back(
    run: Run,
    global_limit: int | None,
    active_ids: list[str],
    rules: list[TagConcurrencyLimit],
    holders: dict[tuple[int, str], list[str]],
) -> str | None:
    if global_limit is not None and len(active_ids) >= global_limit:
        if global_limit == 0:
            return "launching is paused: max_concurrent_runs = 0"
        return f"max_concurrent_runs: {len(active_ids)} of {global_limit} in use"
    for i, rule in enumerate(rules):
        bucket = limit_bucket(rule, run.tags)
        if bucket is None:
            continue
        ids = holders[(i, bucket)]
        if len(ids) >= rule.limit:
            shown = ", ".join(ids[:5]) + (" …" if len(ids) > 5 else "")
            return f"tag limit {bucket}: {len(ids)} of {rule.limit} in use" + (
                f" by {shown}" if ids else ""
            )
    return None


def held_resources(active: list[Run]) -> dict[str | None, Counter[str]]:
    """What the active runs on each agent hold of its resources (until they end)."""
    held: dict[str | None, Counter[str]] = defaultdict(Counter)
    for run in active:
        held[run.agent_id].update(run_resources(run.tags))
    return held


def free_resources(agent: Agent, active: list[Run]) -> dict[str, float]:
    """What `agent` offers that its active runs do not hold."""
    held = held_resources([r for r in active if r.agent_id == agent.agent_id])[agent.agent_id]
    return {name: amount - held[name] for name, amount in agent.resources.items()}


def _placement_problem(
    tags: dict[str, str], hosting: list[Agent], held: dict[str | None, Counter[str]]
) -> tuple[str | None, list[Agent]]:
    """The agents among `hosting` that have the labels `tags` (a run's, or a step
    task's op's) require and the resources they ask for free; or, when none does,
    exactly why."""
    labels = run_labels(tags)
    for key, value in sorted(labels.items()):
        if not any(a.labels.get(key) == value for a in hosting):
            return f"no ONLINE agent has label {key}={value}", []
    labelled = [a for a in hosting if all(a.labels.get(k) == v for k, v in labels.items())]
    if not labelled:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return f"no ONLINE agent has every label of {wanted}", []
    wanted_resources = run_resources(tags)
    fitting = []
    shortfalls = []
    for agent in labelled:
        short = None
        for name, amount in sorted(wanted_resources.items()):
            offered = agent.resources.get(name, 0)
            free = offered - held[agent.agent_id][name]
            if offered == 0:
                short = f"agent {agent.name} offers no {name}"
            elif free < amount:
                short = f"agent {agent.name} has {max(free, 0):g} of {offered:g} {name} free"
            if short is not None:
                break
        if short is None:
            fitting.append(agent)
        else:
            shortfalls.append(short)
    if not fitting:
        asked = ", ".join(f"{amount:g} {name}" for name, amount in sorted(wanted_resources.items()))
        return f"needs {asked}: {'; '.join(shortfalls[:5])}", []
    return None, fitting


def _pick_agent(
    run: Run,
    agents: list[Agent],
    hosted: dict[str, set[str]],
    used: Counter[str | None],
    held: dict[str | None, Counter[str]],
    code_versions: dict[tuple[str, str], set[str]],
    executor: str = "",
) -> tuple[str | None, Agent | None]:
    serving = [a for a in agents if run.queue in a.queues]
    if not serving:
        return f"no online agent serves queue {run.queue}", None
    hosting = [a for a in serving if run.location in hosted.get(a.agent_id, ())]
    if not hosting:
        return f"no online agent on queue {run.queue} hosts location {run.location}", None
    pinned = run.tags.get(CODE_VERSION_TAG)
    if pinned:
        hosting = [
            a for a in hosting if pinned in code_versions.get((a.agent_id, run.location), ())
        ]
        if not hosting:
            return (
                f"no online agent hosting location {run.location} has its code version "
                f"{pinned} (tag {CODE_VERSION_TAG})",
                None,
            )
    needs = required_capabilities(run, executor)
    hosting = [a for a in hosting if needs <= set(a.capabilities)]
    if not hosting:
        wanted = ", ".join(sorted(needs))
        hint = "run_launcher = docker" if IMAGE_TAG in run.tags else "upgrade it"
        return f"no online agent hosting location {run.location} can do {wanted} ({hint})", None
    problem, hosting = _placement_problem(run.tags, hosting, held)
    if problem is not None:
        return problem, None
    problem, free = _free_slots(hosting, used, run.location)
    if problem is not None:
        return problem, None
    parents = run.wanted_code_version
    if parents:  # a re-execution: an agent that still has its parent's version, if any
        having = [a for a in free if parents in code_versions.get((a.agent_id, run.location), ())]
        free = having or free
    # Most free slots first (spreads load), then by name (deterministic).
    return None, min(free, key=lambda a: (used[a.agent_id] - a.max_concurrent_runs, a.name))


def _pick_step_agent(
    task: StepTask,
    agents: list[Agent],
    hosted: dict[str, set[str]],
    used: Counter[str | None],
    held: dict[str | None, Counter[str]],
) -> tuple[str | None, Agent | None]:
    """The agent a step task runs on, by the rules a run's placement follows (queue,
    location, capability, labels and resources of its op, a free slot); or why none."""
    serving = [a for a in agents if task.queue in a.queues]
    if not serving:
        return f"no online agent serves queue {task.queue}", None
    hosting = [a for a in serving if task.location in hosted.get(a.agent_id, ())]
    if not hosting:
        return f"no online agent on queue {task.queue} hosts location {task.location}", None
    hosting = [a for a in hosting if STEP_TASKS_CAPABILITY in a.capabilities]
    if not hosting:
        return (
            f"no online agent hosting location {task.location} can do {STEP_TASKS_CAPABILITY}"
            " (upgrade it)",
            None,
        )
    problem, hosting = _placement_problem(task.tags, hosting, held)
    if problem is not None:
        return problem, None
    problem, free = _free_slots(hosting, used, task.location)
    if problem is not None:
        return problem, None
    return None, min(free, key=lambda a: (used[a.agent_id] - a.max_concurrent_runs, a.name))


def _free_slots(
    hosting: list[Agent], used: Counter[str | None], location: str
) -> tuple[str | None, list[Agent]]:
    """The agents of `hosting` with a free slot, or why there are none."""
    free = [a for a in hosting if used[a.agent_id] < a.max_concurrent_runs]
    if not free:
        slots = ", ".join(f"{a.name} {used[a.agent_id]}/{a.max_concurrent_runs}" for a in hosting)
        return f"no agent hosting location {location} has a free slot ({slots})", []
    return None, free


def _draining_note(
    queue: str, location: str, draining: list[Agent], hosted: dict[str, set[str]]
) -> str:
    """The DRAINING agents that would otherwise take a run (or step task) of `queue` and
    `location`, so that a wait names them: drained by an operator (until undrained) or
    shutting down (until they register)."""
    able = [a for a in draining if queue in a.queues and location in hosted.get(a.agent_id, ())]
    held = sorted(a.name for a in able if a.operator_drain)
    leaving = sorted(a.name for a in able if not a.operator_drain)
    notes = []
    if held:
        undrain = f"fleetrun agents undrain {held[0] if len(held) == 1 else 'NAME'}"
        notes.append(f"{', '.join(held)} drained by an operator (`{undrain}` sends runs again)")
    if leaving:
        notes.append(f"{', '.join(leaving)} shutting down")
    return f"; DRAINING: {'; '.join(notes)}" if notes else ""


@dataclass(frozen=True)
class RunQueue:
    """What a dispatch pass works with."""

    storage: QueueStore
    config: RunCoordinatorConfig
    heartbeat_timeout: float
    bus: WakeBus
    metrics: Metrics
    pools: ConcurrencyConfig = NO_POOLS


async def enqueue(storage: RunStore, bus: WakeBus, new_run: NewRun, now: float) -> Run:
    """A run enters the queue (a submission, a re-execution): stored QUEUED, and the run
    queue woken wherever it runs."""
    run = await storage.create_run(new_run, now)
    run_queued(bus, run)
    return run


async def dispatch_pass(queue: RunQueue, now: float) -> float | None:
    """Assign as many queued runs as limits and free agent slots allow; returns the
    earliest time a delayed run may start (None: nothing is waiting for a time)."""
    queued: dict[str, Run] = {}
    next_wake: list[float | None] = [None]

    def decide(snapshot: QueueSnapshot) -> list[Placement]:
        queued.update((run.run_id, run) for run in snapshot.queued)
        plan = plan_dispatch(snapshot, queue.config, now, queue.heartbeat_timeout, queue.pools)
        next_wake[0] = plan.next_wake
        return plan.placements()

    for run in await queue.storage.assign_queued(now, decide):
        if isinstance(run, StepTask):  # its agent's poll takes it at once
            queue.bus.publish(AGENT, run.agent_id)
            queue.bus.publish(MONITOR)
            continue
        # How long it waited is on the run as queued (assigned, its status_time is now).
        queue.metrics.run_assigned(queued.get(run.run_id, run), now)
        run_assigned(queue.bus, run)
    return next_wake[0]


async def explain(queue: RunQueue, now: float) -> DispatchPlan:
    """The plan a dispatch pass would make now, with the reason each run waits."""
    snapshot = await queue.storage.queue_snapshot()
    return plan_dispatch(snapshot, queue.config, now, queue.heartbeat_timeout, queue.pools)
