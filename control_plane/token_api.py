"""Token administration: shared by `fleetrun tokens …` (direct to the database with
--config) and the admin-only `/api/v1/tokens` routes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web

from control_plane.auth import new_token
from control_plane.errors import ApiError, read_json_object
from control_plane.storage import NameTaken, Storage, TokenRecord

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class TokenRequestError(ValueError):
    pass


async def create_token(
    storage: Storage, name: str, kind: str, role: str | None, now: float
) -> tuple[str, TokenRecord]:
    """Store a new token's hash; the token itself is returned here and never again."""
    if not isinstance(name, str) or not TOKEN_NAME_RE.match(name):
        raise TokenRequestError("name must match ^[A-Za-z0-9_.-]{1,128}$")
    if kind == "agent" and role is not None:
        raise TokenRequestError("agent tokens have no role")
    try:
        token, record = new_token(name, kind, role, now)
    except ValueError as exc:
        raise TokenRequestError(str(exc)) from None
    await storage.create_token(record)
    return token, record


def _cp(request: web.Request) -> ControlPlane:
    from control_plane.app import CONTROL_PLANE

    return request.app[CONTROL_PLANE]


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await _cp(request).storage.list_tokens()
    return web.json_response({"tokens": [t.to_json() for t in tokens]})


async def post_token(request: web.Request) -> web.Response:
    cp = _cp(request)
    body = await read_json_object(request)
    unknown = set(body) - {"name", "kind", "role"}
    if unknown:
        raise ApiError(422, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    try:
        token, record = await create_token(
            cp.storage, body.get("name"), body.get("kind"), body.get("role"), cp.clock.time()
        )
    except TokenRequestError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None
    except NameTaken as exc:
        raise ApiError(409, "name_taken", str(exc)) from None
    return web.json_response({**record.to_json(), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    cp = _cp(request)
    record = await cp.storage.revoke_token(request.match_info["name"], cp.clock.time())
    if record is None:
        raise ApiError(404, "unknown_token", "no live token with that name")
    cp.verifier.forget(record.token_id)
    return web.json_response(record.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/tokens", list_tokens)
    app.router.add_post("/api/v1/tokens", post_token)
    app.router.add_post("/api/v1/tokens/{name}/revoke", revoke_token)
