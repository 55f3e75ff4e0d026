"""The daemon: the loops that move runs along without being asked.

Each loop is a pass over storage that returns when it next wants to run; one driver
(driver.py) runs them all under leader leases, wakes them through the bus and keeps
their health. A run is queued and leased by the run queue (run_queue.py), watched by
the monitor (monitor.py, with stallwatch.py), retried by the retrier (retries.py);
schedules (scheduler.py, ticks.py) and sensors (sensors.py) create runs through one
tick path (instigators.py). The pool granter (pools.py) gives freed pool slots to
waiting steps. The alerts loop (alerts.py, webhooks.py) tells webhooks
what went wrong; the retention loop (retention.py) purges what aged out.
"""

from __future__ import annotations

from typing import Any

from control_plane.bus import INSTIGATORS, MONITOR, POOLS, QUEUE, RETRIES, WakeBus
from control_plane.clock import Clock
from control_plane.config import ControlPlaneConfig
from control_plane.daemon import webhooks
from control_plane.daemon.alerts import Alerter, AlertSettings, alert_pass
from control_plane.daemon.driver import DaemonLoop
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.instigators import Instigators
from control_plane.daemon.monitor import Monitor, monitor_pass
from control_plane.daemon.pools import PoolGranter, grant_pass
from control_plane.daemon.retention import Retention, enabled, retention_pass
from control_plane.daemon.retries import Retrier, retry_pass
from control_plane.daemon.run_queue import RunQueue, dispatch_pass
from control_plane.daemon.scheduler import schedule_pass
from control_plane.daemon.sensors import sensor_pass
from control_plane.daemon.stallwatch import TICK_SECONDS, StallWatch, watch_pass
from control_plane.fleet.evaluations import EvaluationBroker
from control_plane.metrics import Metrics
from control_plane.model.submission import RunRules
from control_plane.storage.port import Storage

BACKSTOP_SECONDS = 5.0
# The monitor's deadlines are seconds apart: during a burst every status change woke a
# full pass (a tenth of the control plane's CPU); a quarter second batches them.
MONITOR_SETTLE_SECONDS = 0.25


def daemon_loops(
    config: ControlPlaneConfig,
    storage: Storage,
    clock: Clock,
    bus: WakeBus,
    broker: EvaluationBroker,
    run_queue: RunQueue,
    rules: RunRules,
    health: DaemonHealth,
    metrics: Metrics | None = None,
) -> list[DaemonLoop[Any]]:
    """Every loop of one control plane, with what wakes each."""
    timeout = config.run_monitoring.agent_heartbeat_timeout_seconds
    retrier = Retrier(storage, config.run_retries, bus, rules)
    tick_retries = config.daemon.max_tick_retries
    schedules = Instigators("scheduler", storage, broker, bus, timeout, rules, tick_retries)
    sensors = Instigators("sensors", storage, broker, bus, timeout, rules, tick_retries)
    loops: list[DaemonLoop[Any]] = [
        DaemonLoop("run-queue", dispatch_pass, run_queue, (QUEUE,), backstop=BACKSTOP_SECONDS),
        DaemonLoop("retries", retry_pass, retrier, (RETRIES,), backstop=BACKSTOP_SECONDS),
        DaemonLoop(
            "pools",
            grant_pass,
            PoolGranter(storage, config.concurrency, bus),
            (POOLS,),
            backstop=BACKSTOP_SECONDS,
            lease="run-queue",  # one replica decides on runs and pools alike
        ),
        DaemonLoop(
            "scheduler",
            schedule_pass,
            schedules,
            (INSTIGATORS,),
            schedules.woken_by,
            10.0,
            on_gain=lambda: setattr(schedules, "resumed", False),
        ),
        DaemonLoop("sensors", sensor_pass, sensors, (INSTIGATORS,), sensors.woken_by, 5.0),
    ]
    if config.run_monitoring.enabled:
        monitor = Monitor(storage, storage, config.run_monitoring, bus, boot_time=clock.time())
        watch = StallWatch(clock, lambda reason: monitor.rebase(clock.time(), reason))
        monitor.watch = watch

        def gained() -> None:
            """This replica starts judging agents: each gets a full timeout from now, as
            after a restart (the previous judge may have died while they reconnected)."""
            monitor.rebase(clock.time(), "this replica took over run monitoring")
            watch.reset()

        loops += [
            DaemonLoop(
                "monitor",
                monitor_pass,
                monitor,
                (MONITOR,),
                backstop=BACKSTOP_SECONDS,
                settle=MONITOR_SETTLE_SECONDS,
                on_gain=gained,
            ),
            DaemonLoop("stall-watch", watch_pass, watch, backstop=TICK_SECONDS, lease="monitor"),
        ]
    if config.alerts:
        loops.append(alerts_loop(config, storage, clock, health, metrics))
    if enabled(config.retention):
        retention = Retention(storage, config.retention, metrics)
        loops.append(DaemonLoop("retention", retention_pass, retention, backstop=30.0))
    return loops


def alerts_loop(
    config: ControlPlaneConfig,
    storage: Storage,
    clock: Clock,
    health: DaemonHealth,
    metrics: Metrics | None,
) -> DaemonLoop[Alerter]:
    """The alerts loop, woken by run failures (the retries topic) and by each delivery
    that ends; it looks at the queue, agents and loops every few seconds."""
    settings = AlertSettings(
        config.server.base_url(),
        config.run_monitoring.agent_heartbeat_timeout_seconds,
        config.run_monitoring,
    )
    urls = {rule.name: rule.webhook_url for rule in config.alerts}
    sink = webhooks.AlertSink(storage, urls, clock, webhooks.POLICY, metrics)
    alerter = Alerter(storage, config.alerts, settings, health, clock, sink, clock.time())
    return DaemonLoop(
        "alerts",
        alert_pass,
        alerter,
        (RETRIES,),
        backstop=BACKSTOP_SECONDS,
        on_gain=alerter.gained,
        tasks=alerter.tasks,
    )
