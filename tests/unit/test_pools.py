"""Pools and placement as pure decisions: who gets a slot next, which agent a run may go
to, and the reasons a run or a step waits."""

from __future__ import annotations

import dataclasses

from control_plane.config import ConcurrencyConfig, PoolConfig, RunCoordinatorConfig
from control_plane.daemon.run_queue import DispatchPlan, plan_dispatch
from control_plane.model.agents import Agent
from control_plane.model.pools import Claim, PoolLimits, plan_grants, pool_usage
from control_plane.model.runs import QueueSnapshot, Run
from protocol.tags import label_selector, tag_problem
from tests.unit.test_coordinator import NOW, active, agent, run


def claim(claim_id: int, run_id: str, priority: int = 0, granted: bool = False) -> Claim:
    return Claim(
        claim_id=claim_id,
        pool="db",
        run_id=run_id,
        lease=1,
        step="load",
        attempt=0,
        priority=priority,
        create_time=float(claim_id),
        granted_time=1.0 if granted else None,
    )


def test_grants_fill_free_slots_by_priority_then_age() -> None:
    claims = [claim(1, "a", granted=True), claim(2, "b"), claim(3, "c", priority=9), claim(4, "d")]
    plan = plan_grants(claims, PoolLimits(configured={"db": 3}))
    assert [c.run_id for c in plan.granted] == ["c", "b"]
    assert [(c.run_id, why) for c, why in plan.waiting] == [
        ("d", "pool db: 3 of 3 slots in use; 1 of 1 in line")
    ]


def test_limits_set_win_over_configured_and_the_default_applies_to_the_rest() -> None:
    limits = PoolLimits(set_limits={"db": 0}, configured={"db": 5, "api": 2}, default=1)
    assert (limits.limit_of("db"), limits.source_of("db")) == (0, "api")
    assert (limits.limit_of("api"), limits.source_of("api")) == (2, "config")
    assert (limits.limit_of("other"), limits.source_of("other")) == (1, "default")
    assert PoolLimits().limit_of("other") is None  # default 0: unlimited
    paused = plan_grants([claim(1, "a")], limits)
    assert paused.granted == [] and paused.waiting[0][1] == "pool db is paused (limit 0)"


def test_a_noted_waiter_is_not_told_twice_and_usage_lists_waiters_in_order() -> None:
    waiting = dataclasses.replace(claim(2, "b"), noted=True)
    claims = [claim(1, "a", granted=True), waiting, claim(3, "c", priority=1)]
    plan = plan_grants(claims, PoolLimits(configured={"db": 1}))
    assert plan.granted == [] and [c.run_id for c, _ in plan.waiting] == ["c"]
    (usage,) = pool_usage(claims, PoolLimits(configured={"db": 1, "idle": 4}))[:1]
    assert usage.name == "db" and [c.run_id for c in usage.waiters] == ["c", "b"]
    assert [u.name for u in pool_usage(claims, PoolLimits(configured={"idle": 4}))] == [
        "db",
        "idle",
    ]


OP_POOLS = ConcurrencyConfig()


def placed(
    queued: list[Run],
    agents: list[Agent],
    running: list[Run] | None = None,
    claims: list[Claim] | None = None,
    pools: ConcurrencyConfig = OP_POOLS,
    job_pools: frozenset[str] = frozenset(),
) -> DispatchPlan:
    snapshot = QueueSnapshot(
        queued=queued,
        active=running or [],
        agents=agents,
        hosted={a.agent_id: {"loc"} for a in agents},
        claims=claims or [],
        job_pools={("loc", "etl"): job_pools},
    )
    return plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, 30, pools)


def asking(run_id: str, tags: dict[str, str]) -> Run:
    """A queued run with placement tags."""
    queued = run(run_id)
    queued.tags.update(tags)
    return queued


def labelled(agent_id: str, labels: dict[str, str], **resources: int) -> Agent:
    return dataclasses.replace(agent(agent_id), labels=labels, resources=resources)


def test_a_run_goes_only_to_an_agent_with_every_label_it_requires() -> None:
    agents = [labelled("w1", {"gpu": "t4"}), labelled("w2", {"gpu": "a100", "zone": "us"})]
    wants = asking("r1", {"fleetrun/requires": "gpu=a100,zone=eu"})
    (decision,) = placed([wants], agents).decisions
    assert decision.reason == "no ONLINE agent has label zone=eu"
    agents.append(labelled("w3", {"gpu": "t4", "zone": "eu"}))
    (decision,) = placed([wants], agents).decisions
    assert decision.reason == "no ONLINE agent has every label of gpu=a100,zone=eu"
    agents.append(labelled("w4", {"gpu": "a100", "zone": "eu", "extra": "x"}))
    (decision,) = placed([wants], agents).decisions
    assert decision.agent is not None and decision.agent.name == "w4"


def test_resources_are_reserved_by_running_runs_until_they_end() -> None:
    agents = [labelled("w3", {}, cpus=4), labelled("w4", {})]
    big = asking("r2", {"fleetrun/cpus": "3"})
    holding = active("r1", "w3", **{"fleetrun/cpus": "2"})
    (decision,) = placed([big], agents, [holding]).decisions
    assert decision.reason == "needs 3 cpus: agent w3 has 2 of 4 cpus free; agent w4 offers no cpus"
    (decision,) = placed([big], agents).decisions
    assert decision.agent is not None and decision.agent.name == "w3"
    # two queued runs that each fit alone: the first takes what the second needed
    both = placed([big, asking("r3", {"fleetrun/cpus": "2"})], agents).decisions
    assert both[0].agent is not None and both[1].reason is not None
    assert "agent w3 has 1 of 4 cpus free" in both[1].reason


def test_a_fraction_of_a_cpu_is_placed_and_held_as_such() -> None:
    """`fleetrun/cpus` may be a fraction (it is also a container's CPU limit)."""
    agents = [labelled("w3", {}, cpus=1)]
    halves = [asking(f"r{n}", {"fleetrun/cpus": "0.5"}) for n in range(3)]
    decisions = placed(halves, agents).decisions
    assert [d.agent is not None for d in decisions] == [True, True, False]
    assert decisions[2].reason == "needs 0.5 cpus: agent w3 has 0 of 1 cpus free"


def test_run_granularity_admits_a_run_only_while_its_pools_have_room() -> None:
    one = ConcurrencyConfig(granularity="run", pools=[PoolConfig("db", 1)])
    first, second = run("r1"), run("r2")
    plan = placed([first, second], [agent("a1")], pools=one, job_pools=frozenset({"db"}))
    assert plan.decisions[0].pools == ("db",)
    assert plan.decisions[1].reason == "pool db: 1 of 1 slots in use"
    held = [dataclasses.replace(claim(1, "r0", granted=True), step="")]
    plan = placed([first], [agent("a1")], claims=held, pools=one, job_pools=frozenset({"db"}))
    assert plan.decisions[0].reason == "pool db: 1 of 1 slots in use"
    # at op granularity the same run goes at once, and holds nothing
    plan = placed([first], [agent("a1")], claims=held, job_pools=frozenset({"db"}))
    assert plan.decisions[0].agent is not None and plan.decisions[0].pools == ()


def test_placement_tags_are_checked_at_submission_naming_the_tag() -> None:
    assert tag_problem({"fleetrun/cpus": "two"}) == (
        "tag fleetrun/cpus must be a number of CPUs, got 'two'"
    )
    assert tag_problem({"fleetrun/cpus": "0.5"}) is None  # a fraction: a container's limit
    assert str(tag_problem({"fleetrun/memory_mb": "-1"})).startswith("tag fleetrun/memory_mb")
    problem = tag_problem({"fleetrun/requires": "gpu"})
    assert problem is not None and problem.startswith("tag fleetrun/requires must be key=value")
    assert tag_problem({"fleetrun/requires": "gpu=a100, zone=eu", "fleetrun/gpus": "1"}) is None
    assert label_selector("gpu=a100, zone=eu") == {"gpu": "a100", "zone": "eu"}
