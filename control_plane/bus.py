"""Wake-ups that reach every control-plane replica: the one wake path.

Each replica keeps its waiters in memory (parked long-polls, run watchers, sleeping
daemon loops). A change made on one replica - a launch assigned, a run submitted, an
evaluation answered - must wake the waiter wherever it is. `WakeBus.publish` delivers a
(topic, key) at once in this process and, when the storage is shared (PostgreSQL),
sends it to the others as a NOTIFY, batched. A wake-up only says "look again": the
database stays the truth, so a lost one costs latency (the waiters' backstop timers),
never correctness; after the listening connection was lost every topic is woken.

Every wake-up in the control plane is a `publish` here, local and cross-replica alike;
the functions at the end say, once each, whom a kind of change concerns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from control_plane.model.runs import Run
from control_plane.storage.port import Database

log = logging.getLogger("fleetrun.bus")

QUEUE = "queue"  # the run queue may dispatch (a submit, a freed slot, an agent arriving)
POOLS = "pools"  # a pool slot was claimed or freed, or a pool's limit changed
MONITOR = "monitor"  # a deadline may have changed
RETRIES = "retries"  # a run failed
INSTIGATORS = "instigators"  # a schedule or sensor was started/stopped, or a location changed
AGENT = "agent"  # key: an agent id that is owed something (a launch, a stop, an evaluation)
RUN = "run"  # key: a run id whose events or status changed
RELOAD = "reload"  # key: an agent id an operator asked to reload its code locations
EVALUATION = "evaluation"  # key: "+id" opened, "~id" taken or answered, "-id" closed

Handler = Callable[[str | None], None]  # None: anything may have changed


class WakeBus:
    def __init__(self, storage: Database, replica_id: str) -> None:
        self.storage = storage
        self.replica_id = replica_id
        self._handlers: dict[str, list[Handler]] = {}
        self._outbox: list[str] = []
        self._pending = asyncio.Event()
        self.sent = self.received = 0

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._handlers.setdefault(topic, []).append(handler)

    def publish(self, topic: str, key: str | None = "") -> None:
        if key is None:
            return
        self._deliver(topic, key)
        if self.storage.shared:
            self._outbox.append(f"{self.replica_id} {topic} {key}")
            self._pending.set()

    def _deliver(self, topic: str, key: str | None) -> None:
        for handler in self._handlers.get(topic, ()):
            try:
                handler(key)
            except Exception:
                log.exception("wake-up handler for %s failed", topic)

    def _received(self, payload: str) -> None:
        origin, _, rest = payload.partition(" ")
        if origin == self.replica_id:
            return
        topic, _, key = rest.partition(" ")
        self.received += 1
        self._deliver(topic, key)

    def _reconnected(self) -> None:
        """Notifications sent while we were not listening are lost: wake everything."""
        for topic in list(self._handlers):
            self._deliver(topic, None)

    async def run_forever(self) -> None:
        if not self.storage.shared:
            return
        listener = asyncio.create_task(self.storage.listen(self._received, self._reconnected))
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                batch, self._outbox = list(dict.fromkeys(self._outbox)), []
                try:
                    await self.storage.notify(batch)
                    self.sent += len(batch)
                except Exception as exc:  # the other replicas' backstops will catch up
                    log.warning("could not send %d wake-ups to other replicas: %s", len(batch), exc)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def run_queued(bus: WakeBus, run: Run) -> None:
    """A run entered the queue (submitted, re-executed, retried, requested by a tick)."""
    bus.publish(QUEUE)
    bus.publish(RUN, run.run_id)


def run_assigned(bus: WakeBus, run: Run) -> None:
    """A run was given to an agent under a new lease: its poll, the monitor, watchers."""
    bus.publish(AGENT, run.agent_id)
    bus.publish(MONITOR)
    bus.publish(RUN, run.run_id)


def runs_changed(bus: WakeBus, runs: list[Run], agent_id: str | None = None) -> None:
    """Runs changed status (ended, canceled, resumed): their watchers and agents, and
    every loop a freed slot or a failure concerns."""
    for run in runs:
        bus.publish(RUN, run.run_id)
        bus.publish(AGENT, run.agent_id)
    bus.publish(AGENT, agent_id)
    bus.publish(QUEUE)
    bus.publish(POOLS)
    bus.publish(RETRIES)
    bus.publish(MONITOR)


def pools_changed(bus: WakeBus, limit: bool = False) -> None:
    """A step claimed a pool slot or gave one back: the grant pass looks again; a
    limit changed (`limit`): the run queue too, for runs waiting for a pool by run."""
    bus.publish(POOLS)
    if limit:
        bus.publish(QUEUE)


def slots_granted(bus: WakeBus, agent_ids: set[str | None], run_ids: set[str]) -> None:
    """Steps got pool slots: their agents' polls carry the grants, their watchers see
    the events."""
    for agent_id in agent_ids:
        bus.publish(AGENT, agent_id)
    for run_id in run_ids:
        bus.publish(RUN, run_id)


def instigators_changed(bus: WakeBus, registered_agent: str = "") -> None:
    """A schedule or sensor was started or stopped, or (`registered_agent`) an agent
    registered whose locations define none: it matters only if it hosted one before."""
    bus.publish(INSTIGATORS, registered_agent)


def reload_requested(bus: WakeBus, agent_id: str) -> None:
    """An operator asked an agent to reload its code: whichever replica holds its poll."""
    bus.publish(RELOAD, agent_id)
