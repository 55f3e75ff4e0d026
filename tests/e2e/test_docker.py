"""The docker run launcher and executor against a real Docker daemon of the tests' own
(tests/dockerd.py: no bridge, no iptables, a locally built image, nothing pulled), with a
real control plane and real agents. After every test no container of ours is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    wait_for,
    write_agent_config,
)
from tests.dockerd import IMAGE, Dockerd, build_worker_image, start_dockerd

pytestmark = pytest.mark.e2e
JOBS = {"docker_jobs": FIXTURES / "docker_jobs.py"}


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:  # the daemon goes whatever fails from here
        build_worker_image(daemon)
        yield daemon
    finally:
        try:
            daemon.remove_all()
        finally:
            daemon.stop()


@pytest.fixture(autouse=True)
def no_leaked_containers(dockerd: Dockerd) -> Iterator[None]:
    """Every container an agent started is gone once its test is over."""
    yield
    try:
        wait_for(lambda: not dockerd.containers(), timeout=30, what="containers to be removed")
    except AssertionError:
        left = dockerd.remove_all()
        pytest.fail(f"containers left behind: {left}")


def docker_config(daemon: Dockerd, extra: str = "") -> str:
    return (
        'run_launcher = "docker"\n'
        "heartbeat_interval_seconds = 1\n"
        # a run's fleetrun/cpus and memory_mb are placed, then its container's limits
        "[resources]\ncpus = 2\nmemory_mb = 4096\n"
        f'[docker]\nimage = "{IMAGE}"\nsocket = "{daemon.url}"\nnetwork = "none"\n'
        'pull = "never"\nstop_grace_seconds = 3\n' + extra
    )


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    control_plane = start_control_plane(tmp_path)
    yield control_plane
    control_plane.stop()


@pytest.fixture
def docker_agent(cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd) -> Iterator[Proc]:
    agent = start_agent(cp, tmp_path, "dock-1", JOBS, docker_config(dockerd))
    yield agent
    agent.stop()


def logs(cp: ControlPlaneProc, run_id: str) -> str:
    return "".join(c["text"] for c in cp.get(f"/api/v1/runs/{run_id}/logs")["logs"])


def started(cp: ControlPlaneProc, run_id: str, text: str = "line 2") -> dict:
    run = wait_for(
        lambda: (r := cp.get(f"/api/v1/runs/{run_id}"))["status"] == "STARTED" and r,
        what="the run to start",
    )
    wait_for(lambda: text in logs(cp, run_id), what=f"{text!r} in the run's output")
    return run


def test_run_in_container_succeeds_with_logs_and_its_image(
    cp: ControlPlaneProc, docker_agent: Proc, dockerd: Dockerd
) -> None:
    run_id = cp.submit("hello", tags={"fleetrun/cpus": "0.5", "fleetrun/memory_mb": "256"})
    run = cp.wait_run(run_id)
    assert run["status"] == "SUCCESS", (run, docker_agent.log())
    text = logs(cp, run_id)
    assert "hello from a container: True" in text
    assert "upstream said {'inside': True" in text
    events = cp.events(run_id)
    container = next(e for e in events if e["data"].get("container_id"))
    assert container["data"]["image"] == IMAGE
    assert container["data"]["cpus"] == 0.5 and container["data"]["memory_mb"] == 256
    assert "256 MB memory" in container["message"], container
    assert any(e["type"] == "LOG" and "in a container: True" in e["message"] for e in events)
    agents = cp.get("/api/v1/agents")["agents"]
    assert [a["launcher"] for a in agents] == ["docker"]
    with urllib.request.urlopen(f"{cp.url}/ui/runs/{run_id}", timeout=30) as page:
        html = page.read().decode()
    assert IMAGE in html and "0.5 CPUs, 256 MB memory, network none" in html
    with urllib.request.urlopen(f"{cp.url}/ui/agents", timeout=30) as page:
        assert "<td>docker</td>" in page.read().decode()
    listed = subprocess.run(
        [*FLEETRUN, "agents", "list", "--url", cp.url], capture_output=True, text=True, timeout=60
    )
    assert "LAUNCHER" in listed.stdout and "docker" in listed.stdout, listed


def test_cancel_stops_the_container(cp: ControlPlaneProc, docker_agent: Proc) -> None:
    run_id = cp.submit("lines", config={"lines": 600})
    started(cp, run_id)
    begun = time.monotonic()
    assert cp.call("POST", f"/api/v1/runs/{run_id}/cancel")[0] == 200
    run = cp.wait_run(run_id, timeout=60)
    assert run["status"] == "CANCELED", run
    assert time.monotonic() - begun < 30
    assert "(last)" not in logs(cp, run_id)


def test_max_runtime_stops_the_container(cp: ControlPlaneProc, docker_agent: Proc) -> None:
    run_id = cp.submit("lines", config={"lines": 600}, tags={"fleetrun/max_runtime": "2"})
    run = cp.wait_run(run_id, timeout=60)
    assert run["status"] == "FAILURE", run
    assert "max runtime" in run["status_reason"], run
    assert "(last)" not in logs(cp, run_id)


def test_memory_limit_exceeded_fails_naming_the_limit(
    cp: ControlPlaneProc, docker_agent: Proc
) -> None:
    run_id = cp.submit("hog", tags={"fleetrun/memory_mb": "64"})
    run = cp.wait_run(run_id)
    assert run["status"] == "FAILURE", run
    assert "memory limit of 64 MB" in run["status_reason"], run
    failure = next(e for e in cp.events(run_id) if e["type"] == "RUN_FAILURE")
    assert failure["data"]["oom_killed"] is True and failure["data"]["memory_mb"] == 64


def test_missing_image_fails_at_once(cp: ControlPlaneProc, docker_agent: Proc) -> None:
    begun = time.monotonic()
    run_id = cp.submit("hello", tags={"fleetrun/image": "fleetrun-absent:404"})
    run = cp.wait_run(run_id, timeout=30)
    assert run["status"] == "FAILURE", run
    assert "fleetrun-absent:404" in run["status_reason"], run
    assert "not on this host" in run["status_reason"], run
    assert time.monotonic() - begun < 15


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("fleetrun/image", "Not An Image"),
        ("fleetrun/cpus", "0"),
        ("fleetrun/cpus", "many"),
        ("fleetrun/memory_mb", "1"),
        ("fleetrun/memory_mb", "1.5"),
    ],
)
def test_bad_resource_tags_are_refused_naming_the_tag(
    cp: ControlPlaneProc, docker_agent: Proc, tag: str, value: str
) -> None:
    status, body = cp.call("POST", "/api/v1/runs", {"job": "hello", "tags": {tag: value}})
    assert status == 422, body
    assert tag in body["error"]["message"], body


def test_agent_killed_mid_run_adopts_its_container(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    agent = start_agent(cp, tmp_path, "dock-1", JOBS, docker_config(dockerd))
    try:
        run_id = cp.submit("lines", config={"lines": 40, "interval": 0.15})
        started(cp, run_id)
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait(10)
        assert len(dockerd.containers()) == 1  # the run goes on without its agent
        agent = start_agent(cp, tmp_path, "dock-1", JOBS, docker_config(dockerd))
        run = cp.wait_run(run_id)
        assert run["status"] == "SUCCESS", (run, agent.log())
        assert "adopting the worker of run" in agent.log()
        numbers = [int(n) for n in re.findall(r"^line (\d+)", logs(cp, run_id), re.M)]
        assert numbers == list(range(40)), numbers
        types = [e["type"] for e in cp.events(run_id)]
        assert types.count("RUN_START") == 1 and types.count("RUN_SUCCESS") == 1, types
    finally:
        agent.stop()


def test_a_stray_container_is_removed_when_the_agent_starts(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    """A container of this agent that no channel holds (it was killed between creating
    the container and recording it) is not left running."""
    dockerd.cli(
        "create",
        "--label",
        "fleetrun.agent=dock-1",
        "--label",
        "fleetrun.lease=999",
        "--network",
        "none",
        "--name",
        "fleetrun-stray",
        IMAGE,
        "python3",
        "-c",
        "pass",
    )
    agent = start_agent(cp, tmp_path, "dock-1", JOBS, docker_config(dockerd))
    try:
        wait_for(lambda: not dockerd.containers(), timeout=30, what="the stray to go")
        assert "removed container fleetrun-stray" in agent.log()
    finally:
        agent.stop()


def test_docker_unavailable_is_said_and_runs_fail_fast(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    config = docker_config(dockerd).replace(dockerd.url, f"unix://{tmp_path}/no-docker.sock")
    agent = start_agent(cp, tmp_path, "dock-2", JOBS, config)
    try:
        assert "Docker does not answer" in agent.log()
        run = cp.wait_run(cp.submit("hello"), timeout=30)
        assert run["status"] == "FAILURE", run
        assert "Docker does not answer" in run["status_reason"], run
        assert agent.popen.poll() is None
    finally:
        agent.stop()


def test_check_config_connect_checks_the_socket_and_image(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    good = write_agent_config(tmp_path, cp.url, "good", JOBS, docker_config(dockerd))
    done = subprocess.run(
        [*FLEETRUN[:-1], "agent.cli", "check-config", "--config", str(good), "--connect"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "docker: Docker" in done.stdout and IMAGE in done.stdout, done.stdout
    bad = docker_config(dockerd).replace(IMAGE, "fleetrun-absent:1")
    bad = bad.replace(dockerd.url, f"unix://{tmp_path}/none.sock")
    path = write_agent_config(tmp_path, cp.url, "bad", JOBS, bad)
    done = subprocess.run(
        [*FLEETRUN[:-1], "agent.cli", "check-config", "--config", str(path), "--connect"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "docker.socket" in done.stderr and "does not answer" in done.stderr, done.stderr


def test_docker_executor_runs_each_step_in_its_own_container(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    """Step containers from a run worker on the host (forkserver launcher)."""
    extra = (
        f'[docker]\nimage = "{IMAGE}"\nsocket = "{dockerd.url}"\nnetwork = "none"\npull = "never"\n'
    )
    agent = start_agent(cp, tmp_path, "proc-1", JOBS, extra)
    try:
        run_id = cp.submit("stepwise")
        run = cp.wait_run(run_id)
        assert run["status"] == "SUCCESS", (run, agent.log())
        events = cp.events(run_id)
        types = [(e["type"], e["step"]) for e in events]
        assert ("STEP_UP_FOR_RETRY", "flaky") in types and ("STEP_SUCCESS", "last") in types
        text = logs(cp, run_id)
        assert "first step in a container: True" in text
        assert "flaky attempt 0" in text and "flaky attempt 1" in text
        assert "failing on purpose" in text and "last got 42" in text
        flaky_logs = cp.get(f"/api/v1/runs/{run_id}/logs?step=flaky")["logs"]
        assert "flaky attempt 1" in "".join(c["text"] for c in flaky_logs)
    finally:
        agent.stop()


def test_step_containers_of_a_killed_run_worker_are_removed(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    extra = docker_config(dockerd).replace('run_launcher = "docker"\n', "")
    agent = start_agent(cp, tmp_path, "proc-2", JOBS, extra)
    try:
        run_id = cp.submit("slow_step")
        started(cp, run_id, "napping")
        assert len(dockerd.containers()) == 1
        start = next(e for e in cp.events(run_id) if e["type"] == "RUN_START")
        os.kill(start["data"]["pid"], signal.SIGKILL)
        run = cp.wait_run(run_id, timeout=60)
        assert run["status"] == "FAILURE", run
        wait_for(lambda: not dockerd.containers(), timeout=30, what="the step container to go")
        notes = [e["message"] for e in cp.events(run_id) if e["type"] == "ENGINE_EVENT"]
        assert any("removed 1 step container(s)" in note for note in notes), notes
    finally:
        agent.stop()


def test_docker_executor_inside_the_docker_launcher(
    cp: ControlPlaneProc, tmp_path: Path, dockerd: Dockerd
) -> None:
    """The run worker's container is given the Docker socket to start its steps'."""
    mount = f'mounts = ["{dockerd.socket_path}:{dockerd.socket_path}"]\n'
    agent = start_agent(cp, tmp_path, "dock-3", JOBS, docker_config(dockerd, mount))
    try:
        run = cp.wait_run(cp.submit("stepwise"))
        assert run["status"] == "SUCCESS", (run, agent.log())
    finally:
        agent.stop()
