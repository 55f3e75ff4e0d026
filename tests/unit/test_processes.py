"""Process tracking: the pure decisions, and real workers whose ops leave daemons behind.

The daemons leave the worker's process group (setsid, double fork), so the group kill
alone misses them: each tracking (a cgroup per worker, or the sweep) must find them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.codeversions import in_place
from agent.config import CodeLocationConfig, OutputStoreConfig
from agent.forkserver import _Forker
from agent.launchers import (
    RunLauncher,
    describe_location,
    evaluate_in_worker,
    make_launcher,
)
from agent.processes import (
    MAX_COMMAND_CHARS,
    MAX_REPORTED,
    LeftProcess,
    ProcInfo,
    ancestors,
    cgroup_dir,
    command_text,
    descendants,
    environ_matches,
    left_behind,
    left_behind_event,
    own_cgroup_dir,
    parse_stat,
    remove_cgroup,
)
from agent.tracking import CgroupTracking, Tracking, open_tracking, tracking_choice
from protocol.messages import Evaluate, EvaluateSpec, LaunchRun, RunRecord, StopRun
from tests.conftest import FIXTURES
from tests.unit.test_launcher import launched

CONFIG = CodeLocationConfig(
    name="procs", python_file=str(FIXTURES / "process_jobs.py"), working_directory=str(FIXTURES)
)
LOCATION = in_place(CONFIG)

# The pure parts

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "4:memory:/process_api/0f56\n1:cpu:/\n0::/\n"


def test_the_agent_cgroup_is_found_from_mountinfo_and_proc_cgroup() -> None:
    assert cgroup_dir(HYBRID_MOUNTINFO, HYBRID_CGROUP) == "/sys/fs/cgroup/unified"
    systemd = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    service = "0::/system.slice/fleetrun-agent.service\n"
    assert cgroup_dir(systemd, service) == "/sys/fs/cgroup/system.slice/fleetrun-agent.service"
    # A mount that shows only a subtree, as in a container without a cgroup namespace
    subtree = "90 80 0:26 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
    assert cgroup_dir(subtree, "0::/docker/abc/agent\n") == "/sys/fs/cgroup/agent"
    assert cgroup_dir(subtree, "0::/docker/abc\n") == "/sys/fs/cgroup"
    assert cgroup_dir(subtree, "0::/docker/other\n") is None
    assert cgroup_dir(subtree, "0::/docker/abc/..x\n") == "/sys/fs/cgroup/..x"
    spaced = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert cgroup_dir(spaced, "0::/a\n") == "/mnt/cg two/a"
    # cgroup v1 only; or v2 mounted while this process is in no v2 cgroup
    v1_only = HYBRID_MOUNTINFO.replace("cgroup2 cgroup2", "cgroup cgroup")
    assert cgroup_dir(v1_only, HYBRID_CGROUP) is None
    assert cgroup_dir(HYBRID_MOUNTINFO, "4:memory:/x\n") is None


def test_stat_lines_parse_past_a_command_name_with_spaces_and_parentheses() -> None:
    rest = ["S", "4700", "4711", "4711", *["0"] * 15, "987654", "1234"]
    assert parse_stat(f"4711 (my (odd) name) {' '.join(rest)}\n") == ("S", 4700, 4711, 987654)
    state, ppid, pgid, _ = parse_stat(Path("/proc/self/stat").read_text())
    assert (state, ppid, pgid) == ("R", os.getppid(), os.getpgid(0))


MARK = {"FLEETRUN_RUN_ID": "r1", "FLEETRUN_LEASE": "1"}
MARKED = b"PATH=/bin\0FLEETRUN_RUN_ID=r1\0FLEETRUN_LEASE=1\0"


def test_environ_matching_wants_every_marker_entry_exactly() -> None:
    assert environ_matches(MARKED, MARK)
    assert not environ_matches(MARKED.replace(b"LEASE=1", b"LEASE=12"), MARK)
    assert not environ_matches(b"FLEETRUN_LEASE=1\0", MARK)  # lease 1 of another run
    assert not environ_matches(b"X=FLEETRUN_RUN_ID=r1\0FLEETRUN_LEASE=1\0", MARK)
    assert not environ_matches(MARKED, {})


def proc(pid: int, ppid: int, pgid: int = 0, state: str = "S", environ: bytes = b"") -> ProcInfo:
    return ProcInfo(pid, ppid, pgid or pid, state, pid * 10, environ)


def test_a_worker_left_its_group_and_its_marked_processes_and_never_the_agent() -> None:
    table = {
        p.pid: p
        for p in [
            proc(1, 0),
            proc(10, 1),  # the agent's parent
            proc(20, 10, environ=MARKED),  # the agent: spared even if a run started it
            proc(30, 20),  # the fork server
            proc(41, 1, pgid=40),  # left in the group of the worker (pid 40, gone)
            proc(42, 1, environ=MARKED),  # left the group, kept the environment
            proc(43, 1, environ=MARKED, state="Z"),  # dead already
            proc(44, 1, environ=MARKED.replace(b"r1", b"r2")),  # another run's
        ]
    }
    assert ancestors(table, 20) == {20, 10, 1}
    chosen = left_behind(table, 40, MARK, ancestors(table, 20))
    assert sorted(p.pid for p in chosen) == [41, 42]


def test_descendants_are_found_through_every_generation() -> None:
    table = {
        p.pid: p
        for p in [
            proc(1, 0),
            proc(100, 1),
            proc(101, 100),
            proc(102, 101, pgid=102),
            proc(103, 100, state="Z"),
            proc(104, 1),
        ]
    }
    assert sorted(p.pid for p in descendants(table, 100)) == [101, 102]
    assert descendants(table, 104) == []


def test_the_report_lists_at_most_twenty_processes_with_short_commands() -> None:
    assert command_text(b"sleep\x00300\x00", "sleep") == "sleep 300"
    assert command_text(b"", "kworker/0:1") == "[kworker/0:1]"
    script = command_text(b"python\0-c\0\nimport os\n    run()\0", "python")
    assert script == "python -c import os run()"
    long = command_text(b"x" * 500, "x")
    assert len(long) == MAX_COMMAND_CHARS and long.endswith("…")
    message, data = left_behind_event(
        [LeftProcess(4712, "python daemon.py"), LeftProcess(4711, "sleep 300")], "cgroup"
    )
    assert message == (
        "killed 2 processes the run left behind: 4711 (sleep 300), 4712 (python daemon.py)"
    )
    assert data == {
        "killed": [
            {"pid": 4711, "command": "sleep 300"},
            {"pid": 4712, "command": "python daemon.py"},
        ],
        "count": 2,
        "tracking": "cgroup",
    }
    one, _ = left_behind_event([LeftProcess(5, "sleep 1")], "sweep", "the evaluation")
    assert one == "killed 1 process the evaluation left behind: 5 (sleep 1)"
    message, data = left_behind_event([LeftProcess(p, "sleep") for p in range(1000, 1025)], "sweep")
    assert len(data["killed"]) == MAX_REPORTED and data["count"] == 25
    assert message.endswith("1019 (sleep) and 5 more")


def test_tracking_is_cgroup_where_possible_and_says_why_not() -> None:
    assert tracking_choice("auto", None) == ("cgroup", "")
    assert tracking_choice("cgroup", None) == ("cgroup", "")
    assert tracking_choice("sweep", None) == ("sweep", "")
    assert tracking_choice("auto", "read-only") == ("sweep", "no usable cgroup v2: read-only")
    with pytest.raises(ValueError, match='"cgroup" needs a writable cgroup v2: read-only'):
        tracking_choice("cgroup", "read-only")


# Real workers


@pytest.fixture(params=["cgroup", "sweep"])
async def tracking(request: pytest.FixtureRequest) -> AsyncIterator[Tracking]:
    try:
        tracking = open_tracking(request.param)
    except ValueError as exc:
        pytest.skip(f"this machine offers no writable cgroup v2: {exc}")
    yield tracking
    await tracking.close()
    if isinstance(tracking, CgroupTracking):
        # every worker's cgroup was removed too
        assert not await asyncio.to_thread(os.path.exists, tracking.base)


@pytest.fixture(params=["forkserver", "subprocess"])
async def launcher(
    request: pytest.FixtureRequest, tracking: Tracking
) -> AsyncIterator[RunLauncher]:
    launcher = make_launcher(request.param, [CONFIG], OutputStoreConfig(), tracking)
    await launcher.warm_up()
    yield launcher
    await launcher.close()


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())[0] == "Z"
    except FileNotFoundError:
        return True


async def until(check: Callable[[], object], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.02)


def daemon_pids(folder: Path) -> dict[str, int]:
    """The pids the daemons wrote to `folder`, by file name."""
    return {p.name: int(p.read_text()) for p in folder.iterdir() if not p.name.endswith(".tmp")}


def launch(job: str, folder: Path, **config: object) -> LaunchRun:
    return LaunchRun(
        run_id=uuid.uuid4().hex,
        job=job,
        location="procs",
        lease=1,
        config={"dir": str(folder), **config},
    )


async def run_job(
    launcher: RunLauncher, job: str, folder: Path, **config: object
) -> list[RunRecord]:
    records: list[RunRecord] = []
    worker = launched(launch(job, folder, **config), records)
    async with asyncio.timeout(60):
        await worker.run(LOCATION, launcher, worker.channel.path("scratch"))
    return records


async def assert_killed_and_reported(
    records: list[RunRecord], folder: Path, tracking: Tracking, result: str
) -> None:
    """The daemon is dead, and the run's last two events say so, then give its result."""
    pid = daemon_pids(folder)["daemon-pid"]
    await until(lambda: gone(pid), f"daemon {pid} to end")
    events = [r for r in records if r.kind == "event"]
    assert [e.type for e in events][-2:] == ["ENGINE_EVENT", result], [e.message for e in events]
    report = events[-2]
    assert report.data["killed"] == [{"pid": pid, "command": "sleep 300"}]
    assert report.data["tracking"] == tracking.name and report.step is None
    assert report.message == f"killed 1 process the run left behind: {pid} (sleep 300)"


@pytest.mark.parametrize("clear_env", [False, True])
async def test_a_daemon_that_left_the_process_group_ends_with_the_run(
    launcher: RunLauncher, tracking: Tracking, tmp_path: Path, clear_env: bool
) -> None:
    """With `clear_env` the daemon does not carry the run's marker either: only the cgroup
    or the worker's subreaper sweep can find it."""
    records = await run_job(launcher, "setsid_daemon", tmp_path, clear_env=clear_env)
    await assert_killed_and_reported(records, tmp_path, tracking, "RUN_SUCCESS")


async def test_a_worker_killed_outright_still_has_its_daemon_ended(
    launcher: RunLauncher, tracking: Tracking, tmp_path: Path
) -> None:
    """As after an OOM kill: the worker could not sweep, the agent does."""
    records = await run_job(launcher, "daemon_then_crash", tmp_path)
    await assert_killed_and_reported(records, tmp_path, tracking, "RUN_FAILURE")
    assert "was killed by signal SIGKILL without reporting a result" in records[-1].message


async def test_a_daemon_holding_the_run_output_does_not_hold_the_run(
    launcher: RunLauncher, tracking: Tracking, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fleetrun.agent")
    records = await run_job(launcher, "daemon_holding_stdout", tmp_path)
    await assert_killed_and_reported(records, tmp_path, tracking, "RUN_SUCCESS")
    assert "still holds its output" not in caplog.text  # its pipes ended, none was cut
    assert "killed 1 process the run left behind" in caplog.text
    out = "".join(r.message for r in records if r.kind == "log" and r.type == "stdout")
    assert "started daemon" in out


async def test_a_stopped_run_ends_what_left_its_process_group(
    launcher: RunLauncher, tracking: Tracking, tmp_path: Path
) -> None:
    records: list[RunRecord] = []
    order = launch("daemon_then_wait", tmp_path)
    worker = launched(order, records)
    running = asyncio.create_task(worker.run(LOCATION, launcher, worker.channel.path("scratch")))
    await until(
        lambda: any("started daemon" in r.message for r in records if r.kind == "log"),
        "the daemon to start",
    )
    worker.stop(StopRun(order.run_id, order.lease, cancel=True, reason="canceled", grace_seconds=5))
    async with asyncio.timeout(60):
        await running
    await assert_killed_and_reported(records, tmp_path, tracking, "RUN_CANCELED")


async def test_loading_and_evaluating_a_location_leave_nothing_running(
    launcher: RunLauncher, tracking: Tracking, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETRUN_TEST_LEAK_DIR", str(tmp_path))  # each load leaves a daemon
    info = await describe_location(LOCATION, tracking)
    assert info.error is None and [j.name for j in info.jobs]
    request = Evaluate(eval_id="e1", location="procs", kind="sensor", name="leaky_sensor")
    spec = EvaluateSpec(evaluate=request, location=LOCATION.spec)
    result = await evaluate_in_worker(launcher, LOCATION, spec)
    assert result.error is None and result.skip_reason == "left a daemon behind"
    found = daemon_pids(tmp_path)
    assert sorted(name.split("-")[0] for name in found) == ["import", "import", "sensor"]
    pids = list(found.values())
    await until(lambda: all(gone(pid) for pid in pids), f"daemons {pids} to end")


async def test_an_exiting_agent_ends_what_its_cgroups_still_hold() -> None:
    try:
        tracking = open_tracking("cgroup")
    except ValueError as exc:
        pytest.skip(f"this machine offers no writable cgroup v2: {exc}")
    assert isinstance(tracking, CgroupTracking)
    scope = tracking.scope("run-1", {})
    sleeper = await asyncio.create_subprocess_exec("sleep", "300")
    try:
        await asyncio.to_thread(Path(scope.path, "cgroup.procs").write_text, str(sleeper.pid))
        await tracking.close()
        async with asyncio.timeout(30):
            assert await sleeper.wait() == -signal.SIGKILL
    finally:
        if sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()
    assert not await asyncio.to_thread(os.path.exists, tracking.base)


def test_a_new_agent_removes_the_empty_cgroups_an_agent_killed_outright_left() -> None:
    try:
        asyncio.run(open_tracking("cgroup").close())
    except ValueError as exc:
        pytest.skip(f"this machine offers no writable cgroup v2: {exc}")
    parent = own_cgroup_dir()
    assert parent is not None
    gone_agent = subprocess.Popen(["true"])
    gone_agent.wait()
    stale = Path(parent, f"fleetrun-{gone_agent.pid}")
    (stale / "run-7").mkdir(parents=True)
    try:
        tracking = open_tracking("cgroup")
        assert not stale.exists()
        asyncio.run(tracking.close())
    finally:
        remove_cgroup(str(stale))


def test_the_fork_server_starts_a_worker_inside_its_cgroup() -> None:
    """Born inside (clone3 into the cgroup), the worker need not join it: joining waits
    for an RCU grace period, 10-14 ms of every launch (docs/performance.md)."""
    try:
        tracking = open_tracking("cgroup")
    except ValueError as exc:
        pytest.skip(f"this machine offers no writable cgroup v2: {exc}")
    assert isinstance(tracking, CgroupTracking)
    scope = tracking.scope("run-born", {})
    forker = _Forker()
    read, write = os.pipe()
    pid = forker.fork(scope.path)
    if pid == 0:
        # What glibc's fork would leave: its thread descriptor holds the child's own tid
        # and the kernel has the child's robust-futex list
        registrations = forker._thread_registrations()
        tid_field = ctypes.c_int.from_address(registrations[0]).value if registrations else 0
        robust_head = registrations[1] if registrations else 0
        seen = {"cgroup": own_cgroup_dir(), "tid_field": tid_field, "robust": robust_head}
        os.write(write, json.dumps(seen).encode())
        os._exit(0)
    os.close(write)
    try:
        seen = json.loads(os.read(read, 4096))
        os.waitpid(pid, 0)
    finally:
        os.close(read)
        asyncio.run(tracking.close())
    if not forker.clone3:
        pytest.skip("the kernel refuses clone3 here: the worker joins its cgroup itself")
    assert seen == {"cgroup": scope.path, "tid_field": pid, "robust": seen["robust"]}
    assert seen["robust"] != 0
