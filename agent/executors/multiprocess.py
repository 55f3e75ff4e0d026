"""The multiprocess executor: each step attempt in its own forked child, up to N at once.

The run worker stays single-threaded (so forking is safe) and multiplexes, with one
selector, every child's three pipes: stdout and stderr (that step's compute log,
streamed as it comes) and a result pipe carrying pickled events and the attempt's
outcome. A child that dies without an outcome (segfault, os._exit, OOM kill) fails its
attempt with the exit code, and the step is retried if its policy allows. Children stay
in the worker's process group, so stopping the run stops them and what they started.
Ready steps start in order of their op's `fleetrun/priority` tag (higher first), then
graph order.
"""

from __future__ import annotations

import codecs
import heapq
import os
import pickle
import selectors
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agent.executors import Execution
from agent.executors.in_process import skip, step_priority
from agent.executors.step import (
    Attempt,
    attempt_step,
    emit_failure,
    emit_start,
    emit_success,
    error_data,
    retry_wait,
)
from agent.sdk import Node

_LENGTH = struct.Struct(">I")


class _PipeSink:
    """The child's event sink: events travel to the parent, which records them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view) :]

    def event(self, event_type: str, message: str = "", step: str | None = None,
              data: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.send(("event", event_type, message, step, data or {}))


def _child(node: Node, inputs: list[Any], execution: Execution, retry_number: int,
           fds: tuple[int, int, int]) -> None:  # fmt: skip
    """In the forked child: run one attempt, send its outcome, exit."""
    code = 0
    try:
        out, err, result = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        sink = _PipeSink(result)
        attempt = attempt_step(node, inputs, execution.launch, sink, retry_number)
        if attempt.ok:
            try:
                payload = execution.encode(node.name, attempt.value)
            except Exception as exc:
                attempt = Attempt(False, error=error_data(exc))
            else:
                attempt.value = None
                sink.send(("done", attempt, payload))
        if not attempt.ok:
            sink.send(("done", attempt, b""))
    except BaseException:
        code = 128 + signal.SIGTERM
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


@dataclass
class _Running:
    node: Node
    retry_number: int
    pid: int
    open_fds: set[int]
    decoders: dict[int, Any]  # incremental UTF-8 decoders of stdout and stderr
    streams: dict[int, str]
    result_fd: int
    buffer: bytes = b""
    outcome: tuple[Attempt, bytes] | None = None


@dataclass(order=True)
class _Ready:
    priority: int
    order: int
    name: str = field(compare=False)
    retry_number: int = field(compare=False, default=0)


class _Scheduler:
    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.sink = execution.sink
        self.job = execution.job
        limit = execution.options.get("max_concurrent") or os.cpu_count() or 1
        self.max_concurrent = int(limit)
        self.order = {name: i for i, name in enumerate(self.job.nodes)}
        self.outputs: dict[str, Any] = execution.load_reused()
        self.done: set[str] = set(self.outputs)
        self.blocked: set[str] = set()
        self.failed: list[str] = []
        self.ready: list[_Ready] = []
        self.delayed: list[tuple[float, int, str, int]] = []  # (due, order, name, retry)
        self.running: dict[int, _Running] = {}
        self.selector = selectors.DefaultSelector()
        self.by_fd: dict[int, _Running] = {}
        self.queued: set[str] = set()

    def priority(self, name: str) -> int:
        return -step_priority(self.execution, name)  # heapq pops the smallest first

    def enqueue_ready_steps(self) -> None:
        for name, node in self.job.nodes.items():
            if name in self.done or name in self.blocked or name in self.queued:
                continue
            bad = [u for u in node.upstream if u in self.blocked]
            if bad:
                skip(self.execution, name, bad)
                self.blocked.add(name)
                continue
            if all(u in self.done for u in node.upstream):
                self.queued.add(name)
                heapq.heappush(self.ready, _Ready(self.priority(name), self.order[name], name))

    def start(self, name: str, retry_number: int) -> None:
        node = self.job.nodes[name]
        emit_start(self.sink, name, retry_number)
        pipes = [os.pipe() for _ in range(3)]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            self.selector.close()
            for fd in self.by_fd:
                os.close(fd)
            for read_end, _ in pipes:
                os.close(read_end)
            inputs = [self.outputs[u] for u in node.upstream]
            _child(
                node, inputs, self.execution, retry_number, (pipes[0][1], pipes[1][1], pipes[2][1])
            )
        for _, write_end in pipes:
            os.close(write_end)
        reads = [r for r, _ in pipes]
        decoder = codecs.getincrementaldecoder("utf-8")
        running = _Running(
            node, retry_number, pid, set(reads),
            decoders={fd: decoder(errors="replace") for fd in reads[:2]},
            streams={reads[0]: "stdout", reads[1]: "stderr"}, result_fd=reads[2],
        )  # fmt: skip
        self.running[pid] = running
        for fd in reads:
            self.by_fd[fd] = running
            self.selector.register(fd, selectors.EVENT_READ)

    def read(self, fd: int) -> None:
        running = self.by_fd[fd]
        chunk = os.read(fd, 65536)
        if fd in running.streams:
            text = running.decoders[fd].decode(chunk, final=not chunk)
            if text:
                self.sink.log(running.streams[fd], text, running.node.name)
        else:
            running.buffer += chunk
            self.parse_results(running)
        if not chunk:
            self.close(running, fd)
            if fd == running.result_fd:
                self.drain_output(running)
                self.finish(running)

    def close(self, running: _Running, fd: int) -> None:
        self.selector.unregister(fd)
        os.close(fd)
        del self.by_fd[fd]
        running.open_fds.discard(fd)

    def drain_output(self, running: _Running) -> None:
        """The attempt is over: take what its stdout/stderr hold, without waiting for EOF
        (a process the op left running may keep them open)."""
        for fd in list(running.open_fds):
            os.set_blocking(fd, False)
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    chunk = b""
                text = running.decoders[fd].decode(chunk, final=not chunk)
                if text:
                    self.sink.log(running.streams[fd], text, running.node.name)
                if not chunk:
                    break
            self.close(running, fd)

    def parse_results(self, running: _Running) -> None:
        while len(running.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(running.buffer)
            if len(running.buffer) < _LENGTH.size + size:
                return
            body = running.buffer[_LENGTH.size : _LENGTH.size + size]
            running.buffer = running.buffer[_LENGTH.size + size :]
            message = pickle.loads(body)
            if message[0] == "event":
                _, event_type, text, step, data = message
                self.sink.event(event_type, text, step, data)
            else:
                running.outcome = (message[1], message[2])

    def finish(self, running: _Running) -> None:
        """The result pipe closed: reap the child and act on how the attempt ended."""
        _, status = os.waitpid(running.pid, 0)
        del self.running[running.pid]
        code = os.waitstatus_to_exitcode(status)
        name = running.node.name
        if running.outcome is None:
            how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0
                   else f"exited with code {code}")  # fmt: skip
            attempt = Attempt(False, error={
                "error_type": "StepProcessDied",
                "message": f"step process (pid {running.pid}) {how} before finishing the step",
                "traceback": "", "exit_code": code})  # fmt: skip
            payload = b""
        else:
            attempt, payload = running.outcome
        if attempt.ok:
            try:
                self.execution.save_output(name, payload)
            except Exception as exc:
                attempt = Attempt(False, error=error_data(exc))
            else:
                self.outputs[name] = pickle.loads(payload)
                self.done.add(name)
                emit_success(self.sink, name, attempt)
                return
        wait = retry_wait(self.job.retry_policy_for(name), attempt, running.retry_number)
        emit_failure(self.sink, name, attempt, running.retry_number, wait)
        if wait is None:
            self.failed.append(name)
            self.blocked.add(name)
            return
        due = time.monotonic() + wait
        heapq.heappush(self.delayed, (due, self.order[name], name, running.retry_number + 1))

    def run(self) -> list[str]:
        try:
            while True:
                self.enqueue_ready_steps()
                now = time.monotonic()
                while self.delayed and self.delayed[0][0] <= now:
                    _, order, name, retry = heapq.heappop(self.delayed)
                    heapq.heappush(self.ready, _Ready(self.priority(name), order, name, retry))
                while self.ready and len(self.running) < self.max_concurrent:
                    item = heapq.heappop(self.ready)
                    self.start(item.name, item.retry_number)
                if not self.running and not self.ready and not self.delayed:
                    return self.failed
                timeout = None
                if self.delayed:
                    timeout = max(0.0, self.delayed[0][0] - time.monotonic())
                for key, _ in self.selector.select(timeout):
                    if key.fd in self.by_fd:
                        self.read(key.fd)
        finally:
            self.selector.close()


def execute_multiprocess(execution: Execution) -> list[str]:
    """Run the steps in child processes; returns the names of the steps that failed."""
    return _Scheduler(execution).run()
