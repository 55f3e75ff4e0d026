"""Ingest: where a run's records from its agent become its event log and status.

Storage screens and stores an attempt's records in order, once each, and applies the
status they imply in the same transaction; this module tells everyone who waits on
the outcome (the run's watchers, the agent's poll, the run queue, retries, the
monitor) through the bus.
"""

from __future__ import annotations

from control_plane.bus import AGENT, MONITOR, QUEUE, RUN, WakeBus, pools_changed, runs_changed
from control_plane.fleet.dispatch import Dispatcher, wake_step_agents
from control_plane.metrics import Metrics
from control_plane.model.runs import ResumeRules
from control_plane.model.statuses import TERMINAL_STATUSES, RunStatus
from control_plane.storage.errors import RecordRefused
from control_plane.storage.port import Storage
from protocol.messages import EventBatch


async def ingest(
    batch: EventBatch,
    storage: Storage,
    bus: WakeBus,
    dispatcher: Dispatcher,
    metrics: Metrics,
    now: float,
    resume: ResumeRules,
) -> int:
    """Store `batch`; the highest sequence number stored so far for its attempt.
    Raises RecordRefused (after waking the run's watchers) for a record the run may
    not take: the run has then failed, saying why."""
    result = await storage.append_records(
        batch.run_id, batch.lease, batch.records, now, resume, agent_id=batch.agent_id
    )
    metrics.records_stored(result.stored)
    if result.pools_changed:
        pools_changed(bus)
    if result.step_tasks_changed:  # a step task waits: the run queue places it
        bus.publish(QUEUE)
    if result.step_task_ended is not None:  # the orchestrator's poll takes the result
        bus.publish(AGENT, result.step_task_ended)
        bus.publish(QUEUE)  # its agent's slot is free
    if result.refused is not None:
        runs_changed(bus, [], batch.agent_id)
        bus.publish(RUN, batch.run_id)
        raise RecordRefused(result.refused)
    if not result.launch_acked:  # records came before a poll said the agent holds it
        run = await storage.get_run(batch.run_id)
        if run is not None and run.lease == batch.lease:
            await dispatcher.launches_held(batch.agent_id, [run])
    if result.status_changed and result.status in (*TERMINAL_STATUSES, RunStatus.QUEUED):
        runs_changed(bus, [], batch.agent_id)
        await wake_step_agents(storage, bus, [batch.run_id])
    elif result.status_changed:
        bus.publish(MONITOR)  # a new deadline (max runtime) starts
    bus.publish(RUN, batch.run_id)
    return result.acked_seq
