"""The fleet as users see it: agents (and draining them), jobs, and the run queue with
why each queued run waits."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from control_plane.bus import QUEUE, reload_requested
from control_plane.daemon.run_queue import RunQueue, explain, free_resources
from control_plane.http.errors import ApiError, read_json_object
from control_plane.http.keys import BUS, CLOCK, CONFIG, RUN_QUEUE, STORAGE
from control_plane.http.pools import pools_json
from control_plane.model.agents import agent_status
from control_plane.model.statuses import ACTIVE_STATUSES
from control_plane.model.times import iso
from control_plane.storage.port import Storage
from protocol.schema import to_plain
from protocol.tags import run_resources


async def list_agents(request: web.Request) -> web.Response:
    app = request.app
    timeout = app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds
    return web.json_response(
        {"agents": await agents_json(app[STORAGE], app[CLOCK].time(), timeout)}
    )


async def agents_json(
    storage: Storage, now: float, heartbeat_timeout: float
) -> list[dict[str, Any]]:
    """Every agent with its liveness as the monitor sees it, slots in use and locations."""
    running: dict[str, int] = {}
    active = await storage.active_runs()
    for run in active:
        if run.agent_id and run.status in ACTIVE_STATUSES:
            running[run.agent_id] = running.get(run.agent_id, 0) + 1
    steps: dict[str, int] = {}
    step_held: dict[str, Counter[str]] = {}
    for task in await storage.running_step_tasks():
        if task.agent_id:
            steps[task.agent_id] = steps.get(task.agent_id, 0) + 1
            step_held.setdefault(task.agent_id, Counter()).update(run_resources(task.tags))
    locations: dict[str, list[dict[str, Any]]] = {}
    for loc in await storage.list_code_locations():
        locations.setdefault(loc.agent_id, []).append(
            {
                "name": loc.info.name,
                "jobs": [j.name for j in loc.info.jobs],
                "error": loc.info.error,
                "version": loc.info.version or None,
                "versions": loc.info.versions,
                "reload_error": loc.info.reload_error,
            }
        )
    return [
        {
            "agent_id": a.agent_id,
            "name": a.name,
            "hostname": a.hostname,
            "status": agent_status(a, now, heartbeat_timeout),
            "queues": a.queues,
            "max_concurrent_runs": a.max_concurrent_runs,
            "launcher": a.launcher,
            "running": running.get(a.agent_id, 0),
            "step_tasks": steps.get(a.agent_id, 0),
            "last_heartbeat": iso(a.last_heartbeat),
            "version": a.version,
            "code_locations": locations.get(a.agent_id, []),
            "labels": a.labels,
            "resources": a.resources,
            "resources_free": {
                name: free - step_held.get(a.agent_id, Counter())[name]
                for name, free in free_resources(a, active).items()
            },
        }
        for a in await storage.list_agents()
    ]


async def list_jobs(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    names = {a.agent_id: a.name for a in await storage.list_agents()}
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    errors = []
    for loc in await storage.list_code_locations():
        agent_name = names.get(loc.agent_id, loc.agent_id)
        if loc.info.error is not None:
            errors.append({"location": loc.info.name, "agent": agent_name, "error": loc.info.error})
        elif loc.info.reload_error is not None:
            errors.append(
                {
                    "location": loc.info.name,
                    "agent": agent_name,
                    "error": f"reload failed; version {loc.info.version} still serves: "
                    f"{loc.info.reload_error}",
                    "serving_version": loc.info.version,
                }
            )
        for job in loc.info.jobs:
            entry = jobs.setdefault(
                (loc.info.name, job.name),
                {
                    "name": job.name,
                    "location": loc.info.name,
                    "ops": [
                        {
                            "name": o.name,
                            "upstream": o.upstream,
                            "tags": o.tags,
                            "retry_policy": to_plain(o.retry_policy),
                            "pool": o.pool,
                        }
                        for o in job.ops
                    ],
                    "tags": job.tags,
                    "executor": job.executor,
                    "agents": [],
                    "code_versions": [],
                },
            )
            entry["agents"].append(agent_name)
            if loc.info.version and loc.info.version not in entry["code_versions"]:
                entry["code_versions"].append(loc.info.version)
    return web.json_response({"jobs": [jobs[k] for k in sorted(jobs)], "location_errors": errors})


async def _set_operator_drain(request: web.Request, drained: bool) -> web.Response:
    """By agent id or name. Drained: DRAINING, no new launches (running runs go on), kept
    through the agent's restarts; undrained: ONLINE, taking runs again."""
    storage = request.app[STORAGE]
    key = request.match_info["agent"]
    match = next((a for a in await storage.list_agents() if key in (a.agent_id, a.name)), None)
    if match is None:
        raise ApiError(404, "unknown_agent", f"no agent with id or name {key!r}")
    agent = await storage.set_operator_drain(match.agent_id, drained)
    if agent is None:
        raise ApiError(404, "unknown_agent", f"no agent with id or name {key!r}")
    if not drained:
        request.app[BUS].publish(QUEUE)
    return web.json_response(
        {"agent_id": agent.agent_id, "name": agent.name, "status": agent.status}
    )


async def drain_agent(request: web.Request) -> web.Response:
    return await _set_operator_drain(request, drained=True)


async def undrain_agent(request: web.Request) -> web.Response:
    return await _set_operator_drain(request, drained=False)


async def reload_agent(request: web.Request) -> web.Response:
    """Ask an agent (by id or name) to reload its code locations, or the one given as
    `{"location": L}`; it does so at its next poll (at once when it is polling)."""
    app = request.app
    storage = app[STORAGE]
    key = request.match_info["agent"]
    body = await read_json_object(request) if await request.read() else {}
    location = body.get("location")
    if set(body) - {"location"}:
        unknown = ", ".join(sorted(set(body) - {"location"}))
        raise ApiError(422, "bad_request", f"unknown field(s): {unknown}")
    if location is not None and not isinstance(location, str):
        raise ApiError(422, "bad_request", "location must be a string")
    match = next((a for a in await storage.list_agents() if key in (a.agent_id, a.name)), None)
    if match is None:
        raise ApiError(404, "unknown_agent", f"no agent with id or name {key!r}")
    if location:
        hosted = [
            loc.info.name for loc in (await storage.code_catalog()).by_agent.get(match.agent_id, [])
        ]
        if location not in hosted:
            raise ApiError(
                404, "unknown_location", f"agent {match.name} has no code location {location!r}"
            )
    if not await storage.request_reload(match.agent_id, [location] if location else []):
        raise ApiError(404, "unknown_agent", f"no agent with id or name {key!r}")
    reload_requested(app[BUS], match.agent_id)
    return web.json_response(
        {"agent_id": match.agent_id, "name": match.name, "location": location or None},
        status=202,
    )


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(await queue_json(request.app[RUN_QUEUE], request.app[CLOCK].time()))


async def queue_json(run_queue: RunQueue, now: float) -> dict[str, Any]:
    """The queued runs in the order they would leave, each with why it waits; and the
    pools that hold steps of running runs back (with those steps, in order)."""
    plan = await explain(run_queue, now)
    pools = await pools_json(run_queue.storage, run_queue.pools)
    runs = [
        {
            "position": i + 1,
            "run_id": d.run.run_id,
            "job": d.run.job,
            "location": d.run.location,
            "queue": d.run.queue,
            "priority": d.run.priority,
            "create_time": iso(d.run.create_time),
            "waiting_for": d.reason,
            "next_agent": d.agent.name if d.agent else None,
        }
        for i, d in enumerate(plan.decisions)
    ]
    steps = [
        {
            "task_id": d.task.task_id,
            "run_id": d.task.run_id,
            "step": d.task.step,
            "attempt": d.task.attempt,
            "queue": d.task.queue,
            "create_time": iso(d.task.create_time),
            "waiting_for": d.reason,
            "next_agent": d.agent.name if d.agent else None,
        }
        for d in plan.step_decisions
    ]
    waiting = [pool for pool in pools["pools"] if pool["waiting"]]
    return {
        "runs": runs,
        "step_tasks": steps,
        "limits": [u.to_json() for u in plan.limits],
        "pools": waiting,
    }


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/queue", get_queue)
    app.router.add_get("/api/v1/agents", list_agents)
    app.router.add_post("/api/v1/agents/{agent}/drain", drain_agent)
    app.router.add_post("/api/v1/agents/{agent}/undrain", undrain_agent)
    app.router.add_post("/api/v1/agents/{agent}/reload", reload_agent)
    app.router.add_get("/api/v1/jobs", list_jobs)
