"""The control plane process: storage, coordinator, dispatcher and both HTTP APIs."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from control_plane import agent_api, api, collector, openapi, token_api, ui
from control_plane.auth import TokenVerifier, auth_middleware
from control_plane.bus import AGENT, EVALUATION, INSTIGATORS, MONITOR, QUEUE, RETRIES, RUN, WakeBus
from control_plane.clock import Clock, SystemClock
from control_plane.config import ControlPlaneConfig, LimitsConfig, ServerConfig
from control_plane.coordinator import RunCoordinator
from control_plane.dispatch import Dispatcher
from control_plane.errors import error_response, json_errors
from control_plane.evaluations import EvaluationBroker
from control_plane.health import DaemonHealth
from control_plane.heartbeats import HeartbeatRecorder
from control_plane.leadership import LeaderElector, replica_id
from control_plane.metrics import Metrics, add_metrics_routes, http_metrics
from control_plane.monitor import RunMonitor
from control_plane.notify import Notifier
from control_plane.retries import RunRetrier
from control_plane.scheduler import ScheduleDaemon
from control_plane.sensors import SensorDaemon
from control_plane.storage import Run, Storage, Verdict, open_storage
from control_plane.submission import RunRules
from protocol.codec import DecodeLimits
from protocol.logs import redact
from protocol.tags import TagLimits

log = logging.getLogger("fleetrun.control_plane")


class ControlPlane:
    """Everything one control-plane process holds, passed explicitly to handlers.

    Several such processes (replicas) may share one PostgreSQL database: each serves the
    APIs, the daemon loops run wherever leader election puts them, and every wake-up goes
    through the bus so that it reaches the replica that waits for it.
    """

    def __init__(self, config: ControlPlaneConfig, storage: Storage, clock: Clock) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        monitoring = config.run_monitoring
        limits = config.limits
        self.run_rules = RunRules(
            TagLimits(
                limits.max_tags_per_run, limits.max_tag_key_length, limits.max_tag_value_length
            ),
            limits.max_run_config_bytes,
        )
        self.decode_limits = DecodeLimits(
            max_body_bytes=limits.max_body_bytes,
            max_str_len=limits.max_msgpack_str_bytes,
            max_bin_len=limits.max_msgpack_bin_bytes,
            max_array_len=limits.max_msgpack_array_length,
            max_map_len=limits.max_msgpack_map_length,
            max_depth=limits.max_msgpack_depth,
        )
        self.replica_id = replica_id()
        self.bus = WakeBus(storage, self.replica_id)
        self.verifier = TokenVerifier(storage, clock.time)
        self.agent_tokens: dict[str, str | None] = {}  # agent id -> token it registered with
        self.heartbeat_timeout = monitoring.agent_heartbeat_timeout_seconds
        self.resume_limit = monitoring.max_resume_run_attempts
        self.metrics = Metrics()  # its own registry: never the process-wide default one
        self.health = DaemonHealth(clock, self.metrics)
        self.broker = EvaluationBroker(storage, clock, self.wake)
        self.heartbeats = HeartbeatRecorder(storage, clock)
        self.dispatcher = Dispatcher(
            storage,
            monitoring.terminate_grace_seconds,
            clock,
            on_canceled=self.runs_changed,
            broker=self.broker,
            max_polls_per_agent=limits.max_polls_per_agent,
        )
        self.coordinator = RunCoordinator(
            storage,
            config.run_coordinator,
            clock,
            self.heartbeat_timeout,
            on_assigned=self._assigned,
        )
        self.monitor = RunMonitor(storage, monitoring, clock, self._verdicts_applied)
        self.retrier = RunRetrier(
            storage, config.run_retries, clock, self._retry_queued, self.run_rules
        )
        self.run_events = Notifier()
        for loop in (self.coordinator, self.monitor, self.retrier):
            loop.health = self.health
        self.coordinator.metrics = self.dispatcher.metrics = self.metrics
        self.scheduler = ScheduleDaemon(storage, self.broker, clock, self.health,
                                        self.heartbeat_timeout, self._runs_requested)  # fmt: skip
        self.sensors = SensorDaemon(storage, self.broker, clock, self.health,
                                    self.heartbeat_timeout, self._runs_requested)  # fmt: skip
        self.scheduler.run_rules = self.sensors.run_rules = self.run_rules
        self.elector = LeaderElector(storage, clock, self.health, self.replica_id,
                                     config.daemon.leader_lease_seconds)  # fmt: skip
        self._subscribe()

    def _subscribe(self) -> None:
        """What each wake-up, from this replica or another, does here."""
        bus = self.bus

        def every(notifier: Notifier, key: str | None) -> None:
            notifier.notify(key) if key is not None else notifier.notify_all()

        bus.subscribe(QUEUE, lambda _: self.coordinator.wake())
        bus.subscribe(MONITOR, lambda _: self.monitor.wake())
        bus.subscribe(RETRIES, lambda _: self.retrier.wake())
        bus.subscribe(INSTIGATORS, self._instigators_woken)
        bus.subscribe(AGENT, lambda key: every(self.dispatcher.agents, key))
        bus.subscribe(RUN, lambda key: every(self.run_events, key))
        bus.subscribe(EVALUATION, self.broker.on_wake)

    def wake(self, topic: str, key: str | None = "") -> None:
        """Wake whoever waits on `topic` (`key`: an agent or run id), on every replica."""
        self.bus.publish(topic, key)

    def _assigned(self, run: Run) -> None:
        self.wake(AGENT, run.agent_id)
        self.wake(MONITOR)
        self.wake(RUN, run.run_id)

    def _runs_requested(self, runs: list[Run]) -> None:
        """A schedule or sensor created runs."""
        self.wake(QUEUE)
        for run in runs:
            self.wake(RUN, run.run_id)

    def instigators_changed(self, registered_agent: str = "") -> None:
        """Started/stopped, or an agent (re)registered with its locations' definitions;
        `registered_agent`: one whose locations define no schedule or sensor."""
        self.wake(INSTIGATORS, registered_agent)

    def _instigators_woken(self, registered_agent: str | None) -> None:
        for loop in (self.scheduler, self.sensors):
            if registered_agent:
                loop.agent_registered(registered_agent)
            else:
                loop.wake()

    def _retry_queued(self, run: Run) -> None:
        self.wake(QUEUE)
        self.wake(RUN, run.run_id)

    def _verdicts_applied(self, verdicts: list[Verdict], runs: list[Run]) -> None:
        """After the monitor (or a reconciliation) ended or resumed runs."""
        self.runs_changed(runs)
        for verdict in verdicts:
            self.wake(AGENT, verdict.offline_agent)

    def runs_changed(self, runs: list[Run], agent_id: str | None = None) -> None:
        """Wake whoever a status change concerns: queue, retries, watchers, the agent."""
        for run in runs:
            self.wake(RUN, run.run_id)
            self.wake(AGENT, run.agent_id)
        self.wake(AGENT, agent_id)
        self.wake(QUEUE)
        self.wake(RETRIES)
        self.wake(MONITOR)

    def _monitor_gained(self) -> None:
        """This replica starts judging agents: each gets a full timeout from now, as after
        a restart (the previous judge may have died while they were reconnecting)."""
        self.monitor.rebase("this replica took over run monitoring")
        self.monitor.watch.reset()

    async def _monitor_loops(self) -> None:
        await asyncio.gather(self.monitor.run_forever(), self.monitor.watch.run_forever())

    def _add_leader_loops(self) -> None:
        elector = self.elector
        elector.add("run-queue", self.coordinator.run_forever, self.coordinator.wake)
        elector.add("retries", self.retrier.run_forever)
        elector.add("scheduler", self.scheduler.run_forever)
        elector.add("sensors", self.sensors.run_forever)
        if self.config.run_monitoring.enabled:
            elector.add("monitor", self._monitor_loops, self._monitor_gained)
        for name, loop in (("run-queue", self.coordinator), ("retries", self.retrier),
                           ("scheduler", self.scheduler), ("sensors", self.sensors),
                           ("monitor", self.monitor)):  # fmt: skip
            loop.may_act = lambda name=name: elector.holds(name)  # type: ignore[misc]

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.storage.open()
        if self.config.auth.enabled and not await self.storage.list_tokens():
            log.warning("[auth] is enabled but no token exists yet: create one with "
                        "`fleetrun tokens create --config FILE --kind user --name NAME "
                        "--role admin`")  # fmt: skip
        self._add_leader_loops()
        await self.elector.elect_once()  # on a lone replica, the loops start right away
        tasks = [
            asyncio.create_task(self.bus.run_forever(), name="wake-bus"),
            asyncio.create_task(self.elector.run_forever(), name="leader-election"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.storage.close()


CONTROL_PLANE = web.AppKey("control_plane", ControlPlane)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_deadline(limits: LimitsConfig) -> object:
    """Read a request's whole body within `body_timeout_seconds` (408 otherwise), so a
    client trickling its body cannot hold a handler; output uploads time themselves. A
    body that cannot be read (a Content-Encoding it does not have) is a 400 here, on
    every route, before any handler sees it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.can_read_body and not request.path.startswith("/agent/v1/outputs/"):
            try:
                async with asyncio.timeout(limits.body_timeout_seconds):
                    await request.read()
            except TimeoutError:
                seconds = limits.body_timeout_seconds
                return error_response(408, "body_timeout", f"the request body did not arrive "
                                      f"within {seconds:g} s (body_timeout_seconds)")  # fmt: skip
            except RequestPayloadError as exc:
                refusal = error_response(
                    400, "bad_body", f"the request body cannot be read: {_payload_error(exc)}"
                )
                refusal.force_close()  # the rest of the stream is unreadable too
                return refusal
        return await handler(request)

    return middleware


def _payload_error(exc: RequestPayloadError) -> str:
    """What aiohttp says of a body it could not read (e.g. "Can not decode content-
    encoding: gzip"), without its traceback."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, HttpProcessingError) and cause.message:
        return str(cause.message)
    return str(exc) or type(exc).__name__


def create_app(config: ControlPlaneConfig, clock: Clock | None = None) -> web.Application:
    storage = open_storage(config.storage.url, config.storage.pool_size)
    cp = ControlPlane(config, storage, clock or SystemClock())
    middlewares: list[object] = [http_metrics(cp.metrics), json_errors]
    if config.auth.enabled:
        middlewares.append(auth_middleware(cp.verifier, error_response, agent_api.error_reply))
    middlewares.append(body_deadline(config.limits))
    app = web.Application(
        middlewares=middlewares,  # type: ignore[arg-type]
        client_max_size=config.limits.max_body_bytes,
    )
    app[CONTROL_PLANE] = cp
    app.cleanup_ctx.append(cp.lifespan)
    api.add_routes(app)
    token_api.add_routes(app)
    agent_api.add_routes(app)
    add_metrics_routes(app)
    ui.add_routes(app)
    openapi.add_routes(app)
    return app


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """TLS 1.2 or newer with the configured certificate; None when TLS is off."""
    if not server.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert, server.tls_key)
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_about_insecure_setup(config: ControlPlaneConfig) -> None:
    """Loud lines for setups that expose the fleet: anyone reaching the port may launch."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser.__module__ != "aiohttp._http_parser":
        log.warning("aiohttp's C HTTP parser is not in use; the pure-Python one is slower "
                    "and had request-smuggling bugs")  # fmt: skip
    if _is_loopback(config.server.host):
        return
    if not config.auth.enabled:
        log.warning("SECURITY: listening on %s with [auth] enabled = false: anyone who can "
                    "reach this port can submit runs and register agents",
                    config.server.host)  # fmt: skip
    if not config.server.tls:
        log.warning("SECURITY: listening on %s without TLS: tokens and run data cross the "
                    "network in clear text; set [server] tls_cert and tls_key",
                    config.server.host)  # fmt: skip


async def serve(
    config: ControlPlaneConfig,
    on_ready: Callable[[str], None] | None = None,
    clock: Clock | None = None,
    own_process: bool = False,
) -> None:
    """Serve until cancelled; `on_ready` gets the base URL once the port is bound.
    `own_process`: the process is the control plane's alone (`fleetrun serve`), so it
    may set how garbage is collected (control_plane/collector.py)."""
    warn_about_insecure_setup(config)
    app = create_app(config, clock)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=config.limits.keepalive_timeout_seconds,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port,
                           ssl_context=tls_context(config.server), backlog=4096)  # fmt: skip
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if config.server.tls else "http"
        url = f"{scheme}://{host}:{port}"
        log.info("control plane listening on %s (storage %s)", url, redact(config.storage.url))
        if on_ready is not None:
            on_ready(url)
        if own_process:
            collector.tune()
            metrics = app[CONTROL_PLANE].metrics
            collector.observe_pauses(metrics.gc_paused)
            lag = collector.measure_lag_forever(metrics.event_loop_lag.observe)
            await asyncio.gather(collector.collect_forever(), lag)
        else:
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()
