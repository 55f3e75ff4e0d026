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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from agent.compute_logs import StepOutputSplitter
from agent.config import CodeLocationConfig, OutputStoreConfig
from agent.forkserver import WORKER_FDS, ForkServer, ForkServerGone
from agent.processes import LeftProcess, left_behind_event
from agent.tracking import ProcessScope, SweepTracking, Tracking
from protocol.codec import FRAME_HEADER_SIZE, ProtocolError, decode, frame, frame_length
from protocol.events import (
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
    LocationSpec,
    RunRecord,
    StopRun,
    WorkerSpec,
)
from protocol.wire import make_deliverable, payload_problem

log = logging.getLogger("fleetrun.agent")

RECORD_FD_ENV = "FLEETRUN_RECORD_FD"
DESCRIBE_TIMEOUT_SECONDS = 120.0
OUTPUT_GRACE_SECONDS = 2.0  # reading a worker's output after it exits, at most
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


def location_spec(loc: CodeLocationConfig) -> LocationSpec:
    return LocationSpec(
        name=loc.name,
        python_file=loc.python_file,
        module=loc.module,
        working_directory=loc.working_directory,
    )


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


def _worker_pipes() -> tuple[list[int], list[int]]:
    """Pipes for a worker's stdin, stdout, stderr and records: its ends, then ours."""
    pipes = [os.pipe() for _ in range(WORKER_FDS)]
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
    ours = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
    return theirs, ours


@dataclass
class WorkerPipes:
    """The agent's ends of a started worker's output pipes."""

    records: asyncio.StreamReader
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader


async def _connect(ours: list[int], message: object) -> WorkerPipes:
    """Send the worker its message on stdin; read its records, stdout and stderr."""
    stdin, stdout, stderr, records = ours
    await _write_and_close(stdin, frame(message))
    return WorkerPipes(
        await _pipe_reader(records), await _pipe_reader(stdout), await _pipe_reader(stderr)
    )


async def _spawn(
    loc: CodeLocationConfig, mode: str, message: object, env: Mapping[str, str]
) -> tuple[asyncio.subprocess.Process, WorkerPipes]:
    """A fresh interpreter running the worker. Its pipes are plain ones, as a forked
    worker's: asyncio's own would make waiting for its exit also wait for whatever
    process still holds its stdout."""
    theirs, ours = _worker_pipes()
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


@dataclass
class ForkedWorker:
    """A run worker forked by a fork server: the agent's ends of its pipes."""

    pid: int
    server: ForkServer
    records: asyncio.StreamReader
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    returncode: int | None = None
    exited: bool = False

    async def wait(self) -> int | None:
        """The return code; None if the fork server died before it could tell."""
        if not self.exited:
            self.returncode = await self.server.wait(self.pid)
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
class SpawnedWorker:
    """A run worker started as a fresh interpreter (the `subprocess` launcher)."""

    process: asyncio.subprocess.Process
    records: asyncio.StreamReader
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader

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


WorkerProcess = ForkedWorker | SpawnedWorker


class RunLauncher(Protocol):
    """How the agent starts a run worker (selected by `run_launcher` in agent.toml).

    `start` must give the worker `env` on top of the agent's environment: that is how a
    worker joins its process-tracking scope (`tracking`)."""

    tracking: Tracking

    async def warm_up(self) -> None: ...
    async def start(
        self,
        loc: CodeLocationConfig,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
    ) -> WorkerProcess: ...
    def spec(self, loc: CodeLocationConfig, launch: LaunchRun, scratch: str) -> WorkerSpec: ...
    async def close(self) -> None: ...


class _LauncherBase:
    def __init__(
        self,
        locations: list[CodeLocationConfig],
        outputs: OutputStoreConfig | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        self.locations = locations
        self.outputs = outputs or OutputStoreConfig()
        self.tracking: Tracking = tracking or SweepTracking()

    def spec(self, loc: CodeLocationConfig, launch: LaunchRun, scratch: str) -> WorkerSpec:
        """What a run worker needs: its launch, its code location, its output store."""
        filesystem = self.outputs.kind == "filesystem"
        return WorkerSpec(
            launch=launch,
            location=location_spec(loc),
            output_store=self.outputs.kind,
            output_path=self.outputs.path if filesystem else scratch,
            max_output_bytes=self.outputs.max_output_bytes,
        )


class SubprocessLauncher(_LauncherBase):
    """A fresh interpreter per run: slower (~80 ms of start-up), nothing shared at all."""

    async def warm_up(self) -> None:
        return None

    async def start(
        self,
        loc: CodeLocationConfig,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
    ) -> SpawnedWorker:
        process, pipes = await _spawn(loc, mode, spec, env or {})
        return SpawnedWorker(process, pipes.records, pipes.stdout, pipes.stderr)

    async def close(self) -> None:
        return None


class ForkServerLauncher(_LauncherBase):
    """Starts run workers through one fork server per worker executable (the default)."""

    def __init__(
        self,
        locations: list[CodeLocationConfig],
        outputs: OutputStoreConfig | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        super().__init__(locations, outputs, tracking)
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
        loc: CodeLocationConfig,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
    ) -> ForkedWorker:
        child_fds, ours = _worker_pipes()
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
        pipes = await _connect(ours, spec)
        return ForkedWorker(pid, server, pipes.records, pipes.stdout, pipes.stderr)

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
) -> RunLauncher:
    return RUN_LAUNCHERS[kind](locations, outputs, tracking)


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


class LaunchedRun:
    """One launched run as the agent sees it: its worker process, what it reported, and
    how it ended (the worker's own code is agent/worker/)."""

    def __init__(self, launch: LaunchRun, on_record: Callable[[RunRecord], None]) -> None:
        self.launch = launch
        self.on_record = on_record
        self.state = "starting"
        self.process: WorkerProcess | None = None
        self.reported_result = False
        self.exit_code: int | None = None
        self.received_time = time.time()
        self.stop_order: StopRun | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._held_result: RunRecord | None = None

    def _record(self, record: RunRecord) -> None:
        if record.kind == "event" and record.type in TERMINAL_EVENTS:
            if self.reported_result:
                return
            self.reported_result = True
        self.on_record(record)

    def report(self, event_type: str, message: str, data: dict | None = None) -> None:
        self._record(
            RunRecord(
                seq=0,
                time=time.time(),
                kind="event",
                type=event_type,
                message=message,
                data=data or {},
            )
        )

    async def _pump_records(self, reader: asyncio.StreamReader) -> None:
        while (body := await _read_frame(reader)) is not None:
            record = _screened(decode(body, RunRecord))
            if record.kind == "event" and record.type == "RUN_START":
                self.state = "running"
                data = {**record.data, "launch_received_time": self.received_time}
                record = replace(record, data=data)
            if record.kind == "event" and record.type == "ENGINE_EVENT" and "killed" in record.data:
                # The worker's own sweep of its descendants (sweep tracking) found some.
                log.warning(
                    "run %s: %s",
                    self.launch.run_id,
                    record.message,
                    extra={"run_id": self.launch.run_id},
                )
            if record.kind == "event" and record.type in TERMINAL_EVENTS:
                # Held until stdout/stderr are drained too, so that a run that ended has
                # all its compute log stored (a log follower stops at the run's end).
                self._held_result = self._held_result or record
                continue
            self._record(record)

    async def _pump_output(self, stream: asyncio.StreamReader, name: str) -> None:
        """Forward the worker's output as it comes, split by step at the markers."""
        splitter = StepOutputSplitter()
        while True:
            chunk = await stream.read(65536)
            pieces = splitter.feed(chunk) if chunk else splitter.flush()
            for step, text in pieces:
                self._record(
                    RunRecord(
                        seq=0, time=time.time(), kind="log", type=name, step=step, message=text
                    )
                )
            if not chunk:
                return

    async def run(self, loc: CodeLocationConfig, launcher: RunLauncher, scratch: str) -> None:
        """Start the worker and follow it to its end; reports a crash as RUN_FAILURE."""
        spec = launcher.spec(loc, self.launch, scratch)
        if self.stop_order is not None:
            self.state = "exited"
            self._report_stopped("before its worker started")
            return
        try:
            scope, proc = await _start_tracked(
                launcher.tracking,
                f"run-{self.launch.lease}",
                run_marker(self.launch),
                lambda env: launcher.start(loc, spec, env=env),
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
        self.process = proc
        if self.stop_order is not None:
            self._terminate(self.stop_order.grace_seconds)
        killed = await self._follow(proc, scope)
        if killed:
            self._report_left_behind(killed, scope.tracking)
        if self._held_result is not None:
            self._record(self._held_result)
        self.state = "exited"
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        how = (
            "ended with an unknown exit status (its fork server exited)"
            if self.exit_code is None
            else _exit_description(self.exit_code)
        )
        if self.stop_order is not None:
            self._report_stopped(f"its worker (pid {proc.pid}) {how}")
        elif not self.reported_result:
            self.report(
                "RUN_FAILURE",
                f"run worker (pid {proc.pid}) {how} without reporting a result",
                {"exit_code": self.exit_code, "failure_kind": WORKER_CRASH},
            )

    async def _follow(self, proc: WorkerProcess, scope: ProcessScope) -> list[LeftProcess]:
        """Forward the worker's records and output until it has exited and what it left
        running is killed; returns what was killed."""
        pumps: asyncio.Future[Any] = asyncio.gather(
            self._pump_records(proc.records),
            self._pump_output(proc.stdout, "stdout"),
            self._pump_output(proc.stderr, "stderr"),
        )
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait([pumps, exited], return_when=asyncio.FIRST_COMPLETED)
        if exited.done() and exited.result() is not None:
            # The worker is gone: end what it left at once, which also closes the
            # stdout/stderr a daemon of it may hold, so its output ends now too.
            killed = await self._end_left_behind(proc, scope)
            await self._read_to_end(pumps, bounded=True)
            self.exit_code = exited.result()
            return killed
        # Also when the exit status is unknown (its fork server died): the pipes tell.
        await self._read_to_end(pumps, bounded=False)
        self.exit_code = await exited
        return await self._end_left_behind(proc, scope)

    async def _read_to_end(self, pumps: asyncio.Future[Any], bounded: bool) -> None:
        """Wait for the worker's pipes to end; if `bounded` (the worker has exited), for
        OUTPUT_GRACE_SECONDS at most: a process beyond the tracking may hold them."""
        if bounded:
            await asyncio.wait({pumps}, timeout=OUTPUT_GRACE_SECONDS)
            if not pumps.done():
                pumps.cancel()
                await asyncio.wait({pumps})
                with contextlib.suppress(BaseException):  # done: retrieve, do not re-raise
                    pumps.result()
                log.warning(
                    "run %s: a process the run started still holds its output; stopped reading it",
                    self.launch.run_id,
                )
                return
        try:
            await pumps
        except ProtocolError as exc:
            self.kill()
            self.report("RUN_FAILURE", f"run worker sent an invalid record: {exc}")

    async def _end_left_behind(self, proc: WorkerProcess, scope: ProcessScope) -> list[LeftProcess]:
        """Kill what the exited worker left running (its scope); what was killed."""
        if self.stop_order is not None:
            proc.kill_group()  # what the worker started and SIGTERM did not end
        return await scope.end(proc.pid)

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
        self.process.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(grace_seconds, self.kill)

    def kill(self) -> None:
        if self.process is not None:
            self.process.signal(signal.SIGKILL)


def _log_left_behind(killed: list[LeftProcess], tracking: str, who: str, what: str) -> None:
    if killed:
        log.warning("%s: %s", who, left_behind_event(killed, tracking, what)[0])


async def evaluate_in_worker(
    launcher: RunLauncher, loc: CodeLocationConfig, spec: EvaluateSpec
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
    drains = [asyncio.create_task(stream.read()) for stream in (proc.stdout, proc.stderr)]
    try:
        async with asyncio.timeout(request.timeout_seconds):
            body = await _read_frame(proc.records)
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
    loc: CodeLocationConfig, tracking: Tracking | None = None
) -> CodeLocationInfo:
    """Load a location in a throwaway worker, so broken user code cannot hurt the agent."""
    label, marker = _helper_marker()
    message = DescribeLocation(location=location_spec(loc))
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
