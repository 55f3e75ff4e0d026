"""The one driver of every daemon loop.

A daemon loop is a pass, `run_pass(context, now) -> next time or None`: it does what is
due now and says when it next wants to run. Everything around the passes is here, once:

- the loop runs only on the replica that holds its leader lease (`leadership.py`
  starts and cancels it), and asks before every pass whether it still surely does;
- it wakes when a bus topic it listens to is published (a submission, a verdict, an
  agent arriving; from this replica or another), at the time its last pass asked for,
  or after `backstop` seconds, whichever comes first: the backstop catches only what
  no wake-up announced;
- each pass beats the loop's health (`/readyz`) and is timed for the metrics; a pass
  that raises is logged and counted, and the next one comes after a growing pause;
- the tasks a pass starts (a tick evaluated on an agent) live in the loop's `TaskSet`
  and are cancelled with the loop, when leadership is lost or the process stops.

Tests drive a loop by calling its pass with a context and a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from control_plane.bus import WakeBus
from control_plane.clock import Clock
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.leadership import LeaderElector

log = logging.getLogger("fleetrun.daemon")

C = TypeVar("C")
ERROR_PAUSE_SECONDS = 0.5  # after a failed pass; doubled per failure in a row, up to backstop
EARLY = 0.01  # sleep a little past the asked-for time, so the pass does not find it not due


class TaskSet:
    """The tasks a loop's passes started, at most one per key. As each ends, `on_done`
    runs (the loop's next pass may then be due) and a failure goes to `on_error`."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}
        self.on_done: Callable[[], None] = lambda: None
        self.on_error: Callable[[BaseException], None] = lambda exc: None

    def running(self, key: Hashable) -> bool:
        return key in self._tasks

    def start(self, key: Hashable, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` unless a task under `key` still runs (then `work` is dropped)."""
        if key in self._tasks:
            work.close()
            return
        task = asyncio.create_task(work, name=f"daemon-task-{key}")
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._ended(key, done))

    def _ended(self, key: Hashable, task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            self.on_error(task.exception())  # type: ignore[arg-type]
        self.on_done()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass(frozen=True)
class DaemonLoop(Generic[C]):
    """One loop: its pass, the state it works on, and when it wakes."""

    name: str  # as /readyz and the metrics show it
    run_pass: Callable[[C, float], Awaitable[float | None]]
    context: C
    wake_on: tuple[str, ...] = ()  # bus topics that wake it
    wake_if: Callable[[str | None], bool] = lambda key: True  # which keys of them do
    backstop: float = 5.0  # the longest it sleeps
    # After a pass, wake-ups within this many seconds wait for it: a burst of changes
    # makes one pass, not one each (for loops whose deadlines are seconds away anyway)
    settle: float = 0.0
    lease: str = ""  # the leader lease it runs under; default: its name
    on_gain: Callable[[], None] | None = None  # this replica starts running it
    tasks: TaskSet = field(default_factory=TaskSet)


class Driver:
    """Runs daemon loops under leader leases, waking them through the bus."""

    def __init__(
        self, bus: WakeBus, clock: Clock, health: DaemonHealth, elector: LeaderElector
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.health = health
        self.elector = elector

    def add(self, loop: DaemonLoop[Any]) -> None:
        wake = asyncio.Event()
        for topic in loop.wake_on:
            self.bus.subscribe(topic, lambda key: wake.set() if loop.wake_if(key) else None)
        loop.tasks.on_done = wake.set
        loop.tasks.on_error = lambda exc: self.health.failed(loop.name, exc)
        self.elector.add(loop.lease or loop.name, lambda: self._drive(loop, wake), loop.on_gain)

    async def _drive(self, loop: DaemonLoop[Any], wake: asyncio.Event) -> None:
        lease = loop.lease or loop.name
        failures = 0
        try:
            while True:
                self.health.beat(loop.name)
                wake.clear()
                next_at: float | None = None
                if self.elector.holds(lease):
                    try:
                        with self.health.timed(loop.name):
                            next_at = await loop.run_pass(loop.context, self.clock.time())
                        failures = 0
                    except Exception as exc:
                        failures += 1
                        self.health.failed(loop.name, exc)
                        pause = min(loop.backstop, ERROR_PAUSE_SECONDS * 2 ** (failures - 1))
                        next_at = self.clock.time() + pause
                sleep = loop.backstop
                if next_at is not None:
                    sleep = min(sleep, max(0.0, next_at - self.clock.time()) + EARLY)
                if loop.settle:
                    settle = min(loop.settle, sleep)
                    await asyncio.sleep(settle)
                    sleep -= settle
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), sleep)
        finally:
            await loop.tasks.cancel_all()
            self.health.standby(loop.name)
