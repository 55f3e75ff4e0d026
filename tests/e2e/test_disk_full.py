"""The control plane's disk fills up (reference F7), with real processes.

Its database lives on a small tmpfs, which a filler file fills while runs are in flight
and more are being submitted. Writes must then answer 503 `storage_full` (never 500,
and the agents keep their records and retry), reads keep working, `/readyz` names the
cause, and the process stays up. Once the filler is deleted everything drains: every
run acknowledged with 201 finishes, none is lost or doubled, and the database is sound.

Mounting a tmpfs needs root; the test fails (rather than skips) without it, so that a
CI run that silently lost the privilege does not look green.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    ControlPlaneProc,
    http,
    start_agent,
    start_control_plane,
    wait_for,
)

pytestmark = pytest.mark.e2e

GATES = {"gates": FIXTURES / "gate_jobs.py"}
DISK_SIZE = "2m"
FULL_SECONDS = 5.0  # how long the disk stays full
MAX_RUNTIME = 3  # one run's deadline passes while the disk is full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the database, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.fail("test_disk_full mounts a tmpfs (mount -t tmpfs) and must run as root")
    folder = tmp_path / "db"
    folder.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(folder)],
        check=True,
        timeout=30,
    )
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], timeout=30)  # still busy: detach


def fill(folder: Path) -> Path:
    """Take every free page of the filesystem with one file: big writes, then smaller
    ones, each until ENOSPC (a write past the end is cut short, the next one refused)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = bytes(size)
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def time_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def metrics(cp: ControlPlaneProc) -> str:
    with urllib.request.urlopen(f"{cp.url}/metrics", timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode()


def submit(cp: ControlPlaneProc, job: str, gate: Path, **tags: str) -> tuple[int, dict]:
    body = {"job": job, "config": {"gate": str(gate)}, "tags": tags}
    return cp.call("POST", "/api/v1/runs", body)


def test_a_full_disk_refuses_writes_with_503_and_everything_drains_after(
    tmp_path: Path, small_disk: Path
) -> None:
    database = small_disk / "fleetrun.db"
    cp = start_control_plane(tmp_path, storage_url=f"sqlite:///{database}")
    agent = start_agent(cp, tmp_path, "a1", GATES, extra="max_concurrent_runs = 8")
    gate = tmp_path / "gate"
    acked: list[str] = []  # every run the API acknowledged with 201
    try:
        # Given runs in flight, one of which will pass its max runtime
        for job in ("gated", "gated", "gated", "quick", "quick"):
            status, body = submit(cp, job, gate)
            assert status == 201, body
            acked.append(body["run_id"])
        status, body = submit(
            cp, "gated", tmp_path / "never", **{"fleetrun/max_runtime": str(MAX_RUNTIME)}
        )
        assert status == 201, body
        overdue = body["run_id"]
        wait_for(
            lambda: (
                sum(
                    cp.get(f"/api/v1/runs/{r}")["status"] == "STARTED"
                    for r in [*acked[:3], overdue]
                )
                == 4
            ),
            what="four runs in flight",
        )
        started = time_of(cp.get(f"/api/v1/runs/{overdue}")["start_time"])
        # When the disk fills up while runs keep being submitted
        filler = fill(small_disk)
        filled = time.monotonic()
        refused: dict = {}
        for _ in range(100):
            status, body = submit(cp, "quick", gate)
            if status != 201:
                refused = body
                break
            acked.append(body["run_id"])  # it fitted: it must finish like the others
        # Then writes answer 503 storage_full, every time, never 500
        assert status == 503 and refused["error"]["code"] == "storage_full", (status, refused)
        for _ in range(3):
            status, body = submit(cp, "quick", gate)
            assert (status, body["error"]["code"]) == (503, "storage_full"), body
        # And reads keep working
        listed = {r["run_id"] for r in cp.get("/api/v1/runs?limit=200")["runs"]}
        assert listed == {*acked, overdue}
        assert cp.get(f"/api/v1/runs/{acked[0]}")["status"] == "STARTED"
        assert cp.events(acked[0])
        # And /readyz says why the control plane is not ready
        status, body = http("GET", f"{cp.url}/readyz")
        assert (status, body["error"]["code"]) == (503, "storage_full"), body
        assert "full" in body["error"]["message"]
        # And the runs that end meanwhile wait in the agent's spool: their records get 503
        gate.write_text("open")
        wait_for(
            lambda: "lost contact with the control plane" in agent.log(),
            what="the agent to be refused",
        )
        assert cp.get(f"/api/v1/runs/{acked[0]}")["status"] == "STARTED"
        assert 'fleetrun_agent_api_errors_total{code="storage_full"}' in metrics(cp)
        # And a verdict that falls due is held back while nothing can be written (no
        # heartbeat can be recorded either, so no one is judged)
        time.sleep(max(0.0, FULL_SECONDS - (time.monotonic() - filled)))  # the fault itself
        assert time.time() - started > MAX_RUNTIME + 1
        assert cp.get(f"/api/v1/runs/{overdue}")["status"] == "STARTED"
        assert cp.popen.poll() is None
        full_for = time.monotonic() - filled
        # When space is freed
        filler.unlink()
        freed_at, freed = time.time(), time.monotonic()
        # Then the control plane is ready again and everything drains
        wait_for(lambda: http("GET", f"{cp.url}/readyz")[0] == 200, what="readyz to recover")
        ready_after = time.monotonic() - freed
        for run_id in acked:
            run = cp.wait_run(run_id)
            assert run["status"] == "SUCCESS", run
            events = cp.events(run_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert [e["type"] for e in events].count("RUN_SUCCESS") == 1
        late = cp.wait_run(overdue)  # and the held-back verdict lands (its clock restarted)
        assert (late["status"], late["failure_kind"]) == ("FAILURE", "max_runtime"), late
        assert time_of(late["end_time"]) >= freed_at
        drained_after = time.monotonic() - freed
        # Nothing lost, nothing doubled: exactly the acknowledged runs exist
        runs = cp.get("/api/v1/runs?limit=200")["runs"]
        assert sorted(r["run_id"] for r in runs) == sorted([*acked, overdue])
        log = cp.log()
        assert "unhandled error" not in log  # how every 500 would show (errors.json_errors)
        assert "storage is full" in log and "storage is writable again" in log
        assert cp.popen.poll() is None
        print(
            f"\n[tmpfs {DISK_SIZE}] {len(acked) + 1} runs acknowledged; full for "
            f"{full_for:.1f} s; after freeing: ready {ready_after:.2f} s, every run ended "
            f"{drained_after:.2f} s"
        )
    finally:
        agent.stop()
        cp.stop()
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_disk_full_longer_than_the_timeout_blames_no_agent(
    tmp_path: Path, small_disk: Path
) -> None:
    timeout = 8  # heartbeats every 1.33 s; the monitor retries a failed pass after 5 s
    monitoring = f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout}\n"
    cp = start_control_plane(tmp_path, monitoring, storage_url=f"sqlite:///{small_disk}/x.db")
    agent = start_agent(cp, tmp_path, "a1", GATES)
    gate = tmp_path / "gate"
    try:
        # Given a run in flight on a connected agent (one that keeps going whatever
        # happens: by default its worker would stop itself at its lease deadline, which
        # an outage of the control plane this long passes)
        status, body = submit(cp, "gated", gate, **{"fleetrun/on_lost_contact": "continue"})
        assert status == 201, body
        run_id = body["run_id"]
        wait_for(
            lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="the run to start"
        )
        # When the disk is full for longer than the heartbeat timeout (the agent keeps
        # heartbeating and gets 503, so no heartbeat is recorded)
        filler = fill(small_disk)
        filled = time.monotonic()
        wait_for(lambda: http("GET", f"{cp.url}/readyz")[0] == 503, what="the disk to fill")
        time.sleep(max(0.0, timeout + 2 - (time.monotonic() - filled)))  # the fault itself
        # And space is freed while the agent pauses for less than the timeout (so the
        # race between its next heartbeat and the monitor's next pass cannot decide)
        agent.popen.send_signal(signal.SIGSTOP)
        try:
            filler.unlink()
            time.sleep(6)  # < timeout, > the monitor's 5 s retry
        finally:
            agent.popen.send_signal(signal.SIGCONT)
        # Then the agent is not blamed for the control plane's own outage
        gate.write_text("open")
        run = cp.wait_run(run_id)
        assert run["status"] == "SUCCESS", run
    finally:
        agent.popen.send_signal(signal.SIGCONT)
        agent.stop()
        cp.stop()
