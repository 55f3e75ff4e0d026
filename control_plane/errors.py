"""Turning every failure of a request into `{"error": {"code", "message"}}` with a 4xx.

A handler raises `ApiError`; anything else aiohttp raises (404 route, 405, 413 body too
large) is translated by the middleware, and a bug becomes a logged 500 without details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from control_plane.storage import StorageFull, StorageUnavailable

log = logging.getLogger("fleetrun.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else exc.text or exc.reason
        return error_response(exc.status, code, str(message))
    except StorageFull as exc:  # retryable: nothing was written
        return error_response(503, "storage_full", f"storage is full, retry later: {exc}")
    except StorageUnavailable as exc:  # retryable too: the database is down or restarting
        return error_response(503, "storage_unavailable", f"{exc}; retry later")
    except Exception:
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
