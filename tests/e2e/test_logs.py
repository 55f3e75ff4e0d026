"""Log lines of both processes: `--log-format json` gives one JSON object per line, and
every line about a run names the run and the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, start_agent, start_control_plane, wait_for

pytestmark = pytest.mark.e2e
MONITOR = {"monitor": FIXTURES / "monitor_jobs.py"}


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def test_json_logs_name_the_run_and_the_agent(tmp_path: Path) -> None:
    json_flag = ("--log-format", "json")
    cp = start_control_plane(
        tmp_path, "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n"
        "[run_retries]\nmax_retries = 1\n", extra_args=json_flag,
    )  # fmt: skip
    agent = start_agent(cp, tmp_path, "agent-1", MONITOR, extra_args=json_flag)
    try:
        # a run that crashes its worker once: the agent logs it, the control plane retries
        run_id = cp.submit("fail_once", config={"dir": str(tmp_path)})
        run = cp.wait_run(run_id)
        retry = wait_for(lambda: [r for r in cp.get("/api/v1/runs")["runs"]
                                  if r["parent_run_id"] == run_id], what="the retry")  # fmt: skip
        assert cp.wait_run(retry[0]["run_id"])["status"] == "SUCCESS"
        assert run["status"] == "FAILURE"
    finally:
        agent.stop()
        cp.stop()
    agent_lines = json_lines(agent.log_path)
    cp_lines = json_lines(cp.log_path)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in agent_lines)
    # every agent line names the agent; every line that mentions a run carries its id
    assert all(line["agent"] == "agent-1" for line in agent_lines)
    for line in agent_lines + cp_lines:
        mentioned = {rid for rid in (run_id, retry[0]["run_id"]) if rid in line["message"]}
        if mentioned:
            assert line.get("run_id") in mentioned, line
    launched = [line for line in agent_lines if line["message"].startswith("launching run")]
    assert {line["run_id"] for line in launched} == {run_id, retry[0]["run_id"]}
    retried = [line for line in cp_lines if line.get("run_id") == run_id]
    assert retried and all(line.get("agent") for line in retried)
