"""`GET /metrics` on a real app and SQLite file, with a fake agent speaking msgpack.

The exposition is parsed with prometheus_client's own parser, so every check also proves
that the text is valid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from control_plane.bus import INSTIGATORS, RETRIES, WakeBus
from control_plane.clock import SystemClock
from control_plane.config import ControlPlaneConfig, RunRetriesConfig
from control_plane.daemon.driver import DaemonLoop, Driver
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.leadership import LeaderElector
from control_plane.daemon.retries import Retrier, retry_pass
from control_plane.http.keys import BUS, HEALTH, STORAGE
from control_plane.metrics import Metrics, queued_since, submitted_at
from control_plane.model.runs import Run
from control_plane.model.statuses import RunStatus
from control_plane.storage import open_storage
from protocol.messages import (
    EventAck,
    EventBatch,
    Heartbeat,
    HeartbeatReply,
    Poll,
    PollReply,
    RunRecord,
)
from tests.conftest import app_for
from tests.unit.test_api import agent_call, register, submit

LOOPS = ("run-queue", "monitor", "retries", "scheduler", "sensors")  # /readyz's names


def make_config(tmp_path: Path) -> ControlPlaneConfig:
    return ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"}, server={"poll_timeout_seconds": 0.3}
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> TestClient:
    return await aiohttp_client(app_for(make_config(tmp_path)))


async def scrape(client: TestClient) -> list[Sample]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await resp.text()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The one sample called `name` whose labels include `labels` (None: no such sample)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name} {labels} matches several samples"
    return found[0] if found else None


async def eventually(
    client: TestClient, check: Callable[[list[Sample]], bool], what: str
) -> list[Sample]:
    """Scrape until `check` holds (the daemon loops run on their own); bounded."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        samples = await scrape(client)
        if check(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def passed(*loops: str) -> Callable[[list[Sample]], bool]:
    """Every one of `loops` has timed a pass."""
    name = "fleetrun_daemon_loop_duration_seconds_count"
    return lambda samples: all(value(samples, name, loop=loop) for loop in loops)


def failed(*loops: str) -> Callable[[list[Sample]], bool]:
    """Every one of `loops` has counted an error."""
    name = "fleetrun_daemon_loop_errors_total"
    return lambda samples: all(value(samples, name, loop=loop) for loop in loops)


async def test_a_run_from_queue_to_success_shows_in_the_metrics(client: TestClient) -> None:
    agent_id = await register(client)
    assert (await client.post(f"/api/v1/agents/{agent_id}/drain")).status == 200
    _, body = await submit(client, job="etl")  # no agent takes it: it waits in the queue
    run_id = body["run_id"]
    samples = await scrape(client)
    assert value(samples, "fleetrun_queue_depth") == 1
    assert value(samples, "fleetrun_runs", status="QUEUED") == 1
    assert value(samples, "fleetrun_run_queue_wait_seconds_count") == 0
    assert value(samples, "fleetrun_agents", status="DRAINING") == 1

    await client.post(f"/api/v1/agents/{agent_id}/undrain")  # the run is assigned at once
    (launch,) = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches
    samples = await scrape(client)
    assert value(samples, "fleetrun_queue_depth") == 0
    assert value(samples, "fleetrun_runs", status="STARTING") == 1
    assert value(samples, "fleetrun_run_queue_wait_seconds_count") == 1
    assert value(samples, "fleetrun_run_dispatch_latency_seconds_count") == 0  # not held yet
    assert value(samples, "fleetrun_agents", status="ONLINE") == 1
    assert value(samples, "fleetrun_agents", status="OFFLINE") == 0

    for _ in range(2):  # the agent says it holds the launch; the second poll changes nothing
        await agent_call(client, "poll", Poll(agent_id, [launch.lease]), PollReply)
    await agent_call(client, "heartbeat", Heartbeat(agent_id=agent_id), HeartbeatReply)
    records = [
        RunRecord(seq=1, time=1.0, kind="event", type="RUN_START"),
        RunRecord(seq=2, time=2.0, kind="log", type="stdout", step="a", message="hi\n"),
        RunRecord(seq=3, time=3.0, kind="event", type="RUN_SUCCESS", message="done"),
    ]
    batch = EventBatch(agent_id=agent_id, run_id=run_id, lease=launch.lease, records=records)
    for _ in range(2):  # resent: stored once, counted once
        assert (await agent_call(client, "events", batch, EventAck)).acked_seq == 3
    assert (await client.get(f"/api/v1/runs/{run_id}")).status == 200
    assert (await client.get(f"/no/such/{run_id}")).status == 404

    samples = await eventually(client, passed(*LOOPS), "a pass of every daemon loop")
    assert value(samples, "fleetrun_runs", status="SUCCESS") == 1
    assert value(samples, "fleetrun_runs", status="QUEUED") == 0
    assert value(samples, "fleetrun_queue_depth") == 0
    assert value(samples, "fleetrun_run_queue_wait_seconds_count") == 1
    assert value(samples, "fleetrun_run_dispatch_latency_seconds_count") == 1
    assert value(samples, "fleetrun_agent_heartbeats_received_total") == 1
    assert value(samples, "fleetrun_records_ingested_total", kind="event") == 2
    assert value(samples, "fleetrun_records_ingested_total", kind="log") == 1
    assert value(samples, "fleetrun_daemon_loop_errors_total", loop="run-queue") == 0

    http = "fleetrun_http_request_duration_seconds_count"
    assert value(samples, http, method="GET", route="/api/v1/runs/{run_id}", status="2xx") == 1
    assert value(samples, http, method="POST", route="/api/v1/runs", status="2xx") == 1
    assert value(samples, http, method="POST", route="/agent/v1/events", status="2xx") == 2
    assert value(samples, http, method="GET", route="unmatched", status="4xx") == 1
    assert value(samples, http, method="GET", route="/metrics", status="2xx")
    label_values = {v for s in samples for v in s.labels.values()}
    assert not [v for v in label_values if run_id in v or agent_id in v]


async def test_records_before_the_poll_count_the_launch_as_received_once(
    client: TestClient,
) -> None:
    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    (launch,) = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches
    start = RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")
    batch = EventBatch(
        agent_id=agent_id, run_id=body["run_id"], lease=launch.lease, records=[start]
    )
    await agent_call(client, "events", batch, EventAck)  # its RUN_START beat its next poll
    await agent_call(client, "poll", Poll(agent_id, [launch.lease]), PollReply)
    samples = await scrape(client)
    assert value(samples, "fleetrun_run_dispatch_latency_seconds_count") == 1
    run = await (await client.get(f"/api/v1/runs/{body['run_id']}")).json()
    assert run["status"] == "STARTED"


async def test_fenced_writes_and_agent_api_errors_are_counted(client: TestClient) -> None:
    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    (launch,) = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches
    record = RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")
    stale = EventBatch(
        agent_id=agent_id, run_id=body["run_id"], lease=launch.lease + 100, records=[record]
    )
    status, _ = await agent_call(client, "events", stale, EventAck)
    assert status == 409
    resp = await client.put(
        f"/agent/v1/outputs/{body['run_id']}/a?lease={launch.lease + 100}&agent_id={agent_id}",
        data=b"x",
    )
    assert resp.status == 409
    status, _ = await agent_call(client, "poll", Poll(agent_id="ghost"), PollReply)
    assert status == 404
    samples = await scrape(client)
    assert value(samples, "fleetrun_fenced_writes_total") == 2
    assert value(samples, "fleetrun_agent_api_errors_total", code="stale_lease") == 2
    assert value(samples, "fleetrun_agent_api_errors_total", code="unknown_agent") == 1
    http = "fleetrun_http_request_duration_seconds_count"
    route = "/agent/v1/outputs/{run_id}/{step}"
    assert value(samples, http, method="PUT", route=route, status="4xx") == 1


async def test_a_daemon_pass_that_raises_is_counted(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = client.app
    storage = app[STORAGE]

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("storage is down")

    await eventually(client, passed("retries", "sensors"), "a first pass")
    monkeypatch.setattr(storage, "pending_retries", broken)
    monkeypatch.setattr(storage, "instigator_states", broken)
    app[BUS].publish(RETRIES)
    app[BUS].publish(INSTIGATORS)
    samples = await eventually(client, failed("retries", "sensors"), "the failed passes")
    assert app[HEALTH].loops["retries"].last_error == "RuntimeError: storage is down"
    # A failed pass is timed too.
    timed = value(samples, "fleetrun_daemon_loop_duration_seconds_count", loop="retries")
    assert timed is not None and timed >= 2


async def test_the_driver_reports_a_loops_passes_to_the_metrics_it_is_given(
    tmp_path: Path,
) -> None:
    class BrokenStorage:
        async def pending_retries(self, limit: int) -> list[Run]:
            raise RuntimeError("boom")

    metrics, clock = Metrics(), SystemClock()
    storage = open_storage(f"sqlite:///{tmp_path}/leases.db")
    await storage.open()
    health = DaemonHealth(clock, metrics)
    bus = WakeBus(storage, "replica")
    elector = LeaderElector(storage, clock, health, "replica", lease_seconds=6.0)
    retrier = Retrier(BrokenStorage(), RunRetriesConfig(), bus)  # type: ignore[arg-type]
    Driver(bus, clock, health, elector).add(DaemonLoop("retries", retry_pass, retrier))
    await elector.elect_once()
    try:
        for _ in range(200):
            if metrics.registry.get_sample_value(
                "fleetrun_daemon_loop_errors_total", {"loop": "retries"}
            ):
                break
            await asyncio.sleep(0.01)
    finally:
        await elector.release_all()
        await storage.close()
    sample = metrics.registry.get_sample_value
    assert sample("fleetrun_daemon_loop_errors_total", {"loop": "retries"}) == 1
    assert sample("fleetrun_daemon_loop_duration_seconds_count", {"loop": "retries"}) == 1


async def test_no_label_value_comes_from_user_input(client: TestClient) -> None:
    evil = 'x"} 1\nfleetrun_evil{a="'
    agent_id = await register(client)
    status, _ = await submit(client, job="etl", tags={"team": evil}, config={"k": evil})
    assert status == 201
    await client.get("/api/v1/runs", params={"job": evil, "tag": f"team:{evil}"})
    await client.get("/api/v1/runs/" + evil.replace("\n", "%0A"))
    await client.request("PROPFIND", '/dav"\nx')  # a method HTTP parses, but no route has
    await client.get("/metrics")
    resp = await client.get("/metrics")
    text = await resp.text()
    assert "fleetrun_evil" not in text and evil not in text and agent_id not in text
    samples = await scrape(client)  # parses
    http = [s for s in samples if s.name == "fleetrun_http_request_duration_seconds_count"]
    assert {s.labels["method"] for s in http} <= {"GET", "POST", "other"}
    assert {s.labels["status"] for s in http} <= {"2xx", "3xx", "4xx", "5xx"}
    assert (
        value(
            samples,
            "fleetrun_http_request_duration_seconds_count",
            method="other",
            route="unmatched",
            status="4xx",
        )
        == 1
    )


async def test_metrics_need_no_token_when_auth_is_on(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    config = make_config(tmp_path).updated(auth={"enabled": True})
    client = await aiohttp_client(app_for(config))
    assert (await client.get("/api/v1/runs")).status == 401
    samples = await scrape(client)
    assert (
        value(
            samples,
            "fleetrun_http_request_duration_seconds_count",
            method="GET",
            route="/api/v1/runs",
            status="4xx",
        )
        == 1
    )


def test_each_control_plane_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # the default registry would refuse the second
    first.heartbeats.inc()
    assert first.registry.get_sample_value("fleetrun_agent_heartbeats_received_total") == 1
    assert second.registry.get_sample_value("fleetrun_agent_heartbeats_received_total") == 0


def test_waiting_starts_when_a_run_is_queued_or_its_retry_delay_ends() -> None:
    run = Run("r", "etl", "loc", RunStatus.QUEUED, {}, {}, create_time=100.0, status_time=130.0)
    assert (queued_since(run), submitted_at(run)) == (130.0, 100.0)  # queued again at 130
    run.not_before = 160.0  # a delayed retry: the delay is policy, not waiting
    assert (queued_since(run), submitted_at(run)) == (160.0, 160.0)
