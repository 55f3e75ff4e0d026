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
from control_plane.evaluations import EvaluationBroker
from control_plane.health import DaemonHealth
from control_plane.monitor import RunMonitor
from control_plane.notify import Notifier
from control_plane.retries import RunRetrier
from control_plane.scheduler import ScheduleDaemon
from control_plane.sensors import SensorDaemon
from control_plane.storage import Run, Storage, Verdict, open_storage

log = logging.getLogger("fleetrun.control_plane")

MAX_BODY_BYTES = 8 * 1024 * 1024


class ControlPlane:
    """Everything one control-plane process holds, passed explicitly to handlers."""

    def __init__(self, config: ControlPlaneConfig, storage: Storage, clock: Clock) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        monitoring = config.run_monitoring
        self.heartbeat_timeout = monitoring.agent_heartbeat_timeout_seconds
        self.resume_limit = monitoring.max_resume_run_attempts
        self.health = DaemonHealth(clock)
        self.broker = EvaluationBroker(
            wake_agent=lambda agent_id: self.dispatcher.wake_agent(agent_id)
        )
        self.dispatcher = Dispatcher(
            storage,
            monitoring.terminate_grace_seconds,
            clock,
            on_canceled=self.runs_changed,
            broker=self.broker,
        )
        self.coordinator = RunCoordinator(
            storage,
            config.run_coordinator,
            clock,
            self.heartbeat_timeout,
            on_assigned=self._assigned,
        )
        self.monitor = RunMonitor(storage, monitoring, clock, self._verdicts_applied)
        self.retrier = RunRetrier(storage, config.run_retries, clock, self._retry_queued)
        self.run_events = Notifier()
        for loop in (self.coordinator, self.monitor, self.retrier):
            loop.health = self.health
        self.scheduler = ScheduleDaemon(storage, self.broker, clock, self.health,
                                        self.heartbeat_timeout, self._runs_requested)  # fmt: skip
        self.sensors = SensorDaemon(storage, self.broker, clock, self.health,
                                    self.heartbeat_timeout, self._runs_requested)  # fmt: skip

    def _assigned(self, run: Run) -> None:
        self.dispatcher.run_assigned(run)
        self.monitor.wake()
        self.run_events.notify(run.run_id)

    def _runs_requested(self, runs: list[Run]) -> None:
        """A schedule or sensor created runs."""
        self.coordinator.wake()
        for run in runs:
            self.run_events.notify(run.run_id)

    def instigators_changed(self) -> None:
        """Started/stopped, or an agent (re)registered with its locations' definitions."""
        self.scheduler.wake()
        self.sensors.wake()

    def _retry_queued(self, run: Run) -> None:
        self.coordinator.wake()
        self.run_events.notify(run.run_id)

    def _verdicts_applied(self, verdicts: list[Verdict], runs: list[Run]) -> None:
        """After the monitor (or a reconciliation) ended or resumed runs."""
        self.runs_changed(runs)
        for verdict in verdicts:
            self.dispatcher.wake_agent(verdict.offline_agent)

    def runs_changed(self, runs: list[Run], agent_id: str | None = None) -> None:
        """Wake whoever a status change concerns: queue, retries, watchers, the agent."""
        for run in runs:
            self.run_events.notify(run.run_id)
            self.dispatcher.wake_agent(run.agent_id)
        self.dispatcher.wake_agent(agent_id)
        self.coordinator.wake()
        self.retrier.wake()
        self.monitor.wake()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.storage.open()
        self.monitor.boot_time = self.clock.time()
        loops = [
            asyncio.create_task(self.coordinator.run_forever(), name="run-coordinator"),
            asyncio.create_task(self.retrier.run_forever(), name="run-retries"),
            asyncio.create_task(self.scheduler.run_forever(), name="scheduler"),
            asyncio.create_task(self.sensors.run_forever(), name="sensors"),
        ]
        if self.config.run_monitoring.enabled:
            loops.append(asyncio.create_task(self.monitor.run_forever(), name="run-monitor"))
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


async def serve(
    config: ControlPlaneConfig,
    on_ready: Callable[[str], None] | None = None,
    clock: Clock | None = None,
) -> None:
    """Serve until cancelled; `on_ready` gets the base URL once the port is bound."""
    app = create_app(config, clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("control plane listening on %s (storage %s)", url, config.storage.url)
        if on_ready is not None:
            on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
