"""Prometheus metrics for the control plane (served at `GET /metrics`, http/metrics.py).

Each control plane (`build_app`) owns one `Metrics` with its own `CollectorRegistry`
(never the process-wide default one): tests build many apps in one process, and two
registries never clash. Counters and histograms are updated where things happen (the coordinator
assigns a run, the dispatcher sees a launch acknowledged, the agent API stores records,
a daemon loop ends a pass). Gauges that describe stored state (runs by status, queue
depth, agents by status) are read from storage by the async handler just before the
text is generated, because prometheus collectors are synchronous.

`GET /metrics` is PUBLIC (Prometheus scrapes without a token): no label value comes
from user input (routes are labelled by their template, methods outside a fixed set
become "other"), so nothing in it names a run, job, tag or agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control_plane.model.agents import AGENT_STATUSES, agent_status
from control_plane.model.alerts import ALERT_EVENTS
from control_plane.model.runs import Run
from control_plane.model.statuses import RunStatus
from control_plane.storage.port import AgentStore, RunStore

# The loops /readyz and the error counter know from the start.
DAEMON_LOOPS = ("run-queue", "monitor", "retries", "scheduler", "sensors", "alerts", "retention")
# Agent long-polls are held up to poll_timeout_seconds (25 s): the top buckets see them.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A run can wait for a free slot from milliseconds to hours.
WAIT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
)
LOOP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def queued_since(run: Run) -> float:
    """When a queued run started waiting for a slot: when it (last) entered the queue,
    or, for a delayed retry, when its delay ended. The delay is policy, not waiting."""
    return max(run.status_time or run.create_time, run.not_before or 0.0)


def submitted_at(run: Run) -> float:
    """The start of a run's dispatch latency: its submission, or for a delayed retry the
    end of its delay (the retry could not have been launched before)."""
    return max(run.create_time, run.not_before or 0.0)


@dataclass
class StoredState:
    """What the gauges show, read from storage at scrape time."""

    runs_by_status: dict[str, int] = field(default_factory=dict)
    agents_by_status: dict[str, int] = field(default_factory=dict)


class _StoredStateCollector(Collector):
    """Yields the gauges from the last `StoredState` the handler read (sync, no I/O)."""

    def __init__(self) -> None:
        self.state = StoredState()

    def collect(self) -> Iterable[Metric]:
        runs = GaugeMetricFamily("fleetrun_runs", "Runs in storage by status.", labels=["status"])
        for status in RunStatus:
            runs.add_metric([status.value], self.state.runs_by_status.get(status.value, 0))
        yield runs
        yield GaugeMetricFamily(
            "fleetrun_queue_depth",
            "Runs waiting in the queue (QUEUED, delayed retries included).",
            value=self.state.runs_by_status.get(RunStatus.QUEUED.value, 0),
        )
        agents = GaugeMetricFamily(
            "fleetrun_agents",
            "Agents by status as the API shows it (ONLINE with a stale heartbeat: OFFLINE).",
            labels=["status"],
        )
        for liveness in sorted({*AGENT_STATUSES, *self.state.agents_by_status}):
            agents.add_metric([liveness], self.state.agents_by_status.get(liveness, 0))
        yield agents


class Metrics:
    """One control plane's metric objects and the registry they are exported from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.time_in_queue = Histogram(
            "fleetrun_run_queue_wait_seconds",
            "Time a run waited in the queue before it was assigned to an agent.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "fleetrun_run_dispatch_latency_seconds",
            "Time from a run's submission until its agent reported holding the launch.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.heartbeats = Counter(
            "fleetrun_agent_heartbeats_received_total",
            "Heartbeats received from registered agents.",
            registry=registry,
        )
        self.records_ingested = Counter(
            "fleetrun_records_ingested_total",
            "Run records stored from agents (resent duplicates are not counted), by kind.",
            ["kind"],
            registry=registry,
        )
        self.fenced_writes = Counter(
            "fleetrun_fenced_writes_total",
            "Agent writes (record batches, output uploads) refused with 409 stale_lease.",
            registry=registry,
        )
        self.agent_api_errors = Counter(
            "fleetrun_agent_api_errors_total",
            "Error replies of the agent API, by error code.",
            ["code"],
            registry=registry,
        )
        self.loop_duration = Histogram(
            "fleetrun_daemon_loop_duration_seconds",
            "Duration of one pass of a daemon loop (failed passes included).",
            ["loop"],
            buckets=LOOP_BUCKETS,
            registry=registry,
        )
        self.loop_errors = Counter(
            "fleetrun_daemon_loop_errors_total",
            "Daemon loop passes (and schedule/sensor ticks) that raised.",
            ["loop"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "fleetrun_http_request_duration_seconds",
            "HTTP request durations by method, route template and status class.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "fleetrun_event_loop_lag_seconds",
            "How late the event loop of `fleetrun serve` woke a timer, sampled twice a "
            "second: what any request may wait before it is even read.",
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self.gc_pause = Histogram(
            "fleetrun_gc_pause_seconds",
            "Cyclic garbage collections in the process of `fleetrun serve`, by generation "
            "(0-1 young, 2 full); each one stops the event loop.",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self.alerts_sent = Counter(
            "fleetrun_alerts_sent_total",
            "Alerts a webhook accepted (2xx), by event.",
            ["event"],
            registry=registry,
        )
        self.alerts_failed = Counter(
            "fleetrun_alerts_failed_total",
            "Alerts given up on (attempts used up, or a 4xx no retry would change), by event.",
            ["event"],
            registry=registry,
        )
        self.alert_attempts_failed = Counter(
            "fleetrun_alert_attempts_failed_total",
            "Alert delivery attempts that failed and will be retried, by event.",
            ["event"],
            registry=registry,
        )
        self.retention_rows = Counter(
            "fleetrun_retention_rows_purged_total",
            "Rows the retention loop purged, by table.",
            ["table"],
            registry=registry,
        )
        self.retention_bytes = Counter(
            "fleetrun_retention_bytes_purged_total",
            "Approximate bytes of the text (and outputs) of the rows purged.",
            registry=registry,
        )
        # Known label sets start at 0, so that increase() sees the first error too.
        for event in ALERT_EVENTS:
            for counter in (self.alerts_sent, self.alerts_failed, self.alert_attempts_failed):
                counter.labels(event)
        for loop in DAEMON_LOOPS:
            self.loop_errors.labels(loop)
        for kind in ("event", "log"):
            self.records_ingested.labels(kind)
        # Resolved now: a gc callback must take no lock that the code it interrupted holds.
        self._gc_pauses = [self.gc_pause.labels(str(generation)) for generation in range(3)]
        self._stored = _StoredStateCollector()
        registry.register(self._stored)

    # --- hooks, called where things happen ----------------------------------------------

    def run_assigned(self, queued: Run, now: float) -> None:
        """`queued` is the run as the dispatch pass saw it, still QUEUED."""
        self.time_in_queue.observe(max(0.0, now - queued_since(queued)))

    def launch_received(self, run: Run, now: float) -> None:
        """The agent holds the launch. A resumed run's relaunch is not a new submission."""
        if run.resume_count == 0:
            self.dispatch_latency.observe(max(0.0, now - submitted_at(run)))

    def gc_paused(self, generation: int, seconds: float) -> None:
        self._gc_pauses[generation].observe(seconds)

    def records_stored(self, by_kind: dict[str, int]) -> None:
        for kind, count in by_kind.items():
            self.records_ingested.labels("log" if kind == "log" else "event").inc(count)

    def agent_api_error(self, code: str, write: bool) -> None:
        """An error reply; `write`: the request was a write (a fenced one if stale)."""
        self.agent_api_errors.labels(code).inc()
        if write and code == "stale_lease":
            self.fenced_writes.inc()

    def loop_pass(self, loop: str, seconds: float) -> None:
        self.loop_duration.labels(loop).observe(seconds)

    def loop_failed(self, loop: str) -> None:
        self.loop_errors.labels(loop).inc()

    def purged(self, rows: dict[str, int], size: int) -> None:
        """Rows removed by retention or a deletion, by table, and their approximate bytes."""
        for table, count in rows.items():
            self.retention_rows.labels(table).inc(count)
        self.retention_bytes.inc(size)

    def alert_attempt(self, event: str, outcome: str) -> None:
        """One delivery attempt ended: "sent", "retry" (it will be tried again) or
        "failed" (for good)."""
        counter = {"sent": self.alerts_sent, "retry": self.alert_attempts_failed}.get(
            outcome, self.alerts_failed
        )
        counter.labels(event).inc()

    # --- exposition ---------------------------------------------------------------------

    async def refresh(
        self, runs: RunStore, agents: AgentStore, now: float, heartbeat_timeout: float
    ) -> None:
        """Read the stored-state gauges (one query each) for the next exposition."""
        counts = await runs.count_runs_by_status()
        by_status: dict[str, int] = {}
        for agent in await agents.list_agents():
            status = agent_status(agent, now, heartbeat_timeout)
            by_status[status] = by_status.get(status, 0) + 1
        self._stored.state = StoredState({str(s): n for s, n in counts.items()}, by_status)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
