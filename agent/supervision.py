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
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from agent.channel import Channel, Position, WorkerIdentity, existing_channels
from agent.heartbeat import extend_deadline
from agent.launchers import LaunchedRun, run_marker
from agent.outbox import AttemptRejected, RunOutbox
from agent.reloading import PRUNE, choose_version, held_versions
from agent.state import ActiveRun, AgentState
from agent.tracking import ProcessScope, adopted_scope
from agent.uploads import OutputUploader, download_reused
from protocol.codec import UnreadableLaunch
from protocol.events import CODE_UNREACHABLE, ENGINE_EVENT, RUN_FAILURE, UNDELIVERABLE
from protocol.logs import CURRENT_RUN
from protocol.messages import LaunchRun

if TYPE_CHECKING:
    from agent.containers import ContainerWorker

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
    channel = Channel.create(agent.config.state_dir, launch, agent.agent_id)
    worker, outbox = _supervised(agent, launch, channel, agent.agent_id)
    extend_deadline(agent, worker)

    async def follow() -> None:
        reason = refusal or await _refusal(agent, launch, channel.path("scratch"))
        if reason is not None:
            worker.report(RUN_FAILURE, reason, {"failure_kind": UNDELIVERABLE})
            return
        served = agent.code[launch.location]
        choice = choose_version(
            launch.location,
            served.current,
            launch,
            held_versions(agent, launch.location),
            agent.config.name,
        )
        if choice.version is None:
            detail = choice.refusal or ""
            if served.current is None and served.info.error:
                detail = f"{detail}: {served.info.error}"
            worker.report(RUN_FAILURE, detail, {"failure_kind": CODE_UNREACHABLE})
            return
        # Set before anything awaits: from here on no pruning removes this version.
        worker.code_version = choice.version.version
        channel.set_code_version(choice.version.version)
        if choice.note is not None:
            worker.report(ENGINE_EVENT, choice.note, {"code_version": choice.version.version})
        await worker.run(choice.version, agent.launcher, channel.path("scratch"))

    _start_supervision(agent, worker, outbox, follow)


async def adopt_workers(agent: AgentState) -> None:
    """Take over the run workers that a previous life of this agent left (killed, or
    handing over to a new version): each from where its records were stored, under the
    same lease. A worker that is gone is reported lost at once. Before registering, so
    that the control plane hears these runs are held."""
    for channel in existing_channels(agent.config.state_dir):
        try:
            launch, agent_id = channel.launch(), channel.agent_id()
        except (OSError, ValueError) as exc:
            log.warning("left-over run channel %s is unreadable (%s); removed", channel.folder, exc)
            channel.remove()
            continue
        identity = channel.worker()
        if identity is None:  # it never started: the control plane fails or re-queues it
            channel.remove()
            continue
        saved = await agent.spool.position(channel.lease)
        position, next_seq = saved if saved is not None else (Position(), 1)
        log.info(
            "adopting the worker of run %s (lease %d, pid %d)",
            launch.run_id,
            launch.lease,
            identity.pid,
            extra={"run_id": launch.run_id},
        )
        worker, outbox = _supervised(agent, launch, channel, agent_id, position, next_seq)
        if identity.container is not None:
            container = await adopt_container(agent, identity, launch)
            scope: ProcessScope = agent.launcher.run_tracking.scope("", run_marker(launch))
            follow = partial(worker.adopt, identity, scope, container)
        else:
            follow = partial(worker.adopt, identity, adopted_scope(identity, run_marker(launch)))
        _start_supervision(agent, worker, outbox, follow)
    await remove_stray_containers(agent)


async def adopt_container(
    agent: AgentState, identity: WorkerIdentity, launch: LaunchRun
) -> ContainerWorker | None:
    """The container of an adopted run; None (followed as a process, which is gone) if
    this agent no longer runs the docker launcher."""
    from agent.containers import DockerLauncher

    if not isinstance(agent.launcher, DockerLauncher):
        log.error(
            "run %s ran in container %s, but this agent's run_launcher is %s now",
            launch.run_id,
            identity.container,
            agent.config.run_launcher,
        )
        return None
    return await agent.launcher.adopt(identity, launch)


async def remove_stray_containers(agent: AgentState) -> None:
    """Remove this agent's containers of runs it does not hold (never unsupervised)."""
    from agent.containers import DockerLauncher

    if not isinstance(agent.launcher, DockerLauncher):
        return
    for name in await agent.launcher.remove_strays(set(agent.runs)):
        log.warning("removed container %s: a run this agent does not hold", name)


def _supervised(
    agent: AgentState,
    launch: LaunchRun,
    channel: Channel,
    agent_id: str,
    position: Position | None = None,
    next_seq: int = 1,
) -> tuple[LaunchedRun, RunOutbox]:
    uploader = None
    if agent.config.output_store.kind == "control_plane":
        uploader = OutputUploader(agent.client, agent_id, launch, channel.path("scratch")).upload
    outbox = RunOutbox(
        agent_id,
        launch.run_id,
        launch.lease,
        agent.send_records,
        uploader,
        agent.contact,
        agent.spool,
        next_seq,
    )
    cleanup = agent.launcher.remove_step_containers
    return LaunchedRun(launch, outbox.add, channel, position, cleanup), outbox


def _start_supervision(
    agent: AgentState,
    worker: LaunchedRun,
    outbox: RunOutbox,
    follow: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        _supervise(agent, worker, outbox, exited, follow), name=f"run-{worker.launch.run_id}"
    )
    agent.runs[worker.launch.lease] = ActiveRun(worker, outbox, task, exited)


async def _refusal(agent: AgentState, launch: LaunchRun, scratch: str) -> str | None:
    """Why this agent cannot carry out a launch; None if it can."""
    if launch.location not in agent.code:
        return f"agent {agent.config.name} does not host code location {launch.location!r}"
    if agent.config.output_store.kind == "control_plane":
        assert agent.agent_id is not None
        return await download_reused(agent.client, agent.agent_id, launch, scratch)
    return None


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
    exited: asyncio.Future[None],
    follow: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Follow the attempt, deliver its records; once it is over for good (delivered,
    or refused by the control plane) its channel goes. If this agent stops first, the
    channel stays for the next one to adopt."""
    launch = worker.launch
    CURRENT_RUN.set(launch.run_id)  # this task's log lines (and its children's) name it
    delivery = asyncio.create_task(outbox.deliver())
    run_task = asyncio.create_task(follow())
    over = False
    try:
        done, _ = await asyncio.wait({run_task, delivery}, return_when=asyncio.FIRST_COMPLETED)
        if delivery in done and not run_task.done():
            worker.kill()
        await run_task
        exited.set_result(None)
        outbox.close()
        await delivery
        over = True
        log.info("run %s finished (worker %s)", launch.run_id, worker.state)
    except AttemptRejected as exc:
        over = True
        worker.kill()
        log.warning("run %s: control plane refused this attempt (%s); stopped", launch.run_id, exc)
    finally:
        if not exited.done():
            exited.set_result(None)
        if not run_task.done():  # this agent is going: the worker runs on
            run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run_task
        if not delivery.done():
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, AttemptRejected):
                await delivery
        agent.runs.pop(launch.lease, None)
        if over:
            await agent.spool.forget_position(launch.lease)
            worker.channel.remove()
            if worker.code_version and launch.location in agent.code:
                agent.reloads.put_nowait((launch.location, PRUNE))  # its version may go
