"""Group commit of heartbeats (control_plane/heartbeats.py), on both storage backends."""

from __future__ import annotations

import asyncio

from control_plane.clock import SystemClock
from control_plane.heartbeats import HeartbeatRecorder
from control_plane.storage import Storage
from protocol.messages import CodeLocationInfo


class CountingStorage:
    """The real storage, counting the transactions heartbeats take."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.commits: list[list[str]] = []

    async def record_heartbeats(self, agent_ids, now):  # type: ignore[no-untyped-def]
        self.commits.append(sorted(agent_ids))
        return await self.storage.record_heartbeats(agent_ids, now)


async def test_heartbeats_arriving_together_share_one_commit(storage: Storage) -> None:
    ids = []
    for i in range(20):
        agent = await storage.register_agent(f"a{i}", "h", "0", ["default"], 1,
                                             [CodeLocationInfo(name="loc")], now=1.0)  # fmt: skip
        ids.append(agent.agent_id)
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
        async def record_heartbeats(self, agent_ids, now):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk full")

    recorder = HeartbeatRecorder(Broken(), SystemClock())  # type: ignore[arg-type]
    results = await asyncio.gather(recorder.record("a"), recorder.record("b"),
                                   return_exceptions=True)  # fmt: skip
    assert [str(r) for r in results] == ["disk full", "disk full"]
