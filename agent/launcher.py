"""Starting run workers: one subprocess per run, crash-isolated from the agent.

The worker gets its WorkerSpec on stdin and writes RunRecords to a dedicated pipe (its
stdout/stderr stay free for user output, which becomes the run's worker log). If the
worker exits without reporting a result, the launcher reports the crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

from agent.capture import StepOutputSplitter
from agent.config import CodeLocationConfig
from protocol.codec import FRAME_HEADER_SIZE, ProtocolError, decode, frame, frame_length
from protocol.messages import (
    CodeLocationInfo,
    DescribeLocation,
    LaunchRun,
    LocationSpec,
    RunRecord,
    WorkerSpec,
)

RECORD_FD_ENV = "FLEETRUN_RECORD_FD"
TERMINAL_EVENTS = frozenset({"RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED"})
DESCRIBE_TIMEOUT_SECONDS = 120.0


def worker_command(executable: str, mode: str) -> list[str]:
    """How to start a worker: the location's Python, the agent binary, or this Python."""
    if executable:
        return [executable, "-m", "agent.worker", mode]
    if getattr(sys, "frozen", False):
        return [sys.executable, "_worker", mode]
    return [sys.executable, "-m", "agent.worker", mode]


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


async def _spawn(
    loc: CodeLocationConfig, mode: str, message: object
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *worker_command(loc.executable, mode),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(write_fd,),
            env={**os.environ, RECORD_FD_ENV: str(write_fd)},
            cwd=loc.working_directory,
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    assert proc.stdin is not None
    proc.stdin.write(frame(message))
    with contextlib.suppress(ConnectionError):
        await proc.stdin.drain()
    proc.stdin.close()
    return proc, reader


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        header = await reader.readexactly(FRAME_HEADER_SIZE)
    except asyncio.IncompleteReadError:
        return None
    return await reader.readexactly(frame_length(header))


class RunWorker:
    """One launched run: its worker process, what it reported, and how it ended."""

    def __init__(self, launch: LaunchRun, on_record: Callable[[RunRecord], None]) -> None:
        self.launch = launch
        self.on_record = on_record
        self.state = "starting"
        self.process: asyncio.subprocess.Process | None = None
        self.reported_result = False
        self.exit_code: int | None = None
        self.received_time = time.time()

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
            record = decode(body, RunRecord)
            if record.kind == "event" and record.type == "RUN_START":
                self.state = "running"
                record.data["launch_received_time"] = self.received_time
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

    async def run(self, loc: CodeLocationConfig) -> None:
        """Start the worker and follow it to its end; reports a crash as RUN_FAILURE."""
        spec = WorkerSpec(launch=self.launch, location=location_spec(loc))
        try:
            self.process, reader = await _spawn(loc, "run", spec)
        except OSError as exc:
            self.state = "exited"
            self.report("RUN_FAILURE", f"could not start the run worker: {exc}")
            return
        proc = self.process
        assert proc.stdout is not None and proc.stderr is not None
        try:
            await asyncio.gather(
                self._pump_records(reader),
                self._pump_output(proc.stdout, "stdout"),
                self._pump_output(proc.stderr, "stderr"),
            )
        except ProtocolError as exc:
            self.kill()
            self.report("RUN_FAILURE", f"run worker sent an invalid record: {exc}")
        self.exit_code = await proc.wait()
        self.state = "exited"
        if not self.reported_result:
            self.report(
                "RUN_FAILURE",
                f"run worker (pid {proc.pid}) {_exit_description(self.exit_code)} "
                "without reporting a result",
                {"exit_code": self.exit_code},
            )

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


async def describe_location(loc: CodeLocationConfig) -> CodeLocationInfo:
    """Load a location in a throwaway worker, so broken user code cannot hurt the agent."""
    try:
        proc, reader = await _spawn(loc, "describe", DescribeLocation(location=location_spec(loc)))
    except OSError as exc:
        return CodeLocationInfo(name=loc.name, error=f"cannot start a worker: {exc}")
    try:
        async with asyncio.timeout(DESCRIBE_TIMEOUT_SECONDS):
            body, (_, stderr) = await asyncio.gather(_read_frame(reader), proc.communicate())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return CodeLocationInfo(
            name=loc.name, error=f"loading timed out after {DESCRIBE_TIMEOUT_SECONDS:.0f} s"
        )
    if body is None:
        tail = stderr.decode(errors="replace")[-2000:]
        return CodeLocationInfo(
            name=loc.name,
            error=f"worker {_exit_description(proc.returncode or 0)} while loading: {tail}",
        )
    try:
        return decode(body, CodeLocationInfo)
    except ProtocolError as exc:
        return CodeLocationInfo(name=loc.name, error=f"bad reply from worker: {exc}")
