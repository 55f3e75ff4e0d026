"""Registering with the control plane: who this agent is, what it hosts, which runs it
still holds; and again under a new token when token_file changes."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from agent.client import (
    ControlPlaneError,
    ControlPlaneUnreachable,
    Misconfigured,
    RetryDelays,
    TokenRefused,
)
from agent.errors import FatalAgentError
from agent.heartbeat import extend_deadlines
from agent.reloading import location_infos
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState
from protocol import FLEETRUN_VERSION
from protocol.messages import Register, Registered

log = logging.getLogger("fleetrun.agent")

# What this agent can do beyond protocol 1: the control plane assigns a run only to an
# agent with every capability the run needs. Its run launcher is one more:
# "launcher:<run_launcher>" (a run with a fleetrun/image tag needs "launcher:docker").
# "step_tasks": it runs fleet runs and the step tasks of any fleet run (protocol 5).
CAPABILITIES = ["reuse_outputs", "stop_orders", "drain", "step_tasks"]


def register_message(agent: AgentState) -> Register:
    config = agent.config
    return Register(
        name=config.name,
        hostname=socket.gethostname(),
        version=FLEETRUN_VERSION,
        queues=config.queues,
        max_concurrent_runs=config.max_concurrent_runs,
        code_locations=location_infos(agent),
        runs=agent.run_states(),
        capabilities=[*CAPABILITIES, f"launcher:{config.run_launcher}"],
        labels=dict(config.labels),
        resources=config.resources.offered(),
    )


async def register(agent: AgentState) -> None:
    """Register, retrying while the control plane is unreachable. A refused token is
    fatal at start-up (a wrong token_file), retried later (it may be rotated)."""
    delays = RetryDelays()
    while True:
        sent = time.monotonic()
        try:
            reply = await agent.client.call(
                "register", register_message(agent), Registered, REQUEST_TIMEOUT_SECONDS
            )
            break
        except TokenRefused as exc:
            if agent.agent_id is None:
                raise FatalAgentError(f"the control plane refused the token: {exc}") from None
            agent.contact.failed("register", exc)
        except Misconfigured as exc:
            if agent.agent_id is None:
                raise FatalAgentError(f"cannot reach the control plane: {exc}") from None
            agent.contact.failed("register", exc)
        except ControlPlaneUnreachable as exc:
            agent.contact.failed("register", exc)
        except ControlPlaneError as exc:
            raise FatalAgentError(f"the control plane refused registration: {exc}") from None
        await asyncio.sleep(delays.next_delay())
    registered(agent, reply)
    extend_deadlines(agent, sent)  # the registration counts as a heartbeat


async def register_with_new_token(agent: AgentState) -> None:
    """The client found a new token in token_file: register under it, with the runs
    held (so they go on), before the call that hit the 401 is retried."""
    reply = await agent.client.call(
        "register", register_message(agent), Registered, REQUEST_TIMEOUT_SECONDS, rotate=False
    )
    registered(agent, reply)


def registered(agent: AgentState, reply: Registered) -> None:
    """The control plane's timings for this agent, and its id."""
    agent.contact_made()
    agent.agent_id = reply.agent_id
    agent.poll_timeout = reply.poll_timeout_seconds
    agent.heartbeat_timeout = reply.heartbeat_timeout_seconds
    agent.heartbeat_interval = min(
        agent.config.heartbeat_interval_seconds, reply.heartbeat_interval_seconds
    )
    log.info(
        "registered as %s (agent id %s) at %s",
        agent.config.name,
        agent.agent_id,
        agent.client.base_url,
    )
