"""Partitions between one agent and the control plane (reference F4, F5), real processes.

The agent reaches the control plane only through `tests/faultproxy.py`, which either
holds every byte (`blackhole`: a half-open partition, each side learns only from its
own timeouts) or cuts with RST and refuses new connections (`reset`).

- Shorter than the heartbeat timeout, a partition costs nothing: no verdict, the run
  that ended meanwhile is SUCCESS once its spooled records arrive after heal.
- Longer, the run is failed as lost and retried on an agent that is still connected;
  on heal, whatever the cut-off agent sends for the old attempt is refused (fenced,
  counted) and dropped from its spool, and the old run stays FAILURE.

`FLEETRUN_LONG_FAULTS=1` adds 60 s partitions to the default 10 s ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    TERMINAL,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    wait_for,
)
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

GATES = {"gates": FIXTURES / "gate_jobs.py"}
CHAOS = {"chaos": FIXTURES / "chaos_jobs.py"}
LONG = os.environ.get("FLEETRUN_LONG_FAULTS") == "1"

# (partition seconds, heartbeat timeout): the partition stays well inside the timeout
SHORT_CUTS = [pytest.param(10.0, 15.0, id="10s")]
SHORT_CUTS += [pytest.param(60.0, 90.0, id="60s")] if LONG else []
LONG_CUTS = [pytest.param(10.0, id="10s")] + ([pytest.param(60.0, id="60s")] if LONG else [])
LOST_TIMEOUT = 4.0  # heartbeat timeout when the partition must outlast it
# After heal, records wait at most one retry delay of the agent, whose backoff is capped
# at 10 s (agent/client.py Backoff): the bound of heal -> stored, with a margin.
RECOVERY_BOUND = 15.0


def monitoring(timeout: float) -> str:
    return f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout}\n"


@pytest.fixture
def make_proxy() -> Iterator[Callable[[ControlPlaneProc], FaultProxy]]:
    """A fault proxy in front of a control plane; every one is stopped at teardown."""
    proxies: list[FaultProxy] = []

    def make(cp: ControlPlaneProc) -> FaultProxy:
        target = urllib.parse.urlsplit(cp.url)
        assert target.hostname and target.port, cp.url
        proxies.append(FaultProxy(target.hostname, target.port).start())
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.stop()


def get_run(cp: ControlPlaneProc, run_id: str) -> dict:
    return cp.get(f"/api/v1/runs/{run_id}")


def wait_status(cp: ControlPlaneProc, run_id: str, *wanted: str, timeout: float = 60) -> dict:
    def reached() -> dict | None:
        run = get_run(cp, run_id)
        return run if run["status"] in wanted else None

    return wait_for(reached, timeout, what=f"run {run_id} to be {'/'.join(wanted)}")


def agent_named(cp: ControlPlaneProc, name: str) -> dict:
    (agent,) = [a for a in cp.get("/api/v1/agents")["agents"] if a["name"] == name]
    return agent


def retries_of(cp: ControlPlaneProc, root: str) -> list[dict]:
    return cp.get(f"/api/v1/runs?tag=fleetrun/root_run_id:{root}&limit=100")["runs"]


def time_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def spooled(state_dir: Path, lease: int | None = None) -> list[bytes]:
    """Record bodies an agent's spool still holds (all attempts, or one lease's)."""
    path = state_dir / "spool.db"
    if not path.exists():
        return []
    where, args = (" WHERE lease = ?", (lease,)) if lease is not None else ("", ())
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        rows = db.execute(f"SELECT body FROM records{where} ORDER BY lease, seq", args)
        return [body for (body,) in rows]


def spooled_end(state_dir: Path, lease: int | None = None) -> bool:
    return any(b"RUN_SUCCESS" in body for body in spooled(state_dir, lease))


def fenced_writes(cp: ControlPlaneProc) -> float:
    with urllib.request.urlopen(f"{cp.url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    match = re.search(r"^fleetrun_fenced_writes_total (\S+)$", text, re.MULTILINE)
    assert match, "fleetrun_fenced_writes_total is not exported"
    return float(match.group(1))


def executions(folder: Path) -> list[int]:
    """The leases under which `side_effect` ran, one per execution."""
    path = folder / "executions"
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def assert_clean_success(cp: ControlPlaneProc, run_id: str) -> dict:
    """SUCCESS with a contiguous event log holding exactly one RUN_SUCCESS, no failure."""
    run = get_run(cp, run_id)
    assert run["status"] == "SUCCESS", run
    events = cp.events(run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types.count("RUN_SUCCESS") == 1 and "RUN_FAILURE" not in types, types
    return run


@pytest.mark.parametrize("flavour", ["blackhole", "reset"])
@pytest.mark.parametrize(("seconds", "timeout"), SHORT_CUTS)
def test_a_partition_shorter_than_the_timeout_costs_nothing(
    tmp_path: Path,
    make_proxy: Callable[[ControlPlaneProc], FaultProxy],
    flavour: str,
    seconds: float,
    timeout: float,
) -> None:
    cp = start_control_plane(tmp_path, monitoring(timeout))
    proxy = make_proxy(cp)
    agent = start_agent(cp, tmp_path, "a1", GATES, url=proxy.url)
    state = tmp_path / "fleetrun-state" / "a1"
    gate = tmp_path / "gate"
    try:
        # Given a run in flight on an agent that reaches the control plane via the proxy
        run_id = cp.submit("gated", config={"gate": str(gate)})
        wait_status(cp, run_id, "STARTED")
        # When the link is cut for less than the heartbeat timeout, and the run ends then
        cut = time.monotonic()
        getattr(proxy, flavour)()
        gate.write_text("open")
        wait_for(lambda: spooled(state), what="the run's last records in the spool")
        time.sleep(max(0.0, seconds - (time.monotonic() - cut)))  # the partition itself
        assert get_run(cp, run_id)["status"] == "STARTED"  # nothing got through
        assert agent_named(cp, "a1")["status"] == "ONLINE"
        end_on_disk = spooled_end(state)  # see test_records_reach_the_spool_...
        healed_at = time.time()
        proxy.heal()
        healed = time.monotonic()
        partition = healed - cut
        # Then the run ends SUCCESS from the spooled records, once, with no verdict
        run = wait_for(
            lambda: (r := get_run(cp, run_id))["status"] in TERMINAL and r,
            timeout=60,
            what="the run to finish after heal",
        )
        observed = time.monotonic() - healed
        assert_clean_success(cp, run_id)
        stored = time_of(run["end_time"]) - healed_at
        wait_for(lambda: spooled(state) == [], what="the spool to empty once acknowledged")
        assert agent_named(cp, "a1")["status"] == "ONLINE"
        assert len(cp.get("/api/v1/runs?limit=100")["runs"]) == 1  # no retry either
        assert "lost contact with the control plane" in agent.log()  # it did notice
        wait_for(
            lambda: "contact with the control plane restored" in agent.log(),
            what="the agent to log the reconnection",
        )
        assert seconds <= partition < timeout
        assert stored <= RECOVERY_BOUND, stored
        print(
            f"\n[{flavour} {partition:.1f} s, T = {timeout:g} s] heal -> run SUCCESS stored "
            f"{stored:.2f} s (seen by polling {observed:.2f} s); RUN_SUCCESS in the "
            f"spool at heal: {end_on_disk}; proxy accepted {proxy.accepted} "
            "connections"
        )
    finally:
        proxy.heal()  # a draining agent must not wait on a partition
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("seconds", LONG_CUTS)
def test_a_partition_longer_than_the_timeout_fences_the_old_attempt(
    tmp_path: Path, make_proxy: Callable[[ControlPlaneProc], FaultProxy], seconds: float
) -> None:
    cp = start_control_plane(tmp_path, monitoring(LOST_TIMEOUT))
    proxy = make_proxy(cp)
    a1 = start_agent(cp, tmp_path, "a1", CHAOS, url=proxy.url)
    a2: Proc | None = None
    state = tmp_path / "fleetrun-state" / "a1"
    try:
        # Given a non-idempotent run holding on a1 (one retry allowed; one that keeps
        # going whatever happens, else its worker stops itself at its lease deadline),
        # and a2 connected directly, not through the proxy
        tags = {"fleetrun/max_retries": "1", "fleetrun/on_lost_contact": "continue"}
        run_id = cp.submit("side_effect", tags=tags, config={"dir": str(tmp_path)})
        old_lease = wait_status(cp, run_id, "STARTED")["lease"]
        wait_for(lambda: executions(tmp_path) == [old_lease], what="the first execution")
        a2 = start_agent(cp, tmp_path, "a2", CHAOS)
        # When a1's link is black-holed for longer than the heartbeat timeout
        cut_at, cut = time.time(), time.monotonic()
        proxy.blackhole()
        failed = wait_status(cp, run_id, "FAILURE", timeout=LOST_TIMEOUT + 30)
        # Then the run is failed as lost within the timeout of a1's last heartbeat
        verdict_at = time_of(failed["end_time"])
        lag = verdict_at - time_of(agent_named(cp, "a1")["last_heartbeat"])
        assert failed["failure_kind"] == "agent_lost", failed
        assert failed["status_reason"].startswith("agent lost: no heartbeat from agent a1 for")
        assert LOST_TIMEOUT - 0.1 <= lag <= LOST_TIMEOUT + 2, lag
        verdict_seq = max(e["seq"] for e in cp.events(run_id) if e["type"] == "RUN_FAILURE")
        logs_at_verdict = len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"])
        # And the old attempt, cut off but alive, finishes: its records wait on a1
        (tmp_path / f"open-{old_lease}").touch()
        wait_for(lambda: (tmp_path / f"done-{old_lease}").exists(), what="the old op's end")
        # And the retry runs on a2 and succeeds
        (retry,) = wait_for(lambda: retries_of(cp, run_id), what="the retry")
        retry = wait_status(cp, retry["run_id"], "STARTED")
        assert retry["agent"] == agent_named(cp, "a2")["agent_id"]
        (tmp_path / f"open-{retry['lease']}").touch()
        assert_clean_success(cp, cp.wait_run(retry["run_id"])["run_id"])
        time.sleep(max(0.0, seconds - (time.monotonic() - cut)))  # the partition itself
        fenced_before = fenced_writes(cp)
        assert spooled(state, old_lease)
        proxy.heal()
        healed = time.monotonic()
        partition = healed - cut
        # Then a1's late writes for the old attempt are refused, counted and dropped
        wait_for(lambda: spooled(state, old_lease) == [], what="the fenced records dropped")
        dropped_after = time.monotonic() - healed
        wait_for(lambda: "refused this attempt" in a1.log(), what="a1 to log the refusal")
        assert fenced_writes(cp) > fenced_before
        # And the old run stays FAILURE, with nothing from the old attempt after the verdict
        old = get_run(cp, run_id)
        assert (old["status"], old["failure_kind"]) == ("FAILURE", "agent_lost")
        late = [e["type"] for e in cp.events(run_id) if e["seq"] > verdict_seq]
        assert set(late) <= {"RUN_RETRY"}, late
        assert len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"]) == logs_at_verdict
        # And the side effect happened once per attempt: the old one and the retry
        assert executions(tmp_path) == [old_lease, retry["lease"]]
        # And a1 itself carries on, back ONLINE
        wait_for(lambda: agent_named(cp, "a1")["status"] == "ONLINE", what="a1 back online")
        assert a1.popen.poll() is None
        print(
            f"\n[blackhole {partition:.1f} s, T = {LOST_TIMEOUT:g} s] cut -> verdict "
            f"{verdict_at - cut_at:.2f} s, last heartbeat -> verdict {lag:.2f} s; heal -> "
            f"fenced records dropped {dropped_after:.2f} s; fenced writes "
            f"{fenced_writes(cp):g}"
        )
    finally:
        proxy.heal()
        for proc in (a1, a2, cp):
            if proc is not None:
                proc.stop()


def test_records_reach_the_spool_while_a_send_hangs(
    tmp_path: Path, make_proxy: Callable[[ControlPlaneProc], FaultProxy]
) -> None:
    """A run that ends behind a black hole, on an agent then killed, is still SUCCESS."""
    cp = start_control_plane(tmp_path, monitoring(60))
    proxy = make_proxy(cp)
    agent = start_agent(cp, tmp_path, "a1", CHAOS, url=proxy.url)
    state = tmp_path / "fleetrun-state" / "a1"
    try:
        # Given a printing run, and a send of its records hanging in a black hole
        run_id = cp.submit("side_effect", config={"dir": str(tmp_path)})
        lease = wait_status(cp, run_id, "STARTED")["lease"]
        proxy.blackhole()
        wait_for(lambda: spooled(state, lease), what="a batch to be spooled and sent")
        # When the run ends meanwhile
        (tmp_path / f"open-{lease}").touch()
        wait_for(lambda: (tmp_path / f"done-{lease}").exists(), what="the op to return")
        # Then its end reaches the agent's disk at once, not when the send gives up
        wait_for(lambda: spooled_end(state, lease), timeout=5, what="RUN_SUCCESS spooled")
        # So that an agent killed now, once back, still reports the run as it ended
        agent.popen.kill()
        agent.popen.wait(10)
        proxy.heal()
        agent = start_agent(cp, tmp_path, "a1", CHAOS, url=proxy.url)
        wait_status(cp, run_id, "SUCCESS", "FAILURE", timeout=60)
        assert_clean_success(cp, run_id)
    finally:
        proxy.heal()  # a draining agent must not wait on a partition
        agent.stop()
        cp.stop()


def test_a_slow_link_costs_no_verdict_and_no_record(
    tmp_path: Path, make_proxy: Callable[[ControlPlaneProc], FaultProxy]
) -> None:
    """200 ms each way on every chunk (what `tc netem` would add, were it in this
    kernel): with a 3 s timeout, heartbeats still land in time and runs finish."""
    cp = start_control_plane(tmp_path, monitoring(3.0))
    proxy = make_proxy(cp)
    proxy.latency(0.2)
    agent = start_agent(cp, tmp_path, "a1", GATES, url=proxy.url)
    try:
        gate = tmp_path / "gate"
        run_ids = [cp.submit("gated", config={"gate": str(gate)}) for _ in range(3)]
        for run_id in run_ids:
            wait_status(cp, run_id, "STARTED")
        gate.write_text("open")
        for run_id in run_ids:
            run = cp.wait_run(run_id)
            assert run["status"] == "SUCCESS", run
            events = cp.events(run_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert agent_named(cp, "a1")["status"] == "ONLINE"
        assert "agent lost" not in cp.log()
    finally:
        agent.stop()
        cp.stop()
