"""Dispatch: hand assigned launches to agents through their long-polls.

The storage is the source of truth (a run in STARTING with an agent and a lease is a
launch owed to that agent), so a launch survives a lost poll response or a control-plane
restart: it is offered on every poll until the agent reports it holds the lease.
"""

from __future__ import annotations

from control_plane.notify import Notifier
from control_plane.storage import Run, Storage
from protocol.messages import LaunchRun


def launch_message(run: Run) -> LaunchRun:
    assert run.lease is not None
    return LaunchRun(
        run_id=run.run_id,
        job=run.job,
        location=run.location,
        lease=run.lease,
        tags=run.tags,
        config=run.config,
    )


class Dispatcher:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._agents = Notifier()

    def run_assigned(self, run: Run) -> None:
        if run.agent_id is not None:
            self._agents.notify(run.agent_id)

    async def wait_for_launches(
        self, agent_id: str, held_leases: set[int], max_wait: float
    ) -> list[LaunchRun]:
        """Launches owed to the agent; waits up to `max_wait` s for one if there are none."""

        async def owed() -> list[LaunchRun]:
            runs = await self.storage.pending_launches(agent_id)
            return [launch_message(r) for r in runs if r.lease not in held_leases]

        return await self._agents.wait_for(agent_id, owed, max_wait) or []
