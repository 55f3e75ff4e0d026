"""The agent protocol's HTTP side: msgpack messages under /agent/v1.

Each handler decodes one message type with the bounded codec (bad input -> 4xx with an
ErrorReply naming the problem), calls storage/coordinator/dispatcher, and replies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from control_plane.statuses import TERMINAL_STATUSES, RunStatus
from control_plane.storage import StaleLease, UnknownRun
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

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

MSGPACK = "application/msgpack"


class AgentApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def reply(message: Any, status: int = 200, version: int = PROTOCOL_VERSION) -> web.Response:
    """Encoded for the peer's protocol version (fields it does not know are left out)."""
    return web.Response(body=encode(message, version), status=status, content_type=MSGPACK)


def _cp(request: web.Request) -> ControlPlane:
    from control_plane.app import CONTROL_PLANE

    return request.app[CONTROL_PLANE]


def handler(expected: type, fn: Any) -> Any:
    """Wrap `fn(cp, message)` with decoding of `expected` and msgpack error replies."""

    async def handle(request: web.Request) -> web.Response:
        try:
            message, version = decode_versioned(await request.read())
            if not isinstance(message, expected):
                raise ProtocolError("unexpected_message", f"expected a {expected.__name__} "
                                    f"message, got {type(message).__name__}")  # fmt: skip
            return reply(await fn(_cp(request), message), version=version)
        except ProtocolError as exc:
            return reply(ErrorReply(code=exc.code, message=str(exc)), 400)
        except AgentApiError as exc:
            return reply(ErrorReply(code=exc.code, message=str(exc)), exc.status)

    return handle


async def _known_agent(cp: ControlPlane, agent_id: str) -> None:
    if await cp.storage.get_agent(agent_id) is None:
        raise AgentApiError(404, "unknown_agent", f"agent {agent_id!r} is not registered")


async def register(cp: ControlPlane, msg: Register) -> Registered:
    agent = await cp.storage.register_agent(
        name=msg.name,
        hostname=msg.hostname,
        version=msg.version,
        queues=msg.queues,
        max_concurrent_runs=msg.max_concurrent_runs,
        locations=msg.code_locations,
        now=cp.clock.time(),
        capabilities=msg.capabilities,
    )
    lost = await cp.storage.reconcile_agent(
        agent.agent_id, [r.lease for r in msg.runs], cp.clock.time(), cp.resume_limit
    )
    cp.runs_changed(lost, agent.agent_id)
    cp.instigators_changed()
    return Registered(
        agent_id=agent.agent_id,
        heartbeat_interval_seconds=cp.heartbeat_timeout / 6,
        poll_timeout_seconds=cp.config.server.poll_timeout_seconds,
        heartbeat_timeout_seconds=cp.heartbeat_timeout,
    )


async def poll(cp: ControlPlane, msg: Poll) -> PollReply:
    await _known_agent(cp, msg.agent_id)
    return await cp.dispatcher.wait_for_commands(
        msg.agent_id,
        set(msg.held_leases),
        set(msg.stopping_leases),
        cp.config.server.poll_timeout_seconds,
    )


async def heartbeat(cp: ControlPlane, msg: Heartbeat) -> HeartbeatReply:
    now = cp.clock.time()
    previous = await cp.storage.record_heartbeat(msg.agent_id, now)
    if previous is None:
        raise AgentApiError(404, "unknown_agent", f"agent {msg.agent_id!r} is not registered")
    if now - previous > cp.heartbeat_timeout:
        cp.coordinator.wake()
    return HeartbeatReply(ok=True)


async def drain(cp: ControlPlane, msg: Drain) -> Drained:
    agent = await cp.storage.set_agent_status(msg.agent_id, "DRAINING")
    if agent is None:
        raise AgentApiError(404, "unknown_agent", f"agent {msg.agent_id!r} is not registered")
    return Drained(status=agent.status)


async def evaluation(cp: ControlPlane, msg: EvaluationResult) -> EvaluationAck:
    """A schedule tick's or sensor's result from the agent that evaluated it."""
    if not cp.broker.complete(msg):
        message = f"evaluation {msg.eval_id} is not waiting for this agent's result"
        raise AgentApiError(409, "unknown_evaluation", message)
    return EvaluationAck(ok=True)


async def events(cp: ControlPlane, msg: EventBatch) -> EventAck:
    run = await cp.storage.get_run(msg.run_id)
    if run is None:
        raise AgentApiError(404, "unknown_run", f"no run with id {msg.run_id!r}")
    if run.agent_id != msg.agent_id:
        raise AgentApiError(403, "not_your_run", f"run {msg.run_id} is not leased to this agent")
    try:
        result = await cp.storage.append_records(
            msg.run_id, msg.lease, msg.records, cp.clock.time(), cp.resume_limit
        )
    except StaleLease as exc:
        raise AgentApiError(409, "stale_lease", str(exc)) from None
    except UnknownRun:
        raise AgentApiError(404, "unknown_run", f"no run with id {msg.run_id!r}") from None
    if result.status_changed and result.status in (*TERMINAL_STATUSES, RunStatus.QUEUED):
        cp.runs_changed([], msg.agent_id)
    elif result.status_changed:
        cp.monitor.wake()  # a new deadline (max runtime) starts
    cp.run_events.notify(msg.run_id)
    return EventAck(acked_seq=result.acked_seq)


MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # agents cap outputs lower (output_store.max_output_bytes)


def _raw_error(status: int, code: str, message: str) -> web.Response:
    return reply(ErrorReply(code=code, message=message), status)


async def put_output(request: web.Request) -> web.Response:
    """Store a step's output: raw pickled bytes, from the agent holding the run's lease."""
    cp = _cp(request)
    run_id, step = request.match_info["run_id"], request.match_info["step"]
    try:
        lease = int(request.query.get("lease", ""))
    except ValueError:
        return _raw_error(400, "bad_parameter", "lease must be an integer")
    run = await cp.storage.get_run(run_id)
    if run is None:
        return _raw_error(404, "unknown_run", f"no run with id {run_id!r}")
    if run.agent_id != request.query.get("agent_id"):
        return _raw_error(403, "not_your_run", f"run {run_id} is not leased to this agent")
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 20):
        data += chunk
        if len(data) > MAX_OUTPUT_BYTES:
            return _raw_error(413, "output_too_large",
                              f"outputs are limited to {MAX_OUTPUT_BYTES} bytes")  # fmt: skip
    try:
        await cp.storage.put_output(run_id, lease, step, bytes(data), cp.clock.time())
    except StaleLease as exc:
        return _raw_error(409, "stale_lease", str(exc))
    except UnknownRun:
        return _raw_error(404, "unknown_run", f"no run with id {run_id!r}")
    return web.Response(status=200)


async def get_output(request: web.Request) -> web.Response:
    cp = _cp(request)
    run_id, step = request.match_info["run_id"], request.match_info["step"]
    data = await cp.storage.get_output(run_id, step)
    if data is None:
        return _raw_error(404, "unknown_output", f"run {run_id} stored no output for step {step}")
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
