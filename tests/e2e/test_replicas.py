"""Several control-plane replicas on one PostgreSQL database, with real processes.

Two `fleetrun serve` replicas share a schema on the machine's PostgreSQL server; agents
reach them directly or through a round-robin TCP load balancer (tests/loadbalancer.py).
The tests check what replication promises: any replica serves any request, a launch
decided on one replica reaches an agent polling the other, limits hold across
replicas, each daemon loop runs on exactly one replica, and kill -9 of the leader loses
no acknowledged run, launches nothing twice, ticks no schedule twice and moves the
loops to the survivor.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    TERMINAL,
    ControlPlaneProc,
    Proc,
    http,
    start_agent,
    start_control_plane,
    wait_for,
)
from tests.loadbalancer import LoadBalancer

LOOPS = {"run-queue", "retries", "scheduler", "sensors", "monitor"}
LOCATIONS = {"replica": FIXTURES / "replica_jobs.py", "daemon": FIXTURES / "daemon_jobs.py"}
# Polls held far longer than any wait below: a launch or event that reached only the
# replica that made it would not be seen in time.
SERVER = "poll_timeout_seconds = 200"
CONFIG = """
[run_coordinator]
max_concurrent_runs = -1
[[run_coordinator.tag_concurrency_limits]]
key = "database"
value = "redshift"
limit = 2

[run_monitoring]
agent_heartbeat_timeout_seconds = 10

[daemon]
leader_lease_seconds = 2
"""


def port_of(cp: ControlPlaneProc) -> int:
    return int(cp.url.rsplit(":", 1)[1])


def readyz(cp: ControlPlaneProc) -> dict:
    status, body = http("GET", cp.url + "/readyz")
    assert status == 200, body
    return body


def executions(marker: Path) -> tuple[Counter, dict[str, list[tuple[float, float]]]]:
    """Executions per run, and each run's (start, end) intervals, from the marker file."""
    starts: dict[tuple[str, str], float] = {}
    intervals: dict[str, list[tuple[float, float]]] = {}
    count: Counter = Counter()
    for line in marker.read_text().splitlines() if marker.exists() else []:
        kind, run_id, lease, at = line.split()
        if kind == "start":
            count[run_id] += 1
            starts[(run_id, lease)] = float(at)
        else:
            intervals.setdefault(run_id, []).append((starts[(run_id, lease)], float(at)))
    return count, intervals


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture
def replicas(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ControlPlaneProc, ControlPlaneProc, LoadBalancer]]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    started = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        started.append(
            start_control_plane(folder, CONFIG, storage_url=postgres_url, server_extra=SERVER)
        )
        if name == "a":  # the first replica takes every loop's lease
            wait_for(
                lambda: set(readyz(started[0])["leading"]) == LOOPS, 30, what="replica a to lead"
            )
    a, b = started
    balancer = LoadBalancer([("127.0.0.1", port_of(a)), ("127.0.0.1", port_of(b))]).start()
    yield a, b, balancer
    balancer.stop()
    for cp in started:
        cp.stop()


def start_agents(cp: ControlPlaneProc, folder: Path, urls: list[str]) -> list[Proc]:
    return [
        start_agent(cp, folder, f"agent-{i}", LOCATIONS, "max_concurrent_runs = 4", url=url)
        for i, url in enumerate(urls)
    ]


def test_replicas_share_the_queue_and_hold_limits_across_them(
    replicas: tuple[ControlPlaneProc, ControlPlaneProc, LoadBalancer], tmp_path: Path
) -> None:
    a, b, _ = replicas
    marker = tmp_path / "marker"
    # Given one agent polling each replica directly, and each loop led by one replica
    agents = start_agents(a, tmp_path, [a.url, b.url])
    try:
        leading = [set(readyz(cp)["leading"]) for cp in (a, b)]
        assert leading[0] | leading[1] == LOOPS and not leading[0] & leading[1], leading
        # When runs are submitted to both replicas, some limited to 2 at once by a tag
        limited, free = [], []
        for i in range(12):
            cp = (a, b)[i % 2]
            config = {"file": str(marker), "seconds": 0.3}
            limited.append(
                cp.submit("held", location="replica", config=config, tags={"database": "redshift"})
            )
            free.append(cp.submit("held", location="replica", config={"file": str(marker)}))
        # Then every run succeeds, as either replica reports
        runs = {r: (a, b)[i % 2].wait_run(r, 120) for i, r in enumerate(limited + free)}
        assert {r["status"] for r in runs.values()} == {"SUCCESS"}
        assert b.get(f"/api/v1/runs/{limited[0]}")["status"] == "SUCCESS"
        # And both agents ran runs: launches decided on the leader reached the agent
        # polling the other replica
        assert len({r["agent"] for r in runs.values()}) == 2
        # And each run ran once, never more than 2 of the limited ones at a time
        count, intervals = executions(marker)
        assert set(count) == set(runs) and set(count.values()) == {1}
        assert most_at_once([i for r in limited for i in intervals[r]]) <= 2
        # And a user watching a run's events on the other replica is woken by the change
        run_id = a.submit("held", location="replica", config={"file": str(marker)})
        status, body = http("GET", f"{b.url}/api/v1/runs/{run_id}/events?after=1&wait=20")
        assert status == 200 and body["events"], body
    finally:
        for agent in agents:
            agent.stop()


def test_a_run_submitted_to_a_replica_that_does_not_lead_the_queue_starts_at_once(
    replicas: tuple[ControlPlaneProc, ControlPlaneProc, LoadBalancer], tmp_path: Path
) -> None:
    """The submission wakes the run queue on the leader through the bus (PostgreSQL
    NOTIFY), and the assignment wakes the agent's poll held by the other replica: no hop
    waits for the daemon's 5 s backstop. Were a wake-up lost, each run would wait for
    the leader's next backstop pass, 0 to 5 s: eight runs would not all start within
    half of it (odds 1 in 256)."""
    a, b, _ = replicas
    marker = tmp_path / "marker"
    # Given replica a leading every loop, and one agent polling replica b only
    (agent,) = start_agents(a, tmp_path, [b.url])
    try:
        assert set(readyz(a)["leading"]) == LOOPS and not readyz(b)["leading"]
        wait_for(lambda: b.get("/api/v1/agents")["agents"], 30, what="the agent on b")
        waits = []
        for _ in range(8):
            # When a run is submitted to b, the replica that does not lead the queue
            submitted = time.time()
            run_id = b.submit("held", location="replica", config={"file": str(marker)})
            assert b.wait_run(run_id, 60)["status"] == "SUCCESS"
            start = next(e for e in b.events(run_id) if e["type"] == "RUN_START")
            waits.append(start["data"]["launch_received_time"] - submitted)
        # Then each launch reached the agent well before the backstop (5 s) would have
        assert max(waits) < 2.5, waits
    finally:
        agent.stop()


def submit_through(balancer: LoadBalancer, marker: Path) -> str | None:
    """Submit one run through the balancer; None if the answer was lost (not acked)."""
    try:
        status, body = http(
            "POST",
            balancer.url + "/api/v1/runs",
            {"job": "held", "location": "replica", "config": {"file": str(marker)}},
        )
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return body["run_id"] if status == 201 else None


def test_a_pool_slot_freed_on_one_replica_starts_the_step_waiting_on_the_other(
    replicas: tuple[ControlPlaneProc, ControlPlaneProc, LoadBalancer], tmp_path: Path
) -> None:
    """A step's end ingested by replica b wakes the grant pass on a (which leads the run
    queue) through NOTIFY, and the grant wakes the poll that b holds: the waiting step
    starts within a second, far under the 5 s backstop of either hop."""
    a, b, _ = replicas
    gates = tmp_path / "gates"
    gates.mkdir()
    # Given a pool of one slot, set through replica a, and one agent polling b only
    assert http("PUT", f"{a.url}/api/v1/pools/warehouse", {"limit": 1})[0] == 200
    pools = {"pools": FIXTURES / "pool_jobs.py"}
    agent = start_agent(a, tmp_path, "agent-b", pools, "max_concurrent_runs = 4", url=b.url)
    try:
        ids = [b.submit("pooled", config={"gates": str(gates)}) for _ in range(2)]

        def started(run_id: str) -> str | None:
            events = b.get(f"/api/v1/runs/{run_id}/events")["events"]
            return next((e["time"] for e in events if e["type"] == "STEP_START"), None)

        def waiting(run_id: str) -> bool:
            events = b.get(f"/api/v1/runs/{run_id}/events")["events"]
            return any(e["type"] == "STEP_SLOT_WAITING" for e in events)

        wait_for(lambda: any(started(r) for r in ids), what="one load to start")
        holder, waiter = ids if started(ids[0]) else ids[::-1]
        wait_for(lambda: waiting(waiter), what="the other load to wait")
        # When the holder's step ends
        opened = time.time()
        (gates / holder).touch()
        # Then the waiter starts at once, through both replicas
        at = wait_for(lambda: started(waiter), 10, what="the waiting load to start")
        assert datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() - opened < 2.5
        (gates / waiter).touch()
        assert {b.wait_run(r)["status"] for r in ids} == {"SUCCESS"}
        warehouse = next(p for p in a.get("/api/v1/pools")["pools"] if p["name"] == "warehouse")
        assert (warehouse["in_use"], warehouse["waiting"]) == (0, 0)
    finally:
        agent.stop()


def test_kill_9_of_the_leader_mid_burst_loses_nothing_and_the_loops_move(
    replicas: tuple[ControlPlaneProc, ControlPlaneProc, LoadBalancer], tmp_path: Path
) -> None:
    a, b, balancer = replicas
    marker = tmp_path / "marker"
    inbox = Path(os.environ["FLEETRUN_TEST_INBOX"])
    # Given two agents reaching the replicas through the load balancer, replica a leading
    agents = start_agents(a, tmp_path, [balancer.url, balancer.url])
    try:
        assert set(readyz(a)["leading"]) == LOOPS
        (inbox / "file-1").touch()  # the sensor asks for a run with run key file-1
        # When a burst of runs is submitted and the leader is killed with SIGKILL midway
        acked = [r for _ in range(20) if (r := submit_through(balancer, marker))]
        a.popen.send_signal(signal.SIGKILL)
        a.popen.wait(10)
        killed_at = time.time()
        acked += [r for _ in range(20) if (r := submit_through(balancer, marker))]
        (inbox / "file-2").touch()
        # Then the survivor takes over every loop within a few seconds of the lease
        wait_for(lambda: set(readyz(b)["leading"]) == LOOPS, 30, what="b to lead")
        took_over = time.time() - killed_at
        assert took_over < 15, took_over
        # And every acknowledged run ends in SUCCESS, each executed exactly once
        assert len(acked) >= 35, len(acked)
        runs = [b.wait_run(r, 120) for r in acked]
        assert {r["status"] for r in runs} == {"SUCCESS"}, [r["status_reason"] for r in runs]
        count, _ = executions(marker)
        duplicated = {r: n for r, n in count.items() if n > 1}
        assert not duplicated, duplicated

        # And the sensor requested each run key once, whichever replica evaluated it
        def sensor_runs() -> list[dict]:
            return b.get("/api/v1/runs?tag=fleetrun/sensor:inbox&limit=100")["runs"]

        wait_for(lambda: len(sensor_runs()) >= 2, 60, what="both sensor runs")
        keys = Counter(r["tags"]["fleetrun/run_key"] for r in sensor_runs())
        assert keys == {"file-1": 1, "file-2": 1}, keys

        # And the every-minute schedule ticks on the survivor, once per minute
        def ticks() -> list[dict]:
            return b.get("/api/v1/schedules/every_minute/ticks")["ticks"]

        def ticked_after_kill() -> dict | None:
            return next(
                (
                    t
                    for t in ticks()
                    if t["status"] == "SUCCESS"
                    and datetime.fromisoformat(t["scheduled_time"]).timestamp() > killed_at
                ),
                None,
            )

        wait_for(ticked_after_kill, 90, what="a schedule tick after the kill")
        times = Counter(t["scheduled_time"] for t in ticks())
        assert set(times.values()) == {1}, times
        scheduled = b.get("/api/v1/runs?tag=fleetrun/schedule:every_minute&limit=100")["runs"]
        minutes = Counter(r["tags"]["fleetrun/tick"] for r in scheduled)
        assert set(minutes.values()) == {1}, minutes
        assert all(r["status"] in TERMINAL | {"QUEUED", "STARTING", "STARTED"} for r in scheduled)
    finally:
        for agent in agents:
            agent.stop()
