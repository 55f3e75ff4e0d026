"""The agent's life: drain on SIGTERM, remote drain/undrain, the one-file binary."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    REPO,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    start_process,
    wait_for,
    write_agent_config,
)

JOBS = {"monitor": FIXTURES / "monitor_jobs.py"}
FLEETRUN_AGENT = [sys.executable, "-m", "agent.cli"]


def agent_status(cp: ControlPlaneProc, name: str) -> str:
    return str(agent_field(cp, name, "status"))


def agent_field(cp: ControlPlaneProc, name: str, field: str) -> object:
    return next(a[field] for a in cp.get("/api/v1/agents")["agents"] if a["name"] == name)


def hold(cp: ControlPlaneProc, folder: Path) -> tuple[str, int]:
    run_id = cp.submit("hold", config={"dir": str(folder)})
    wait_for(lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="start")
    lease = cp.get(f"/api/v1/runs/{run_id}")["lease"]
    wait_for(lambda: (folder / f"pid-{lease}").exists(), what="the worker")
    return run_id, lease


def test_sigterm_drains_first_then_lets_the_run_finish(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS, "drain_timeout_seconds = 60")
    try:
        # Given a run in progress
        run_id, lease = hold(cp, tmp_path)
        # When the agent gets SIGTERM
        agent.popen.send_signal(signal.SIGTERM)
        # Then it is DRAINING at once, takes no new run, and lets the running one finish
        wait_for(lambda: agent_status(cp, "a1") == "DRAINING", what="DRAINING")
        waiting = cp.submit("hold", config={"dir": str(tmp_path)})
        wait_for(lambda: "no online agent" in str(cp.get("/api/v1/queue")), what="queue reason")
        (tmp_path / f"open-{lease}").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        assert agent.popen.wait(60) == 0
        assert cp.get(f"/api/v1/runs/{waiting}")["status"] == "QUEUED"
    finally:
        agent.stop()
        cp.stop()


def test_drain_timeout_stops_and_reports_the_rest(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS, "drain_timeout_seconds = 0.5")
    try:
        run_id, lease = hold(cp, tmp_path)
        agent.popen.send_signal(signal.SIGTERM)
        run = cp.wait_run(run_id)
        assert run["status"] == "FAILURE" and run["failure_kind"] == "agent_lost"
        assert "agent a1 shut down (drain timeout of 0.5 s)" in run["status_reason"]
        assert agent.popen.wait(60) == 0
        assert not (tmp_path / f"done-{lease}").exists()
    finally:
        agent.stop()
        cp.stop()


def test_remote_drain_and_undrain(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:

        def cli(*args: str) -> str:
            result = subprocess.run(
                [*FLEETRUN, "--url", cp.url, "agents", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert cli("drain", "a1").strip() == "a1 DRAINING"
        run_id = cp.submit("hold", config={"dir": str(tmp_path)})
        wait_for(lambda: "no online agent" in str(cp.get("/api/v1/queue")), what="queue reason")
        assert agent_status(cp, "a1") == "DRAINING"  # heartbeats do not undrain it
        assert cli("undrain", "a1").strip() == "a1 ONLINE"
        wait_for(lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="start")
        lease = cp.get(f"/api/v1/runs/{run_id}")["lease"]
        (tmp_path / f"open-{lease}").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        code = subprocess.run(
            [*FLEETRUN, "--url", cp.url, "agents", "drain", "nobody"],
            capture_output=True,
            text=True,
            timeout=60,
        ).returncode
        assert code == 1
    finally:
        agent.stop()
        cp.stop()


def restart_agent(cp: ControlPlaneProc, folder: Path, name: str, proc: Proc) -> Proc:
    """Stop the agent and start it again with its config; back once it has registered
    (`start_agent` would wait for ONLINE, which a drained agent must not become)."""
    proc.stop()
    config = write_agent_config(folder, cp.url, name, JOBS)
    again = start_process([*FLEETRUN, "agent", "--config", str(config)], folder / f"{name}.log")
    wait_for(lambda: f"registered as {name}" in again.log(), what=f"{name} to register again")
    return again


def started(cp: ControlPlaneProc, run_id: str) -> dict:
    def run() -> dict | None:
        found = cp.get(f"/api/v1/runs/{run_id}")
        return found if found["status"] == "STARTED" else None

    return wait_for(run, what=f"run {run_id} to start")


def test_an_operators_drain_survives_the_agents_restart(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    drained = start_agent(cp, tmp_path, "d1", JOBS)
    other = start_agent(cp, tmp_path, "w1", JOBS)
    try:
        ids = {a["name"]: a["agent_id"] for a in cp.get("/api/v1/agents")["agents"]}
        assert cp.call("POST", "/api/v1/agents/d1/drain", {})[1]["status"] == "DRAINING"
        drained = restart_agent(cp, tmp_path, "d1", drained)
        registered = agent_field(cp, "d1", "last_heartbeat")
        wait_for(
            lambda: agent_field(cp, "d1", "last_heartbeat") != registered,
            what="a heartbeat after the registration",
        )
        assert agent_status(cp, "d1") == "DRAINING"

        for _ in range(3):  # w1 takes every run, d1 none
            run = started(cp, cp.submit("hold", config={"dir": str(tmp_path)}))
            assert run["agent"] == ids["w1"]
            (tmp_path / f"open-{run['lease']}").touch()
            assert cp.wait_run(run["run_id"])["status"] == "SUCCESS"

        other.stop()  # now only the drained agent could take a run
        waiting = cp.submit("hold", config={"dir": str(tmp_path)})

        def reason() -> str | None:
            runs = cp.get("/api/v1/queue")["runs"]
            found = next((r["waiting_for"] for r in runs if r["run_id"] == waiting), None)
            return found if found and "d1 drained by an operator" in found else None

        assert "`fleetrun agents undrain d1` sends runs again" in wait_for(
            reason, what="the queue to name d1"
        )
        assert agent_status(cp, "d1") == "DRAINING"
        assert cp.call("POST", "/api/v1/agents/d1/undrain", {})[1]["status"] == "ONLINE"
        run = started(cp, waiting)
        assert run["agent"] == ids["d1"]
        (tmp_path / f"open-{run['lease']}").touch()
        assert cp.wait_run(waiting)["status"] == "SUCCESS"
    finally:
        other.stop()
        drained.stop()
        cp.stop()


BINARY = REPO / "dist" / "fleetrun-agent"
PYTHON_PLACES = [
    Path(sys.base_prefix),
    *Path("/usr/lib").glob("python3*"),
    *Path("/usr/local/lib").glob("python3*"),
]


def without_python(command: list[str]) -> list[str]:
    """Run `command` where no Python installation is visible (a private mount namespace
    with empty folders over them), when this machine allows it (root and unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return command
    empty = Path(tempfile.mkdtemp(prefix="fleetrun-no-python-"))
    mounts = "; ".join(f"mount --bind {empty} {place}" for place in PYTHON_PLACES if place.is_dir())
    hide_bins = "; ".join(
        f"mount --bind /dev/null {exe}" for exe in Path("/usr/bin").glob("python3*")
    )
    script = f"{mounts}; {hide_bins}; exec {' '.join(command)}"
    return ["unshare", "-m", "sh", "-c", script]


def test_the_one_file_binary_runs_a_job(tmp_path: Path) -> None:
    """`make test` builds dist/fleetrun-agent first (`make binary`)."""
    assert BINARY.exists(), "build the agent binary first: make binary"
    version = subprocess.run([str(BINARY), "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert version.stdout == f"fleetrun-agent {FLEETRUN_VERSION} (protocol {PROTOCOL_VERSION})\n"
    cp = start_control_plane(tmp_path)
    config = write_agent_config(
        tmp_path, cp.url, "bin", {"examples": REPO / "examples" / "demo_jobs.py"}
    )
    check = subprocess.run(
        [str(BINARY), "check-config", "--config", str(config), "--connect"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "jobs hello, etl, chatty, broken" in check.stdout
    hidden = without_python([sys.executable, "-c", "pass"])
    if hidden[0] == "unshare":  # then prove Python really is out of sight there
        assert subprocess.run(hidden, capture_output=True, timeout=60).returncode != 0
    agent = start_process(
        without_python([str(BINARY), "run", "--config", str(config)]), tmp_path / "bin.log"
    )
    try:
        wait_for(
            lambda: any(
                a["name"] == "bin" and a["code_locations"]
                for a in cp.get("/api/v1/agents")["agents"]
            ),
            what="the binary agent to register",
        )
        for job, executor in (
            ("etl", "multiprocess"),
            ("chatty", "multiprocess"),
            ("etl", "fleet"),
        ):
            run_id = cp.submit(job, config={"execution": executor})
            assert cp.wait_run(run_id)["status"] == "SUCCESS", cp.events(run_id)
        started = [e for e in cp.events(run_id) if e["type"] == "STEP_TASK_STARTED"]
        assert started and {e["data"]["agent"] for e in started} == {"bin"}
        agent.popen.send_signal(signal.SIGTERM)
        assert agent.popen.wait(60) == 0
    finally:
        agent.stop()
        cp.stop()


def test_check_config_names_every_problem_and_exits_2(tmp_path: Path) -> None:
    port_nobody_listens_on = 9  # discard: nothing answers on loopback
    config = tmp_path / "agent.toml"
    config.write_text(
        f'control_plane_url = "http://127.0.0.1:{port_nobody_listens_on}"\n'
        'token_file = "missing.token"\n'
        '[[code_locations]]\nname = "gone"\npython_file = "x.py"\nworking_directory = "nope"\n'
        f'[[code_locations]]\nname = "broken"\npython_file = "{FIXTURES / "broken_location.py"}"\n'
        '[[code_locations]]\nname = "badexe"\npython_file = "x.py"\nexecutable = "/no/python"\n'
    )
    result = subprocess.run(
        [*FLEETRUN_AGENT, "check-config", "--config", str(config), "--connect"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    for expected in (
        "code_locations gone: working_directory",
        "code_locations broken:",
        "module_that_does_not_exist",
        "code_locations badexe: executable /no/python",
        "token_file: cannot read",
        "control_plane_url: cannot reach",
    ):
        assert expected in result.stderr, result.stderr
    assert str(config) in result.stderr


def test_check_config_lists_every_problem_of_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('queue = ["a"]\nmax_concurrent_runs = "4"\nrun_launcher = "thread"\n')
    result = subprocess.run(
        [*FLEETRUN_AGENT, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: {config}: key 'queue': unknown key; did you mean queues?",
        f"config error: {config}: key 'max_concurrent_runs': expected an integer, got a string",
        f"config error: {config}: key 'run_launcher': must be 'forkserver', 'subprocess' or "
        "'docker', not 'thread'",
    ]
