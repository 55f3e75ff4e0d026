"""Run monitoring, fencing, cancellation and run retries, with real processes.

Agents are killed (-9), frozen (SIGSTOP), restarted; workers crash; the control plane
restarts. Every wait is on a condition with a generous timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest

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

JOBS = {"monitor": FIXTURES / "monitor_jobs.py"}
TIMEOUT = 3  # agent_heartbeat_timeout_seconds in these tests


def monitoring(timeout: float = TIMEOUT, extra: str = "") -> str:
    return f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout}\n{extra}"


def get_run(cp: ControlPlaneProc, run_id: str) -> dict:
    return cp.get(f"/api/v1/runs/{run_id}")


def wait_status(cp: ControlPlaneProc, run_id: str, *wanted: str, timeout: float = 60) -> dict:
    def reached() -> dict | None:
        run = get_run(cp, run_id)
        return run if run["status"] in wanted else None

    return wait_for(reached, timeout, what=f"run {run_id} to be {'/'.join(wanted)}")


def retries_of(cp: ControlPlaneProc, root: str) -> list[dict]:
    runs = cp.get(f"/api/v1/runs?tag=fleetrun/root_run_id:{root}&limit=100")["runs"]
    return sorted(runs, key=lambda r: int(r["tags"]["fleetrun/retry_number"]))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # it vanished while we looked
        return False


def worker_pid(folder: Path, lease: int) -> int:
    path = folder / f"pid-{lease}"
    wait_for(lambda: path.exists() and path.read_text(), what=f"worker of attempt {lease}")
    return int(path.read_text())


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def hold(cp: ControlPlaneProc, folder: Path, **tags: str) -> tuple[str, int]:
    """Submit a `hold` run and wait until its worker is running; returns (run id, lease)."""
    run_id = cp.submit("hold", tags=tags, config={"dir": str(folder)})
    run = wait_status(cp, run_id, "STARTED")
    worker_pid(folder, run["lease"])
    return run_id, run["lease"]


def release(folder: Path, lease: int) -> None:
    (folder / f"open-{lease}").touch()


def test_killed_agent_fails_its_run_and_the_retry_succeeds_elsewhere(tmp_path: Path) -> None:
    # Given a run holding on agent a1, with one retry allowed
    cp = start_control_plane(tmp_path, monitoring())
    a1 = start_agent(cp, tmp_path, "a1", JOBS)
    a2: Proc | None = None
    pids: list[int] = []
    try:
        run_id, lease = hold(cp, tmp_path, **{"fleetrun/max_retries": "1"})
        pids.append(worker_pid(tmp_path, lease))
        a2 = start_agent(cp, tmp_path, "a2", JOBS)
        # When a1 is killed with -9
        killed_at = time.time()
        a1.popen.kill()
        # Then the run fails within the timeout (+ 2 s), naming the agent
        failed = wait_status(cp, run_id, "FAILURE", timeout=TIMEOUT + 30)
        lag = time_of(failed["end_time"]) - killed_at
        assert lag <= TIMEOUT + 2, lag
        assert failed["status_reason"].startswith("agent lost: no heartbeat from agent a1 for")
        assert failed["failure_kind"] == "agent_lost"
        # And its one retry runs on a2 and succeeds
        (retry,) = wait_for(lambda: retries_of(cp, run_id), what="the retry")
        retry = wait_status(cp, retry["run_id"], "STARTED")
        assert retry["agent"] != failed["agent"]
        assert retry["tags"]["fleetrun/parent_run_id"] == run_id
        pids.append(worker_pid(tmp_path, retry["lease"]))
        release(tmp_path, retry["lease"])
        assert cp.wait_run(retry["run_id"])["status"] == "SUCCESS"
        decision = [e for e in cp.events(run_id) if e["type"] == "RUN_RETRY"]
        assert decision[0]["data"]["retry_run_id"] == retry["run_id"]
        agents = {a["name"]: a["status"] for a in cp.get("/api/v1/agents")["agents"]}
        assert agents == {"a1": "OFFLINE", "a2": "ONLINE"}
    finally:
        for pid in pids:
            kill_quietly(pid)  # a1's orphaned worker
        for proc in (a1, a2, cp):
            if proc is not None:
                proc.stop()


def time_of(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_frozen_agent_is_fenced_when_it_wakes(tmp_path: Path) -> None:
    # Given a run on a1 (retries on), and a second agent
    cp = start_control_plane(tmp_path, monitoring())
    a1 = start_agent(cp, tmp_path, "a1", JOBS)
    a2: Proc | None = None
    old_pid = 0
    try:
        run_id, old_lease = hold(cp, tmp_path, **{"fleetrun/max_retries": "1"})
        old_pid = worker_pid(tmp_path, old_lease)
        a2 = start_agent(cp, tmp_path, "a2", JOBS)
        # When a1 is frozen past the timeout
        a1.popen.send_signal(signal.SIGSTOP)
        wait_status(cp, run_id, "FAILURE", timeout=TIMEOUT + 30)
        (retry,) = wait_for(lambda: retries_of(cp, run_id), what="the retry")
        retry = wait_status(cp, retry["run_id"], "STARTED")
        release(tmp_path, retry["lease"])
        assert cp.wait_run(retry["run_id"])["status"] == "SUCCESS"
        logs_at_verdict = len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"])
        # And then wakes up, its old worker still printing
        a1.popen.send_signal(signal.SIGCONT)
        # Then the old attempt's worker is stopped, its writes refused, the run stays FAILURE
        wait_for(lambda: not pid_alive(old_pid), what="the stale worker to be stopped")
        wait_for(
            lambda: "refused this attempt" in a1.log() or "no longer current" in a1.log(),
            what="a1 to learn its attempt is stale",
        )
        old = get_run(cp, run_id)
        assert old["status"] == "FAILURE" and old["failure_kind"] == "agent_lost"
        assert len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"]) == logs_at_verdict
        assert not (tmp_path / f"done-{old_lease}").exists()
        assert a1.popen.poll() is None  # the agent itself carries on
    finally:
        a1.popen.send_signal(signal.SIGCONT)
        kill_quietly(old_pid)
        for proc in (a1, a2, cp):
            if proc is not None:
                proc.stop()


def test_crashed_worker_is_resumed_within_the_same_run(tmp_path: Path) -> None:
    # Given one resume attempt allowed
    cp = start_control_plane(tmp_path, monitoring(30, "max_resume_run_attempts = 1\n"))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        # When the run's first worker dies with os._exit(7)
        run_id = cp.submit("fail_once", config={"dir": str(tmp_path)})
        run = cp.wait_run(run_id)
        # Then a second worker under a new lease finishes the same run
        assert run["status"] == "SUCCESS"
        first_lease = int((tmp_path / "crashed-once").read_text())
        assert run["lease"] > first_lease
        (restart,) = [e for e in cp.events(run_id) if e["type"] == "RUN_WORKER_RESTARTED"]
        assert restart["data"]["attempt"] == 2 and "exited with code 7" in restart["message"]
        assert retries_of(cp, run_id) == []  # resumed, not retried
    finally:
        agent.stop()
        cp.stop()


def test_restarted_agent_reports_its_lost_runs_at_once(tmp_path: Path) -> None:
    # Given a run on an agent, and a heartbeat timeout far longer than this test
    cp = start_control_plane(tmp_path, monitoring(600))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    pid = 0
    try:
        run_id, lease = hold(cp, tmp_path)
        pid = worker_pid(tmp_path, lease)
        # When the agent process dies (its worker with it: a host reboot) and starts again
        agent.popen.kill()
        kill_quietly(pid)
        agent.popen.wait(30)
        agent = start_agent(cp, tmp_path, "a1", JOBS)
        # Then the run fails at once, not after the timeout, saying why
        run = wait_status(cp, run_id, "FAILURE", timeout=60)
        assert run["failure_kind"] == "agent_restarted"
        assert "was gone when the agent started again" in run["status_reason"], run
    finally:
        kill_quietly(pid)
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_cancel_a_started_run_stops_it_before_its_side_effect(
    tmp_path: Path, executor: str
) -> None:
    cp = start_control_plane(tmp_path, monitoring(30))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        # Given a run sleeping before a side effect (its op also started a process)
        config = {"dir": str(tmp_path), "seconds": 30, "execution": executor}
        run_id = cp.submit("slow_side_effect", config=config)
        wait_status(cp, run_id, "STARTED")
        wait_for(
            lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(),
            what="the worker",
        )
        pid = int((tmp_path / "pid").read_text())
        # When it is canceled
        code, body = http("POST", f"{cp.url}/api/v1/runs/{run_id}/cancel", {})
        assert (code, body["status"]) == (200, "CANCELING")
        # Then it ends CANCELED, its worker is gone, and the side effect never happens
        run = wait_status(cp, run_id, "CANCELED", timeout=60)
        wait_for(lambda: not pid_alive(pid), what="the worker to exit")
        child = int((tmp_path / "child-pid").read_text())
        wait_for(lambda: not pid_alive(child), what="the worker's child that ignores SIGTERM")
        assert not (tmp_path / "side-effect").exists()
        assert (tmp_path / "cleanup").read_text() == "ran"  # its finally block ran
        types = [e["type"] for e in cp.events(run_id) if e["type"].startswith("RUN_")]
        assert types[-2:] == ["RUN_CANCELING", "RUN_CANCELED"]
        assert run["status_reason"].startswith("run canceled")
        code, body = http("POST", f"{cp.url}/api/v1/runs/{run_id}/cancel", {})
        assert (code, body["error"]["code"]) == (409, "already_finished")
    finally:
        agent.stop()
        cp.stop()


def test_max_runtime_ends_the_run(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path, monitoring(30))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        run_id, lease = hold(cp, tmp_path, **{"fleetrun/max_runtime": "1"})
        pid = worker_pid(tmp_path, lease)
        run = wait_status(cp, run_id, "FAILURE", timeout=60)
        assert run["status_reason"] == "exceeded max runtime of 1 s"
        assert run["failure_kind"] == "max_runtime"
        wait_for(lambda: not pid_alive(pid), what="the worker to be stopped")
        code, body = http(
            "POST",
            f"{cp.url}/api/v1/runs",
            {"job": "hold", "tags": {"fleetrun/max_runtime": "soon"}},
        )
        assert code == 422 and "fleetrun/max_runtime" in body["error"]["message"]
    finally:
        agent.stop()
        cp.stop()


def test_op_failures_are_retried_exactly_max_retries_times(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path, monitoring(30, "[run_retries]\nmax_retries = 2\n"))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        root = cp.submit("op_fails")
        assert cp.wait_run(root)["status"] == "FAILURE"
        chain = wait_for(
            lambda: (r := retries_of(cp, root)) and len(r) == 2 and r, what="two retries"
        )
        for retry in chain:
            assert cp.wait_run(retry["run_id"])["status"] == "FAILURE"
        last = chain[-1]["run_id"]
        wait_for(
            lambda: any(e["type"] == "RUN_RETRY" for e in cp.events(last)),
            what="the last retry decision",
        )
        (decision,) = [e for e in cp.events(last) if e["type"] == "RUN_RETRY"]
        assert decision["message"] == "not retried: all 2 retries used"
        assert [r["parent_run_id"] for r in chain] == [root, chain[0]["run_id"]]
        assert len(retries_of(cp, root)) == 2
        show = subprocess.run(
            [*FLEETRUN, "--url", cp.url, "runs", "show", chain[0]["run_id"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert show.returncode == 0, show.stderr
        lines = show.stdout[show.stdout.index("retry chain:") :].splitlines()[1:4]
        assert [line.split() for line in lines] == [
            ["original", "run", root, "FAILURE"],
            ["retry", "1", chain[0]["run_id"], "FAILURE", "<-", "this", "run"],
            ["retry", "2", last, "FAILURE"],
        ]

    finally:
        agent.stop()
        cp.stop()


def test_without_retry_on_op_failure_only_crashes_are_retried(tmp_path: Path) -> None:
    config = monitoring(
        30, "[run_retries]\nmax_retries = 1\nretry_on_op_failure = false\ndelay_seconds = 1\n"
    )
    cp = start_control_plane(tmp_path, config)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        op_failure = cp.submit("op_fails")
        crash = cp.submit("fail_once", config={"dir": str(tmp_path)})
        assert cp.wait_run(op_failure)["status"] == "FAILURE"
        failed = cp.wait_run(crash)
        assert (failed["status"], failed["failure_kind"]) == ("FAILURE", "worker_crash")
        (retry,) = wait_for(lambda: retries_of(cp, crash), what="the crash's retry")
        retry = cp.wait_run(retry["run_id"])
        assert retry["status"] == "SUCCESS"
        # The retry waited out its 1 s delay
        assert time_of(retry["start_time"]) - time_of(failed["end_time"]) >= 1.0
        wait_for(
            lambda: any(e["type"] == "RUN_RETRY" for e in cp.events(op_failure)),
            what="the op failure's retry decision",
        )
        assert retries_of(cp, op_failure) == []
        (decision,) = [e for e in cp.events(op_failure) if e["type"] == "RUN_RETRY"]
        assert "retry_on_op_failure is false" in decision["message"]
    finally:
        agent.stop()
        cp.stop()


def test_a_run_tag_overrides_retry_on_op_failure_and_every_decision_is_an_event(
    tmp_path: Path,
) -> None:
    """fleetrun/retry_on_op_failure wins over the instance either way, and a run that is
    not retried because max_retries is 0 says so in a RUN_RETRY event."""
    config = monitoring(30, "[run_retries]\nmax_retries = 1\nretry_on_op_failure = false\n")
    cp = start_control_plane(tmp_path, config)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        wants_ops = cp.submit("op_fails", tags={"fleetrun/retry_on_op_failure": "true"})
        no_retries = cp.submit("op_fails", tags={"fleetrun/max_retries": "0"})
        assert cp.wait_run(wants_ops)["status"] == "FAILURE"
        (retry,) = wait_for(lambda: retries_of(cp, wants_ops), what="the op failure's retry")
        assert cp.wait_run(retry["run_id"])["status"] == "FAILURE"
        assert retry["tags"]["fleetrun/retry_on_op_failure"] == "true"

        def decisions(run_id: str) -> list[dict]:
            return [e for e in cp.events(run_id) if e["type"] == "RUN_RETRY"]

        for run_id, reason in (
            (no_retries, "not retried: max_retries is 0"),
            (retry["run_id"], "not retried: all 1 retries used"),
        ):
            (decision,) = wait_for(partial(decisions, run_id), what=f"{run_id}'s retry decision")
            assert decision["message"].startswith(reason), decision
        assert retries_of(cp, no_retries) == []
    finally:
        agent.stop()
        cp.stop()


def test_control_plane_restart_gives_agents_a_full_timeout(tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    cp = start_control_plane(tmp_path, monitoring(), port=port)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        # (a run that keeps going whatever happens: by default a worker stops itself at
        # its lease deadline, which an outage this long passes)
        run_id, lease = hold(cp, tmp_path, **{"fleetrun/on_lost_contact": "continue"})
        # When the control plane is down for longer than the heartbeat timeout
        cp.stop()
        down_since = time.monotonic()
        wait_for(
            lambda: "lost contact with the control plane" in agent.log(), what="the agent to notice"
        )
        wait_for(
            lambda: time.monotonic() - down_since > TIMEOUT + 1,
            timeout=60,
            what="an outage longer than the heartbeat timeout",
        )
        cp = start_control_plane(tmp_path, monitoring(), port=port)
        # Then, heartbeats resuming, the run is not failed and finishes
        wait_for(
            lambda: (
                get_run(cp, run_id)["agent"]
                and any(a["status"] == "ONLINE" for a in cp.get("/api/v1/agents")["agents"])
            ),
            what="the agent to be back",
        )
        release(tmp_path, lease)
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        assert not [e for e in cp.events(run_id) if e["type"] == "RUN_FAILURE"]
        # And the agent said so once each way, not once per failed attempt
        wait_for(
            lambda: "contact with the control plane restored" in agent.log(),
            what="the agent to log the reconnection",
        )
        assert agent.log().count("lost contact with the control plane") == 1
        assert agent.log().count("contact with the control plane restored") == 1
    finally:
        agent.stop()
        cp.stop()


def test_on_lost_contact_stop_ends_the_worker_before_the_verdict(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path, monitoring(4))
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    pid = 0
    try:
        run_id, lease = hold(cp, tmp_path, **{"fleetrun/on_lost_contact": "stop"})
        pid = worker_pid(tmp_path, lease)
        # When the control plane stops answering
        cp.popen.send_signal(signal.SIGSTOP)
        # Then the agent stops the worker itself
        wait_for(lambda: not pid_alive(pid), timeout=60, what="the agent to stop the worker")
        assert "no contact with the control plane" in agent.log()
        cp.popen.send_signal(signal.SIGCONT)
        run = wait_status(cp, run_id, "FAILURE", timeout=60)
        assert not (tmp_path / f"done-{lease}").exists()
        assert run["failure_kind"] == "agent_lost"  # retried even without op-failure retries
    finally:
        cp.popen.send_signal(signal.SIGCONT)
        kill_quietly(pid)
        agent.stop()
        cp.stop()
