"""Concurrency pools and placement with a real control plane and real agents.

Each test reads Given / When / Then. Steps of ops in the `warehouse` pool hold their
slot until the test opens their gate (a file named after the run, or run and step), so
who holds and who waits at a moment is under the test's control.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    free_port,
    start_agent,
    start_control_plane,
    wait_for,
)

POOLS = {"pools": FIXTURES / "pool_jobs.py"}
WAREHOUSE_1 = '[concurrency]\n[[concurrency.pools]]\nname = "warehouse"\nlimit = 1\n'
BY_RUN = '[concurrency]\ngranularity = "run"'


def types(cp: ControlPlaneProc, run_id: str) -> list[str]:
    return [e["type"] for e in cp.events(run_id)]


def step_started(cp: ControlPlaneProc, run_id: str, step: str = "load") -> bool:
    return any(e["type"] == "STEP_START" and e["step"] == step for e in cp.events(run_id))


def waits(cp: ControlPlaneProc, run_id: str) -> dict[str, Any] | None:
    return next((e for e in cp.events(run_id) if e["type"] == "STEP_SLOT_WAITING"), None)


def pool(cp: ControlPlaneProc, name: str = "warehouse") -> dict[str, Any]:
    return next(p for p in cp.get("/api/v1/pools")["pools"] if p["name"] == name)


def wait_idle(cp: ControlPlaneProc, name: str = "warehouse", timeout: float = 60) -> None:
    def idle() -> bool:
        found = pool(cp, name)
        return found["in_use"] == 0 and found["waiting"] == 0

    wait_for(idle, timeout, what=f"pool {name} to have no holder and no waiter")


def cli_json(cp: ControlPlaneProc, *args: str) -> Any:
    done = subprocess.run(
        [*FLEETRUN, *args, "--url", cp.url, "--json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def submit_pooled(cp: ControlPlaneProc, gates: Path, **fields: Any) -> str:
    return cp.submit("pooled", config={"gates": str(gates)}, **fields)


def test_op_granularity_one_slot_across_runs_with_visible_waiting(tmp_path: Path) -> None:
    # Given a warehouse pool of one slot and two runs whose load step uses it
    cp = start_control_plane(tmp_path, WAREHOUSE_1)
    agent = start_agent(cp, tmp_path, locations=POOLS)
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        first, second = submit_pooled(cp, gates), submit_pooled(cp, gates)
        # When one of them holds the slot
        wait_for(lambda: step_started(cp, first) or step_started(cp, second), what="a load")
        holder, waiter = (first, second) if step_started(cp, first) else (second, first)
        # Then the other waits, its log names the pool, and pools list shows both
        event = wait_for(lambda: waits(cp, waiter), what="the second load to wait")
        assert event["step"] == "load" and event["data"] == {"pool": "warehouse"}
        assert "pool warehouse: 1 of 1 slots in use; 1 of 1 in line" in event["message"]
        listed = cli_json(cp, "pools", "list")
        (warehouse,) = [p for p in listed["pools"] if p["name"] == "warehouse"]
        assert (warehouse["limit"], warehouse["source"], warehouse["in_use"]) == (1, "config", 1)
        assert [(c["run_id"], c["step"]) for c in warehouse["holders"]] == [(holder, "load")]
        assert [(c["run_id"], c["step"]) for c in warehouse["waiters"]] == [(waiter, "load")]
        queue = cp.get("/api/v1/queue")
        assert [p["name"] for p in queue["pools"]] == ["warehouse"]
        with urllib.request.urlopen(cp.url + "/ui/pools", timeout=30) as response:
            page = response.read().decode()
        assert 'data-pool="warehouse"' in page and waiter[:8] in page and holder[:8] in page
        assert not step_started(cp, waiter)
        # When the holder's step ends
        (gates / holder).touch()
        # Then the waiter starts, and once both end the pool is idle again
        wait_for(lambda: step_started(cp, waiter), what="the waiting load to start")
        assert "STEP_SLOT_GRANTED" in types(cp, waiter)
        (gates / waiter).touch()
        assert cp.wait_run(holder)["status"] == "SUCCESS"
        assert cp.wait_run(waiter)["status"] == "SUCCESS"
        wait_idle(cp)
    finally:
        agent.stop()
        cp.stop()


def test_job_default_pool_limits_steps_of_one_multiprocess_run(tmp_path: Path) -> None:
    # Given a pool of two set through the CLI, and a run of three parallel steps in it
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, locations=POOLS)
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        assert cli_json(cp, "pools", "set", "warehouse", "2")["limit"] == 2
        run_id = cp.submit("fan_out", config={"gates": str(gates)})

        def started() -> set[str]:
            return {e["step"] for e in cp.events(run_id) if e["type"] == "STEP_START"} - {"extract"}

        # When two steps hold both slots
        wait_for(lambda: len(started()) == 2, what="two loads to start")
        waiting = wait_for(lambda: waits(cp, run_id), what="the third load to wait")
        assert started() | {waiting["step"]} == {"a", "b", "c"}
        assert pool(cp)["in_use"] == 2 and pool(cp)["source"] == "api"
        # Then the third starts as soon as one ends, and the run succeeds
        (gates / f"{run_id}-{sorted(started())[0]}").touch()
        wait_for(lambda: len(started()) == 3, what="the third load to start")
        for step in ("a", "b", "c"):
            (gates / f"{run_id}-{step}").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        wait_idle(cp)
        assert cli_json(cp, "pools", "delete", "warehouse")["source"] == "default"
    finally:
        agent.stop()
        cp.stop()


def test_waiters_get_slots_by_priority_then_in_order(tmp_path: Path) -> None:
    # Given a run holding the only slot, and three runs waiting for it
    cp = start_control_plane(tmp_path, WAREHOUSE_1)
    agent = start_agent(cp, tmp_path, locations=POOLS, extra="max_concurrent_runs = 6")
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        holder = submit_pooled(cp, gates)
        wait_for(lambda: step_started(cp, holder), what="the holder to start its load")
        low_1 = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, low_1), what="low_1 to wait")
        low_2 = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, low_2), what="low_2 to wait")
        high = submit_pooled(cp, gates, tags={"fleetrun/priority": "5"})
        wait_for(lambda: waits(cp, high), what="high to wait")
        order = [c["run_id"] for c in pool(cp)["waiters"]]
        assert order == [high, low_1, low_2]
        # When the holder ends, and every waiter ends as soon as it starts
        for run_id in (low_1, low_2, high, holder):
            (gates / run_id).touch()
        for run_id in (holder, low_1, low_2, high):
            assert cp.wait_run(run_id)["status"] == "SUCCESS"

        # Then they started one at a time: by priority, then in the order they asked
        def start_time(run_id: str) -> str:
            return next(e["time"] for e in cp.events(run_id) if e["type"] == "STEP_START")

        assert sorted([high, low_1, low_2], key=start_time) == [high, low_1, low_2]
        wait_idle(cp)
    finally:
        agent.stop()
        cp.stop()


def test_cancel_frees_running_and_waiting_steps(tmp_path: Path) -> None:
    # Given one run holding the slot and two waiting for it
    cp = start_control_plane(tmp_path, WAREHOUSE_1)
    agent = start_agent(cp, tmp_path, locations=POOLS)
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        holder = submit_pooled(cp, gates)
        wait_for(lambda: step_started(cp, holder), what="the holder to start")
        waiting = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, waiting), what="a waiter")
        last = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, last), what="the last waiter")
        # When the waiter in line is canceled, then the holder
        assert cp.call("POST", f"/api/v1/runs/{waiting}/cancel", {})[0] == 200
        assert cp.wait_run(waiting)["status"] == "CANCELED"
        assert [c["run_id"] for c in pool(cp)["waiters"]] == [last]
        assert cp.call("POST", f"/api/v1/runs/{holder}/cancel", {})[0] == 200
        assert cp.wait_run(holder)["status"] == "CANCELED"
        # Then the slot goes to the last one, and when it is canceled too nothing is left
        wait_for(lambda: step_started(cp, last), what="the last run's load to start")
        assert cp.call("POST", f"/api/v1/runs/{last}/cancel", {})[0] == 200
        assert cp.wait_run(last)["status"] == "CANCELED"
        wait_idle(cp)
    finally:
        agent.stop()
        cp.stop()


def test_no_slot_leaks_when_the_agent_and_the_control_plane_die(tmp_path: Path) -> None:
    # Given a run holding the only slot and another waiting for it, on one agent
    config = WAREHOUSE_1 + "\n[run_monitoring]\nagent_heartbeat_timeout_seconds = 6\n"
    port = free_port()
    cp = start_control_plane(tmp_path, config, port=port)
    agent = start_agent(cp, tmp_path, locations=POOLS, name="doomed")
    gates = tmp_path / "gates"
    gates.mkdir()
    survivor: Proc | None = None
    try:
        holder = submit_pooled(cp, gates)
        wait_for(lambda: step_started(cp, holder), what="the holder to start")
        waiter = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, waiter), what="the waiter")
        # When the control plane dies, and the holder's step ends while it is down
        cp.popen.send_signal(signal.SIGKILL)
        cp.popen.wait(10)
        (gates / holder).touch()
        cp = start_control_plane(tmp_path, config, port=port)
        # Then the end reaches the restarted control plane, which hands the slot on
        wait_for(lambda: step_started(cp, waiter), what="the waiter to start after the restart")
        (gates / waiter).touch()
        assert cp.wait_run(holder)["status"] == "SUCCESS"
        assert cp.wait_run(waiter)["status"] == "SUCCESS"
        wait_idle(cp)
        # Given a new holder and waiter
        holder = submit_pooled(cp, gates)
        wait_for(lambda: step_started(cp, holder), what="the next holder to start")
        waiter = submit_pooled(cp, gates)
        wait_for(lambda: waits(cp, waiter), what="the next waiter")
        # When the agent and the control plane are both killed
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait(10)
        cp.popen.send_signal(signal.SIGKILL)
        cp.popen.wait(10)
        cp = start_control_plane(tmp_path, config, port=port)
        # Then the restarted control plane declares the agent dead and frees every slot
        for run_id in (holder, waiter):
            assert cp.wait_run(run_id)["status"] == "FAILURE"
        wait_idle(cp)
        # And the pool works for the next run, on another agent
        survivor = start_agent(cp, tmp_path, locations=POOLS, name="survivor")
        after = submit_pooled(cp, gates)
        (gates / after).touch()
        assert cp.wait_run(after)["status"] == "SUCCESS"
        wait_idle(cp)
    finally:
        for proc in (survivor, agent):
            if proc is not None:
                proc.stop()
        cp.stop()


def test_run_granularity_keeps_a_run_queued_until_its_pools_have_room(tmp_path: Path) -> None:
    # Given pools limited by run: a run holds a warehouse slot from launch to end
    cp = start_control_plane(tmp_path, WAREHOUSE_1.replace("[concurrency]", BY_RUN))
    agent = start_agent(cp, tmp_path, locations=POOLS)
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        assert cp.get("/api/v1/pools")["granularity"] == "run"
        first = submit_pooled(cp, gates)
        wait_for(lambda: step_started(cp, first), what="the first run's load")
        second = submit_pooled(cp, gates)

        # When the first holds the pool's slot
        def reason() -> str | None:
            runs = cp.get("/api/v1/queue")["runs"]
            return next((r["waiting_for"] for r in runs if r["run_id"] == second), None)

        # Then the second stays QUEUED (no agent slot taken), and the queue names the pool
        assert wait_for(reason, what="a reason") == "pool warehouse: 1 of 1 slots in use"
        assert cp.get(f"/api/v1/runs/{second}")["status"] == "QUEUED"
        holders = pool(cp)["holders"]
        assert [(c["run_id"], c["step"]) for c in holders] == [(first, None)]
        assert "STEP_SLOT_REQUESTED" not in types(cp, first)  # steps do not claim by run
        (gates / first).touch()
        (gates / second).touch()
        assert cp.wait_run(first)["status"] == "SUCCESS"
        assert cp.wait_run(second)["status"] == "SUCCESS"
        wait_idle(cp)
    finally:
        agent.stop()
        cp.stop()


def test_tag_concurrency_limits_of_the_multiprocess_executor(tmp_path: Path) -> None:
    # Given four steps tagged db=main that may run four at once but for a limit of one
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, locations=POOLS)
    try:
        run_id = cp.submit("tag_limited", config={"folder": str(tmp_path)})
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        # Then they ran one at a time
        running, most = 0, 0
        lines = sorted((tmp_path / "log").read_text().split("\n")[:-1], key=lambda x: x[-17:])
        for line in lines:
            running += 1 if line.startswith("start") else -1
            most = max(most, running)
        assert (most, len(lines)) == (1, 8), lines
    finally:
        agent.stop()
        cp.stop()


def test_placement_by_labels_and_resources(tmp_path: Path) -> None:
    # Given an agent without the label a run requires
    cp = start_control_plane(tmp_path)
    plain = start_agent(cp, tmp_path, locations=POOLS, name="plain")
    gpu: Proc | None = None
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        refused = cp.call("POST", "/api/v1/runs", {"job": "quick", "tags": {"fleetrun/cpus": "x"}})
        assert refused[0] == 422 and "fleetrun/cpus" in refused[1]["error"]["message"]
        wanting = {"fleetrun/requires": "gpu=a100", "fleetrun/cpus": "2"}
        first = cp.submit("pooled", tags=wanting, config={"gates": str(gates)})

        def reason(run_id: str) -> str | None:
            runs = cp.get("/api/v1/queue")["runs"]
            return next((r["waiting_for"] for r in runs if r["run_id"] == run_id), None)

        # Then it waits, saying which label no agent has
        assert wait_for(lambda: reason(first)) == "no ONLINE agent has label gpu=a100"
        # When an agent with that label and 3 cpus joins
        extra = 'labels = { gpu = "a100" }\n[resources]\ncpus = 3\nmemory_mb = 1000'
        gpu = start_agent(cp, tmp_path, locations=POOLS, name="gpu", extra=extra)
        # Then the run goes there, holding 2 of its cpus
        wait_for(lambda: step_started(cp, first), what="the run to start on gpu")
        assert cp.get(f"/api/v1/runs/{first}")["agent"] != plain_id(cp)
        agents = {a["name"]: a for a in cp.get("/api/v1/agents")["agents"]}
        assert agents["gpu"]["labels"] == {"gpu": "a100"}
        assert agents["gpu"]["resources"] == {"cpus": 3, "memory_mb": 1000}
        assert agents["gpu"]["resources_free"] == {"cpus": 1, "memory_mb": 1000}
        # And a second run asking 2 cpus waits for them, saying how many are free
        second = cp.submit("pooled", tags=wanting, config={"gates": str(gates)})
        expected = "needs 2 cpus: agent gpu has 1 of 3 cpus free"
        assert wait_for(lambda: reason(second)) == expected
        (gates / first).touch()
        (gates / second).touch()
        assert cp.wait_run(first)["status"] == "SUCCESS"
        assert cp.wait_run(second)["status"] == "SUCCESS"
        quick = cp.submit("quick")  # a run that asks nothing goes anywhere
        assert cp.wait_run(quick)["status"] == "SUCCESS"
    finally:
        for proc in (gpu, plain):
            if proc is not None:
                proc.stop()
        cp.stop()


def plain_id(cp: ControlPlaneProc) -> str:
    return next(a["agent_id"] for a in cp.get("/api/v1/agents")["agents"] if a["name"] == "plain")
