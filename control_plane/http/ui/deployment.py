"""The deployment pages: what the fleet's code locations define (per agent, with load
errors in full), one job with its op graph and recent runs, and the launch form."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from control_plane.http.keys import CLOCK, CONFIG, STORAGE
from control_plane.http.ui.graph import layout
from control_plane.http.ui.render import render
from control_plane.model.agents import agent_status
from control_plane.model.catalog import CodeLocation
from control_plane.model.runs import RunFilter
from protocol.messages import JobInfo

RECENT_RUNS = 20


@dataclass
class JobEntry:
    """A job as the fleet defines it: one row however many agents serve its location."""

    location: str
    info: JobInfo
    agents: list[str] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    sensors: list[str] = field(default_factory=list)


def job_entries(locations: list[CodeLocation], agent_names: dict[str, str]) -> list[JobEntry]:
    """Every (location, job), sorted, with the agents serving it and the schedules and
    sensors that target it (as the first agent to define the location reports them)."""
    entries: dict[tuple[str, str], JobEntry] = {}
    for loc in locations:
        agent = agent_names.get(loc.agent_id, loc.agent_id)
        for job in loc.info.jobs:
            entry = entries.setdefault((loc.info.name, job.name), JobEntry(loc.info.name, job))
            if agent not in entry.agents:
                entry.agents.append(agent)
        for schedule in loc.info.schedules:
            _add(_target(entries, loc.info.name, schedule.job).schedules, schedule.name)
        for sensor in loc.info.sensors:
            _add(_target(entries, loc.info.name, sensor.job).sensors, sensor.name)
    return [entries[key] for key in sorted(entries)]


def _add(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _target(entries: dict[tuple[str, str], JobEntry], location: str, job: str) -> JobEntry:
    """The entry `job` names, or a throwaway one when it is not defined (yet)."""
    entry = entries.get((location, job))
    if entry is None:
        return JobEntry(location, JobInfo(job))
    return entry


async def jobs_page(request: web.Request) -> web.Response:
    """Code locations per agent (a load error shown in full), then every job."""
    app = request.app
    storage = app[STORAGE]
    now = app[CLOCK].time()
    timeout = app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds
    agents = await storage.list_agents()
    names = {a.agent_id: a.name for a in agents}
    locations = await storage.list_code_locations()
    by_agent = [
        {
            "name": agent.name,
            "status": agent_status(agent, now, timeout),
            "locations": [loc.info for loc in locations if loc.agent_id == agent.agent_id],
        }
        for agent in sorted(agents, key=lambda a: a.name)
    ]
    jobs = job_entries(locations, names)
    return render(request, "jobs.html", agents=by_agent, jobs=jobs)


async def job_page(request: web.Request) -> web.Response:
    """One job: its op graph, its ops' tags, what targets it, and its recent runs."""
    storage = request.app[STORAGE]
    location, name = request.match_info["location"], request.match_info["job"]
    names = {a.agent_id: a.name for a in await storage.list_agents()}
    found = [
        e for e in job_entries(await storage.list_code_locations(), names) if e.location == location
    ]
    entry = next((e for e in found if e.info.name == name), None)
    if entry is None:
        message = f"No code location {location!r} with a job {name!r} is registered."
        return render(request, "error.html", 404, message=message)
    runs, _ = await storage.list_runs(RunFilter(job=name), 200, None)
    recent = [r.to_json() for r in runs if r.location == location][:RECENT_RUNS]
    return render(
        request,
        "job.html",
        job=entry,
        graph=layout(entry.info.ops),
        runs=recent,
    )


async def launch_page(request: web.Request) -> web.Response:
    """The launchpad: the form is sent by static/app.js as JSON to POST /api/v1/runs."""
    storage = request.app[STORAGE]
    names = {a.agent_id: a.name for a in await storage.list_agents()}
    jobs = job_entries(await storage.list_code_locations(), names)
    chosen = f"{request.query.get('location', '')}/{request.query.get('job', '')}"
    return render(request, "launch.html", jobs=jobs, chosen=chosen)
