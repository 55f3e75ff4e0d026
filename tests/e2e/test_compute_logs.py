"""Compute logs kept in files (`[compute_logs] kind = "filesystem"`): the logs API and
`fleetrun runs logs --follow` serve them as they serve logs kept in the database (and a
deleted run's files go with it), and a control plane killed with SIGKILL mid-stream
serves every line once, in order, after its restart."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    free_port,
    start_agent,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.e2e
FILESYSTEM = '[compute_logs]\nkind = "filesystem"\npath = "logs"\n'
COUNTING = {"adoption": FIXTURES / "adoption_jobs.py"}


def all_logs(cp: ControlPlaneProc, run_id: str, page_after: int = 0) -> list[dict]:
    """Every chunk of a run, paged with after=ID one request at a time."""
    chunks: list[dict] = []
    after = page_after
    while page := cp.get(f"/api/v1/runs/{run_id}/logs?after={after}")["logs"]:
        chunks += page
        after = page[-1]["id"]
    return chunks


def stream_lines(chunks: list[dict], stream: str) -> list[str]:
    return "".join(c["text"] for c in chunks if c["stream"] == stream).splitlines()


def follow_logs(url: str, run_id: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FLEETRUN_URL": url}
    return subprocess.Popen(
        [*FLEETRUN, "runs", "logs", run_id, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_the_logs_api_and_follow_serve_logs_kept_in_files(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path, FILESYSTEM)
    agent = start_agent(cp, tmp_path)
    try:
        run_id = cp.submit("chatty")
        follower = follow_logs(cp.url, run_id)
        out, err = follower.communicate(timeout=90)
        assert follower.returncode == 0, err
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        assert out.splitlines() == [f"[chatter] stdout line {i}" for i in range(3)]
        assert err.splitlines() == [f"[chatter] stderr line {i}" for i in range(3)]
        whole = cp.get(f"/api/v1/runs/{run_id}/logs")["logs"]
        assert all_logs(cp, run_id) == whole
        assert [c["id"] for c in whole] == sorted({c["id"] for c in whole})
        assert stream_lines(whole, "stdout") == [f"stdout line {i}" for i in range(3)]
        by_step = cp.get(f"/api/v1/runs/{run_id}/logs?step=chatter")["logs"]
        assert by_step == [c for c in whole if c["step"] == "chatter"]
        later = cp.get(f"/api/v1/runs/{run_id}/logs?after={whole[2]['id']}&wait=1")["logs"]
        assert later == whole[3:]
        text = (tmp_path / "logs" / run_id / "step-chatter.log").read_text()
        assert text == "".join(c["text"] for c in by_step)
        # Deleting the run removes its files with its rows
        assert cp.call("DELETE", f"/api/v1/runs/{run_id}")[0] == 200
        assert not (tmp_path / "logs" / run_id).exists()
    finally:
        agent.stop()
        cp.stop()


def test_every_line_once_in_order_across_a_control_plane_kill(tmp_path: Path) -> None:
    port = free_port()
    cp = start_control_plane(tmp_path, FILESYSTEM, port=port)
    agent = start_agent(cp, tmp_path, "agent-1", COUNTING)
    try:
        run_id = cp.submit("counting", location="adoption", config={"dir": str(tmp_path)})
        wait_for(lambda: len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"]) >= 20, what="lines")
        cp.popen.kill()  # SIGKILL, mid-stream: the run keeps printing meanwhile
        cp.popen.wait(30)
        cp = start_control_plane(tmp_path, FILESYSTEM, port=port)
        seen = len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"])
        wait_for(
            lambda: len(cp.get(f"/api/v1/runs/{run_id}/logs")["logs"]) >= seen + 20,
            what="lines after the restart",
        )
        (tmp_path / "open").touch()
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        follower = follow_logs(cp.url, run_id)
        out, err = follower.communicate(timeout=90)
        assert follower.returncode == 0, err
        served = stream_lines(all_logs(cp, run_id), "stdout")
    finally:
        agent.stop()
        cp.stop()
    printed = [line.removeprefix("[count_lines] ") for line in out.splitlines()]
    last = len(printed) - 1
    assert last > 40
    assert printed == [f"line {i}" for i in range(last)] + [f"line {last} (last)"]
    assert served == printed
