"""The dispatcher's long-poll holds (control_plane/fleet/dispatch.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from control_plane.bus import WakeBus
from control_plane.clock import SystemClock
from control_plane.fleet.dispatch import Dispatcher
from control_plane.metrics import Metrics
from control_plane.storage import Storage
from control_plane.waiters import KeyedWaiters
from protocol.messages import CodeLocationInfo, PollReply

T = TypeVar("T")


class RecordingWaiters(KeyedWaiters):
    """The real waiters, noting how long each poll was allowed to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.holds: list[float] = []

    async def wait_for(
        self, key: str, check: Callable[[], Awaitable[T | None]], max_wait: float
    ) -> T | None:
        self.holds.append(max_wait)
        return await super().wait_for(key, check, max_wait)


async def test_idle_polls_are_held_for_the_timeout_less_a_random_part_of_a_fifth(
    storage: Storage,
) -> None:
    agent = await storage.register_agent(
        "a", "h", "0", ["default"], 1, [CodeLocationInfo(name="loc")], now=1.0
    )
    draws = iter([0.0, 0.5, 0.999])
    dispatcher = Dispatcher(
        storage,
        5.0,
        SystemClock(),
        WakeBus(storage, "replica"),
        Metrics(),
        spread=lambda: next(draws),
    )
    dispatcher.agents = notifier = RecordingWaiters()
    for _ in range(3):
        reply = await dispatcher.wait_for_commands(agent.agent_id, set(), set(), 0.05)
        assert reply == PollReply()  # nothing owed: an empty answer once the hold ends
    assert notifier.holds == [0.05, 0.05 * 0.9, 0.05 * (1 - 0.2 * 0.999)]
    assert all(0.05 * 0.8 <= hold <= 0.05 for hold in notifier.holds)
