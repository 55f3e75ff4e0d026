"""A schedule's or sensor's own page: its definition and state, and its tick history
with each tick's outcome, skip reason, cursor, error, failure count and runs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.http.errors import ApiError
from control_plane.http.instigators import find_instigator, instigator_json
from control_plane.http.keys import CLOCK, STORAGE
from control_plane.http.ui.render import render

TICK_HISTORY = 100


def instigator_page(kind: str) -> Any:
    """The handler of /ui/schedules/{name} or /ui/sensors/{name} (`?location=` when
    several locations define the name)."""

    async def handle(request: web.Request) -> web.Response:
        app = request.app
        try:
            inst = await find_instigator(request, kind)
        except ApiError as exc:
            return render(request, "error.html", exc.status, message=exc.message)
        ticks = await app[STORAGE].list_ticks(inst.location, inst.name, kind, TICK_HISTORY)
        return render(
            request,
            "instigator.html",
            kind=kind,
            item=instigator_json(inst, app[CLOCK].time()),
            ticks=[t.to_json() for t in ticks],
        )

    return handle
