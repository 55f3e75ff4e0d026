"""Alert detection as a pure function of rules, a snapshot and the time; the delivery
policy's backoff; and a pass over real storage that never waits on its webhook."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from control_plane.clock import SystemClock
from control_plane.config import AlertRule, RunMonitoringConfig, load_control_plane_config
from control_plane.daemon.alerts import (
    Alerter,
    AlertSettings,
    AlertSnapshot,
    alert_pass,
    find_alerts,
)
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.webhooks import AlertSink, DeliveryPolicy
from control_plane.model.agents import Agent
from control_plane.model.alerts import ALERT_EVENTS
from control_plane.model.instigators import Tick
from control_plane.model.runs import NewRun, Run, StatusChange
from control_plane.model.statuses import MAX_RUNTIME, OP_FAILURE, RunStatus
from control_plane.storage import Storage, open_storage
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord
from protocol.schema import ConfigError
from tests.conftest import free_port

NOW = 10_000.0
SETTINGS = AlertSettings("https://fleet.example", 30.0, RunMonitoringConfig())
HOOK = "http://127.0.0.1:9/hook"


def rule(*events: str, name: str = "oncall", **kw: object) -> AlertRule:
    return AlertRule(name=name, on=list(events), webhook_url=HOOK, **kw)  # type: ignore[arg-type]


def run(
    run_id: str,
    status: RunStatus,
    job: str = "etl",
    tags: dict[str, str] | None = None,
    since: float = NOW - 1,
    failure_kind: str | None = None,
) -> Run:
    return Run(
        run_id=run_id,
        job=job,
        location="loc",
        status=status,
        tags=dict(tags or {}),
        config={},
        create_time=since,
        status_time=since,
        start_time=since if status != RunStatus.QUEUED else None,
        status_reason="op boom failed" if status == RunStatus.FAILURE else None,
        failure_kind=failure_kind,
    )


def failed(run_id: str, job: str = "etl", **kw: object) -> tuple[StatusChange, Run]:
    failure = run(run_id, RunStatus.FAILURE, job, failure_kind=OP_FAILURE, **kw)  # type: ignore[arg-type]
    return StatusChange(1, run_id, RunStatus.FAILURE, NOW - 1), failure


def agent(agent_id: str, last_heartbeat: float) -> Agent:
    return Agent(
        agent_id, f"name-{agent_id}", "host", "ONLINE", ["default"], 4, "0.1", last_heartbeat, 0.0
    )


def keys(found: list) -> list[tuple[str, str]]:
    return [(o.rule, o.key) for o in found]


def test_a_failed_run_is_announced_with_a_body_slack_takes() -> None:
    found = find_alerts(
        [rule("run_failure")], AlertSnapshot(failures=[failed("r1")]), NOW, SETTINGS
    )
    (only,) = found
    assert (only.rule, only.event, only.key) == ("oncall", "run_failure", "run_failure/r1")
    body = only.payload
    assert body["text"] == "[fleetrun] oncall: run r1 of job etl failed: op boom failed"
    assert {k: body[k] for k in ("alert", "event", "run_id", "job", "status", "reason")} == {
        "alert": "oncall",
        "event": "run_failure",
        "run_id": "r1",
        "job": "etl",
        "status": "FAILURE",
        "reason": "op boom failed",
    }
    assert body["url"] == "https://fleet.example/ui/runs/r1"
    assert body["time"].endswith("Z") and body["key"] == "run_failure/r1"


def test_rules_narrow_run_events_by_job_and_tags() -> None:
    rules = [
        rule("run_failure", name="all"),
        rule("run_failure", name="etl-only", jobs=["etl"]),
        rule("run_failure", name="team-a", tags={"team": "a"}),
        rule("agent_offline", name="fleet"),
    ]
    snapshot = AlertSnapshot(
        failures=[
            failed("r1", "etl", tags={"team": "b"}),
            failed("r2", "other", tags={"team": "a"}),
        ]
    )
    assert keys(find_alerts(rules, snapshot, NOW, SETTINGS)) == [
        ("all", "run_failure/r1"),
        ("all", "run_failure/r2"),
        ("etl-only", "run_failure/r1"),
        ("team-a", "run_failure/r2"),
    ]


def test_max_runtime_from_a_run_still_going_or_failed_for_it() -> None:
    long = run("long", RunStatus.STARTED, tags={"fleetrun/max_runtime": "60"}, since=NOW - 61)
    short = run("short", RunStatus.STARTED, tags={"fleetrun/max_runtime": "60"}, since=NOW - 59)
    unbounded = run("free", RunStatus.STARTED, since=NOW - 10_000)  # config: no limit
    change, killed = failed("killed")
    killed.failure_kind = MAX_RUNTIME
    snapshot = AlertSnapshot(failures=[(change, killed)], started=[long, short, unbounded])
    found = find_alerts([rule("run_max_runtime")], snapshot, NOW, SETTINGS)
    assert keys(found) == [("oncall", "run_max_runtime/killed"), ("oncall", "run_max_runtime/long")]
    assert "longer than its max runtime of 60 s" in found[1].payload["reason"]
    # The instance's max_runtime_seconds applies to runs without the tag
    settings = AlertSettings("x", 30.0, RunMonitoringConfig(max_runtime_seconds=5000))
    found = find_alerts(
        [rule("run_max_runtime")], AlertSnapshot(started=[unbounded]), NOW, settings
    )
    assert keys(found) == [("oncall", "run_max_runtime/free")]


def test_queued_too_long_uses_each_rules_own_threshold() -> None:
    waiting = run("w", RunStatus.QUEUED, since=NOW - 120)
    rules = [
        rule("run_queued_too_long", name="fast", queued_seconds=60),
        rule("run_queued_too_long", name="slow"),  # 600 s by default
    ]
    found = find_alerts(rules, AlertSnapshot(queued=[waiting]), NOW, SETTINGS)
    assert keys(found) == [("fast", "run_queued_too_long/w")]
    assert found[0].payload["reason"] == "queued for 120 s"


def test_an_agent_is_offline_after_the_heartbeat_timeout_and_a_grace_after_restart() -> None:
    agents = [agent("a1", NOW - 31), agent("a2", NOW - 29), agent("a3", NOW + 100)]
    rules = [rule("agent_offline")]
    found = find_alerts(rules, AlertSnapshot(agents=agents), NOW, SETTINGS)
    assert keys(found) == [("oncall", f"agent_offline/a1/{NOW - 31:.3f}")]
    assert found[0].payload["agent"] == "name-a1"
    assert found[0].payload["text"].startswith("[fleetrun] oncall: agent name-a1 is offline")
    # Just after this replica took over, every agent gets a full timeout first
    grace = AlertSnapshot(agents=agents, judged_since=NOW - 10)
    assert find_alerts(rules, grace, NOW, SETTINGS) == []
    # An agent that was offline before alerts were watched is no news
    old = AlertSnapshot(agents=[agent("gone", NOW - 5000)], watching_since=NOW - 100)
    assert find_alerts(rules, old, NOW, SETTINGS) == []


def tick(tick_id: int, error: str = "it blew up") -> Tick:
    return Tick(
        tick_id, "loc", "inbox", "sensor", None, "FAILURE", None, error, [], None, NOW - 5, NOW - 4
    )


def test_failed_ticks_once_per_streak_and_stale_loops() -> None:
    snapshot = AlertSnapshot(
        failed_ticks=[(tick(7), "SUCCESS"), (tick(8, "again"), "FAILURE"), (tick(9), None)],
        loop_beats={"scheduler": NOW - 61, "sensors": NOW - 1},
    )
    found = find_alerts([rule("tick_failure", "daemon_stale")], snapshot, NOW, SETTINGS)
    assert keys(found) == [
        ("oncall", "tick_failure/7"),
        ("oncall", "tick_failure/9"),
        ("oncall", f"daemon_stale/scheduler/{NOW - 61:.3f}"),
    ]
    assert found[0].payload["reason"] == "it blew up"
    assert found[0].payload["instigator"] == "inbox"
    assert found[2].payload["loop"] == "scheduler"
    assert found[0].payload["run_id"] is None  # generic fields are always there


def test_keys_are_stable_so_repeated_detection_names_the_same_occurrence() -> None:
    snapshot = AlertSnapshot(
        failures=[failed("r1")],
        agents=[agent("a1", NOW - 100)],
        queued=[run("w", RunStatus.QUEUED, since=NOW - 1000)],
    )
    rules = [rule("run_failure", "agent_offline", "run_queued_too_long")]
    first = keys(find_alerts(rules, snapshot, NOW, SETTINGS))
    later = keys(find_alerts(rules, snapshot, NOW + 50, SETTINGS))
    assert first == later and len(first) == 3


def test_backoff_doubles_up_to_the_cap_then_gives_up() -> None:
    policy = DeliveryPolicy(max_attempts=5, first_retry_seconds=1.0, max_retry_seconds=5.0)
    delays = [policy.retry_at(n, 100.0) for n in range(1, 6)]
    assert delays == [101.0, 102.0, 104.0, 105.0, None]


# --- a pass over real storage -------------------------------------------------------------


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Storage]:
    store = open_storage(f"sqlite:///{tmp_path}/fleetrun.db")
    await store.open()
    yield store
    await store.close()


async def fail_a_run(storage: Storage, run_id: str, now: float) -> None:
    """A run that starts on an agent and fails, as the agent reports it."""
    located = CodeLocationInfo(name="loc", jobs=[JobInfo(name="etl", ops=[OpInfo(name="a")])])
    worker = await storage.register_agent("w1", "host", "0.1", ["default"], 4, [located], now)
    await storage.create_run(NewRun(run_id, "etl", "loc", {}, {}), now)
    (assigned,) = await storage.assign_queued(now, lambda _: [(run_id, worker.agent_id)])
    records = [
        RunRecord(seq=1, time=now, kind="event", type="RUN_START", message="go"),
        RunRecord(seq=2, time=now, kind="event", type="RUN_FAILURE", message="op a failed"),
    ]
    assert assigned.lease is not None
    await storage.append_records(run_id, assigned.lease, records, now)


async def test_a_pass_never_waits_for_a_slow_webhook(sqlite: Storage) -> None:
    release = asyncio.Event()
    bodies: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    clock = SystemClock()
    url = f"http://127.0.0.1:{port}/hook"
    sink = AlertSink(sqlite, {"oncall": url}, clock, DeliveryPolicy(timeout_seconds=30))
    rules = [AlertRule("oncall", ["run_failure"], url)]
    alerter = Alerter(sqlite, rules, SETTINGS, DaemonHealth(clock), clock, sink)
    try:
        await alert_pass(alerter, clock.time())  # the first pass starts watching from now
        await fail_a_run(sqlite, "r1", clock.time())
        started = time.monotonic()
        await alert_pass(alerter, clock.time())
        assert time.monotonic() - started < 1.0
        (delivery,) = await sqlite.recent_deliveries(10)
        assert (delivery.key, delivery.status, delivery.attempts) == (
            "run_failure/r1",
            "pending",
            1,
        )
        # The receiver has the body while the pass is long over; then it answers
        for _ in range(200):
            if bodies:
                break
            await asyncio.sleep(0.05)
        assert bodies[0]["run_id"] == "r1" and bodies[0]["reason"] == "op a failed"
        assert await alert_pass(alerter, clock.time()) is not None  # nothing due meanwhile
        release.set()
        for _ in range(200):
            if (await sqlite.recent_deliveries(1))[0].status == "sent":
                break
            await asyncio.sleep(0.05)
        assert (await sqlite.recent_deliveries(1))[0].status == "sent"
        assert alerter.in_flight == set()
    finally:
        release.set()
        await alerter.tasks.cancel_all()
        await runner.cleanup()


# --- the rules as control-plane.toml states them -------------------------------------------


def test_every_problem_of_the_alert_rules_is_named_at_once(tmp_path: Path) -> None:
    path = tmp_path / "control-plane.toml"
    path.write_text(
        """
[[alerts]]
name = "oncall"
on = ["run_failure", "run_fail"]
webhook_url = "ftp://hooks.example/x"
queued_seconds = 0
[[alerts]]
name = "oncall"
on = []
webhook_url = "http://127.0.0.1:9000/hook"
[[alerts]]
name = "team"
on = ["agent_offline"]
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_control_plane_config(str(path))
    events = ", ".join(ALERT_EVENTS)
    assert caught.value.lines == (
        f"{path}: key 'alerts[0].on': unknown event 'run_fail': use one of {events}",
        f"{path}: key 'alerts[0].webhook_url': must be an http:// or https:// URL with a host",
        f"{path}: key 'alerts[0].queued_seconds': must be in (0, 2592000]",
        f"{path}: key 'alerts[1].on': list at least one event: {events}",
        f"{path}: key 'alerts[2].webhook_url': required key is missing",
        f"{path}: key 'alerts[1].name': another alert is called 'oncall'",
    )


def test_a_rule_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "control-plane.toml"
    path.write_text(
        """
[server]
public_url = "https://fleet.example/"
[[alerts]]
name = "oncall"
on = ["run_failure", "run_queued_too_long"]
webhook_url = "https://hooks.slack.com/services/T/B/X"
jobs = ["etl"]
tags = { team = "data" }
queued_seconds = 120
"""
    )
    config = load_control_plane_config(str(path))
    (only,) = config.alerts
    assert only == AlertRule(
        "oncall",
        ["run_failure", "run_queued_too_long"],
        "https://hooks.slack.com/services/T/B/X",
        ["etl"],
        {"team": "data"},
        120.0,
    )
    assert config.server.base_url() == "https://fleet.example"
    assert only.matches_run("etl", {"team": "data", "x": "y"})
    assert not only.matches_run("etl", {"team": "web"}) and not only.matches_run("x", {})
