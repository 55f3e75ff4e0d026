"""When Python's cyclic garbage collector runs in the control plane.

A control plane serving thousands of agents holds hundreds of thousands of live objects
(every parked long-poll is a chain of coroutines, a connection, a request). CPython's
full collection walks all of them - seconds at 5,000 agents on a small host - and with
the default thresholds it runs every few seconds, because long-polls live long enough to
be promoted to the oldest generation. Every pause stalls dispatch and heartbeats alike.

So: objects alive at start-up (modules, routes, config) are frozen out of every
collection; the young generations keep CPython's default thresholds, whose collections
are short (a larger young threshold makes each one a longer pause: at 5,000 agents,
5,000 allocations gave 40 ms young and 180 ms middle-generation pauses, the default
gives about 12 and 25); and full collections happen on a schedule, every
`FULL_EVERY_SECONDS`, instead of whenever the 25 % growth rule fires. Cyclic garbage
waits at most that long; the pause, when it comes, is the one a full collection always
costs.

Two signals show whether that holds in production, as metrics: every collection's pause
(`observe_pauses`), and how late the event loop runs a timer (`measure_lag_forever`).
They are what found the 5,000-agent bursts of docs/performance.md.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("fleetrun.collector")

YOUNG_THRESHOLD = 700  # allocations between gen-0 collections (CPython's default)
MIDDLE_THRESHOLD = 10  # gen-0 collections between gen-1 collections (the default)
NEVER = 2**31 - 1  # gen-1 collections before an automatic full one: never, on our scale
FULL_EVERY_SECONDS = 300.0


def tune() -> None:
    """Freeze what exists now and move full collections off the allocation counter."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, NEVER)


async def collect_forever(
    every: float = FULL_EVERY_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run a full collection every `every` seconds; log one that pauses noticeably."""
    while True:
        await sleep(every)
        started = time.perf_counter()
        found = gc.collect()
        took = time.perf_counter() - started
        if took > 0.1:
            log.info("full garbage collection: %.0f ms, %d objects freed", took * 1000, found)


def observe_pauses(observe: Callable[[int, float], None]) -> Callable[[], None]:
    """Call `observe(generation, seconds)` after each collection; returns the undo."""
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            observe(info["generation"], time.perf_counter() - started)

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)


LAG_EVERY_SECONDS = 0.5


async def measure_lag_forever(
    observe: Callable[[float], None],
    every: float = LAG_EVERY_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Sleep `every` seconds, again and again, and `observe` how much longer it took: the
    time the loop was busy elsewhere (or the process stopped) when the timer was due."""
    while True:
        started = monotonic()
        await sleep(every)
        observe(max(0.0, monotonic() - started - every))
