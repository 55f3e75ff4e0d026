"""Agents' heartbeats, committed in groups.

Thousands of agents each heartbeating every few seconds would be thousands of write
transactions a second, one at a time. Instead, heartbeats that arrive while a commit is
in flight, or within `MIN_COMMIT_GAP_SECONDS` of the last one, wait for the next, which
records all of them in one transaction: at low load every heartbeat is committed at
once, alone; at high load commits come at most ten a second whatever the fleet's size,
each carrying many. (Without the gap, agents whose heartbeats are spread evenly in time,
as they should be, would each find the writer free and take a commit, and an fsync, of
their own.) Each caller still gets its answer only after its heartbeat is stored; the
wait, at most the gap, is nothing beside a heartbeat timeout of seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from control_plane.clock import Clock
from control_plane.storage.port import AgentStore

MIN_COMMIT_GAP_SECONDS = 0.1
MAX_PER_COMMIT = 1000  # bounds one statement's IN list and the burst of answers after it


class HeartbeatRecorder:
    def __init__(
        self,
        storage: AgentStore,
        clock: Clock,
        min_gap: float = MIN_COMMIT_GAP_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.min_gap = min_gap
        self.sleep = sleep
        self._last_commit = float("-inf")  # monotonic time the last commit began
        self._pending: dict[str, list[asyncio.Future[tuple[float | None, float]]]] = {}
        self._committing: asyncio.Task[None] | None = None

    async def record(self, agent_id: str) -> tuple[float | None, float]:
        """Store a heartbeat: (the agent's previous heartbeat time or None if the agent
        is unknown, the time recorded now)."""
        future: asyncio.Future[tuple[float | None, float]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.setdefault(agent_id, []).append(future)
        if self._committing is None or self._committing.done():
            self._committing = asyncio.create_task(self._commit_all())
        return await future

    async def _commit_all(self) -> None:
        while self._pending:
            gap = self._last_commit + self.min_gap - self.clock.monotonic()
            if gap > 0:
                await self.sleep(gap)
            self._last_commit = self.clock.monotonic()
            ids = list(self._pending)[:MAX_PER_COMMIT]
            batch = {agent_id: self._pending.pop(agent_id) for agent_id in ids}
            now = self.clock.time()
            try:
                previous = await self.storage.record_heartbeats(batch, now)
            except Exception as exc:  # e.g. storage full: every caller answers 503
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for agent_id, futures in batch.items():
                for future in futures:
                    if not future.done():  # its request may have gone meanwhile
                        future.set_result((previous.get(agent_id), now))
