"""`GET /healthz` (the process answers) and `GET /readyz` (storage and every daemon loop
this replica runs are working), each with this control plane's version; `GET
/api/v1/version` for the versions alone (which fleetrun, which agent protocol)."""

from __future__ import annotations

from aiohttp import web

from control_plane.http.errors import ApiError
from control_plane.http.keys import ELECTOR, HEALTH, STORAGE
from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": FLEETRUN_VERSION})


async def version(request: web.Request) -> web.Response:
    """Which fleetrun answers, and the agent protocol it speaks (agents one version
    older are served too), so an operator can tell what an upgrade changed."""
    return web.json_response({"version": FLEETRUN_VERSION, "protocol_version": PROTOCOL_VERSION})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    storage, health, elector = app[STORAGE], app[HEALTH], app[ELECTOR]
    try:
        await storage.list_agents()
    except Exception as exc:
        raise ApiError(503, "storage_unavailable", f"storage is not reachable: {exc}") from None
    full = storage.full_reason()
    if full is not None:
        raise ApiError(503, "storage_full", f"storage cannot write: {full}")
    stale = health.stale()
    if stale:
        raise ApiError(503, "daemon_stale", f"daemon loops not running: {', '.join(stale)}")
    return web.json_response(
        {
            "status": "ready",
            "version": FLEETRUN_VERSION,
            "replica": elector.holder,
            "leading": elector.leading(),
            "loops": health.to_json(),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/version", version)
