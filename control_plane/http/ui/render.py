"""Rendering a page: the jinja2 environment (autoescaped), the filters the templates
share, and the headers every page is served with (a strict Content-Security-Policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from control_plane.http.auth import PRINCIPAL
from control_plane.http.keys import CONFIG
from protocol import FLEETRUN_VERSION

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def when(ts: str | None) -> str:
    """ISO time as people read it in a table (UTC, seconds)."""
    return "" if not ts else ts.replace("T", " ")[:19]


def when_ms(ts: str | None) -> str:
    """ISO time to the millisecond (UTC), for the run page where steps take less than
    a second."""
    if not ts:
        return ""
    base, _, fraction = ts.rstrip("Z").replace("T", " ").partition(".")
    return f"{base}.{(fraction + '000')[:3]}"


def seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


TEMPLATES.filters["when"] = when
TEMPLATES.filters["when_ms"] = when_ms
TEMPLATES.filters["seconds"] = seconds


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A whole page, or with `X-Fleetrun-Fragment: 1` only its live part (for refresh)."""
    principal = request.get(PRINCIPAL)
    html = TEMPLATES.get_template(template).render(
        fragment=request.headers.get("X-Fleetrun-Fragment") == "1",
        path=request.path,
        auth=request.app[CONFIG].auth.enabled,
        user=principal.name if principal is not None else None,
        role=principal.role if principal is not None else None,
        version=FLEETRUN_VERSION,
        **context,
    )
    response = web.Response(text=html, content_type="text/html", status=status)
    # same-origin, not no-referrer: under no-referrer a browser posts the sign-in form
    # with `Origin: null`, which `_refuse_cross_origin` must refuse
    response.headers.update(
        {
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
    )
    return response
