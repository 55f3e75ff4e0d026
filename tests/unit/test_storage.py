"""The storage contract. Every backend runs this same suite (the `storage` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from control_plane.model.runs import NewRun, QueueSnapshot, ResumeRules, Run, RunFilter
from control_plane.model.statuses import RunStatus
from control_plane.storage import Storage
from control_plane.storage.errors import NotYourRun, RecordRefused, StaleLease, UnknownRun
from control_plane.storage.sql.transitions import transition
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord

ETL = JobInfo(name="etl", ops=[OpInfo(name="a"), OpInfo(name="extract", upstream=["a"])])


def new_run(run_id: str, job: str = "etl", tags: dict | None = None, priority: int = 0) -> NewRun:
    return NewRun(
        run_id=run_id,
        job=job,
        location="loc",
        tags=tags or {},
        config={"k": 1},
        priority=priority,
    )


def event(seq: int, type_: str, step: str | None = None, message: str = "") -> RunRecord:
    return RunRecord(
        seq=seq, time=100.0 + seq, kind="event", type=type_, step=step, message=message
    )


async def assign(storage: Storage, run_id: str, agent: str, now: float) -> Run | None:
    assigned = await storage.assign_queued(now, lambda snapshot: [(run_id, agent)])
    return next((r for r in assigned if isinstance(r, Run)), None)


async def assign_lease(storage: Storage, run_id: str, agent: str, now: float) -> int:
    """Assign a queued run; returns its new lease."""
    run = await assign(storage, run_id, agent, now)
    assert run is not None and run.lease is not None
    return run.lease


async def agent_id(storage: Storage, name: str = "w1") -> str:
    agent = await storage.register_agent(
        name,
        "host",
        "0.1",
        ["default"],
        4,
        [CodeLocationInfo(name="loc", jobs=[ETL])],
        now=10.0,
    )
    return agent.agent_id


async def test_create_run_is_queued_with_an_event(storage: Storage) -> None:
    run = await storage.create_run(new_run("r1", tags={"team": "a"}), now=5.0)
    assert run.status == RunStatus.QUEUED
    assert (run.tags, run.config, run.create_time) == ({"team": "a"}, {"k": 1}, 5.0)
    events = await storage.get_events("r1", 0, 100)
    assert [(e.seq, e.type) for e in events] == [(1, "RUN_ENQUEUED")]
    assert await storage.get_events("r1", 0, 100, ("STEP_FAILURE", "RUN_FAILURE")) == []
    assert len(await storage.get_events("r1", 0, 100, ("STEP_FAILURE", "RUN_ENQUEUED"))) == 1
    assert await storage.get_run("missing") is None


async def test_list_runs_filters_and_pages_newest_first(storage: Storage) -> None:
    for i in range(5):
        await storage.create_run(
            new_run(f"r{i}", job="a" if i % 2 else "b", tags={"n": str(i)}), now=i
        )
    runs, cursor = await storage.list_runs(RunFilter(), 2, None)
    assert [r.run_id for r in runs] == ["r4", "r3"]
    runs, cursor = await storage.list_runs(RunFilter(), 2, cursor)
    assert [r.run_id for r in runs] == ["r2", "r1"]
    runs, cursor = await storage.list_runs(RunFilter(), 2, cursor)
    assert [r.run_id for r in runs] == ["r0"] and cursor is None
    runs, _ = await storage.list_runs(RunFilter(job="a"), 10, None)
    assert [r.run_id for r in runs] == ["r3", "r1"]
    runs, _ = await storage.list_runs(RunFilter(tags=[("n", "2")]), 10, None)
    assert [r.run_id for r in runs] == ["r2"]
    runs, _ = await storage.list_runs(RunFilter(statuses=[RunStatus.SUCCESS]), 10, None)
    assert runs == []


async def all_pages(storage: Storage, filt: RunFilter, limit: int) -> list[str]:
    """Every run the filter finds, page after page through the cursor."""
    found: list[str] = []
    cursor = None
    while True:
        runs, cursor = await storage.list_runs(filt, limit, cursor)
        found += [r.run_id for r in runs]
        if cursor is None:
            return found


async def test_status_filtered_pages_are_the_newest_first_order_filtered(
    storage: Storage,
) -> None:
    """The status filter reads runs_by_status_id (migration 12): the same pages as
    filtering the unfiltered list, for one status and for several."""
    for i in range(9):
        await storage.create_run(new_run(f"r{i}"), now=i)
        if i % 3 == 0:
            await storage.request_cancel(f"r{i}", now=i)
    newest_first = await all_pages(storage, RunFilter(), 4)
    runs = [await storage.get_run(r) for r in newest_first]
    status = {r.run_id: r.status for r in runs if r is not None}
    for statuses in ([RunStatus.CANCELED], [RunStatus.CANCELED, RunStatus.NOT_STARTED]):
        expected = [r for r in newest_first if status[r] in statuses]
        for limit in (1, 2, 100):
            assert await all_pages(storage, RunFilter(statuses=statuses), limit) == expected
    assert await all_pages(storage, RunFilter(statuses=[RunStatus.CANCELED]), 2) == [
        "r6",
        "r3",
        "r0",
    ]


async def test_tag_filtered_pages_are_the_newest_first_order_filtered(
    storage: Storage,
) -> None:
    """A tag filter reads runs in run order from run_tags_by_key_value_run (migration 15):
    the same pages as filtering the unfiltered list, alone, with a status, with a second
    tag, and for a tag set after submission (a priority)."""
    for i in range(12):
        tags = {"team": f"t{i % 3}", "half": str(i % 2)}
        await storage.create_run(new_run(f"r{i:02d}", tags=tags), now=i)
        if i % 4 == 0:
            await storage.request_cancel(f"r{i:02d}", now=i)
    await storage.set_priority("r07", 4, now=20)
    newest_first = await all_pages(storage, RunFilter(), 5)
    runs = {r: await storage.get_run(r) for r in newest_first}

    def where(test: Callable[[Run], bool]) -> list[str]:
        return [r for r in newest_first if test(runs[r])]  # type: ignore[arg-type]

    cases = [
        (RunFilter(tags=[("team", "t1")]), where(lambda r: r.tags["team"] == "t1")),
        (
            RunFilter(tags=[("team", "t0")], statuses=[RunStatus.CANCELED]),
            where(lambda r: r.tags["team"] == "t0" and r.status == RunStatus.CANCELED),
        ),
        (
            RunFilter(tags=[("team", "t2"), ("half", "1")]),
            where(lambda r: r.tags["team"] == "t2" and r.tags["half"] == "1"),
        ),
        (RunFilter(tags=[("fleetrun/priority", "4")]), ["r07"]),
        (RunFilter(tags=[("team", "nobody")]), []),
    ]
    for filt, expected in cases:
        assert expected or filt.tags == [("team", "nobody")]  # the cases are not vacuous
        for limit in (1, 2, 100):
            assert await all_pages(storage, filt, limit) == expected, (filt, limit)


async def test_a_family_is_listed_by_its_root(storage: Storage) -> None:
    await storage.create_run(new_run("root"), now=1)
    for n, parent in enumerate(["root", "child-0", "root"]):
        run = dataclasses.replace(new_run(f"child-{n}"), parent_run_id=parent, root_run_id="root")
        await storage.create_run(run, now=2 + n)
    await storage.create_run(new_run("stranger"), now=9)
    runs, _ = await storage.list_runs(RunFilter(root_run_id="root"), 10, None)
    assert [r.run_id for r in runs] == ["child-2", "child-1", "child-0"]


@pytest.mark.parametrize(
    "filt",
    [
        RunFilter(tags=[("a", "b")]),
        RunFilter(tags=[("a", "b")], statuses=[RunStatus.FAILURE]),
        RunFilter(tags=[("a", "b"), ("c", "d")], job="etl"),
    ],
)
async def test_sqlite_pages_a_tag_filter_from_the_tag_index(
    tmp_path: Path, filt: RunFilter
) -> None:
    """The plan SQLite picks for a tag filter walks the tags' index in run order: no
    scan of the runs and no sort, however many runs there are."""
    import sqlite3

    from control_plane.storage.sql.runs import runs_page_query
    from control_plane.storage.sqlite import SqliteStorage

    path = tmp_path / "plan.db"
    store = SqliteStorage(str(path))
    await store.open()
    await store.close()
    for cursor in (None, 9):
        sql, args = runs_page_query(filt, 50, cursor)
        with sqlite3.connect(path) as db:
            plan = db.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
        details = " | ".join(row[-1] for row in plan)
        assert "run_tags_by_key_value_run" in details, details
        assert "TEMP B-TREE" not in details and "SCAN runs" not in details, details


async def test_a_run_id_prefix_finds_the_runs_it_starts(storage: Storage) -> None:
    for run_id in ("abcd1234-0001", "abcd1234-0002", "abce0000-0001", "abc-0000", "abcd"):
        await storage.create_run(new_run(run_id), now=1.0)
    assert await storage.run_ids_with_prefix("abcd1234-0001", 5) == ["abcd1234-0001"]
    assert await storage.run_ids_with_prefix("abcd1234", 5) == ["abcd1234-0001", "abcd1234-0002"]
    assert await storage.run_ids_with_prefix("abcd", 5) == [
        "abcd",
        "abcd1234-0001",
        "abcd1234-0002",
    ]
    assert await storage.run_ids_with_prefix("abcd", 2) == ["abcd", "abcd1234-0001"]
    assert await storage.run_ids_with_prefix("abce", 5) == ["abce0000-0001"]
    assert await storage.run_ids_with_prefix("abc-", 5) == ["abc-0000"]
    assert await storage.run_ids_with_prefix("abcf", 5) == []
    assert await storage.run_ids_with_prefix("ABCD", 5) == []


async def test_queued_runs_by_priority_then_submission(storage: Storage) -> None:
    for run_id, prio in [("a", 0), ("b", 5), ("c", -1), ("d", 5)]:
        await storage.create_run(new_run(run_id, priority=prio), now=1)
    snapshot = await storage.queue_snapshot()
    assert [r.run_id for r in snapshot.queued] == ["b", "d", "a", "c"]
    await storage.set_priority("c", 9, now=2)
    snapshot = await storage.queue_snapshot()
    assert [r.run_id for r in snapshot.queued] == ["c", "b", "d", "a"]
    assert snapshot.queued[0].tags["fleetrun/priority"] == "9"
    runs, _ = await storage.list_runs(RunFilter(tags=[("fleetrun/priority", "9")]), 10, None)
    assert [r.run_id for r in runs] == ["c"]


async def test_assign_gives_growing_leases_once(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    await storage.create_run(new_run("r2"), now=1)
    first = await assign(storage, "r1", aid, now=2)
    second = await assign(storage, "r2", aid, now=2)
    assert first is not None and second is not None
    assert first.status == RunStatus.STARTING and first.agent_id == aid
    assert first.lease is not None and second.lease is not None
    assert second.lease > first.lease
    assert await assign(storage, "r1", aid, now=3) is None  # no longer QUEUED
    assert [r.run_id for r in await storage.pending_launches(aid)] == ["r1", "r2"]
    assert {r.run_id for r in await storage.active_runs()} == {"r1", "r2"}


async def test_append_records_in_order_once(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    log = RunRecord(seq=3, time=104.0, kind="log", type="stdout", step="a", message="out\n")
    batch = [event(1, "RUN_START"), event(2, "STEP_START", "a"), log]
    result = await storage.append_records("r1", lease, batch, now=3)
    assert result.acked_seq == 3 and result.status == RunStatus.STARTED
    again = await storage.append_records("r1", lease, batch, now=4)  # a resent batch
    assert again.acked_seq == 3 and not again.status_changed
    gap = await storage.append_records("r1", lease, [event(9, "LOG")], now=4)
    assert gap.acked_seq == 3  # records after a gap are not stored
    await storage.append_records("r1", lease, [event(4, "RUN_SUCCESS", message="ok")], now=5)
    types = [e.type for e in await storage.get_events("r1", 0, 100)]
    assert types == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "STEP_START", "RUN_SUCCESS"]
    assert [e.seq for e in await storage.get_events("r1", 3, 100)] == [4, 5]
    final = await storage.get_run("r1")
    assert final is not None and final.status == RunStatus.SUCCESS
    assert final.status_reason == "ok" and final.start_time == 3 and final.end_time == 5
    assert [e.time for e in await storage.get_events("r1", 2, 100)][:2] == [101.0, 102.0]
    chunks = await storage.get_logs("r1", "a", 0)
    assert [(c.stream, c.text) for c in chunks] == [("stdout", "out\n")]
    assert await storage.get_logs("r1", "other", 0) == []


async def test_terminal_status_never_changes(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    await storage.append_records(
        "r1", lease, [event(1, "RUN_START"), event(2, "RUN_FAILURE")], now=3
    )
    result = await storage.append_records("r1", lease, [event(3, "RUN_SUCCESS")], now=4)
    assert result.status == RunStatus.FAILURE and not result.status_changed
    assert (await storage.get_run("r1")).status == RunStatus.FAILURE  # type: ignore[union-attr]


async def test_stale_lease_and_unknown_run_are_refused(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    with pytest.raises(StaleLease):
        await storage.append_records("r1", lease + 1, [event(1, "RUN_START")], now=3)
    with pytest.raises(UnknownRun):
        await storage.append_records("nope", lease, [event(1, "RUN_START")], now=3)


async def test_records_from_an_agent_the_run_is_not_leased_to_are_refused(
    storage: Storage,
) -> None:
    aid, other = await agent_id(storage), await agent_id(storage, "w2")
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    with pytest.raises(NotYourRun):
        await storage.append_records("r1", lease, [event(1, "RUN_START")], now=3, agent_id=other)
    events = await storage.get_events("r1", 0, 100)
    assert [e.type for e in events] == ["RUN_ENQUEUED", "RUN_STARTING"]  # nothing stored
    first = await storage.append_records("r1", lease, [event(1, "RUN_START")], now=3, agent_id=aid)
    assert first.acked_seq == 1 and not first.launch_acked  # no poll has said it holds it
    await storage.ack_launches(aid, [lease])
    later = await storage.append_records("r1", lease, [event(2, "LOG")], now=4, agent_id=aid)
    assert later.launch_acked


async def test_agents_keep_their_id_by_name(storage: Storage) -> None:
    first = await agent_id(storage)
    assert await agent_id(storage) == first
    other = await agent_id(storage, "w2")
    assert other != first
    assert [a.name for a in await storage.list_agents()] == ["w1", "w2"]
    assert await storage.record_heartbeats([first, "nobody"], now=50.0) == {first: 10.0}
    assert (await storage.get_agent(first)).last_heartbeat == 50.0  # type: ignore[union-attr]
    assert (await storage.get_agent(other)).last_heartbeat == 10.0  # type: ignore[union-attr]
    locations = await storage.list_code_locations()
    assert {(loc.agent_id, loc.info.name) for loc in locations} == {(first, "loc"), (other, "loc")}
    assert locations[0].info.jobs[0].name == "etl"


async def test_an_operators_drain_outlives_registrations_until_undrained(storage: Storage) -> None:
    drained = await agent_id(storage, "w1")
    own = await agent_id(storage, "w2")
    agent = await storage.set_operator_drain(drained, True)
    assert agent is not None and (agent.status, agent.operator_drain) == ("DRAINING", True)
    await storage.set_agent_status(own, "DRAINING")  # the agent's own drain at shutdown
    assert (await agent_id(storage, "w1"), await agent_id(storage, "w2")) == (drained, own)
    agents = {a.name: a for a in await storage.list_agents()}
    assert (agents["w1"].status, agents["w2"].status) == ("DRAINING", "ONLINE")
    for offline in (drained, own):
        await storage.set_agent_status(offline, "OFFLINE")
    await storage.record_heartbeats([drained, own], now=20.0)
    agents = {a.name: a for a in await storage.list_agents()}
    assert (agents["w1"].status, agents["w2"].status) == ("DRAINING", "ONLINE")
    agent = await storage.set_operator_drain(drained, False)
    assert agent is not None and (agent.status, agent.operator_drain) == ("ONLINE", False)
    await agent_id(storage, "w1")
    assert (await storage.get_agent(drained)).status == "ONLINE"  # type: ignore[union-attr]
    assert await storage.set_operator_drain("nobody", True) is None


async def test_the_code_catalog_follows_registrations_made_by_another_process(
    storage: Storage, storage_url: str
) -> None:
    from control_plane.storage import open_storage

    first = await agent_id(storage)
    catalog = await storage.code_catalog()
    assert catalog.hosted == {first: {"loc"}} and catalog.jobs == {"loc": {"etl"}}
    assert await storage.code_catalog() is catalog  # unchanged: not parsed again
    other = open_storage(storage_url)  # another replica (or process) on the same database
    await other.open()
    try:
        await other.register_agent(
            "w1",
            "host",
            "0.1",
            ["default"],
            4,
            [
                CodeLocationInfo(name="loc", jobs=[JobInfo(name="etl"), JobInfo(name="new")]),
                CodeLocationInfo(name="broken", error="ImportError"),
            ],
            now=11.0,
        )
    finally:
        await other.close()
    catalog = await storage.code_catalog()
    assert catalog.jobs == {"loc": {"etl", "new"}, "broken": set()}
    assert catalog.hosted == {first: {"loc"}}  # a location that failed to load hosts nothing
    assert [loc.info.name for loc in catalog.by_name["broken"]] == ["broken"]


async def test_dispatch_reads_only_the_agents_that_host_a_queued_location(
    storage: Storage,
) -> None:
    hosting = await agent_id(storage)
    for i in range(3):  # a fleet serving something else
        await storage.register_agent(
            f"other{i}", "h", "0.1", ["default"], 1, [CodeLocationInfo(name="elsewhere")], now=10.0
        )
    await storage.create_run(new_run("r1"), now=11)
    seen: list[list[str]] = []

    def decide(snapshot: QueueSnapshot) -> list[tuple[str, str]]:
        seen.append([a.agent_id for a in snapshot.agents])
        return [("r1", hosting)]

    assigned = await storage.assign_queued(12, decide)
    assert seen == [[hosting]] and [r.run_id for r in assigned] == ["r1"]
    explained = await storage.queue_snapshot()  # explaining a wait looks at every agent
    assert len(explained.agents) == 4


async def test_schema_is_versioned_and_reopens(tmp_path: Path) -> None:
    from control_plane.storage.sqlite import MIGRATIONS, SqliteStorage

    store = SqliteStorage(str(tmp_path / "x.db"))
    await store.open()
    await store.create_run(new_run("r1"), now=1)
    assert await store.schema_version() == len(MIGRATIONS) >= 1
    await store.close()
    store = SqliteStorage(str(tmp_path / "x.db"))
    await store.open()
    assert (await store.get_run("r1")) is not None
    await store.close()


async def test_assign_queued_decides_on_one_snapshot(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    await storage.create_run(new_run("r2"), now=1)
    seen: list[tuple[list[str], dict[str, set[str]]]] = []

    def decide(snapshot: QueueSnapshot) -> list[tuple[str, str]]:
        seen.append(([r.run_id for r in snapshot.queued], snapshot.hosted))
        return [("r2", aid), ("missing", aid)]

    assigned = await storage.assign_queued(2, decide)
    assert [r.run_id for r in assigned] == ["r2"]
    assert seen == [(["r1", "r2"], {aid: {"loc"}})]
    snapshot = await storage.queue_snapshot()
    assert [r.run_id for r in snapshot.active] == ["r2"]
    assert [a.agent_id for a in snapshot.agents] == [aid]


async def started(storage: Storage, run_id: str, aid: str, now: float = 2) -> int:
    """Create, assign and start a run; returns its lease."""
    await storage.create_run(new_run(run_id), now=1)
    lease = await assign_lease(storage, run_id, aid, now=now)
    await storage.append_records(run_id, lease, [event(1, "RUN_START")], now=now)
    return lease


async def test_cancel_queued_and_started_runs(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("queued"), now=1)
    queued = await storage.request_cancel("queued", now=3)
    assert queued is not None and queued.status == RunStatus.CANCELED
    assert queued.end_time == 3 and queued.status_reason == "canceled while queued"
    lease = await started(storage, "running", aid)
    await storage.create_run(new_run("launching"), now=1)
    launching = await assign_lease(storage, "launching", aid, now=2)
    for run_id in ("running", "launching"):
        run = await storage.request_cancel(run_id, now=4)
        assert run is not None and run.status == RunStatus.CANCELING
    # The agent holds the started run's lease but never got the other launch:
    orders, canceled = await storage.stop_orders(aid, [lease], now=5)
    assert [(o.run_id, o.lease, o.cancel) for o in orders] == [("running", lease, True)]
    assert [r.run_id for r in canceled] == ["launching"]
    never = await storage.get_run("launching")
    assert never is not None and never.status == RunStatus.CANCELED and never.lease is None
    assert never.status_reason == "canceled before its worker started"
    orders, canceled = await storage.stop_orders(aid, [lease], now=5)
    assert launching not in [o.lease for o in orders] and canceled == []
    # The worker confirms; the run is CANCELED and no stop is owed any more.
    await storage.append_records("running", lease, [event(2, "RUN_CANCELED")], now=6)
    assert (await storage.get_run("running")).status == RunStatus.CANCELED  # type: ignore[union-attr]
    assert await storage.stop_orders(aid, [lease], now=7) == ([], [])
    assert await storage.request_cancel("nope", now=3) is None


@pytest.mark.parametrize(
    "type_",
    [
        "RUN_ENQUEUED",
        "RUN_STARTING",
        "RUN_CANCELING",
        "RUN_CANCELED",
        "RUN_RETRY",
        "RUN_WORKER_RESTARTED",
        "BOGUS_TYPE",
        "RUN_START",
    ],
)
async def test_a_record_an_agent_may_not_send_fails_the_run_and_ends_its_lease(
    storage: Storage, type_: str
) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    batch = [event(2, "STEP_START", "a"), event(3, type_), event(4, "STEP_SUCCESS", "a")]
    result = await storage.append_records("r1", lease, batch, now=3)
    assert result.refused is not None and "record 3" in result.refused
    assert result.acked_seq == 2 and result.status == RunStatus.FAILURE
    run = await storage.get_run("r1")
    assert run is not None and run.failure_kind == "refused_record" and run.lease is None
    assert "refuses" in (run.status_reason or "")
    types = [e.type for e in await storage.get_events("r1", 0, 100)]
    assert types == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "STEP_START", "RUN_FAILURE"]
    with pytest.raises(StaleLease):  # the lease ended with the run
        await storage.append_records("r1", lease, [event(4, "LOG")], now=4)


@pytest.mark.parametrize(
    "record",
    [
        event(2, "STEP_START", "../../../../tmp/x"),
        event(2, "STEP_START", "not_in_the_job"),
        event(2, "STEP_SUCCESS"),
        RunRecord(seq=2, time=1.0, kind="log", type="stdin"),
        RunRecord(seq=2, time=1.0, kind="blob", type="LOG"),
    ],
)
async def test_steps_must_belong_to_the_runs_job(storage: Storage, record: RunRecord) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    result = await storage.append_records("r1", lease, [record], now=3)
    assert result.refused is not None and result.status == RunStatus.FAILURE
    assert all(e.step is None for e in await storage.get_events("r1", 0, 100))


async def test_log_text_under_a_step_the_job_lacks_is_kept_without_the_step(
    storage: Storage,
) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    forged = RunRecord(seq=2, time=1.0, kind="log", type="stdout", step="nope", message="hi\n")
    result = await storage.append_records("r1", lease, [forged], now=3)
    assert result.refused is None and result.acked_seq == 2
    assert [(c.step, c.text) for c in await storage.get_logs("r1", None, 0)] == [(None, "hi\n")]


async def test_nothing_but_trailing_logs_after_the_run_ended(storage: Storage) -> None:
    from control_plane.model.records import TRAILING_LOG_SECONDS

    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    tail = RunRecord(seq=3, time=1.0, kind="log", type="stderr", step="a", message="late\n")
    batch = [event(2, "RUN_SUCCESS"), tail]
    result = await storage.append_records("r1", lease, batch, now=10)
    assert result.refused is None and result.acked_seq == 3
    for late in (event(4, "RUN_FAILURE"), event(4, "RUN_SUCCESS"), event(4, "STEP_FAILURE", "a")):
        result = await storage.append_records("r1", lease, [late], now=11)
        assert result.refused is not None and "ended" in result.refused
        assert result.acked_seq == 3 and not result.status_changed
    with pytest.raises(RecordRefused):
        await storage.put_output("r1", lease, "a", b"after the end", now=12)
    tail = dataclasses.replace(tail, seq=4)
    too_late = await storage.append_records("r1", lease, [tail], now=11 + TRAILING_LOG_SECONDS)
    assert too_late.refused is not None
    run = await storage.get_run("r1")
    assert run is not None and run.status == RunStatus.SUCCESS and run.lease == lease
    types = [e.type for e in await storage.get_events("r1", 0, 100)]
    assert types == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "RUN_SUCCESS"]
    assert [c.text for c in await storage.get_logs("r1", None, 0)] == ["late\n"]


async def test_a_worker_starting_after_its_cancel_is_not_a_start(storage: Storage) -> None:
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    await storage.request_cancel("r1", now=3)
    batch = [event(1, "RUN_START"), event(2, "STEP_START", "a"), event(3, "RUN_CANCELED")]
    result = await storage.append_records("r1", lease, batch, now=4)
    assert result.refused is None and result.status == RunStatus.CANCELED
    types = [e.type for e in await storage.get_events("r1", 0, 100)]
    assert types == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_CANCELING", "STEP_START", "RUN_CANCELED"]


async def test_verdict_fails_the_run_fences_its_lease_and_loses_to_an_earlier_report(
    storage: Storage,
) -> None:
    from control_plane.model.runs import Verdict

    aid = await agent_id(storage)
    lost = await started(storage, "lost", aid)
    done = await started(storage, "done", aid)
    await storage.append_records("done", done, [event(2, "RUN_SUCCESS")], now=3)
    verdicts = [
        Verdict(
            "lost", lost, RunStatus.STARTED, RunStatus.FAILURE, "agent_lost", "agent lost", aid
        ),
        Verdict(
            "done", done, RunStatus.STARTED, RunStatus.FAILURE, "agent_lost", "agent lost", aid
        ),
    ]
    changed = await storage.apply_verdicts(verdicts, now=40, resume_limit=0)
    assert [(r.run_id, r.status, r.failure_kind) for r in changed] == [
        ("lost", RunStatus.FAILURE, "agent_lost")
    ]
    assert changed[0].status_reason == "agent lost" and changed[0].end_time == 40
    assert (await storage.get_run("done")).status == RunStatus.SUCCESS  # type: ignore[union-attr]
    assert (await storage.get_agent(aid)).status == "OFFLINE"  # type: ignore[union-attr]
    with pytest.raises(StaleLease):  # the lost attempt's late writes are refused
        await storage.append_records("lost", lost, [event(2, "RUN_SUCCESS")], now=41)
    orders, _ = await storage.stop_orders(aid, [lost], now=42)
    assert [(o.run_id, o.cancel) for o in orders] == [("lost", False)]
    await storage.record_heartbeats([aid], now=43)
    assert (await storage.get_agent(aid)).status == "ONLINE"  # type: ignore[union-attr]


async def test_a_crashed_worker_resumes_the_run_until_attempts_run_out(storage: Storage) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    done = event(2, "STEP_SUCCESS", "extract")
    crash = RunRecord(
        seq=3,
        time=103.0,
        kind="event",
        type="RUN_FAILURE",
        message="exit 9",
        data={"failure_kind": "worker_crash"},
    )
    one_resume = ResumeRules(worker_restarts=1)
    result = await storage.append_records("r1", lease, [done, crash], now=3, resume=one_resume)
    assert result.status == RunStatus.QUEUED
    run = await storage.get_run("r1")
    assert run is not None and (run.lease, run.agent_id, run.resume_count) == (None, None, 1)
    assert run.reuse_outputs == {"extract": "r1"}  # the new worker skips finished steps
    restarted = [
        e for e in await storage.get_events("r1", 0, 100) if e.type == "RUN_WORKER_RESTARTED"
    ]
    assert restarted[0].data["attempt"] == 2 and "attempt 2 of 2" in restarted[0].message
    second = await assign_lease(storage, "r1", aid, now=4)
    assert second > lease
    await storage.append_records("r1", second, [event(1, "RUN_START")], now=5)
    crash = dataclasses.replace(crash, seq=2)
    result = await storage.append_records("r1", second, [crash], now=6, resume=one_resume)
    run = await storage.get_run("r1")
    assert run is not None and run.status == RunStatus.FAILURE
    assert run.failure_kind == "worker_crash"


async def test_reconcile_fails_started_runs_a_restarted_agent_no_longer_holds(
    storage: Storage,
) -> None:
    aid = await agent_id(storage)
    kept = await started(storage, "kept", aid)
    await started(storage, "lost", aid)
    await storage.create_run(new_run("launching"), now=1)
    await assign(storage, "launching", aid, now=2)
    launching = await storage.get_run("launching")
    assert launching is not None
    changed = await storage.reconcile_agent(aid, [kept], now=9, resume_limit=0)
    assert sorted((r.run_id, r.status, r.failure_kind, r.lease) for r in changed) == [
        ("launching", RunStatus.QUEUED, None, None),  # relaunched later under a new lease,
        ("lost", RunStatus.FAILURE, "agent_restarted", None),  # so the old one is fenced
    ]
    statuses = {r.run_id: r.status for r in await storage.active_runs()}
    assert statuses == {"kept": RunStatus.STARTED}
    old_lease = launching.lease
    assert old_lease is not None
    with pytest.raises(StaleLease):  # a worker the dead agent had forked writes nothing
        await storage.append_records("launching", old_lease, [event(1, "RUN_START")], now=10)


async def test_a_failure_gets_exactly_one_retry_decision(storage: Storage) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    await storage.append_records("r1", lease, [event(2, "RUN_FAILURE")], now=3)
    (pending,) = await storage.pending_retries(10)
    assert pending.run_id == "r1" and pending.failure_kind == "op_failure"
    retry = NewRun(
        run_id="r1-retry",
        job="etl",
        location="loc",
        tags={},
        config={},
        not_before=60.0,
        parent_run_id="r1",
        root_run_id="r1",
    )
    created = await storage.settle_retry("r1", retry, "retry 1 of 1", {"n": 1}, now=4)
    assert created is not None and created.status == RunStatus.QUEUED
    assert (created.parent_run_id, created.root_run_id, created.not_before) == ("r1", "r1", 60)
    assert await storage.settle_retry("r1", retry, "again", {}, now=5) is None
    assert await storage.pending_retries(10) == []
    events = await storage.get_events("r1", 0, 100)
    assert [(e.type, e.message) for e in events][-1] == ("RUN_RETRY", "retry 1 of 1")


async def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    from control_plane.storage.sqlite import MIGRATIONS, SqliteStorage

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("CREATE TABLE schema_version (version INTEGER)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute(
            "INSERT INTO runs (run_id, job, location, status, tags, config, create_time,"
            " update_time) VALUES ('old', 'etl', 'loc', 'QUEUED', '{\"team\": \"a\"}', '{}', 1, 7)"
        )
        db.execute("INSERT INTO run_tags (run_id, key, value) VALUES ('old', 'team', 'a')")
    store = SqliteStorage(str(path))
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        run = await store.get_run("old")
        assert run is not None and run.status_time == 7 and run.resume_count == 0
        runs, _ = await store.list_runs(RunFilter(tags=[("team", "a")]), 10, None)
        assert [r.run_id for r in runs] == ["old"]  # its tag found its run's id
    finally:
        await store.close()


async def test_a_run_failing_while_canceled_is_not_retried(storage: Storage) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    await storage.request_cancel("r1", now=3)
    await storage.append_records("r1", lease, [event(2, "RUN_FAILURE")], now=4)
    assert (await storage.get_run("r1")).status == RunStatus.FAILURE  # type: ignore[union-attr]
    assert await storage.pending_retries(10) == []


async def test_outputs_are_stored_inline_or_uploaded_under_the_current_lease(
    storage: Storage,
) -> None:
    aid = await agent_id(storage)
    lease = await started(storage, "r1", aid)
    data = {"type": "int", "output_bytes": b"\x80pickled", "odd": b"x"}
    output = RunRecord(seq=2, time=1.0, kind="event", type="STEP_OUTPUT", step="a", data=data)
    await storage.append_records("r1", lease, [output], now=3)
    assert await storage.get_output("r1", "a") == b"\x80pickled"
    (stored,) = [e for e in await storage.get_events("r1", 0, 100) if e.type == "STEP_OUTPUT"]
    assert stored.data == {"type": "int", "odd": "<1 bytes>"}  # bytes never reach the JSON
    await storage.put_output("r1", lease, "extract", b"big", now=4)
    assert await storage.get_output("r1", "extract") == b"big"
    with pytest.raises(RecordRefused):
        await storage.put_output("r1", lease, "../../etc/passwd", b"x", now=4)
    run = await storage.get_run("r1")
    assert run is not None and run.status == RunStatus.FAILURE and run.lease is None
    assert await storage.get_output("r1", "missing") is None
    with pytest.raises(StaleLease):
        await storage.put_output("r1", lease, "extract", b"late", now=5)
    with pytest.raises(UnknownRun):
        await storage.put_output("nope", lease, "b", b"x", now=5)


async def test_a_tick_retried_after_a_crash_creates_its_runs_once(storage: Storage) -> None:
    tick = await storage.start_tick("loc", "daily", "schedule", 1000.0, now=1001)
    assert tick is not None and tick.status == "STARTED"
    # The control plane crashes here; after the restart the same tick is evaluated again
    again = await storage.start_tick("loc", "daily", "schedule", 1000.0, now=1005)
    assert again is not None and again.id == tick.id

    def request() -> NewRun:
        run = new_run(f"r-{id(object())}")
        run.idempotency_key = "schedule/loc/daily/1000.0/0"
        return run

    done, created = await storage.finish_tick(tick.id, "SUCCESS", [request()], now=1006)
    assert done.status == "SUCCESS" and len(created) == 1 and done.run_ids == [created[0].run_id]
    assert await storage.start_tick("loc", "daily", "schedule", 1000.0, now=1007) is None
    other = await storage.start_tick("loc", "daily", "schedule", 2000.0, now=2001)
    assert other is not None
    repeat, none = await storage.finish_tick(other.id, "SUCCESS", [request()], now=2002)
    assert none == [] and repeat.status == "SKIPPED"  # that key already made its run
    runs, _ = await storage.list_runs(RunFilter(), 10, None)
    assert len(runs) == 1
    states = await storage.instigator_states()
    assert states[("loc", "daily", "schedule")].last_tick_time == 2000.0


async def test_a_sensor_cursor_moves_only_with_good_ticks(storage: Storage) -> None:
    first = await storage.start_tick("loc", "inbox", "sensor", None, now=10)
    assert first is not None
    await storage.finish_tick(first.id, "SKIPPED", [], now=11, skip_reason="none", cursor="a")
    bad = await storage.start_tick("loc", "inbox", "sensor", None, now=20)
    assert bad is not None
    await storage.finish_tick(
        bad.id, "FAILURE", [], now=21, error="boom", cursor="z", failure_count=3
    )
    state = (await storage.instigator_states())[("loc", "inbox", "sensor")]
    assert (state.cursor, state.last_tick_time) == ("a", 20)  # start-to-start interval
    ticks = await storage.list_ticks("loc", "inbox", "sensor", 10)
    assert [(t.status, t.error, t.failure_count) for t in ticks] == [
        ("FAILURE", "boom", 3),
        ("SKIPPED", None, 0),
    ]


async def test_stopped_and_orphaned_instigators(storage: Storage) -> None:
    from control_plane.daemon.instigators import load_instigators
    from protocol.messages import ScheduleInfo

    loc = CodeLocationInfo(
        name="loc", schedules=[ScheduleInfo(name="daily", job="etl", cron="0 6 * * *")]
    )
    await storage.register_agent("w1", "h", "0", ["default"], 1, [loc], now=10.0)
    await storage.set_instigator("loc", "gone", "schedule", status="RUNNING")
    found = {i.name: i for i in await load_instigators(storage, now=11.0, heartbeat_timeout=30)}
    assert found["daily"].status == "STOPPED" and found["daily"].hosts
    assert found["gone"].status == "ORPHANED" and found["gone"].definition is None
    await storage.set_instigator("loc", "daily", "schedule", status="RUNNING")
    found = {i.name: i for i in await load_instigators(storage, now=100.0, heartbeat_timeout=30)}
    assert found["daily"].running and not found["daily"].hosts  # its agent went quiet


async def test_only_registrations_that_touch_a_schedule_wake_the_daemon(storage: Storage) -> None:
    from control_plane.bus import WakeBus
    from control_plane.clock import SystemClock
    from control_plane.daemon.instigators import Instigators
    from control_plane.fleet.evaluations import EvaluationBroker
    from protocol.messages import ScheduleInfo

    clock = SystemClock()
    loc = CodeLocationInfo(
        name="loc", schedules=[ScheduleInfo(name="daily", job="etl", cron="0 6 * * *")]
    )
    host = await storage.register_agent("w1", "h", "0", ["default"], 1, [loc], now=clock.time())
    idle = await agent_id(storage, "idle")
    bus = WakeBus(storage, "replica")
    broker = EvaluationBroker(storage, clock, bus.publish)
    schedules = Instigators("scheduler", storage, broker, bus, 30.0)
    await schedules.load(clock.time())
    assert not schedules.woken_by(idle)  # hosts no schedule, never did: no pass
    assert schedules.woken_by(host.agent_id)  # it may have dropped its schedule
    assert schedules.woken_by("") and schedules.woken_by(None)  # a start, stop, reconnect


async def test_what_the_metrics_read(storage: Storage) -> None:
    aid = await agent_id(storage)
    for run_id in ("r1", "r2", "r3"):
        await storage.create_run(new_run(run_id), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    assert await storage.count_runs_by_status() == {RunStatus.QUEUED: 2, RunStatus.STARTING: 1}
    # A launch is acknowledged once: a second poll (or record batch) saying so is no news.
    assert await storage.ack_launches(aid, [lease, lease + 100]) == [lease]
    assert await storage.ack_launches(aid, [lease]) == []
    assert await storage.ack_launches(aid, []) == []
    log = RunRecord(seq=2, time=3.0, kind="log", type="stdout", message="hi\n")
    batch = [event(1, "RUN_START"), log, event(3, "RUN_SUCCESS")]
    first = await storage.append_records("r1", lease, batch, now=3)
    assert first.stored == {"event": 2, "log": 1}
    assert (await storage.append_records("r1", lease, batch, now=4)).stored == {}  # resent


async def test_a_status_write_is_guarded_by_the_update_itself(storage: Storage) -> None:
    """`transition` changes a run only from a status its target may follow and, given
    one, under the current lease; a refused write changes nothing, the event sequence
    included. Two writers racing in separate transactions (row writes: no instance-wide
    lock orders them) cannot both win: the loser's UPDATE matches no row."""
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    run = await storage.get_run("r1")
    assert run is not None and run.status == RunStatus.STARTING

    async def last_seq() -> int:
        rows = await storage._reader.fetch(  # type: ignore[attr-defined]
            "SELECT last_event_seq FROM runs WHERE run_id = ?", ("r1",)
        )
        return int(rows[0][0])

    seq_before = await last_seq()

    async def write(new: RunStatus, with_lease: int | None, kind: str | None = None) -> int | None:
        async with storage._write_row() as db:  # type: ignore[attr-defined]
            return await transition(db, "r1", new, f"to {new}", 3.0, with_lease, kind)

    assert await write(RunStatus.SUCCESS, lease) is None  # STARTING may not end in SUCCESS
    assert await write(RunStatus.STARTED, lease + 1) is None  # a stale lease
    unchanged = await storage.get_run("r1")
    assert unchanged is not None and unchanged.status == RunStatus.STARTING
    assert await last_seq() == seq_before
    assert await write(RunStatus.STARTED, lease) == seq_before + 1
    assert await write(RunStatus.STARTED, lease) is None  # already there: not twice

    # Success and failure race for the started run: exactly one write happens
    results = await asyncio.gather(
        write(RunStatus.SUCCESS, lease), write(RunStatus.FAILURE, lease, "agent_lost")
    )
    assert sorted(r is None for r in results) == [False, True], results
    ended = await storage.get_run("r1")
    winner = RunStatus.SUCCESS if results[0] is not None else RunStatus.FAILURE
    assert ended is not None and ended.status == winner
    assert await last_seq() == seq_before + 2


async def test_every_status_change_is_in_the_history_in_order(storage: Storage) -> None:
    """The run-status history: each change once, numbered in commit order, with the run."""
    start = await storage.last_status_change()
    aid = await agent_id(storage)
    await storage.create_run(new_run("r1"), now=1)
    await storage.create_run(new_run("r2"), now=1)
    lease = await assign_lease(storage, "r1", aid, now=2)
    await storage.append_records("r1", lease, [event(1, "RUN_START")], now=3)
    await storage.append_records("r1", lease, [event(2, "RUN_SUCCESS")], now=4)
    await storage.request_cancel("r2", now=5)
    changes = await storage.status_changes(start, 100)
    assert [(c.run_id, c.status) for c, _ in changes] == [
        ("r1", RunStatus.QUEUED),
        ("r2", RunStatus.QUEUED),
        ("r1", RunStatus.STARTING),
        ("r1", RunStatus.STARTED),
        ("r1", RunStatus.SUCCESS),
        ("r2", RunStatus.CANCELED),
    ]
    ids = [c.id for c, _ in changes]
    assert ids == sorted(ids) and await storage.last_status_change() == ids[-1]
    assert all(run.run_id == c.run_id for c, run in changes)
    ended = await storage.status_changes(start, 100, [RunStatus.SUCCESS, RunStatus.CANCELED])
    assert [(c.run_id, c.status, c.time) for c, _ in ended] == [
        ("r1", RunStatus.SUCCESS, 4.0),
        ("r2", RunStatus.CANCELED, 5.0),
    ]
    assert [c.run_id for c, _ in await storage.status_changes(ids[2], 2)] == ["r1", "r1"]


async def test_a_reader_of_the_history_misses_no_change_made_concurrently(
    storage: Storage,
) -> None:
    """Runs end in parallel transactions (PostgreSQL commits them in any order) while a
    reader follows the history with a cursor: it sees every change exactly once."""
    aid = await agent_id(storage)
    runs = [f"c{i}" for i in range(120)]
    for run_id in runs:
        await storage.create_run(new_run(run_id), now=1)
    leases = {run_id: await assign_lease(storage, run_id, aid, now=2) for run_id in runs}
    cursor = await storage.last_status_change()
    seen: list[tuple[str, RunStatus]] = []
    writing = True

    async def follow() -> None:
        nonlocal cursor
        while writing or await storage.status_changes(cursor, 1):
            for change, _ in await storage.status_changes(cursor, 1000):
                seen.append((change.run_id, change.status))
                cursor = change.id
            await asyncio.sleep(0)

    async def finish(run_id: str) -> None:
        records = [event(1, "RUN_START"), event(2, "RUN_SUCCESS")]
        await storage.append_records(run_id, leases[run_id], records, now=3)

    reader = asyncio.create_task(follow())
    await asyncio.gather(*(finish(run_id) for run_id in runs))
    writing = False
    await asyncio.wait_for(reader, 30)
    expected = [(r, s) for r in runs for s in (RunStatus.STARTED, RunStatus.SUCCESS)]
    assert sorted(seen) == sorted(expected)
