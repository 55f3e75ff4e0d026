"""The long-poll: what the control plane has for this agent (launches, stop orders,
evaluations, pool slots granted to its runs' steps), each carried out as it arrives.

A reply is read launch by launch (`decode_poll_reply`): one launch this agent cannot
read fails its own run and the rest are carried out. Only a refusal no retry can cure
(another protocol version, another agent's token) ends the agent; anything else is
retried with backoff."""

from __future__ import annotations

import asyncio
import logging

from agent.client import FATAL_CODES, ControlPlaneError, ControlPlaneUnreachable, RetryDelays
from agent.errors import FatalAgentError
from agent.evaluations import start_evaluation
from agent.registration import register
from agent.reloading import request_reload
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState
from agent.supervision import refuse_launch, start_run
from agent.worker.slots import slot_key, step_result_entry
from protocol.codec import ProtocolError, decode_poll_reply
from protocol.messages import Poll, PollReply

log = logging.getLogger("fleetrun.agent")


async def poll_forever(agent: AgentState) -> None:
    delays = RetryDelays()
    while True:
        assert agent.agent_id is not None
        poll = Poll(
            agent_id=agent.agent_id,
            held_leases=list(agent.runs),
            stopping_leases=[lease for lease, a in agent.runs.items() if a.worker.stop_order],
            held_grants=agent.held_grants(),
            held_results=agent.held_results(),
        )
        try:
            body = await agent.client.call_raw(
                "poll", poll, agent.poll_timeout + REQUEST_TIMEOUT_SECONDS
            )
            reply, unreadable = decode_poll_reply(body)
        except (ControlPlaneUnreachable, ProtocolError) as exc:
            agent.contact.failed("poll", exc)
            await asyncio.sleep(delays.next_delay())
            continue
        except ControlPlaneError as exc:
            if exc.code in FATAL_CODES:
                raise FatalAgentError(f"the control plane refused a poll: {exc}") from None
            if exc.code == "unknown_agent":
                log.warning("the control plane does not know this agent; registering again")
                await register(agent)
                continue
            log.warning("the control plane refused a poll (%s); retrying", exc)
            await asyncio.sleep(delays.next_delay())
            continue
        delays.reset()
        agent.contact_made()
        carry_out(agent, reply)
        for bad in unreadable:
            refuse_launch(agent, bad)


def carry_out(agent: AgentState, reply: PollReply) -> None:
    """Start what is launched and evaluated, stop what is ordered stopped."""
    for launch in reply.launches:
        if launch.lease not in agent.runs:
            start_run(agent, launch)
    for request in reply.evaluations:
        start_evaluation(agent, request)
    granted: set[int] = set()
    for grant in reply.grants:
        active = agent.runs.get(grant.lease)
        if active is not None and active.worker.launch.run_id == grant.run_id:
            active.grants[grant.claim_id] = slot_key(grant.step, grant.attempt)
            granted.add(grant.lease)
    for lease in granted:
        active = agent.runs[lease]
        active.worker.channel.grant_slots(list(active.grants.values()))
    told: set[int] = set()
    for result in reply.step_results:
        active = agent.runs.get(result.lease)
        if active is not None and active.worker.launch.run_id == result.run_id:
            active.results[result.task_id] = step_result_entry(result)
            told.add(result.lease)
    for lease in told:
        active = agent.runs[lease]
        active.worker.channel.deliver_step_results(list(active.results.values()))
    if reply.reload is not None:
        names = request_reload(agent, reply.reload.locations, "asked by the control plane")
        log.info("reloading code location(s) %s, as the control plane asks", ", ".join(names))
    for order in reply.stops:
        active = agent.runs.get(order.lease)
        if active is not None:
            log.info(
                "run %s: stopping its worker (%s)",
                order.run_id,
                order.reason,
                extra={"run_id": order.run_id},
            )
            active.worker.stop(order)
