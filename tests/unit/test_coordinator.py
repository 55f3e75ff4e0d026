"""The dispatch policy as a pure function: limits, routing, capacity, reasons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from control_plane.config import RunCoordinatorConfig, TagConcurrencyLimit
from control_plane.daemon.run_queue import DispatchPlan, plan_dispatch
from control_plane.model.agents import Agent
from control_plane.model.runs import QueueSnapshot, Run
from control_plane.model.statuses import RunStatus
from protocol.tags import CODE_VERSION_TAG

NOW = 1000.0


def run(
    run_id: str,
    status: RunStatus = RunStatus.QUEUED,
    agent: str | None = None,
    queue: str = "default",
    location: str = "loc",
    **tags: str,
) -> Run:
    return Run(
        run_id=run_id,
        job=tags.get("job", "etl"),
        location=location,
        status=status,
        tags={"fleetrun/job": tags.pop("job", "etl"), **tags},
        config={},
        create_time=0,
        agent_id=agent,
        queue=queue,
    )


def agent(
    agent_id: str,
    slots: int = 8,
    queues: tuple[str, ...] = ("default",),
    heartbeat: float = NOW,
    status: str = "ONLINE",
    operator_drain: bool = False,
) -> Agent:
    return Agent(
        agent_id=agent_id,
        name=agent_id,
        hostname="h",
        status=status,
        operator_drain=operator_drain,
        queues=list(queues),
        max_concurrent_runs=slots,
        version="0",
        last_heartbeat=heartbeat,
        registered_time=0,
    )


def active(run_id: str, agent_id: str = "a1", **tags: str) -> Run:
    return run(run_id, RunStatus.STARTED, agent_id, **tags)


def plan(
    queued: list[Run],
    running: Sequence[Run] = (),
    agents: list[Agent] | None = None,
    hosted: dict[str, set[str]] | None = None,
    **config: Any,
) -> DispatchPlan:
    agents = agents if agents is not None else [agent("a1")]
    hosted = hosted if hosted is not None else {a.agent_id: {"loc"} for a in agents}
    snapshot = QueueSnapshot(queued=queued, active=list(running), agents=agents, hosted=hosted)
    return plan_dispatch(snapshot, RunCoordinatorConfig(**config), NOW, heartbeat_timeout=30)


def launched(p: DispatchPlan) -> list[str]:
    return [r.run_id for r, _ in p.assignments]


def reasons(p: DispatchPlan) -> dict[str, str]:
    return {d.run.run_id: d.reason for d in p.decisions if d.reason}


def test_global_limit_counts_active_runs() -> None:
    p = plan([run("q1"), run("q2"), run("q3")], [active("r1")], max_concurrent_runs=3)
    assert launched(p) == ["q1", "q2"]
    assert reasons(p) == {"q3": "max_concurrent_runs: 3 of 3 in use"}
    assert p.limits[0].to_json() == {
        "limit": "max_concurrent_runs",
        "max": 3,
        "in_use": 3,
        "runs": ["r1", "q1", "q2"],
    }


def test_zero_pauses_and_minus_one_is_unlimited() -> None:
    assert launched(plan([run("q1")], max_concurrent_runs=0)) == []
    assert "paused" in reasons(plan([run("q1")], max_concurrent_runs=0))["q1"]
    many = [run(f"q{i}") for i in range(20)]
    assert len(launched(plan(many, agents=[agent("a1", 100)], max_concurrent_runs=-1))) == 20


def test_default_kind_ignores_limits_but_not_agent_capacity() -> None:
    rule = TagConcurrencyLimit(key="db", limit=0)
    queued = [run(f"q{i}", db="x") for i in range(5)]
    p = plan(
        queued,
        agents=[agent("a1", 3)],
        kind="default",
        max_concurrent_runs=1,
        tag_concurrency_limits=[rule],
    )
    assert launched(p) == ["q0", "q1", "q2"]
    assert "free slot (a1 3/3)" in reasons(p)["q3"]


def test_tag_limit_forms() -> None:
    key_only = TagConcurrencyLimit(key="db", limit=1)
    p = plan([run("q1", db="a"), run("q2", db="b"), run("q3")], tag_concurrency_limits=[key_only])
    assert launched(p) == ["q1", "q3"]  # q2 shares the pool of all runs tagged db
    with_value = TagConcurrencyLimit(key="db", value="redshift", limit=1)
    p = plan(
        [run("q1", db="redshift"), run("q2", db="redshift"), run("q3", db="pg")],
        tag_concurrency_limits=[with_value],
    )
    assert launched(p) == ["q1", "q3"]
    assert reasons(p)["q2"] == "tag limit db=redshift: 1 of 1 in use by q1"
    per_value = TagConcurrencyLimit(key="team", per_unique_value=True, limit=1)
    p = plan(
        [run("q1", team="a"), run("q2", team="a"), run("q3", team="b")],
        [active("r1", team="b")],
        tag_concurrency_limits=[per_value],
    )
    assert launched(p) == ["q1"]
    assert reasons(p) == {
        "q2": "tag limit team=a: 1 of 1 in use by q1",
        "q3": "tag limit team=b: 1 of 1 in use by r1",
    }


def test_every_matching_rule_must_pass_without_head_of_line_blocking() -> None:
    rules = [
        TagConcurrencyLimit(key="db", value="redshift", limit=1),
        TagConcurrencyLimit(key="team", per_unique_value=True, limit=1),
    ]
    queued = [
        run("A", db="redshift", team="a"),
        run("B", db="redshift", team="b"),
        run("C", db="pg", team="a"),
        run("D", db="pg", team="b"),
        run("E"),
    ]
    p = plan(queued, tag_concurrency_limits=rules)
    assert launched(p) == ["A", "D", "E"]
    assert reasons(p)["B"].startswith("tag limit db=redshift")
    assert reasons(p)["C"].startswith("tag limit team=a")


def test_per_job_limit() -> None:
    rule = TagConcurrencyLimit(key="fleetrun/job", per_unique_value=True, limit=1)
    p = plan(
        [run("q1", job="etl"), run("q2", job="etl"), run("q3", job="other")],
        tag_concurrency_limits=[rule],
    )
    assert launched(p) == ["q1", "q3"]
    assert reasons(p)["q2"] == "tag limit fleetrun/job=etl: 1 of 1 in use by q1"


def test_routing_by_queue_location_capacity_and_liveness() -> None:
    agents = [
        agent("cpu", 1),
        agent("gpu", 2, queues=("gpu",)),
        agent("stale", 8, queues=("gpu",), heartbeat=NOW - 31),
    ]
    queued = [
        run("g1", queue="gpu"),
        run("g2", queue="gpu"),
        run("g3", queue="gpu"),
        run("c1"),
        run("c2"),
        run("x", queue="arm"),
        run("l", location="other"),
    ]
    p = plan(queued, agents=agents)
    assert [(r.run_id, a.agent_id) for r, a in p.assignments] == [
        ("g1", "gpu"),
        ("g2", "gpu"),
        ("c1", "cpu"),
    ]
    assert reasons(p) == {
        "g3": "no agent hosting location loc has a free slot (gpu 2/2)",
        "c2": "no agent hosting location loc has a free slot (cpu 1/1)",
        "x": "no online agent serves queue arm",
        "l": "no online agent on queue default hosts location other",
    }


def test_a_wait_names_the_draining_agents_that_would_take_the_run() -> None:
    agents = [
        agent("held", status="DRAINING", operator_drain=True),
        agent("leaving", status="DRAINING"),
        agent("held2", queues=("gpu",), status="DRAINING", operator_drain=True),
        agent("busy", 1, queues=("gpu",)),
        agent("elsewhere", queues=("arm",), status="DRAINING", operator_drain=True),
    ]
    hosted = {a.agent_id: {"loc"} for a in agents}
    queued = [run("d"), run("g1", queue="gpu"), run("g2", queue="gpu"), run("o", location="x")]
    p = plan(queued, agents=agents, hosted=hosted)
    assert launched(p) == ["g1"]
    assert reasons(p) == {
        "d": "no online agent serves queue default; DRAINING: held drained by an operator "
        "(`fleetrun agents undrain held` sends runs again); leaving shutting down",
        "g2": "no agent hosting location loc has a free slot (busy 1/1); DRAINING: held2 "
        "drained by an operator (`fleetrun agents undrain held2` sends runs again)",
        "o": "no online agent serves queue default",
    }


def test_agent_choice_spreads_load() -> None:
    p = plan(
        [run("q1"), run("q2"), run("q3")],
        [active("r1", "a1")],
        agents=[agent("a1", 4), agent("a2", 4)],
    )
    assert [a.agent_id for _, a in p.assignments] == ["a2", "a1", "a2"]


def test_location_with_load_error_is_not_hosted() -> None:
    p = plan([run("q1")], hosted={"a1": set()})
    assert launched(p) == [] and "hosts location loc" in reasons(p)["q1"]


def test_a_delayed_retry_waits_and_does_not_block_the_queue() -> None:
    delayed = run("retry")
    delayed.not_before = NOW + 30
    p = plan([delayed, run("q1")])
    assert launched(p) == ["q1"]
    assert reasons(p)["retry"].startswith("retry delay: starts after ")
    assert p.next_wake == NOW + 30


def test_a_run_needing_a_capability_waits_for_an_agent_that_has_it() -> None:
    rerun = run("rerun")
    rerun.reuse_outputs = {"extract": "parent"}
    old, new = agent("old"), agent("new")
    new.capabilities = ["reuse_outputs"]
    p = plan([rerun, run("plain")], agents=[old], hosted={"old": {"loc"}})
    assert launched(p) == ["plain"]
    assert reasons(p)["rerun"] == (
        "no online agent hosting location loc can do reuse_outputs (upgrade it)"
    )
    p = plan([rerun], agents=[old, new], hosted={"old": {"loc"}, "new": {"loc"}})
    assert [(r.run_id, a.agent_id) for r, a in p.assignments] == [("rerun", "new")]


def test_a_run_with_an_image_goes_only_to_a_docker_agent() -> None:
    process, docker = agent("a1"), agent("a2")
    process.capabilities = ["reuse_outputs", "launcher:forkserver"]
    docker.capabilities = ["reuse_outputs", "launcher:docker"]
    with_image = run("r1")
    with_image.tags["fleetrun/image"] = "etl:1"
    p = plan([with_image], agents=[process])
    assert launched(p) == []
    assert "can do launcher:docker (run_launcher = docker)" in reasons(p)["r1"]
    p = plan([with_image, run("r2")], agents=[process, docker])
    assert dict((r.run_id, a.agent_id) for r, a in p.assignments)["r1"] == "a2"
    assert docker.launcher == "docker" and agent("old").launcher is None


def pinned_run(run_id: str, version: str) -> Run:
    pinned = run(run_id)
    pinned.tags[CODE_VERSION_TAG] = version
    return pinned


def test_a_pinned_code_version_goes_only_to_agents_that_have_it() -> None:
    agents = [agent("a1"), agent("a2")]
    versions = {("a1", "loc"): {"new"}, ("a2", "loc"): {"new", "old"}}
    snapshot = QueueSnapshot(
        queued=[pinned_run("pinned", "old"), run("any")],
        active=[],
        agents=agents,
        hosted={"a1": {"loc"}, "a2": {"loc"}},
        code_versions=versions,
    )
    p = plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, heartbeat_timeout=30)
    assert {r.run_id: a.agent_id for r, a in p.assignments}["pinned"] == "a2"
    snapshot.queued = [pinned_run("gone", "older")]
    p = plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, heartbeat_timeout=30)
    assert "has its code version older" in reasons(p)["gone"]


def test_a_reexecution_prefers_an_agent_with_its_parents_version() -> None:
    reexecution = run("again")
    reexecution.wanted_code_version = "old"
    snapshot = QueueSnapshot(
        queued=[reexecution],
        active=[],
        agents=[agent("a1"), agent("a2", slots=2)],
        hosted={"a1": {"loc"}, "a2": {"loc"}},
        code_versions={("a1", "loc"): {"new"}, ("a2", "loc"): {"old", "new"}},
    )
    p = plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, heartbeat_timeout=30)
    assert [a.agent_id for _, a in p.assignments] == ["a2"]  # not a1, though freer
    snapshot.code_versions = {}
    p = plan_dispatch(snapshot, RunCoordinatorConfig(), NOW, heartbeat_timeout=30)
    assert [a.agent_id for _, a in p.assignments] == ["a1"]  # nobody has it: anyone
