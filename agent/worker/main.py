"""The run worker: a process per run (crash-isolated from the agent).

`python -m agent.worker run`: reads a WorkerSpec frame on stdin, loads the code location,
runs the job's executor and writes RunRecords to the record fd the agent passed in
FLEETRUN_RECORD_FD. `... describe`: reads a DescribeLocation, replies a CodeLocationInfo.

Before anything else, a worker enters the process tracking the agent chose for it (see
agent/tracking.py): it joins its cgroup, or becomes a subreaper that kills whatever is
left below it when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, BinaryIO

from agent.processes import (
    CGROUP_ENV,
    SUBREAPER_ENV,
    become_subreaper,
    join_cgroup,
    kill_descendants,
    left_behind_event,
    own_cgroup_dir,
)
from agent.worker.lease import CHANNEL_ENV, watch_lease
from agent.worker.records import RecordSink
from protocol.codec import FRAME_HEADER_SIZE, decode_any, frame, frame_length
from protocol.events import CODE_UNREACHABLE
from protocol.messages import DescribeLocation, EvaluateSpec, WorkerSpec

RECORD_FD_ENV = "FLEETRUN_RECORD_FD"
# Set for a worker in a container (agent/docker.py), which is passed no descriptors: it
# opens its channel's files itself, and reads its spec from the channel's `spec` file.
OPEN_CHANNEL_ENV = "FLEETRUN_OPEN_CHANNEL"


def _read_frame(stream: BinaryIO) -> bytes:
    header = stream.read(FRAME_HEADER_SIZE)
    if len(header) != FRAME_HEADER_SIZE:
        raise SystemExit("run worker: no spec on stdin")
    body = stream.read(frame_length(header))
    return body


INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM


class RunInterrupted(BaseException):
    """The agent sent SIGTERM (cancel, max runtime, fenced attempt).

    A BaseException, so user code's `except Exception` does not swallow it, while its
    `finally` blocks and context managers still run as the stack unwinds.
    """


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise RunInterrupted()


def executor_options(job_default: dict[str, Any], override: object) -> dict[str, Any]:
    """The job's executor, or the run config's `execution` (a name or {"name", ...})."""
    if override is None:
        return dict(job_default)
    if isinstance(override, str):
        return {"name": override}
    if isinstance(override, dict) and isinstance(override.get("name"), str):
        limit = override.get("max_concurrent")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"run config execution.max_concurrent must be >= 1, got {limit!r}")
        if "tag_concurrency_limits" in override:
            from agent.sdk import tag_concurrency_limits

            tag_concurrency_limits("run config execution", override["tag_concurrency_limits"])
        return dict(override)
    raise ValueError(
        "run config key 'execution' must be an executor name or a dict with a 'name', "
        f"got {override!r}"
    )


def _cannot_load(sink: RecordSink, job: str, exc: Exception, message: str, **data: str) -> int:
    """The run fails before its first step: its job could not be loaded, and why."""
    sink.event(
        "RUN_FAILURE",
        f"could not load job {job!r}: {message}",
        data={"error_type": type(exc).__name__, "message": message, **data},
    )
    return 1


def _run(spec: WorkerSpec, sink: RecordSink, channel: str = "", began: float = 0.0) -> int:
    """Run the job; `began`: when this worker's code started, for RUN_START (where a
    launch's time goes, bench/hops.py)."""
    from agent.worker.code_location import LocationLoadError, load_definitions
    from agent.worker.executors import Execution, get_executor
    from agent.worker.outputs import FilesystemOutputStore, OutputStore, ScratchOutputStore
    from agent.worker.slots import SlotGate

    launch = spec.launch
    try:
        defs = load_definitions(spec.location)
    except LocationLoadError as exc:
        return _cannot_load(sink, launch.job, exc, str(exc), failure_kind=CODE_UNREACHABLE)
    try:
        job = defs.get_job(launch.job)
        options = executor_options(job.executor, launch.config.get("execution"))
        executor = get_executor(options["name"])
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return _cannot_load(sink, launch.job, exc, str(message))
    store: OutputStore = (
        FilesystemOutputStore(spec.output_path)
        if spec.output_store == "filesystem"
        else ScratchOutputStore(spec.output_path)
    )
    execution = Execution(
        job,
        launch,
        sink,
        options,
        store,
        spec.max_output_bytes,
        launch.reuse_outputs,
        spec=spec,
        slots=SlotGate(sink, channel, launch.claim_pool_slots),
        channel=channel,
    )
    if launch.step:  # a step task of a fleet run: that one step attempt only
        from agent.worker.executors.fleet import run_step_task

        return run_step_task(execution)
    sink.event(
        "RUN_START",
        f"run worker started (pid {os.getpid()} on {socket.gethostname()})",
        data={"pid": os.getpid(), "executor": options["name"], "worker_began_time": began},
    )
    try:
        failed = executor(execution)
    except RunInterrupted:
        print("run worker: interrupted by SIGTERM; stopping", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    except Exception as exc:
        sink.event(
            "RUN_FAILURE",
            f"executor failed: {type(exc).__name__}: {exc}",
            data={
                "error_type": type(exc).__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            },
        )
        return 1
    if failed:
        sink.event(
            "RUN_FAILURE",
            f"steps failed: {', '.join(failed)}",
            data={"failed_steps": failed},
        )
    else:
        sink.event("RUN_SUCCESS", f"all {len(job.nodes)} steps succeeded")
    return 0


def _born_in(cgroup: str) -> bool:
    """Whether this process is in `cgroup` already: joining costs an RCU grace period."""
    own = own_cgroup_dir()
    return own is not None and os.path.normpath(own) == os.path.normpath(cgroup)


def _enter_tracking() -> tuple[bool, str]:
    """Join this worker's cgroup, or become a subreaper: before any user code runs or
    forks, so that nothing it starts is missed. Whether it must sweep at its end, and
    its cgroup ("" if none)."""
    cgroup = os.environ.pop(CGROUP_ENV, "")
    if cgroup and not _born_in(cgroup):  # the fork server starts it inside where it can
        try:
            join_cgroup(cgroup)
        except OSError as exc:
            print(f"run worker: cannot join its cgroup {cgroup}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    if not os.environ.pop(SUBREAPER_ENV, ""):
        return False, cgroup
    become_subreaper()
    return True, cgroup


def _sweep(mode: str, fd: int) -> None:
    """Kill what user code left running below this worker (orphans included: it is their
    subreaper) and say so: in a run, on the record pipe (the agent records it before the
    run's result, which it holds back); else on stderr."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stop order now must not cut it short
    try:
        killed = kill_descendants()
    except OSError as exc:  # the agent's sweep (its process group, its marker) remains
        print(f"worker: cannot kill what it left running: {exc}", file=sys.stderr, flush=True)
        return
    if not killed:
        return
    message, data = left_behind_event(killed, "sweep", "the run" if mode == "run" else "it")
    if mode != "run":
        print(f"worker: {message}", file=sys.stderr, flush=True)
        return
    with contextlib.suppress(OSError):  # the agent is gone
        RecordSink(fd).event("ENGINE_EVENT", message, data=data)


def _open_bell(channel: str) -> int | None:
    """The channel's bell, rung after each record (read-write: a FIFO without reader
    must not block or fail the worker)."""
    if not channel:
        return None
    try:
        return os.open(os.path.join(channel, "bell"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def _open_channel() -> None:
    """Make the channel's files this worker's stdin (its spec), stdout, stderr and record
    fd, as the agent's launchers pass them to a worker on the host."""
    channel = os.environ.get(CHANNEL_ENV, "")
    flags = os.O_WRONLY | os.O_APPEND
    for name, target in (("spec", 0), ("stdout", 1), ("stderr", 2)):
        fd = os.open(os.path.join(channel, name), os.O_RDONLY if target == 0 else flags)
        os.dup2(fd, target)
        os.close(fd)
    os.environ[RECORD_FD_ENV] = str(os.open(os.path.join(channel, "records"), flags))


def main(argv: list[str]) -> int:
    began = time.time()
    mode = argv[0] if argv else ""
    if mode == "step":  # in a step container of the docker executor
        from agent.worker.executors.docker import STEP_DIR_ENV, run_step

        signal.signal(signal.SIGTERM, _interrupt)
        return run_step(os.environ[STEP_DIR_ENV])
    if os.environ.pop(OPEN_CHANNEL_ENV, ""):
        _open_channel()
    fd = int(os.environ[RECORD_FD_ENV])
    sweeping, cgroup = _enter_tracking()
    try:
        return _serve(mode, fd, cgroup, began)
    finally:
        if sweeping:
            _sweep(mode, fd)


def _serve(mode: str, fd: int, cgroup: str = "", began: float = 0.0) -> int:
    message = decode_any(_read_frame(sys.stdin.buffer))
    if mode == "describe" and isinstance(message, DescribeLocation):
        from agent.worker.code_location import describe

        info = describe(message.location)
        os.write(fd, frame(info))
        return 0
    if mode == "evaluate" and isinstance(message, EvaluateSpec):
        from agent.worker.evaluation import evaluate

        os.write(fd, frame(evaluate(message)))
        return 0
    if mode == "run" and isinstance(message, WorkerSpec):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.environ["FLEETRUN_RUN_ID"] = message.launch.run_id
        os.environ["FLEETRUN_LEASE"] = str(message.launch.lease)
        signal.signal(signal.SIGTERM, _interrupt)
        channel = os.environ.pop(CHANNEL_ENV, "")
        sink = RecordSink(fd, _open_bell(channel))
        if channel:
            watch_lease(channel, sink, cgroup or None)
        try:
            return _run(message, sink, channel, began)
        except RunInterrupted:
            return INTERRUPTED_EXIT_CODE
    print(f"run worker: mode {mode!r} does not take a {type(message).__name__}", file=sys.stderr)
    return 2
