"""The alerts outbox's contract, on SQLite and PostgreSQL (the `storage` fixture)."""

from __future__ import annotations

import asyncio

from control_plane.model.alerts import FAILED, PENDING, SENT, Occurrence
from control_plane.model.runs import NewRun
from control_plane.storage import Storage, open_storage


def occurrence(key: str, rule: str = "oncall") -> Occurrence:
    return Occurrence(rule, "run_failure", key, {"text": f"{key} failed", "run_id": key})


async def test_an_occurrence_is_stored_once_per_rule(storage: Storage) -> None:
    first = await storage.record_alerts(
        [occurrence("run_failure/r1"), occurrence("run_failure/r1", "team")], {}, now=10.0
    )
    assert [o.rule for o in first] == ["oncall", "team"]
    # Detected again (a later pass, a restart, another replica): nothing new
    again = await storage.record_alerts(
        [occurrence("run_failure/r1"), occurrence("run_failure/r2")], {}, now=11.0
    )
    assert [o.key for o in again] == ["run_failure/r2"]
    rows = await storage.recent_deliveries(10)
    assert [(d.rule, d.key, d.status) for d in rows] == [
        ("oncall", "run_failure/r2", PENDING),
        ("team", "run_failure/r1", PENDING),
        ("oncall", "run_failure/r1", PENDING),
    ]
    assert rows[-1].payload == {"text": "run_failure/r1 failed", "run_id": "run_failure/r1"}


async def test_two_processes_recording_the_same_occurrence_store_one_row(
    storage_url: str,
) -> None:
    stores = [open_storage(storage_url) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        found = [occurrence(f"run_failure/r{i}") for i in range(20)]
        results = await asyncio.gather(
            *(store.record_alerts(found, {}, now=1.0) for store in stores)
        )
        assert sum(len(new) for new in results) == 20
        assert len(await stores[0].recent_deliveries(100)) == 20
    finally:
        for store in stores:
            await store.close()


async def test_cursors_only_move_forward(storage: Storage) -> None:
    assert await storage.alert_cursors() == {}
    await storage.record_alerts([], {"status_changes": 5, "ticks": 2}, now=1.0)
    await storage.record_alerts([], {"status_changes": 3, "ticks": 4}, now=2.0)
    assert await storage.alert_cursors() == {"status_changes": 5.0, "ticks": 4.0}


async def test_a_claimed_delivery_is_not_claimed_again_until_its_claim_lapses(
    storage: Storage,
) -> None:
    await storage.record_alerts([occurrence("a"), occurrence("b")], {}, now=10.0)
    assert await storage.next_delivery_due() == 10.0
    claimed = await storage.claim_deliveries(now=10.0, hold=30.0, limit=1)
    assert [(d.key, d.attempts) for d in claimed] == [("a", 1)]
    (b,) = await storage.claim_deliveries(now=10.0, hold=30.0, limit=10)
    assert b.key == "b"
    # "b" fails, is retried, then fails for good: its last error stays
    assert await storage.settle_delivery(b, now=12.0, error="HTTP 500", retry_at=14.0)
    assert await storage.claim_deliveries(now=13.0, hold=30.0, limit=10) == []
    (b2,) = await storage.claim_deliveries(now=14.0, hold=30.0, limit=10)
    assert await storage.settle_delivery(b2, now=15.0, error="timed out")
    assert await storage.claim_deliveries(now=39.0, hold=30.0, limit=10) == []
    # The sender of "a" died: its claim lapses and another attempt takes it
    (retaken,) = await storage.claim_deliveries(now=40.0, hold=30.0, limit=10)
    assert (retaken.key, retaken.attempts) == ("a", 2)
    # The late first attempt's outcome no longer counts
    assert not await storage.settle_delivery(claimed[0], now=41.0)
    assert await storage.settle_delivery(retaken, now=41.0)
    rows = {d.key: d for d in await storage.recent_deliveries(10)}
    assert (rows["a"].status, rows["a"].attempts, rows["a"].sent_at) == (SENT, 2, 41.0)
    assert (rows["b"].status, rows["b"].attempts, rows["b"].last_error) == (
        FAILED,
        2,
        "timed out",
    )
    assert await storage.next_delivery_due() is None


async def test_failed_ticks_up_to_the_first_unfinished_one(storage: Storage) -> None:
    assert await storage.tick_horizon() == 0
    ticks = [await storage.start_tick("loc", "s", "sensor", None, now=float(i)) for i in range(4)]
    ids = [t.id for t in ticks if t is not None]
    await storage.finish_tick(ids[1], "FAILURE", [], now=5.0, error="boom")
    assert await storage.tick_horizon() == ids[0] - 1  # the first is still running
    await storage.finish_tick(ids[0], "SUCCESS", [], now=6.0)
    await storage.finish_tick(ids[2], "FAILURE", [], now=6.0, error="bang")
    assert await storage.tick_horizon() == ids[2]
    failed = await storage.failed_ticks(0, ids[2], 10)
    # each with the status of the sensor's tick before it: a streak shows as one
    assert [(t.id, t.error, before) for t, before in failed] == [
        (ids[1], "boom", "SKIPPED"),  # (a success without runs)
        (ids[2], "bang", "FAILURE"),
    ]
    assert [t.id for t, _ in await storage.failed_ticks(ids[1], ids[2], 10)] == [ids[2]]
    await storage.finish_tick(ids[3], "FAILURE", [], now=7.0, error="again")
    other = await storage.start_tick("loc", "other", "sensor", None, now=8.0)
    assert other is not None
    await storage.finish_tick(other.id, "FAILURE", [], now=9.0, error="first")
    failed = await storage.failed_ticks(ids[2], other.id, 10)
    assert [(t.name, before) for t, before in failed] == [("s", "FAILURE"), ("other", None)]


async def test_runs_queued_before_a_time(storage: Storage) -> None:
    await storage.create_run(NewRun("old", "etl", "loc", {}, {}), now=10.0)
    await storage.create_run(NewRun("new", "etl", "loc", {}, {}), now=50.0)
    await storage.create_run(NewRun("delayed", "etl", "loc", {}, {}, not_before=60.0), now=5.0)
    assert [r.run_id for r in await storage.queued_before(20.0, 10)] == ["old"]
    assert [r.run_id for r in await storage.queued_before(60.0, 10)] == ["old", "new", "delayed"]
