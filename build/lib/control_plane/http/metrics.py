"""`GET /metrics` (Prometheus text format) and the middleware that times every request.

No label value comes from user input: routes are labelled by their template, methods
outside a fixed set become "other"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control_plane.http.keys import CLOCK, CONFIG, METRICS, STORAGE
from control_plane.metrics import Metrics

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
CLIENT_CLOSED = 499  # nginx's code for a request cancelled before it was answered


def route_label(request: web.Request) -> str:
    """The matched route's template (`/api/v1/runs/{run_id}`), never the concrete path."""
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return UNMATCHED
    return info.route.resource.canonical


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_metrics(metrics: Metrics) -> object:
    """Middleware timing every request; put it first so that it sees the final status
    (auth refusals and errors included)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            method = request.method if request.method in HTTP_METHODS else "other"
            metrics.http_duration.labels(
                method, route_label(request), f"{status // 100}xx"
            ).observe(time.perf_counter() - start)

    return middleware


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text format; no token needed (see ROUTE_ACCESS)."""
    metrics, storage = request.app[METRICS], request.app[STORAGE]
    timeout = request.app[CONFIG].run_monitoring.agent_heartbeat_timeout_seconds
    await metrics.refresh(storage, storage, request.app[CLOCK].time(), timeout)
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
