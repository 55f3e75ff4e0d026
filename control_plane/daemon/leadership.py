"""Leader election for the daemon loops: each runs on exactly one replica at a time.

Every replica runs a `LeaderElector`. For each loop it holds (or tries to take) a lease
row in storage, renewed every third of `leader_lease_seconds`; the loop runs only while
the lease is held. A replica that dies stops renewing, and the first other replica to
ask after the lease expires starts the loop there. A replica that cannot renew - the
database unreachable, or the process frozen - stops its loops once its own monotonic
clock says the lease may have lapsed, before anyone else can have taken it over, and
each loop also asks `holds()` before every pass, so a replica waking from a freeze
does not act on a lease it lost meanwhile.

On SQLite there is one process, which always wins; the same code runs all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from control_plane.clock import Clock
from control_plane.daemon.health import DaemonHealth
from control_plane.storage.port import LeaderStore

log = logging.getLogger("fleetrun.leadership")

SAFETY = 0.8  # act only within this fraction of the lease after it was last renewed


def replica_id() -> str:
    """How this process names itself in the lease rows (readable, and unique)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class LeaderLoop:
    """One leader lease and the loops that run under it (the monitor and its stall watch
    share one), started together when it is gained and cancelled when it is lost."""

    name: str
    runs: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_gain: list[Callable[[], None]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    renewed_at: float | None = None  # monotonic time of the request that last renewed it


class LeaderElector:
    def __init__(
        self,
        storage: LeaderStore,
        clock: Clock,
        health: DaemonHealth,
        holder: str,
        lease_seconds: float,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.health = health
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.loops: dict[str, LeaderLoop] = {}
        self._wakeup = asyncio.Event()

    def add(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, None]],
        on_gain: Callable[[], None] | None = None,
    ) -> None:
        """Run `run` while this replica holds lease `name` (`on_gain` first, each time)."""
        loop = self.loops.setdefault(name, LeaderLoop(name))
        loop.runs.append(run)
        if on_gain is not None:
            loop.on_gain.append(on_gain)

    def holds(self, name: str) -> bool:
        """Does this replica surely hold the lease on `name` right now?"""
        loop = self.loops.get(name)
        if loop is None or loop.renewed_at is None:
            return False
        return self.clock.monotonic() - loop.renewed_at < self.lease_seconds * SAFETY

    def leading(self) -> list[str]:
        return sorted(n for n, loop in self.loops.items() if loop.tasks)

    async def elect_once(self) -> None:
        """Renew or take each lease, and start or stop each loop to match."""
        for loop in self.loops.values():
            asked_at = self.clock.monotonic()
            try:
                won = await self.storage.try_lead(
                    loop.name, self.holder, self.lease_seconds, self.clock.time()
                )
            except Exception as exc:  # unknown: keep running only while surely ours
                self.health.failed("leader-election", exc)
                won = None
            if won:
                loop.renewed_at = asked_at
            elif won is False:
                loop.renewed_at = None
            if self.holds(loop.name) and not loop.tasks:
                self._start(loop)
            elif not self.holds(loop.name) and loop.tasks:
                await self._stop(loop, "lost its lease" if won is False else "cannot renew")

    def _start(self, loop: LeaderLoop) -> None:
        log.info("this replica (%s) now runs the %s loop", self.holder, loop.name)
        for gained in loop.on_gain:
            gained()
        loop.tasks = [asyncio.create_task(run(), name=loop.name) for run in loop.runs]

    async def _stop(self, loop: LeaderLoop, why: str) -> None:
        log.warning("this replica (%s) stops the %s loop: %s", self.holder, loop.name, why)
        tasks, loop.tasks = loop.tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.health.standby(loop.name)

    async def run_forever(self) -> None:
        try:
            while True:
                self.health.beat("leader-election")
                with self.health.timed("leader-election"):
                    await self.elect_once()
                for loop in self.loops.values():  # a crashed loop is restarted next round
                    if any(task.done() for task in loop.tasks):
                        for task in loop.tasks:
                            if task.done() and not task.cancelled() and task.exception():
                                self.health.failed(loop.name, task.exception())  # type: ignore[arg-type]
                        await self._stop(loop, "one of its tasks ended")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.lease_seconds / 3)
                self._wakeup.clear()
        finally:
            await self.release_all()

    async def release_all(self) -> None:
        """On shutdown: stop the loops and hand the leases over at once."""
        for loop in self.loops.values():
            if loop.tasks:
                await self._stop(loop, "shutting down")
            if loop.renewed_at is not None:
                loop.renewed_at = None
                with contextlib.suppress(Exception):
                    await self.storage.release_lead(loop.name, self.holder)
