"""Heartbeats, and what the agent does on its own when they stop getting through.

The heartbeat tells the control plane this agent (and each run it holds) is alive. The
contact watch beside it stops runs tagged `fleetrun/on_lost_contact = stop` at half the
heartbeat timeout of silence, on its own timer (no request in flight can delay it)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from agent.client import ControlPlaneError, ControlPlaneUnreachable
from agent.launchers import LaunchedRun
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState
from protocol.messages import Heartbeat, HeartbeatReply
from protocol.tags import ON_LOST_CONTACT_TAG

log = logging.getLogger("fleetrun.agent")

HEARTBEAT_SPREAD = 0.2
STOP_GRACE_SECONDS = 10.0  # at most, between a worker's SIGTERM and SIGKILL at its deadline
CONTACT_RECHECK_SECONDS = 0.5


def heartbeat_pause(interval: float, spread: Callable[[], float] = random.random) -> float:
    """The pause before the next heartbeat: the interval less a random part of up to
    `HEARTBEAT_SPREAD` of it. Agents answered together (one group commit answers many)
    would otherwise heartbeat together forever; never longer than the interval, so the
    control plane's dead-agent margin is unchanged."""
    return interval * (1 - HEARTBEAT_SPREAD * spread())


async def heartbeat_forever(agent: AgentState) -> None:
    while True:
        assert agent.agent_id is not None
        sent = time.monotonic()
        try:
            await agent.client.call(
                "heartbeat",
                Heartbeat(agent_id=agent.agent_id, runs=agent.run_states()),
                HeartbeatReply,
                min(REQUEST_TIMEOUT_SECONDS, agent.heartbeat_timeout / 3),
            )
            agent.contact_made()
            extend_deadlines(agent, sent)
        except ControlPlaneUnreachable as exc:
            agent.contact.failed("heartbeat", exc)
        except ControlPlaneError as exc:
            log.warning("heartbeat refused: %s", exc)
        await asyncio.sleep(heartbeat_pause(agent.heartbeat_interval))


def extend_deadlines(agent: AgentState, sent: float) -> None:
    """The control plane stored a heartbeat (or registration) sent at `sent`: it gives
    none of this agent's runs to another attempt before `sent` plus the heartbeat
    timeout. Each worker's deadline moves to that, less the margin (agent/worker/lease.py)."""
    agent.lease_base = max(agent.lease_base or sent, sent)
    for active in agent.runs.values():
        extend_deadline(agent, active.worker)


def extend_deadline(agent: AgentState, worker: LaunchedRun) -> None:
    """Write `worker`'s lease deadline, unless its run asked to keep going whatever
    happens (`fleetrun/on_lost_contact = continue`) or no heartbeat was answered yet."""
    if agent.lease_base is None or worker.launch.tags.get(ON_LOST_CONTACT_TAG) == "continue":
        return
    margin, grace = lease_margins(agent.heartbeat_timeout, agent.config.lease_margin_seconds)
    worker.channel.set_deadline(agent.lease_base + agent.heartbeat_timeout - margin, grace)


def lease_margins(timeout: float, margin: float) -> tuple[float, float]:
    """The margin between a worker's deadline and the control plane's verdict, and the
    grace between its SIGTERM and its SIGKILL: each at most a tenth of the heartbeat
    timeout, so that a heartbeat every sixth of it keeps the deadline well ahead."""
    return min(margin, timeout / 10), min(STOP_GRACE_SECONDS, timeout / 10)


async def watch_contact(agent: AgentState) -> None:
    """Runs tagged `fleetrun/on_lost_contact = stop` end before the server's verdict.

    The control plane fails (and may retry) an agent's runs after a full heartbeat
    timeout; these are stopped at half of it, on this task's own timer, so that no
    request in flight (a heartbeat may wait a third of the timeout for its answer)
    delays the stop. Their workers get a quarter of the timeout to clean up, so an old
    attempt is gone before a new one can start, unless this agent is frozen.
    """
    while True:
        limit = agent.heartbeat_timeout / 2
        silent = time.monotonic() - agent.last_contact
        if silent > limit:
            stop_runs_out_of_contact(agent, silent)
            await asyncio.sleep(CONTACT_RECHECK_SECONDS)
        else:
            await asyncio.sleep(limit - silent + 0.01)


def stop_runs_out_of_contact(agent: AgentState, silent: float) -> None:
    for lease, active in agent.runs.items():
        launch = active.worker.launch
        if launch.tags.get(ON_LOST_CONTACT_TAG) == "stop" and active.worker.stop_order is None:
            reason = f"no contact with the control plane for {silent:.1f} s"
            active.stop_as_agent_lost(lease, reason, agent.heartbeat_timeout / 4)
