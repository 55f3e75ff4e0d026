"""Deletion and retention in storage, on every backend (the `storage` fixture)."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.model.retention import COMPUTE_LOGS, OUTPUTS, RUNS, TICKS, Purge
from control_plane.model.runs import NewRun
from control_plane.model.statuses import RunStatus
from control_plane.storage import Storage
from control_plane.storage.errors import RunActive, RunHasLiveChildren, UnknownRun
from protocol.messages import RunRecord
from tests.unit.test_storage import agent_id, assign_lease, event, new_run

DAY = 86400.0


def log(seq: int, time: float, text: str = "out\n") -> RunRecord:
    return RunRecord(seq=seq, time=time, kind="log", type="stdout", step="a", message=text)


async def finished(
    storage: Storage, run_id: str, aid: str, end: float, outcome: str = "RUN_SUCCESS"
) -> int:
    """A run that started, logged, stored an output and ended at `end`; its lease."""
    await storage.create_run(new_run(run_id, tags={"team": "a"}), now=end - 3)
    lease = await assign_lease(storage, run_id, aid, now=end - 2)
    batch = [event(1, "RUN_START"), event(2, "STEP_START", "a"), log(3, end - 1)]
    await storage.append_records(run_id, lease, batch, now=end - 1)
    await storage.put_output(run_id, lease, "a", b"output", now=end - 1)
    await storage.append_records(run_id, lease, [event(4, outcome)], now=end)
    return lease


async def started(storage: Storage, run_id: str, aid: str, now: float) -> int:
    await storage.create_run(new_run(run_id), now=now)
    lease = await assign_lease(storage, run_id, aid, now=now)
    await storage.append_records(run_id, lease, [event(1, "RUN_START")], now=now)
    return lease


async def gone(storage: Storage, run_id: str) -> bool:
    return (
        await storage.get_run(run_id) is None
        and await storage.get_events(run_id, 0, 100) == []
        and await storage.get_logs(run_id, None, 0) == []
        and await storage.get_output(run_id, "a") is None
        and all(c.run_id != run_id for c, _ in await storage.status_changes(0, 1000))
    )


async def purge_all(storage: Storage, purge: Purge) -> dict[str, int]:
    """Every batch of `purge` (small ones, to cross batch boundaries); rows by table."""
    rows: dict[str, int] = {}
    while True:
        result = await storage.purge(purge, max_runs=2, max_rows=3)
        for table, count in result.rows.items():
            rows[table] = rows.get(table, 0) + count
        if not result.more:
            return rows


async def test_delete_removes_a_finished_run_and_everything_under_it(storage: Storage) -> None:
    aid = await agent_id(storage)
    await finished(storage, "r1", aid, end=100)
    await finished(storage, "r2", aid, end=100)
    deleted = await storage.delete_run("r1")
    assert deleted.run_id == "r1" and deleted.status == RunStatus.SUCCESS
    assert await gone(storage, "r1")
    other = await storage.get_run("r2")
    assert other is not None and other.tags == {"team": "a"}
    assert len(await storage.get_events("r2", 0, 100)) == 5
    assert await storage.get_logs("r2", None, 0) != []
    assert await storage.get_output("r2", "a") == b"output"
    with pytest.raises(UnknownRun):
        await storage.delete_run("r1")


async def test_delete_refuses_an_active_run_and_a_parent_of_a_live_retry(
    storage: Storage,
) -> None:
    aid = await agent_id(storage)
    await started(storage, "live", aid, now=10)
    await storage.create_run(new_run("queued"), now=10)
    for run_id in ("live", "queued"):
        with pytest.raises(RunActive):
            await storage.delete_run(run_id)
    await finished(storage, "parent", aid, end=20, outcome="RUN_FAILURE")
    retry = NewRun(
        run_id="child",
        job="etl",
        location="loc",
        tags={},
        config={},
        parent_run_id="parent",
        root_run_id="parent",
    )
    await storage.create_run(retry, now=21)
    with pytest.raises(RunHasLiveChildren, match="child"):
        await storage.delete_run("parent")
    await storage.request_cancel("child", now=22)  # QUEUED -> CANCELED: the child ended
    await storage.delete_run("parent")
    child = await storage.get_run("child")
    assert child is not None and child.parent_run_id == "parent"  # lineage kept
    assert (await storage.get_run("live")) is not None


async def test_runs_purge_by_status_and_end_time(storage: Storage) -> None:
    aid = await agent_id(storage)
    for i in range(5):
        await finished(storage, f"old-ok-{i}", aid, end=100 + i)
    await finished(storage, "old-failed", aid, end=100, outcome="RUN_FAILURE")
    await finished(storage, "new-ok", aid, end=10_000)
    rows = await purge_all(storage, Purge(RUNS, "SUCCESS", before=1000))
    assert rows["runs"] == 5 and rows["events"] == 25 and rows["compute_logs"] == 5
    for i in range(5):
        assert await gone(storage, f"old-ok-{i}")
    assert await storage.get_run("old-failed") is not None
    assert await storage.get_run("new-ok") is not None
    snapshot = await storage.retention_snapshot()
    assert snapshot.oldest[(RUNS, "SUCCESS")] == 10_000
    assert snapshot.oldest[(RUNS, "FAILURE")] == 100


async def test_logs_and_outputs_purge_only_of_finished_runs(storage: Storage) -> None:
    aid = await agent_id(storage)
    await finished(storage, "done", aid, end=100)
    live = await started(storage, "live", aid, now=50)
    await storage.append_records("live", live, [log(2, 60.0)], now=60)
    await storage.put_output("live", live, "a", b"live output", now=60)
    assert (await purge_all(storage, Purge(COMPUTE_LOGS, None, before=1000))) == {"compute_logs": 1}
    assert (await purge_all(storage, Purge(OUTPUTS, None, before=1000))) == {"step_outputs": 1}
    assert await storage.get_logs("done", None, 0) == []
    assert await storage.get_output("done", "a") is None
    assert len(await storage.get_events("done", 0, 100)) == 5  # the run and its events stay
    assert [c.text for c in await storage.get_logs("live", None, 0)] == ["out\n"]
    assert await storage.get_output("live", "a") == b"live output"


async def test_ticks_purge_by_status(storage: Storage) -> None:
    for i, status in enumerate(["FAILURE", "SKIPPED", "FAILURE", "SKIPPED"]):
        tick = await storage.start_tick("loc", "s", "sensor", None, now=10 + i)
        assert tick is not None
        await storage.finish_tick(tick.id, status, [], now=20 + i, skip_reason="x")
    young = await storage.start_tick("loc", "s", "sensor", None, now=5000)
    assert young is not None
    assert await purge_all(storage, Purge(TICKS, "SKIPPED", before=1000)) == {"ticks": 2}
    left = await storage.list_ticks("loc", "s", "sensor", 10)
    assert sorted(t.status for t in left) == ["FAILURE", "FAILURE", "STARTED"]


async def test_purge_never_touches_a_live_run_and_its_events_keep_coming(
    storage: Storage,
) -> None:
    """A STARTED run older than the limit is not finished: the guard skips it, and an
    ingest batch racing the purge stores every record."""
    aid = await agent_id(storage)
    lease = await started(storage, "live", aid, now=10)
    for i in range(20):
        await finished(storage, f"old-{i}", aid, end=100 + i)
    records = [log(seq, 50.0 + seq) for seq in range(2, 402)]

    async def ingest() -> None:
        for start in range(0, len(records), 20):
            await storage.append_records("live", lease, records[start : start + 20], now=200)
            await asyncio.sleep(0)

    purged, _ = await asyncio.gather(
        purge_all(storage, Purge(RUNS, "SUCCESS", before=DAY)), ingest()
    )
    await purge_all(storage, Purge(COMPUTE_LOGS, None, before=DAY))
    assert purged["runs"] == 20
    run = await storage.get_run("live")
    assert run is not None and run.status == RunStatus.STARTED
    assert len(await storage.get_logs("live", None, 0)) == 400
    done = await storage.append_records("live", lease, [event(402, "RUN_SUCCESS")], now=300)
    assert done.status == RunStatus.SUCCESS


async def test_reclaim_space_runs_on_every_backend(storage: Storage) -> None:
    await storage.reclaim_space(100)
