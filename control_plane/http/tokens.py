"""Token administration: shared by `fleetrun tokens …` (direct to the database with
--config) and the admin-only `/api/v1/tokens` routes."""

from __future__ import annotations

import re

from aiohttp import web

from control_plane.errors import ControlPlaneError
from control_plane.http.auth import KINDS, ROLES, new_token
from control_plane.http.errors import ApiError, read_json_object
from control_plane.http.keys import CLOCK, STORAGE, VERIFIER
from control_plane.model.tokens import TokenRecord
from control_plane.storage.port import TokenStore

TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class TokenRequestError(ControlPlaneError):
    """A token that cannot be made as asked (its name, kind or role)."""


async def create_token(
    storage: TokenStore, name: object, kind: object, role: object, now: float
) -> tuple[str, TokenRecord]:
    """Store a new token's hash; the token itself is returned here and never again.
    The name, kind and role come as a request gave them: each is checked here."""
    if not isinstance(name, str) or not TOKEN_NAME_RE.match(name):
        raise TokenRequestError("name must match ^[A-Za-z0-9_.-]{1,128}$")
    if not isinstance(kind, str):
        raise TokenRequestError(f"kind must be one of {', '.join(KINDS)}")
    if role is not None and not isinstance(role, str):
        raise TokenRequestError(f"role must be one of {', '.join(ROLES)}")
    if kind == "agent" and role is not None:
        raise TokenRequestError("agent tokens have no role")
    try:
        token, record = new_token(name, kind, role, now)
    except ValueError as exc:
        raise TokenRequestError(str(exc)) from None
    await storage.create_token(record)
    return token, record


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await request.app[STORAGE].list_tokens()
    return web.json_response({"tokens": [t.to_json() for t in tokens]})


async def post_token(request: web.Request) -> web.Response:
    app = request.app
    body = await read_json_object(request)
    unknown = set(body) - {"name", "kind", "role"}
    if unknown:
        raise ApiError(422, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    try:
        token, record = await create_token(
            app[STORAGE], body.get("name"), body.get("kind"), body.get("role"), app[CLOCK].time()
        )  # NameTaken: 409 name_taken
    except TokenRequestError as exc:
        raise ApiError(422, "bad_request", str(exc)) from None
    return web.json_response({**record.to_json(), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    app = request.app
    record = await app[STORAGE].revoke_token(request.match_info["name"], app[CLOCK].time())
    if record is None:
        raise ApiError(404, "unknown_token", "no live token with that name")
    app[VERIFIER].forget(record.token_id)
    return web.json_response(record.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/tokens", list_tokens)
    app.router.add_post("/api/v1/tokens", post_token)
    app.router.add_post("/api/v1/tokens/{name}/revoke", revoke_token)
