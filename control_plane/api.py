"""The user-facing JSON API under /api/v1 (the contract in DESIGN.md)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from aiohttp import web

from control_plane.bus import QUEUE
from control_plane.errors import ApiError, read_json_object
from control_plane.scheduler import Instigator, load_instigators
from control_plane.statuses import ACTIVE_STATUSES, TERMINAL_STATUSES, RunStatus
from control_plane.storage import NewRun, Run, RunFilter, iso
from control_plane.submission import RunRefused, check_config, check_new_run, job_tags, new_run
from control_plane.ticks import ticks_after
from protocol.messages import ScheduleInfo, SensorInfo
from protocol.schema import SchemaError, from_plain
from protocol.tags import (
    PARENT_TAG,
    REEXECUTION_TAG,
    RETRY_NUMBER_TAG,
    RETRY_STRATEGIES,
    ROOT_TAG,
    tag_problem,
)
from protocol.validation import name_problem

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,128}$")  # the form of job, location and step names
MAX_LIST_LIMIT = 1000
MAX_WAIT_SECONDS = 30.0


@dataclass
class SubmitRunRequest:
    job: str
    location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _cp(request: web.Request) -> ControlPlane:
    from control_plane.app import CONTROL_PLANE

    return request.app[CONTROL_PLANE]


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, "bad_parameter", f"{name} must be between {lo} and {hi}")
    return value


def _wait_param(request: web.Request) -> float:
    raw = request.query.get("wait", "0")
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"wait must be a number, got {raw!r}") from None
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ApiError(400, "bad_parameter", f"wait must be between 0 and {MAX_WAIT_SECONDS}")
    return value


async def _resolve_location(cp: ControlPlane, job: str, location: str | None) -> str:
    """The location hosting `job`: the one given, or the only one that defines it."""
    catalog = await cp.storage.code_catalog()
    known = set(catalog.jobs)
    hosting = {name for name, jobs in catalog.jobs.items() if job in jobs}
    if location is not None:
        if location not in known:
            raise ApiError(404, "unknown_location", f"no agent hosts code location {location!r}")
        if location not in hosting:
            raise ApiError(404, "unknown_job", f"code location {location!r} has no job {job!r}")
        return location
    if not hosting:
        raise ApiError(404, "unknown_job", f"no code location defines job {job!r}")
    if len(hosting) > 1:
        raise ApiError(
            422,
            "ambiguous_job",
            f"job {job!r} is defined in several locations ({', '.join(sorted(hosting))});"
            " give location",
        )
    return hosting.pop()


async def submit_run(request: web.Request) -> web.Response:
    """A new run of a job, with the job's own tags under the request's."""
    cp = _cp(request)
    try:
        body = from_plain(SubmitRunRequest, await read_json_object(request))
    except SchemaError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None
    if name_problem(body.job):
        raise ApiError(422, "bad_request", f"job {name_problem(body.job)}")
    if body.location is not None and name_problem(body.location):
        raise ApiError(422, "bad_request", f"location {name_problem(body.location)}")
    if (problem := tag_problem(body.tags, cp.run_rules.tags)) is not None:
        code = "too_many_tags" if problem.startswith("a run may") else "bad_tag"
        raise ApiError(422, code, problem)
    try:
        check_config(body.config, cp.run_rules)  # before anything is looked up
    except RunRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    location = await _resolve_location(cp, body.job, body.location)
    catalog = await cp.storage.code_catalog()
    new = new_run(str(uuid.uuid4()), body.job, location, body.tags, body.config,
                  job_own_tags=job_tags(catalog, location, body.job))  # fmt: skip
    return await _create(cp, new, config_checked=True)


async def _create(cp: ControlPlane, new: NewRun, **checked: bool) -> web.Response:
    """Check `new` as every new run is checked (`checked`: what is known to pass), then
    queue it."""
    try:
        check_new_run(new, cp.run_rules, **checked)
    except RunRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    run = await cp.coordinator.submit(new)
    return web.json_response({"run_id": run.run_id, "status": str(run.status)}, status=201)


async def parse_filter(cp: ControlPlane, request: web.Request) -> RunFilter:
    """?status=A,B&job=&tag=k:v (repeatable)&agent=NAME-or-ID."""
    filt = RunFilter()
    for raw in request.query.getall("status", []):
        for name in raw.split(","):
            try:
                filt.statuses.append(RunStatus(name.strip().upper()))
            except ValueError:
                raise ApiError(400, "bad_parameter", f"unknown run status {name!r}") from None
    filt.job = request.query.get("job") or None
    for raw in request.query.getall("tag", []):
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise ApiError(400, "bad_parameter", f"tag filter must be key:value, got {raw!r}")
        filt.tags.append((key, value))
    agent = request.query.get("agent")
    if agent:
        match = next((a for a in await cp.storage.list_agents() if agent in (a.agent_id, a.name)),
                     None)  # fmt: skip
        filt.agent_id = match.agent_id if match is not None else "-"  # unknown: no runs
    return filt


async def list_runs(request: web.Request) -> web.Response:
    cp = _cp(request)
    filt = await parse_filter(cp, request)
    limit = _int_param(request, "limit", 100, 1, MAX_LIST_LIMIT)
    raw_cursor = request.query.get("cursor")
    cursor = None
    if raw_cursor:
        if not re.fullmatch(r"[0-9]{1,18}", raw_cursor):
            raise ApiError(400, "bad_parameter", f"cursor {raw_cursor!r} is not valid")
        cursor = int(raw_cursor)
    runs, next_cursor = await cp.storage.list_runs(filt, limit, cursor)
    return web.json_response(
        {
            "runs": [r.to_json() for r in runs],
            "next_cursor": str(next_cursor) if next_cursor is not None else None,
        }
    )


async def _get_run_or_404(cp: ControlPlane, request: web.Request) -> Run:
    run_id = request.match_info["run_id"]
    run = await cp.storage.get_run(run_id) if len(run_id) <= 64 else None
    if run is None:
        raise ApiError(404, "unknown_run", f"no run with id {run_id!r}")
    return run


async def get_run(request: web.Request) -> web.Response:
    cp = _cp(request)
    return web.json_response(await run_json(cp, await _get_run_or_404(cp, request)))


async def run_json(cp: ControlPlane, run: Run) -> dict[str, Any]:
    """The run, with `chain`: its root and every retry and re-execution of it, oldest first."""
    root_id = run.root_run_id or run.run_id
    family, _ = await cp.storage.list_runs(RunFilter(tags=[(ROOT_TAG, root_id)]), 1000, None)
    chain = []
    if family:
        root = run if root_id == run.run_id else await cp.storage.get_run(root_id)
        members = ([root] if root is not None else []) + sorted(family, key=lambda r: r.create_time)
        chain = [
            {"run_id": r.run_id, "status": str(r.status), "parent_run_id": r.parent_run_id,
             "kind": _lineage_kind(r)}
            for r in members
        ]  # fmt: skip
    return {**run.to_json(), "chain": chain}


def _lineage_kind(run: Run) -> str:
    if run.parent_run_id is None:
        return "original"
    return "retry" if RETRY_NUMBER_TAG in run.tags else "reexecution"


@dataclass
class ReexecuteRequest:
    strategy: str = "FROM_FAILURE"


async def reexecute_run(request: web.Request) -> web.Response:
    """A new run of a FAILURE/CANCELED run's job; FROM_FAILURE reuses its finished steps."""
    cp = _cp(request)
    parent = await _get_run_or_404(cp, request)
    try:
        body = from_plain(ReexecuteRequest, await read_json_object(request))
    except SchemaError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None
    if body.strategy not in RETRY_STRATEGIES:
        raise ApiError(422, "bad_request",
                       f"strategy must be one of {', '.join(RETRY_STRATEGIES)}")  # fmt: skip
    if parent.status not in (RunStatus.FAILURE, RunStatus.CANCELED):
        message = f"run is {parent.status}; only FAILURE or CANCELED runs are re-executed"
        raise ApiError(409, "not_reexecutable", message)
    reuse = {} if body.strategy == "ALL_STEPS" else await cp.storage.reusable_outputs(parent)
    root = parent.root_run_id or parent.run_id
    tags = {k: v for k, v in parent.tags.items() if k != RETRY_NUMBER_TAG}
    lineage = {PARENT_TAG: parent.run_id, ROOT_TAG: root, REEXECUTION_TAG: body.strategy}
    new = new_run(
        str(uuid.uuid4()), parent.job, parent.location, tags, parent.config, own_tags=lineage,
        parent_run_id=parent.run_id, root_run_id=root, reuse_outputs=reuse,
    )  # fmt: skip
    return await _create(cp, new, reserved_ok=True)


async def get_events(request: web.Request) -> web.Response:
    """Events after `after`; with `wait`, held open until one arrives (long-poll)."""
    cp = _cp(request)
    run = await _get_run_or_404(cp, request)
    after = _int_param(request, "after", 0, 0, 2**62)
    limit = _int_param(request, "limit", 1000, 1, 10_000)
    wait = _wait_param(request)

    async def fetch() -> list:
        return await cp.storage.get_events(run.run_id, after, limit)

    events = await fetch()
    if not events and wait > 0:
        events = await cp.run_events.wait_for(run.run_id, fetch, wait) or []
    return web.json_response({"events": [e.to_json() for e in events]})


async def get_logs(request: web.Request) -> web.Response:
    cp = _cp(request)
    run = await _get_run_or_404(cp, request)
    step = request.query.get("step") or None
    if step is not None and not NAME_RE.match(step):
        raise ApiError(400, "bad_parameter", "step must match ^[A-Za-z0-9_]{1,128}$")
    after = _int_param(request, "after", 0, 0, 2**62)
    wait = _wait_param(request)

    async def fetch() -> tuple[list] | None:
        """New chunks, or none once the run has ended (so a follower can stop); else None."""
        chunks = await cp.storage.get_logs(run.run_id, step, after)
        if chunks:
            return (chunks,)
        current = await cp.storage.get_run(run.run_id)
        return ([],) if current is None or current.status in TERMINAL_STATUSES else None

    found = await fetch()
    if found is None and wait > 0:
        found = await cp.run_events.wait_for(run.run_id, fetch, wait)
    chunks = found[0] if found else []
    return web.json_response({"logs": [c.to_json() for c in chunks]})


async def list_agents(request: web.Request) -> web.Response:
    return web.json_response({"agents": await agents_json(_cp(request))})


async def agents_json(cp: ControlPlane) -> list[dict[str, Any]]:
    """Every agent with its liveness as the monitor sees it, slots in use and locations."""
    now = cp.clock.time()
    running: dict[str, int] = {}
    for run in await cp.storage.active_runs():
        if run.agent_id and run.status in ACTIVE_STATUSES:
            running[run.agent_id] = running.get(run.agent_id, 0) + 1
    locations: dict[str, list[dict[str, Any]]] = {}
    for loc in await cp.storage.list_code_locations():
        locations.setdefault(loc.agent_id, []).append(
            {
                "name": loc.info.name,
                "jobs": [j.name for j in loc.info.jobs],
                "error": loc.info.error,
            }
        )
    agents = []
    for a in await cp.storage.list_agents():
        status = a.status
        if now - a.last_heartbeat > cp.heartbeat_timeout:
            status = "OFFLINE"
        agents.append(
            {
                "agent_id": a.agent_id,
                "name": a.name,
                "hostname": a.hostname,
                "status": status,
                "queues": a.queues,
                "max_concurrent_runs": a.max_concurrent_runs,
                "running": running.get(a.agent_id, 0),
                "last_heartbeat": iso(a.last_heartbeat),
                "version": a.version,
                "code_locations": locations.get(a.agent_id, []),
            }
        )
    return agents


async def list_jobs(request: web.Request) -> web.Response:
    cp = _cp(request)
    names = {a.agent_id: a.name for a in await cp.storage.list_agents()}
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    errors = []
    for loc in await cp.storage.list_code_locations():
        agent_name = names.get(loc.agent_id, loc.agent_id)
        if loc.info.error is not None:
            errors.append({"location": loc.info.name, "agent": agent_name, "error": loc.info.error})
        for job in loc.info.jobs:
            entry = jobs.setdefault(
                (loc.info.name, job.name),
                {
                    "name": job.name,
                    "location": loc.info.name,
                    "ops": [
                        {"name": o.name, "upstream": o.upstream, "tags": o.tags} for o in job.ops
                    ],
                    "tags": job.tags,
                    "executor": job.executor,
                    "agents": [],
                },
            )
            entry["agents"].append(agent_name)
    return web.json_response({"jobs": [jobs[k] for k in sorted(jobs)], "location_errors": errors})


@dataclass
class PriorityRequest:
    priority: int


async def set_priority(request: web.Request) -> web.Response:
    cp = _cp(request)
    run = await _get_run_or_404(cp, request)
    try:
        body = from_plain(PriorityRequest, await read_json_object(request))
    except SchemaError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None
    if not -(2**31) <= body.priority < 2**31:
        raise ApiError(422, "bad_request", "priority must fit in 32 bits")
    updated = await cp.storage.set_priority(run.run_id, body.priority, cp.clock.time())
    if updated is None or updated.status != RunStatus.QUEUED:
        status = updated.status if updated else run.status
        raise ApiError(409, "not_queued", f"run is {status}; only a queued run's priority changes")
    cp.wake(QUEUE)
    return web.json_response(updated.to_json())


async def cancel_run(request: web.Request) -> web.Response:
    """QUEUED: CANCELED at once. STARTING/STARTED: CANCELING; the agent stops the worker."""
    cp = _cp(request)
    run = await _get_run_or_404(cp, request)
    if run.status in TERMINAL_STATUSES:
        raise ApiError(409, "already_finished", f"run already ended with {run.status}")
    updated = await cp.storage.request_cancel(run.run_id, cp.clock.time()) or run
    if updated.status in (RunStatus.SUCCESS, RunStatus.FAILURE):
        raise ApiError(409, "already_finished", f"run already ended with {updated.status}")
    cp.runs_changed([updated])
    return web.json_response({"run_id": run.run_id, "status": str(updated.status)})


async def _set_agent_status(request: web.Request, status: str) -> web.Response:
    """By agent id or name. DRAINING: no new launches (running runs go on); ONLINE: back."""
    cp = _cp(request)
    key = request.match_info["agent"]
    agents = await cp.storage.list_agents()
    match = next((a for a in agents if key in (a.agent_id, a.name)), None)
    if match is None:
        raise ApiError(404, "unknown_agent", f"no agent with id or name {key!r}")
    agent = await cp.storage.set_agent_status(match.agent_id, status)
    assert agent is not None
    if status == "ONLINE":
        cp.wake(QUEUE)
    return web.json_response({"agent_id": agent.agent_id, "name": agent.name,
                              "status": agent.status})  # fmt: skip


async def drain_agent(request: web.Request) -> web.Response:
    return await _set_agent_status(request, "DRAINING")


async def undrain_agent(request: web.Request) -> web.Response:
    return await _set_agent_status(request, "ONLINE")


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(await queue_json(_cp(request)))


async def queue_json(cp: ControlPlane) -> dict[str, Any]:
    """The queued runs in the order they would leave, each with why it waits."""
    plan = await cp.coordinator.explain()
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
    return {"runs": runs, "limits": [u.to_json() for u in plan.limits]}


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    cp = _cp(request)
    try:
        await cp.storage.list_agents()
    except Exception as exc:
        raise ApiError(503, "storage_unavailable", f"storage is not reachable: {exc}") from None
    full = cp.storage.full_reason()
    if full is not None:
        raise ApiError(503, "storage_full", f"storage cannot write: {full}")
    stale = cp.health.stale()
    if stale:
        raise ApiError(503, "daemon_stale", f"daemon loops not running: {', '.join(stale)}")
    return web.json_response({"status": "ready", "replica": cp.replica_id,
                              "leading": cp.elector.leading(),
                              "loops": cp.health.to_json()})  # fmt: skip


# --- schedules and sensors -----------------------------------------------------------


async def instigators_of(cp: ControlPlane, kind: str) -> list[Instigator]:
    now = cp.clock.time()
    found = await load_instigators(cp.storage, now, cp.heartbeat_timeout)
    return [i for i in found if i.kind == kind]


def instigator_json(inst: Instigator, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {"name": inst.name, "location": inst.location, "status": inst.status,
                           "job": inst.definition.job if inst.definition else None}  # fmt: skip
    if isinstance(inst.definition, ScheduleInfo):
        after = max(now, inst.state.last_tick_time or now)
        upcoming = list(islice(ticks_after(inst.definition.cron, inst.definition.timezone,
                                           after), 3))  # fmt: skip
        out |= {"cron": inst.definition.cron, "timezone": inst.definition.timezone,
                "catchup": inst.definition.catchup,
                "next_ticks": [iso(t) for t in upcoming] if inst.running else []}  # fmt: skip
    elif isinstance(inst.definition, SensorInfo):
        out |= {"minimum_interval_seconds": inst.definition.minimum_interval_seconds,
                "cursor": inst.state.cursor, "last_run_key": inst.state.last_run_key}  # fmt: skip
    out["last_tick_time"] = iso(inst.state.last_tick_time)
    return out


async def _find_instigator(request: web.Request, kind: str) -> Instigator:
    cp = _cp(request)
    name = request.match_info["name"]
    location = request.query.get("location")
    matches = [i for i in await instigators_of(cp, kind) if i.name == name
               and (location is None or i.location == location)]  # fmt: skip
    if not matches:
        raise ApiError(404, f"unknown_{kind}", f"no {kind} named {name!r}"
                       + (f" in location {location!r}" if location else ""))  # fmt: skip
    if len(matches) > 1:
        places = ", ".join(sorted(i.location for i in matches))
        raise ApiError(409, "ambiguous_name",
                       f"{kind} {name!r} is defined in several locations ({places}); "
                       "add ?location=")  # fmt: skip
    return matches[0]


def instigator_routes(kind: str) -> list[tuple[str, str, Any]]:
    """GET list, GET one, GET its ticks, POST start/stop; for schedules or sensors."""

    async def list_all(request: web.Request) -> web.Response:
        cp = _cp(request)
        now = cp.clock.time()
        items = [instigator_json(i, now) for i in await instigators_of(cp, kind)]
        return web.json_response({f"{kind}s": items})

    async def show(request: web.Request) -> web.Response:
        cp = _cp(request)
        inst = await _find_instigator(request, kind)
        ticks = await cp.storage.list_ticks(inst.location, inst.name, kind, 5)
        body = instigator_json(inst, cp.clock.time())
        return web.json_response({**body, "recent_ticks": [t.to_json() for t in ticks]})

    async def ticks(request: web.Request) -> web.Response:
        cp = _cp(request)
        inst = await _find_instigator(request, kind)
        limit = _int_param(request, "limit", 50, 1, 1000)
        found = await cp.storage.list_ticks(inst.location, inst.name, kind, limit)
        return web.json_response({"ticks": [t.to_json() for t in found]})

    def set_status(status: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            cp = _cp(request)
            inst = await _find_instigator(request, kind)
            if inst.definition is None:
                raise ApiError(409, "orphaned", f"{kind} {inst.name} is no longer defined "
                               f"by location {inst.location}")  # fmt: skip
            now = cp.clock.time()
            # Turned on: it ticks from now (no backfill of the time it was off).
            last = now if status == "RUNNING" and kind == "schedule" else None
            await cp.storage.set_instigator(inst.location, inst.name, kind, status=status,
                                            last_tick_time=last)  # fmt: skip
            cp.instigators_changed()
            return web.json_response({"name": inst.name, "location": inst.location,
                                      "status": status})  # fmt: skip

        return handle

    base = f"/api/v1/{kind}s"
    return [
        ("GET", base, list_all),
        ("GET", base + "/{name}", show),
        ("GET", base + "/{name}/ticks", ticks),
        ("POST", base + "/{name}/start", set_status("RUNNING")),
        ("POST", base + "/{name}/stop", set_status("STOPPED")),
    ]


def add_routes(app: web.Application) -> None:
    for kind in ("schedule", "sensor"):
        for method, path, handler in instigator_routes(kind):
            app.router.add_route(method, path, handler)
    app.router.add_post("/api/v1/runs", submit_run)
    app.router.add_get("/api/v1/runs", list_runs)
    app.router.add_get("/api/v1/runs/{run_id}", get_run)
    app.router.add_get("/api/v1/runs/{run_id}/events", get_events)
    app.router.add_get("/api/v1/runs/{run_id}/logs", get_logs)
    app.router.add_post("/api/v1/runs/{run_id}/priority", set_priority)
    app.router.add_post("/api/v1/runs/{run_id}/cancel", cancel_run)
    app.router.add_post("/api/v1/runs/{run_id}/reexecute", reexecute_run)
    app.router.add_get("/api/v1/queue", get_queue)
    app.router.add_get("/api/v1/agents", list_agents)
    app.router.add_post("/api/v1/agents/{agent}/drain", drain_agent)
    app.router.add_post("/api/v1/agents/{agent}/undrain", undrain_agent)
    app.router.add_get("/api/v1/jobs", list_jobs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
