"""The run coordinator: which queued run goes to which agent, decided the moment anything
changes (a submit, a finished run, an agent arriving) rather than on a polling tick.

The policy is one pure function, `plan_dispatch`, over a `QueueSnapshot`. Storage runs
it inside the transaction that records the assignments, so two dispatch passes can never
both admit a run into the last slot of a limit; `GET /api/v1/queue` runs the same
function read-only to explain why each run still waits. The dispatcher (dispatch.py)
then hands each launch to its agent's long-poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.clock import Clock
from control_plane.config import RunCoordinatorConfig, TagConcurrencyLimit
from control_plane.health import DaemonHealth
from control_plane.metrics import Metrics
from control_plane.storage import Agent, NewRun, QueueSnapshot, Run, Storage, iso

log = logging.getLogger("fleetrun.coordinator")


def agent_is_live(agent: Agent, now: float, heartbeat_timeout: float) -> bool:
    return agent.status == "ONLINE" and now - agent.last_heartbeat <= heartbeat_timeout


def required_capabilities(run: Run) -> set[str]:
    """What an agent must support to take this run (older agents lack newer features)."""
    return {"reuse_outputs"} if run.reuse_outputs else set()


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

    def to_json(self) -> dict:
        return {"limit": self.name, "max": self.limit, "in_use": len(self.holders),
                "runs": self.holders}  # fmt: skip


@dataclass
class Decision:
    """One queued run: the agent it goes to now, or the reason it waits."""

    run: Run
    agent: Agent | None = None
    reason: str | None = None


@dataclass
class DispatchPlan:
    decisions: list[Decision] = field(default_factory=list)
    limits: list[LimitUsage] = field(default_factory=list)
    next_wake: float | None = None  # the earliest time a delayed run may start

    @property
    def assignments(self) -> list[tuple[Run, Agent]]:
        return [(d.run, d.agent) for d in self.decisions if d.agent is not None]


def plan_dispatch(
    snapshot: QueueSnapshot,
    config: RunCoordinatorConfig,
    now: float,
    heartbeat_timeout: float,
) -> DispatchPlan:
    """Walk the queue in priority order and admit every run that no rule holds back.

    A run that a limit or a missing agent holds back stays queued, and the runs behind
    it still go ahead (no head-of-line blocking).
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
    agents = [a for a in snapshot.agents if agent_is_live(a, now, heartbeat_timeout)]

    for run in snapshot.queued:
        if run.not_before is not None and run.not_before > now:
            reason = f"retry delay: starts after {iso(run.not_before)}"
            plan.decisions.append(Decision(run, reason=reason))
            plan.next_wake = min(plan.next_wake or run.not_before, run.not_before)
            continue
        reason = _held_back(run, global_limit, active_ids, rules, holders)
        if reason is None:
            reason, agent = _pick_agent(run, agents, snapshot.hosted, used)
            if agent is not None:
                plan.decisions.append(Decision(run, agent=agent))
                used[agent.agent_id] += 1
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


def _pick_agent(
    run: Run, agents: list[Agent], hosted: dict[str, set[str]], used: Counter[str | None]
) -> tuple[str | None, Agent | None]:
    serving = [a for a in agents if run.queue in a.queues]
    if not serving:
        return f"no online agent serves queue {run.queue}", None
    hosting = [a for a in serving if run.location in hosted.get(a.agent_id, ())]
    if not hosting:
        return f"no online agent on queue {run.queue} hosts location {run.location}", None
    needs = required_capabilities(run)
    hosting = [a for a in hosting if needs <= set(a.capabilities)]
    if not hosting:
        wanted = ", ".join(sorted(needs))
        return f"no online agent hosting location {run.location} can do {wanted} (upgrade it)", None
    free = [a for a in hosting if used[a.agent_id] < a.max_concurrent_runs]
    if not free:
        slots = ", ".join(f"{a.name} {used[a.agent_id]}/{a.max_concurrent_runs}" for a in hosting)
        return f"no agent hosting location {run.location} has a free slot ({slots})", None
    # Most free slots first (spreads load), then by name (deterministic).
    return None, min(free, key=lambda a: (used[a.agent_id] - a.max_concurrent_runs, a.name))


class RunCoordinator:
    def __init__(
        self,
        storage: Storage,
        config: RunCoordinatorConfig,
        clock: Clock,
        heartbeat_timeout: float,
        on_assigned: Callable[[Run], None],
    ) -> None:
        self.storage = storage
        self.config = config
        self.clock = clock
        self.health = DaemonHealth(clock)  # replaced by the control plane's shared one
        self.metrics = Metrics()  # likewise
        self.heartbeat_timeout = heartbeat_timeout
        self.on_assigned = on_assigned
        self.may_act: Callable[[], bool] = lambda: True  # leader election's say
        self._wakeup = asyncio.Event()
        self._next_wake: float | None = None

    async def submit(self, new_run: NewRun) -> Run:
        run = await self.storage.create_run(new_run, self.clock.time())
        self.wake()
        return run

    def wake(self) -> None:
        """Ask for a dispatch pass soon; many calls before it runs cost one pass."""
        self._wakeup.set()

    async def run_forever(self, backstop_seconds: float = 5.0) -> None:
        """Dispatch whenever woken; the backstop covers changes no wake-up announced."""
        while True:
            self.health.beat("run-queue")
            sleep = backstop_seconds
            if self._next_wake is not None:
                sleep = min(sleep, max(0.0, self._next_wake - self.clock.time()) + 0.01)
            try:
                await asyncio.wait_for(self._wakeup.wait(), sleep)
            except TimeoutError:
                pass
            self._wakeup.clear()
            if not self.may_act():
                continue
            try:
                with self.health.timed("run-queue"):
                    await self.dispatch_once()
            except Exception as exc:
                self.health.failed("run-queue", exc)

    def _decide(self, snapshot: QueueSnapshot) -> list[tuple[str, str]]:
        plan = plan_dispatch(snapshot, self.config, self.clock.time(), self.heartbeat_timeout)
        self._next_wake = plan.next_wake
        return [(run.run_id, agent.agent_id) for run, agent in plan.assignments]

    async def dispatch_once(self) -> list[Run]:
        """Assign as many queued runs as limits and free agent slots allow."""
        self._next_wake = None
        now = self.clock.time()
        queued: dict[str, Run] = {}

        def decide(snapshot: QueueSnapshot) -> list[tuple[str, str]]:
            queued.update((run.run_id, run) for run in snapshot.queued)
            return self._decide(snapshot)

        assigned = await self.storage.assign_queued(now, decide)
        for run in assigned:
            # How long it waited is on the run as queued (assigned, its status_time is now).
            self.metrics.run_assigned(queued.get(run.run_id, run), now)
            self.on_assigned(run)
        return assigned

    async def explain(self) -> DispatchPlan:
        """The plan a dispatch pass would make now, with the reason each run waits."""
        snapshot = await self.storage.queue_snapshot()
        return plan_dispatch(snapshot, self.config, self.clock.time(), self.heartbeat_timeout)
