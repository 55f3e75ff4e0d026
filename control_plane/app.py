"""The control plane process: storage, coordinator, dispatcher and both HTTP APIs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from control_plane import agent_api, api
from control_plane.clock import Clock, SystemClock
from control_plane.config import ControlPlaneConfig
from control_plane.coordinator import RunCoordinator
from control_plane.dispatch import Dispatcher
from control_plane.errors import json_errors
from control_plane.notify import Notifier
from control_plane.storage import Storage, open_storage

log = logging.getLogger("fleetrun.control_plane")

MAX_BODY_BYTES = 8 * 1024 * 1024


class ControlPlane:
    """Everything one control-plane process holds, passed explicitly to handlers."""

    def __init__(self, config: ControlPlaneConfig, storage: Storage, clock: Clock) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        self.heartbeat_timeout = config.run_monitoring.agent_heartbeat_timeout_seconds
        self.dispatcher = Dispatcher(storage)
        self.coordinator = RunCoordinator(
            storage,
            config.run_coordinator,
            clock,
            self.heartbeat_timeout,
            on_assigned=self.dispatcher.run_assigned,
        )
        self.run_events = Notifier()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.storage.open()
        loops = [asyncio.create_task(self.coordinator.run_forever(), name="run-coordinator")]
        self.coordinator.wake()
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.storage.close()


CONTROL_PLANE = web.AppKey("control_plane", ControlPlane)


def create_app(config: ControlPlaneConfig, clock: Clock | None = None) -> web.Application:
    cp = ControlPlane(config, open_storage(config.storage.url), clock or SystemClock())
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[CONTROL_PLANE] = cp
    app.cleanup_ctx.append(cp.lifespan)
    api.add_routes(app)
    agent_api.add_routes(app)
    return app


async def serve(config: ControlPlaneConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; `on_ready` gets the base URL once the port is bound."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, shutdown_timeout=1.0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("control plane listening on %s (storage %s)", url, config.storage.url)
        if on_ready is not None:
            on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
