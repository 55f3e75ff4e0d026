"""Schedules and sensors under /api/v1/schedules and /api/v1/sensors: what the fleet's
code locations define, their state and ticks, and starting and stopping them."""

from __future__ import annotations

from itertools import islice
from typing import Any

from aiohttp import web

from control_plane.bus import instigators_changed
from control_plane.daemon.instigators import Instigator, load_instigators
from control_plane.daemon.ticks import ticks_after
from control_plane.http.errors import ApiError
from control_plane.http.keys import BUS, CLOCK, CONFIG, STORAGE
from control_plane.http.params import int_param
from control_plane.model.times import iso
from protocol.messages import ScheduleInfo, SensorInfo


async def instigators_of(app: web.Application, kind: str) -> list[Instigator]:
    timeout = app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds
    found = await load_instigators(app[STORAGE], app[CLOCK].time(), timeout)
    return [i for i in found if i.kind == kind]


def instigator_json(inst: Instigator, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": inst.name,
        "location": inst.location,
        "status": inst.status,
        "job": inst.definition.job if inst.definition else None,
    }
    if isinstance(inst.definition, ScheduleInfo):
        after = max(now, inst.state.last_tick_time or now)
        upcoming = list(
            islice(ticks_after(inst.definition.cron, inst.definition.timezone, after), 3)
        )
        out |= {
            "cron": inst.definition.cron,
            "timezone": inst.definition.timezone,
            "catchup": inst.definition.catchup,
            "next_ticks": [iso(t) for t in upcoming] if inst.running else [],
        }
    elif isinstance(inst.definition, SensorInfo):
        out |= {
            "minimum_interval_seconds": inst.definition.minimum_interval_seconds,
            "cursor": inst.state.cursor,
            "last_run_key": inst.state.last_run_key,
            "run_status": inst.definition.run_status,
            "monitored_jobs": inst.definition.monitored_jobs,
            "monitor_all_locations": inst.definition.monitor_all_locations,
        }
    out["last_tick_time"] = iso(inst.state.last_tick_time)
    return out


async def find_instigator(request: web.Request, kind: str) -> Instigator:
    name = request.match_info["name"]
    location = request.query.get("location")
    matches = [
        i
        for i in await instigators_of(request.app, kind)
        if i.name == name and (location is None or i.location == location)
    ]
    if not matches:
        raise ApiError(
            404,
            f"unknown_{kind}",
            f"no {kind} named {name!r}" + (f" in location {location!r}" if location else ""),
        )
    if len(matches) > 1:
        places = ", ".join(sorted(i.location for i in matches))
        raise ApiError(
            409,
            "ambiguous_name",
            f"{kind} {name!r} is defined in several locations ({places}); add ?location=",
        )
    return matches[0]


def instigator_routes(kind: str) -> list[tuple[str, str, Any]]:
    """GET list, GET one, GET its ticks, POST start/stop; for schedules or sensors."""

    async def list_all(request: web.Request) -> web.Response:
        now = request.app[CLOCK].time()
        items = [instigator_json(i, now) for i in await instigators_of(request.app, kind)]
        return web.json_response({f"{kind}s": items})

    async def show(request: web.Request) -> web.Response:
        inst = await find_instigator(request, kind)
        ticks = await request.app[STORAGE].list_ticks(inst.location, inst.name, kind, 5)
        body = instigator_json(inst, request.app[CLOCK].time())
        return web.json_response({**body, "recent_ticks": [t.to_json() for t in ticks]})

    async def ticks(request: web.Request) -> web.Response:
        inst = await find_instigator(request, kind)
        limit = int_param(request, "limit", 50, 1, 1000)
        found = await request.app[STORAGE].list_ticks(inst.location, inst.name, kind, limit)
        return web.json_response({"ticks": [t.to_json() for t in found]})

    def set_status(status: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            app = request.app
            inst = await find_instigator(request, kind)
            if inst.definition is None:
                raise ApiError(
                    409,
                    "orphaned",
                    f"{kind} {inst.name} is no longer defined by location {inst.location}",
                )
            now = app[CLOCK].time()
            # Turned on: it ticks from now (no backfill of the time it was off).
            last = now if status == "RUNNING" and kind == "schedule" else None
            await app[STORAGE].set_instigator(
                inst.location, inst.name, kind, status=status, last_tick_time=last
            )
            instigators_changed(app[BUS])
            return web.json_response(
                {"name": inst.name, "location": inst.location, "status": status}
            )

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
