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
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState
from protocol.messages import Heartbeat, HeartbeatReply
from protocol.tags import ON_LOST_CONTACT_TAG

log = logging.getLogger("fleetrun.agent")

HEARTBEAT_SPREAD = 0.2
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
        try:
            await agent.client.call(
                "heartbeat",
                Heartbeat(agent_id=agent.agent_id, runs=agent.run_states()),
                HeartbeatReply,
                min(REQUEST_TIMEOUT_SECONDS, agent.heartbeat_timeout / 3),
            )
            agent.contact_made()
        except ControlPlaneUnreachable as exc:
            agent.contact.failed("heartbeat", exc)
        except ControlPlaneError as exc:
            log.warning("heartbeat refused: %s", exc)
        await asyncio.sleep(heartbeat_pause(agent.heartbeat_interval))


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
