"""The run coordinator: which queued run goes to which agent, decided the moment anything
changes (a submit, a finished run, an agent arriving) rather than on a polling tick.

The coordinator only decides and records (`assign_run` gives the run a new lease); the
dispatcher (dispatch.py) hands the launch to the agent's long-poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from control_plane.clock import Clock
from control_plane.config import RunCoordinatorConfig
from control_plane.storage import Agent, NewRun, Run, Storage

log = logging.getLogger("fleetrun.coordinator")

DISPATCH_BATCH = 1000


def agent_is_live(agent: Agent, now: float, heartbeat_timeout: float) -> bool:
    return agent.status == "ONLINE" and now - agent.last_heartbeat <= heartbeat_timeout


class RunCoordinator:
    def __init__(
        self,
        storage: Storage,
        config: RunCoordinatorConfig,
        clock: Clock,
        heartbeat_timeout: float,
        on_assigned: Callable[[Run], None],
    ) -> None:
        self.storage = storage
        self.config = config
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.on_assigned = on_assigned
        self._wakeup = asyncio.Event()

    async def submit(self, new_run: NewRun) -> Run:
        run = await self.storage.create_run(new_run, self.clock.time())
        self.wake()
        return run

    def wake(self) -> None:
        """Ask for a dispatch pass soon; many calls before it runs cost one pass."""
        self._wakeup.set()

    async def run_forever(self, backstop_seconds: float = 5.0) -> None:
        """Dispatch whenever woken; the backstop covers changes no wake-up announced."""
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), backstop_seconds)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed; retrying on the next wake-up")

    def _global_limit(self) -> int | None:
        if self.config.kind == "default" or self.config.max_concurrent_runs == -1:
            return None
        return self.config.max_concurrent_runs

    async def dispatch_once(self) -> list[Run]:
        """Assign as many queued runs as limits and free agent slots allow."""
        queued = await self.storage.queued_runs(DISPATCH_BATCH)
        if not queued:
            return []
        now = self.clock.time()
        agents = [
            a
            for a in await self.storage.list_agents()
            if agent_is_live(a, now, self.heartbeat_timeout)
        ]
        hosted: dict[str, set[str]] = {}
        for loc in await self.storage.list_code_locations():
            if loc.info.error is None:
                hosted.setdefault(loc.agent_id, set()).add(loc.info.name)
        active = await self.storage.active_runs()
        used = Counter(r.agent_id for r in active)
        total_active = len(active)
        limit = self._global_limit()
        assigned: list[Run] = []
        for run in queued:
            if limit is not None and total_active >= limit:
                break
            candidates = [
                a
                for a in agents
                if run.queue in a.queues
                and run.location in hosted.get(a.agent_id, ())
                and used[a.agent_id] < a.max_concurrent_runs
            ]
            if not candidates:
                continue
            agent = max(candidates, key=lambda a: a.max_concurrent_runs - used[a.agent_id])
            launched = await self.storage.assign_run(run.run_id, agent.agent_id, now)
            if launched is None:
                continue
            used[agent.agent_id] += 1
            total_active += 1
            assigned.append(launched)
            self.on_assigned(launched)
        return assigned
