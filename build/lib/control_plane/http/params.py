"""Query parameters every route reads the same way (a 400 naming the bad one)."""

from __future__ import annotations

from aiohttp import web

from control_plane.http.errors import ApiError

MAX_LIST_LIMIT = 1000
MAX_WAIT_SECONDS = 30.0


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, "bad_parameter", f"{name} must be between {lo} and {hi}")
    return value


def wait_param(request: web.Request) -> float:
    """`wait`: seconds a read may be held until there is something new (a long-poll)."""
    raw = request.query.get("wait", "0")
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"wait must be a number, got {raw!r}") from None
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ApiError(400, "bad_parameter", f"wait must be between 0 and {MAX_WAIT_SECONDS}")
    return value
