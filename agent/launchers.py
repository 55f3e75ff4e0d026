"""Starting run workers: one process per run, crash-isolated from the agent.

Run workers are forked by a fork server per worker executable (`agent.forkserver`), so a
run skips interpreter start-up; code locations are described in a fresh subprocess.
Either way the worker gets its message on stdin and writes RunRecords to a dedicated
pipe (its stdout/stderr stay free for user output, which becomes the run's worker log).
If the worker exits without reporting a result, the launcher reports the crash. Every
worker starts in a scope of the agent's process tracking (`agent.tracking`): what it
leaves running is killed as soon as it has exited, and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from agent.channel import (
    Bell,
    Channel,
    ChannelReader,
    Position,
    WorkerIdentity,
)
from agent.codeversions import LocationVersion
from agent.config import CodeLocationConfig, DockerConfig, OutputStoreConfig
from agent.container_spec import oom_message, step_container_settings
from agent.docker_cleanup import remove_run_containers
from agent.forkserver import WORKER_FDS, ForkServer, ForkServerGone
from agent.processes import CGROUP_ENV, LeftProcess, left_behind_event, process_info
from agent.tracking import ProcessScope, SweepTracking, Tracking
from agent.worker.lease import CHANNEL_ENV
from protocol.codec import FRAME_HEADER_SIZE, ProtocolError, decode, frame, frame_length
from protocol.events import (
    AGENT_LOST,
    AGENT_RESTARTED,
    CODE_UNREACHABLE,
    TERMINAL_EVENTS,
    WORKER_CRASH,
    record_shape_problem,
)
from protocol.messages import (
    CodeLocationInfo,
    DescribeLocation,
    Evaluate,
    EvaluateSpec,
    EvaluationResult,
    LaunchRun,
    RunRecord,
    StopRun,
    WorkerSpec,
)
from protocol.wire import make_deliverable, payload_problem

log = logging.getLogger("fleetrun.agent")

RECORD_FD_ENV = "FLEETRUN_RECORD_FD"
DESCRIBE_TIMEOUT_SECONDS = 120.0
OUTPUT_GRACE_SECONDS = 2.0  # reading a worker's output after it exits, at most
TAIL_POLL_SECONDS = 0.05  # a run worker's output is looked for this often, at the latest
WORKER_ID_ENV = "FLEETRUN_WORKER_ID"  # marks what an evaluation or describe worker starts

T = TypeVar("T")


def _python_command(executable: str, module: str, frozen_command: str) -> list[str]:
    """The location's Python, the agent binary itself, or this Python."""
    if executable:
        return [executable, "-m", module]
    if getattr(sys, "frozen", False):
        return [sys.executable, frozen_command]
    return [sys.executable, "-m", module]


def worker_command(executable: str, mode: str) -> list[str]:
    return [*_python_command(executable, "agent.worker", "_worker"), mode]


def forkserver_command(executable: str) -> list[str]:
    return _python_command(executable, "agent.forkserver", "_forkserver")


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_marker(launch: LaunchRun) -> dict[str, str]:
    """The environment that marks a run attempt's processes (user code sees it too)."""
    return {"FLEETRUN_RUN_ID": launch.run_id, "FLEETRUN_LEASE": str(launch.lease)}


def _helper_marker() -> tuple[str, dict[str, str]]:
    """A scope label and marker for an evaluation or describe worker."""
    token = uuid.uuid4().hex[:12]
    return token, {WORKER_ID_ENV: token}


async def _start_tracked(
    tracking: Tracking,
    label: str,
    marker: Mapping[str, str],
    start: Callable[[dict[str, str]], Awaitable[T]],
) -> tuple[ProcessScope, T]:
    """Set up a tracking scope and start a worker in it; no scope is left if that fails."""
    scope = tracking.scope(label, marker)
    try:
        return scope, await start(scope.env)
    except BaseException:
        await scope.end(None)
        raise


def _worker_pipes(channel: Channel | None = None) -> tuple[list[int], list[int]]:
    """A worker's stdin, stdout, stderr and records: its ends, then ours. With a
    channel, only stdin is a pipe: the rest are the channel's files (ours: none)."""
    if channel is not None:
        stdin = os.pipe()
        files = channel.writer_fds()
        return [stdin[0], files["stdout"], files["stderr"], files["records"]], [stdin[1]]
    pipes = [os.pipe() for _ in range(WORKER_FDS)]
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
    ours = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
    return theirs, ours


@dataclass
class WorkerPipes:
    """The agent's ends of a started worker's output pipes (none for a run worker:
    it reports through its channel's files)."""

    records: asyncio.StreamReader | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None


async def _connect(ours: list[int], message: object) -> WorkerPipes:
    """Send the worker its message on stdin; read its records, stdout and stderr."""
    await _write_and_close(ours[0], frame(message))
    if len(ours) == 1:
        return WorkerPipes()
    _, stdout, stderr, records = ours
    return WorkerPipes(
        await _pipe_reader(records), await _pipe_reader(stdout), await _pipe_reader(stderr)
    )


async def _spawn(
    loc: LocationVersion,
    mode: str,
    message: object,
    env: Mapping[str, str],
    channel: Channel | None = None,
) -> tuple[asyncio.subprocess.Process, WorkerPipes]:
    """A fresh interpreter running the worker. Its pipes are plain ones, as a forked
    worker's: asyncio's own would make waiting for its exit also wait for whatever
    process still holds its stdout."""
    theirs, ours = _worker_pipes(channel)
    try:
        proc = await asyncio.create_subprocess_exec(
            *worker_command(loc.executable, mode),
            stdin=theirs[0],
            stdout=theirs[1],
            stderr=theirs[2],
            pass_fds=(theirs[3],),
            env={**os.environ, **env, RECORD_FD_ENV: str(theirs[3])},
            cwd=loc.working_directory,
            start_new_session=True,
        )
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    return proc, await _connect(ours, message)


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame; None at the end, also when a killed worker left half a frame."""
    try:
        header = await reader.readexactly(FRAME_HEADER_SIZE)
        return await reader.readexactly(frame_length(header))
    except asyncio.IncompleteReadError:
        return None


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader


async def _write_and_close(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(fd, "wb", buffering=0))
    transport.write(data)
    transport.close()


class WorkerProcess(Protocol):
    """A started worker as the agent follows it: a process (forked, spawned, adopted),
    or a container (agent/containers.py)."""

    @property
    def pid(self) -> int: ...
    @property
    def pipes(self) -> WorkerPipes: ...
    @property
    def container_id(self) -> str | None:
        """Its container, if it runs in one."""

    @property
    def stop_grace_seconds(self) -> float | None:
        """Its own grace between SIGTERM and SIGKILL, if it has one."""

    @property
    def oom_killed(self) -> bool:
        """Killed by its memory limit (known once it has exited)."""

    @property
    def memory_mb(self) -> int:
        """That limit; 0 if none."""

    @property
    def gone(self) -> bool:
        """Adopted, but gone before this agent started."""

    async def wait(self) -> int | None: ...
    def signal(self, signum: int) -> None: ...
    def kill_group(self) -> None: ...
    def started_note(self) -> tuple[str, dict[str, Any]] | None: ...


class _ProcessTraits:
    """What a worker process is not: in a container, OOM-killed as such."""

    container_id: str | None = None
    stop_grace_seconds: float | None = None
    oom_killed = False
    memory_mb = 0
    gone = False

    def started_note(self) -> tuple[str, dict[str, Any]] | None:
        return None


@dataclass
class ForkedWorker(_ProcessTraits):
    """A worker forked by a fork server: the agent's ends of its pipes, if it has any."""

    pid: int
    server: ForkServer
    pipes: WorkerPipes
    returncode: int | None = None
    exited: bool = False

    async def wait(self) -> int | None:
        """The return code; None if the fork server died before it could tell (then
        its exit is seen through a pidfd)."""
        if not self.exited:
            self.returncode = await self.server.wait(self.pid)
            if self.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await _exited(os.pidfd_open(self.pid))
            self.exited = True
        return self.returncode

    def kill_group(self) -> None:
        """SIGKILL the worker's process group, even after the worker itself has exited.

        Safe: Linux does not reuse a pid while a process group with that id exists.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Signal the worker's process group (its own children too), or just the worker."""
        if self.exited:
            return
        for send in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError):
                send(self.pid, signum)
                return


@dataclass
class SpawnedWorker(_ProcessTraits):
    """A worker started as a fresh interpreter (the `subprocess` launcher)."""

    process: asyncio.subprocess.Process
    pipes: WorkerPipes

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int | None:
        return await self.process.wait()

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class AdoptedWorker(_ProcessTraits):
    """A run worker a previous life of this agent started: not our child, so its exit
    is seen through a pidfd and its exit status is unknown (what it reported says)."""

    def __init__(self, identity: WorkerIdentity) -> None:
        self.pid = identity.pid
        self.pipes = WorkerPipes()
        self._pidfd: int | None = None
        with contextlib.suppress(ProcessLookupError):
            self._pidfd = os.pidfd_open(identity.pid)
        self.was_alive = identity.alive()
        self.gone = not self.was_alive
        if not self.was_alive:  # gone, or the pid is another process's by now
            self._close()

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int | None:
        if self._pidfd is not None:
            await _exited(self._pidfd)
            self._pidfd = None
        return None

    def signal(self, signum: int) -> None:
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


async def _exited(pidfd: int) -> None:
    """Until the process of `pidfd` (not necessarily our child) has exited; closes it."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(pidfd, ended.set)
    try:
        await ended.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


class RunLauncher(Protocol):
    """How the agent starts a run worker (selected by `run_launcher` in agent.toml).

    `start` must give the worker `env` on top of the agent's environment: that is how a
    worker joins its process-tracking scope (`tracking`; a run worker's: `run_tracking`,
    which is `tracking` unless the launcher isolates runs otherwise)."""

    tracking: Tracking
    run_tracking: Tracking

    async def warm_up(self) -> None: ...
    async def start(
        self,
        loc: LocationVersion,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
        channel: Channel | None = None,
    ) -> WorkerProcess: ...
    def spec(self, loc: LocationVersion, launch: LaunchRun, scratch: str) -> WorkerSpec: ...
    async def remove_step_containers(self, lease: int) -> list[str]: ...
    async def close(self) -> None: ...


class _LauncherBase:
    def __init__(
        self,
        locations: list[CodeLocationConfig],
        outputs: OutputStoreConfig | None = None,
        tracking: Tracking | None = None,
        docker: DockerConfig | None = None,
        agent_name: str = "",
    ) -> None:
        self.locations = locations
        self.outputs = outputs or OutputStoreConfig()
        self.tracking: Tracking = tracking or SweepTracking()
        self.run_tracking: Tracking = self.tracking
        self.docker_config = docker or DockerConfig()
        self.agent_name = agent_name

    async def remove_step_containers(self, lease: int) -> list[str]:
        """Remove the step containers a run attempt's worker left (docker executor)."""
        return await remove_run_containers(self.docker_config, self.agent_name, lease)

    def spec(self, loc: LocationVersion, launch: LaunchRun, scratch: str) -> WorkerSpec:
        """What a run worker needs: its launch, its code location's version, its output
        store, and how to start step containers (the docker executor)."""
        filesystem = self.outputs.kind == "filesystem"
        return WorkerSpec(
            launch=launch,
            location=loc.spec,
            output_store=self.outputs.kind,
            output_path=self.outputs.path if filesystem else scratch,
            max_output_bytes=self.outputs.max_output_bytes,
            docker=step_container_settings(
                loc,
                launch,
                run_marker(launch),
                scratch,
                self.outputs,
                self.docker_config,
                self.agent_name,
            ),
        )


class SubprocessLauncher(_LauncherBase):
    """A fresh interpreter per run: slower (~80 ms of start-up), nothing shared at all."""

    async def warm_up(self) -> None:
        return None

    async def start(
        self,
        loc: LocationVersion,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
        channel: Channel | None = None,
    ) -> SpawnedWorker:
        process, pipes = await _spawn(loc, mode, spec, env or {}, channel)
        return SpawnedWorker(process, pipes)

    async def close(self) -> None:
        return None


class ForkServerLauncher(_LauncherBase):
    """Starts run workers through one fork server per worker executable (the default)."""

    def __init__(
        self,
        locations: list[CodeLocationConfig],
        outputs: OutputStoreConfig | None = None,
        tracking: Tracking | None = None,
        docker: DockerConfig | None = None,
        agent_name: str = "",
    ) -> None:
        super().__init__(locations, outputs, tracking, docker, agent_name)
        self._servers: dict[str, ForkServer] = {}
        self._starting = asyncio.Lock()

    async def _server(self, executable: str) -> ForkServer:
        async with self._starting:
            server = self._servers.get(executable)
            if server is None or not server.alive:
                server = ForkServer(forkserver_command(executable))
                await server.start()
                self._servers[executable] = server
            return server

    async def warm_up(self) -> None:
        """Start the fork servers now, so the first run does not wait for them."""
        for executable in {loc.executable for loc in self.locations}:
            try:
                await self._server(executable)
            except OSError as exc:
                log.error("cannot start a fork server for %r: %s", executable or "python", exc)

    async def start(
        self,
        loc: LocationVersion,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
        channel: Channel | None = None,
    ) -> ForkedWorker:
        child_fds, ours = _worker_pipes(channel)
        try:
            for attempt in (1, 2):
                server = await self._server(loc.executable)
                try:
                    pid = await server.spawn(
                        [mode], {**os.environ, **(env or {})}, loc.working_directory, child_fds
                    )
                    break
                except ForkServerGone:
                    if attempt == 2:
                        raise OSError("the fork server exited twice in a row") from None
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        return ForkedWorker(pid, server, await _connect(ours, spec))

    async def close(self) -> None:
        for server in self._servers.values():
            await server.close()
        self._servers.clear()


RUN_LAUNCHERS: dict[str, type[ForkServerLauncher] | type[SubprocessLauncher]] = {
    "forkserver": ForkServerLauncher,
    "subprocess": SubprocessLauncher,
}


def make_launcher(
    kind: str,
    locations: list[CodeLocationConfig],
    outputs: OutputStoreConfig,
    tracking: Tracking | None = None,
    docker: DockerConfig | None = None,
    agent_name: str = "",
) -> RunLauncher:
    """A process launcher (the docker launcher is agent.containers.DockerLauncher)."""
    return RUN_LAUNCHERS[kind](locations, outputs, tracking, docker, agent_name)


def _screened(record: RunRecord) -> RunRecord:
    """A record from a run worker as the control plane will take it: ProtocolError for
    one it would refuse (the run fails here, with the reason, not at the control plane),
    and data nested past the protocol's depth made deliverable."""
    problem = record_shape_problem(record.kind, record.type, record.step)
    if problem is not None:
        raise ProtocolError("bad_record", problem)
    if any(type(v) in (dict, list) for v in record.data.values()):
        if payload_problem(record.data, "data") is not None:
            return dataclasses.replace(record, data=make_deliverable(record.data))
    return record


OnRecord = Callable[[RunRecord, Position], None]


class LaunchedRun:
    """One launched run as the agent sees it: its worker process, what it reported, and
    how it ended (the worker's own code is agent/worker/). The worker reports through
    its channel's files (agent/channel.py); each record is passed on with the channel
    position reached after it, so that an agent started later reads on from there."""

    def __init__(
        self,
        launch: LaunchRun,
        on_record: OnRecord,
        channel: Channel,
        start: Position | None = None,
        remove_step_containers: Callable[[int], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.launch = launch
        self.remove_step_containers = remove_step_containers
        self.executor: str | None = None  # as the worker's RUN_START names it
        self.on_record = on_record
        self.channel = channel
        self.state = "starting"
        self.process: WorkerProcess | None = None
        self._position = start or Position()
        self.reported_result = self._position.result_passed
        self.exit_code: int | None = None
        self.received_time = time.time()
        self.spawned_time: float | None = None  # when its worker's pid came back
        self.code_version = channel.code_version()  # the version it runs, once chosen
        self.stop_order: StopRun | None = None
        self.deadline_passed = False  # it stopped itself at its lease deadline
        self._kill_timer: asyncio.TimerHandle | None = None
        self._held_result: tuple[RunRecord, int] | None = None  # and its frame's offset
        self._passed_after_result = 0
        self._skip_after_result = self._position.passed_after_result

    def _pass_on(self, record: RunRecord) -> None:
        if record.kind == "event" and record.type in TERMINAL_EVENTS:
            if self.reported_result:
                return
            self.reported_result = True
            self._position = replace(self._position, result_passed=True)
        self.on_record(record, self._position)

    def report(self, event_type: str, message: str, data: dict | None = None) -> None:
        self._pass_on(
            RunRecord(
                seq=0,
                time=time.time(),
                kind="event",
                type=event_type,
                message=message,
                data=data or {},
            )
        )

    def _take_records(self, reader: ChannelReader) -> bool:
        """Pass on the whole records written since the last look; whether there were."""
        frames = reader.frames()
        for body, offset, end in frames:
            record = _screened(decode(body, RunRecord))
            if record.kind == "event" and record.type == "RUN_START":
                self.state = "running"
                self.executor = str(record.data.get("executor"))
                data = {**record.data, "launch_received_time": self.received_time}
                if self.spawned_time is not None:  # not for a worker an earlier life started
                    data["worker_spawned_time"] = self.spawned_time
                if self.code_version:
                    data["code_version"] = self.code_version
                record = replace(record, data=data)
            if record.kind == "event" and record.type == "ENGINE_EVENT":
                if record.data.get("lease_deadline"):
                    self.deadline_passed = True
                if "killed" in record.data:  # the worker's own sweep found some
                    log.warning(
                        "run %s: %s",
                        self.launch.run_id,
                        record.message,
                        extra={"run_id": self.launch.run_id},
                    )
            if record.kind == "event" and record.type in TERMINAL_EVENTS:
                # Held until the output is read too, so that a run that ended has all
                # its compute log stored (a log follower stops at the run's end).
                if self._held_result is None:
                    self._held_result = (record, offset)
                    self._position = replace(self._position, records=offset)
                continue
            if self._held_result is not None:
                if self._skip_after_result:  # passed on before this agent restarted
                    self._skip_after_result -= 1
                    continue
                self._passed_after_result += 1
                self._position = replace(
                    self._position, passed_after_result=self._passed_after_result
                )
            else:
                self._position = replace(self._position, records=end)
            self._pass_on(record)
        return bool(frames)

    def _take_output(self, reader: ChannelReader, final: bool) -> bool:
        """Pass on the output written since the last look, split by step."""
        found = False
        for name in ("stdout", "stderr"):
            for step, text in reader.output(name, final):
                found = True
                offset, in_step = reader.output_position(name)
                if name == "stdout":
                    self._position = replace(self._position, stdout=offset, stdout_step=in_step)
                else:
                    self._position = replace(self._position, stderr=offset, stderr_step=in_step)
                self._pass_on(
                    RunRecord(
                        seq=0, time=time.time(), kind="log", type=name, step=step, message=text
                    )
                )
        return found

    def _release_result(self) -> None:
        if self._held_result is not None:
            record, offset = self._held_result
            self._position = replace(self._position, passed_after_result=0)
            # Past the result and what followed it: all of the records file.
            end = os.stat(self.channel.path("records")).st_size
            self._position = replace(self._position, records=max(end, offset))
            self._pass_on(record)

    async def _pump(self, exited: asyncio.Future[Any]) -> None:
        """Read the channel as the worker writes it, until the worker has exited (and
        what it left running is ended): then everything left, and the held result."""
        reader = ChannelReader(self.channel, self._position)
        bell = Bell(self.channel)
        try:
            while True:
                done = exited.done()
                found = self._take_records(reader)
                found = self._take_output(reader, final=done) or found
                if done:
                    self._take_records(reader)
                    break
                if not found:
                    rang = asyncio.ensure_future(bell.rung())
                    await asyncio.wait(
                        [exited, rang], timeout=TAIL_POLL_SECONDS, return_when=FIRST_COMPLETED
                    )
                    rang.cancel()
        finally:
            bell.close()
            reader.close()

    async def run(self, loc: LocationVersion, launcher: RunLauncher, scratch: str) -> None:
        """Start the worker and follow it to its end; reports a crash as RUN_FAILURE."""
        spec = launcher.spec(loc, self.launch, scratch)
        if self.stop_order is not None:
            self.state = "exited"
            self._report_stopped("before its worker started")
            return
        channel = {CHANNEL_ENV: str(self.channel.folder)}
        try:
            scope, proc = await _start_tracked(
                launcher.run_tracking,
                f"run-{self.launch.lease}",
                run_marker(self.launch),
                lambda env: launcher.start(loc, spec, env={**env, **channel}, channel=self.channel),
            )
        except OSError as exc:
            # No such executable (or not one): the location's Python is unreachable, as
            # much as code that does not import; anything else is this host's trouble.
            missing = isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError)
            self.state = "exited"
            self.report(
                "RUN_FAILURE",
                f"could not start the run worker: {exc}",
                {"failure_kind": CODE_UNREACHABLE if missing else WORKER_CRASH},
            )
            return
        self.spawned_time = time.time()
        self.channel.set_worker(worker_identity(proc.pid, scope, proc.container_id))
        if (note := proc.started_note()) is not None:
            self.report("ENGINE_EVENT", *note)
        await self._follow(proc, scope)

    async def adopt(
        self,
        identity: WorkerIdentity,
        scope: ProcessScope,
        proc: WorkerProcess | None = None,
    ) -> None:
        """Follow a worker that a previous life of this agent started, from where that
        one got to; one that is gone is reported as lost at once. `proc`: the worker as
        its launcher found it (a container), else its process."""
        self.state = "running"
        await self._follow(proc or AdoptedWorker(identity), scope)

    async def _follow(self, proc: WorkerProcess, scope: ProcessScope) -> None:
        self.process = proc
        if self.stop_order is not None:
            self._terminate(self.stop_order.grace_seconds)
        exited: asyncio.Future[Any] = asyncio.ensure_future(self._wait_and_sweep(proc, scope))
        try:
            await self._pump(exited)
        except ProtocolError as exc:
            self.kill()
            self.report("RUN_FAILURE", f"run worker sent an invalid record: {exc}")
        except asyncio.CancelledError:  # this agent hands the worker over, or stops
            exited.cancel()
            raise
        await exited
        if self._held_result is not None:
            self._release_result()
        self.state = "exited"
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        gone, oom = proc.gone, proc.oom_killed
        if gone:
            how = (
                "was gone when the agent started again (the host restarted, or it "
                "was killed while the agent was down)"
            )
        elif isinstance(proc, AdoptedWorker):
            how = "exited (its exit status is unknown to an agent that adopted it)"
        elif oom:
            how = oom_message(proc.memory_mb)
        elif self.exit_code is None and proc.container_id is not None:
            how = "was removed by someone else before its exit status was read"
        elif self.exit_code is None:
            how = "ended with an unknown exit status (its fork server exited)"
        else:
            how = _exit_description(self.exit_code)
        who = f"container {proc.container_id[:12]}" if proc.container_id else f"pid {proc.pid}"
        if self.stop_order is not None:
            self._report_stopped(f"its worker ({who}) {how}")
        elif self.deadline_passed and not self.reported_result:
            self.report(
                "RUN_FAILURE",
                f"run worker ({who}) stopped itself at its lease deadline: the "
                "agent had not heard from the control plane in time",
                {"exit_code": self.exit_code, "failure_kind": AGENT_LOST},
            )
        elif gone and not self.reported_result:
            self.report(
                "RUN_FAILURE",
                f"run worker ({who}) {how}, without reporting a result",
                {"failure_kind": AGENT_RESTARTED},
            )
        elif not self.reported_result:
            data: dict[str, Any] = {"exit_code": self.exit_code, "failure_kind": WORKER_CRASH}
            if oom:
                data.update(oom_killed=True, memory_mb=proc.memory_mb)
            self.report("RUN_FAILURE", f"run worker ({who}) {how} without reporting a result", data)

    async def _wait_and_sweep(self, proc: WorkerProcess, scope: ProcessScope) -> None:
        """Wait for the worker to exit, then end what it left running (which also ends
        any output still coming) and report it."""
        self.exit_code = await proc.wait()
        if self.stop_order is not None:
            proc.kill_group()  # what the worker started and SIGTERM did not end
        if proc.oom_killed and self._held_result is not None:
            # The worker reported, but a process of its run met the memory limit.
            self.report(
                "ENGINE_EVENT",
                f"a process of this run's container {oom_message(proc.memory_mb)}",
                {"oom_killed": True, "memory_mb": proc.memory_mb},
            )
        killed = await scope.end(proc.pid)
        if killed:
            self._report_left_behind(killed, scope.tracking)
        docker_steps = self.executor == "docker" or proc.container_id is not None
        if docker_steps and self.remove_step_containers is not None:
            removed = await self.remove_step_containers(self.launch.lease)
            if removed:
                message = f"removed {len(removed)} step container(s) the run worker left"
                log.warning("run %s: %s", self.launch.run_id, message)
                self.report("ENGINE_EVENT", message, {"containers": removed})

    def _report_left_behind(self, killed: list[LeftProcess], tracking: str) -> None:
        """Say on the run's page (before its result) and in the agent's log what was killed."""
        message, data = left_behind_event(killed, tracking)
        log.warning("run %s: %s", self.launch.run_id, message, extra={"run_id": self.launch.run_id})
        self.report("ENGINE_EVENT", message, data)

    def _report_stopped(self, how: str) -> None:
        order = self.stop_order
        assert order is not None
        if order.cancel:
            self.report("RUN_CANCELED", f"run canceled; {how}")
        else:
            self.report(
                "RUN_FAILURE",
                f"run stopped ({order.reason}); {how}",
                {"failure_kind": order.failure_kind} if order.failure_kind else {},
            )

    def stop(self, order: StopRun) -> None:
        """Stop on the control plane's order: SIGTERM now, SIGKILL after the grace period."""
        if self.stop_order is not None:
            return
        self.stop_order = order
        if self.process is not None:
            self._terminate(order.grace_seconds)

    def _terminate(self, grace_seconds: float) -> None:
        assert self.process is not None
        # A container gets the grace its agent's [docker] stop_grace_seconds gives.
        if self.process.stop_grace_seconds is not None:
            grace_seconds = self.process.stop_grace_seconds
        self.process.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(grace_seconds, self.kill)

    def kill(self) -> None:
        if self.process is not None:
            self.process.signal(signal.SIGKILL)


def worker_identity(pid: int, scope: ProcessScope, container: str | None = None) -> WorkerIdentity:
    """Who a just-started worker is, to be told apart later from a reused pid."""
    info = process_info(pid, with_environ=False) if pid > 0 else None
    return WorkerIdentity(
        pid, info.start_time if info is not None else -1, scope.env.get(CGROUP_ENV), container
    )


def _log_left_behind(killed: list[LeftProcess], tracking: str, who: str, what: str) -> None:
    if killed:
        log.warning("%s: %s", who, left_behind_event(killed, tracking, what)[0])


async def evaluate_in_worker(
    launcher: RunLauncher, loc: LocationVersion, spec: EvaluateSpec
) -> EvaluationResult:
    """Run a schedule or sensor function in a worker process, bounded by its timeout."""
    request = spec.evaluate
    label, marker = _helper_marker()
    try:
        scope, proc = await _start_tracked(
            launcher.tracking,
            f"eval-{label}",
            marker,
            lambda env: launcher.start(loc, spec, mode="evaluate", env=env),
        )
    except OSError as exc:
        return EvaluationResult(eval_id=request.eval_id, error=f"cannot start a worker: {exc}")
    try:
        return await _evaluation_result(proc, spec.evaluate)
    finally:
        _log_left_behind(
            await scope.end(proc.pid),
            scope.tracking,
            f"{request.kind} {request.name}",
            "the evaluation",
        )


async def _evaluation_result(proc: WorkerProcess, request: Evaluate) -> EvaluationResult:
    """The evaluation worker's reply, once it has exited (killed at the timeout)."""
    pipes = proc.pipes
    assert pipes.records is not None and pipes.stdout is not None and pipes.stderr is not None
    drains = [asyncio.create_task(stream.read()) for stream in (pipes.stdout, pipes.stderr)]
    try:
        async with asyncio.timeout(request.timeout_seconds):
            body = await _read_frame(pipes.records)
            await proc.wait()
    except TimeoutError:
        proc.signal(signal.SIGKILL)
        await proc.wait()
        return EvaluationResult(
            eval_id=request.eval_id,
            cursor=request.cursor,
            error=(f"evaluation timed out after {request.timeout_seconds:g} s"),
        )
    finally:
        for task in drains:
            task.cancel()
    if body is None:
        how = _exit_description(await proc.wait() or 0)
        message = f"the evaluation worker {how} without a result"
        return EvaluationResult(eval_id=request.eval_id, cursor=request.cursor, error=message)
    try:
        return decode(body, EvaluationResult)
    except ProtocolError as exc:
        return EvaluationResult(eval_id=request.eval_id, error=f"bad evaluation reply: {exc}")


async def describe_location(
    loc: LocationVersion, tracking: Tracking | None = None
) -> CodeLocationInfo:
    """Load a location in a throwaway worker, so broken user code cannot hurt the agent."""
    label, marker = _helper_marker()
    message = DescribeLocation(location=loc.spec)
    try:
        scope, (proc, pipes) = await _start_tracked(
            tracking or SweepTracking(),
            f"describe-{label}",
            marker,
            lambda env: _spawn(loc, "describe", message, env),
        )
    except OSError as exc:
        return CodeLocationInfo(name=loc.name, error=f"cannot start a worker: {exc}")
    # Both drained as they come: a location that prints a lot must not block on a pipe.
    assert pipes.records is not None and pipes.stdout is not None and pipes.stderr is not None
    output = [asyncio.create_task(stream.read()) for stream in (pipes.stdout, pipes.stderr)]
    try:
        async with asyncio.timeout(DESCRIBE_TIMEOUT_SECONDS):
            body = await _read_frame(pipes.records)
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return CodeLocationInfo(
            name=loc.name, error=f"loading timed out after {DESCRIBE_TIMEOUT_SECONDS:.0f} s"
        )
    finally:
        # Also closes the pipes that a process it left may hold.
        _log_left_behind(
            await scope.end(proc.pid), scope.tracking, f"code location {loc.name}", "its loading"
        )
        await asyncio.wait(output, timeout=OUTPUT_GRACE_SECONDS)
        for task in output:
            task.cancel()
    if body is None:
        stderr = output[1].result() if output[1].done() and not output[1].cancelled() else b""
        tail = stderr.decode(errors="replace")[-2000:]
        return CodeLocationInfo(
            name=loc.name,
            error=f"worker {_exit_description(proc.returncode or 0)} while loading: {tail}",
        )
    try:
        return decode(body, CodeLocationInfo)
    except ProtocolError as exc:
        return CodeLocationInfo(name=loc.name, error=f"bad reply from worker: {exc}")
