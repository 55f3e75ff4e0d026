"""Run workers forked by the fork server: real processes, no control plane."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import msgpack
import pytest

from agent.channel import Channel
from agent.codeversions import in_place
from agent.config import CodeLocationConfig
from agent.forkserver import ForkServer
from agent.launchers import (
    ForkServerLauncher,
    LaunchedRun,
    RunLauncher,
    SubprocessLauncher,
    forkserver_command,
)
from protocol.messages import LaunchRun, RunRecord
from tests.conftest import FIXTURES

CONFIG = CodeLocationConfig(
    name="probe", python_file=str(FIXTURES / "worker_jobs.py"), working_directory=str(FIXTURES)
)
LOCATION = in_place(CONFIG)


@pytest.fixture
async def launcher():
    launcher = ForkServerLauncher([CONFIG])
    await launcher.warm_up()
    yield launcher
    await launcher.close()


async def run_job(
    launcher: RunLauncher,
    job: str,
    lease: int = 1,
    config: dict | None = None,
    records: list[RunRecord] | None = None,
) -> tuple[LaunchedRun, list[RunRecord]]:
    records = [] if records is None else records
    launch = LaunchRun(
        run_id=f"run-{lease}", job=job, location="probe", lease=lease, config=config or {}
    )
    worker = launched(launch, records)
    async with asyncio.timeout(60):
        await worker.run(LOCATION, launcher, worker.channel.path("scratch"))
    return worker, records


def launched(launch: LaunchRun, records: list[RunRecord]) -> LaunchedRun:
    """A run as the agent follows it, its channel in a folder of its own."""
    channel = Channel.create(tempfile.mkdtemp(prefix="fleetrun-test-"), launch, "agent")
    return LaunchedRun(launch, lambda record, _: records.append(record), channel)


def terminal(records: list[RunRecord]) -> RunRecord:
    (last,) = [r for r in records if r.type in ("RUN_SUCCESS", "RUN_FAILURE")]
    return last


class StartWatch(list):
    """A record list that signals when the worker has reported RUN_START."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    def append(self, record: RunRecord) -> None:
        super().append(record)
        if record.type == "RUN_START":
            self.started.set()


def server(launcher: ForkServerLauncher) -> ForkServer:
    return launcher._servers[""]


async def test_each_run_gets_a_fresh_import_of_user_code(launcher: ForkServerLauncher) -> None:
    pids = set()
    for lease in (1, 2, 3):
        worker, records = await run_job(launcher, "module_state", lease)
        assert terminal(records).type == "RUN_SUCCESS", [r.message for r in records]
        assert worker.exit_code == 0
        out = "".join(r.message for r in records if r.kind == "log" and r.type == "stdout")
        pid, ppid, pgid = (int(x) for x in out.split()[1::2])
        assert ppid == server(launcher).pid and pgid == pid  # own process group, for killpg
        pids.add(pid)
    assert len(pids) == 3


async def test_exit_codes_and_signals_are_reported(launcher: ForkServerLauncher) -> None:
    worker, records = await run_job(launcher, "killed_by_signal")
    assert worker.exit_code == -signal.SIGKILL
    assert "was killed by signal SIGKILL without reporting a result" in terminal(records).message


async def test_a_killed_fork_server_is_replaced_and_its_running_workers_finish(
    launcher: ForkServerLauncher, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    first = server(launcher)
    seen = StartWatch()
    running = asyncio.create_task(run_job(launcher, "gated", 1, {"path": str(gate)}, seen))
    async with asyncio.timeout(30):
        await seen.started.wait()
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    gate.touch()
    worker, records = await running
    assert terminal(records).type == "RUN_SUCCESS"  # its result came through the record pipe
    assert worker.exit_code is None  # nobody was left to reap it and tell us the code
    again, records = await run_job(launcher, "module_state", 2)
    assert terminal(records).type == "RUN_SUCCESS" and again.exit_code == 0
    assert server(launcher) is not first and server(launcher).alive


def test_fork_server_answers_bad_requests_and_keeps_serving() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [*forkserver_command(""), str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    ours.settimeout(30)
    try:
        for data in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"argv": ["run"]})):
            socket.send_fds(ours, [data], [])
            reply = msgpack.unpackb(ours.recv(65536))
            assert "error" in reply and proc.poll() is None
        r, w = os.pipe()
        socket.send_fds(ours, [msgpack.packb({"argv": ["describe"]})], [r, w])
        os.close(r)
        os.close(w)
        assert "expected 4 fds, got 2" in msgpack.unpackb(ours.recv(65536))["error"]
    finally:
        ours.close()
        assert proc.wait(30) == 0  # closing our end stops the server cleanly


async def test_the_subprocess_launcher_runs_a_fresh_interpreter_per_run() -> None:
    launcher = SubprocessLauncher([CONFIG])
    await launcher.warm_up()
    try:
        worker, records = await run_job(launcher, "module_state")
        assert terminal(records).type == "RUN_SUCCESS" and worker.exit_code == 0
        out = "".join(r.message for r in records if r.kind == "log" and r.type == "stdout")
        pid, ppid, pgid = (int(x) for x in out.split()[1::2])
        assert ppid == os.getpid() and pgid == pid  # our child, in its own process group
        worker, records = await run_job(launcher, "killed_by_signal", 2)
        assert worker.exit_code == -signal.SIGKILL
        assert "killed by signal SIGKILL" in terminal(records).message
    finally:
        await launcher.close()


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    import random

    from agent.client import RetryDelays

    retry = RetryDelays(base=0.2, cap=10.0, rng=random.Random(1))
    delays = [retry.next_delay() for _ in range(12)]
    bounds = [min(10.0, 0.2 * 2**n) for n in range(12)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert max(delays[8:]) <= 10.0 and len(set(delays)) == 12  # spread, never in lockstep
    retry.reset()
    assert retry.next_delay() <= 0.2
