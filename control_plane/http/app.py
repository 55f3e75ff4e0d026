"""The control-plane app: `build_app` assembles one process's services around a storage,
a clock and a config; `serve` runs it on a port.

Each service gets a typed key (keys.py), and the daemon loops start with the app
(`lifespan`): under leader election on every replica, each loop runs on one of them.
Every wake-up goes through the bus (bus.py), so it reaches the replica that waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from control_plane import collector
from control_plane.bus import AGENT, EVALUATION, RELOAD, RUN, WakeBus
from control_plane.clock import Clock, SystemClock
from control_plane.config import ControlPlaneConfig, LimitsConfig, ServerConfig
from control_plane.daemon import daemon_loops
from control_plane.daemon.driver import Driver
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.leadership import LeaderElector, replica_id
from control_plane.daemon.run_queue import RunQueue
from control_plane.fleet.dispatch import Dispatcher
from control_plane.fleet.evaluations import EvaluationBroker
from control_plane.fleet.heartbeats import HeartbeatRecorder
from control_plane.fleet.identity import AgentIdentities
from control_plane.http import (
    agent_protocol,
    alerts,
    fleet,
    instigators,
    openapi,
    pools,
    probes,
    runs,
    tokens,
    ui,
)
from control_plane.http.auth import TokenVerifier, auth_middleware
from control_plane.http.errors import error_response, json_errors
from control_plane.http.keys import (
    BROKER,
    BUS,
    CLOCK,
    CONFIG,
    DECODE_LIMITS,
    DISPATCHER,
    ELECTOR,
    HEALTH,
    HEARTBEATS,
    IDENTITIES,
    METRICS,
    RUN_QUEUE,
    RUN_RULES,
    RUN_WATCHERS,
    STORAGE,
    VERIFIER,
)
from control_plane.http.metrics import add_metrics_routes, http_metrics
from control_plane.metrics import Metrics
from control_plane.storage import open_storage
from control_plane.storage.port import Storage
from control_plane.waiters import KeyedWaiters
from protocol.logs import redact

log = logging.getLogger("fleetrun.control_plane")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_app(config: ControlPlaneConfig, storage: Storage, clock: Clock) -> web.Application:
    """One control plane: its services, routes and daemon loops, around `storage` (not
    yet open: the app opens and closes it)."""
    monitoring, limits = config.run_monitoring, config.limits
    timeout = monitoring.agent_heartbeat_timeout_seconds
    metrics = Metrics()  # its own registry: never the process-wide default one
    health = DaemonHealth(clock, metrics)
    replica = replica_id()
    bus = WakeBus(storage, replica)
    elector = LeaderElector(storage, clock, health, replica, config.daemon.leader_lease_seconds)
    broker = EvaluationBroker(storage, clock, bus.publish)
    dispatcher = Dispatcher(
        storage,
        monitoring.terminate_grace_seconds,
        clock,
        bus,
        metrics,
        broker,
        max_polls_per_agent=limits.max_polls_per_agent,
        claim_pool_slots=config.concurrency.granularity == "op",
    )
    run_watchers = KeyedWaiters()
    rules = config.run_rules()
    run_queue = RunQueue(storage, config.run_coordinator, timeout, bus, metrics, config.concurrency)
    bus.subscribe(AGENT, lambda key: dispatcher.agents.wake(key))
    bus.subscribe(RELOAD, dispatcher.reload_requested)
    bus.subscribe(RUN, lambda key: run_watchers.wake(key))
    bus.subscribe(EVALUATION, broker.on_wake)
    driver = Driver(bus, clock, health, elector)
    for loop in daemon_loops(
        config, storage, clock, bus, broker, run_queue, rules, health, metrics
    ):
        driver.add(loop)

    verifier = TokenVerifier(storage, clock.time)
    middlewares: list[object] = [http_metrics(metrics), json_errors]
    if config.auth.enabled:
        middlewares.append(auth_middleware(verifier, error_response, agent_protocol.error_reply))
    middlewares.append(body_deadline(limits))
    app = web.Application(
        middlewares=middlewares,  # type: ignore[arg-type]
        client_max_size=limits.max_body_bytes,
    )
    app[CONFIG], app[STORAGE], app[CLOCK], app[BUS] = config, storage, clock, bus
    app[METRICS], app[HEALTH], app[ELECTOR] = metrics, health, elector
    app[RUN_QUEUE], app[DISPATCHER], app[BROKER] = run_queue, dispatcher, broker
    app[HEARTBEATS] = HeartbeatRecorder(storage, clock)
    app[IDENTITIES] = AgentIdentities(storage)
    app[VERIFIER] = verifier
    app[RUN_WATCHERS] = run_watchers
    app[RUN_RULES] = rules
    app[DECODE_LIMITS] = limits.decode_limits()
    app.cleanup_ctx.append(lifespan)
    modules = (runs, fleet, pools, instigators, alerts, probes, tokens, agent_protocol, ui, openapi)
    for module in modules:
        module.add_routes(app)
    add_metrics_routes(app)
    return app


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    """Storage open, the bus and leader election running (which start the daemon loops
    this replica leads) for as long as the app serves."""
    storage, elector = app[STORAGE], app[ELECTOR]
    await storage.open()
    if app[CONFIG].auth.enabled and not await storage.list_tokens():
        log.warning(
            "[auth] is enabled but no token exists yet: create one with `fleetrun tokens "
            "create --config FILE --kind user --name NAME --role admin`"
        )
    await elector.elect_once()  # on a lone replica, the loops start right away
    tasks = [
        asyncio.create_task(app[BUS].run_forever(), name="wake-bus"),
        asyncio.create_task(elector.run_forever(), name="leader-election"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await storage.close()


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
                return error_response(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {seconds:g} s (body_timeout_seconds)",
                )
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
        log.warning(
            "aiohttp's C HTTP parser is not in use; the pure-Python one is slower "
            "and had request-smuggling bugs"
        )
    if _is_loopback(config.server.host):
        return
    if not config.auth.enabled:
        log.warning(
            "SECURITY: listening on %s with [auth] enabled = false: anyone who can "
            "reach this port can submit runs and register agents",
            config.server.host,
        )
    if not config.server.tls:
        log.warning(
            "SECURITY: listening on %s without TLS: tokens and run data cross the "
            "network in clear text; set [server] tls_cert and tls_key",
            config.server.host,
        )


def open_files_up_to_hard_limit() -> None:
    """Every agent holds two connections (its long-poll and its heartbeats), so a fleet
    of 10,000 needs more than 20,000 descriptors; the soft limit is often far below the
    hard one the operator set (LimitNOFILE), and running out fails storage as well."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("open files limit: %s", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


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
    clock = clock or SystemClock()
    storage = open_storage(
        config.storage.url, config.storage.pool_size, config.compute_logs.store()
    )
    app = build_app(config, storage, clock)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=config.limits.keepalive_timeout_seconds,
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            ssl_context=tls_context(config.server),
            backlog=4096,
        )
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if config.server.tls else "http"
        url = f"{scheme}://{host}:{port}"
        log.info("control plane listening on %s (storage %s)", url, redact(config.storage.url))
        if on_ready is not None:
            on_ready(url)
        if own_process:
            open_files_up_to_hard_limit()
            collector.tune()
            metrics = app[METRICS]
            collector.observe_pauses(metrics.gc_paused)
            lag = collector.measure_lag_forever(metrics.event_loop_lag.observe)
            await asyncio.gather(collector.collect_forever(), lag)
        else:
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_until_signal(config: ControlPlaneConfig) -> None:
    """`fleetrun serve`: serve until SIGTERM or SIGINT, then close the listener, the
    daemon loops and storage in order, logging which signal stopped it, so that a stop
    in the journal reads as one (a second signal ends the process at once)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        for each in STOP_SIGNALS:
            loop.remove_signal_handler(each)  # the next one takes the default action
        if not received.done():
            received.set_result(sig.name)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    serving = asyncio.create_task(serve(config, own_process=True), name="serve")
    either: set[asyncio.Future[Any]] = {serving, received}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        serving.result()  # it failed: the caller names why
        return
    started = loop.time()
    log.info("stopping on %s: closing connections, daemon loops and storage", received.result())
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    log.info("control plane stopped (%s) in %.1f s", received.result(), loop.time() - started)
