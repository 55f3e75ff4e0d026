"""Alerts: tell a webhook when a run fails, runs too long or waits too long in the queue,
an agent goes silent, a schedule or sensor tick fails, or a daemon loop stops beating -
from the control plane alone, without user code (docs/alerts.md).

`find_alerts` is a pure function of the `[[alerts]]` rules, a snapshot and the time: each
thing that happened becomes an occurrence per rule it concerns, named by a key that stays
the same however often it is seen (`run_failure/<run id>`). `alert_pass` reads the
snapshot (new run failures from the run-status history and new failed ticks, each through
a cursor kept in storage; the queue, the agents and the loops' health as they are now),
stores the occurrences in the outbox - once per rule and key, whichever replica or
restart sees them - and hands the deliveries that are due to tasks (webhooks.py): the
pass itself never waits on the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from control_plane.clock import Clock
from control_plane.config import AlertRule, RunMonitoringConfig
from control_plane.daemon.driver import TaskSet
from control_plane.daemon.health import STALE_AFTER_SECONDS, DaemonHealth
from control_plane.daemon.monitor import max_runtime
from control_plane.daemon.webhooks import AlertSink, deliver
from control_plane.metrics import queued_since
from control_plane.model.agents import Agent
from control_plane.model.alerts import (
    AGENT_OFFLINE,
    DAEMON_STALE,
    RUN_FAILURE,
    RUN_MAX_RUNTIME,
    RUN_QUEUED_TOO_LONG,
    TICK_FAILURE,
    AlertDelivery,
    Occurrence,
)
from control_plane.model.instigators import Tick
from control_plane.model.runs import Run, StatusChange
from control_plane.model.statuses import MAX_RUNTIME, RunStatus
from control_plane.model.times import iso
from control_plane.storage.port import AgentStore, AlertStore, RunStore

log = logging.getLogger("fleetrun.alerts")

PAGE = 500  # status changes, ticks or queued runs read per pass
DETECT_SECONDS = 2.0  # how often the queue, agents and loops are looked at, at the latest
MIN_PAUSE_SECONDS = 0.1  # between passes while a delivery is due (a claim lost to a race)
STATUS_CURSOR, TICK_CURSOR, WATCHING_SINCE = "status_changes", "ticks", "watching_since"


@dataclass(frozen=True)
class AlertSettings:
    """What detection needs of the instance's config."""

    base_url: str  # links to run pages: [server] public_url, or host and port
    heartbeat_timeout: float
    monitoring: RunMonitoringConfig
    stale_after: float = STALE_AFTER_SECONDS


@dataclass(frozen=True)
class AlertSnapshot:
    """What a pass sees: what happened since the cursors, and the state now."""

    failures: Sequence[tuple[StatusChange, Run]] = ()  # changes to FAILURE, new since the last pass
    started: Sequence[Run] = ()  # runs STARTED now
    queued: Sequence[Run] = ()  # runs queued since before the shortest queued_seconds
    agents: Sequence[Agent] = ()
    failed_ticks: Sequence[tuple[Tick, str | None]] = ()  # new, with the status before each
    loop_beats: dict[str, float] = field(default_factory=dict)  # loops this replica runs
    judged_since: float = 0.0  # agents: silence counts from here at the earliest (a restart)
    watching_since: float = 0.0  # an agent offline before alerts were watched is not news


@dataclass(frozen=True)
class Happening:
    """One thing that happened, before the rules it concerns are known."""

    event: str
    key: str
    time: float
    text: str
    fields: dict[str, Any]
    run: Run | None = None  # run events: what `jobs` and `tags` of a rule look at
    waited: float = 0.0  # run_queued_too_long: seconds queued so far


def _run_fields(run: Run, settings: AlertSettings, reason: str | None) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job": run.job,
        "status": str(run.status),
        "reason": reason,
        "url": f"{settings.base_url}/ui/runs/{run.run_id}",
    }


def _run_happenings(
    snapshot: AlertSnapshot, now: float, settings: AlertSettings
) -> list[Happening]:
    found: list[Happening] = []
    for change, run in snapshot.failures:
        reason = run.status_reason or "no reason given"
        fields = _run_fields(run, settings, reason)
        text = f"run {run.run_id} of job {run.job} failed: {reason}"
        found.append(
            Happening(RUN_FAILURE, f"{RUN_FAILURE}/{run.run_id}", change.time, text, fields, run)
        )
        if run.failure_kind == MAX_RUNTIME:
            key = f"{RUN_MAX_RUNTIME}/{run.run_id}"
            found.append(Happening(RUN_MAX_RUNTIME, key, change.time, text, fields, run))
    for run in snapshot.started:
        limit = max_runtime(run, settings.monitoring)
        if limit <= 0 or run.start_time is None or now - run.start_time <= limit:
            continue
        reason = (
            f"STARTED for {now - run.start_time:.0f} s, longer than its max runtime of {limit:g} s"
        )
        text = f"run {run.run_id} of job {run.job} is {reason}"
        fields = _run_fields(run, settings, reason)
        found.append(
            Happening(RUN_MAX_RUNTIME, f"{RUN_MAX_RUNTIME}/{run.run_id}", now, text, fields, run)
        )
    for run in snapshot.queued:
        if run.status != RunStatus.QUEUED:
            continue
        waited = now - queued_since(run)
        reason = f"queued for {waited:.0f} s"
        text = f"run {run.run_id} of job {run.job} has been {reason}"
        fields = _run_fields(run, settings, reason)
        key = f"{RUN_QUEUED_TOO_LONG}/{run.run_id}"
        found.append(Happening(RUN_QUEUED_TOO_LONG, key, now, text, fields, run, waited))
    return found


def _agent_happenings(
    snapshot: AlertSnapshot, now: float, settings: AlertSettings
) -> list[Happening]:
    found: list[Happening] = []
    timeout = settings.heartbeat_timeout
    for agent in snapshot.agents:
        # As the monitor judges: a heartbeat stamped in the future counts as now, and
        # after a restart every agent gets a full timeout to check in again.
        seen = max(min(agent.last_heartbeat, now), snapshot.judged_since)
        offline_since = agent.last_heartbeat + timeout
        if now - seen <= timeout or offline_since < snapshot.watching_since:
            continue
        silent = now - agent.last_heartbeat
        reason = f"no heartbeat for {silent:.0f} s (last seen {iso(agent.last_heartbeat)})"
        text = f"agent {agent.name} is offline: {reason}"
        fields = {"agent": agent.name, "agent_id": agent.agent_id, "reason": reason}
        key = f"{AGENT_OFFLINE}/{agent.agent_id}/{agent.last_heartbeat:.3f}"
        found.append(Happening(AGENT_OFFLINE, key, offline_since, text, fields))
    return found


def _tick_happenings(snapshot: AlertSnapshot) -> list[Happening]:
    found: list[Happening] = []
    for tick, before in snapshot.failed_ticks:
        if before == "FAILURE":  # the same trouble as the tick before: one alert per streak
            continue
        reason = tick.error or "no error given"
        text = f"{tick.kind} {tick.name} (location {tick.location}) failed a tick: {reason}"
        fields: dict[str, Any] = {
            "tick_id": tick.id,
            "instigator": tick.name,
            "instigator_kind": tick.kind,
            "location": tick.location,
            "reason": reason,
        }
        when = tick.end_time or tick.start_time
        found.append(Happening(TICK_FAILURE, f"{TICK_FAILURE}/{tick.id}", when, text, fields))
    return found


def _loop_happenings(
    snapshot: AlertSnapshot, now: float, settings: AlertSettings
) -> list[Happening]:
    found: list[Happening] = []
    for loop, beat in sorted(snapshot.loop_beats.items()):
        if now - beat <= settings.stale_after:
            continue
        reason = f"no pass for {now - beat:.0f} s (stale after {settings.stale_after:g} s)"
        text = f"daemon loop {loop} is stale: {reason}"
        key = f"{DAEMON_STALE}/{loop}/{beat:.3f}"
        found.append(Happening(DAEMON_STALE, key, now, text, {"loop": loop, "reason": reason}))
    return found


def concerns(rule: AlertRule, happening: Happening) -> bool:
    """Whether `rule` announces `happening`: one of its events; for a run, one of its
    jobs with its tags; for a queued run, one queued longer than its `queued_seconds`."""
    if happening.event not in rule.on:
        return False
    run = happening.run
    if run is not None and not rule.matches_run(run.job, run.tags):
        return False
    return happening.event != RUN_QUEUED_TOO_LONG or happening.waited > rule.queued_seconds


def find_alerts(
    rules: Sequence[AlertRule], snapshot: AlertSnapshot, now: float, settings: AlertSettings
) -> list[Occurrence]:
    """Each thing in `snapshot` that some rule announces, once per such rule, with the
    JSON body its webhook gets (Slack's `text` and generic fields)."""
    happenings = [
        *_run_happenings(snapshot, now, settings),
        *_agent_happenings(snapshot, now, settings),
        *_tick_happenings(snapshot),
        *_loop_happenings(snapshot, now, settings),
    ]
    found: list[Occurrence] = []
    for rule in rules:
        for happening in happenings:
            if not concerns(rule, happening):
                continue
            payload: dict[str, Any] = {
                "text": f"[fleetrun] {rule.name}: {happening.text}",
                "alert": rule.name,
                "event": happening.event,
                "key": happening.key,
                "time": iso(happening.time),
                "run_id": None,
                "job": None,
                "status": None,
                "reason": None,
                "url": None,
                **happening.fields,
            }
            found.append(Occurrence(rule.name, happening.event, happening.key, payload))
    return found


class AlertingStore(RunStore, AgentStore, AlertStore, Protocol):
    """What the alerts loop uses of storage."""


@dataclass
class Alerter:
    """What an alerts pass works with; `judged_since` moves when this replica takes the
    loop over (agents then get a full heartbeat timeout before they count as offline)."""

    storage: AlertingStore
    rules: list[AlertRule]
    settings: AlertSettings
    health: DaemonHealth
    clock: Clock
    sink: AlertSink
    judged_since: float = 0.0
    next_look: float = 0.0  # when the queue, agents and loops are next read
    tasks: TaskSet = field(default_factory=TaskSet)
    in_flight: set[int] = field(default_factory=set)

    def gained(self) -> None:
        self.judged_since = self.clock.time()

    @property
    def events(self) -> set[str]:
        return {event for rule in self.rules for event in rule.on}


async def _news(
    alerter: Alerter, cursors: dict[str, float]
) -> tuple[list[tuple[StatusChange, Run]], list[tuple[Tick, str | None]], dict[str, float]]:
    """New run failures and failed ticks since the cursors, and where the cursors move
    once they are stored (the cursors move also for events no rule wants yet)."""
    storage, events = alerter.storage, alerter.events
    latest_change = await storage.last_status_change()
    horizon = await storage.tick_horizon()
    moved = {STATUS_CURSOR: float(latest_change), TICK_CURSOR: float(horizon)}
    failures: list[tuple[StatusChange, Run]] = []
    if events & {RUN_FAILURE, RUN_MAX_RUNTIME}:
        after = int(cursors[STATUS_CURSOR])
        failures = await storage.status_changes(after, PAGE, [RunStatus.FAILURE])
        if len(failures) == PAGE:  # more to read: the next pass goes on from here
            moved[STATUS_CURSOR] = float(failures[-1][0].id)
    failed_ticks: list[tuple[Tick, str | None]] = []
    if TICK_FAILURE in events:
        failed_ticks = await storage.failed_ticks(int(cursors[TICK_CURSOR]), horizon, PAGE)
        if len(failed_ticks) == PAGE:
            moved[TICK_CURSOR] = float(failed_ticks[-1][0].id)
    return failures, failed_ticks, moved


async def _state(
    alerter: Alerter, now: float
) -> tuple[list[Run], list[Run], list[Agent], dict[str, float]]:
    """The runs started and queued for long, the agents and the loops' beats, as now."""
    storage, events = alerter.storage, alerter.events
    started: list[Run] = []
    if RUN_MAX_RUNTIME in events:
        started = [r for r in await storage.active_runs() if r.status == RunStatus.STARTED]
    queued: list[Run] = []
    waits = [r.queued_seconds for r in alerter.rules if RUN_QUEUED_TOO_LONG in r.on]
    if waits:
        queued = await storage.queued_before(now - min(waits), PAGE)
    agents = await storage.list_agents() if AGENT_OFFLINE in events else []
    beats: dict[str, float] = {}
    if DAEMON_STALE in events:
        beats = {name: loop.last_beat for name, loop in alerter.health.loops.items()}
    return started, queued, agents, beats


async def _cursors(alerter: Alerter, now: float) -> dict[str, float]:
    """Where detection resumes; on the very first pass, from now: what happened before
    alerts were configured is not announced."""
    cursors = await alerter.storage.alert_cursors()
    if {STATUS_CURSOR, TICK_CURSOR, WATCHING_SINCE} <= cursors.keys():
        return cursors
    start = {
        STATUS_CURSOR: float(await alerter.storage.last_status_change()),
        TICK_CURSOR: float(await alerter.storage.tick_horizon()),
        WATCHING_SINCE: now,
    }
    start.update(cursors)
    await alerter.storage.record_alerts([], start, now)
    return start


async def detect(alerter: Alerter, now: float) -> list[Occurrence]:
    """Store what happened since the last pass; the occurrences that were new. Failures
    are read on every pass (a run failing wakes the loop); the state of the queue, the
    agents and the loops only every `DETECT_SECONDS`, so a storm of wake-ups costs a
    few reads each, not a scan of the fleet."""
    cursors = await _cursors(alerter, now)
    failures, failed_ticks, moved = await _news(alerter, cursors)
    started: list[Run] = []
    queued: list[Run] = []
    agents: list[Agent] = []
    beats: dict[str, float] = {}
    if now >= alerter.next_look:
        started, queued, agents, beats = await _state(alerter, now)
        alerter.next_look = now + DETECT_SECONDS
    snapshot = AlertSnapshot(
        failures,
        started,
        queued,
        agents,
        failed_ticks,
        beats,
        alerter.judged_since,
        cursors[WATCHING_SINCE],
    )
    found = find_alerts(alerter.rules, snapshot, now, alerter.settings)
    if not found and all(moved[name] <= cursors[name] for name in moved):
        return []  # nothing to write
    new = await alerter.storage.record_alerts(found, moved, now)
    for occurrence in new:
        log.warning("alert %s: %s", occurrence.rule, occurrence.payload["text"])
    return new


async def alert_pass(alerter: Alerter, now: float) -> float:
    """Detect, then start the deliveries that are due, each a task of the loop (at most
    `max_in_flight` at once). Returns when the next delivery falls due, or the next look
    at the queue, agents and loops; a run failing or a delivery ending wakes it sooner."""
    await detect(alerter, now)
    policy = alerter.sink.policy
    room = policy.max_in_flight - len(alerter.in_flight)
    due = await alerter.storage.next_delivery_due()
    if room > 0 and due is not None and due <= now:
        for delivery in await alerter.storage.claim_deliveries(now, policy.hold_seconds, room):
            alerter.in_flight.add(delivery.id)
            alerter.tasks.start(delivery.id, _attempt(alerter, delivery))
        due = await alerter.storage.next_delivery_due()
    if due is None or len(alerter.in_flight) >= policy.max_in_flight:
        return alerter.next_look
    return min(alerter.next_look, max(due, now + MIN_PAUSE_SECONDS))


async def _attempt(alerter: Alerter, delivery: AlertDelivery) -> None:
    try:
        await deliver(alerter.sink, delivery)
    finally:
        alerter.in_flight.discard(delivery.id)
