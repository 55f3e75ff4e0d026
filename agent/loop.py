"""The agent: register, long-poll for launches, run them, stream their records, heartbeat.

Three concurrent activities share one `Agent`: the poll loop (receives LaunchRun and
starts a RunWorker for each), the heartbeat loop, and one supervisor task per run that
follows its worker and delivers its outbox until every record is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.client import (
    FATAL_CODES,
    Backoff,
    ContactLog,
    ControlPlaneClient,
    ControlPlaneError,
    ControlPlaneUnreachable,
    TokenRefused,
)
from agent.config import AgentConfig
from agent.launcher import (
    RunWorker,
    describe_location,
    evaluate_in_worker,
    location_spec,
    make_launcher,
)
from agent.outbox import AttemptRejected, RunOutbox
from agent.outputs import INLINE_KEY, INLINE_OUTPUT_BYTES
from agent.spool import Attempt, Spool
from agent.tracking import Tracking
from protocol import FLEETRUN_VERSION
from protocol.codec import ProtocolError, UnreadableLaunch, decode_poll_reply
from protocol.events import UNDELIVERABLE
from protocol.logs import CURRENT_RUN
from protocol.messages import (
    CodeLocationInfo,
    Drain,
    Drained,
    Evaluate,
    EvaluateSpec,
    EvaluationAck,
    EvaluationResult,
    EventAck,
    EventBatch,
    Heartbeat,
    HeartbeatReply,
    LaunchRun,
    Poll,
    Register,
    Registered,
    RunRecord,
    RunState,
    StopRun,
)
from protocol.tags import ON_LOST_CONTACT_TAG
from protocol.validation import name_problem
from protocol.wire import delivery_problem

log = logging.getLogger("fleetrun.agent")

CAPABILITIES = ["reuse_outputs", "stop_orders", "drain"]
REQUEST_TIMEOUT_SECONDS = 30.0
STOP_GRACE_SECONDS = 5.0  # a drain's SIGTERM to SIGKILL of what did not finish in time
DELIVERY_GRACE_SECONDS = 5.0  # then records get this long to reach the control plane
CONTACT_RECHECK_SECONDS = 0.5
RUN_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def _read_if_exists(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


HEARTBEAT_SPREAD = 0.2


def heartbeat_pause(interval: float, spread: Callable[[], float] = random.random) -> float:
    """The pause before the next heartbeat: the interval less a random part of up to
    `HEARTBEAT_SPREAD` of it. Agents answered together (one group commit answers many)
    would otherwise heartbeat together forever; never longer than the interval, so the
    control plane's dead-agent margin is unchanged."""
    return interval * (1 - HEARTBEAT_SPREAD * spread())


class OutputUploader:
    """Sends step outputs to the control plane with, or before, the records announcing them."""

    def __init__(
        self, client: ControlPlaneClient, agent_id: str, launch: LaunchRun, scratch: str
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.launch = launch
        self.scratch = scratch
        self.uploaded: set[str] = set()
        self.inline: dict[str, bytes] = {}  # a batch read again from the spool needs them

    async def upload(self, records: list[RunRecord]) -> None:
        for record in records:
            step = record.step
            if record.type != "STEP_OUTPUT" or step is None:
                continue
            if step in self.inline:
                record.data[INLINE_KEY] = self.inline[step]
            if step in self.uploaded:
                continue
            path = os.path.join(self.scratch, "out", f"{step}.pickle")
            data = await asyncio.to_thread(_read_if_exists, path)
            if data is not None and len(data) <= INLINE_OUTPUT_BYTES:
                self.inline[step] = data
                record.data[INLINE_KEY] = data  # stored with the event, one transaction
            elif data is not None:
                await self.client.put_output(self.agent_id, self.launch.run_id,
                                             self.launch.lease, step, data,
                                             REQUEST_TIMEOUT_SECONDS)  # fmt: skip
            self.uploaded.add(step)


class FatalAgentError(Exception):
    """The control plane refused this agent outright (e.g. protocol version mismatch)."""


@dataclass
class ActiveRun:
    worker: RunWorker
    outbox: RunOutbox
    task: asyncio.Task[None]  # supervises the attempt until its records are delivered
    worker_exited: asyncio.Future[None]


async def _wait_until(waitables: list[Any], deadline: float) -> None:
    """Wait for all of `waitables` to be done, or until `deadline` (monotonic)."""
    pending = [w for w in waitables if not w.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))


class Agent:
    def __init__(
        self, config: AgentConfig, client: ControlPlaneClient, tracking: Tracking | None = None
    ) -> None:
        self.config = config
        self.client = client
        self.locations = {loc.name: loc for loc in config.code_locations}
        self.agent_id: str | None = None
        self.poll_timeout = 25.0
        self.heartbeat_interval = config.heartbeat_interval_seconds
        self.runs: dict[int, ActiveRun] = {}
        self.heartbeat_timeout = 30.0
        self.last_contact = time.monotonic()
        self.shutting_down = asyncio.Event()
        self.contact = ContactLog(log)
        self.evaluations: dict[str, asyncio.Task[None]] = {}
        self.location_infos: list[CodeLocationInfo] = []
        self._side_tasks: list[asyncio.Task[None]] = []
        self.launcher = make_launcher(
            config.run_launcher, config.code_locations, config.output_store, tracking
        )
        self.spool = Spool(os.path.join(config.state_dir, "spool.db"), config.spool_max_bytes,
                           config.spool_max_age_seconds)  # fmt: skip

    async def load_locations(self) -> list[CodeLocationInfo]:
        tracking = self.launcher.tracking
        infos = await asyncio.gather(
            *(describe_location(loc, tracking) for loc in self.locations.values())
        )
        for info in infos:
            if info.error:
                log.error("code location %s failed to load: %s", info.name, info.error)
            else:
                log.info("code location %s: jobs %s", info.name, [j.name for j in info.jobs])
        self.location_infos = list(infos)
        return self.location_infos

    def _register_message(self) -> Register:
        return Register(
            name=self.config.name,
            hostname=socket.gethostname(),
            version=FLEETRUN_VERSION,
            queues=self.config.queues,
            max_concurrent_runs=self.config.max_concurrent_runs,
            code_locations=self.location_infos,
            runs=self._run_states(),
            capabilities=CAPABILITIES,
        )

    async def register(self) -> None:
        """Register, retrying while the control plane is unreachable. A refused token is
        fatal at start-up (a wrong token_file), retried later (it may be rotated)."""
        backoff = Backoff()
        while True:
            try:
                reply = await self.client.call(
                    "register", self._register_message(), Registered, REQUEST_TIMEOUT_SECONDS
                )
                break
            except TokenRefused as exc:
                if self.agent_id is None:
                    raise FatalAgentError(f"the control plane refused the token: {exc}") from None
                self.contact.failed("register", exc)
            except ControlPlaneUnreachable as exc:
                self.contact.failed("register", exc)
            except ControlPlaneError as exc:
                raise FatalAgentError(f"the control plane refused registration: {exc}") from None
            await asyncio.sleep(backoff.next_delay())
        self._registered(reply)

    async def register_with_new_token(self) -> None:
        """The client found a new token in token_file: register under it, with the runs
        held (so they go on), before the call that hit the 401 is retried."""
        reply = await self.client.call("register", self._register_message(), Registered,
                                       REQUEST_TIMEOUT_SECONDS, rotate=False)  # fmt: skip
        self._registered(reply)

    def _registered(self, reply: Registered) -> None:
        self.contact.succeeded()
        self.agent_id = reply.agent_id
        self.poll_timeout = reply.poll_timeout_seconds
        self.heartbeat_timeout = reply.heartbeat_timeout_seconds
        self.last_contact = time.monotonic()
        self.heartbeat_interval = min(
            self.config.heartbeat_interval_seconds, reply.heartbeat_interval_seconds
        )
        log.info(
            "registered as %s (agent id %s) at %s",
            self.config.name,
            self.agent_id,
            self.client.base_url,
        )

    async def run(self) -> None:
        """Serve until `shutting_down` is set, then drain (see `drain`). Every phase -
        re-sending the spool, registering, polling - gives way to the shutdown, so that
        SIGTERM is obeyed whether or not the control plane answers."""
        await asyncio.gather(self.load_locations(), self.launcher.warm_up(), self.spool.open())
        serving = asyncio.create_task(self._serve(), name="serve")
        stop = asyncio.create_task(self.shutting_down.wait(), name="shutdown")
        try:
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # a fatal refusal from the control plane
            serving.cancel()  # no new launches from here on
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await self.drain()
        finally:
            for task in (serving, stop, *self._side_tasks):
                task.cancel()
            for active in self.runs.values():
                active.worker.kill()
            await self.launcher.close()
            await self.spool.close()

    async def _serve(self) -> None:
        """Re-send what the spool holds, register, then poll; the heartbeat and the
        contact watch start with the registration and go on through a drain."""
        await self.replay_spool()
        await self.register()
        self._side_tasks = [
            asyncio.create_task(self._heartbeat_forever(), name="heartbeat"),
            asyncio.create_task(self._watch_contact(), name="contact-watch"),
        ]
        poll = asyncio.create_task(self._poll_forever(), name="poll")
        try:
            done, _ = await asyncio.wait(
                {poll, *self._side_tasks}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            poll.cancel()
        for task in done:
            task.result()  # a loop ends only by raising

    async def replay_spool(self) -> None:
        """Deliver what a previous life of this agent spooled but never got acknowledged,
        before registering: a run that finished while the control plane (or this agent)
        was down then ends as it did, instead of as lost when we register holding nothing."""
        attempts = await self.spool.attempts()
        if not attempts:
            return
        log.info("re-sending the records of %d run attempt(s) from the spool", len(attempts))

        async def replay(attempt: Attempt) -> None:
            outbox = RunOutbox(attempt.agent_id, attempt.run_id, attempt.lease, self._send,
                               contact=self.contact, spool=self.spool)  # fmt: skip
            outbox.close()
            try:
                await outbox.deliver()
            except AttemptRejected as exc:
                log.warning("run %s: spooled records refused (%s); dropped", attempt.run_id,
                            exc, extra={"run_id": attempt.run_id})  # fmt: skip

        await asyncio.gather(*(replay(attempt) for attempt in attempts))

    async def drain(self) -> None:
        """Tell the control plane first (no launch can race us), let runs finish for up
        to `drain_timeout_seconds`, stop the rest (SIGTERM, `STOP_GRACE_SECONDS`,
        SIGKILL) and report them, then deliver records for at most
        `DELIVERY_GRACE_SECONDS`: what is not delivered by then stays in the spool and
        is sent by the next start. Bounded whether or not the control plane answers."""
        timeout = self.config.drain_timeout_seconds
        deadline = time.monotonic() + timeout
        if self.agent_id is not None:
            try:
                await self.client.call("drain", Drain(agent_id=self.agent_id), Drained,
                                       min(5.0, max(timeout, 0.1)))  # fmt: skip
            except (ControlPlaneUnreachable, ControlPlaneError) as exc:
                log.warning("could not tell the control plane this agent is draining: %s", exc)
        log.info("draining: %d run(s) may finish within %g s", len(self.runs), timeout)
        await _wait_until([a.worker_exited for a in self.runs.values()], deadline)
        for lease, active in list(self.runs.items()):
            if active.worker_exited.done():
                continue
            launch = active.worker.launch
            reason = f"agent {self.config.name} shut down (drain timeout of {timeout:g} s)"
            log.warning("run %s: stopping its worker (%s)", launch.run_id, reason,
                        extra={"run_id": launch.run_id})  # fmt: skip
            active.worker.stop(
                StopRun(launch.run_id, lease, False, reason, STOP_GRACE_SECONDS, "agent_lost")
            )
        stop_deadline = time.monotonic() + STOP_GRACE_SECONDS + 1.0
        await _wait_until([a.worker_exited for a in self.runs.values()], stop_deadline)
        handing_over = [a.task for a in self.runs.values()] + list(self.evaluations.values())
        await _wait_until(handing_over, time.monotonic() + DELIVERY_GRACE_SECONDS)
        left = sum(not task.done() for task in handing_over)
        if left:
            log.warning("%d run(s) still have records to deliver; they stay in the spool "
                        "and are sent when this agent starts again", left)  # fmt: skip
        log.info("drained")

    async def _poll_forever(self) -> None:
        backoff = Backoff()
        while True:
            assert self.agent_id is not None
            poll = Poll(
                agent_id=self.agent_id,
                held_leases=list(self.runs),
                stopping_leases=[lease for lease, a in self.runs.items() if a.worker.stop_order],
            )
            try:
                body = await self.client.call_raw(
                    "poll", poll, self.poll_timeout + REQUEST_TIMEOUT_SECONDS
                )
                reply, unreadable = decode_poll_reply(body)
            except (ControlPlaneUnreachable, ProtocolError) as exc:
                self.contact.failed("poll", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            except ControlPlaneError as exc:
                if exc.code in FATAL_CODES:
                    raise FatalAgentError(f"the control plane refused a poll: {exc}") from None
                if exc.code == "unknown_agent":
                    log.warning("the control plane does not know this agent; registering again")
                    await self.register()
                    continue
                log.warning("the control plane refused a poll (%s); retrying", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.contact.succeeded()
            self.last_contact = time.monotonic()
            for launch in reply.launches:
                if launch.lease not in self.runs:
                    self.start_run(launch)
            for bad in unreadable:
                self.refuse_launch(bad)
            for request in reply.evaluations:
                if request.eval_id not in self.evaluations:
                    task = asyncio.create_task(self._evaluate(request))
                    self.evaluations[request.eval_id] = task
                    task.add_done_callback(lambda _, e=request.eval_id: self.evaluations.pop(e))
            for order in reply.stops:
                active = self.runs.get(order.lease)
                if active is not None:
                    log.info("run %s: stopping its worker (%s)", order.run_id, order.reason,
                             extra={"run_id": order.run_id})  # fmt: skip
                    active.worker.stop(order)

    def refuse_launch(self, bad: UnreadableLaunch) -> None:
        """A launch this agent could not read fails its own run, with the reason; the
        agent and its other runs go on."""
        if bad.run_id is None or bad.lease is None:
            log.error("a launch in the last poll reply could not be read, nor its run "
                      "named: %s", bad.problem)  # fmt: skip
            return
        if bad.lease in self.runs:
            return
        log.error("run %s: its launch message could not be read: %s", bad.run_id, bad.problem,
                  extra={"run_id": bad.run_id})  # fmt: skip
        launch = LaunchRun(run_id=bad.run_id, job="", location="", lease=bad.lease)
        self.start_run(launch, refusal=f"agent {self.config.name} could not read this run's "
                       f"launch message: {bad.problem}")  # fmt: skip

    async def _evaluate(self, request: Evaluate) -> None:
        """Evaluate a schedule tick or sensor in a worker; send the result back."""
        loc = self.locations.get(request.location)
        if loc is None:
            error = f"agent {self.config.name} does not host location {request.location!r}"
            result = EvaluationResult(eval_id=request.eval_id, error=error)
        else:
            spec = EvaluateSpec(evaluate=request, location=location_spec(loc))
            result = await evaluate_in_worker(self.launcher, loc, spec)
        assert self.agent_id is not None
        result.agent_id = self.agent_id
        if (problem := delivery_problem(result)) is not None:
            result = EvaluationResult(
                eval_id=request.eval_id, agent_id=self.agent_id, cursor=request.cursor,
                error=f"the {request.kind}'s result cannot be sent: {problem}",
            )  # fmt: skip
        backoff = Backoff()
        deadline = time.monotonic() + request.timeout_seconds
        while True:
            try:
                await self.client.call("evaluation", result, EvaluationAck, REQUEST_TIMEOUT_SECONDS)
                return
            except ControlPlaneUnreachable as exc:
                self.contact.failed("evaluation", exc)
            except ControlPlaneError as exc:
                log.warning("%s %s: result refused: %s", request.kind, request.name, exc)
                return
            if time.monotonic() > deadline:
                return  # the control plane times the tick out and tries again
            await asyncio.sleep(backoff.next_delay())

    def _run_states(self) -> list[RunState]:
        return [
            RunState(run_id=a.worker.launch.run_id, lease=lease, state=a.worker.state)
            for lease, a in self.runs.items()
        ]

    async def _heartbeat_forever(self) -> None:
        while True:
            assert self.agent_id is not None
            try:
                await self.client.call(
                    "heartbeat",
                    Heartbeat(agent_id=self.agent_id, runs=self._run_states()),
                    HeartbeatReply,
                    min(REQUEST_TIMEOUT_SECONDS, self.heartbeat_timeout / 3),
                )
                self.last_contact = time.monotonic()
                self.contact.succeeded()
            except ControlPlaneUnreachable as exc:
                self.contact.failed("heartbeat", exc)
            except ControlPlaneError as exc:
                log.warning("heartbeat refused: %s", exc)
            await asyncio.sleep(heartbeat_pause(self.heartbeat_interval))

    async def _watch_contact(self) -> None:
        """Runs tagged `fleetrun/on_lost_contact = stop` end before the server's verdict.

        The control plane fails (and may retry) an agent's runs after a full heartbeat
        timeout; these are stopped at half of it, on this task's own timer, so that no
        request in flight (a heartbeat may wait a third of the timeout for its answer)
        delays the stop. Their workers get a quarter of the timeout to clean up, so an
        old attempt is gone before a new one can start, unless this agent is frozen.
        """
        while True:
            limit = self.heartbeat_timeout / 2
            silent = time.monotonic() - self.last_contact
            if silent > limit:
                self.stop_runs_out_of_contact(silent)
                await asyncio.sleep(CONTACT_RECHECK_SECONDS)
            else:
                await asyncio.sleep(limit - silent + 0.01)

    def stop_runs_out_of_contact(self, silent: float) -> None:
        for lease, active in self.runs.items():
            launch = active.worker.launch
            if launch.tags.get(ON_LOST_CONTACT_TAG) == "stop" and active.worker.stop_order is None:
                reason = f"no contact with the control plane for {silent:.1f} s"
                log.warning("run %s: stopping its worker (%s)", launch.run_id, reason,
                            extra={"run_id": launch.run_id})  # fmt: skip
                grace = self.heartbeat_timeout / 4
                order = StopRun(launch.run_id, lease, False, reason, grace, "agent_lost")
                active.worker.stop(order)

    async def _send(self, batch: EventBatch) -> EventAck:
        return await self.client.call("events", batch, EventAck, REQUEST_TIMEOUT_SECONDS)

    def start_run(self, launch: LaunchRun, refusal: str | None = None) -> None:
        """Supervise a new run attempt; with `refusal`, the attempt only reports that
        it failed, and why."""
        assert self.agent_id is not None
        log.info("launching run %s (job %s, lease %d)", launch.run_id, launch.job, launch.lease,
                 extra={"run_id": launch.run_id})  # fmt: skip
        scratch = tempfile.mkdtemp(prefix=f"fleetrun-{launch.run_id[:8]}-{launch.lease}-")
        uploader = None
        if self.config.output_store.kind == "control_plane":
            uploader = OutputUploader(self.client, self.agent_id, launch, scratch).upload
        outbox = RunOutbox(self.agent_id, launch.run_id, launch.lease, self._send, uploader,
                           self.contact, self.spool)  # fmt: skip
        worker = RunWorker(launch, outbox.add)
        exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._supervise(worker, outbox, scratch, exited, refusal), name=f"run-{launch.run_id}"
        )
        self.runs[launch.lease] = ActiveRun(worker, outbox, task, exited)

    async def _download_reused(self, launch: LaunchRun, scratch: str) -> str | None:
        """Fetch the outputs a re-execution reuses into the scratch folder; None if all came."""
        if self.config.output_store.kind != "control_plane":
            return None
        assert self.agent_id is not None
        ours = (self.agent_id, launch.run_id, launch.lease)
        for step, source in launch.reuse_outputs.items():
            if name_problem(step) or not RUN_ID_RE.fullmatch(source):
                return f"the launch names a reused output that is not a step's: {step[:64]!r}"
            try:
                data = await self.client.get_output(*ours, source, step, REQUEST_TIMEOUT_SECONDS)
            except ControlPlaneError as exc:
                if exc.status == 404:
                    continue  # the worker fails the run only if a step needs it
                return f"could not fetch the output of step {step} from run {source}: {exc}"
            except ControlPlaneUnreachable as exc:
                return f"could not fetch the output of step {step} from run {source}: {exc}"
            path = os.path.join(scratch, "in", source, f"{step}.pickle")
            await asyncio.to_thread(_write, path, data)
        return None

    async def _supervise(
        self,
        worker: RunWorker,
        outbox: RunOutbox,
        scratch: str,
        exited: asyncio.Future[None],
        refusal: str | None = None,
    ) -> None:
        launch = worker.launch
        CURRENT_RUN.set(launch.run_id)  # this task's log lines (and its children's) name it
        delivery = asyncio.create_task(outbox.deliver())
        try:
            loc = self.locations.get(launch.location)
            if refusal is None and loc is None:
                refusal = (
                    f"agent {self.config.name} does not host code location {launch.location!r}"
                )
            if refusal is None:
                refusal = await self._download_reused(launch, scratch)
            if refusal is not None:
                worker.report("RUN_FAILURE", refusal, {"failure_kind": UNDELIVERABLE})
            else:
                assert loc is not None
                run_task = asyncio.create_task(worker.run(loc, self.launcher, scratch))
                done, _ = await asyncio.wait(
                    {run_task, delivery}, return_when=asyncio.FIRST_COMPLETED
                )
                if delivery in done and not run_task.done():
                    worker.kill()
                await run_task
            exited.set_result(None)
            outbox.close()
            await delivery
            log.info("run %s finished (worker %s)", launch.run_id, worker.state)
        except AttemptRejected as exc:
            worker.kill()
            log.warning(
                "run %s: control plane refused this attempt (%s); stopped", launch.run_id, exc
            )
        finally:
            if not exited.done():
                exited.set_result(None)
            if not delivery.done():
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError, AttemptRejected):
                    await delivery
            self.runs.pop(launch.lease, None)
            shutil.rmtree(scratch, ignore_errors=True)
