"""The agent's spool: records on disk until acknowledged, across restarts, within a
bound that sheds compute-log text first; and the outbox delivering through it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.client import ControlPlaneError, ControlPlaneUnreachable
from agent.outbox import AttemptRejected, RunOutbox
from agent.spool import Spool, SpooledAttempt
from protocol.messages import EventAck, EventBatch, RunRecord

ATTEMPT = SpooledAttempt("agent-1", "run-1", 7)


def event(seq: int, kind: str = "RUN_START") -> RunRecord:
    return RunRecord(seq=seq, time=1.0, kind="event", type=kind)


def log_chunk(seq: int, text: str) -> RunRecord:
    return RunRecord(seq=seq, time=1.0, kind="log", type="stdout", step="a", message=text)


async def test_records_stay_until_acknowledged_and_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    await spool.open()
    await spool.append(ATTEMPT, [event(1), log_chunk(2, "hi\n"), event(3, "RUN_SUCCESS")])
    await spool.append(ATTEMPT, [event(3, "RUN_SUCCESS")])  # a record stored twice: kept once
    await spool.acknowledged(ATTEMPT.lease, 1)
    await spool.close()
    again = Spool(tmp_path / "spool.db")
    await again.open()
    assert await again.attempts() == [ATTEMPT]
    assert [(r.seq, r.type) for r in await again.pending(ATTEMPT.lease)] == [
        (2, "stdout"),
        (3, "RUN_SUCCESS"),
    ]
    assert again.size > 0
    await again.acknowledged(ATTEMPT.lease, 3)
    assert await again.attempts() == [] and again.size == 0
    await again.close()


async def test_past_its_bound_it_drops_log_text_first_and_keeps_every_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=20_000)
    await spool.open()
    records = []
    for seq in range(1, 41):
        records.append(event(seq, "STEP_START") if seq % 4 == 0 else log_chunk(seq, "x" * 1000))
    for start in range(0, 40, 5):
        await spool.append(ATTEMPT, records[start : start + 5])
    kept = await spool.pending(ATTEMPT.lease, 1000)
    assert [r.seq for r in kept] == list(range(1, 41))  # still contiguous: delivery goes on
    assert [r.type for r in kept if r.kind == "event"] == ["STEP_START"] * 10
    dropped = [r for r in kept if r.kind == "log" and "dropped" in r.message]
    assert dropped and dropped[0].seq == 1  # the oldest text goes first
    assert dropped[0].message == "[1000 bytes of log dropped: agent spool full]\n"
    assert spool.size <= 20_000
    assert "near its bound" in caplog.text
    await spool.close()


async def test_log_text_older_than_the_age_bound_goes_and_events_stay(tmp_path: Path) -> None:
    now = [1000.0]
    spool = Spool(tmp_path / "spool.db", max_age_seconds=3600, clock=lambda: now[0])
    await spool.open()
    await spool.append(ATTEMPT, [event(1), log_chunk(2, "old " * 100)])
    now[0] += 3601
    await spool.append(ATTEMPT, [log_chunk(3, "new " * 100), event(4, "RUN_SUCCESS")])
    kept = {r.seq: r for r in await spool.pending(ATTEMPT.lease)}
    assert kept[2].message == "[400 bytes of log dropped: older than the spool's max age]\n"
    assert kept[3].message == "new " * 100 and kept[4].type == "RUN_SUCCESS"
    await spool.close()


async def test_the_outbox_delivers_through_the_spool_across_an_outage(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    await spool.open()
    sent: list[EventBatch] = []
    down = 3

    async def send(batch: EventBatch) -> EventAck:
        nonlocal down
        if down:
            down -= 1
            raise ControlPlaneUnreachable("connection refused")
        sent.append(batch)
        return EventAck(acked_seq=batch.records[-1].seq)

    outbox = RunOutbox("agent-1", "run-1", 7, send, spool=spool)
    for seq in range(1, 4):
        outbox.add(event(seq))
    outbox.close()
    await outbox.deliver()
    assert [r.seq for b in sent for r in b.records] == [1, 2, 3]
    assert await spool.attempts() == []
    await spool.close()


async def test_a_last_record_added_while_the_spool_is_read_is_still_delivered(
    tmp_path: Path,
) -> None:
    """The race `make bench` found: the run's last record arrives while the outbox reads
    the spool, its flush starts, and the run closes before the read returns."""
    outbox: RunOutbox

    class RacingSpool(Spool):
        race = True

        async def pending(self, lease: int, limit: int = 500) -> list[RunRecord]:
            found = await super().pending(lease, limit)
            if self.race and not found:
                self.race = False
                outbox.add(event(2, "RUN_SUCCESS"))
                for _ in range(3):  # the flush task takes the record and starts writing
                    await asyncio.sleep(0)
                outbox.close()
            return found

    spool = RacingSpool(tmp_path / "spool.db")
    await spool.open()
    sent: list[int] = []

    async def send(batch: EventBatch) -> EventAck:
        sent.extend(r.seq for r in batch.records)
        return EventAck(acked_seq=batch.records[-1].seq)

    outbox = RunOutbox("agent-1", "run-1", 7, send, spool=spool)
    outbox.add(event(1))
    await asyncio.wait_for(outbox.deliver(), 10)
    assert sent == [1, 2]
    assert await spool.attempts() == []
    await spool.close()


async def test_a_refused_attempt_is_dropped_from_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    await spool.open()

    async def send(batch: EventBatch) -> EventAck:
        raise ControlPlaneError(409, "stale_lease", "lease 7 is stale")

    outbox = RunOutbox("agent-1", "run-1", 7, send, spool=spool)
    outbox.add(event(1))
    outbox.close()
    with pytest.raises(AttemptRejected):
        await outbox.deliver()
    assert await spool.attempts() == []
    await spool.close()
