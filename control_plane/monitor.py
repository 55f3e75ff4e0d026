"""Run monitoring: notice runs whose worker cannot finish them, and end them with a reason.

Five deadlines per active run, as in Dagster's run monitoring (plus what it lacks):
its agent's heartbeat (`agent lost`), a launch the agent did not acknowledge within a few
seconds (back to the queue), STARTING too long (start timeout), CANCELING too
long (cancel timeout), STARTED too long (max runtime). `find_verdicts` is a pure
function of the runs, their agents and the time; `RunMonitor` sleeps until the earliest
deadline (or until woken) rather than ticking, and storage applies each verdict only if
the run is still where the monitor saw it, so an agent's own report wins a race.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from control_plane.clock import Clock
from control_plane.config import RunMonitoringConfig
from control_plane.health import DaemonHealth
from control_plane.stallwatch import StallWatch
from control_plane.statuses import AGENT_LOST, MAX_RUNTIME, START_TIMEOUT, RunStatus
from control_plane.storage import Agent, Run, Storage, StorageFull, Verdict, iso
from protocol.tags import MAX_RUNTIME_TAG

log = logging.getLogger("fleetrun.monitor")

MAX_SLEEP_SECONDS = 5.0


def max_runtime(run: Run, config: RunMonitoringConfig) -> float:
    """Seconds a run may stay STARTED: its `fleetrun/max_runtime` tag, else the config."""
    tag = run.tags.get(MAX_RUNTIME_TAG)
    try:
        return float(tag) if tag is not None else config.max_runtime_seconds
    except ValueError:  # refused at submission; only a run stored before that could have it
        return config.max_runtime_seconds


def _run_deadline(
    run: Run, agent: Agent | None, config: RunMonitoringConfig, boot_time: float, now: float
) -> tuple[float, Verdict] | None:
    """The earliest deadline of one run and the verdict due when it passes."""

    def verdict(outcome: RunStatus, kind: str, message: str, offline: str | None = None) -> Verdict:
        return Verdict(run.run_id, run.lease, run.status, outcome, kind, message, offline)

    candidates: list[tuple[float, Verdict]] = []
    if agent is not None:
        # After a control-plane restart, stall or clock jump (`boot_time`: the last
        # rebase) every agent gets a full timeout from then; a heartbeat stamped in the
        # future (the clock stepped back) counts as now.
        last = min(agent.last_heartbeat, now)
        seen = max(last, boot_time)
        silent = now - last
        canceling = run.status == RunStatus.CANCELING
        message = (
            f"agent lost: no heartbeat from agent {agent.name} for {silent:.0f} s"
            f" (last seen {iso(agent.last_heartbeat)})"
        )
        outcome = RunStatus.CANCELED if canceling else RunStatus.FAILURE
        lost = verdict(outcome, AGENT_LOST, message, agent.agent_id)
        candidates.append((seen + config.agent_heartbeat_timeout_seconds, lost))
    since = max(run.status_time or run.create_time, boot_time)  # never early: see above
    if run.status == RunStatus.STARTING and not run.launch_acked:
        limit = config.launch_ack_timeout_seconds
        message = f"launch not acknowledged by the agent within {limit:g} s; back to the queue"
        candidates.append((since + limit, verdict(RunStatus.QUEUED, "launch_not_acked", message)))
    if run.status == RunStatus.STARTING:
        limit = config.start_timeout_seconds
        message = f"run did not start within {limit:g} s"
        candidates.append((since + limit, verdict(RunStatus.FAILURE, START_TIMEOUT, message)))
    elif run.status == RunStatus.CANCELING:
        limit = config.cancel_timeout_seconds
        message = f"canceled: the worker did not confirm within {limit:g} s"
        candidates.append((since + limit, verdict(RunStatus.CANCELED, "cancel_timeout", message)))
    elif run.status == RunStatus.STARTED and (limit := max_runtime(run, config)) > 0:
        message = f"exceeded max runtime of {limit:g} s"
        started = max(run.start_time or since, boot_time)
        candidates.append((started + limit, verdict(RunStatus.FAILURE, MAX_RUNTIME, message)))
    return min(candidates, key=lambda c: c[0]) if candidates else None


def find_verdicts(
    runs: list[Run],
    agents: dict[str, Agent],
    now: float,
    config: RunMonitoringConfig,
    boot_time: float,
) -> tuple[list[Verdict], float | None]:
    """Verdicts due now, and when the next one could fall due (None: no active run)."""
    verdicts: list[Verdict] = []
    next_deadline: float | None = None
    for run in runs:
        found = _run_deadline(run, agents.get(run.agent_id or ""), config, boot_time, now)
        if found is None:
            continue
        deadline, verdict = found
        if deadline <= now:
            verdicts.append(verdict)
        elif next_deadline is None or deadline < next_deadline:
            next_deadline = deadline
    return verdicts, next_deadline


class RunMonitor:
    def __init__(
        self,
        storage: Storage,
        config: RunMonitoringConfig,
        clock: Clock,
        on_verdicts: Callable[[list[Verdict], list[Run]], None],
    ) -> None:
        self.storage = storage
        self.config = config
        self.clock = clock
        self.health = DaemonHealth(clock)  # replaced by the control plane's shared one
        self.on_verdicts = on_verdicts
        self.may_act: Callable[[], bool] = lambda: True  # leader election's say
        self.boot_time = clock.time()
        self._wakeup = asyncio.Event()
        self.watch = StallWatch(clock, self.rebase)
        self._storage_was_full = False

    def wake(self) -> None:
        """A run started, was canceled or changed agent: re-read the deadlines."""
        self._wakeup.set()

    def rebase(self, reason: str = "control plane started") -> None:
        """Start every deadline again from now (a restart, a stall, a clock jump)."""
        self.boot_time = self.clock.time()
        self.wake()

    async def check_once(self) -> float | None:
        """Apply every verdict due now; returns the next deadline.

        While storage cannot write (disk full), no heartbeat can be recorded either, so
        nobody is judged; once it can, every deadline restarts, as after a restart."""
        if self.storage.full_reason() is not None:
            self._storage_was_full = True
            try:
                await self.storage.probe_write()
            except StorageFull:
                return self.clock.time() + 1.0
        if self._storage_was_full:
            self._storage_was_full = False
            self.rebase("storage can write again")
        runs = await self.storage.active_runs()
        if not runs:
            return None
        agents = await self.storage.get_agents({r.agent_id for r in runs if r.agent_id})
        self.watch.observe()  # a freeze that just ended must not count against agents
        now = self.clock.time()
        verdicts, next_deadline = find_verdicts(runs, agents, now, self.config, self.boot_time)
        if verdicts:
            changed = await self.storage.apply_verdicts(
                verdicts, now, self.config.max_resume_run_attempts
            )
            for run in changed:
                log.warning("run %s: %s (%s)", run.run_id, run.status, run.status_reason,
                            extra={"run_id": run.run_id, "agent": run.agent_id})  # fmt: skip
            if changed:
                self.on_verdicts(verdicts, changed)
        return next_deadline

    async def run_forever(self) -> None:
        while True:
            self.health.beat("monitor")
            self._wakeup.clear()
            try:
                with self.health.timed("monitor"):
                    next_deadline = await self.check_once() if self.may_act() else None
            except Exception as exc:
                self.health.failed("monitor", exc)
                next_deadline = None
            sleep = MAX_SLEEP_SECONDS
            if next_deadline is not None:
                sleep = min(sleep, max(0.0, next_deadline - self.clock.time()) + 0.01)
            try:
                await asyncio.wait_for(self._wakeup.wait(), sleep)
            except TimeoutError:
                pass
