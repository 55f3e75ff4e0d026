"""Who may call what: bearer tokens of two kinds, three user roles, one route table.

A token looks like `fru_<id>_<secret>` (user) or `fra_<id>_<secret>` (agent): the prefix
lets secret scanners spot a leaked one, the id finds its row, and only a salted SHA-256
of the 256-bit secret is stored (compared in constant time). Verified tokens are cached
for `CACHE_SECONDS`, so a revocation made anywhere takes effect within that time.

Every route is listed in `ROUTE_ACCESS`; a route missing from it is refused (deny by
default), and a test fails if the router and the table disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from control_plane.errors import ControlPlaneError
from control_plane.model.tokens import TokenRecord
from control_plane.storage.port import TokenStore

log = logging.getLogger("fleetrun.auth")

KINDS = ("agent", "user")
ROLES = ("viewer", "operator", "admin")
PREFIXES = {"agent": "fra", "user": "fru"}
SESSION_COOKIE = "fleetrun_session"  # the web UI's sign-in: a user token, HttpOnly
UI_HEADER = "X-Fleetrun-UI"  # the UI's API calls; the cookie counts only with it (CSRF)
CACHE_SECONDS = 1.0
TOUCH_SECONDS = 60.0  # how often `last_used` is written for a busy token
MAX_TOKEN_CHARS = 256

PUBLIC, AGENT, VIEWER, OPERATOR, ADMIN = "public", "agent", "viewer", "operator", "admin"


def _instigator_routes(kind: str) -> dict[tuple[str, str], str]:
    base = f"/api/v1/{kind}s"
    return {
        ("GET", base): VIEWER,
        ("GET", base + "/{name}"): VIEWER,
        ("GET", base + "/{name}/ticks"): VIEWER,
        ("POST", base + "/{name}/start"): OPERATOR,
        ("POST", base + "/{name}/stop"): OPERATOR,
    }


ROUTE_ACCESS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/api/v1/version"): PUBLIC,  # what /healthz shows too
    ("GET", "/metrics"): PUBLIC,  # Prometheus scrapes without a token (no run data in it)
    ("GET", "/"): PUBLIC,  # a redirect to /ui/runs
    ("GET", "/ui/runs"): VIEWER,
    ("GET", "/ui/runs/{run_id}"): VIEWER,
    ("GET", "/ui/agents"): VIEWER,
    ("GET", "/ui/queue"): VIEWER,
    ("GET", "/ui/jobs"): VIEWER,
    ("GET", "/ui/jobs/{location}/{job}"): VIEWER,
    ("GET", "/ui/launch"): VIEWER,
    ("GET", "/ui/schedules"): VIEWER,
    ("GET", "/ui/schedules/{name}"): VIEWER,
    ("GET", "/ui/sensors"): VIEWER,
    ("GET", "/ui/sensors/{name}"): VIEWER,
    ("GET", "/ui/alerts"): VIEWER,
    ("GET", "/ui/login"): PUBLIC,
    ("POST", "/ui/login"): PUBLIC,
    ("POST", "/ui/logout"): PUBLIC,
    ("GET", "/ui/static/{name}"): PUBLIC,
    ("POST", "/api/v1/runs"): OPERATOR,
    ("GET", "/api/v1/runs"): VIEWER,
    ("GET", "/api/v1/runs/{run_id}"): VIEWER,
    ("GET", "/api/v1/runs/{run_id}/events"): VIEWER,
    ("GET", "/api/v1/runs/{run_id}/logs"): VIEWER,
    ("POST", "/api/v1/runs/{run_id}/priority"): OPERATOR,
    ("POST", "/api/v1/runs/{run_id}/cancel"): OPERATOR,
    ("POST", "/api/v1/runs/{run_id}/reexecute"): OPERATOR,
    ("DELETE", "/api/v1/runs/{run_id}"): ADMIN,
    ("GET", "/api/v1/queue"): VIEWER,
    ("GET", "/api/v1/agents"): VIEWER,
    ("POST", "/api/v1/agents/{agent}/drain"): OPERATOR,
    ("POST", "/api/v1/agents/{agent}/undrain"): OPERATOR,
    ("POST", "/api/v1/agents/{agent}/reload"): OPERATOR,
    ("GET", "/api/v1/jobs"): VIEWER,
    ("GET", "/api/v1/pools"): VIEWER,
    ("PUT", "/api/v1/pools/{name}"): OPERATOR,
    ("DELETE", "/api/v1/pools/{name}"): OPERATOR,
    ("GET", "/ui/pools"): VIEWER,
    ("GET", "/api/v1/alerts"): VIEWER,
    ("GET", "/api/v1/openapi.json"): PUBLIC,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens/{name}/revoke"): ADMIN,
    **_instigator_routes("schedule"),
    **_instigator_routes("sensor"),
    ("POST", "/agent/v1/register"): AGENT,
    ("POST", "/agent/v1/poll"): AGENT,
    ("POST", "/agent/v1/heartbeat"): AGENT,
    ("POST", "/agent/v1/events"): AGENT,
    ("POST", "/agent/v1/drain"): AGENT,
    ("POST", "/agent/v1/locations"): AGENT,
    ("POST", "/agent/v1/evaluation"): AGENT,
    ("GET", "/agent/v1/version"): AGENT,
    ("PUT", "/agent/v1/outputs/{run_id}/{step}"): AGENT,
    ("GET", "/agent/v1/outputs/{run_id}/{step}"): AGENT,
}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, as its token says."""

    name: str
    kind: str
    role: str | None

    def may(self, access: str) -> bool:
        if access == PUBLIC:
            return True
        if access == AGENT:
            return self.kind == "agent"
        if self.kind != "user" or self.role not in ROLES:
            return False
        return ROLES.index(self.role) >= ROLES.index(access)


class AuthError(ControlPlaneError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def new_token(name: str, kind: str, role: str | None, now: float) -> tuple[str, TokenRecord]:
    """A fresh token (returned once, never stored) and the record that verifies it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "user" and role not in ROLES:
        raise ValueError(f"a user token needs a role: one of {', '.join(ROLES)}")
    if kind == "agent" and role is not None:
        raise ValueError("agent tokens have no role")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = TokenRecord(token_id, name, kind, role, salt, hash_secret(salt, secret), now)
    return f"{PREFIXES[kind]}_{token_id}_{secret}", record


def parse_bearer(header: str | None) -> tuple[str, str, str]:
    """(prefix, token id, secret) from an Authorization header; AuthError 401 if unusable."""
    if not header:
        raise AuthError(401, "unauthenticated", "this call needs Authorization: Bearer TOKEN")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "unauthenticated", "the Authorization header must be Bearer TOKEN")
    token = token.strip()
    parts = token.split("_", 2)
    if (
        len(token) > MAX_TOKEN_CHARS
        or not token.isascii()
        or len(parts) != 3
        or parts[0] not in PREFIXES.values()
    ):
        raise AuthError(401, "bad_token", "the token is not a fleetrun token")
    return parts[0], parts[1], parts[2]


class TokenVerifier:
    """Checks bearer tokens against storage, with a short cache so that the hot paths
    (polls, heartbeats, event batches) do not read the tokens table on every call."""

    def __init__(self, storage: TokenStore, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.clock = clock
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}

    def forget(self, token_id: str | None = None) -> None:
        """Drop cached records (all, or one) so a revocation here applies at once."""
        if token_id is None:
            self._cache.clear()
        else:
            self._cache.pop(token_id, None)

    async def _record(self, token_id: str) -> TokenRecord | None:
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        record = await self.storage.get_token(token_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token_id] = (now, record)
        return record

    async def verify(self, header: str | None) -> Principal:
        prefix, token_id, secret = parse_bearer(header)
        record = await self._record(token_id)
        expected = record.hash if record is not None else b"\0" * 32
        salt = record.salt if record is not None else b""
        matches = hmac.compare_digest(hash_secret(salt, secret), expected)
        if record is None or not matches or PREFIXES[record.kind] != prefix:
            raise AuthError(401, "bad_token", "unknown token")
        if record.revoked_time is not None:
            raise AuthError(401, "revoked_token", f"token {record.name!r} was revoked")
        now = self.clock()
        if record.last_used is None or now - record.last_used > TOUCH_SECONDS:
            record.last_used = now
            await self.storage.touch_token(token_id, now)
        return Principal(record.name, record.kind, record.role)


PRINCIPAL = web.RequestKey("principal", Principal)  # where handlers find the caller


def route_access(request: web.Request) -> str | None:
    """The access a matched route needs; None when nothing matched (aiohttp's 404/405)."""
    info = request.match_info
    if info.http_exception is not None:
        return None
    resource = info.route.resource
    if resource is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return ROUTE_ACCESS.get((method, resource.canonical), "unlisted")


Reply = Callable[[int, str, str], web.StreamResponse]


def auth_middleware(verifier: TokenVerifier, json_reply: Reply, agent_reply: Reply) -> object:
    """Refuse a call unless its token's kind and role allow the route; the principal is
    left in `request[PRINCIPAL]` for handlers that check identity (agent routes)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        access = route_access(request)
        if access is None or access == PUBLIC:
            return await handler(request)
        reply = agent_reply if request.path.startswith("/agent/") else json_reply
        try:
            if access == "unlisted":
                raise AuthError(403, "forbidden", "this route is not open to any token")
            principal = await verifier.verify(_credentials(request))
            if not principal.may(access):
                raise AuthError(403, "forbidden", _refusal(principal, access))
        except AuthError as exc:
            if request.path.startswith("/ui/"):
                raise web.HTTPSeeOther(_login_url(request)) from None
            response = reply(exc.status, exc.code, str(exc))
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="fleetrun"'
            return response
        request[PRINCIPAL] = principal
        return await handler(request)

    return middleware


def _credentials(request: web.Request) -> str | None:
    """The Authorization header; for the UI's pages, and for the API calls its script
    makes (marked with UI_HEADER), the signed-in user's cookie instead."""
    header = request.headers.get("Authorization")
    if header:
        return header
    ui_call = request.path.startswith("/ui/") or UI_HEADER in request.headers
    token = request.cookies.get(SESSION_COOKIE)
    return f"Bearer {token}" if ui_call and token else None


def _login_url(request: web.Request) -> str:
    from urllib.parse import quote

    return f"/ui/login?next={quote(request.path_qs, safe='')}"


def _refusal(principal: Principal, access: str) -> str:
    if access == AGENT:
        return "agent routes need an agent token"
    if principal.kind == "agent":
        return "an agent token cannot call the user API"
    return f"this call needs role {access} or above; token {principal.name!r} has {principal.role}"
