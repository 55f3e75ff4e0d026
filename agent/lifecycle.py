"""The agent's life: start (adopt the workers a previous life left, re-send the spool,
register), serve (poll, heartbeat, watch contact), and on SIGTERM drain, or hand the
running workers over to the next start (`--handoff`, an upgrade in place), whether or
not the control plane answers.

Every activity is a module of its own over one `AgentState`: registration.py,
polling.py (launches, stops, evaluations), heartbeat.py, supervision.py (one task per
run), evaluations.py. This module only starts and stops them, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from agent.client import ControlPlaneClient, ControlPlaneError, ControlPlaneUnreachable
from agent.config import AgentConfig
from agent.heartbeat import heartbeat_forever, watch_contact
from agent.outbox import AttemptRejected, RunOutbox
from agent.polling import poll_forever
from agent.registration import register, register_with_new_token
from agent.reloading import code_tasks, load_all, request_reload
from agent.spool import SpooledAttempt
from agent.state import AgentState
from agent.supervision import adopt_workers
from agent.tracking import Tracking
from protocol.messages import Drain, Drained

log = logging.getLogger("fleetrun.agent")

STOP_GRACE_SECONDS = 5.0  # a drain's SIGTERM to SIGKILL of what did not finish in time
DELIVERY_GRACE_SECONDS = 5.0  # then records get this long to reach the control plane


async def _wait_until(waitables: list[Any], deadline: float) -> None:
    """Wait for all of `waitables` to be done, or until `deadline` (monotonic)."""
    pending = [w for w in waitables if not w.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))


class Agent:
    """One agent process: `run()` until `shutting_down` is set (the first SIGTERM)."""

    def __init__(
        self,
        config: AgentConfig,
        client: ControlPlaneClient,
        tracking: Tracking | None = None,
        handoff: bool = False,
    ) -> None:
        self.state = AgentState(config, client, tracking)
        self.handoff = handoff  # on SIGTERM, leave the workers to the next start
        self.shutting_down = asyncio.Event()
        self._side_tasks: list[asyncio.Task[None]] = []
        self._code_tasks: list[asyncio.Task[None]] = []  # reloads (agent/reloading.py)
        client.on_token_rotated = lambda: register_with_new_token(self.state)

    async def run(self) -> None:
        """Serve until `shutting_down` is set, then drain (see `drain`). Every phase -
        re-sending the spool, registering, polling - gives way to the shutdown, so that
        SIGTERM is obeyed whether or not the control plane answers."""
        state = self.state
        await asyncio.gather(load_all(state), state.launcher.warm_up(), state.spool.open())
        self._code_tasks = code_tasks(state)
        serving = asyncio.create_task(self._serve(), name="serve")
        stop = asyncio.create_task(self.shutting_down.wait(), name="shutdown")
        try:
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # a fatal refusal from the control plane
            serving.cancel()  # no new launches from here on
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await (self.hand_off() if self.handoff else self.drain())
        finally:
            for task in (serving, stop, *self._side_tasks, *self._code_tasks):
                task.cancel()
            if not self.handoff:
                for active in state.runs.values():
                    active.worker.kill()
            await state.launcher.close()
            await state.spool.close()

    def reload(self) -> None:
        """SIGHUP: reload every code location."""
        names = request_reload(self.state, None, "SIGHUP")
        log.info("SIGHUP: reloading code location(s) %s", ", ".join(names))

    async def _serve(self) -> None:
        """Re-send what the spool holds, register, then poll; the heartbeat and the
        contact watch start with the registration and go on through a drain."""
        state = self.state
        await adopt_workers(state)
        await replay_spool(state)
        await register(state)
        self._side_tasks = [
            asyncio.create_task(heartbeat_forever(state), name="heartbeat"),
            asyncio.create_task(watch_contact(state), name="contact-watch"),
        ]
        poll = asyncio.create_task(poll_forever(state), name="poll")
        try:
            done, _ = await asyncio.wait(
                {poll, *self._side_tasks}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            poll.cancel()
        for task in done:
            task.result()  # a loop ends only by raising

    async def drain(self) -> None:
        """Tell the control plane first (no launch can race us), let runs finish for up
        to `drain_timeout_seconds`, stop the rest (SIGTERM, `STOP_GRACE_SECONDS`,
        SIGKILL) and report them, then deliver records for at most
        `DELIVERY_GRACE_SECONDS`: what is not delivered by then stays in the spool and
        is sent by the next start. Bounded whether or not the control plane answers."""
        state = self.state
        timeout = state.config.drain_timeout_seconds
        deadline = time.monotonic() + timeout
        if state.agent_id is not None:
            try:
                await state.client.call(
                    "drain", Drain(agent_id=state.agent_id), Drained, min(5.0, max(timeout, 0.1))
                )
            except (ControlPlaneUnreachable, ControlPlaneError) as exc:
                log.warning("could not tell the control plane this agent is draining: %s", exc)
        log.info("draining: %d run(s) may finish within %g s", len(state.runs), timeout)
        await _wait_until([a.worker_exited for a in state.runs.values()], deadline)
        for lease, active in list(state.runs.items()):
            if active.worker_exited.done():
                continue
            reason = f"agent {state.config.name} shut down (drain timeout of {timeout:g} s)"
            active.stop_as_agent_lost(lease, reason, STOP_GRACE_SECONDS)
        stop_deadline = time.monotonic() + STOP_GRACE_SECONDS + 1.0
        await _wait_until([a.worker_exited for a in state.runs.values()], stop_deadline)
        handing_over = [a.task for a in state.runs.values()] + list(state.evaluations.values())
        await _wait_until(handing_over, time.monotonic() + DELIVERY_GRACE_SECONDS)
        left = sum(not task.done() for task in handing_over)
        if left:
            log.warning(
                "%d run(s) still have records to deliver; they stay in the spool "
                "and are sent when this agent starts again",
                left,
            )
        log.info("drained")

    async def hand_off(self) -> None:
        """Leave every running worker to the next start of this agent: stop following
        them (what was read is in the spool, with how far it went) and go. The workers
        run on, writing to their channels; the next start adopts them under the same
        leases. One that no agent adopts stops itself at its lease deadline."""
        state = self.state
        log.info("handing %d run(s) over to the next start of this agent", len(state.runs))
        tasks = [active.task for active in state.runs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def replay_spool(state: AgentState) -> None:
    """Deliver what a previous life of this agent spooled but never got acknowledged,
    before registering: a run that finished while the control plane (or this agent)
    was down then ends as it did, instead of as lost when we register holding nothing.
    An adopted attempt's own outbox delivers its records."""
    attempts = [a for a in await state.spool.attempts() if a.lease not in state.runs]
    if not attempts:
        return
    log.info("re-sending the records of %d run attempt(s) from the spool", len(attempts))

    async def replay(attempt: SpooledAttempt) -> None:
        outbox = RunOutbox(
            attempt.agent_id,
            attempt.run_id,
            attempt.lease,
            state.send_records,
            contact=state.contact,
            spool=state.spool,
        )
        outbox.close()
        try:
            await outbox.deliver()
        except AttemptRejected as exc:
            log.warning(
                "run %s: spooled records refused (%s); dropped",
                attempt.run_id,
                exc,
                extra={"run_id": attempt.run_id},
            )

    await asyncio.gather(*(replay(attempt) for attempt in attempts))
