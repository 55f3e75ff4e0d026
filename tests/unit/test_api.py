"""The HTTP APIs on a real app and SQLite file: validation, errors, long-poll, fencing.

The agent side is spoken here directly in msgpack (as a fake agent would), so that the
server's answers to every message, valid or not, can be checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient

from control_plane.config import ControlPlaneConfig
from control_plane.http.keys import STORAGE
from control_plane.model.runs import NewRun
from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from protocol.codec import decode, encode
from protocol.messages import (
    CodeLocationInfo,
    ErrorReply,
    EventAck,
    EventBatch,
    JobInfo,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
    RunRecord,
)
from tests.conftest import app_for

Client = TestClient


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> TestClient:
    config = ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"}, server={"poll_timeout_seconds": 0.5}
    )
    return await aiohttp_client(app_for(config))


async def agent_call(client: TestClient, path: str, message: Any, reply: type) -> Any:
    resp = await client.post(f"/agent/v1/{path}", data=encode(message))
    body = await resp.read()
    if resp.status != 200:
        return resp.status, decode(body, ErrorReply)
    return decode(body, reply)


async def register(client: TestClient, name: str = "w1", locations: list | None = None) -> str:
    locations = (
        locations
        if locations is not None
        else [
            CodeLocationInfo(name="loc", jobs=[JobInfo(name="etl", ops=[OpInfo(name="a")])]),
            CodeLocationInfo(name="broken", error="ImportError: no module named x"),
        ]
    )
    reply = await agent_call(
        client,
        "register",
        Register(
            name=name,
            hostname="h",
            version="0.1",
            queues=["default"],
            max_concurrent_runs=2,
            code_locations=locations,
        ),
        Registered,
    )
    return reply.agent_id


async def submit(client: TestClient, **body: Any) -> tuple[int, dict]:
    resp = await client.post("/api/v1/runs", json=body)
    return resp.status, await resp.json()


async def test_submit_launch_events_success(client: TestClient) -> None:
    agent_id = await register(client)
    status, body = await submit(client, job="etl", tags={"team": "a"}, config={"n": 1})
    assert status == 201 and body["status"] == "QUEUED"
    run_id = body["run_id"]
    reply = await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)
    (launch,) = reply.launches
    assert (launch.run_id, launch.job, launch.location) == (run_id, "etl", "loc")
    assert launch.tags == {"team": "a", "fleetrun/job": "etl"} and launch.config == {"n": 1}
    records = [
        RunRecord(seq=1, time=1.0, kind="event", type="RUN_START"),
        RunRecord(seq=2, time=2.0, kind="log", type="stdout", step="a", message="hi\n"),
        RunRecord(seq=3, time=3.0, kind="event", type="RUN_SUCCESS", message="done"),
    ]
    batch = EventBatch(agent_id=agent_id, run_id=run_id, lease=launch.lease, records=records)
    assert (await agent_call(client, "events", batch, EventAck)).acked_seq == 3
    assert (await agent_call(client, "events", batch, EventAck)).acked_seq == 3  # resent
    run = await (await client.get(f"/api/v1/runs/{run_id}")).json()
    assert run["status"] == "SUCCESS" and run["agent"] == agent_id
    assert run["start_time"] and run["end_time"] and run["status_reason"] == "done"
    events = (await (await client.get(f"/api/v1/runs/{run_id}/events")).json())["events"]
    assert [e["type"] for e in events] == [
        "RUN_ENQUEUED",
        "RUN_STARTING",
        "RUN_START",
        "RUN_SUCCESS",
    ]
    logs = (await (await client.get(f"/api/v1/runs/{run_id}/logs?step=a")).json())["logs"]
    assert [(c["stream"], c["text"]) for c in logs] == [("stdout", "hi\n")]


async def test_launch_is_offered_until_the_agent_holds_it(client: TestClient) -> None:
    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    first = await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)
    again = await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)
    assert [la.run_id for la in again.launches] == [body["run_id"]]  # response may be lost
    held = await agent_call(
        client, "poll", Poll(agent_id=agent_id, held_leases=[first.launches[0].lease]), PollReply
    )
    assert held.launches == []  # empty after the (short) poll timeout


async def test_cancel_sends_one_stop_order_through_the_poll(client: TestClient) -> None:
    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    run_id = body["run_id"]
    lease = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches[0].lease
    start = RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")
    batch = EventBatch(agent_id=agent_id, run_id=run_id, lease=lease, records=[start])
    await agent_call(client, "events", batch, EventAck)
    resp = await client.post(f"/api/v1/runs/{run_id}/cancel", json={})
    assert (resp.status, (await resp.json())["status"]) == (200, "CANCELING")
    reply = await agent_call(client, "poll", Poll(agent_id, [lease]), PollReply)
    (stop,) = reply.stops
    assert (stop.run_id, stop.lease, stop.cancel, stop.grace_seconds) == (run_id, lease, True, 10)
    # While the agent carries it out, the order is not sent again (the poll just waits)
    quiet = await agent_call(client, "poll", Poll(agent_id, [lease], [lease]), PollReply)
    assert quiet.stops == [] and quiet.launches == []
    done = RunRecord(seq=2, time=2.0, kind="event", type="RUN_CANCELED", message="stopped")
    batch = EventBatch(agent_id=agent_id, run_id=run_id, lease=lease, records=[done])
    await agent_call(client, "events", batch, EventAck)
    run = await (await client.get(f"/api/v1/runs/{run_id}")).json()
    assert run["status"] == "CANCELED"


async def test_a_launch_nobody_acknowledges_goes_back_to_the_queue(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    config = ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"},
        server={"poll_timeout_seconds": 0.5},
        run_monitoring={"launch_ack_timeout_seconds": 0.3},
    )
    client = await aiohttp_client(app_for(config))
    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    first = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches[0]
    # The agent never polls again with that lease held (it crashed, or the reply was lost)
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        again = await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)
        if again.launches and again.launches[0].lease != first.lease:
            break
        await asyncio.sleep(0.05)  # a bounded wait for the monitor's verdict
    assert again.launches[0].run_id == body["run_id"] and again.launches[0].lease > first.lease
    events = (await (await client.get(f"/api/v1/runs/{body['run_id']}/events")).json())["events"]
    assert (
        "launch not acknowledged by the agent within 0.3 s"
        in [e["message"] for e in events if e["type"] == "RUN_ENQUEUED"][-1]
    )
    # Once acknowledged (held in a poll) it stays put
    await agent_call(client, "poll", Poll(agent_id, [again.launches[0].lease]), PollReply)
    run = await (await client.get(f"/api/v1/runs/{body['run_id']}")).json()
    assert run["status"] == "STARTING" and run["lease"] == again.launches[0].lease


async def test_stale_lease_and_foreign_run_are_refused(client: TestClient) -> None:
    agent_id = await register(client)
    other = await register(client, "w2")
    _, body = await submit(client, job="etl")
    launch = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches[0]
    record = RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")
    stale = EventBatch(
        agent_id=agent_id, run_id=body["run_id"], lease=launch.lease + 100, records=[record]
    )
    status, err = await agent_call(client, "events", stale, EventAck)
    assert (status, err.code) == (409, "stale_lease")
    foreign = EventBatch(
        agent_id=other, run_id=body["run_id"], lease=launch.lease, records=[record]
    )
    status, err = await agent_call(client, "events", foreign, EventAck)
    assert (status, err.code) == (403, "not_your_run")


async def test_agent_protocol_errors_are_4xx(client: TestClient) -> None:
    bad_version = msgpack.packb({"v": 999, "type": "Poll", "body": {"agent_id": "x"}})
    for data, code in [
        (b"\xc1garbage", "bad_msgpack"),
        (bad_version, "unsupported_version"),
        (encode(EventAck(acked_seq=1)), "unexpected_message"),
    ]:
        resp = await client.post("/agent/v1/poll", data=data)
        assert resp.status == 400
        err = decode(await resp.read(), ErrorReply)
        assert err.code == code
    resp = await client.post(
        "/agent/v1/poll", data=msgpack.packb({"v": 999, "type": "Poll", "body": {}})
    )
    assert "999" in decode(await resp.read(), ErrorReply).message
    status, err = await agent_call(client, "poll", Poll(agent_id="ghost"), PollReply)
    assert (status, err.code) == (404, "unknown_agent")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/v1/runs", b"{not json", 400, "bad_json"),
        ("POST", "/api/v1/runs", b"[1, 2]", 400, "bad_json"),
        ("POST", "/api/v1/runs", b'{"job": 5}', 422, "bad_request"),
        ("POST", "/api/v1/runs", b'{"job": "etl", "tags": {"a": 1}}', 422, "bad_request"),
        ("POST", "/api/v1/runs", b'{"job": "etl", "surprise": 1}', 422, "bad_request"),
        ("POST", "/api/v1/runs", b'{"job": "nope"}', 404, "unknown_job"),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "location": "elsewhere"}',
            404,
            "unknown_location",
        ),
        ("POST", "/api/v1/runs", b'{"job": "etl", "location": "../../etc"}', 422, "bad_request"),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/priority": "high"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/max_retries": "-1"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/max_retries": "x"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/retry_strategy": "ALL"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/max_runtime": "nan"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/on_lost_contact": "x"}}',
            422,
            "bad_tag",
        ),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/retry_on_op_failure": "yes"}}',
            422,
            "bad_tag",
        ),
        ("POST", "/api/v1/runs/does-not-exist/cancel", b"{}", 404, "unknown_run"),
        (
            "POST",
            "/api/v1/runs",
            b'{"job": "etl", "tags": {"fleetrun/retry_number": "1"}}',
            422,
            "bad_tag",
        ),
        ("GET", "/api/v1/runs/does-not-exist", None, 404, "unknown_run"),
        ("GET", "/api/v1/runs/does-not-exist/events", None, 404, "unknown_run"),
        ("GET", "/api/v1/runs?status=DONE", None, 400, "bad_parameter"),
        ("GET", "/api/v1/runs?limit=100000", None, 400, "bad_parameter"),
        ("GET", "/api/v1/runs?limit=abc", None, 400, "bad_parameter"),
        ("GET", "/api/v1/runs?cursor=zz", None, 400, "bad_parameter"),
        ("GET", "/api/v1/runs?tag=novalue", None, 400, "bad_parameter"),
        ("GET", "/api/v1/nothing", None, 404, "not_found"),
        ("DELETE", "/api/v1/runs", None, 405, "method_not_allowed"),
    ],
)
async def test_bad_requests_get_json_4xx(
    client: TestClient, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    await register(client)
    resp = await client.request(method, path, data=body)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] == code and error["message"]
    assert (await client.get("/healthz")).status == 200  # still serving


async def stored_run(client: TestClient, run_id: str, tags: dict[str, str] | None = None) -> None:
    """A queued run with an id of the test's choosing (the API makes uuid4 ids)."""
    new = NewRun(run_id=run_id, job="etl", location="loc", tags=tags or {}, config={})
    await client.app[STORAGE].create_run(new, now=1.0)


async def test_a_unique_prefix_of_a_run_id_names_the_run_everywhere(client: TestClient) -> None:
    await register(client)
    run_id = (await submit(client, job="etl"))[1]["run_id"]
    short = run_id[:8]
    assert (await (await client.get(f"/api/v1/runs/{short}")).json())["run_id"] == run_id
    assert (await (await client.get(f"/api/v1/runs/{run_id[:4]}")).json())["run_id"] == run_id
    events = await (await client.get(f"/api/v1/runs/{short}/events")).json()
    assert events["events"][0]["type"] == "RUN_ENQUEUED"
    assert (await client.get(f"/api/v1/runs/{short}/logs")).status == 200
    canceled = await (await client.post(f"/api/v1/runs/{short}/cancel", json={})).json()
    assert canceled["run_id"] == run_id
    page = await client.get(f"/ui/runs/{short}", allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (302, f"/ui/runs/{run_id}")


async def test_an_ambiguous_or_too_short_run_id_prefix_is_refused(client: TestClient) -> None:
    for suffix in ("0001", "0002", "0003", "0004", "0005", "0006"):
        await stored_run(client, f"abcd1234-{suffix}")
    await stored_run(client, "abce0000-0001")
    resp = await client.get("/api/v1/runs/abcd1234")
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "ambiguous_run_id"
    assert error["message"] == (
        "run id 'abcd1234' is ambiguous: it starts runs abcd1234-0001, abcd1234-0002, "
        "abcd1234-0003, abcd1234-0004, abcd1234-0005 and more; give more characters"
    )
    resp = await client.post("/api/v1/runs/abcd/cancel", json={})
    assert (resp.status, (await resp.json())["error"]["code"]) == (409, "ambiguous_run_id")
    assert (await (await client.get("/api/v1/runs/abce")).json())["run_id"] == "abce0000-0001"
    moved = await client.post("/api/v1/runs/abce0000/priority", json={"priority": 3})
    assert (await moved.json())["run_id"] == "abce0000-0001"
    for missing in ("abc", "abcf", "abcd1234-0009", "abc%25"):
        resp = await client.get(f"/api/v1/runs/{missing}/events")
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "unknown_run")
    page = await client.get("/ui/runs/abcd")
    assert page.status == 409 and "abcd1234-0005" in await page.text()


async def test_one_tag_filter_syntax_key_equals_value_and_the_older_colon(
    client: TestClient,
) -> None:
    await stored_run(client, "r-plain", {"team": "data"})
    await stored_run(client, "r-url", {"source": "s3://bucket/a=b"})
    await stored_run(client, "r-other", {"team": "ops"})

    async def tagged(raw: str) -> list[str]:
        page = await (await client.get("/api/v1/runs", params={"tag": raw})).json()
        return [r["run_id"] for r in page["runs"]]

    assert await tagged("team=data") == await tagged("team:data") == ["r-plain"]
    assert await tagged("source=s3://bucket/a=b") == ["r-url"]
    assert await tagged("source:s3://bucket/a=b") == ["r-url"]
    assert await tagged("team=") == []
    for bad in ("=data", ":data", "team"):
        resp = await client.get("/api/v1/runs", params={"tag": bad})
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["message"].startswith("tag filter must be key=value")
    page = await client.get("/ui/runs", params={"tag": "team=data"})
    text = await page.text()
    assert page.status == 200 and "/ui/runs/r-plain" in text and "/ui/runs/r-other" not in text


async def test_the_control_planes_version_in_the_api_the_probes_and_the_ui(
    client: TestClient,
) -> None:
    versions = await (await client.get("/api/v1/version")).json()
    assert versions == {"version": FLEETRUN_VERSION, "protocol_version": PROTOCOL_VERSION}
    assert (await (await client.get("/healthz")).json())["version"] == FLEETRUN_VERSION
    assert (await (await client.get("/readyz")).json())["version"] == FLEETRUN_VERSION
    page = await (await client.get("/ui/agents")).text()
    assert (
        f'<span class="version" title="the control plane\'s fleetrun version">v{FLEETRUN_VERSION}'
        in page
    )


async def test_run_filters_and_cursor(client: TestClient) -> None:
    await register(client)
    ids = [(await submit(client, job="etl", tags={"i": str(i)}))[1]["run_id"] for i in range(5)]
    page = await (await client.get("/api/v1/runs?limit=3")).json()
    assert [r["run_id"] for r in page["runs"]] == ids[::-1][:3]
    rest = await (await client.get(f"/api/v1/runs?limit=3&cursor={page['next_cursor']}")).json()
    assert [r["run_id"] for r in rest["runs"]] == ids[::-1][3:] and rest["next_cursor"] is None
    tagged = await (await client.get("/api/v1/runs?tag=i:2&status=QUEUED&job=etl")).json()
    assert [r["run_id"] for r in tagged["runs"]] == [ids[2]]
    run = tagged["runs"][0]
    assert set(run) == {
        "run_id",
        "job",
        "location",
        "status",
        "status_reason",
        "tags",
        "config",
        "agent",
        "create_time",
        "start_time",
        "end_time",
        "lease",
        "failure_kind",
        "parent_run_id",
        "root_run_id",
        "not_before",
        "reuse_outputs",
        "code_version",
    }
    assert run["create_time"].endswith("Z") and run["start_time"] is None


async def test_agents_and_jobs_show_location_errors(client: TestClient) -> None:
    await register(client)
    agents = (await (await client.get("/api/v1/agents")).json())["agents"]
    (agent,) = agents
    assert agent["status"] == "ONLINE" and agent["queues"] == ["default"]
    assert agent["max_concurrent_runs"] == 2 and agent["running"] == 0
    assert {c["name"]: c["error"] for c in agent["code_locations"]} == {
        "loc": None,
        "broken": "ImportError: no module named x",
    }
    jobs = await (await client.get("/api/v1/jobs")).json()
    assert [(j["name"], j["location"], j["agents"]) for j in jobs["jobs"]] == [
        ("etl", "loc", ["w1"])
    ]
    assert jobs["location_errors"][0]["location"] == "broken"


async def test_events_long_poll_returns_when_an_event_arrives(client: TestClient) -> None:
    import asyncio

    agent_id = await register(client)
    _, body = await submit(client, job="etl")
    run_id = body["run_id"]
    launch = (await agent_call(client, "poll", Poll(agent_id=agent_id), PollReply)).launches[0]
    waiter = asyncio.create_task(client.get(f"/api/v1/runs/{run_id}/events?after=2&wait=20"))
    await asyncio.sleep(0)
    batch = EventBatch(
        agent_id=agent_id,
        run_id=run_id,
        lease=launch.lease,
        records=[RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")],
    )
    await agent_call(client, "events", batch, EventAck)
    resp = await asyncio.wait_for(waiter, 10)
    assert [e["type"] for e in (await resp.json())["events"]] == ["RUN_START"]


async def test_schedule_names_are_per_location(client: TestClient) -> None:
    from protocol.messages import ScheduleInfo

    for agent, location in (("w1", "a"), ("w2", "b")):
        daily = ScheduleInfo(name="daily", job="etl", cron="0 6 * * *", timezone="UTC")
        await register(
            client,
            agent,
            [CodeLocationInfo(name=location, jobs=[JobInfo(name="etl")], schedules=[daily])],
        )
    resp = await client.get("/api/v1/schedules/daily")
    error = (await resp.json())["error"]
    assert resp.status == 409 and error["code"] == "ambiguous_name" and "(a, b)" in error["message"]
    resp = await client.post("/api/v1/schedules/daily/start?location=a")
    assert resp.status == 200 and (await resp.json())["status"] == "RUNNING"
    listed = (await (await client.get("/api/v1/schedules")).json())["schedules"]
    assert {(s["location"], s["status"]) for s in listed} == {("a", "RUNNING"), ("b", "STOPPED")}
    running = next(s for s in listed if s["location"] == "a")
    assert len(running["next_ticks"]) == 3 and running["next_ticks"][0].endswith("06:00:00Z")
    resp = await client.get("/api/v1/sensors/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_sensor"
