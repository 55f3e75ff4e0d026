"""Step tasks (the fleet executor) as pure decisions: where the run queue places them
and why one waits, which agents may take a fleet run, when the monitor calls one
lost, and how a step task's inputs and outcome are read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from control_plane.config import RunCoordinatorConfig, RunMonitoringConfig
from control_plane.daemon.monitor import find_verdicts
from control_plane.daemon.run_queue import DispatchPlan, plan_dispatch, run_executor
from control_plane.http.ui.steps import step_rows
from control_plane.model.agents import Agent
from control_plane.model.runs import Event, QueueSnapshot, Run
from control_plane.model.statuses import RunStatus
from control_plane.model.steptasks import (
    RUNNING,
    STEP_TASKS_CAPABILITY,
    WAITING,
    StepPlacement,
    StepTask,
    StepTaskLost,
    outcome_of,
    step_queue,
    task_inputs_problem,
)
from tests.unit.test_coordinator import active, run

NOW = 1000.0
STEPS = [STEP_TASKS_CAPABILITY]


def agent(
    agent_id: str,
    slots: int = 4,
    capabilities: Sequence[str] = STEPS,
    labels: dict[str, str] | None = None,
    resources: dict[str, int] | None = None,
    queues: Sequence[str] = ("default",),
    heartbeat: float = NOW,
) -> Agent:
    return Agent(
        agent_id=agent_id,
        name=agent_id,
        hostname="h",
        status="ONLINE",
        queues=list(queues),
        max_concurrent_runs=slots,
        version="0",
        last_heartbeat=heartbeat,
        registered_time=0,
        capabilities=list(capabilities),
        labels=labels or {},
        resources=resources or {},
    )


def task(
    task_id: int,
    status: str = WAITING,
    agent_id: str | None = None,
    queue: str = "default",
    **tags: str,
) -> StepTask:
    return StepTask(
        task_id=task_id,
        run_id="r1",
        run_lease=1,
        step=f"s{task_id}",
        attempt=0,
        queue=queue,
        tags=dict(tags),
        inputs={},
        status=status,
        create_time=0,
        location="loc",
        job="etl",
        agent_id=agent_id,
        lease=100 + task_id if status == RUNNING else None,
    )


def plan(
    agents: list[Agent],
    waiting: Sequence[StepTask] = (),
    running: Sequence[StepTask] = (),
    queued: Sequence[Run] = (),
    active_runs: Sequence[Run] = (),
    executors: dict[tuple[str, str], str] | None = None,
) -> DispatchPlan:
    snapshot = QueueSnapshot(
        queued=list(queued),
        active=list(active_runs),
        agents=agents,
        hosted={a.agent_id: {"loc"} for a in agents},
        job_executors=executors or {},
        waiting_steps=list(waiting),
        running_steps=list(running),
    )
    return plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, heartbeat_timeout=30)


def placed(p: DispatchPlan) -> dict[int, str | None]:
    return {d.task.task_id: d.agent.agent_id if d.agent else None for d in p.step_decisions}


def test_step_tasks_spread_over_free_agents_and_take_a_slot_each() -> None:
    p = plan([agent("a1", slots=2), agent("a2", slots=2)], [task(i) for i in range(1, 6)])
    where = placed(p)
    assert sorted(a for a in where.values() if a) == ["a1", "a1", "a2", "a2"]
    (waits,) = [d for d in p.step_decisions if d.agent is None]
    assert waits.reason == "no agent hosting location loc has a free slot (a1 2/2, a2 2/2)"
    assert [pl for pl in p.placements() if isinstance(pl, StepPlacement)] == [
        StepPlacement(t, a) for t, a in where.items() if a
    ]


def test_running_step_tasks_and_runs_share_an_agents_slots() -> None:
    p = plan(
        [agent("a1", slots=2), agent("a2", slots=2)],
        [task(3)],
        running=[task(1, RUNNING, "a2"), task(2, RUNNING, "a2")],
        active_runs=[active("r1", "a1")],
    )
    assert placed(p) == {3: "a1"}


def test_step_tasks_go_before_queued_runs() -> None:
    p = plan([agent("a1", slots=1)], [task(1)], queued=[run("r2")])
    assert placed(p) == {1: "a1"}
    assert p.decisions[0].agent is None and "free slot" in (p.decisions[0].reason or "")


def test_a_labelled_step_lands_only_on_a_matching_agent_or_says_why_it_waits() -> None:
    agents = [agent("a1"), agent("gpu", labels={"gpu": "a100"})]
    assert placed(plan(agents, [task(1, **{"fleetrun/requires": "gpu=a100"})])) == {1: "gpu"}
    p = plan(agents, [task(1, **{"fleetrun/requires": "gpu=h100"})])
    assert p.step_decisions[0].reason == "no ONLINE agent has label gpu=h100"


def test_a_step_asking_for_resources_holds_them_while_it_runs() -> None:
    agents = [agent("a1", resources={"gpus": 1})]
    running = [task(1, RUNNING, "a1", **{"fleetrun/gpus": "1"})]
    p = plan(agents, [task(2, **{"fleetrun/gpus": "1"})], running=running)
    assert p.step_decisions[0].reason == "needs 1 gpus: agent a1 has 0 of 1 gpus free"


def test_a_step_waits_in_its_ops_queue() -> None:
    agents = [agent("a1"), agent("big", queues=("big",))]
    assert step_queue("default", {"fleetrun/queue": "big"}) == "big"
    assert step_queue("default", {}) == "default"
    assert placed(plan(agents, [task(1, queue="big")])) == {1: "big"}
    p = plan(agents, [task(1, queue="nowhere")])
    assert p.step_decisions[0].reason == "no online agent serves queue nowhere"


def test_step_tasks_and_fleet_runs_never_go_to_an_agent_without_step_tasks() -> None:
    old = agent("old", capabilities=["reuse_outputs"])
    p = plan([old], [task(1)])
    assert p.step_decisions[0].agent is None
    assert "can do step_tasks (upgrade it)" in (p.step_decisions[0].reason or "")
    fleet = plan([old], queued=[run("r2")], executors={("loc", "etl"): "fleet"})
    assert fleet.decisions[0].agent is None
    assert "can do step_tasks" in (fleet.decisions[0].reason or "")
    other = plan([old], queued=[run("r2")], executors={("loc", "etl"): "multiprocess"})
    assert other.decisions[0].agent is not None
    by_config = replace(run("r3"), config={"execution": {"name": "fleet"}})
    assert run_executor(by_config, "in_process") == "fleet"
    assert run_executor(replace(run("r4"), config={"execution": "fleet"}), "") == "fleet"
    assert plan([old], queued=[by_config]).decisions[0].agent is None
    assert plan([old, agent("new")], queued=[by_config]).decisions[0].agent is not None


def test_the_monitor_calls_a_step_task_lost_when_its_agent_goes_silent() -> None:
    config = RunMonitoringConfig(agent_heartbeat_timeout_seconds=30)
    runs = [active("r1", "a1")]
    agents = {"a1": agent("a1"), "a2": agent("a2", heartbeat=NOW - 31)}
    tasks = [task(1, RUNNING, "a2"), task(2, RUNNING, "a1")]
    found, _ = find_verdicts(runs, agents, NOW, config, boot_time=0, step_tasks=tasks)
    (lost,) = found
    assert isinstance(lost, StepTaskLost)
    assert (lost.task_id, lost.lease, lost.offline_agent) == (1, 101, "a2")
    assert "no heartbeat from agent a2 for 31 s while it ran step s1" in lost.message
    # a restart of the control plane (boot time) gives every agent a full timeout again
    found, deadline = find_verdicts(runs, agents, NOW, config, boot_time=NOW - 5, step_tasks=tasks)
    assert found == [] and deadline == NOW - 5 + 30


def test_a_step_tasks_inputs_are_its_upstream_outputs_of_this_run_or_reused() -> None:
    upstream = ["a", "b"]
    assert task_inputs_problem({"a": "r1", "b": "p"}, upstream, "r1", {"b": "p"}) is None
    assert "upstream" in (task_inputs_problem({"a": "r1"}, upstream, "r1", {}) or "")
    assert "does not reuse" in (
        task_inputs_problem({"a": "r1", "b": "other"}, upstream, "r1", {}) or ""
    )
    assert task_inputs_problem(["a"], upstream, "r1", {}) is not None
    assert task_inputs_problem({1: "r1", "b": ["r1"]}, upstream, "r1", {}) is not None


def test_a_step_tasks_outcome_reads_its_workers_result_or_the_agents_report() -> None:
    assert outcome_of({"duration_seconds": 1.5}, True, "") == {
        "ok": True,
        "duration_seconds": 1.5,
    }
    error = {"error_type": "Failure", "message": "no", "traceback": "tb"}
    failed = outcome_of({"step_error": error, "max_retries": 0, "wait_seconds": 2}, False, "")
    assert failed == {**error, "ok": False, "max_retries": 0, "wait_seconds": 2}
    died = outcome_of({"failure_kind": "worker_crash"}, False, "run worker exited with 9")
    assert died["error_type"] == "StepWorkerFailed" and died["message"].endswith("with 9")


def test_the_run_page_names_the_agent_that_ran_each_step() -> None:
    events = [
        Event(1, 1.0, "STEP_START", "s", "", {}),
        Event(2, 1.1, "STEP_TASK_STARTED", "s", "", {"agent": "a2", "attempt": 0}),
        Event(3, 2.0, "STEP_SUCCESS", "s", "", {}),
    ]
    (row,) = step_rows(["s"], replace(active("r1"), status=RunStatus.SUCCESS), events)
    assert (row.agent, row.status, row.attempts) == ("a2", "success", 1)
