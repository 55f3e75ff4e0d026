"""The multiprocess executor: each step attempt in its own forked child, up to N at once.

The run worker stays single-threaded (so forking is safe) and multiplexes, with one
selector, every child's three pipes: stdout and stderr (that step's compute log,
streamed as it comes) and a result pipe carrying pickled events and the attempt's
outcome. A child that dies without an outcome (segfault, os._exit, OOM kill) fails its
attempt with the exit code, and the step is retried if its policy allows. Children stay
in the worker's process group, so stopping the run stops them and what they started.
Ready steps start in order of their op's `fleetrun/priority` tag (higher first), then
graph order, within `max_concurrent` and the executor's `tag_concurrency_limits` (at
most `limit` steps at once whose op tags match `key`, and `value` if given). A step of
an op with a pool first asks for a slot (agent/worker/slots.py) and waits, without
holding the worker up, until the slot bell says it got one.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.sdk import Node, tag_concurrency_limits
from agent.worker.executors.execution import Execution
from agent.worker.executors.in_process import skip, step_priority
from agent.worker.executors.step import (
    StepAttempt,
    attempt_step,
    emit_failure,
    emit_start,
    emit_success,
    error_data,
    retry_wait,
)
from agent.worker.slots import slot_key
from protocol.messages import LaunchRun

_LENGTH = struct.Struct(">I")
RECHECK = 1.0  # while steps wait for pool slots, the grants are read at least this often
CHILD_STOP_GRACE_SECONDS = 5.0  # below the agent's terminate grace (10 s by default)


class _PipeSink:
    """The child's event sink: events travel to the parent, which records them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view) :]

    def event(
        self,
        event_type: str,
        message: str = "",
        step: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.send(("event", event_type, message, step, data or {}))


def _child(
    node: Node,
    inputs: list[Any],
    launch: LaunchRun,
    encode: Callable[[str, Any], bytes],
    retry_number: int,
    fds: tuple[int, int, int],
) -> None:
    """In the step's process (forked, or in a step container): run one attempt, send its
    outcome, exit (never returns)."""
    code = 0
    try:
        out, err, result = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        sink = _PipeSink(result)
        attempt = attempt_step(node, inputs, launch, sink, retry_number)
        payload = b""
        if attempt.ok:
            try:
                payload = encode(node.name, attempt.value)
            except Exception as exc:
                attempt = StepAttempt(False, error=error_data(exc))
        attempt.value = None  # it travels pickled in `payload`
        sink.send(("done", attempt, payload))
    except BaseException:  # RunInterrupted (SIGTERM), or the result pipe is gone
        code = 128 + signal.SIGTERM
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _died(pid: int, code: int) -> StepAttempt:
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    message = f"step process (pid {pid}) {how} before finishing the step"
    return StepAttempt(
        False,
        error={
            "error_type": "StepProcessDied",
            "message": message,
            "traceback": "",
            "exit_code": code,
        },
    )


@dataclass
class _Running:
    """One step attempt in a child process, and the fds the parent watches for it."""

    node: Node
    retry_number: int
    pid: int
    fds: dict[int, str]  # fd -> "stdout" | "stderr" | "result" | "exit" (a pidfd)
    decoders: dict[int, Any]  # incremental UTF-8 decoders of stdout and stderr
    buffer: bytes = b""
    outcome: tuple[StepAttempt, bytes] | None = None


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
        rules = execution.options.get("tag_concurrency_limits", [])
        self.tag_limits = tag_concurrency_limits("executor", rules)
        self.slots = execution.slots
        self.parked: dict[str, _Ready] = {}  # waiting for a pool slot, by slot key
        self.bell = self.slots.fd if self.slots is not None else None
        if self.bell is not None:
            self.selector.register(self.bell, selectors.EVENT_READ)

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

    def tags_allow(self, name: str) -> bool:
        """Whether starting `name` keeps every tag concurrency limit."""
        tags = self.job.nodes[name].tags
        for key, value, limit in self.tag_limits:
            if key not in tags or (value is not None and tags[key] != value):
                continue
            same = sum(
                1
                for running in self.running.values()
                if key in running.node.tags and (value is None or running.node.tags[key] == value)
            )
            if same >= limit:
                return False
        return True

    def start_ready(self) -> None:
        """Start ready steps while the limits allow; a step whose pool slot is not
        granted yet asks for it and is parked until it is."""
        held_back = []
        granted = self.slots.granted() if self.slots is not None and self.parked else set()
        while self.ready and len(self.running) < self.max_concurrent:
            item = heapq.heappop(self.ready)
            if not self.tags_allow(item.name):
                held_back.append(item)
                continue
            pool = self.job.pool_for(item.name)
            if self.slots is not None and pool is not None and self.slots.needed(pool):
                key = slot_key(item.name, item.retry_number)
                if key not in granted:
                    granted = self.slots.granted()
                if key not in granted:
                    self.slots.ask(item.name, pool, item.retry_number)
                    self.parked[key] = item
                    continue
            self.start(item.name, item.retry_number)
        for item in held_back:
            heapq.heappush(self.ready, item)

    def take_grants(self) -> None:
        """The slot bell rang: parked steps that got their slot are ready again."""
        assert self.slots is not None
        granted = self.slots.granted()
        for key in [key for key in self.parked if key in granted]:
            heapq.heappush(self.ready, self.parked.pop(key))

    def start(self, name: str, retry_number: int) -> None:
        node = self.job.nodes[name]
        emit_start(self.sink, name, retry_number)
        try:
            pid, reads = self._fork(node, retry_number)
        except OSError as exc:  # out of processes or fds: a failed attempt, maybe retried
            self.settle(name, retry_number, StepAttempt(False, error=error_data(exc)))
            return
        decoder = codecs.getincrementaldecoder("utf-8")
        fds = {reads[0]: "stdout", reads[1]: "stderr", reads[2]: "result"}
        running = _Running(
            node, retry_number, pid, fds, {fd: decoder(errors="replace") for fd in reads[:2]}
        )
        if hasattr(os, "pidfd_open"):
            fds[os.pidfd_open(pid)] = "exit"  # readable once the child has exited
        self.running[pid] = running
        for fd in fds:
            self.by_fd[fd] = running
            self.selector.register(fd, selectors.EVENT_READ)

    def _fork(self, node: Node, retry_number: int) -> tuple[int, list[int]]:
        pipes: list[tuple[int, int]] = []
        try:
            pipes = [os.pipe() for _ in range(3)]
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            # SIGTERM waits until each side is in code that handles it (the child must
            # never unwind into the scheduler).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                pid = os.fork()
                if pid == 0:
                    try:
                        self.selector.close()
                        for fd in [*self.by_fd, *(r for r, _ in pipes), self.sink.fd]:
                            os.close(fd)
                        if self.bell is not None:
                            os.close(self.bell)
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                        inputs = [self.outputs[u] for u in node.upstream]
                        writes = (pipes[0][1], pipes[1][1], pipes[2][1])
                        execution = self.execution
                        _child(
                            node, inputs, execution.launch, execution.encode, retry_number, writes
                        )
                    finally:
                        os._exit(128 + signal.SIGTERM)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        except OSError:
            for read_end, write_end in pipes:
                os.close(read_end)
                os.close(write_end)
            raise
        for _, write_end in pipes:
            os.close(write_end)
        return pid, [r for r, _ in pipes]

    def read(self, fd: int) -> None:
        running = self.by_fd[fd]
        kind = running.fds[fd]
        if kind == "exit":
            self.finish(running)
            return
        chunk = os.read(fd, 65536)
        self.consume(running, fd, chunk)
        if not chunk:
            self.close(running, fd)
            if kind == "result" and "exit" not in running.fds.values():
                self.finish(running)  # no pidfd on this system: the result pipe's end

    def consume(self, running: _Running, fd: int, chunk: bytes) -> None:
        if running.fds[fd] == "result":
            running.buffer += chunk
            self.parse_results(running)
            return
        text = running.decoders[fd].decode(chunk, final=not chunk)
        if text:
            self.sink.log(running.fds[fd], text, running.node.name)

    def close(self, running: _Running, fd: int) -> None:
        self.selector.unregister(fd)
        os.close(fd)
        del self.by_fd[fd]
        del running.fds[fd]

    def drain(self, running: _Running) -> None:
        """The child has exited: take what its pipes still hold, without waiting for EOF (a
        process the op left running may keep them open), and close them."""
        for fd, kind in list(running.fds.items()):
            if kind != "exit":
                os.set_blocking(fd, False)
                while True:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        chunk = b""
                    self.consume(running, fd, chunk)
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
        """The child exited: reap it and act on how the attempt ended."""
        self.drain(running)
        _, status = os.waitpid(running.pid, 0)
        del self.running[running.pid]
        self.conclude(running, lambda: _died(running.pid, os.waitstatus_to_exitcode(status)))

    def conclude(self, running: _Running, died: Callable[[], StepAttempt]) -> None:
        """Act on how an attempt ended: its outcome, or `died()` if it sent none."""
        name = running.node.name
        if running.outcome is None:
            attempt = died()
        else:
            attempt, payload = running.outcome
        if attempt.ok:
            try:
                value = pickle.loads(payload)
                self.execution.save_output(name, payload)
            except Exception as exc:
                attempt = StepAttempt(False, error=error_data(exc))
            else:
                self.outputs[name] = value
                self.done.add(name)
                attempt.value = value
                emit_success(self.sink, name, attempt)
                return
        self.settle(name, running.retry_number, attempt)

    def settle(self, name: str, retry_number: int, attempt: StepAttempt) -> None:
        """A failed attempt: retry after the policy's wait, or fail the step for good."""
        wait = retry_wait(self.job.retry_policy_for(name), attempt, retry_number)
        emit_failure(self.sink, name, attempt, retry_number, wait)
        if wait is None:
            self.failed.append(name)
            self.blocked.add(name)
            return
        due = time.monotonic() + wait
        heapq.heappush(self.delayed, (due, self.order[name], name, retry_number + 1))

    def run(self) -> list[str]:
        try:
            while True:
                self.enqueue_ready_steps()
                now = time.monotonic()
                while self.delayed and self.delayed[0][0] <= now:
                    _, order, name, retry = heapq.heappop(self.delayed)
                    heapq.heappush(self.ready, _Ready(self.priority(name), order, name, retry))
                self.start_ready()
                if not (self.running or self.ready or self.delayed or self.parked):
                    return self.failed
                timeout = None
                if self.delayed:
                    timeout = max(0.0, self.delayed[0][0] - time.monotonic())
                self.wait_for_news(timeout)
        finally:
            self.stop_children()

    def wait_for_news(self, timeout: float | None) -> None:
        """Until a step process writes, a slot grant arrives, or `timeout` (s, the next
        retry's due time) passes."""
        if self.parked:  # the bell is the fast path; the file is the truth
            timeout = min(timeout if timeout is not None else RECHECK, RECHECK)
        events = self.selector.select(timeout)
        rang = not events  # a recheck while steps wait
        for key, _ in events:
            if key.fd == self.bell:
                rang = True
            elif key.fd in self.by_fd:
                self.read(key.fd)
        if rang and self.slots is not None:
            self.take_grants()  # empties the bell too, parked steps or not

    def stop_children(self) -> None:
        """Leaving early (interrupted, or a bug): no step process may outlive the run.

        A stop signals the whole process group, so the children got the SIGTERM too and
        are running their ops' `finally` blocks: they get up to CHILD_STOP_GRACE_SECONDS
        to exit, then SIGKILL. (No second SIGTERM: that one would end them at once.)"""
        pending = {running.pid for running in self.running.values()}
        deadline = time.monotonic() + CHILD_STOP_GRACE_SECONDS
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        pending.discard(pid)
                except ChildProcessError:
                    pending.discard(pid)
            time.sleep(0.01)
        for running in list(self.running.values()):
            try:
                if running.pid in pending:
                    os.kill(running.pid, signal.SIGKILL)
                    os.waitpid(running.pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
            for fd in list(running.fds):
                self.close(running, fd)
        self.running.clear()
        self.selector.close()


def execute_multiprocess(execution: Execution) -> list[str]:
    """Run the steps in child processes; returns the names of the steps that failed."""
    return _Scheduler(execution).run()
