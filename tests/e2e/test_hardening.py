"""What a hostile submission, a hostile agent or a lost control plane may no longer do,
against real processes on loopback (issue 20).

- A run config or tag the agent protocol cannot carry is refused at submission (422
  naming it), for schedules and sensors too; a run stored before those rules fails
  alone, and no agent exits or stops serving because of it.
- An agent writes only its own: the control plane's event types, made-up ones, steps
  its job lacks and anything after its run ended are refused, and the run fails with
  the reason; the event log and the status tell one story.
- A job's own tags reach its runs (under the request's), so tag limits see them.
- `fleetrun/on_lost_contact = stop` fires at half the heartbeat timeout of silence.
- SIGTERM drains in bounded time whether or not the control plane answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_plane.model.runs import NewRun
from control_plane.storage import open_storage
from protocol.codec import decode_any, encode
from protocol.messages import (
    CodeLocationInfo,
    ErrorReply,
    EvaluationAck,
    EvaluationResult,
    EventAck,
    EventBatch,
    JobInfo,
    OpInfo,
    Poll,
    Register,
    RequestedRun,
    RunRecord,
    SensorInfo,
)
from protocol.wire import PAYLOAD_DEPTH
from tests.conftest import (
    FIXTURES,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    wait_for,
)
from tests.e2e.test_fuzz_agent_api import JOB, Client, Fleet, start_fuzz_control_plane
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

HARDENING = {"hardening": FIXTURES / "hardening_jobs.py"}


def nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def raw_post(cp: ControlPlaneProc, path: str, body: bytes) -> tuple[int, dict]:
    """POST bytes as they are (json.dumps cannot write a lone surrogate escape)."""
    target = urllib.parse.urlsplit(cp.url)
    with socket.create_connection((target.hostname, target.port), timeout=30) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


@pytest.fixture
def fleet_of_one(tmp_path: Path) -> Iterator[tuple[ControlPlaneProc, Proc]]:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", HARDENING)
    yield cp, agent
    agent.stop()
    cp.stop()


def test_a_config_the_protocol_cannot_carry_is_refused_and_the_fleet_keeps_serving(
    tmp_path: Path, fleet_of_one: tuple[ControlPlaneProc, Proc]
) -> None:
    cp, agent = fleet_of_one
    refused = {
        "40 levels": json.dumps({"job": "held", "config": nested(40)}).encode(),
        "one level too many": json.dumps(
            {"job": "held", "config": nested(PAYLOAD_DEPTH + 1)}
        ).encode(),
        "2**64": b'{"job": "held", "config": {"n": 18446744073709551616}}',
        "-2**63-1": b'{"job": "held", "config": {"n": -9223372036854775809}}',
        "lone surrogate": b'{"job": "held", "config": {"s": "\\ud800"}}',
        "surrogate key": b'{"job": "held", "config": {"\\udfff": 1}}',
        "1e400": b'{"job": "held", "config": {"f": 1e400}}',
    }
    for what, body in refused.items():
        status, reply = raw_post(cp, "/api/v1/runs", body)
        assert status == 422, (what, status, reply)
        assert reply["error"]["code"] == "bad_config", (what, reply)
        assert reply["error"]["message"].startswith("config"), (what, reply)
    status, reply = raw_post(
        cp, "/api/v1/runs", json.dumps({"job": "held", "config": nested(900)}).encode()
    )
    assert status == 400 and "nested deeper" in reply["error"]["message"], reply
    for tags in (b'{"\\ud800": "x"}', b'{"k": "\\udc00"}'):
        status, reply = raw_post(cp, "/api/v1/runs", b'{"job": "held", "tags": ' + tags + b"}")
        assert (status, reply["error"]["code"]) == (422, "bad_tag"), reply
    # The deepest config that fits is accepted, and runs
    ok = cp.submit("held", config={"dir": str(tmp_path), "deep": nested(PAYLOAD_DEPTH - 1)})
    (tmp_path / "open").touch()
    assert cp.wait_run(ok)["status"] == "SUCCESS"
    assert agent.popen.poll() is None
    assert cp.get("/api/v1/runs?limit=100")["runs"][0]["run_id"] == ok  # nothing else made


def test_a_launch_stored_before_the_rules_fails_alone(
    tmp_path: Path, fleet_of_one: tuple[ControlPlaneProc, Proc]
) -> None:
    """A run whose launch cannot be encoded or decoded (stored by an older fleetrun, or
    by hand) fails with the reason; the agent it was given to stays up and runs the
    rest; with retries on, no retry is made of it."""
    cp, agent = fleet_of_one

    async def store_poisoned() -> list[str]:
        storage = open_storage(f"sqlite:///{tmp_path}/fleetrun.db")
        await storage.open()
        made = []
        try:
            for name, config in (("deep", nested(40)), ("huge", {"n": 2**64})):
                tags = {"fleetrun/job": "held", "fleetrun/max_retries": "2"}
                run = NewRun(f"poisoned-{name}", "held", "hardening", tags, config)
                made.append((await storage.create_run(run, time.time())).run_id)
        finally:
            await storage.close()
        return made

    poisoned = asyncio.run(store_poisoned())
    good = cp.submit("held", config={"dir": str(tmp_path)})  # wakes the run queue too
    for run_id in poisoned:
        run = cp.wait_run(run_id)
        assert (run["status"], run["failure_kind"]) == ("FAILURE", "undeliverable"), run
        assert run["status_reason"].startswith("the launch message cannot be delivered")
    (tmp_path / "open").touch()
    assert cp.wait_run(good)["status"] == "SUCCESS"
    assert agent.popen.poll() is None, agent.log()[-2000:]
    for run_id in poisoned:
        retries = [e for e in cp.events(run_id) if e["type"] == "RUN_RETRY"]
        assert retries and retries[0]["message"].startswith("not retried: config"), retries
    assert "Traceback" not in agent.log()


def agent_events(fleet: Fleet, *records: RunRecord) -> tuple[int, object]:
    batch = EventBatch(fleet.agent_id, fleet.run_id, fleet.lease, list(records))
    status, body = fleet.send("/agent/v1/events", encode(batch))
    return status, decode_any(body)


def record(seq: int, type_: str, step: str | None = None, kind: str = "event") -> RunRecord:
    return RunRecord(seq=seq, time=time.time(), kind=kind, type=type_, step=step)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cp = start_fuzz_control_plane(tmp_path_factory.mktemp("hostile_agent"))
    fleet = Fleet(cp, Client(cp.url))
    try:
        yield fleet
    finally:
        fleet.client.close()
        cp.stop()


@pytest.mark.parametrize(
    "type_",
    [
        "RUN_ENQUEUED",
        "RUN_STARTING",
        "RUN_RETRY",
        "RUN_CANCELED",
        "RUN_CANCELING",
        "RUN_WORKER_RESTARTED",
        "BOGUS_TYPE",
    ],
)
def test_an_agent_cannot_write_the_control_planes_events(fleet: Fleet, type_: str) -> None:
    fleet.new_run()
    status, reply = agent_events(fleet, record(1, "RUN_START"), record(2, type_))
    assert status == 409 and isinstance(reply, ErrorReply), (status, reply)
    assert reply.code == "record_refused" and "record 2" in reply.message
    run = fleet.cp.get(f"/api/v1/runs/{fleet.run_id}")
    assert (run["status"], run["failure_kind"]) == ("FAILURE", "refused_record"), run
    assert own_types(fleet) == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "RUN_FAILURE"]
    status, reply = agent_events(fleet, record(2, "LOG"))
    assert (status, getattr(reply, "code", None)) == (409, "stale_lease")  # the lease ended


@pytest.mark.parametrize("step", ["../../../../tmp/x", "not_a_step", "a/b"])
def test_steps_are_checked_against_the_job(fleet: Fleet, step: str) -> None:
    fleet.new_run()
    status, reply = agent_events(fleet, record(1, "RUN_START"), record(2, "STEP_SUCCESS", step))
    assert (status, getattr(reply, "code", None)) == (409, "record_refused"), reply
    fleet.new_run()
    fleet.call(
        "/agent/v1/events",
        EventBatch(fleet.agent_id, fleet.run_id, fleet.lease, [record(1, "RUN_START")]),
    )
    path = f"/agent/v1/outputs/{fleet.run_id}/{urllib.parse.quote(step, safe='')}"
    status, _ = fleet.send(f"{path}?agent_id={fleet.agent_id}&lease={fleet.lease}", b"x", "PUT")
    assert 400 <= status < 500
    reexecute = fleet.cp.call("POST", f"/api/v1/runs/{fleet.run_id}/reexecute", {})
    assert reexecute[0] in (201, 409)
    if reexecute[0] == 201:  # nothing stored under a step name reaches the next launch
        child = fleet.cp.get(f"/api/v1/runs/{reexecute[1]['run_id']}")
        assert step not in child["reuse_outputs"]


def test_nothing_after_the_end_but_trailing_logs(fleet: Fleet) -> None:
    fleet.new_run()
    status, reply = agent_events(
        fleet,
        record(1, "RUN_START"),
        record(2, "RUN_FAILURE"),
        record(3, "stderr", "a", kind="log"),
    )
    assert status == 200 and isinstance(reply, EventAck) and reply.acked_seq == 3
    for late in (
        record(4, "RUN_SUCCESS"),
        record(4, "RUN_FAILURE"),
        record(4, "STEP_FAILURE", "a"),
    ):
        status, reply = agent_events(fleet, late)
        assert (status, getattr(reply, "code", None)) == (409, "record_refused"), reply
    path = f"/agent/v1/outputs/{fleet.run_id}/a?agent_id={fleet.agent_id}&lease={fleet.lease}"
    status, _ = fleet.send(path, b"pickled after the end", "PUT")
    assert status == 409
    run = fleet.cp.get(f"/api/v1/runs/{fleet.run_id}")
    assert run["status"] == "FAILURE"
    assert own_types(fleet) == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "RUN_FAILURE"]


def own_types(fleet: Fleet) -> list[str]:
    """The run's event types, but for the retry decision the control plane records
    after a failure (its own `RUN_RETRY`, "not retried …", possibly not there yet)."""
    events = fleet.cp.events(fleet.run_id)
    decided = [e for e in events if e["type"] == "RUN_RETRY"]
    assert all(e["message"].startswith("not retried") for e in decided), decided
    assert all(e["type"] == "RUN_RETRY" for e in events[len(events) - len(decided) :]), events
    return [e["type"] for e in events if e["type"] != "RUN_RETRY"]


def test_a_jobs_tags_reach_its_runs_and_their_limits(tmp_path: Path) -> None:
    limit = (
        '[[run_coordinator.tag_concurrency_limits]]\nkey = "warehouse"\n'
        'value = "snowflake"\nlimit = 1\n'
    )
    cp = start_control_plane(tmp_path, limit)
    agent = start_agent(cp, tmp_path, "a1", HARDENING, extra="max_concurrent_runs = 4")
    try:
        config = {"dir": str(tmp_path)}
        runs = [cp.submit("warehouse_job", config=config) for _ in range(3)]
        overridden = cp.submit("warehouse_job", config=config, tags={"team": "request"})
        first = wait_for(
            lambda: [r for r in runs if cp.get(f"/api/v1/runs/{r}")["status"] == "STARTED"],
            what="a run to start",
        )
        queue = cp.get("/api/v1/queue")["runs"]
        assert len(first) == 1 and len(queue) == 3, queue
        assert all("tag limit warehouse=snowflake" in q["waiting_for"] for q in queue), queue
        tags = cp.get(f"/api/v1/runs/{runs[0]}")["tags"]
        assert (tags["warehouse"], tags["team"], tags["fleetrun/job"]) == (
            "snowflake",
            "job",
            "warehouse_job",
        )
        assert cp.get(f"/api/v1/runs/{overridden}")["tags"]["team"] == "request"
        status, body = cp.call("POST", "/api/v1/sensors/warehouse_sensor/start")
        assert status == 200, body
        sensed = wait_for(
            lambda: cp.get("/api/v1/runs?tag=fleetrun/sensor:warehouse_sensor")["runs"],
            what="the sensor's run",
        )
        tags = sensed[0]["tags"]
        assert (tags["warehouse"], tags["team"], tags["fleetrun/run_key"]) == (
            "snowflake",
            "sensor",
            "once",
        )
        (tmp_path / "open").touch()
        for run_id in [*runs, overridden, sensed[0]["run_id"]]:
            assert cp.wait_run(run_id)["status"] == "SUCCESS"
        # never more than one at once: each run started after the one before ended
        spans = []
        for run_id in [*runs, overridden, sensed[0]["run_id"]]:
            run = cp.get(f"/api/v1/runs/{run_id}")
            spans.append((run["start_time"], run["end_time"]))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    finally:
        agent.stop()
        cp.stop()


def test_on_lost_contact_stop_fires_at_half_the_timeout(tmp_path: Path) -> None:
    timeout = 6.0
    cp = start_control_plane(
        tmp_path, f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout}\n"
    )
    target = urllib.parse.urlsplit(cp.url)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 80).start()
    agent = start_agent(cp, tmp_path, "a1", HARDENING, url=proxy.url)
    try:
        run_id = cp.submit(
            "held", config={"dir": str(tmp_path)}, tags={"fleetrun/on_lost_contact": "stop"}
        )

        def started() -> int | None:
            run = cp.get(f"/api/v1/runs/{run_id}")
            return run["lease"] if run["status"] == "STARTED" else None

        lease = wait_for(started, what="the start")
        cut = time.time()
        proxy.blackhole()
        stopped = tmp_path / f"stopped-{lease}"
        wait_for(stopped.exists, timeout * 2, what="the worker to be stopped")
        silent = float(stopped.read_text()) - cut
        # The last contact came at most one heartbeat interval (T/6) before the cut
        assert silent <= timeout / 2 + 0.6, silent
        assert silent >= timeout / 2 - timeout / 6 - 0.1, silent
        print(f"\n[on_lost_contact=stop, T = {timeout:g} s] cut -> worker stopped {silent:.2f} s")
    finally:
        proxy.heal()
        agent.stop()
        proxy.stop()
        cp.stop()


def test_sigterm_drains_in_bounded_time_with_the_control_plane_gone(tmp_path: Path) -> None:
    from agent.lifecycle import DELIVERY_GRACE_SECONDS, STOP_GRACE_SECONDS

    drain = 2.0
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", HARDENING, extra=f"drain_timeout_seconds = {drain}")
    run_id = cp.submit("held", config={"dir": str(tmp_path)})
    wait_for(lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="the start")
    cp.popen.send_signal(signal.SIGKILL)
    cp.popen.wait(10)
    signaled = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    bound = drain + STOP_GRACE_SECONDS + DELIVERY_GRACE_SECONDS + 5
    agent.popen.wait(bound)
    took = time.monotonic() - signaled
    assert agent.popen.returncode == 0, agent.log()[-2000:]
    assert "stay in the spool" in agent.log()
    print(f"\n[SIGTERM, control plane gone, drain {drain:g} s] agent exited in {took:.1f} s")
    # The next start delivers what the spool kept: the run ends as the drain ended it
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", HARDENING)
    try:
        run = cp.wait_run(run_id)
        assert run["status"] == "FAILURE" and "drain timeout" in run["status_reason"], run
    finally:
        agent.stop()
        cp.stop()


def test_sigterm_before_the_control_plane_ever_answered(tmp_path: Path) -> None:
    from tests.conftest import FLEETRUN, free_port, start_process, write_agent_config

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_agent_config(tmp_path, url, "a1", HARDENING)
    agent = start_process([*FLEETRUN, "agent", "--config", str(config)], tmp_path / "a1.log")
    wait_for(lambda: "lost contact" in agent.log(), what="the agent to try registering")
    signaled = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    agent.popen.wait(20)
    assert agent.popen.returncode == 0, agent.log()[-2000:]
    print(f"\n[SIGTERM while never registered] exited in {time.monotonic() - signaled:.1f} s")


def test_an_agent_fails_a_launch_it_cannot_read_and_runs_the_rest(tmp_path: Path) -> None:
    """The far side faked over a real socket (a control plane of another version, say):
    the agent reads each launch on its own, fails the unreadable one with the reason and
    runs the other."""
    from tests.fakecontrolplane import FakeControlPlane

    fake = FakeControlPlane(tmp_path)
    with fake.running():
        good = fake.launch("good-run", 11, "held", {"dir": str(tmp_path)})
        bad = fake.launch("bad-run", 12, "held", {"dir": str(tmp_path), "deep": nested(40)})
        fake.owe(bad, good)
        agent = fake.start_agent("a1", HARDENING)
        try:
            (tmp_path / "open").touch()
            failure = wait_for(
                lambda: fake.record_of("bad-run", "RUN_FAILURE"),
                what="the unreadable launch to be failed",
            )
            assert "could not read this run's launch message" in failure.message
            assert failure.data.get("failure_kind") == "undeliverable"
            wait_for(lambda: fake.record_of("good-run", "RUN_SUCCESS"), what="the other run")
            assert agent.popen.poll() is None, agent.log()[-2000:]
            wait_for(lambda: fake.polls_after_launch() >= 1, what="the agent to poll on")
        finally:
            agent.stop()


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (RequestedRun(JOB, config={"n": 2**64 - 1}), "config.n is outside the signed 64-bit"),
        (RequestedRun("no_such_job"), "has no job 'no_such_job'"),
        (RequestedRun(JOB, tags={"fleetrun/priority": "high"}), "fleetrun/priority must be"),
        (RequestedRun(JOB, tags={"fleetrun/parent_run_id": "x"}), "set by the control plane"),
    ],
)
def test_a_sensors_request_is_held_to_the_rules_of_a_submission(
    fleet: Fleet, request_: RequestedRun, error: str
) -> None:
    """The msgpack path of the same rules: what a sensor asks for (through its agent) is
    checked as a submission is; the tick fails with the reason and makes no run."""
    ticks = "/api/v1/sensors/hostile/ticks?location=sensorloc"
    status, body = fleet.cp.call("GET", ticks)
    seen = max((t["tick_id"] for t in body["ticks"]), default=0) if status == 200 else 0
    sensor = SensorInfo(
        name="hostile", job=JOB, minimum_interval_seconds=0.1, default_status="RUNNING"
    )
    job = JobInfo(name=JOB, ops=[OpInfo(name="a")])
    fleet.call(
        "/agent/v1/register",
        Register(
            name="sensor_agent",
            hostname="h",
            version="0.1.0",
            queues=["none"],
            max_concurrent_runs=1,
            code_locations=[CodeLocationInfo("sensorloc", [job], sensors=[sensor])],
        ),
    )
    status, _ = fleet.cp.call("POST", "/api/v1/sensors/hostile/start?location=sensorloc")
    assert status == 200
    agent_id = next(
        a["agent_id"]
        for a in fleet.cp.get("/api/v1/agents")["agents"]
        if a["name"] == "sensor_agent"
    )

    def evaluation() -> Any:
        reply = fleet.call("/agent/v1/poll", Poll(agent_id=agent_id))
        return reply.evaluations[0] if reply.evaluations else None

    request = wait_for(evaluation, what="the sensor's evaluation")
    before = len(fleet.cp.get("/api/v1/runs?limit=1000")["runs"])
    result = EvaluationResult(request.eval_id, agent_id, runs=[request_], cursor="moved")
    assert isinstance(fleet.call("/agent/v1/evaluation", result), EvaluationAck)

    def failed_tick() -> dict | None:
        new = [t for t in fleet.cp.get(ticks)["ticks"] if t["tick_id"] > seen]
        return next((t for t in new if error in (t["error"] or "")), None)

    tick = wait_for(failed_tick, what="the tick to fail")
    assert tick["status"] == "FAILURE" and tick["run_ids"] == [], tick
    assert len(fleet.cp.get("/api/v1/runs?limit=1000")["runs"]) == before
    status, _ = fleet.cp.call("POST", "/api/v1/sensors/hostile/stop?location=sensorloc")
    assert status == 200
