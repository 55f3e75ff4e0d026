"""The walking skeleton end to end: a real control plane, real agents, real run workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_process,
    wait_for,
    write_agent_config,
)


def steps(events: list[dict], event_type: str) -> list[str]:
    return [e["step"] for e in events if e["type"] == event_type]


def test_example_jobs_succeed_and_fail(control_plane: ControlPlaneProc, agent: Proc) -> None:
    ids = {job: control_plane.submit(job) for job in ["hello", "etl", "chatty", "broken"]}
    runs = {job: control_plane.wait_run(run_id) for job, run_id in ids.items()}
    assert {job: r["status"] for job, r in runs.items()} == {
        "hello": "SUCCESS",
        "etl": "SUCCESS",
        "chatty": "SUCCESS",
        "broken": "FAILURE",
    }
    assert all(r["agent"] and r["start_time"] and r["end_time"] for r in runs.values())

    etl = control_plane.events(ids["etl"])
    assert steps(etl, "STEP_SUCCESS") == ["extract", "transform", "load"]
    status_events = [e["type"] for e in etl if e["type"].startswith("RUN_")]
    assert status_events == ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "RUN_SUCCESS"]
    assert [e["seq"] for e in etl] == list(range(1, len(etl) + 1))
    logs = [e["message"] for e in etl if e["type"] == "LOG"]
    assert "loaded 4 rows, total 100" in logs  # values flowed extract -> transform -> load

    broken = control_plane.events(ids["broken"])
    (failure,) = [e for e in broken if e["type"] == "STEP_FAILURE"]
    assert failure["step"] == "validate" and failure["data"]["error_type"] == "ValueError"
    assert "expected at least one row, got 0" in failure["data"]["message"]
    assert "in validate" in failure["data"]["traceback"]
    assert steps(broken, "STEP_SKIPPED") == ["publish"]
    assert runs["broken"]["status_reason"] == "steps failed: validate"

    chatty = control_plane.get(f"/api/v1/runs/{ids['chatty']}/logs?step=chatter")["logs"]
    out = "".join(c["text"] for c in chatty if c["stream"] == "stdout")
    err = "".join(c["text"] for c in chatty if c["stream"] == "stderr")
    assert out == "stdout line 0\nstdout line 1\nstdout line 2\n"
    assert err == "stderr line 0\nstderr line 1\nstderr line 2\n"
    levels = [e["data"]["level"] for e in control_plane.events(ids["chatty"]) if e["type"] == "LOG"]
    assert levels == ["INFO"] * 3


def test_context_config_tags_and_locations(control_plane: ControlPlaneProc, tmp_path: Path) -> None:
    extra = (
        '\n[[code_locations]]\nname = "by_module"\nmodule = "context_jobs"\n'
        f'working_directory = "{FIXTURES}"\nexecutable = "{sys.executable}"\n'
    )
    proc = start_agent(
        control_plane, tmp_path, "ctx-agent", {"by_file": FIXTURES / "context_jobs.py"}, extra
    )
    try:
        jobs = control_plane.get("/api/v1/jobs")["jobs"]
        assert {(j["name"], j["location"]) for j in jobs} >= {
            ("inspect_context", "by_file"),
            ("inspect_context", "by_module"),
        }
        fan_in = next(j for j in jobs if j["name"] == "fan_in")
        assert fan_in["ops"][-1] == {
            "name": "combine",
            "upstream": ["first", "second"],
            "tags": {},
            "retry_policy": None,
            "pool": None,
        }
        # working_directory defaults to the agent config's folder (tmp_path) for by_file
        for location, cwd in (("by_file", tmp_path), ("by_module", FIXTURES)):
            out = tmp_path / f"{location}.json"
            run_id = control_plane.submit(
                "inspect_context",
                location=location,
                tags={"team": "data"},
                config={"out": str(out), "n": [1, 2]},
            )
            run = control_plane.wait_run(run_id)
            assert run["status"] == "SUCCESS", control_plane.events(run_id)
            seen = json.loads(out.read_text())
            assert seen["run_id"] == run_id and seen["job_name"] == "inspect_context"
            assert seen["tags"] == {"team": "data", "fleetrun/job": "inspect_context"}
            assert seen["run_config"] == {"out": str(out), "n": [1, 2]}
            assert (seen["step"], seen["retry_number"]) == ("record_context", 0)
            assert seen["lease_env"] and int(seen["lease_env"]) > 0
            assert seen["lease"] == int(seen["lease_env"]) == run["lease"]
            assert seen["cwd"] == str(cwd)
        out = tmp_path / "fan_in.json"
        run_id = control_plane.submit("fan_in", location="by_file", config={"out": str(out)})
        assert control_plane.wait_run(run_id)["status"] == "SUCCESS"
        assert json.loads(out.read_text()) == {"a": 2, "b": 5}
    finally:
        proc.stop()


@pytest.mark.parametrize("launcher", ["forkserver", "subprocess"])
def test_worker_crash_fails_the_run_not_the_agent(
    control_plane: ControlPlaneProc, tmp_path: Path, launcher: str
) -> None:
    proc = start_agent(
        control_plane,
        tmp_path,
        "crash-agent",
        {"ctx": FIXTURES / "context_jobs.py"},
        f'run_launcher = "{launcher}"',
    )
    try:
        run_id = control_plane.submit("crashing")
        run = control_plane.wait_run(run_id)
        assert run["status"] == "FAILURE"
        assert "exited with code 3 without reporting a result" in run["status_reason"]
        logs = control_plane.get(f"/api/v1/runs/{run_id}/logs?step=crash")["logs"]
        assert "about to crash" in "".join(c["text"] for c in logs)
        out = tmp_path / "after.json"
        again = control_plane.submit("inspect_context", config={"out": str(out)})
        assert control_plane.wait_run(again)["status"] == "SUCCESS"
        assert proc.popen.poll() is None
    finally:
        proc.stop()


def test_broken_location_is_reported_and_the_rest_serves(
    control_plane: ControlPlaneProc, tmp_path: Path
) -> None:
    locations = {"good": FIXTURES / "context_jobs.py", "bad": FIXTURES / "broken_location.py"}
    proc = start_agent(control_plane, tmp_path, "mixed-agent", locations)
    try:
        errors = control_plane.get("/api/v1/jobs")["location_errors"]
        assert [e["location"] for e in errors] == ["bad"]
        assert "module_that_does_not_exist" in errors[0]["error"]
        (agent,) = control_plane.get("/api/v1/agents")["agents"]
        assert agent["status"] == "ONLINE" and agent["last_heartbeat"]
        out = tmp_path / "ok.json"
        run_id = control_plane.submit("inspect_context", config={"out": str(out)})
        assert control_plane.wait_run(run_id)["status"] == "SUCCESS"
    finally:
        proc.stop()


def test_bad_config_files_exit_2_naming_file_and_key(tmp_path: Path) -> None:
    cp_config = tmp_path / "control-plane.toml"
    cp_config.write_text('[server]\nport = "eighty"\n')
    result = subprocess.run(
        [*FLEETRUN, "serve", "--config", str(cp_config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert str(cp_config) in result.stderr and "'server.port'" in result.stderr

    agent_config = write_agent_config(tmp_path, "http://127.0.0.1:9", "a", {}, "colour = 1")
    result = subprocess.run(
        [*FLEETRUN, "agent", "--config", str(agent_config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(agent_config) in result.stderr and "'colour'" in result.stderr


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLEETRUN, "--url", url, *args], capture_output=True, text=True, timeout=120
    )


def test_cli(control_plane: ControlPlaneProc, agent: Proc) -> None:
    url = control_plane.url
    ok = cli(url, "runs", "submit", "etl", "--tag", "team=data", "--wait")
    assert ok.returncode == 0, ok.stderr
    assert "SUCCESS" in ok.stdout and "STARTED" in ok.stderr
    failed = cli(url, "--json", "runs", "submit", "broken", "--wait")
    assert failed.returncode == 1
    broken_id = json.loads(failed.stdout)["run_id"]

    listed = json.loads(cli(url, "--json", "runs", "list").stdout)["runs"]
    assert [r["job"] for r in listed] == ["broken", "etl"]
    table = cli(url, "runs", "list", "--status", "SUCCESS", "--tag", "team=data").stdout
    assert "etl" in table and "broken" not in table and "RUN ID" in table

    show = cli(url, "runs", "show", broken_id)
    assert show.returncode == 0 and "STEP_FAILURE" in show.stdout and "validate" in show.stdout
    chatty = cli(url, "runs", "submit", "chatty", "--wait")
    run_id = chatty.stdout.split()[0]
    logs = cli(url, "runs", "logs", run_id)
    assert "[chatter] stdout line 2" in logs.stdout and "[chatter] stderr line 0" in logs.stderr
    followed = cli(url, "runs", "logs", run_id, "--follow", "--step", "chatter")
    assert followed.returncode == 0 and "stdout line 1" in followed.stdout

    agents = cli(url, "agents", "list")
    assert "agent-1" in agents.stdout and "ONLINE" in agents.stdout
    jobs = json.loads(cli(url, "--json", "jobs", "list").stdout)
    assert {j["name"] for j in jobs["jobs"]} == {"hello", "etl", "chatty", "broken"}

    missing = cli(url, "runs", "show", "no-such-run")
    assert missing.returncode == 1 and "no run with id" in missing.stderr
    unreachable = cli("http://127.0.0.1:9", "runs", "list")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_demo_runs_the_examples(tmp_path: Path) -> None:
    proc = start_process(
        [*FLEETRUN, "demo", "--port", "0", "--exit-when-done"], tmp_path / "demo.log"
    )
    try:
        assert proc.popen.wait(180) == 0, proc.log()
    finally:
        proc.stop()
    out = proc.log()
    assert "finished: hello=SUCCESS, etl=SUCCESS, chatty=SUCCESS, broken=FAILURE" in out
    assert "/api/v1/runs" in out and "STARTED" in out


def test_agent_restart_keeps_its_identity(control_plane: ControlPlaneProc, tmp_path: Path) -> None:
    first = start_agent(control_plane, tmp_path, "restarting")
    (before,) = control_plane.get("/api/v1/agents")["agents"]
    assert first.stop() == 0
    second = start_agent(control_plane, tmp_path, "restarting")
    try:
        (after,) = control_plane.get("/api/v1/agents")["agents"]
        assert after["agent_id"] == before["agent_id"]
        run_id = control_plane.submit("hello")
        assert control_plane.wait_run(run_id)["status"] == "SUCCESS"
    finally:
        second.stop()


def test_queued_run_waits_for_an_agent(control_plane: ControlPlaneProc, tmp_path: Path) -> None:
    proc = start_agent(control_plane, tmp_path, "first")
    proc.stop()
    # The location is known (registered) but its only agent is gone: the run stays QUEUED
    # until an agent that hosts the location polls again.
    run_id = control_plane.submit("hello")
    assert control_plane.get(f"/api/v1/runs/{run_id}")["status"] in ("QUEUED", "STARTING")
    again = start_agent(control_plane, tmp_path, "first")
    try:
        assert control_plane.wait_run(run_id)["status"] == "SUCCESS"
    finally:
        again.stop()
    assert os.path.exists(control_plane.log_path)
    wait_for(lambda: again.popen.poll() is not None, what="agent exit")
