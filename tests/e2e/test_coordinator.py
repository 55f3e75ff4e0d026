"""The run coordinator with real agents: limits, priority, routing, capacity, restarts.

Each test reads Given / When / Then. `gated` runs hold their slot until the test creates
their gate file, so which runs are active at a moment is under the test's control.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    free_port,
    http,
    start_agent,
    start_control_plane,
    wait_for,
)

GATES = {"gates": FIXTURES / "gate_jobs.py"}


class Gates:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def config(self, name: str) -> dict:
        return {"gate": str(self.folder / f"gate-{name}")}

    def open(self, name: str) -> None:
        (self.folder / f"gate-{name}").touch()


def status(cp: ControlPlaneProc, run_id: str) -> str:
    return cp.get(f"/api/v1/runs/{run_id}")["status"]


def wait_status(cp: ControlPlaneProc, run_id: str, wanted: str) -> None:
    wait_for(lambda: status(cp, run_id) == wanted, what=f"run {run_id} to be {wanted}")


def queue_reasons(cp: ControlPlaneProc) -> dict[str, str]:
    return {r["run_id"]: r["waiting_for"] for r in cp.get("/api/v1/queue")["runs"]}


def test_mixed_limits(tmp_path: Path) -> None:
    # Given at most 1 run on redshift and 1 run per team
    cp = start_control_plane(
        tmp_path,
        """
[[run_coordinator.tag_concurrency_limits]]
key = "database"
value = "redshift"
limit = 1
[[run_coordinator.tag_concurrency_limits]]
key = "team"
per_unique_value = true
limit = 1
""",
    )
    agent = start_agent(cp, tmp_path, locations=GATES)
    gates = Gates(tmp_path)
    try:
        # When four gated runs are submitted
        tags = {"A": ("redshift", "a"), "B": ("redshift", "b"), "C": ("pg", "a"), "D": ("pg", "b")}
        ids = {
            name: cp.submit("gated", tags={"database": db, "team": team}, config=gates.config(name))
            for name, (db, team) in tags.items()
        }
        # Then A and D run, B and C wait, each for the limit that blocks it
        wait_status(cp, ids["A"], "STARTED")
        wait_status(cp, ids["D"], "STARTED")
        reasons = queue_reasons(cp)
        assert reasons[ids["B"]].startswith("tag limit database=redshift: 1 of 1 in use by")
        assert ids["A"] in reasons[ids["B"]]
        assert reasons[ids["C"]] == f"tag limit team=a: 1 of 1 in use by {ids['A']}"
        limits = {u["limit"]: u for u in cp.get("/api/v1/queue")["limits"]}
        assert limits["tag database=redshift"]["in_use"] == 1
        # When A finishes, C (team a) may go; B is still held by D (team b)
        gates.open("A")
        wait_status(cp, ids["C"], "STARTED")
        assert status(cp, ids["B"]) == "QUEUED"
        assert queue_reasons(cp)[ids["B"]].startswith("tag limit team=b")
        # When D finishes, B goes
        gates.open("D")
        wait_status(cp, ids["B"], "STARTED")
        gates.open("B")
        gates.open("C")
        assert all(cp.wait_run(r)["status"] == "SUCCESS" for r in ids.values())
    finally:
        agent.stop()
        cp.stop()


def test_priority_under_a_full_queue(tmp_path: Path) -> None:
    # Given one slot, held by a gated run
    cp = start_control_plane(tmp_path, "[run_coordinator]\nmax_concurrent_runs = 1\n")
    agent = start_agent(cp, tmp_path, locations=GATES)
    gates = Gates(tmp_path)
    try:
        blocker = cp.submit("gated", config=gates.config("blocker"))
        wait_status(cp, blocker, "STARTED")
        # When runs of different priorities queue up, and one is raised afterwards
        low = cp.submit("quick", tags={"fleetrun/priority": "-1"})
        mid = cp.submit("quick")
        high1 = cp.submit("quick", tags={"fleetrun/priority": "5"})
        high2 = cp.submit("quick", tags={"fleetrun/priority": "5"})
        status_code, _ = http("POST", f"{cp.url}/api/v1/runs/{mid}/priority", {"priority": 10})
        assert status_code == 200
        order = [r["run_id"] for r in cp.get("/api/v1/queue")["runs"]]
        assert order == [mid, high1, high2, low]
        # Then they leave the queue in that order once the slot frees
        gates.open("blocker")
        finished = [cp.wait_run(r) for r in (mid, high1, high2, low)]
        starts = [r["start_time"] for r in finished]
        assert starts == sorted(starts)
        status_code, body = http("POST", f"{cp.url}/api/v1/runs/{low}/priority", {"priority": 1})
        assert (status_code, body["error"]["code"]) == (409, "not_queued")
    finally:
        agent.stop()
        cp.stop()


def test_per_job_limit(tmp_path: Path) -> None:
    # Given one run at a time per job
    cp = start_control_plane(
        tmp_path,
        """
[[run_coordinator.tag_concurrency_limits]]
key = "fleetrun/job"
per_unique_value = true
limit = 1
""",
    )
    agent = start_agent(cp, tmp_path, locations=GATES)
    gates = Gates(tmp_path)
    try:
        # When two runs of `gated` and one of `quick` are submitted
        first = cp.submit("gated", config=gates.config("1"))
        second = cp.submit("gated", config=gates.config("2"))
        other = cp.submit("quick")
        # Then the second gated run waits while the other job goes ahead
        assert cp.wait_run(other)["status"] == "SUCCESS"
        assert status(cp, second) == "QUEUED"
        assert (
            queue_reasons(cp)[second] == f"tag limit fleetrun/job=gated: 1 of 1 in use by {first}"
        )
        gates.open("1")
        wait_status(cp, second, "STARTED")
        gates.open("2")
        assert cp.wait_run(second)["status"] == "SUCCESS"
    finally:
        agent.stop()
        cp.stop()


def test_queue_no_agent_serves_then_one_joins(tmp_path: Path) -> None:
    # Given an agent on the default queue only
    cp = start_control_plane(tmp_path)
    default_agent = start_agent(cp, tmp_path, "cpu-1", locations=GATES)
    gpu_agent = None
    try:
        # When a run asks for the gpu queue
        run_id = cp.submit("quick", tags={"fleetrun/queue": "gpu"})
        # Then it waits, saying why
        wait_for(lambda: queue_reasons(cp).get(run_id) == "no online agent serves queue gpu")
        assert status(cp, run_id) == "QUEUED"
        # When an agent serving gpu joins, the run goes there
        gpu_agent = start_agent(cp, tmp_path, "gpu-1", locations=GATES, extra='queues = ["gpu"]')
        run = cp.wait_run(run_id)
        gpu_id = next(
            a["agent_id"] for a in cp.get("/api/v1/agents")["agents"] if a["name"] == "gpu-1"
        )
        assert (run["status"], run["agent"]) == ("SUCCESS", gpu_id)
    finally:
        default_agent.stop()
        if gpu_agent is not None:
            gpu_agent.stop()
        cp.stop()


def test_agent_at_capacity_and_cancel_of_a_queued_run(tmp_path: Path) -> None:
    # Given an agent with one slot, busy
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, locations=GATES, extra="max_concurrent_runs = 1")
    gates = Gates(tmp_path)
    try:
        busy = cp.submit("gated", config=gates.config("busy"))
        wait_status(cp, busy, "STARTED")
        waiting = cp.submit("quick")
        assert "no agent hosting location gates has a free slot (agent-1 1/1)" == (
            wait_for(lambda: queue_reasons(cp).get(waiting))
        )
        # When the waiting run is canceled
        result = subprocess.run(
            [*FLEETRUN, "--url", cp.url, "runs", "cancel", waiting],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # Then it ends CANCELED and never launches; canceling it again is refused
        assert status(cp, waiting) == "CANCELED"
        code, body = http("POST", f"{cp.url}/api/v1/runs/{waiting}/cancel", {})
        assert (code, body["error"]["code"]) == (409, "already_finished")
        gates.open("busy")
        assert cp.wait_run(busy)["status"] == "SUCCESS"
        types = [e["type"] for e in cp.events(waiting)]
        assert types == ["RUN_ENQUEUED", "RUN_CANCELED"]
        queue = subprocess.run(
            [*FLEETRUN, "--url", cp.url, "queue"], capture_output=True, text=True, timeout=60
        )
        assert queue.returncode == 0 and "WAITING FOR" in queue.stdout
    finally:
        agent.stop()
        cp.stop()


def test_burst_never_exceeds_max_concurrent_runs(tmp_path: Path) -> None:
    # Given max_concurrent_runs = 5 and two agents with 8 slots in all
    cp = start_control_plane(tmp_path, "[run_coordinator]\nmax_concurrent_runs = 5\n")
    agents = [start_agent(cp, tmp_path, f"w{i}", GATES) for i in (1, 2)]
    try:
        # When 200 runs are submitted at once (from 4 threads)
        ids: list[str] = []
        lock = threading.Lock()

        def submit_many(n: int) -> None:
            for _ in range(n):
                run_id = cp.submit("quick")
                with lock:
                    ids.append(run_id)

        threads = [threading.Thread(target=submit_many, args=(50,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(ids) == 200
        runs = [cp.wait_run(r, timeout=300) for r in ids]
        assert {r["status"] for r in runs} == {"SUCCESS"}
        # Then over the whole history no more than 5 were ever active at once: a run is
        # active from its RUN_STARTING event to its end (both stamped by the control plane)
        changes = []
        for run in runs:
            starting = next(e for e in cp.events(run["run_id"]) if e["type"] == "RUN_STARTING")
            changes.append((starting["time"], 1))
            changes.append((run["end_time"], -1))
        level = peak = 0
        for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):
            level += delta
            peak = max(peak, level)
        assert peak == 5
    finally:
        for agent in agents:
            agent.stop()
        cp.stop()


def test_queued_runs_survive_a_control_plane_restart(tmp_path: Path) -> None:
    # Given queued runs and no agent
    port = free_port()
    cp = start_control_plane(tmp_path, port=port)
    first = start_agent(cp, tmp_path, "w1", GATES)
    first.stop()
    ids = [cp.submit("quick") for _ in range(3)]
    # When the control plane restarts, then an agent comes
    cp.stop()
    cp = start_control_plane(tmp_path, port=port)
    agent = start_agent(cp, tmp_path, "w1", GATES)
    try:
        # Then every queued run launches once and succeeds
        for run_id in ids:
            assert cp.wait_run(run_id)["status"] == "SUCCESS"
            starts = [e for e in cp.events(run_id) if e["type"] == "RUN_STARTING"]
            assert len(starts) == 1
    finally:
        agent.stop()
        cp.stop()
