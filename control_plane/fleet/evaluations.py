"""Evaluations of schedules and sensors, handed to agents through their long-polls.

The control plane never imports user code: a tick becomes an `Evaluate` request that an
agent hosting the location picks up on its next poll (woken at once), runs in a worker
process and answers with an `EvaluationResult`. Requests live in storage, so the
replica that an agent polls can hand it a request that a daemon loop on another replica
made, and take its answer; wake-ups (bus.py) tell the waiting side to look again. A
request no agent takes, or one whose agent does not answer in time, ends with an error
saying which.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from control_plane.bus import AGENT, EVALUATION
from control_plane.clock import Clock
from control_plane.storage.port import EvaluationStore
from control_plane.waiters import KeyedWaiters
from protocol.messages import Evaluate, EvaluationResult


class EvaluationBroker:
    def __init__(
        self, storage: EvaluationStore, clock: Clock, publish: Callable[[str, str | None], None]
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.publish = publish
        self._changed = KeyedWaiters()  # keyed by eval id
        self._open: set[str] = set()  # requests announced and not yet closed, any replica
        self._unsure = False  # wake-ups may have been missed: ask storage

    def new_request(self, location: str, kind: str, name: str, **fields: object) -> Evaluate:
        return Evaluate(eval_id=uuid.uuid4().hex, location=location, kind=kind, name=name, **fields)  # type: ignore[arg-type]

    def on_wake(self, key: str | None) -> None:
        """An EVALUATION wake-up, from this replica or another."""
        if key is None:
            self._unsure = True
            self._changed.notify_all()
            return
        change, eval_id = key[:1], key[1:]
        if change == "+":
            self._open.add(eval_id)
        elif change == "-":
            self._open.discard(eval_id)
        self._changed.notify(eval_id)

    async def evaluate(
        self, request: Evaluate, hosts: set[str], wait_for_agent: float
    ) -> EvaluationResult:
        """The agent's result, or an error result: no agent took it within
        `wait_for_agent` s, or the one that did gave no answer within the timeout.
        `hosts` are woken at once; any agent hosting the location may take it."""

        def failed(error: str) -> EvaluationResult:
            return EvaluationResult(eval_id=request.eval_id, error=error, cursor=request.cursor)

        eval_id = request.eval_id

        async def taken() -> str | None:
            state = await self.storage.evaluation_state(eval_id)
            return state[0] if state is not None else None

        async def answered() -> EvaluationResult | None:
            state = await self.storage.evaluation_state(eval_id)
            return state[1] if state is not None else None

        await self.storage.create_evaluation(request, self.clock.time())
        self.publish(EVALUATION, f"+{eval_id}")
        try:
            for agent_id in hosts:
                self.publish(AGENT, agent_id)
            agent = await self._changed.wait_for(eval_id, taken, wait_for_agent)
            if agent is None:
                return failed(
                    f"no online agent hosting location {request.location} took the "
                    f"evaluation within {wait_for_agent:g} s"
                )
            result = await self._changed.wait_for(eval_id, answered, request.timeout_seconds + 10)
            if result is None:
                return failed(f"agent {agent} gave no result within {request.timeout_seconds:g} s")
            return result
        finally:
            await self.storage.drop_evaluation(eval_id)
            self.publish(EVALUATION, f"-{eval_id}")

    async def waiting(self) -> bool:
        """Might a request be waiting for an agent? (cheap: no query unless unsure)"""
        if self._unsure:
            self._unsure = await self.storage.untaken_evaluations() > 0
            return self._unsure
        return bool(self._open)

    async def take_for(self, agent_id: str, locations: set[str]) -> list[Evaluate]:
        """Requests for locations this agent hosts that nobody has taken yet (called from
        its poll: an agent that polls is alive)."""
        taken = await self.storage.take_evaluations(agent_id, locations, self.clock.time())
        for request in taken:
            self.publish(EVALUATION, f"~{request.eval_id}")
        return taken

    async def complete(self, result: EvaluationResult) -> bool:
        if not await self.storage.finish_evaluation(result):
            return False
        self.publish(EVALUATION, f"~{result.eval_id}")
        return True
