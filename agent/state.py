"""What the agent's activities share: who it is, its connection, its runs and its spool.

Each activity (registration, polling, heartbeat, run supervision, evaluations) is a
module of functions over one `AgentState`; `lifecycle.py` starts and stops them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from agent.client import ContactLog, ControlPlaneClient
from agent.codeversions import LocationVersion
from agent.config import AgentConfig, CodeLocationConfig
from agent.containers import DockerLauncher
from agent.launchers import LaunchedRun, RunLauncher, make_launcher
from agent.outbox import RunOutbox
from agent.spool import Spool
from agent.tracking import Tracking
from protocol.events import AGENT_LOST
from protocol.messages import CodeLocationInfo, EventAck, EventBatch, RunState, StopRun

log = logging.getLogger("fleetrun.agent")

REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass
class ActiveRun:
    """One run attempt this agent holds."""

    worker: LaunchedRun
    outbox: RunOutbox
    task: asyncio.Task[None]  # supervises the attempt until its records are delivered
    worker_exited: asyncio.Future[None]
    grants: dict[int, str] = field(default_factory=dict)  # pool slots: claim id -> slot key
    # Step tasks' results for its worker (the fleet executor): task id -> the result
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def stop_as_agent_lost(self, lease: int, reason: str, grace: float) -> None:
        """Stop the worker on the agent's own account (out of contact, shutting down):
        the run fails as agent_lost, with `reason`."""
        run_id = self.worker.launch.run_id
        log.warning("run %s: stopping its worker (%s)", run_id, reason, extra={"run_id": run_id})
        self.worker.stop(StopRun(run_id, lease, False, reason, grace, AGENT_LOST))


@dataclass
class ServedLocation:
    """One code location as this agent serves it (agent/reloading.py): the version new
    runs, schedules and sensors use, and what the control plane is told of it."""

    config: CodeLocationConfig
    info: CodeLocationInfo
    current: LocationVersion | None = None


class AgentState:
    def __init__(
        self, config: AgentConfig, client: ControlPlaneClient, tracking: Tracking | None = None
    ) -> None:
        self.config = config
        self.client = client
        self.code: dict[str, ServedLocation] = {
            loc.name: ServedLocation(loc, CodeLocationInfo(name=loc.name, error="not loaded yet"))
            for loc in config.code_locations
        }
        self.reloads: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (location, why)
        self.catalog_changed = asyncio.Event()  # the control plane is owed an update
        self.agent_id: str | None = None  # known once registered
        # Set by the control plane at registration (these are its defaults).
        self.poll_timeout = 25.0
        self.heartbeat_interval = config.heartbeat_interval_seconds
        self.heartbeat_timeout = 30.0
        self.last_contact = time.monotonic()  # of the last reply to a poll or heartbeat
        # When the last heartbeat (or registration) the control plane stored was sent:
        # the workers' lease deadlines count from there (heartbeat.extend_deadlines).
        self.lease_base: float | None = None
        self.contact = ContactLog(log)
        self.runs: dict[int, ActiveRun] = {}  # by lease
        self.evaluations: dict[str, asyncio.Task[None]] = {}  # by eval id
        args = (config.code_locations, config.output_store, tracking, config.docker, config.name)
        self.launcher: RunLauncher = (
            DockerLauncher(*args)
            if config.run_launcher == "docker"
            else make_launcher(config.run_launcher, *args)
        )
        self.spool = Spool(
            os.path.join(config.state_dir, "spool.db"),
            config.spool_max_bytes,
            config.spool_max_age_seconds,
        )

    def held_results(self) -> list[int]:
        """The step results passed to this agent's workers (task ids)."""
        return [task for active in self.runs.values() for task in active.results]

    def held_grants(self) -> list[int]:
        """The pool-slot grants passed to this agent's workers (claim ids)."""
        return [claim for active in self.runs.values() for claim in active.grants]

    def run_states(self) -> list[RunState]:
        return [
            RunState(run_id=a.worker.launch.run_id, lease=lease, state=a.worker.state)
            for lease, a in self.runs.items()
        ]

    def contact_made(self) -> None:
        """A poll or heartbeat was answered."""
        self.contact.succeeded()
        self.last_contact = time.monotonic()

    async def send_records(self, batch: EventBatch) -> EventAck:
        return await self.client.call("events", batch, EventAck, REQUEST_TIMEOUT_SECONDS)
