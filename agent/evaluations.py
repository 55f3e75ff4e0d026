"""Schedule ticks and sensors the control plane asks this agent to evaluate: each in a
short-lived worker (user code never runs in the agent), its result sent back."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from agent.client import ControlPlaneError, ControlPlaneUnreachable, RetryDelays
from agent.launchers import evaluate_in_worker
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState
from protocol.messages import Evaluate, EvaluateSpec, EvaluationAck, EvaluationResult
from protocol.wire import delivery_problem

log = logging.getLogger("fleetrun.agent")


def start_evaluation(agent: AgentState, request: Evaluate) -> None:
    """Evaluate `request` in a task of its own (once per eval id)."""
    if request.eval_id in agent.evaluations:
        return
    task = asyncio.create_task(evaluate(agent, request), name=f"evaluation-{request.eval_id}")
    agent.evaluations[request.eval_id] = task
    task.add_done_callback(lambda _: agent.evaluations.pop(request.eval_id, None))


async def evaluate(agent: AgentState, request: Evaluate) -> None:
    """Evaluate a schedule tick or sensor in a worker; send the result back (one that
    could not be sent is replaced by an error saying why)."""
    assert agent.agent_id is not None
    served = agent.code.get(request.location)
    if served is None or served.current is None:
        error = f"agent {agent.config.name} does not host location {request.location!r}"
        if served is not None:
            error = f"code location {request.location!r} has no version that loads: "
            error += served.info.error or ""
        result = EvaluationResult(eval_id=request.eval_id, error=error)
    else:  # the current version: a reload switches schedules and sensors at once
        loc = served.current
        spec = EvaluateSpec(evaluate=request, location=loc.spec)
        result = await evaluate_in_worker(agent.launcher, loc, spec)
    result = replace(result, agent_id=agent.agent_id)
    if (problem := delivery_problem(result)) is not None:
        result = EvaluationResult(
            eval_id=request.eval_id,
            agent_id=agent.agent_id,
            cursor=request.cursor,
            error=f"the {request.kind}'s result cannot be sent: {problem}",
        )
    delays = RetryDelays()
    deadline = time.monotonic() + request.timeout_seconds
    while True:
        try:
            await agent.client.call("evaluation", result, EvaluationAck, REQUEST_TIMEOUT_SECONDS)
            return
        except ControlPlaneUnreachable as exc:
            agent.contact.failed("evaluation", exc)
        except ControlPlaneError as exc:
            log.warning("%s %s: result refused: %s", request.kind, request.name, exc)
            return
        if time.monotonic() > deadline:
            return  # the control plane times the tick out and tries again
        await asyncio.sleep(delays.next_delay())
