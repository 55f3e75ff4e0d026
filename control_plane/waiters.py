"""Waiting by key: how a long-poll learns, without re-reading in a loop, that work exists.

The bus delivers a wake-up for a key (an agent id, a run id); the request parked on that
key looks again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class KeyedWaiters:
    """Futures keyed by a string (an agent id, a run id), resolved by `notify(key)`."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def notify(self, key: str) -> None:
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        for key in list(self._waiters):
            self.notify(key)

    def wake(self, key: str | None) -> None:
        """A bus wake-up: for one key, or for all (None: anything may have changed)."""
        if key is None:
            self.notify_all()
        else:
            self.notify(key)

    async def wait_for(
        self, key: str, check: Callable[[], Awaitable[T | None]], max_wait: float
    ) -> T | None:
        """Return `check()`'s first truthy result, re-checking only after `notify(key)`.

        Subscribing before each check means a notification that lands between the check
        and the wait is never lost. Returns None when `max_wait` seconds pass first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(key, set())
            waiters.add(fut)
            try:
                result = await check()
                if result:
                    return result
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return None
            finally:
                waiters.discard(fut)
                if not waiters and self._waiters.get(key) is waiters:
                    del self._waiters[key]
