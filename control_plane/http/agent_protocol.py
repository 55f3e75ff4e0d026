"""The agent protocol's HTTP side: msgpack messages under /agent/v1.

Where a run is dispatched (`poll`: the long-poll that carries launches and stop orders,
fleet/dispatch.py) and ingested (`events`: an attempt's records, fleet/ingest.py).
Each handler decodes one message type with the bounded codec, checks that the caller
acts for its own agent, and replies; every refusal is an `ErrorReply` with the status
http/errors.py gives it (bad input: a 4xx naming the problem).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from control_plane.bus import AGENT, QUEUE, RUN, instigators_changed, runs_changed
from control_plane.fleet.dispatch import wake_step_agents
from control_plane.fleet.ingest import ingest
from control_plane.http.auth import PRINCIPAL, Principal
from control_plane.http.errors import ApiError, api_error
from control_plane.http.keys import (
    BROKER,
    BUS,
    CLOCK,
    CONFIG,
    DECODE_LIMITS,
    DISPATCHER,
    HEARTBEATS,
    IDENTITIES,
    METRICS,
    STORAGE,
)
from control_plane.model.agents import DRAINING
from control_plane.model.runs import Run
from control_plane.model.steptasks import RUNNING
from control_plane.storage.errors import RecordRefused
from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from protocol.codec import ProtocolError, decode_versioned, encode
from protocol.messages import (
    Drain,
    Drained,
    ErrorReply,
    EvaluationAck,
    EvaluationResult,
    EventAck,
    EventBatch,
    Heartbeat,
    HeartbeatReply,
    LocationsUpdated,
    Poll,
    PollReply,
    Register,
    Registered,
    UpdateLocations,
)
from protocol.validation import (
    agent_name_problem,
    location_problem,
    name_problem,
    placement_problem,
)

log = logging.getLogger("fleetrun.agents")

MSGPACK = "application/msgpack"
MAX_AGENT_SLOTS = 100_000
MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z: what ISO-8601 output can show
MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # agents cap outputs lower (output_store.max_output_bytes)

M = TypeVar("M")


def reply(message: Any, status: int = 200, version: int = PROTOCOL_VERSION) -> web.Response:
    """Encoded for the peer's protocol version (fields it does not know are left out)."""
    return web.Response(body=encode(message, version), status=status, content_type=MSGPACK)


def error_reply(status: int, code: str, message: str) -> web.Response:
    return reply(ErrorReply(code=code, message=message), status)


def _refused(request: web.Request, refusal: ApiError) -> web.Response:
    """An error reply, counted in the metrics (a write with a stale lease as fenced)."""
    write = request.method in ("POST", "PUT")
    request.app[METRICS].agent_api_error(refusal.code, write=write)
    return error_reply(refusal.status, refusal.code, refusal.message)


async def _check_identity(app: web.Application, principal: Principal | None, agent_id: str) -> None:
    """With auth on, an agent token may act only for the agent it registered."""
    if principal is not None:
        await app[IDENTITIES].check(principal.name, agent_id)


Handler = Callable[[web.Application, M, Principal | None], Awaitable[Any]]


def handler(expected: type[M], fn: Handler[M]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`fn(app, message, principal)` with bounded decoding of `expected`, the identity
    check, and msgpack error replies."""

    async def handle(request: web.Request) -> web.Response:
        app = request.app
        try:
            message, version = decode_versioned(await request.read(), app[DECODE_LIMITS])
            if not isinstance(message, expected):
                raise ProtocolError(
                    "unexpected_message",
                    f"expected a {expected.__name__} message, got {type(message).__name__}",
                )
            agent_id = getattr(message, "agent_id", None)
            principal: Principal | None = request.get(PRINCIPAL)
            if agent_id is not None:
                await _check_identity(app, principal, agent_id)
            answer = await fn(app, message, principal)
        except Exception as exc:
            refusal = api_error(exc)
            if refusal is None:
                raise
            return _refused(request, refusal)
        return reply(answer, version=version)  # our own message: a failure here is a bug

    return handle


def _unknown_agent(agent_id: str) -> ApiError:
    return ApiError(404, "unknown_agent", f"agent {agent_id!r} is not registered")


async def register(app: web.Application, msg: Register, principal: Principal | None) -> Registered:
    for info in msg.code_locations:
        problem = location_problem(info)
        if problem is not None:
            raise ApiError(422, "bad_definition", problem)
    if agent_name_problem(msg.name):
        raise ApiError(422, "bad_message", f"agent name {agent_name_problem(msg.name)}")
    if not 1 <= msg.max_concurrent_runs <= MAX_AGENT_SLOTS:
        message = f"max_concurrent_runs must be between 1 and {MAX_AGENT_SLOTS}"
        raise ApiError(422, "bad_message", message)
    if (problem := placement_problem(msg.labels, msg.resources)) is not None:
        raise ApiError(422, "bad_message", problem)
    storage, config, bus = app[STORAGE], app[CONFIG], app[BUS]
    token_name = principal.name if principal is not None else None
    now = app[CLOCK].time()
    agent = await storage.register_agent(
        name=msg.name,
        hostname=msg.hostname,
        version=msg.version,
        queues=msg.queues,
        max_concurrent_runs=msg.max_concurrent_runs,
        locations=msg.code_locations,
        now=now,
        capabilities=msg.capabilities,
        token_name=token_name,
        labels=msg.labels,
        resources=msg.resources,
    )
    app[IDENTITIES].registered(agent.agent_id, token_name)
    if agent.operator_drain:  # dispatch and evaluations pass it by until it is undrained
        log.info(
            "agent %s registered while drained by an operator: it stays DRAINING "
            "(no new runs) until `fleetrun agents undrain %s`",
            agent.name,
            agent.name,
        )
    monitoring = config.run_monitoring
    held = [r.lease for r in msg.runs]
    lost = await storage.reconcile_agent(
        agent.agent_id, held, now, monitoring.max_resume_run_attempts
    )
    runs_changed(bus, lost, agent.agent_id)
    await wake_step_agents(storage, bus, [run.run_id for run in lost])
    for owed in await storage.reconcile_step_tasks(agent.agent_id, held, now):
        bus.publish(AGENT, owed)
    if lost or held:
        bus.publish(QUEUE)
    defines = any(info.schedules or info.sensors for info in msg.code_locations)
    instigators_changed(bus, "" if defines else agent.agent_id)
    timeout = monitoring.agent_heartbeat_timeout_seconds
    return Registered(
        agent_id=agent.agent_id,
        heartbeat_interval_seconds=timeout / 6,
        poll_timeout_seconds=config.server.poll_timeout_seconds,
        heartbeat_timeout_seconds=timeout,
    )


async def update_locations(
    app: web.Application, msg: UpdateLocations, _: Principal | None
) -> LocationsUpdated:
    """An agent reloaded code: its locations replace the ones it registered."""
    for info in msg.code_locations:
        problem = location_problem(info)
        if problem is not None:
            raise ApiError(422, "bad_definition", problem)
    if not await app[STORAGE].update_code_locations(msg.agent_id, msg.code_locations):
        raise _unknown_agent(msg.agent_id)
    bus = app[BUS]
    instigators_changed(bus)  # schedules and sensors switch to the new version at once
    bus.publish(QUEUE)  # runs waiting for a location (or a code version) may go now
    return LocationsUpdated()


async def poll(app: web.Application, msg: Poll, _: Principal | None) -> PollReply:
    """Where a run is dispatched: its launch (or stop order) owed to this agent."""
    if await app[STORAGE].get_agent(msg.agent_id) is None:
        raise _unknown_agent(msg.agent_id)
    return await app[DISPATCHER].wait_for_commands(
        msg.agent_id,
        set(msg.held_leases),
        set(msg.stopping_leases),
        app[CONFIG].server.poll_timeout_seconds,
        frozenset(msg.held_grants),
        frozenset(msg.held_results),
    )


async def heartbeat(app: web.Application, msg: Heartbeat, _: Principal | None) -> HeartbeatReply:
    previous, now = await app[HEARTBEATS].record(msg.agent_id)
    if previous is None:
        raise _unknown_agent(msg.agent_id)
    app[METRICS].heartbeats.inc()
    if now - previous > app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds:
        app[BUS].publish(QUEUE)  # an agent back from OFFLINE may take queued runs
    return HeartbeatReply(ok=True)


async def drain(app: web.Application, msg: Drain, _: Principal | None) -> Drained:
    agent = await app[STORAGE].set_agent_status(msg.agent_id, DRAINING)
    if agent is None:
        raise _unknown_agent(msg.agent_id)
    return Drained(status=agent.status)


async def evaluation(
    app: web.Application, msg: EvaluationResult, _: Principal | None
) -> EvaluationAck:
    """A schedule tick's or sensor's result from the agent that evaluated it."""
    if not await app[BROKER].complete(msg):
        message = f"evaluation {msg.eval_id} is not waiting for this agent's result"
        raise ApiError(409, "unknown_evaluation", message)
    return EvaluationAck(ok=True)


async def events(app: web.Application, msg: EventBatch, _: Principal | None) -> EventAck:
    """Where a run is ingested (fleet/ingest.py): an attempt's records, checked here."""
    config = app[CONFIG]
    limit = config.limits.max_events_per_batch
    if len(msg.records) > limit:
        message = f"a batch of {len(msg.records)} records exceeds max_events_per_batch ({limit})"
        raise ApiError(413, "too_many_events", message)
    for index, record in enumerate(msg.records):
        if not 0 <= record.time <= MAX_TIMESTAMP:
            raise ApiError(
                422, "bad_message", f"records[{index}].time is not a plausible Unix time"
            )
    acked_seq = await ingest(
        msg,
        app[STORAGE],
        app[BUS],
        app[DISPATCHER],
        app[METRICS],
        app[CLOCK].time(),
        config.resume_rules(),
    )
    return EventAck(acked_seq=acked_seq)


async def _leased_run(request: web.Request, run_id: str) -> tuple[Run, int]:
    """The run named by an outputs request, held by the calling agent under `lease`
    (a step task's lease: as the run, its inputs as the outputs it reuses)."""
    try:
        lease = int(request.query.get("lease", ""))
    except ValueError:
        raise ApiError(400, "bad_parameter", "lease must be an integer") from None
    agent_id = request.query.get("agent_id", "")
    await _check_identity(request.app, request.get(PRINCIPAL), agent_id)
    storage = request.app[STORAGE]
    run = await storage.get_run(run_id)
    if run is None:
        raise ApiError(404, "unknown_run", "no run with that id")
    if run.lease != lease and -(2**63) <= lease < 2**63:
        task = await storage.step_task_by_lease(lease)
        if task is not None and task.run_id == run_id and task.agent_id == agent_id:
            if task.status != RUNNING or task.run_lease != run.lease:
                raise ApiError(409, "stale_lease", f"step task lease {lease} is over")
            return dataclasses.replace(run, reuse_outputs=task.inputs, agent_id=agent_id), lease
    if run.agent_id != agent_id:
        raise ApiError(403, "not_your_run", f"run {run_id} is not leased to this agent")
    if run.lease != lease:
        raise ApiError(409, "stale_lease", f"lease {lease} is not run {run_id}'s lease")
    return run, lease


def _refusals_as_replies(
    fn: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        try:
            return await fn(request)
        except Exception as exc:
            refusal = api_error(exc)
            if refusal is None:
                raise
            return _refused(request, refusal)

    return handle


@_refusals_as_replies
async def put_output(request: web.Request) -> web.Response:
    """Store a step's output: raw pickled bytes, from the agent holding the run's lease."""
    app = request.app
    run_id, step = request.match_info["run_id"], request.match_info["step"]
    if name_problem(step):
        raise ApiError(400, "bad_parameter", f"step name {name_problem(step)}")
    run, lease = await _leased_run(request, run_id)
    data = bytearray()
    try:
        async with asyncio.timeout(max(app[CONFIG].limits.body_timeout_seconds, 60.0)):
            async for chunk in request.content.iter_chunked(1 << 20):
                data += chunk
                if len(data) > MAX_OUTPUT_BYTES:
                    message = f"outputs are limited to {MAX_OUTPUT_BYTES} bytes"
                    raise ApiError(413, "output_too_large", message)
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the output did not arrive in time") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise ApiError(400, "bad_body", f"the output cannot be read: {exc}") from None
    try:
        await app[STORAGE].put_output(run_id, lease, step, bytes(data), app[CLOCK].time())
    except RecordRefused:  # the run failed for it (if it was going): wake who it concerns
        runs_changed(app[BUS], [], run.agent_id)
        app[BUS].publish(RUN, run_id)
        raise
    return web.Response(status=200)


@_refusals_as_replies
async def get_output(request: web.Request) -> web.Response:
    """A stored output, for the agent running a re-execution that reuses it: `run_id`
    and `lease` in the query name that run, whose reuse_outputs must point here."""
    source, step = request.match_info["run_id"], request.match_info["step"]
    run, _ = await _leased_run(request, request.query.get("run_id", ""))
    if run.reuse_outputs.get(step) != source:
        message = f"run {run.run_id} does not reuse step {step} of run {source}"
        raise ApiError(403, "not_reused", message)
    data = await request.app[STORAGE].get_output(source, step)
    if data is None:
        raise ApiError(404, "unknown_output", f"run {source} stored no output for step {step}")
    return web.Response(body=data, content_type="application/octet-stream")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": FLEETRUN_VERSION, "protocol_version": PROTOCOL_VERSION})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agent/v1/register", handler(Register, register))
    app.router.add_post("/agent/v1/poll", handler(Poll, poll))
    app.router.add_post("/agent/v1/heartbeat", handler(Heartbeat, heartbeat))
    app.router.add_post("/agent/v1/events", handler(EventBatch, events))
    app.router.add_post("/agent/v1/drain", handler(Drain, drain))
    app.router.add_post("/agent/v1/locations", handler(UpdateLocations, update_locations))
    app.router.add_post("/agent/v1/evaluation", handler(EvaluationResult, evaluation))
    app.router.add_get("/agent/v1/version", version)
    app.router.add_put("/agent/v1/outputs/{run_id}/{step}", put_output)
    app.router.add_get("/agent/v1/outputs/{run_id}/{step}", get_output)
