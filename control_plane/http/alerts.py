"""`GET /api/v1/alerts`: the `[[alerts]]` rules in force and the recent deliveries.

A webhook URL is shown by its origin only: the path of one (Slack's, for instance) is
the secret that lets anyone post to the channel, and viewers may read this."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from control_plane.config import AlertRule
from control_plane.http.keys import CONFIG, STORAGE
from control_plane.http.params import int_param


def masked_url(url: str) -> str:
    """`https://hooks.slack.com/…`: the scheme, host and port of a webhook, no more."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def rule_json(rule: AlertRule) -> dict[str, Any]:
    return {
        "name": rule.name,
        "on": rule.on,
        "webhook_url": masked_url(rule.webhook_url),
        "jobs": rule.jobs,
        "tags": rule.tags,
        "queued_seconds": rule.queued_seconds,
    }


async def alerts_json(app: web.Application, limit: int) -> dict[str, Any]:
    deliveries = await app[STORAGE].recent_deliveries(limit)
    return {
        "rules": [rule_json(rule) for rule in app[CONFIG].alerts],
        "deliveries": [d.to_json() for d in deliveries],
    }


async def list_alerts(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 50, 1, 1000)
    return web.json_response(await alerts_json(request.app, limit))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/alerts", list_alerts)
