"""Step tasks in storage, on both backends: asked for under the run's lease, placed,
their records taken under their own lease (fenced with the run's), ended by their
result or by the monitor, and their results owed to the run's agent."""

from __future__ import annotations

import pytest

from control_plane.model.runs import QueueSnapshot
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import DONE, RUNNING, WAITING, StepPlacement, StepTaskLost
from control_plane.storage import Storage
from control_plane.storage.errors import NotYourRun, RecordRefused, StaleLease
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord
from tests.unit.test_storage import new_run

JOB = JobInfo(
    name="etl",
    executor="fleet",
    ops=[
        OpInfo(name="extract"),
        OpInfo(name="load", upstream=["extract"], tags={"fleetrun/queue": "gpu"}),
    ],
)


def record(seq: int, type_: str, step: str | None = None, kind: str = "event", **data: object):
    return RunRecord(seq=seq, time=100.0 + seq, kind=kind, type=type_, step=step, data=data)


def ask(seq: int, step: str = "extract", attempt: int = 0, **inputs: str) -> RunRecord:
    return record(seq, "STEP_TASK_REQUESTED", step, attempt=attempt, inputs=inputs)


async def register(storage: Storage, name: str, queues: list[str] | None = None) -> str:
    location = CodeLocationInfo(name="loc", jobs=[JOB])
    agent = await storage.register_agent(
        name, "h", "0.1", queues or ["default"], 4, [location], now=1.0
    )
    return agent.agent_id


async def started(storage: Storage, run_id: str, agent: str) -> int:
    await storage.create_run(new_run(run_id), 2.0)
    (run,) = await storage.assign_queued(2.0, lambda _s: [(run_id, agent)])
    assert run.lease is not None
    await storage.append_records(run_id, run.lease, [record(1, "RUN_START")], 3.0)
    return run.lease


async def place(storage: Storage, agent: str) -> list[int]:
    """Place every waiting step task on `agent`; their leases."""
    seen: list[QueueSnapshot] = []

    def decide(snapshot: QueueSnapshot) -> list[StepPlacement]:
        seen.append(snapshot)
        return [StepPlacement(t.task_id, agent) for t in snapshot.waiting_steps]

    placed = await storage.assign_queued(5.0, decide)
    leases = [t.lease for t in placed if getattr(t, "lease", None) is not None]
    return [lease for lease in leases if lease is not None]


async def test_an_ask_under_the_runs_lease_becomes_one_waiting_step_task(storage: Storage) -> None:
    agent = await register(storage, "w1")
    lease = await started(storage, "r1", agent)
    result = await storage.append_records("r1", lease, [ask(2), ask(3)], 4.0)
    assert result.step_tasks_changed and result.acked_seq == 3
    (task,) = await storage.step_tasks_of("r1")
    assert (task.step, task.attempt, task.status, task.run_lease) == ("extract", 0, WAITING, lease)
    snapshot = await storage.queue_snapshot()
    assert [t.task_id for t in snapshot.waiting_steps] == [task.task_id]
    assert snapshot.job_executors == {}  # no queued run: nothing to know of executors


async def test_an_ask_with_inputs_not_the_steps_upstream_fails_the_run(storage: Storage) -> None:
    agent = await register(storage, "w1")
    lease = await started(storage, "r1", agent)
    result = await storage.append_records("r1", lease, [ask(2, "load", extract="other")], 4.0)
    assert result.refused is not None and "does not reuse" in result.refused
    run = await storage.get_run("r1")
    assert run is not None and run.status == RunStatus.FAILURE
    assert await storage.step_tasks_of("r1") == []


async def test_a_placed_step_task_runs_under_its_own_lease_and_its_result_is_owed(
    storage: Storage,
) -> None:
    orchestrator = await register(storage, "w1")
    other = await register(storage, "w2", ["default", "gpu"])
    run_lease = await started(storage, "r1", orchestrator)
    await storage.append_records("r1", run_lease, [ask(2)], 4.0)
    (lease,) = await place(storage, other)
    assert lease != run_lease
    ((task, run),) = await storage.pending_step_launches(other)
    assert (task.status, task.lease, run.run_id) == (RUNNING, lease, "r1")
    assert (await storage.queue_snapshot()).running_steps == [task]
    # Another agent may not send under it
    with pytest.raises(NotYourRun):
        await storage.append_records("r1", lease, [record(1, "RUN_START")], 6.0, agent_id="x")
    records = [
        record(1, "RUN_START", pid=7),
        record(2, "stdout", kind="log"),
        record(3, "STEP_OUTPUT", "extract", output_bytes=b"\x80\x04K\x03."),
        record(4, "RUN_SUCCESS", duration_seconds=0.5),
    ]
    result = await storage.append_records("r1", lease, records, 6.0, agent_id=other)
    assert result.acked_seq == 4 and result.step_task_ended == orchestrator
    assert result.status == RunStatus.STARTED  # the run goes on
    assert await storage.get_output("r1", "extract") == b"\x80\x04K\x03."
    events = await storage.get_events("r1", 0, 100)
    started_event = next(e for e in events if e.type == "STEP_TASK_STARTED")
    assert started_event.step == "extract" and started_event.data["agent"] == "w2"
    ended = next(e for e in events if e.type == "STEP_TASK_ENDED")
    assert ended.data["ok"] is True and ended.data["agent_id"] == other
    (done,) = await storage.step_tasks_of("r1")
    assert done.status == DONE and done.outcome == {"ok": True, "duration_seconds": 0.5}
    (owed,) = await storage.owed_step_results(orchestrator, [run_lease], [])
    assert owed.task_id == done.task_id
    assert await storage.owed_step_results(orchestrator, [run_lease], [done.task_id]) == []
    assert await storage.owed_step_results(other, [run_lease], []) == []
    assert await storage.pending_step_launches(other) == []
    # its stop: none owed while it runs; once ended, the agent is told to let it go
    orders, _ = await storage.stop_orders(other, [lease], 7.0)
    assert [(o.lease, o.cancel) for o in orders] == [(lease, False)]


async def test_a_step_task_is_fenced_with_its_runs_lease(storage: Storage) -> None:
    orchestrator = await register(storage, "w1")
    run_lease = await started(storage, "r1", orchestrator)
    await storage.append_records("r1", run_lease, [ask(2)], 4.0)
    (lease,) = await place(storage, orchestrator)
    orders, _ = await storage.stop_orders(orchestrator, [run_lease, lease], 5.0)
    assert orders == []  # a live step task's lease is not a stale run lease
    await storage.request_cancel("r1", 6.0)
    orders, _ = await storage.stop_orders(orchestrator, [run_lease, lease], 6.0)
    assert sorted((o.lease, o.cancel) for o in orders) == [(run_lease, True), (lease, True)]
    with pytest.raises(StaleLease):
        await storage.append_records("r1", lease, [record(1, "RUN_START")], 7.0)
    assert await storage.step_task_agents("r1") == {orchestrator}
    assert (await storage.queue_snapshot()).running_steps != []  # until the run ends
    await storage.append_records("r1", run_lease, [record(3, "RUN_CANCELED")], 8.0)
    assert (await storage.queue_snapshot()).running_steps == []  # it holds no slot now
    orders, _ = await storage.stop_orders(orchestrator, [lease], 9.0)
    assert [(o.lease, o.cancel) for o in orders] == [(lease, False)]


async def test_a_lost_step_task_fails_once_and_its_result_is_owed(storage: Storage) -> None:
    orchestrator = await register(storage, "w1")
    other = await register(storage, "w2")
    run_lease = await started(storage, "r1", orchestrator)
    await storage.append_records("r1", run_lease, [ask(2)], 4.0)
    (lease,) = await place(storage, other)
    (task,) = await storage.running_step_tasks()
    verdict = StepTaskLost(task.task_id, lease, "agent lost", other)
    assert await storage.end_lost_step_tasks([verdict], 6.0) == [orchestrator]
    assert await storage.end_lost_step_tasks([verdict], 7.0) == []  # guarded
    (done,) = await storage.step_tasks_of("r1")
    assert (done.status, done.outcome["error_type"]) == (DONE, "step_task_lost")
    agent = await storage.get_agent(other)
    assert agent is not None and agent.status == "OFFLINE"
    # what the lost agent sends afterwards is skipped, not stored
    result = await storage.append_records("r1", lease, [record(1, "RUN_START")], 8.0)
    assert result.acked_seq == 1 and result.step_task_ended is None
    assert not [e for e in await storage.get_events("r1", 0, 100) if e.type == "STEP_TASK_STARTED"]


async def test_an_agent_that_registers_without_its_step_task_loses_it(storage: Storage) -> None:
    orchestrator = await register(storage, "w1")
    other = await register(storage, "w2")
    run_lease = await started(storage, "r1", orchestrator)
    await storage.append_records("r1", run_lease, [ask(2)], 4.0)
    (lease,) = await place(storage, other)
    assert await storage.reconcile_step_tasks(other, [lease], 5.0) == []
    assert await storage.reconcile_step_tasks(other, [], 6.0) == [orchestrator]
    (done,) = await storage.step_tasks_of("r1")
    assert done.status == DONE and "agent restarted" in done.outcome["message"]


async def test_a_step_task_uploads_its_own_steps_output_only(storage: Storage) -> None:
    orchestrator = await register(storage, "w1")
    run_lease = await started(storage, "r1", orchestrator)
    await storage.append_records("r1", run_lease, [ask(2)], 4.0)
    (lease,) = await place(storage, orchestrator)
    await storage.put_output("r1", lease, "extract", b"big output", 5.0)
    assert await storage.get_output("r1", "extract") == b"big output"
    with pytest.raises(RecordRefused):
        await storage.put_output("r1", lease, "load", b"not mine", 5.0)
    assert await storage.get_output("r1", "load") is None
    await storage.append_records("r1", run_lease, [record(3, "RUN_SUCCESS")], 6.0)
    with pytest.raises(StaleLease):
        await storage.put_output("r1", lease, "extract", b"too late", 7.0)
