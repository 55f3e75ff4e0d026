"""Dispatch: hand assigned launches to agents through their long-polls.

The storage is the source of truth (a run in STARTING with an agent and a lease is a
launch owed to that agent), so a launch survives a lost poll response or a control-plane
restart: it is offered on every poll until the agent reports it holds the lease. Stop
orders work the same way: owed while the agent holds a lease that is canceled or stale;
and so do pool-slot grants: owed until the agent lists them as held.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from control_plane.bus import AGENT, WakeBus, runs_changed
from control_plane.clock import Clock
from control_plane.fleet.evaluations import EvaluationBroker
from control_plane.metrics import Metrics
from control_plane.model.pools import Claim
from control_plane.model.runs import Run, Verdict
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import StepTask
from control_plane.storage.port import StepTaskStore, Storage
from control_plane.waiters import KeyedWaiters
from protocol.events import UNDELIVERABLE
from protocol.messages import (
    LaunchRun,
    PollReply,
    ReloadLocations,
    SlotGrant,
    StepResult,
    StopRun,
)
from protocol.tags import CODE_VERSION_TAG
from protocol.wire import delivery_problem


def launch_message(run: Run, claim_pool_slots: bool = True) -> LaunchRun:
    assert run.lease is not None
    return LaunchRun(
        run_id=run.run_id,
        job=run.job,
        location=run.location,
        lease=run.lease,
        tags=run.tags,
        config=run.config,
        reuse_outputs=run.reuse_outputs,
        claim_pool_slots=claim_pool_slots,
        code_version=run.tags.get(CODE_VERSION_TAG) or run.wanted_code_version or "",
    )


def step_launch_message(task: StepTask, run: Run) -> LaunchRun:
    """A step task as its agent receives it: its run's launch, narrowed to one step
    attempt under the task's lease, its inputs as the outputs it reuses, in the code
    version the run runs."""
    assert task.lease is not None
    return dataclasses.replace(
        launch_message(run, claim_pool_slots=False),  # the orchestrator took the slot
        lease=task.lease,
        reuse_outputs=task.inputs,
        code_version=run.tags.get(CODE_VERSION_TAG) or run.code_version or "",
        step=task.step,
        step_attempt=task.attempt,
    )


def result_message(task: StepTask, agent_names: dict[str, str]) -> StepResult:
    return StepResult(
        run_id=task.run_id,
        lease=task.run_lease,
        task_id=task.task_id,
        step=task.step,
        attempt=task.attempt,
        agent=agent_names.get(task.agent_id or "", task.agent_id or ""),
        outcome=task.outcome,
    )


async def wake_step_agents(storage: StepTaskStore, bus: WakeBus, run_ids: Iterable[str]) -> None:
    """These runs ended, or are being canceled or resumed: the agents running their step
    tasks are owed stop orders now, not at their next poll."""
    for run_id in run_ids:
        for agent_id in await storage.step_task_agents(run_id):
            bus.publish(AGENT, agent_id)


def grant_message(claim: Claim) -> SlotGrant:
    return SlotGrant(
        run_id=claim.run_id,
        lease=claim.lease,
        claim_id=claim.claim_id,
        step=claim.step,
        attempt=claim.attempt,
        pool=claim.pool,
    )


@dataclass(eq=False)
class _ParkedPoll:
    evicted: bool = False


class Dispatcher:
    """Answers agents' long-polls with the launches and stop orders owed to them.

    At most `max_polls_per_agent` polls of one agent are parked at a time: a newer poll
    ends the oldest one with an empty reply (its client has most likely gone, e.g. after
    a half-open connection), so an agent can never tie up more than that many.

    An idle poll is held for the poll timeout less a random part of up to `HOLD_SPREAD`
    of it. With a fixed hold, polls that arrived together (a fleet starting, every agent
    reconnecting after a restart, all those answered after one pause) would expire
    together, every time, and come back as one burst; the spread dissolves such bursts
    within a few rounds, as Consul's jittered blocking queries do.
    """

    HOLD_SPREAD = 0.2

    def __init__(
        self,
        storage: Storage,
        terminate_grace_seconds: float,
        clock: Clock,
        bus: WakeBus,
        metrics: Metrics,
        broker: EvaluationBroker | None = None,
        max_polls_per_agent: int = 2,
        spread: Callable[[], float] = random.random,
        claim_pool_slots: bool = True,
    ) -> None:
        self.storage = storage
        self.claim_pool_slots = claim_pool_slots  # op granularity: steps claim slots
        self.spread = spread  # in [0, 1): which part of HOLD_SPREAD this poll gives up
        self.max_polls_per_agent = max_polls_per_agent
        self._parked: dict[str, list[_ParkedPoll]] = {}
        self.broker = broker
        self.grace = terminate_grace_seconds
        self.clock = clock
        self.bus = bus
        self.metrics = metrics
        self.agents = KeyedWaiters()  # parked polls, keyed by agent id: AGENT wake-ups
        # Reload requests are stored; a poll reads storage for one only if told of it
        # (a RELOAD wake-up) or if it has not looked for this agent since it started.
        self._reload_told: set[str] = set()
        self._reload_looked: set[str] = set()

    def reload_requested(self, agent_id: str | None) -> None:
        """A reload was asked of this agent (None: of any: the bus lost wake-ups)."""
        if agent_id is None:
            self._reload_looked.clear()
            return
        self._reload_told.add(agent_id)
        self.agents.wake(agent_id)

    def wake_agent(self, agent_id: str | None) -> None:
        """Something is owed to this agent (a launch, a stop): answer its poll now."""
        if agent_id is not None:
            self.agents.notify(agent_id)

    def run_assigned(self, run: Run) -> None:
        self.wake_agent(run.agent_id)

    async def wait_for_commands(
        self,
        agent_id: str,
        held_leases: set[int],
        stopping: set[int],
        max_wait: float,
        held_grants: frozenset[int] = frozenset(),
        held_results: frozenset[int] = frozenset(),
    ) -> PollReply:
        """What the agent must do; waits up to `max_wait` s for something if nothing is."""
        parked = self._parked.setdefault(agent_id, [])
        mine = _ParkedPoll()
        parked.append(mine)
        if len(parked) > self.max_polls_per_agent:
            parked.pop(0).evicted = True
            self.wake_agent(agent_id)
        hold = max_wait * (1 - self.HOLD_SPREAD * self.spread())
        try:
            return await self._wait(
                agent_id, held_leases, stopping, hold, mine, held_grants, held_results
            )
        finally:
            if mine in parked:
                parked.remove(mine)
            if not parked and self._parked.get(agent_id) is parked:
                del self._parked[agent_id]

    async def launches_held(self, agent_id: str, runs: list[Run]) -> None:
        """The agent holds these runs' launches (a poll listed the lease, or records came
        under it): mark them, and time the dispatch of each once, when first marked."""
        received = await self.storage.ack_launches(agent_id, [r.lease for r in runs if r.lease])
        now = self.clock.time()
        for run in runs:
            if run.lease in received:
                self.metrics.launch_received(run, now)

    async def _deliverable(self, launches: list[LaunchRun]) -> list[LaunchRun]:
        """The launches an agent can receive; a run whose launch it could not (stored
        before the rules of control_plane/model/submission.py, say) fails with the reason, so
        that one run can never spoil the poll replies of the agent it was given to."""
        bad = {}
        for launch in launches:
            if (problem := delivery_problem(PollReply(launches=[launch]))) is not None:
                bad[launch.run_id] = Verdict(
                    launch.run_id,
                    launch.lease,
                    RunStatus.STARTING,
                    RunStatus.FAILURE,
                    UNDELIVERABLE,
                    f"the launch message cannot be delivered: {problem}",
                )
        if not bad:
            return launches
        changed = await self.storage.apply_verdicts(list(bad.values()), self.clock.time(), 0)
        runs_changed(self.bus, changed)
        return [launch for launch in launches if launch.run_id not in bad]

    async def _reload_owed(self, agent_id: str) -> ReloadLocations | None:
        if agent_id not in self._reload_told and agent_id in self._reload_looked:
            return None
        self._reload_told.discard(agent_id)
        self._reload_looked.add(agent_id)
        locations = await self.storage.take_reload(agent_id)
        return None if locations is None else ReloadLocations(locations)

    async def _step_launches(self, agent_id: str, held_leases: set[int]) -> list[LaunchRun]:
        """The step tasks placed on this agent that it does not hold yet."""
        pending = await self.storage.pending_step_launches(agent_id)
        return [step_launch_message(t, run) for t, run in pending if t.lease not in held_leases]

    async def _agent_names(self, tasks: list[StepTask]) -> dict[str, str]:
        ids = {t.agent_id for t in tasks if t.agent_id is not None}
        return {a.agent_id: a.name for a in (await self.storage.get_agents(ids)).values()}

    def parked_polls(self, agent_id: str) -> int:
        return len(self._parked.get(agent_id, ()))

    async def _wait(
        self,
        agent_id: str,
        held_leases: set[int],
        stopping: set[int],
        max_wait: float,
        mine: _ParkedPoll,
        held_grants: frozenset[int],
        held_results: frozenset[int] = frozenset(),
    ) -> PollReply:
        async def owed() -> PollReply | None:
            if mine.evicted:
                return PollReply()
            runs = await self.storage.pending_launches(agent_id)
            launches = await self._deliverable(
                [
                    launch_message(r, self.claim_pool_slots)
                    for r in runs
                    if r.lease not in held_leases
                ]
            )
            held = [r for r in runs if r.lease in held_leases and not r.launch_acked]
            await self.launches_held(agent_id, held)
            orders, canceled = await self.storage.stop_orders(
                agent_id, sorted(held_leases), self.clock.time()
            )
            if canceled:
                runs_changed(self.bus, canceled)
            stops = [
                StopRun(o.run_id, o.lease, o.cancel, o.reason, self.grace)
                for o in orders
                if o.lease not in stopping
            ]
            evaluations = []
            if self.broker is not None and await self.broker.waiting():
                hosted = (await self.storage.code_catalog()).hosted.get(agent_id, set())
                evaluations = await self.broker.take_for(agent_id, hosted)
            grants = []
            if held_leases:  # a grant is for a step of an attempt the agent holds
                owed_grants = await self.storage.owed_grants(agent_id, held_grants)
                grants = [grant_message(c) for c in owed_grants if c.lease in held_leases]
            launches += await self._step_launches(agent_id, held_leases)
            results = []
            if held_leases:  # a result is for a run attempt the agent holds
                owed_results = await self.storage.owed_step_results(
                    agent_id, held_leases, held_results
                )
                if owed_results:
                    names = await self._agent_names(owed_results)
                    results = [result_message(t, names) for t in owed_results]
            reload = await self._reload_owed(agent_id)
            if launches or stops or evaluations or grants or reload or results:
                return PollReply(launches, stops, evaluations, grants, reload, results)
            return None

        return await self.agents.wait_for(agent_id, owed, max_wait) or PollReply()
