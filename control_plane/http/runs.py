"""Runs under /api/v1/runs: where a run is submitted, watched, canceled and re-executed.

A submission becomes a run with `model/submission.py` (the job's tags merged, every
value checked as an agent will receive it) and enters the queue with
`daemon/run_queue.enqueue`; the rest reads storage or asks it for one change.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from control_plane.bus import QUEUE, runs_changed
from control_plane.daemon.run_queue import enqueue
from control_plane.fleet.dispatch import wake_step_agents
from control_plane.http.errors import ApiError, read_json_object
from control_plane.http.keys import BUS, CLOCK, RUN_RULES, RUN_WATCHERS, STORAGE
from control_plane.http.params import MAX_LIST_LIMIT, int_param, wait_param
from control_plane.model.runs import Event, LogChunk, NewRun, Run, RunFilter, tag_filter_pair
from control_plane.model.statuses import TERMINAL_STATUSES, RunStatus
from control_plane.model.submission import check_config, check_new_run, job_tags, new_run
from control_plane.storage.port import Storage
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

NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,128}$")  # the form of job, location and step names
MIN_RUN_ID_PREFIX = 4
RUN_ID_PREFIX_RE = re.compile(rf"[A-Za-z0-9_-]{{{MIN_RUN_ID_PREFIX},64}}")
AMBIGUOUS_SHOWN = 5  # matching ids named in an ambiguous_run_id error


@dataclass
class SubmitRunRequest:
    job: str
    location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReexecuteRequest:
    strategy: str = "FROM_FAILURE"


@dataclass
class PriorityRequest:
    priority: int


def _body(cls: type[Any], data: dict[str, Any]) -> Any:
    try:
        return from_plain(cls, data)
    except SchemaError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None


async def resolve_location(storage: Storage, job: str, location: str | None) -> str:
    """The location hosting `job`: the one given, or the only one that defines it."""
    catalog = await storage.code_catalog()
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
        places = ", ".join(sorted(hosting))
        message = f"job {job!r} is defined in several locations ({places}); give location"
        raise ApiError(422, "ambiguous_job", message)
    return hosting.pop()


async def submit_run(request: web.Request) -> web.Response:
    """A new run of a job, with the job's own tags under the request's."""
    app = request.app
    rules = app[RUN_RULES]
    body = _body(SubmitRunRequest, await read_json_object(request))
    if name_problem(body.job):
        raise ApiError(422, "bad_request", f"job {name_problem(body.job)}")
    if body.location is not None and name_problem(body.location):
        raise ApiError(422, "bad_request", f"location {name_problem(body.location)}")
    if (problem := tag_problem(body.tags, rules.tags)) is not None:
        code = "too_many_tags" if problem.startswith("a run may") else "bad_tag"
        raise ApiError(422, code, problem)
    check_config(body.config, rules)  # before anything is looked up
    storage = app[STORAGE]
    location = await resolve_location(storage, body.job, body.location)
    catalog = await storage.code_catalog()
    new = new_run(
        str(uuid.uuid4()),
        body.job,
        location,
        body.tags,
        body.config,
        job_own_tags=job_tags(catalog, location, body.job),
    )
    check_new_run(new, rules, config_checked=True)
    return await _queued(request, new)


async def _queued(request: web.Request, new: NewRun) -> web.Response:
    app = request.app
    run = await enqueue(app[STORAGE], app[BUS], new, app[CLOCK].time())
    return web.json_response({"run_id": run.run_id, "status": str(run.status)}, status=201)


async def reexecute_run(request: web.Request) -> web.Response:
    """A new run of a FAILURE/CANCELED run's job; FROM_FAILURE reuses its finished steps."""
    app = request.app
    storage = app[STORAGE]
    parent = await run_or_404(storage, request)
    body = _body(ReexecuteRequest, await read_json_object(request))
    if body.strategy not in RETRY_STRATEGIES:
        raise ApiError(422, "bad_request", f"strategy must be one of {', '.join(RETRY_STRATEGIES)}")
    if parent.status not in (RunStatus.FAILURE, RunStatus.CANCELED):
        message = f"run is {parent.status}; only FAILURE or CANCELED runs are re-executed"
        raise ApiError(409, "not_reexecutable", message)
    reuse = {} if body.strategy == "ALL_STEPS" else await storage.reusable_outputs(parent)
    root = parent.root_run_id or parent.run_id
    tags = {k: v for k, v in parent.tags.items() if k != RETRY_NUMBER_TAG}
    lineage = {PARENT_TAG: parent.run_id, ROOT_TAG: root, REEXECUTION_TAG: body.strategy}
    new = new_run(
        str(uuid.uuid4()),
        parent.job,
        parent.location,
        tags,
        parent.config,
        own_tags=lineage,
        parent_run_id=parent.run_id,
        root_run_id=root,
        reuse_outputs=reuse,
    )
    new.wanted_code_version = parent.code_version  # its agent says if it still has it
    check_new_run(new, app[RUN_RULES], reserved_ok=True)
    return await _queued(request, new)


async def parse_filter(storage: Storage, request: web.Request) -> RunFilter:
    """?status=A,B&job=&tag=k=v (repeatable; k:v too)&agent=NAME-or-ID."""
    filt = RunFilter()
    for raw in request.query.getall("status", []):
        for name in raw.split(","):
            try:
                filt.statuses.append(RunStatus(name.strip().upper()))
            except ValueError:
                raise ApiError(400, "bad_parameter", f"unknown run status {name!r}") from None
    filt.job = request.query.get("job") or None
    for raw in request.query.getall("tag", []):
        pair = tag_filter_pair(raw)
        if pair is None:
            raise ApiError(400, "bad_parameter", f"tag filter must be key=value, got {raw!r}")
        filt.tags.append(pair)
    agent = request.query.get("agent")
    if agent:
        agents = await storage.list_agents()
        match = next((a for a in agents if agent in (a.agent_id, a.name)), None)
        filt.agent_id = match.agent_id if match is not None else "-"  # unknown: no runs
    return filt


async def list_runs(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    filt = await parse_filter(storage, request)
    limit = int_param(request, "limit", 100, 1, MAX_LIST_LIMIT)
    raw_cursor = request.query.get("cursor")
    cursor = None
    if raw_cursor:
        if not re.fullmatch(r"[0-9]{1,18}", raw_cursor):
            raise ApiError(400, "bad_parameter", f"cursor {raw_cursor!r} is not valid")
        cursor = int(raw_cursor)
    runs, next_cursor = await storage.list_runs(filt, limit, cursor)
    return web.json_response(
        {
            "runs": [r.to_json() for r in runs],
            "next_cursor": str(next_cursor) if next_cursor is not None else None,
        }
    )


async def run_or_404(storage: Storage, request: web.Request) -> Run:
    return await find_run(storage, request.match_info["run_id"])


async def find_run(storage: Storage, given: str) -> Run:
    """The run `given` names: its whole id, or a unique prefix of at least
    `MIN_RUN_ID_PREFIX` characters (the UI shows the first 8). 409 when the prefix
    starts several runs, naming some; 404 when it starts none."""
    run = await storage.get_run(given) if len(given) <= 64 else None
    if run is None and RUN_ID_PREFIX_RE.fullmatch(given):
        matches = await storage.run_ids_with_prefix(given, AMBIGUOUS_SHOWN + 1)
        if len(matches) > 1:
            raise ApiError(409, "ambiguous_run_id", ambiguous_message(given, matches))
        run = await storage.get_run(matches[0]) if matches else None
    if run is None:
        raise ApiError(404, "unknown_run", f"no run with id {given!r}")
    return run


def ambiguous_message(prefix: str, matches: list[str]) -> str:
    shown = ", ".join(matches[:AMBIGUOUS_SHOWN])
    more = " and more" if len(matches) > AMBIGUOUS_SHOWN else ""
    return f"run id {prefix!r} is ambiguous: it starts runs {shown}{more}; give more characters"


async def get_run(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    return web.json_response(await run_json(storage, await run_or_404(storage, request)))


async def run_json(storage: Storage, run: Run) -> dict[str, Any]:
    """The run, with `chain`: its root and every retry and re-execution of it, oldest
    first. A deleted root stays in the chain as {"status": "DELETED", "kind": "deleted"}:
    its retries still name it as their parent and root."""
    root_id = run.root_run_id or run.run_id
    family, _ = await storage.list_runs(RunFilter(root_run_id=root_id), 1000, None)
    if not family:
        return {**run.to_json(), "chain": []}
    root = run if root_id == run.run_id else await storage.get_run(root_id)
    first = DELETED_LINK | {"run_id": root_id} if root is None else _link(root)
    chain = [first] + [_link(r) for r in sorted(family, key=lambda r: r.create_time)]
    return {**run.to_json(), "chain": chain}


DELETED_LINK: dict[str, Any] = {"status": "DELETED", "parent_run_id": None, "kind": "deleted"}


def _link(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "status": str(run.status),
        "parent_run_id": run.parent_run_id,
        "kind": _lineage_kind(run),
    }


def _lineage_kind(run: Run) -> str:
    if run.parent_run_id is None:
        return "original"
    return "retry" if RETRY_NUMBER_TAG in run.tags else "reexecution"


async def get_events(request: web.Request) -> web.Response:
    """Events after `after`; with `wait`, held open until one arrives (long-poll)."""
    storage = request.app[STORAGE]
    run = await run_or_404(storage, request)
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 1000, 1, 10_000)
    wait = wait_param(request)

    async def fetch() -> list[Event]:
        return await storage.get_events(run.run_id, after, limit)

    events = await fetch()
    if not events and wait > 0:
        events = await request.app[RUN_WATCHERS].wait_for(run.run_id, fetch, wait) or []
    return web.json_response({"events": [e.to_json() for e in events]})


async def get_logs(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    run = await run_or_404(storage, request)
    step = request.query.get("step") or None
    if step is not None and not NAME_RE.match(step):
        raise ApiError(400, "bad_parameter", "step must match ^[A-Za-z0-9_]{1,128}$")
    after = int_param(request, "after", 0, 0, 2**62)
    wait = wait_param(request)

    async def fetch() -> tuple[list[LogChunk]] | None:
        """New chunks, or none once the run has ended (so a follower can stop); else None."""
        chunks = await storage.get_logs(run.run_id, step, after)
        if chunks:
            return (chunks,)
        current = await storage.get_run(run.run_id)
        return ([],) if current is None or current.status in TERMINAL_STATUSES else None

    found = await fetch()
    if found is None and wait > 0:
        found = await request.app[RUN_WATCHERS].wait_for(run.run_id, fetch, wait)
    chunks = found[0] if found else []
    return web.json_response({"logs": [c.to_json() for c in chunks]})


async def set_priority(request: web.Request) -> web.Response:
    app = request.app
    storage = app[STORAGE]
    run = await run_or_404(storage, request)
    body = _body(PriorityRequest, await read_json_object(request))
    if not -(2**31) <= body.priority < 2**31:
        raise ApiError(422, "bad_request", "priority must fit in 32 bits")
    updated = await storage.set_priority(run.run_id, body.priority, app[CLOCK].time())
    if updated is None or updated.status != RunStatus.QUEUED:
        status = updated.status if updated else run.status
        raise ApiError(409, "not_queued", f"run is {status}; only a queued run's priority changes")
    app[BUS].publish(QUEUE)
    return web.json_response(updated.to_json())


async def cancel_run(request: web.Request) -> web.Response:
    """QUEUED: CANCELED at once. STARTING/STARTED: CANCELING; the agent stops the worker."""
    app = request.app
    storage = app[STORAGE]
    run = await run_or_404(storage, request)
    if run.status in TERMINAL_STATUSES:
        raise ApiError(409, "already_finished", f"run already ended with {run.status}")
    updated = await storage.request_cancel(run.run_id, app[CLOCK].time()) or run
    if updated.status in (RunStatus.SUCCESS, RunStatus.FAILURE):
        raise ApiError(409, "already_finished", f"run already ended with {updated.status}")
    runs_changed(app[BUS], [updated])
    await wake_step_agents(storage, app[BUS], [run.run_id])
    return web.json_response({"run_id": run.run_id, "status": str(updated.status)})


async def delete_run(request: web.Request) -> web.Response:
    """A finished run and everything stored under it (admin). 409 run_active while it
    has not ended; 409 run_has_live_children while a retry or re-execution of it runs."""
    storage = request.app[STORAGE]
    run = await run_or_404(storage, request)
    deleted = await storage.delete_run(run.run_id)
    return web.json_response({"run_id": deleted.run_id, "deleted": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/runs", submit_run)
    app.router.add_get("/api/v1/runs", list_runs)
    app.router.add_get("/api/v1/runs/{run_id}", get_run)
    app.router.add_delete("/api/v1/runs/{run_id}", delete_run)
    app.router.add_get("/api/v1/runs/{run_id}/events", get_events)
    app.router.add_get("/api/v1/runs/{run_id}/logs", get_logs)
    app.router.add_post("/api/v1/runs/{run_id}/priority", set_priority)
    app.router.add_post("/api/v1/runs/{run_id}/cancel", cancel_run)
    app.router.add_post("/api/v1/runs/{run_id}/reexecute", reexecute_run)
