"""Run supervision: one task per run attempt, from its launch to its last record.

The task starts the run's worker (agent/launchers.py), follows it to its end, and
delivers its outbox until the control plane has acknowledged every record; a launch
this agent cannot carry out (unreadable, a location it does not host, a reused output
it cannot fetch) only reports that its run failed, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile

from agent.launchers import LaunchedRun
from agent.outbox import AttemptRejected, RunOutbox
from agent.state import ActiveRun, AgentState
from agent.uploads import OutputUploader, download_reused
from protocol.codec import UnreadableLaunch
from protocol.events import RUN_FAILURE, UNDELIVERABLE
from protocol.logs import CURRENT_RUN
from protocol.messages import LaunchRun

log = logging.getLogger("fleetrun.agent")


def start_run(agent: AgentState, launch: LaunchRun, refusal: str | None = None) -> None:
    """Supervise a new run attempt; with `refusal`, the attempt only reports that it
    failed, and why."""
    assert agent.agent_id is not None
    log.info(
        "launching run %s (job %s, lease %d)",
        launch.run_id,
        launch.job,
        launch.lease,
        extra={"run_id": launch.run_id},
    )
    scratch = tempfile.mkdtemp(prefix=f"fleetrun-{launch.run_id[:8]}-{launch.lease}-")
    uploader = None
    if agent.config.output_store.kind == "control_plane":
        uploader = OutputUploader(agent.client, agent.agent_id, launch, scratch).upload
    outbox = RunOutbox(
        agent.agent_id,
        launch.run_id,
        launch.lease,
        agent.send_records,
        uploader,
        agent.contact,
        agent.spool,
    )
    worker = LaunchedRun(launch, outbox.add)
    exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        _supervise(agent, worker, outbox, scratch, exited, refusal), name=f"run-{launch.run_id}"
    )
    agent.runs[launch.lease] = ActiveRun(worker, outbox, task, exited)


def refuse_launch(agent: AgentState, bad: UnreadableLaunch) -> None:
    """A launch this agent could not read fails its own run, with the reason; the agent
    and its other runs go on."""
    if bad.run_id is None or bad.lease is None:
        log.error(
            "a launch in the last poll reply could not be read, nor its run named: %s",
            bad.problem,
        )
        return
    if bad.lease in agent.runs:
        return
    log.error(
        "run %s: its launch message could not be read: %s",
        bad.run_id,
        bad.problem,
        extra={"run_id": bad.run_id},
    )
    launch = LaunchRun(run_id=bad.run_id, job="", location="", lease=bad.lease)
    reason = f"agent {agent.config.name} could not read this run's launch message: {bad.problem}"
    start_run(agent, launch, refusal=reason)


async def _supervise(
    agent: AgentState,
    worker: LaunchedRun,
    outbox: RunOutbox,
    scratch: str,
    exited: asyncio.Future[None],
    refusal: str | None = None,
) -> None:
    launch = worker.launch
    CURRENT_RUN.set(launch.run_id)  # this task's log lines (and its children's) name it
    delivery = asyncio.create_task(outbox.deliver())
    try:
        loc = agent.locations.get(launch.location)
        if refusal is None and loc is None:
            refusal = f"agent {agent.config.name} does not host code location {launch.location!r}"
        if refusal is None and agent.config.output_store.kind == "control_plane":
            assert agent.agent_id is not None
            refusal = await download_reused(agent.client, agent.agent_id, launch, scratch)
        if refusal is not None:
            worker.report(RUN_FAILURE, refusal, {"failure_kind": UNDELIVERABLE})
        else:
            assert loc is not None
            run_task = asyncio.create_task(worker.run(loc, agent.launcher, scratch))
            done, _ = await asyncio.wait({run_task, delivery}, return_when=asyncio.FIRST_COMPLETED)
            if delivery in done and not run_task.done():
                worker.kill()
            await run_task
        exited.set_result(None)
        outbox.close()
        await delivery
        log.info("run %s finished (worker %s)", launch.run_id, worker.state)
    except AttemptRejected as exc:
        worker.kill()
        log.warning("run %s: control plane refused this attempt (%s); stopped", launch.run_id, exc)
    finally:
        if not exited.done():
            exited.set_result(None)
        if not delivery.done():
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, AttemptRejected):
                await delivery
        agent.runs.pop(launch.lease, None)
        shutil.rmtree(scratch, ignore_errors=True)
