"""Executors end to end: live compute logs, the output store, re-execution across agents."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    http,
    start_agent,
    start_control_plane,
    wait_for,
)

JOBS = {"ex": FIXTURES / "executor_jobs.py"}
SOURCES = ["from print", "from logging", "from a subprocess", "from fd 1"]


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def step_logs(cp: ControlPlaneProc, run_id: str, step: str) -> str:
    chunks = cp.get(f"/api/v1/runs/{run_id}/logs?step={step}")["logs"]
    return "".join(c["text"] for c in chunks)


def by_type(cp: ControlPlaneProc, run_id: str, event_type: str) -> list[str]:
    return [e["step"] for e in cp.events(run_id) if e["type"] == event_type]


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_step_logs_from_four_sources_stream_while_the_step_runs(
    tmp_path: Path, executor: str
) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        run_id = cp.submit("chatty_step", config={"dir": str(tmp_path), "execution": executor})
        follow = subprocess.Popen(
            [
                *FLEETRUN,
                "--url",
                cp.url,
                "runs",
                "logs",
                run_id,
                "--step",
                "four_sources",
                "--follow",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # While the step still waits for its gate, all four sources are already stored
        wait_for(
            lambda: all(s in step_logs(cp, run_id, "four_sources") for s in SOURCES),
            what="output from print, logging, a subprocess and fd 1",
        )
        assert cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED"
        (tmp_path / "gate").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        out, err = follow.communicate(timeout=60)  # --follow ends when the run ends
        assert follow.returncode == 0
        for line in [*SOURCES, "after the gate"]:
            assert line in out + err
        start = next(e for e in cp.events(run_id) if e["type"] == "RUN_START")
        assert start["data"]["executor"] == executor
        # The launch's own stamps (bench/hops.py reads them), in the order they happen
        data = start["data"]
        assert data["launch_received_time"] <= data["worker_spawned_time"]
        assert data["launch_received_time"] <= data["worker_began_time"] <= ts(start["time"])
    finally:
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_an_aliased_invocation_with_its_own_retry_policy_is_retried_alone(
    tmp_path: Path, executor: str
) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        # Given a job invoking one op twice: as `retried` with max_retries=2, and plainly
        run_id = cp.submit(
            "invocation_retries", config={"dir": str(tmp_path), "execution": executor}
        )
        # When both invocations fail their first two attempts
        assert cp.wait_run(run_id)["status"] == "FAILURE"
        # Then the aliased step was retried twice and succeeded; the plain one failed once
        events = cp.events(run_id)
        steps = [(e["type"], e["step"]) for e in events if e["type"].startswith("STEP_")]
        assert [s for t, s in steps if t == "STEP_UP_FOR_RETRY"] == ["retried", "retried"]
        assert [s for t, s in steps if t == "STEP_RESTARTED"] == ["retried", "retried"]
        assert [s for t, s in steps if t == "STEP_SUCCESS"] == ["retried"]
        assert [s for t, s in steps if t == "STEP_FAILURE"] == ["fails_twice"]
        assert [s for t, s in steps if t == "STEP_START"] in (
            ["retried", "fails_twice"],
            ["fails_twice", "retried"],
        )
        (failure,) = [e for e in events if e["type"] == "STEP_FAILURE"]
        assert failure["data"]["message"] == "attempt 1 of fails_twice fails"
        jobs = {j["name"]: j for j in cp.get("/api/v1/jobs")["jobs"]}
        assert [o["name"] for o in jobs["invocation_retries"]["ops"]] == ["retried", "fails_twice"]
    finally:
        agent.stop()
        cp.stop()


def test_from_failure_reexecution_runs_on_another_agent_and_reuses_outputs(
    tmp_path: Path,
) -> None:
    cp = start_control_plane(tmp_path, "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n")
    a1 = start_agent(cp, tmp_path, "a1", JOBS)
    a2 = None
    try:
        # Given a run that failed at `flaky` on a1, after `produce` succeeded
        parent = cp.submit("pipeline", config={"dir": str(tmp_path)})
        assert cp.wait_run(parent)["status"] == "FAILURE"
        assert by_type(cp, parent, "STEP_SKIPPED") == ["consume"]
        code, body = http("POST", f"{cp.url}/api/v1/runs/{parent}/reexecute", {"strategy": "X"})
        assert code == 422
        # When a1 is gone, the cause is fixed and the run is re-executed FROM_FAILURE on a2
        a1.stop()
        wait_for(
            lambda: [a["status"] for a in cp.get("/api/v1/agents")["agents"]] == ["OFFLINE"],
            what="a1 to be OFFLINE",
        )
        a2 = start_agent(cp, tmp_path, "a2", JOBS)
        (tmp_path / "fixed").touch()
        result = subprocess.run(
            [*FLEETRUN, "--url", cp.url, "runs", "reexecute", parent],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        child = result.stdout.strip()
        run = cp.wait_run(child)
        # Then only the failed step and its downstream ran; produce's output came from a1's run
        assert run["status"] == "SUCCESS", [(e["type"], e["message"]) for e in cp.events(child)]
        parent_run = cp.get(f"/api/v1/runs/{parent}")
        assert run["agent"] != parent_run["agent"]
        assert sorted(by_type(cp, child, "STEP_REUSED")) == ["independent", "produce"]
        assert sorted(by_type(cp, child, "STEP_SUCCESS")) == ["consume", "flaky"]
        assert (tmp_path / "count-produce").read_text() == "x"
        assert (tmp_path / "consumed").read_text() == "6"
        assert run["tags"]["fleetrun/parent_run_id"] == parent
        assert run["reuse_outputs"] == {"produce": parent, "independent": parent}
        chain = run["chain"]
        assert [(c["run_id"], c["kind"]) for c in chain] == [
            (parent, "original"),
            (child, "reexecution"),
        ]
        # ALL_STEPS runs everything again; a successful run cannot be re-executed
        code, body = http("POST", f"{cp.url}/api/v1/runs/{child}/reexecute", {})
        assert (code, body["error"]["code"]) == (409, "not_reexecutable")
        code, body = http(
            "POST", f"{cp.url}/api/v1/runs/{parent}/reexecute", {"strategy": "ALL_STEPS"}
        )
        assert code == 201 and cp.wait_run(body["run_id"])["status"] == "SUCCESS"
        assert (tmp_path / "count-produce").read_text() == "xx"
        assert by_type(cp, body["run_id"], "STEP_REUSED") == []
    finally:
        a1.stop()
        if a2 is not None:
            a2.stop()
        cp.stop()


def test_filesystem_output_store_and_the_output_cap(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    store = tmp_path / "shared-store"
    extra = f'[output_store]\nkind = "filesystem"\npath = "{store}"\nmax_output_bytes = 1000\n'
    agent = start_agent(cp, tmp_path, "a1", JOBS, extra)
    try:
        parent = cp.submit("pipeline", config={"dir": str(tmp_path), "execution": "multiprocess"})
        assert cp.wait_run(parent)["status"] == "FAILURE"
        assert (store / parent / "produce.pickle").exists()
        (tmp_path / "fixed").touch()
        code, body = http("POST", f"{cp.url}/api/v1/runs/{parent}/reexecute", {})
        assert code == 201 and cp.wait_run(body["run_id"])["status"] == "SUCCESS"
        assert (tmp_path / "count-produce").read_text() == "x"
        big = cp.submit("big_output", config={"dir": str(tmp_path)})
        assert cp.wait_run(big)["status"] == "FAILURE"
        (failure,) = [e for e in cp.events(big) if e["type"] == "STEP_FAILURE"]
        assert "over the output store's limit of 1000 bytes" in failure["message"]
    finally:
        agent.stop()
        cp.stop()


def test_a_large_output_is_uploaded_and_downloaded_for_reuse(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        parent = cp.submit("medium_pipeline", config={"dir": str(tmp_path)})
        assert cp.wait_run(parent)["status"] == "FAILURE"
        (tmp_path / "fixed").touch()
        code, body = http("POST", f"{cp.url}/api/v1/runs/{parent}/reexecute", {})
        assert code == 201 and cp.wait_run(body["run_id"])["status"] == "SUCCESS"
        assert by_type(cp, body["run_id"], "STEP_REUSED") == ["medium"]
        assert (tmp_path / "count-medium").read_text() == "x"
        assert (tmp_path / "measured").read_text() == "300000"
    finally:
        agent.stop()
        cp.stop()


def test_a_process_left_running_by_an_op_does_not_hold_the_run_or_its_slot(
    tmp_path: Path,
) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS, "max_concurrent_runs = 1")
    daemon = 0
    try:
        first = cp.submit("daemon_job", config={"dir": str(tmp_path)})
        assert cp.wait_run(first)["status"] == "SUCCESS"
        daemon = int((tmp_path / "daemon-pid").read_text())
        assert "started a daemon" in step_logs(cp, first, "leaves_a_daemon")
        (report,) = [e for e in cp.events(first) if e["type"] == "ENGINE_EVENT"]
        assert [p["pid"] for p in report["data"]["killed"]] == [daemon]  # ended with the run
        second = cp.submit("pipeline", config={"dir": str(tmp_path)})  # needs the one slot
        assert cp.wait_run(second)["status"] == "FAILURE"  # it ran (and failed at `flaky`)
    finally:
        if daemon:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)
        agent.stop()
        cp.stop()
