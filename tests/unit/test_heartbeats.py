"""Group commit of heartbeats (control_plane/fleet/heartbeats.py), on both storage backends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from agent.heartbeat import HEARTBEAT_SPREAD, heartbeat_pause
from control_plane.clock import SystemClock
from control_plane.fleet.heartbeats import HeartbeatRecorder
from control_plane.storage import Storage
from protocol.messages import CodeLocationInfo


class CountingStorage:
    """The real storage, counting the transactions heartbeats take."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commits: list[list[str]] = []

    async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]:
        self.commits.append(sorted(agent_ids))
        return await self.storage.record_heartbeats(agent_ids, now)


async def registered(storage: Storage, count: int) -> list[str]:
    """`count` agents, each last heard from at time 1.0."""
    ids = []
    for i in range(count):
        agent = await storage.register_agent(
            f"a{i}", "h", "0", ["default"], 1, [CodeLocationInfo(name="loc")], now=1.0
        )
        ids.append(agent.agent_id)
    return ids


async def test_heartbeats_arriving_together_share_one_commit(storage: Storage) -> None:
    ids = await registered(storage, 20)
    counting = CountingStorage(storage)
    recorder = HeartbeatRecorder(counting, SystemClock())  # type: ignore[arg-type]
    answers = await asyncio.gather(*(recorder.record(a) for a in [*ids, "unknown"]))
    assert all(previous == 1.0 for previous, _ in answers[:-1])
    assert answers[-1][0] is None  # an unknown agent is told so (the API answers 404)
    assert len(counting.commits) <= 2  # the first alone, the rest in the next commit
    assert sorted(a for batch in counting.commits for a in batch) == sorted([*ids, "unknown"])
    now = answers[0][1]
    stored = await storage.get_agents(ids)
    assert {a.last_heartbeat for a in stored.values()} == {now}
    # Alone, a heartbeat is committed at once, in its own transaction.
    previous, _ = await recorder.record(ids[0])
    assert previous == now and counting.commits[-1] == [ids[0]]


async def test_a_failed_commit_fails_every_heartbeat_in_it(storage: Storage) -> None:
    class Broken:
        async def record_heartbeats(self, agent_ids: Iterable[str], now: float) -> dict[str, float]:
            raise RuntimeError("disk full")

    recorder = HeartbeatRecorder(Broken(), SystemClock())  # type: ignore[arg-type]
    results = await asyncio.gather(
        recorder.record("a"), recorder.record("b"), return_exceptions=True
    )
    assert [str(r) for r in results] == ["disk full", "disk full"]


class SteppedClock(SystemClock):
    """Monotonic time that moves only when the recorder sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_commits_are_at_least_the_gap_apart_so_spread_heartbeats_share_them(
    storage: Storage,
) -> None:
    ids = await registered(storage, 3)
    counting = CountingStorage(storage)
    clock = SteppedClock()
    recorder = HeartbeatRecorder(counting, clock, min_gap=0.1, sleep=clock.sleep)  # type: ignore[arg-type]
    await recorder.record(ids[0])  # the writer was idle: committed at once
    assert clock.slept == [] and counting.commits == [[ids[0]]]
    clock.now += 0.04  # the next heartbeats come 40 ms later, one after the other
    answers = await asyncio.gather(recorder.record(ids[1]), recorder.record(ids[2]))
    assert len(clock.slept) == 1 and abs(clock.slept[0] - 0.06) < 1e-9
    assert counting.commits[1:] == [sorted(ids[1:])]  # they waited out the gap, together
    assert all(previous == 1.0 for previous, _ in answers)
    clock.now += 5.0  # long after: committed at once again
    await recorder.record(ids[0])
    assert len(clock.slept) == 1 and len(counting.commits) == 3


def test_an_agent_heartbeats_within_its_interval_at_a_jittered_pace() -> None:
    assert heartbeat_pause(5.0, lambda: 0.0) == 5.0
    assert heartbeat_pause(5.0, lambda: 0.5) == 5.0 * (1 - HEARTBEAT_SPREAD / 2)
    pauses = [heartbeat_pause(5.0) for _ in range(1000)]
    assert all(5.0 * (1 - HEARTBEAT_SPREAD) < p <= 5.0 for p in pauses)
    assert len({round(p, 3) for p in pauses}) > 100  # spread out, not one value
