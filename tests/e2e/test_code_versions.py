"""Code locations that change under a running fleet: reloads (files, command, SIGHUP),
the code version each run records, re-execution on the parent's version, the
`fleetrun/code_version` tag, and git locations. Real control plane, real agents."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import (
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    wait_for,
)

DEFS = """\
import os
import time

from agent.sdk import DefaultSensorStatus, Definitions, SkipReason, job, op, sensor

VERSION = "{version}"


@op
def report(context):
    gate = context.run_config.get("gate")
    deadline = time.monotonic() + 120
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.path.exists(context.run_config.get("fail_if", "/nonexistent")):
        raise RuntimeError("asked to fail")
    from helper import HELPER  # imported late: from the run's own version too

    context.log.info(f"code {{VERSION}} helper {{HELPER}}")
    return VERSION


@job
def versioned():
    report()


@sensor(job=versioned, minimum_interval_seconds=0.2, default_status=DefaultSensorStatus.RUNNING)
def watcher(context):
    return SkipReason(f"sensor code {{VERSION}}")


defs = Definitions(jobs=[versioned], sensors=[watcher])
"""


SCHEDULED = """

from agent.sdk import schedule


@schedule(job=versioned, cron="0 4 * * *")
def nightly(context):
    return SkipReason("a schedule of the new version")


defs = Definitions(jobs=[versioned], sensors=[watcher], schedules=[nightly])
"""


def write_code(folder: Path, version: str, schedule: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "helper.py").write_text(f'HELPER = "{version}"\n')
    (folder / "defs.py").write_text(DEFS.format(version=version) + (SCHEDULED if schedule else ""))


def location(cp: ControlPlaneProc, agent: str = "a1") -> dict:
    agents = cp.get("/api/v1/agents")["agents"]
    return next(a for a in agents if a["name"] == agent)["code_locations"][0]


def new_version(cp: ControlPlaneProc, old: str, agent: str = "a1") -> str:
    """Wait until the agent serves a version other than `old`; that version."""
    return wait_for(
        lambda: location(cp, agent)["version"] != old and location(cp, agent)["version"],
        what="a new code version",
    )


def said(cp: ControlPlaneProc, run_id: str) -> list[str]:
    return [e["message"] for e in cp.events(run_id) if e["type"] in ("LOG", "ENGINE_EVENT")]


def cli(cp: ControlPlaneProc, *args: str) -> str:
    result = subprocess.run(
        [*FLEETRUN, "--url", cp.url, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def started(cp: ControlPlaneProc, run_id: str) -> bool:
    return cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED"


def test_an_edit_reaches_new_runs_while_a_running_run_keeps_its_code(tmp_path: Path) -> None:
    code = tmp_path / "code"
    write_code(code, "v1")
    cp = start_control_plane(tmp_path)
    agent: Proc | None = None
    try:
        agent = start_agent(
            cp, tmp_path, "a1", {"live": code / "defs.py"}, location_extra="keep_versions = 0\n"
        )
        v1 = location(cp)["version"]
        assert v1 and location(cp)["versions"] == [v1]
        gate = tmp_path / "gate"
        long_run = cp.submit("versioned", config={"gate": str(gate)})
        wait_for(lambda: started(cp, long_run), what="the long run to start")

        write_code(code, "v2")  # the agent sees the files change and reloads
        v2 = new_version(cp, v1)
        assert location(cp)["versions"][:2] == [v2, v1]  # v1 stays: a run uses it
        new_run = cp.submit("versioned")
        assert cp.wait_run(new_run)["status"] == "SUCCESS"
        assert "code v2 helper v2" in said(cp, new_run)
        gate.touch()
        finished = cp.wait_run(long_run)
        assert finished["status"] == "SUCCESS", said(cp, long_run)
        assert "code v1 helper v1" in said(cp, long_run)  # even its late import
        assert finished["code_version"] == v1
        assert cp.get(f"/api/v1/runs/{new_run}")["code_version"] == v2
        # No run uses v1 any more (and keep_versions = 0): its folder goes.
        wait_for(lambda: location(cp)["versions"] == [v2], what="v1 to be removed")
        held = tmp_path / "fleetrun-state" / "a1" / "code" / "live"
        assert sorted(p.name for p in held.iterdir() if not p.name.startswith(".")) == [v2]
        assert v2[:12] in cli(cp, "runs", "list")
        assert f"code_version:  {v2}" in cli(cp, "runs", "show", new_run)

        # A broken edit: the last good version goes on serving, and the error is shown.
        (code / "defs.py").write_text("def broken(:\n")
        broken = wait_for(lambda: location(cp)["reload_error"], what="the reload error")
        assert "SyntaxError" in broken and location(cp)["version"] == v2
        errors = cp.get("/api/v1/jobs")["location_errors"]
        assert errors[0]["serving_version"] == v2 and "SyntaxError" in errors[0]["error"]
        assert "reload failed; version" in cli(cp, "jobs", "list")
        assert "RELOAD FAILED" in cli(cp, "agents", "list")
        still = cp.submit("versioned")
        assert cp.wait_run(still)["code_version"] == v2
        assert "code v2 helper v2" in said(cp, still)

        write_code(code, "v3")  # a good version clears the error
        v3 = new_version(cp, v2)
        assert location(cp)["reload_error"] is None
        assert cp.get("/api/v1/jobs")["location_errors"] == []
        third = cp.submit("versioned")
        assert cp.wait_run(third)["code_version"] == v3
    finally:
        if agent is not None:
            agent.stop()
        cp.stop()


def test_reload_by_command_and_sighup_switches_sensors_and_reexecutes_on_old_code(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    write_code(code, "v1")
    cp = start_control_plane(tmp_path)
    agent: Proc | None = None
    config = "watch = false\nkeep_versions = 1\n"
    try:
        agent = start_agent(cp, tmp_path, "a1", {"live": code / "defs.py"}, location_extra=config)
        v1 = location(cp)["version"]

        def skip_reasons() -> set[str]:
            ticks = cp.get("/api/v1/sensors/watcher/ticks")["ticks"]
            return {t["skip_reason"] for t in ticks}

        wait_for(lambda: "sensor code v1" in skip_reasons(), what="the sensor's v1 ticks")
        flag = tmp_path / "fail"
        flag.touch()
        failed = cp.submit("versioned", config={"fail_if": str(flag)})
        assert cp.wait_run(failed)["status"] == "FAILURE"

        assert cp.get("/api/v1/schedules")["schedules"] == []
        write_code(code, "v2", schedule=True)  # not watched: nothing happens until told
        assert "reloads" in cli(cp, "agents", "reload", "a1", "--location", "live")
        v2 = new_version(cp, v1)
        wait_for(lambda: "sensor code v2" in skip_reasons(), what="the sensor's v2 ticks")
        schedules = cp.get("/api/v1/schedules")["schedules"]
        assert [s["name"] for s in schedules] == ["nightly"]  # the new version's schedule

        flag.unlink()
        status, body = cp.call("POST", f"/api/v1/runs/{failed}/reexecute", {})
        assert status == 201, body
        again = cp.wait_run(body["run_id"])
        assert again["status"] == "SUCCESS" and again["code_version"] == v1
        assert "code v1 helper v1" in said(cp, again["run_id"])
        assert any("as its parent run did" in m for m in said(cp, again["run_id"]))

        pinned = cp.submit("versioned", tags={"fleetrun/code_version": v1})
        assert cp.wait_run(pinned)["code_version"] == v1
        nowhere = cp.submit("versioned", tags={"fleetrun/code_version": "deadbeef"})
        waiting = wait_for(
            lambda: next(
                (r for r in cp.get("/api/v1/queue")["runs"] if r["run_id"] == nowhere), None
            ),
            what="the pinned run in the queue",
        )
        assert "code version deadbeef" in waiting["waiting_for"]
        status, _ = cp.call("POST", f"/api/v1/runs/{nowhere}/cancel")
        assert status == 200

        write_code(code, "v3")
        agent.popen.send_signal(signal.SIGHUP)
        v3 = new_version(cp, v2)
        assert v1 not in location(cp)["versions"]  # keep_versions = 1: v1 went
        wait_for(
            lambda: cp.get("/api/v1/schedules")["schedules"] == [],
            what="the schedule v3 no longer defines to go",
        )
        status, body = cp.call("POST", f"/api/v1/runs/{failed}/reexecute", {})
        later = cp.wait_run(body["run_id"])
        assert later["code_version"] == v3
        assert any("is no longer on agent a1" in m for m in said(cp, later["run_id"]))

        status, body = cp.call("POST", "/api/v1/agents/a1/reload", {"location": "nope"})
        assert status == 404 and body["error"]["code"] == "unknown_location"
        status, body = cp.call("POST", "/api/v1/agents/nobody/reload")
        assert status == 404 and body["error"]["code"] == "unknown_agent"
        status, body = cp.call("POST", "/api/v1/agents/a1/reload", {"location": 5})
        assert status == 422
    finally:
        if agent is not None:
            agent.stop()
        cp.stop()


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.strip()


def commit(repo: Path, version: str) -> str:
    write_code(repo / "pipelines", version)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"version {version}")
    return git(repo, "rev-parse", "HEAD")


def test_a_git_location_follows_new_commits(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    first = commit(repo, "v1")
    cp = start_control_plane(tmp_path)
    agent: Proc | None = None
    config = (
        f'git = "{repo}"\nref = "main"\nsubdirectory = "pipelines"\nupdate_interval_seconds = 0.5\n'
    )
    try:
        agent = start_agent(cp, tmp_path, "a1", {"fromgit": Path("defs.py")}, location_extra=config)
        assert location(cp)["version"] == first
        run = cp.submit("versioned")
        assert cp.wait_run(run)["code_version"] == first
        assert "code v1 helper v1" in said(cp, run)

        second = commit(repo, "v2")
        assert new_version(cp, first) == second
        later = cp.submit("versioned")
        assert cp.wait_run(later)["code_version"] == second
        assert "code v2 helper v2" in said(cp, later)
        held = tmp_path / "fleetrun-state" / "a1" / "code" / "fromgit"
        assert {first, second} <= {p.name for p in held.iterdir()}

        git(repo, "branch", "-q", "-m", "main", "gone")  # the ref no longer exists
        error = wait_for(lambda: location(cp)["reload_error"], what="the fetch error")
        assert "main" in error and location(cp)["version"] == second
    finally:
        if agent is not None:
            agent.stop()
        cp.stop()
