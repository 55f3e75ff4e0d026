"""Every failure of a request as `{"error": {"code", "message"}}` (JSON API) or an
`ErrorReply` (agent protocol), with a 4xx: written once, for both APIs.

A handler raises `ApiError`, or lets a refusal of the domain through (a storage error, a
refused run, an agent acting for another); `api_error` gives each kind its status and
code here, once. Anything else aiohttp raises (404 route, 405, 413 body too large) is
translated by the middleware, and a bug becomes a logged 500 without details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from control_plane.errors import ControlPlaneError
from control_plane.fleet.identity import NotThisAgent
from control_plane.model.submission import RunRefused
from control_plane.storage.errors import (
    AgentNameTaken,
    NameTaken,
    NotYourRun,
    RecordRefused,
    RunActive,
    RunHasLiveChildren,
    StaleLease,
    StorageFull,
    StorageUnavailable,
    UnknownRun,
)
from protocol.codec import ProtocolError

log = logging.getLogger("fleetrun.api")


class ApiError(ControlPlaneError):
    """A refusal to answer with `status`, a stable `code` and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# Each refusal of the domain, as the APIs answer it (most specific first).
_STATUS: list[tuple[type[Exception], int, str]] = [
    (StorageFull, 503, "storage_full"),  # retryable: nothing was written
    (StorageUnavailable, 503, "storage_unavailable"),  # retryable: the database is down
    (UnknownRun, 404, "unknown_run"),
    (NotYourRun, 403, "not_your_run"),
    (NotThisAgent, 403, "not_this_agent"),
    (StaleLease, 409, "stale_lease"),
    (RecordRefused, 409, "record_refused"),
    (AgentNameTaken, 409, "agent_name_taken"),
    (NameTaken, 409, "name_taken"),
    (RunActive, 409, "run_active"),
    (RunHasLiveChildren, 409, "run_has_live_children"),
]


def api_error(exc: Exception) -> ApiError | None:
    """The answer to a refusal raised below a handler; None for anything else (a bug)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RunRefused):
        return ApiError(exc.status, exc.code, exc.message)
    if isinstance(exc, ProtocolError):
        return ApiError(400, exc.code, str(exc))
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            message = str(exc)
            if kind is StorageFull:
                message = f"storage is full, retry later: {exc}"
            elif kind is StorageUnavailable:
                message = f"{exc}; retry later"
            elif kind is UnknownRun:
                message = f"no run with id {str(exc)!r}"
            return ApiError(status, code, message)
    return None


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    400: "bad_request",
}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else exc.text or exc.reason
        return error_response(exc.status, code, str(message))
    except Exception as exc:
        refusal = api_error(exc)
        if refusal is not None:
            return error_response(refusal.status, refusal.code, refusal.message)
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the server log")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


MAX_JSON_DEPTH = 64  # far above any request's own shape; run config has its own limit


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return False


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object: 400 naming the problem if it is not one, or
    is nested deeper than MAX_JSON_DEPTH. (Each field's own check, with a 422, refuses
    values that are not what it takes, text that is not Unicode included.)"""
    body = await request.read()
    try:
        data = json.loads(body, parse_constant=_refuse_constant) if body else None
    except RecursionError:
        data = None
        too_deep = True
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    else:
        too_deep = _deeper_than(data, MAX_JSON_DEPTH)
    if too_deep:
        message = f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        raise ApiError(400, "bad_json", message)
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    return data
