"""The fleet executor with a real control plane and real agents: each step attempt of a
run is a step task the control plane places on any suitable agent.

Each test reads Given / When / Then. Steps leave their process's pid in the run's
folder (pid-<step>-<attempt>), and gated steps wait for a file (gate-<step>) there, so
a test knows which steps are in flight, and where, when it kills or cancels.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_any, encode
from protocol.messages import (
    CodeLocationInfo,
    JobInfo,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
)
from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    http,
    start_agent,
    start_control_plane,
    wait_for,
)

FLEET = {"fleet": FIXTURES / "fleet_jobs.py"}
GPU = 'labels = { gpu = "yes" }\n'


def slots(n: int) -> str:
    return f"max_concurrent_runs = {n}\n"


def started_on(cp: ControlPlaneProc, run_id: str) -> dict[tuple[str, int], str]:
    """(step, attempt) -> the name of the agent its step task started on."""
    return {
        (e["step"], e["data"]["attempt"]): e["data"]["agent"]
        for e in cp.events(run_id)
        if e["type"] == "STEP_TASK_STARTED"
    }


def step_events(cp: ControlPlaneProc, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in cp.events(run_id) if e["type"] == kind]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is gone as far as the test is concerned
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def pid_of(folder: Path, step: str, attempt: int = 0) -> int:
    path = folder / f"pid-{step}-{attempt}"
    text = wait_for(lambda: path.exists() and path.read_text(), what=f"{path.name} to appear")
    return int(text)


def stop_all(*procs: Proc) -> None:
    for proc in procs:
        proc.stop()


@contextlib.contextmanager
def two_agents(tmp_path: Path, cp_extra: str = "") -> Iterator[tuple[ControlPlaneProc, Path]]:
    """A control plane, agents a1 and a2 with four slots each, and the run's folder."""
    cp = start_control_plane(tmp_path, cp_extra)
    a1 = start_agent(cp, tmp_path, "a1", FLEET, extra=slots(4))
    a2 = start_agent(cp, tmp_path, "a2", FLEET, extra=slots(4))
    folder = tmp_path / "run"
    folder.mkdir()
    try:
        yield cp, folder
    finally:
        stop_all(a1, a2, cp)


@pytest.mark.parametrize("store", ["control_plane", "filesystem"])
def test_fan_out_spreads_over_agents_and_a_labelled_step_lands_on_its_match(
    tmp_path: Path, store: str
) -> None:
    # Given two agents, only one of them labelled gpu=yes, sharing an output store:
    # the control plane's, or a folder both can read (a shared volume)
    shared = tmp_path / "shared-outputs"
    table = f'[output_store]\nkind = "{store}"\npath = "{shared}"\n'
    cp = start_control_plane(tmp_path)
    plain = start_agent(cp, tmp_path, "plain", FLEET, extra=slots(4) + table)
    gpu = start_agent(cp, tmp_path, "gpu", FLEET, extra=slots(4) + GPU + table)
    folder = tmp_path / "run"
    folder.mkdir()
    try:
        # When a fleet run fans out seven steps and gathers them
        run_id = cp.submit("fan_out", config={"dir": str(folder)})
        run = cp.wait_run(run_id, 60)
        # Then it succeeds, its steps ran on both agents, the labelled one only on gpu
        assert run["status"] == "SUCCESS", cp.events(run_id)
        where = started_on(cp, run_id)
        assert len(where) == 9 and set(where.values()) == {"plain", "gpu"}
        assert where[("on_gpu", 0)] == "gpu"
        # and each step's compute log and output are the run's, whatever agent ran it
        logs = cp.get(f"/api/v1/runs/{run_id}/logs?step=work_3")["logs"]
        assert "working on work_3" in "".join(c["text"] for c in logs)
        outputs = step_events(cp, run_id, "STEP_OUTPUT")
        assert {e["step"] for e in outputs} == {s for s, _ in where}
        # and the run page shows which agent ran each step
        with urllib.request.urlopen(f"{cp.url}/ui/runs/{run_id}", timeout=30) as response:
            page = response.read().decode()
        assert '<td class="step-agent">gpu</td>' in page
        # and the total (3*2*6 + 3*10) is right: it took every output from the store
        assert (folder / "total").read_text() == "66"
        if store == "filesystem":
            kept = {p.stem for p in (shared / run_id).glob("*.pickle")}
            assert kept == {s for s, _ in where}
    finally:
        stop_all(plain, gpu, cp)


def test_step_whose_agent_is_killed_is_retried_elsewhere_and_the_run_succeeds(
    tmp_path: Path,
) -> None:
    # Given a short heartbeat timeout, and two agents: the run lands on a1 (the first
    # by name), its step (retry policy: 2 retries) on a2, the freer one
    cp = start_control_plane(tmp_path, "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n")
    orchestra = start_agent(cp, tmp_path, "a1", FLEET, extra=slots(4))
    doomed = start_agent(cp, tmp_path, "a2", FLEET, extra=slots(4))
    folder = tmp_path / "run"
    folder.mkdir()
    try:
        run_id = cp.submit("retried", config={"dir": str(folder)})
        first = pid_of(folder, "held", 0)
        assert started_on(cp, run_id)[("held", 0)] == "a2"
        # When the agent running the step is killed outright
        doomed.popen.send_signal(signal.SIGKILL)
        doomed.popen.wait(10)
        # Then the monitor fails that attempt, the retry runs on the other agent, and
        # the run succeeds
        run = cp.wait_run(run_id, 60)
        assert run["status"] == "SUCCESS", cp.events(run_id)
        (retry,) = step_events(cp, run_id, "STEP_UP_FOR_RETRY")
        assert retry["step"] == "held" and retry["data"]["error_type"] == "step_task_lost"
        assert started_on(cp, run_id)[("held", 1)] == "a1"
        assert not step_events(cp, run_id, "STEP_FAILURE")
        (folder / "gate-held").touch()  # the orphaned first attempt may end now
        wait_for(lambda: not alive(first), 30, what="the orphaned attempt to end")
    finally:
        stop_all(orchestra, doomed, cp)


def test_cancel_stops_step_tasks_in_flight_on_two_agents(tmp_path: Path) -> None:
    # Given a fleet run with two gated steps in flight on two agents
    with two_agents(tmp_path) as (cp, folder):
        run_id = cp.submit("two_gated", config={"dir": str(folder)})
        pids = [pid_of(folder, "left"), pid_of(folder, "right")]
        where = wait_for(lambda: len(started_on(cp, run_id)) == 2 and started_on(cp, run_id))
        assert set(where.values()) == {"a1", "a2"}
        # When the run is canceled
        code, _ = http("POST", f"{cp.url}/api/v1/runs/{run_id}/cancel")
        assert code == 200
        # Then it ends CANCELED and every step process on every agent is gone
        assert cp.wait_run(run_id, 60)["status"] == "CANCELED"
        wait_for(lambda: not any(alive(p) for p in pids), 30, what="the step processes to end")
        assert not step_events(cp, run_id, "STEP_SUCCESS")


def test_pool_limit_holds_fleet_steps_to_one_at_a_time(tmp_path: Path) -> None:
    # Given a warehouse pool of one slot, and two agents with room for every step
    pool = '[concurrency]\n[[concurrency.pools]]\nname = "warehouse"\nlimit = 1\n'
    with two_agents(tmp_path, pool) as (cp, folder):
        # When a fleet run has four steps in that pool, all ready at once
        run_id = cp.submit("pooled", config={"dir": str(folder)})
        assert cp.wait_run(run_id, 60)["status"] == "SUCCESS", cp.events(run_id)
        # Then they ran one after another, never two at once
        lines = (folder / "in_pool").read_text().split()
        marks = [(float(lines[i + 2]), lines[i]) for i in range(0, len(lines), 3)]
        depth = peak = 0
        for _, kind in sorted(marks):
            depth += 1 if kind == "start" else -1
            peak = max(peak, depth)
        assert peak == 1 and len(marks) == 8
        assert len(step_events(cp, run_id, "STEP_SLOT_REQUESTED")) == 4
        assert step_events(cp, run_id, "STEP_SLOT_WAITING")


def test_reexecution_from_failure_reuses_outputs_across_agents(tmp_path: Path) -> None:
    # Given a fleet run whose middle step failed
    with two_agents(tmp_path) as (cp, folder):
        parent = cp.submit("mends", config={"dir": str(folder)})
        assert cp.wait_run(parent, 60)["status"] == "FAILURE"
        # When the cause is fixed and the run is re-executed FROM_FAILURE
        (folder / "fixed").touch()
        code, body = http("POST", f"{cp.url}/api/v1/runs/{parent}/reexecute", {})
        assert code == 201, body
        child = body["run_id"]
        # Then the child reuses extract's output, runs the rest as step tasks, succeeds
        assert cp.wait_run(child, 60)["status"] == "SUCCESS", cp.events(child)
        (reused,) = step_events(cp, child, "STEP_REUSED")
        assert reused["step"] == "extract" and reused["data"]["source_run_id"] == parent
        assert set(started_on(cp, child)) == {("flaky", 0), ("after", 0)}


def test_run_worker_dying_resumes_the_run_reusing_finished_steps(tmp_path: Path) -> None:
    # Given a run that resumes once when its worker is lost, its second step in flight
    with two_agents(tmp_path, "[run_monitoring]\nmax_resume_run_attempts = 1\n") as (cp, folder):
        run_id = cp.submit("resumable", config={"dir": str(folder)})
        in_flight = pid_of(folder, "wait_then")
        (start,) = step_events(cp, run_id, "RUN_START")
        # When the run's worker (the orchestrator) is killed
        os.kill(start["data"]["pid"], signal.SIGKILL)
        # Then the run restarts its worker, the in-flight step task is fenced (its
        # process stops), the finished step is reused, and the run succeeds
        wait_for(lambda: step_events(cp, run_id, "RUN_WORKER_RESTARTED"), 60)
        wait_for(lambda: not alive(in_flight), 30, what="the fenced step process to end")
        wait_for(lambda: len(step_events(cp, run_id, "STEP_TASK_REQUESTED")) == 3, 60)
        (folder / "gate-wait_then").touch()
        assert cp.wait_run(run_id, 60)["status"] == "SUCCESS", cp.events(run_id)
        (reused,) = step_events(cp, run_id, "STEP_REUSED")
        assert reused["step"] == "slow_first"
        asked = [
            (e["step"], e["data"]["attempt"])
            for e in step_events(cp, run_id, "STEP_TASK_REQUESTED")
        ]
        assert asked == [("slow_first", 0), ("wait_then", 0), ("wait_then", 0)]


def test_a_step_no_agent_can_take_waits_in_the_queue_view_until_one_can(
    tmp_path: Path,
) -> None:
    # Given only an agent without the label a step of the run requires
    cp = start_control_plane(tmp_path)
    plain = start_agent(cp, tmp_path, "plain", FLEET, extra=slots(8))
    folder = tmp_path / "run"
    folder.mkdir()
    gpu = None
    try:
        run_id = cp.submit("fan_out", config={"dir": str(folder)})

        def waiting() -> list[dict[str, Any]]:
            """The step tasks the queue view says wait (not those placed next pass)."""
            return [t for t in cp.get("/api/v1/queue")["step_tasks"] if t["waiting_for"]]

        # Then the labelled step waits, and the queue view (API and CLI) says why
        (task,) = wait_for(waiting, 60, what="the labelled step to wait")
        assert (task["run_id"], task["step"], task["attempt"]) == (run_id, "on_gpu", 0)
        assert task["waiting_for"] == "no ONLINE agent has label gpu=yes"
        shown = subprocess.run(
            [*FLEETRUN, "queue", "--url", cp.url], capture_output=True, text=True, timeout=60
        )
        assert "on_gpu" in shown.stdout and "gpu=yes" in shown.stdout, shown.stdout
        with urllib.request.urlopen(f"{cp.url}/ui/queue", timeout=30) as response:
            page = response.read().decode()
        assert '<tr data-step="on_gpu">' in page and "gpu=yes" in page
        # When an agent with the label arrives, the step runs there and the run succeeds
        gpu = start_agent(cp, tmp_path, "gpu", FLEET, extra=slots(2) + GPU)
        assert cp.wait_run(run_id, 60)["status"] == "SUCCESS", cp.events(run_id)
        assert started_on(cp, run_id)[("on_gpu", 0)] == "gpu"
        assert waiting() == []
    finally:
        stop_all(*(p for p in (plain, gpu) if p is not None), cp)


def agent_call(cp: ControlPlaneProc, path: str, message: object, version: int) -> object:
    """One agent-protocol call in protocol `version`, as an agent of that version."""
    request = urllib.request.Request(
        f"{cp.url}/agent/v1/{path}",
        data=encode(message, version),
        method="POST",
        headers={"Content-Type": "application/msgpack"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return decode_any(response.read())


def test_an_agent_of_the_previous_protocol_never_gets_a_fleet_run_or_step(
    tmp_path: Path,
) -> None:
    # Given an ONLINE agent of protocol 4 (no step_tasks capability) serving the location
    cp = start_control_plane(tmp_path, server_extra="poll_timeout_seconds = 1")
    old = PROTOCOL_VERSION - 1
    jobs = [JobInfo(name="fan_out", ops=[OpInfo(name="extract")], executor="fleet")]
    registered = agent_call(
        cp,
        "register",
        Register(
            name="old",
            hostname="h",
            version="0.0.9",
            queues=["default"],
            max_concurrent_runs=8,
            code_locations=[CodeLocationInfo("fleet", jobs)],
            capabilities=["reuse_outputs", "stop_orders", "drain", "launcher:forkserver"],
        ),
        old,
    )
    assert isinstance(registered, Registered)
    folder = tmp_path / "run"
    folder.mkdir()
    new = None
    try:
        # When a fleet run is submitted
        run_id = cp.submit("fan_out", config={"dir": str(folder)})
        # Then the old agent is not given it, and the queue view says why
        (waiting,) = wait_for(lambda: cp.get("/api/v1/queue")["runs"], 30)
        assert waiting["run_id"] == run_id
        assert "can do step_tasks (upgrade it)" in waiting["waiting_for"]
        reply = agent_call(cp, "poll", Poll(agent_id=registered.agent_id), old)
        assert isinstance(reply, PollReply) and reply.launches == []
        # and an agent that can takes it, with every step task, and the run succeeds
        new = start_agent(cp, tmp_path, "new", FLEET, extra=slots(8) + GPU)
        assert cp.wait_run(run_id, 60)["status"] == "SUCCESS", cp.events(run_id)
        assert set(started_on(cp, run_id).values()) == {"new"}
    finally:
        stop_all(*(p for p in (new,) if p is not None), cp)
