"""The agent protocol's HTTP side: msgpack messages under /agent/v1.

Each handler decodes one message type with the bounded codec (bad input -> 4xx with an
ErrorReply naming the problem), calls storage/coordinator/dispatcher, and replies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from control_plane.auth import PRINCIPAL, Principal
from control_plane.bus import MONITOR, QUEUE, RUN
from control_plane.statuses import TERMINAL_STATUSES, RunStatus
from control_plane.storage import (
    NameTaken,
    NotYourRun,
    RecordRefused,
    Run,
    StaleLease,
    StorageFull,
    StorageUnavailable,
    UnknownRun,
)
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
    Poll,
    PollReply,
    Register,
    Registered,
)
from protocol.validation import agent_name_problem, location_problem, name_problem

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

MSGPACK = "application/msgpack"
MAX_AGENT_SLOTS = 100_000
MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z: what ISO-8601 output can show


class AgentApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def reply(message: Any, status: int = 200, version: int = PROTOCOL_VERSION) -> web.Response:
    """Encoded for the peer's protocol version (fields it does not know are left out)."""
    return web.Response(body=encode(message, version), status=status, content_type=MSGPACK)


def error_reply(status: int, code: str, message: str) -> web.Response:
    return reply(ErrorReply(code=code, message=message), status)


def _cp(request: web.Request) -> ControlPlane:
    from control_plane.app import CONTROL_PLANE

    return request.app[CONTROL_PLANE]


def _refused(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """An error reply, counted in the metrics (a write with a stale lease as fenced)."""
    _cp(request).metrics.agent_api_error(code, write=request.method in ("POST", "PUT"))
    return error_reply(status, code, message)


async def check_identity(cp: ControlPlane, principal: Principal | None, agent_id: str) -> None:
    """With auth on, an agent token may act only for the agent it registered: whatever
    agent id a message names, it must be bound to the caller's token (403 otherwise)."""
    if principal is None:
        return
    if cp.agent_tokens.get(agent_id, "") != principal.name:  # unknown here, or stale:
        agent = await cp.storage.get_agent(agent_id)  # it may have registered elsewhere
        if agent is None:
            return  # the handler answers 404 unknown_agent, and the agent registers
        cp.agent_tokens[agent_id] = agent.token_name
    if cp.agent_tokens[agent_id] != principal.name:
        raise AgentApiError(403, "not_this_agent", "this token does not belong to that agent")


def handler(expected: type, fn: Any) -> Any:
    """Wrap `fn(cp, message, principal)` with bounded decoding of `expected`, the identity
    check, and msgpack error replies."""

    async def handle(request: web.Request) -> web.Response:
        cp = _cp(request)
        principal: Principal | None = request.get(PRINCIPAL)
        try:
            message, version = decode_versioned(await request.read(), cp.decode_limits)
            if not isinstance(message, expected):
                raise ProtocolError("unexpected_message", f"expected a {expected.__name__} "
                                    f"message, got {type(message).__name__}")  # fmt: skip
            agent_id = getattr(message, "agent_id", None)
            if agent_id is not None:
                await check_identity(cp, principal, agent_id)
            answer = await fn(cp, message, principal)
        except ProtocolError as exc:
            return _refused(request, 400, exc.code, str(exc))
        except AgentApiError as exc:
            return _refused(request, exc.status, exc.code, str(exc))
        except StorageFull as exc:  # 5xx: the agent keeps its records and retries
            return _refused(request, 503, "storage_full", f"storage is full: {exc}")
        except StorageUnavailable as exc:
            return _refused(request, 503, "storage_unavailable", str(exc))
        return reply(answer, version=version)  # our own message: a failure here is a bug

    return handle


async def _known_agent(cp: ControlPlane, agent_id: str) -> None:
    if await cp.storage.get_agent(agent_id) is None:
        raise AgentApiError(404, "unknown_agent", f"agent {agent_id!r} is not registered")


async def register(cp: ControlPlane, msg: Register, principal: Principal | None) -> Registered:
    token_name = principal.name if principal is not None else None
    for info in msg.code_locations:
        problem = location_problem(info)
        if problem is not None:
            raise AgentApiError(422, "bad_definition", problem)
    if agent_name_problem(msg.name):
        raise AgentApiError(422, "bad_message", f"agent name {agent_name_problem(msg.name)}")
    if not 1 <= msg.max_concurrent_runs <= MAX_AGENT_SLOTS:
        message = f"max_concurrent_runs must be between 1 and {MAX_AGENT_SLOTS}"
        raise AgentApiError(422, "bad_message", message)
    try:
        agent = await cp.storage.register_agent(
            name=msg.name,
            hostname=msg.hostname,
            version=msg.version,
            queues=msg.queues,
            max_concurrent_runs=msg.max_concurrent_runs,
            locations=msg.code_locations,
            now=cp.clock.time(),
            capabilities=msg.capabilities,
            token_name=token_name,
        )
    except NameTaken as exc:
        raise AgentApiError(409, "agent_name_taken", str(exc)) from None
    cp.agent_tokens[agent.agent_id] = token_name
    lost = await cp.storage.reconcile_agent(
        agent.agent_id, [r.lease for r in msg.runs], cp.clock.time(), cp.resume_limit
    )
    cp.runs_changed(lost, agent.agent_id)
    defines = any(info.schedules or info.sensors for info in msg.code_locations)
    cp.instigators_changed("" if defines else agent.agent_id)
    return Registered(
        agent_id=agent.agent_id,
        heartbeat_interval_seconds=cp.heartbeat_timeout / 6,
        poll_timeout_seconds=cp.config.server.poll_timeout_seconds,
        heartbeat_timeout_seconds=cp.heartbeat_timeout,
    )


async def poll(cp: ControlPlane, msg: Poll, _: Principal | None) -> PollReply:
    await _known_agent(cp, msg.agent_id)
    return await cp.dispatcher.wait_for_commands(
        msg.agent_id,
        set(msg.held_leases),
        set(msg.stopping_leases),
        cp.config.server.poll_timeout_seconds,
    )


async def heartbeat(cp: ControlPlane, msg: Heartbeat, _: Principal | None) -> HeartbeatReply:
    previous, now = await cp.heartbeats.record(msg.agent_id)
    if previous is None:
        raise AgentApiError(404, "unknown_agent", f"agent {msg.agent_id!r} is not registered")
    cp.metrics.heartbeats.inc()
    if now - previous > cp.heartbeat_timeout:
        cp.wake(QUEUE)
    return HeartbeatReply(ok=True)


async def drain(cp: ControlPlane, msg: Drain, _: Principal | None) -> Drained:
    agent = await cp.storage.set_agent_status(msg.agent_id, "DRAINING")
    if agent is None:
        raise AgentApiError(404, "unknown_agent", f"agent {msg.agent_id!r} is not registered")
    return Drained(status=agent.status)


async def evaluation(cp: ControlPlane, msg: EvaluationResult, _: Principal | None) -> EvaluationAck:
    """A schedule tick's or sensor's result from the agent that evaluated it."""
    if not await cp.broker.complete(msg):
        message = f"evaluation {msg.eval_id} is not waiting for this agent's result"
        raise AgentApiError(409, "unknown_evaluation", message)
    return EvaluationAck(ok=True)


async def events(cp: ControlPlane, msg: EventBatch, _: Principal | None) -> EventAck:
    limit = cp.config.limits.max_events_per_batch
    if len(msg.records) > limit:
        raise AgentApiError(413, "too_many_events", f"a batch of {len(msg.records)} records "
                            f"exceeds max_events_per_batch ({limit})")  # fmt: skip
    for index, record in enumerate(msg.records):
        if not 0 <= record.time <= MAX_TIMESTAMP:
            raise AgentApiError(422, "bad_message", f"records[{index}].time is not a plausible "
                                "Unix time")  # fmt: skip
    try:
        result = await cp.storage.append_records(
            msg.run_id, msg.lease, msg.records, cp.clock.time(), cp.resume_limit,
            agent_id=msg.agent_id,
        )  # fmt: skip
    except UnknownRun:
        raise AgentApiError(404, "unknown_run", f"no run with id {msg.run_id!r}") from None
    except NotYourRun as exc:
        raise AgentApiError(403, "not_your_run", str(exc)) from None
    except StaleLease as exc:
        raise AgentApiError(409, "stale_lease", str(exc)) from None
    cp.metrics.records_stored(result.stored)
    if result.refused is not None:
        cp.runs_changed([], msg.agent_id)
        cp.wake(RUN, msg.run_id)
        raise AgentApiError(409, "record_refused", result.refused)
    if not result.launch_acked:  # records came before a poll said the agent holds it
        run = await cp.storage.get_run(msg.run_id)
        if run is not None and run.lease == msg.lease:
            await cp.dispatcher.launches_held(msg.agent_id, [run])
    if result.status_changed and result.status in (*TERMINAL_STATUSES, RunStatus.QUEUED):
        cp.runs_changed([], msg.agent_id)
    elif result.status_changed:
        cp.wake(MONITOR)  # a new deadline (max runtime) starts
    cp.wake(RUN, msg.run_id)
    return EventAck(acked_seq=result.acked_seq)


MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # agents cap outputs lower (output_store.max_output_bytes)


async def _leased_run(request: web.Request, run_id: str) -> tuple[ControlPlane, Run, int]:
    """The run named by an outputs request, held by the calling agent under `lease`."""
    cp = _cp(request)
    try:
        lease = int(request.query.get("lease", ""))
    except ValueError:
        raise AgentApiError(400, "bad_parameter", "lease must be an integer") from None
    agent_id = request.query.get("agent_id", "")
    await check_identity(cp, request.get(PRINCIPAL), agent_id)
    run = await cp.storage.get_run(run_id)
    if run is None:
        raise AgentApiError(404, "unknown_run", "no run with that id")
    if run.agent_id != agent_id:
        raise AgentApiError(403, "not_your_run", f"run {run_id} is not leased to this agent")
    if run.lease != lease:
        raise AgentApiError(409, "stale_lease", f"lease {lease} is not run {run_id}'s lease")
    return cp, run, lease


def _outputs_errors(fn: Any) -> Any:
    async def handle(request: web.Request) -> web.Response:
        try:
            return await fn(request)
        except AgentApiError as exc:
            return _refused(request, exc.status, exc.code, str(exc))
        except StorageFull as exc:
            return _refused(request, 503, "storage_full", f"storage is full: {exc}")
        except StorageUnavailable as exc:
            return _refused(request, 503, "storage_unavailable", str(exc))

    return handle


@_outputs_errors
async def put_output(request: web.Request) -> web.Response:
    """Store a step's output: raw pickled bytes, from the agent holding the run's lease."""
    run_id, step = request.match_info["run_id"], request.match_info["step"]
    if name_problem(step):
        raise AgentApiError(400, "bad_parameter", f"step name {name_problem(step)}")
    cp, run, lease = await _leased_run(request, run_id)
    data = bytearray()
    try:
        async with asyncio.timeout(max(cp.config.limits.body_timeout_seconds, 60.0)):
            async for chunk in request.content.iter_chunked(1 << 20):
                data += chunk
                if len(data) > MAX_OUTPUT_BYTES:
                    message = f"outputs are limited to {MAX_OUTPUT_BYTES} bytes"
                    raise AgentApiError(413, "output_too_large", message)
    except TimeoutError:
        raise AgentApiError(408, "body_timeout", "the output did not arrive in time") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise AgentApiError(400, "bad_body", f"the output cannot be read: {exc}") from None
    try:
        await cp.storage.put_output(run_id, lease, step, bytes(data), cp.clock.time())
    except StaleLease as exc:
        raise AgentApiError(409, "stale_lease", str(exc)) from None
    except RecordRefused as exc:
        cp.runs_changed([], run.agent_id)
        cp.wake(RUN, run_id)
        raise AgentApiError(409, "record_refused", str(exc)) from None
    except UnknownRun:
        raise AgentApiError(404, "unknown_run", f"no run with id {run_id!r}") from None
    return web.Response(status=200)


@_outputs_errors
async def get_output(request: web.Request) -> web.Response:
    """A stored output, for the agent running a re-execution that reuses it: `run_id`
    and `lease` in the query name that run, whose reuse_outputs must point here."""
    source, step = request.match_info["run_id"], request.match_info["step"]
    _, run, _ = await _leased_run(request, request.query.get("run_id", ""))
    if run.reuse_outputs.get(step) != source:
        raise AgentApiError(403, "not_reused", f"run {run.run_id} does not reuse step {step} "
                            f"of run {source}")  # fmt: skip
    cp = _cp(request)
    data = await cp.storage.get_output(source, step)
    if data is None:
        raise AgentApiError(404, "unknown_output", f"run {source} stored no output for step {step}")
    return web.Response(body=data, content_type="application/octet-stream")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": FLEETRUN_VERSION, "protocol_version": PROTOCOL_VERSION})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agent/v1/register", handler(Register, register))
    app.router.add_post("/agent/v1/poll", handler(Poll, poll))
    app.router.add_post("/agent/v1/heartbeat", handler(Heartbeat, heartbeat))
    app.router.add_post("/agent/v1/events", handler(EventBatch, events))
    app.router.add_post("/agent/v1/drain", handler(Drain, drain))
    app.router.add_post("/agent/v1/evaluation", handler(EvaluationResult, evaluation))
    app.router.add_get("/agent/v1/version", version)
    app.router.add_put("/agent/v1/outputs/{run_id}/{step}", put_output)
    app.router.add_get("/agent/v1/outputs/{run_id}/{step}", get_output)
