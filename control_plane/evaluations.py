"""Evaluations of schedules and sensors, handed to agents through their long-polls.

The control plane never imports user code: a tick becomes an `Evaluate` request that an
agent hosting the location picks up on its next poll (woken at once), runs in a worker
process and answers with an `EvaluationResult`. This broker keeps the requests in
flight and matches the answers; a request no agent takes, or one whose agent does not
answer in time, ends with an error saying which.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.messages import Evaluate, EvaluationResult


@dataclass
class _Pending:
    request: Evaluate
    result: asyncio.Future[EvaluationResult]
    agent: str | None = None
    taken: asyncio.Event = field(default_factory=asyncio.Event)


class EvaluationBroker:
    def __init__(self, wake_agent: Callable[[str], None]) -> None:
        self.wake_agent = wake_agent
        self._pending: dict[str, _Pending] = {}

    def new_request(self, location: str, kind: str, name: str, **fields: object) -> Evaluate:
        return Evaluate(eval_id=uuid.uuid4().hex, location=location, kind=kind, name=name,
                        **fields)  # type: ignore[arg-type]  # fmt: skip

    async def evaluate(
        self, request: Evaluate, hosts: set[str], wait_for_agent: float
    ) -> EvaluationResult:
        """The agent's result, or an error result: no agent took it within
        `wait_for_agent` s, or the one that did gave no answer within the timeout.
        `hosts` are woken at once; any agent hosting the location may take it."""

        def failed(error: str) -> EvaluationResult:
            return EvaluationResult(eval_id=request.eval_id, error=error, cursor=request.cursor)

        pending = _Pending(request, asyncio.get_running_loop().create_future())
        self._pending[request.eval_id] = pending
        try:
            for agent_id in hosts:
                self.wake_agent(agent_id)
            try:
                async with asyncio.timeout(wait_for_agent):
                    await pending.taken.wait()
            except TimeoutError:
                return failed(f"no online agent hosting location {request.location} took the "
                              f"evaluation within {wait_for_agent:g} s")  # fmt: skip
            try:
                async with asyncio.timeout(request.timeout_seconds + 10):
                    return await pending.result
            except TimeoutError:
                return failed(f"agent {pending.agent} gave no result within "
                              f"{request.timeout_seconds:g} s")  # fmt: skip
        finally:
            self._pending.pop(request.eval_id, None)

    def waiting(self) -> bool:
        return any(p.agent is None for p in self._pending.values())

    def take_for(self, agent_id: str, locations: set[str]) -> list[Evaluate]:
        """Requests for locations this agent hosts that nobody has taken yet (called from
        its poll: an agent that polls is alive)."""
        taken = []
        for pending in self._pending.values():
            if pending.agent is None and pending.request.location in locations:
                pending.agent = agent_id
                pending.taken.set()
                taken.append(pending.request)
        return taken

    def complete(self, result: EvaluationResult) -> bool:
        pending = self._pending.get(result.eval_id)
        if pending is None or pending.agent != result.agent_id or pending.result.done():
            return False
        pending.result.set_result(result)
        return True
