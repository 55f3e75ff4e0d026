"""Concurrency pools under /api/v1/pools: each pool's limit, who holds its slots and who
waits for one, in the order they will get them; setting and removing limits."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.bus import pools_changed
from control_plane.config import MAX_POOL_LIMIT, ConcurrencyConfig
from control_plane.http.errors import ApiError, read_json_object
from control_plane.http.keys import BUS, CLOCK, CONFIG, STORAGE
from control_plane.model.pools import pool_usage
from control_plane.storage.port import PoolStore
from protocol.validation import name_problem


async def pools_json(storage: PoolStore, config: ConcurrencyConfig) -> dict[str, Any]:
    """Every pool with a limit or a claim: limit, slots in use, holders, waiters in order."""
    limits = config.limits(await storage.pool_limits())
    usage = pool_usage(await storage.pool_claims(), limits)
    return {
        "granularity": config.granularity,
        "default_pool_limit": config.default_pool_limit,
        "pools": [u.to_json() for u in usage],
    }


async def list_pools(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(await pools_json(app[STORAGE], app[CONFIG].concurrency))


def _pool_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if (problem := name_problem(name)) is not None:
        raise ApiError(400, "bad_parameter", f"pool name {problem}")
    return name


async def set_pool(request: web.Request) -> web.Response:
    """`{"limit": N}`: at most N slots of the pool in use at once (0: paused); it wins
    over `[[concurrency.pools]]`. Waiting steps that now fit start at once."""
    app = request.app
    name = _pool_name(request)
    body = await read_json_object(request)
    unknown = sorted(body.keys() - {"limit"})
    if unknown:
        raise ApiError(422, "bad_request", f"unknown field {unknown[0]!r}: only limit is taken")
    limit = body.get("limit")
    if type(limit) is not int or not 0 <= limit <= MAX_POOL_LIMIT:
        message = f"limit must be an integer from 0 to {MAX_POOL_LIMIT} (0: paused), got {limit!r}"
        raise ApiError(422, "bad_request", message)
    await app[STORAGE].set_pool_limit(name, limit, app[CLOCK].time())
    pools_changed(app[BUS], limit=True)
    return web.json_response({"name": name, "limit": limit, "source": "api"})


async def delete_pool(request: web.Request) -> web.Response:
    """Forget the limit set through the API: the config's, or the default, applies."""
    app = request.app
    name = _pool_name(request)
    if not await app[STORAGE].delete_pool_limit(name):
        raise ApiError(404, "unknown_pool", f"no limit was set for pool {name!r} through the API")
    pools_changed(app[BUS], limit=True)
    limits = app[CONFIG].concurrency.limits()
    return web.json_response(
        {"name": name, "limit": limits.limit_of(name), "source": limits.source_of(name)}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/pools", list_pools)
    app.router.add_put("/api/v1/pools/{name}", set_pool)
    app.router.add_delete("/api/v1/pools/{name}", delete_pool)
