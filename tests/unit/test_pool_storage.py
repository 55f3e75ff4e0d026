"""Pool slots in storage, on both backends: claims, grants in order, and every way an
attempt ends freeing its slots in the transaction that ends it."""

from __future__ import annotations

import pytest

from control_plane.config import ConcurrencyConfig, PoolConfig
from control_plane.model.pools import Claim, GrantPlan, plan_grants
from control_plane.model.runs import Placement, QueueSnapshot, Verdict
from control_plane.model.statuses import RunStatus
from control_plane.storage import Storage
from control_plane.storage.errors import StaleLease
from protocol.events import AGENT_LOST
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord
from tests.unit.test_storage import new_run

JOB = JobInfo(
    name="etl",
    ops=[OpInfo(name="load", pool="warehouse"), OpInfo(name="other", pool="warehouse")],
)
ONE_SLOT = ConcurrencyConfig(pools=[PoolConfig("warehouse", 1)])


def record(seq: int, type_: str, step: str | None = None, **data: object) -> RunRecord:
    return RunRecord(seq=seq, time=100.0 + seq, kind="event", type=type_, step=step, data=data)


def claim(seq: int, step: str = "load", attempt: int = 0, pool: str = "warehouse") -> RunRecord:
    return record(seq, "STEP_SLOT_REQUESTED", step, pool=pool, attempt=attempt)


def decide(config: ConcurrencyConfig = ONE_SLOT):
    def plan(claims: list[Claim], set_limits: dict[str, int]) -> GrantPlan:
        return plan_grants(claims, config.limits(set_limits))

    return plan


async def started_run(
    storage: Storage, run_id: str, agent: str, now: float, priority: int = 0
) -> int:
    """A run STARTED on `agent`; its lease."""
    await storage.create_run(new_run(run_id, priority=priority), now)
    (run,) = await storage.assign_queued(now, lambda _s: [(run_id, agent)])
    assert run.lease is not None
    await storage.append_records(run_id, run.lease, [record(1, "RUN_START")], now)
    return run.lease


async def register(storage: Storage, name: str = "w1") -> str:
    location = CodeLocationInfo(name="loc", jobs=[JOB])
    agent = await storage.register_agent(name, "h", "0.1", ["default"], 4, [location], now=1.0)
    return agent.agent_id


async def rows_left(storage: Storage) -> int:
    """Rows in pool_slots, live or not: a freed slot is deleted, not merely unseen."""
    rows = await storage._reader.fetch("SELECT COUNT(*) FROM pool_slots")  # type: ignore[attr-defined]
    return int(rows[0][0])


def held(claims: list[Claim]) -> list[tuple[str, str]]:
    return sorted((c.run_id, c.step) for c in claims if c.granted)


async def test_a_claim_waits_for_the_grant_pass_and_is_owed_to_its_agent(
    storage: Storage,
) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    result = await storage.append_records("r1", lease, [claim(2)], 3.0)
    assert result.pools_changed
    (waiting,) = await storage.pool_claims()
    assert (waiting.pool, waiting.step, waiting.granted, waiting.agent_id) == (
        "warehouse",
        "load",
        False,
        agent,
    )
    assert await storage.owed_grants(agent, []) == []
    (granted,) = await storage.grant_slots(4.0, decide())
    (owed,) = await storage.owed_grants(agent, [])
    assert (owed.claim_id, owed.step, owed.attempt, owed.lease) == (
        granted.claim_id,
        "load",
        0,
        lease,
    )
    assert await storage.owed_grants(agent, [owed.claim_id]) == []
    # a claim sent again (a resent batch, a worker asking twice) is the same claim
    await storage.append_records("r1", lease, [claim(3)], 5.0)
    assert len(await storage.pool_claims()) == 1


async def test_grants_go_by_priority_then_first_come_and_waiting_is_told_once(
    storage: Storage,
) -> None:
    agent = await register(storage)
    leases = {}
    for run_id, priority in (("r1", 0), ("r2", 0), ("r3", 5)):
        leases[run_id] = await started_run(storage, run_id, agent, 2.0, priority)
    for run_id in ("r1", "r2", "r3"):  # r3 asks last but has the highest priority
        await storage.append_records(run_id, leases[run_id], [claim(2)], 3.0)
    granted = await storage.grant_slots(4.0, decide())
    assert [c.run_id for c in granted] == ["r3"]
    assert await storage.grant_slots(4.5, decide()) == []  # nothing changed: nothing new
    for run_id, line in (("r1", "1 of 2 in line"), ("r2", "2 of 2 in line")):
        waits = await storage.get_events(run_id, 0, 100, ("STEP_SLOT_WAITING",))
        assert len(waits) == 1 and line in waits[0].message, waits
        assert waits[0].data == {"pool": "warehouse"} and waits[0].step == "load"
    assert await storage.get_events("r3", 0, 100, ("STEP_SLOT_WAITING",)) == []
    # r3's step ends: its slot goes to r1, which waited, and r1's log says so
    await storage.append_records("r3", leases["r3"], [record(3, "STEP_SUCCESS", "load")], 6.0)
    assert [c.run_id for c in await storage.grant_slots(7.0, decide())] == ["r1"]
    (got,) = await storage.get_events("r1", 0, 100, ("STEP_SLOT_GRANTED",))
    assert "after waiting 4.0 s" in got.message and got.data["waited_seconds"] == 4.0


async def test_a_retry_claims_again_and_each_attempt_end_releases(storage: Storage) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    await storage.append_records("r1", lease, [claim(2)], 3.0)
    await storage.grant_slots(4.0, decide())
    up = record(3, "STEP_UP_FOR_RETRY", "load")
    await storage.append_records("r1", lease, [up, claim(4, attempt=1)], 5.0)
    (again,) = await storage.pool_claims()
    assert (again.attempt, again.granted) == (1, False)
    (granted,) = await storage.grant_slots(6.0, decide())
    assert granted.attempt == 1
    await storage.append_records("r1", lease, [record(5, "STEP_FAILURE", "load")], 7.0)
    assert await storage.pool_claims() == [] and await rows_left(storage) == 0


async def test_the_run_ending_frees_every_slot_it_held_or_waited_for(storage: Storage) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    await storage.append_records("r1", lease, [claim(2), claim(3, "other")], 3.0)
    await storage.grant_slots(4.0, decide())  # load holds the slot, other waits
    assert held(await storage.pool_claims()) == [("r1", "load")]
    await storage.append_records("r1", lease, [record(4, "RUN_FAILURE")], 5.0)
    assert await storage.pool_claims() == [] and await rows_left(storage) == 0


async def test_cancel_drops_waiting_claims_at_once_and_held_ones_at_the_end(
    storage: Storage,
) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    await storage.append_records("r1", lease, [claim(2), claim(3, "other")], 3.0)
    await storage.grant_slots(4.0, decide())
    canceling = await storage.request_cancel("r1", 5.0)
    assert canceling is not None and canceling.status == RunStatus.CANCELING
    assert held(await storage.pool_claims()) == [("r1", "load")]
    assert len(await storage.pool_claims()) == 1  # other's place in line is gone
    # a canceled run's step asks for nothing more
    await storage.append_records("r1", lease, [claim(4, "other", attempt=1)], 6.0)
    assert len(await storage.pool_claims()) == 1
    assert await rows_left(storage) == 1
    await storage.append_records("r1", lease, [record(5, "RUN_CANCELED")], 7.0)
    assert await storage.pool_claims() == [] and await rows_left(storage) == 0


async def test_a_dead_agent_verdict_frees_its_slots_and_fences_late_claims(
    storage: Storage,
) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    other = await started_run(storage, "r2", agent, 2.0)
    await storage.append_records("r1", lease, [claim(2)], 3.0)
    await storage.append_records("r2", other, [claim(2)], 3.0)
    await storage.grant_slots(4.0, decide())
    verdict = Verdict("r1", lease, RunStatus.STARTED, RunStatus.FAILURE, AGENT_LOST, "lost", agent)
    changed = await storage.apply_verdicts([verdict], 5.0, 0)
    assert [r.status for r in changed] == [RunStatus.FAILURE]
    assert [c.run_id for c in await storage.pool_claims()] == ["r2"]
    assert await rows_left(storage) == 1
    assert [c.run_id for c in await storage.grant_slots(6.0, decide())] == ["r2"]
    with pytest.raises(StaleLease):
        await storage.append_records("r1", lease, [claim(3, "other")], 7.0)
    assert [c.run_id for c in await storage.pool_claims()] == ["r2"]


async def test_a_resumed_run_frees_its_old_attempts_slots(storage: Storage) -> None:
    """A lost worker resumed in place goes back to the queue: its next attempt claims
    again under its new lease; nothing of the old one stays held."""
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    await storage.append_records("r1", lease, [claim(2)], 3.0)
    await storage.grant_slots(4.0, decide())
    verdict = Verdict("r1", lease, RunStatus.STARTED, RunStatus.FAILURE, AGENT_LOST, "lost")
    (resumed,) = await storage.apply_verdicts([verdict], 5.0, 1)
    assert resumed.status == RunStatus.QUEUED
    assert await storage.pool_claims() == [] and await rows_left(storage) == 0


async def test_a_claim_naming_no_valid_pool_is_refused(storage: Storage) -> None:
    agent = await register(storage)
    lease = await started_run(storage, "r1", agent, 2.0)
    result = await storage.append_records("r1", lease, [claim(2, pool="no such/pool")], 3.0)
    assert result.refused is not None and "pool" in result.refused
    assert result.status == RunStatus.FAILURE
    assert await storage.pool_claims() == []


async def test_limits_set_through_the_api_win_over_the_config(storage: Storage) -> None:
    agent = await register(storage)
    leases = [await started_run(storage, f"r{i}", agent, 2.0) for i in range(3)]
    for i, lease in enumerate(leases):
        await storage.append_records(f"r{i}", lease, [claim(2)], 3.0)
    await storage.set_pool_limit("warehouse", 0, 4.0)
    assert await storage.pool_limits() == {"warehouse": 0}
    assert await storage.grant_slots(5.0, decide()) == []  # paused
    await storage.set_pool_limit("warehouse", 2, 6.0)
    assert len(await storage.grant_slots(7.0, decide())) == 2
    assert await storage.delete_pool_limit("warehouse")
    assert not await storage.delete_pool_limit("warehouse")
    assert await storage.grant_slots(8.0, decide()) == []  # the config's 1: still full


async def test_run_granularity_holds_a_slot_per_pool_from_launch_to_end(
    storage: Storage,
) -> None:
    agent = await register(storage)
    await storage.create_run(new_run("r1"), 2.0)
    snapshots = []

    def place(snapshot: QueueSnapshot) -> list[Placement]:
        snapshots.append(snapshot)
        return [("r1", agent, ("warehouse",))]

    (run,) = await storage.assign_queued(3.0, place)
    assert snapshots[0].job_pools == {("loc", "etl"): frozenset({"warehouse"})}
    (slot,) = await storage.pool_claims()
    assert (slot.run_id, slot.step, slot.granted) == ("r1", "", True)
    assert await storage.owed_grants(agent, []) == []  # a run's own slot is not a step's
    assert run.lease is not None
    await storage.append_records("r1", run.lease, [record(1, "RUN_START")], 4.0)
    await storage.append_records("r1", run.lease, [record(2, "RUN_SUCCESS")], 5.0)
    assert await storage.pool_claims() == [] and await rows_left(storage) == 0
