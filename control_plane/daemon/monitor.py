"""Run monitoring: notice runs whose worker cannot finish them, and end them with a reason.

Five deadlines per active run, as in Dagster's run monitoring (plus what it lacks):
its agent's heartbeat (`agent lost`), a launch the agent did not acknowledge within a few
seconds (back to the queue), STARTING too long (start timeout), CANCELING too
long (cancel timeout), STARTED too long (max runtime). `find_verdicts` is a pure
function of the runs, their agents and the time; `monitor_pass` applies what is due and
asks to run again at the earliest deadline (or when woken) rather than ticking, and
storage applies each verdict only if the run is still where the monitor saw it, so an
agent's own report wins a race. The stall watch (stallwatch.py) rebases it after a gap
of the control plane's own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from control_plane.bus import AGENT, MONITOR, QUEUE, WakeBus, runs_changed
from control_plane.config import RunMonitoringConfig
from control_plane.daemon.stallwatch import StallWatch
from control_plane.fleet.dispatch import wake_step_agents
from control_plane.model.agents import Agent
from control_plane.model.runs import Run, Verdict
from control_plane.model.statuses import MAX_RUNTIME, START_TIMEOUT, RunStatus
from control_plane.model.steptasks import StepTask, StepTaskLost
from control_plane.model.times import iso
from control_plane.storage.errors import StorageFull
from control_plane.storage.port import AgentStore, Database, RunStore, StepTaskStore
from protocol.events import AGENT_LOST
from protocol.tags import MAX_RUNTIME_TAG

log = logging.getLogger("fleetrun.monitor")


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


def _step_task_deadline(
    task: StepTask, agent: Agent | None, config: RunMonitoringConfig, boot_time: float, now: float
) -> tuple[float, StepTaskLost] | None:
    """When a RUNNING step task's agent counts as lost (its heartbeat, as for a run)."""
    if agent is None or task.lease is None:
        return None
    last = min(agent.last_heartbeat, now)
    message = (
        f"agent lost: no heartbeat from agent {agent.name} for {now - last:.0f} s while it"
        f" ran step {task.step} (attempt {task.attempt})"
    )
    lost = StepTaskLost(task.task_id, task.lease, message, agent.agent_id)
    return max(last, boot_time) + config.agent_heartbeat_timeout_seconds, lost


def find_verdicts(
    runs: list[Run],
    agents: dict[str, Agent],
    now: float,
    config: RunMonitoringConfig,
    boot_time: float,
    step_tasks: Sequence[StepTask] = (),
) -> tuple[list[Verdict | StepTaskLost], float | None]:
    """Verdicts due now (on runs; on RUNNING step tasks, StepTaskLost when their agent
    went silent), and when the next one could fall due (None: nothing active)."""
    verdicts: list[Verdict | StepTaskLost] = []
    next_deadline: float | None = None
    candidates = [
        *(_run_deadline(r, agents.get(r.agent_id or ""), config, boot_time, now) for r in runs),
        *(
            _step_task_deadline(t, agents.get(t.agent_id or ""), config, boot_time, now)
            for t in step_tasks
        ),
    ]
    for found in candidates:
        if found is None:
            continue
        deadline, verdict = found
        if deadline <= now:
            verdicts.append(verdict)
        elif next_deadline is None or deadline < next_deadline:
            next_deadline = deadline
    return verdicts, next_deadline


class MonitoredStore(RunStore, StepTaskStore, Database, Protocol):
    """What the monitor uses of storage: the runs, and whether the database can write
    (no agent can heartbeat while it cannot, so nobody is judged)."""


@dataclass
class Monitor:
    """What the monitor's passes work with, and the one thing they remember: since when
    agents are judged (`boot_time`, moved by every rebase)."""

    storage: MonitoredStore
    agents: AgentStore
    config: RunMonitoringConfig
    bus: WakeBus
    boot_time: float
    watch: StallWatch | None = None  # consulted before judging: a freeze that just ended
    storage_was_full: bool = False

    def rebase(self, now: float, reason: str = "control plane started") -> None:
        """Start every deadline again from `now` (a restart, a stall, a clock jump)."""
        log.info("run monitoring: every deadline starts again (%s)", reason)
        self.boot_time = now
        self.bus.publish(MONITOR)


async def monitor_pass(monitor: Monitor, now: float) -> float | None:
    """Apply every verdict due now; returns the next deadline (None: no active run).

    While storage cannot write (disk full), no heartbeat can be recorded either, so
    nobody is judged; once it can, every deadline restarts, as after a restart."""
    storage = monitor.storage
    if storage.full_reason() is not None:
        monitor.storage_was_full = True
        try:
            await storage.probe_write()
        except StorageFull:
            return now + 1.0
    if monitor.storage_was_full:
        monitor.storage_was_full = False
        monitor.rebase(now, "storage can write again")
    runs = await storage.active_runs()
    if not runs:
        return None
    tasks = await storage.running_step_tasks()
    agent_ids = {r.agent_id for r in runs if r.agent_id} | {t.agent_id for t in tasks}
    agents = await monitor.agents.get_agents({a for a in agent_ids if a})
    if monitor.watch is not None:
        monitor.watch.observe()  # a gap of ours, ending just now, must not count against agents
    found, next_deadline = find_verdicts(
        runs, agents, now, monitor.config, monitor.boot_time, tasks
    )
    lost = [v for v in found if isinstance(v, StepTaskLost)]
    if lost:
        for task in lost:
            log.warning("step task %d: %s", task.task_id, task.message)
        for owed in await storage.end_lost_step_tasks(lost, now):
            monitor.bus.publish(AGENT, owed)
        monitor.bus.publish(QUEUE)
    verdicts = [v for v in found if isinstance(v, Verdict)]
    if verdicts:
        changed = await storage.apply_verdicts(
            verdicts, now, monitor.config.max_resume_run_attempts
        )
        for run in changed:
            log.warning(
                "run %s: %s (%s)",
                run.run_id,
                run.status,
                run.status_reason,
                extra={"run_id": run.run_id, "agent": run.agent_id},
            )
        if changed:
            runs_changed(monitor.bus, changed)
            await wake_step_agents(storage, monitor.bus, [run.run_id for run in changed])
            for verdict in verdicts:
                monitor.bus.publish(AGENT, verdict.offline_agent)
    return next_deadline
