"""The web UI: server-rendered pages over the same views as the JSON API.

Pages are jinja2 templates with autoescaping (every value from a run, a job or a log is
escaped), served with a Content-Security-Policy that allows only this origin's script
and style, so nothing a job prints can run in an operator's browser. A little plain
JavaScript (static/app.js) refreshes the live part of a page, follows compute logs and
sends the buttons' API calls; there is no front-end build step.

With auth on, a user signs in with a user token, kept in an HttpOnly, SameSite=Strict
cookie: the UI never shows it, and the API accepts that cookie only on requests that
carry the `X-Fleetrun-UI` header (which another site cannot send), so a page elsewhere
cannot make a signed-in browser act. The sign-in and sign-out forms are plain posts, so
they are refused when the browser says they come from another origin: a page elsewhere
can neither sign a browser into the attacker's session nor sign it out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from control_plane.http.alerts import alerts_json
from control_plane.http.auth import SESSION_COOKIE, AuthError
from control_plane.http.errors import ApiError
from control_plane.http.fleet import agents_json, queue_json
from control_plane.http.instigators import instigator_json, instigators_of
from control_plane.http.keys import CLOCK, CONFIG, RUN_QUEUE, STORAGE, VERIFIER
from control_plane.http.pools import pools_json
from control_plane.http.runs import find_run, parse_filter, run_json
from control_plane.http.ui.deployment import job_page, jobs_page, launch_page
from control_plane.http.ui.instigator_pages import instigator_page
from control_plane.http.ui.render import HERE, render
from control_plane.http.ui.steps import step_rows
from control_plane.model.runs import Event, Run
from control_plane.model.statuses import TERMINAL_STATUSES, RunStatus
from control_plane.model.times import iso

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
STEP_ENDS = {"STEP_SUCCESS": "success", "STEP_FAILURE": "failure", "STEP_UP_FOR_RETRY": "retry"}
STEP_STARTS = {"STEP_START", "STEP_RESTARTED"}
DEFAULT_PORTS = {"http": 80, "https": 443}


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/runs")


async def runs_page(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    try:
        filt = await parse_filter(storage, request)
    except ApiError as exc:
        return render(request, "error.html", 400, message=exc.message)
    runs, _ = await storage.list_runs(filt, 100, None)
    agents = {a.agent_id: a.name for a in await storage.list_agents()}
    return render(
        request,
        "runs.html",
        runs=[_run_row(r, agents) for r in runs],
        statuses=[str(s) for s in RunStatus],
        agents=sorted(agents.values()),
        query={k: request.query.get(k, "") for k in ("status", "job", "tag", "agent")},
    )


def _run_row(run: Run, agents: dict[str, str]) -> dict[str, Any]:
    row = run.to_json()
    row["agent_name"] = agents.get(run.agent_id or "", run.agent_id or "")
    end = run.end_time or (time.time() if run.start_time else None)
    row["duration"] = f"{end - run.start_time:.1f} s" if run.start_time and end else ""
    row["user_tags"] = {k: v for k, v in run.tags.items() if not k.startswith("fleetrun/")}
    return row


async def run_page(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    run_id = request.match_info["run_id"]
    try:
        run = await find_run(storage, run_id)
    except ApiError as exc:
        message = "No run with that id." if exc.status == 404 else exc.message
        return render(request, "error.html", exc.status, message=message)
    if run.run_id != run_id:  # a short id: the page's address is the whole one
        raise web.HTTPFound(f"/ui/runs/{quote(run.run_id, safe='')}")
    detail = await run_json(storage, run)
    events = await storage.get_events(run.run_id, 0, 10_000)
    agents = {a.agent_id: a.name for a in await storage.list_agents()}
    logged = {c.step for c in await storage.get_logs(run.run_id, None, 0) if c.step}
    steps = sorted({e.step for e in events if e.step} | logged)
    job = (await storage.code_catalog()).job_info(run.location, run.job, run.agent_id)
    now = time.time()
    return render(
        request,
        "run.html",
        run=detail,
        container=run_container(events),
        config=json.dumps(run.config, indent=2, sort_keys=True),
        agent_name=agents.get(run.agent_id or "", ""),
        events=[e.to_json() for e in events],
        gantt=gantt(run, events, now),
        step_rows=step_rows([op.name for op in job.ops] if job else [], run, events),
        now=now,
        iso=iso,
        steps=steps,
        terminal=run.status in TERMINAL_STATUSES,
        reexecutable=run.status in (RunStatus.FAILURE, RunStatus.CANCELED),
    )


def run_container(events: list[Event]) -> dict[str, Any] | None:
    """The image and limits of the run's (last) container, as its agent reported them
    (the docker launcher's ENGINE_EVENT); None for a run not in a container."""
    for event in reversed(events):
        if event.type == "ENGINE_EVENT" and event.data.get("container_id"):
            return event.data
    return None


@dataclass
class Bar:
    step: str
    row: int
    start: float
    end: float
    outcome: str  # success | failure | retry | running | reused | canceled
    x: float = 0.0
    width: float = 0.0


def gantt(run: Run, events: list[Event], now: float) -> dict[str, Any]:
    """Each step attempt as a bar on a shared time axis (retries as separate bars)."""
    rows: dict[str, int] = {}
    bars: list[Bar] = []
    open_bars: dict[str, Bar] = {}
    for event in events:
        if not event.step:
            continue
        row = rows.setdefault(event.step, len(rows))
        if event.type in STEP_STARTS:
            open_bars[event.step] = Bar(event.step, row, event.time, event.time, "running")
            bars.append(open_bars[event.step])
        elif event.type in STEP_ENDS and event.step in open_bars:
            bar = open_bars.pop(event.step)
            bar.end, bar.outcome = event.time, STEP_ENDS[event.type]
        elif event.type == "STEP_REUSED":
            bars.append(Bar(event.step, row, event.time, event.time, "reused"))
    finish = run.end_time or now
    for bar in open_bars.values():
        bar.end = finish
        if run.status in TERMINAL_STATUSES:
            bar.outcome = "canceled" if run.status == RunStatus.CANCELED else "failure"
    if not bars:
        return {"bars": [], "rows": [], "span": 0.0, "height": 0}
    start = min(b.start for b in bars)
    span = max(max(b.end for b in bars) - start, 1e-3)
    width = 1000.0
    for bar in bars:
        bar.x = round((bar.start - start) / span * width, 1)
        bar.width = max(round((bar.end - bar.start) / span * width, 1), 2.0)
    ordered = sorted(rows, key=rows.__getitem__)
    return {
        "bars": bars,
        "rows": ordered,
        "span": span,
        "height": 24 * len(ordered) + 24,
        "width": width,
    }


async def agents_page(request: web.Request) -> web.Response:
    app = request.app
    timeout = app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds
    agents = await agents_json(app[STORAGE], app[CLOCK].time(), timeout)
    return render(request, "agents.html", agents=agents)


async def queue_page(request: web.Request) -> web.Response:
    app = request.app
    queue = await queue_json(app[RUN_QUEUE], app[CLOCK].time())
    return render(request, "queue.html", queue=queue, coordinator=app[CONFIG].run_coordinator)


async def pools_page(request: web.Request) -> web.Response:
    app = request.app
    pools = await pools_json(app[STORAGE], app[CONFIG].concurrency)
    return render(request, "pools.html", pools=pools)


def instigators_page(kind: str) -> Any:
    async def handle(request: web.Request) -> web.Response:
        app = request.app
        now = app[CLOCK].time()
        items = []
        for inst in await instigators_of(app, kind):
            item = instigator_json(inst, now)
            ticks = await app[STORAGE].list_ticks(inst.location, inst.name, kind, 5)
            item["recent_ticks"] = [t.to_json() for t in ticks]
            items.append(item)
        return render(request, "instigators.html", kind=kind, items=items)

    return handle


DELIVERY_BADGES = {"sent": "SUCCESS", "failed": "FAILURE", "pending": "STARTING"}


async def alerts_page(request: web.Request) -> web.Response:
    alerts = await alerts_json(request.app, 100)
    return render(request, "alerts.html", badges=DELIVERY_BADGES, **alerts)


async def login_page(request: web.Request) -> web.Response:
    return render(request, "login.html", next=_safe_next(request.query.get("next")), error=None)


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL or Origin header; None for anything else:
    `null`, garbage, or a look-alike such as `http://127.0.0.1:8470.evil.com`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _own_origin(request: web.Request) -> tuple[str, str, int] | None:
    """The origin the browser sent this request to: its Host header, and the scheme of
    the connection or, behind a proxy that terminates TLS, the proxy's X-Forwarded-Proto.
    A page on another site can set neither header on a form post."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = forwarded if forwarded in DEFAULT_PORTS else request.scheme
    return _origin(f"{scheme}://{request.host}")


def _refuse_cross_origin(request: web.Request) -> None:
    """Refuse (403) a form post whose Origin, or without one its Referer, names another
    origin than the one it was sent to. A post with neither comes from no browser page
    (curl, a script) and cannot be forged from one, so it goes through."""
    claimed = request.headers.get("Origin", request.headers.get("Referer"))
    if claimed is None:
        return
    origin = _origin(claimed)
    if origin is None or origin != _own_origin(request):
        raise ApiError(
            403,
            "cross_origin",
            "sign-in and sign-out are taken only from this "
            "control plane's own pages: the Origin or Referer header names "
            "another origin",
        )


async def login(request: web.Request) -> web.Response:
    """Check the token, then keep it in an HttpOnly cookie; never echo it."""
    _refuse_cross_origin(request)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "")))
    try:
        principal = await request.app[VERIFIER].verify(f"Bearer {token}")
        if principal.kind != "user":
            raise AuthError(403, "forbidden", "sign in with a user token, not an agent token")
    except AuthError as exc:
        message = str(exc) if exc.status == 403 else "That token was not accepted."
        return render(request, "login.html", next=target, error=message)
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=request.app[CONFIG].server.tls,
        max_age=7 * 86400,
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    _refuse_cross_origin(request)
    response = web.HTTPSeeOther("/ui/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def _safe_next(target: str | None) -> str:
    """Only a page of this UI: never an open redirect to another site."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target
    return "/ui/runs"


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.Response(
        body=(HERE / "static" / name).read_bytes(),
        content_type=STATIC_FILES[name],
        headers={"Cache-Control": "max-age=300"},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/runs", runs_page)
    app.router.add_get("/ui/runs/{run_id}", run_page)
    app.router.add_get("/ui/agents", agents_page)
    app.router.add_get("/ui/queue", queue_page)
    app.router.add_get("/ui/pools", pools_page)
    app.router.add_get("/ui/jobs", jobs_page)
    app.router.add_get("/ui/jobs/{location}/{job}", job_page)
    app.router.add_get("/ui/launch", launch_page)
    app.router.add_get("/ui/schedules", instigators_page("schedule"))
    app.router.add_get("/ui/schedules/{name}", instigator_page("schedule"))
    app.router.add_get("/ui/sensors", instigators_page("sensor"))
    app.router.add_get("/ui/sensors/{name}", instigator_page("sensor"))
    app.router.add_get("/ui/alerts", alerts_page)
    app.router.add_get("/ui/login", login_page)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/static/{name}", static)
