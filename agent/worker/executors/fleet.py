"""The fleet executor: each step attempt runs on whichever agent the control plane picks.

The run worker stays the orchestrator of its run. It is the multiprocess executor's
scheduler (same ready order, `max_concurrent`, tag limits, pool slots, retries and
skips) with a step task where that one forks a child: for each ready step attempt it
writes a STEP_TASK_REQUESTED record (the attempt and where each input comes from),
which the control plane stores under the run's lease and places like a run (queue,
labels, resources, capacity; the op's tags choose). The agent that gets it runs
`run_step_task` in a worker of its own, under the step task's lease: inputs from the
output store, the op, its output back to the store. How the attempt ended comes back
through this run's agent (its long-poll carries step results), which writes them to the
worker's channel and rings its slot bell; the scheduler wakes, and settles the attempt
as the multiprocess executor settles a child's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import selectors
import socket
from typing import Any

from agent.worker.capture import capture_step_output
from agent.worker.executors.execution import Execution
from agent.worker.executors.multiprocess import RECHECK, _Running, _Scheduler
from agent.worker.executors.step import StepAttempt, attempt_step, emit_start, error_data
from agent.worker.slots import SLOT_BELL, STEP_RESULTS
from protocol.events import RUN_FAILURE, RUN_START, RUN_SUCCESS, STEP_TASK_REQUESTED

DEFAULT_MAX_CONCURRENT = 64  # steps of one run in flight across the fleet


class _FleetScheduler(_Scheduler):
    def __init__(self, execution: Execution) -> None:
        super().__init__(execution)
        limit = execution.options.get("max_concurrent") or DEFAULT_MAX_CONCURRENT
        self.max_concurrent = int(limit)
        self.keys = itertools.count(1)
        self.submitted: dict[tuple[str, int], int] = {}  # (step, attempt) -> running key
        self.settled: set[int] = set()  # task ids already acted on
        self.own_bell: int | None = None
        if self.bell is None and execution.channel:
            with contextlib.suppress(OSError):  # no bell: the results file is read on a timer
                flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
                self.own_bell = os.open(os.path.join(execution.channel, SLOT_BELL), flags)
                self.selector.register(self.own_bell, selectors.EVENT_READ)

    def start(self, name: str, retry_number: int) -> None:
        """Ask the control plane to run this attempt on the fleet."""
        node = self.job.nodes[name]
        emit_start(self.sink, name, retry_number)
        run_id = self.execution.launch.run_id
        reuse = self.execution.reuse  # a re-execution's inputs may be its parent's outputs
        inputs = {u: reuse.get(u, run_id) for u in node.upstream}
        self.sink.event(
            STEP_TASK_REQUESTED,
            f"step {name} (attempt {retry_number}) waits for an agent",
            name,
            {"attempt": retry_number, "inputs": inputs},
        )
        key = next(self.keys)
        self.running[key] = _Running(node, retry_number, key, {}, {})
        self.submitted[(name, retry_number)] = key

    def take_results(self) -> None:
        """Settle the attempts whose step task ended (the channel's `step_results`)."""
        if not self.execution.channel:
            return
        try:
            with open(os.path.join(self.execution.channel, STEP_RESULTS), "rb") as fh:
                results = json.loads(fh.read())
        except (OSError, ValueError):
            return
        for result in results if isinstance(results, list) else []:
            task_id, step, attempt = (
                result.get("task_id"),
                result.get("step"),
                result.get("attempt"),
            )
            key = self.submitted.get((step, attempt))
            if task_id in self.settled or key is None or key not in self.running:
                continue
            self.settled.add(task_id)
            running = self.running.pop(key)
            del self.submitted[(step, attempt)]
            self.conclude_task(running, result.get("outcome") or {}, str(result.get("agent")))

    def conclude_task(self, running: _Running, outcome: dict[str, Any], agent: str) -> None:
        name = running.node.name
        if outcome.get("ok"):
            self.outputs[name] = None  # the value stays in the output store
            self.done.add(name)
            duration = float(outcome.get("duration_seconds") or 0.0)
            self.sink.event(
                "STEP_SUCCESS",
                f"finished step {name} in {duration:.3f} s on agent {agent}",
                name,
                {"duration_seconds": duration, "agent": agent},
            )
            return
        error = {
            "error_type": str(outcome.get("error_type", "")),
            "message": str(outcome.get("message", "")),
            "traceback": str(outcome.get("traceback", "")),
            "agent": agent,
        }
        max_retries = outcome.get("max_retries")
        wait = outcome.get("wait_seconds")
        attempt = StepAttempt(
            False,
            error=error,
            max_retries=max_retries if isinstance(max_retries, int) else None,
            wait=float(wait) if isinstance(wait, int | float) else None,
        )
        self.settle(name, running.retry_number, attempt)

    def wait_for_news(self, timeout: float | None) -> None:
        """Until a step result or slot grant is announced, at most RECHECK s: the bell
        is the fast path, the files are the truth."""
        self.selector.select(RECHECK if timeout is None else min(timeout, RECHECK))
        if self.own_bell is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.own_bell, 4096):
                    pass
        if self.slots is not None and (self.slots.fd is not None or self.parked):
            self.take_grants()  # empties the shared bell too
        self.take_results()

    def stop_children(self) -> None:
        """Step tasks run elsewhere: the control plane stops them when the run ends."""
        self.selector.close()
        if self.own_bell is not None:
            os.close(self.own_bell)


def execute_fleet(execution: Execution) -> list[str]:
    """Run each step attempt as a step task on the fleet; the names of failed steps."""
    return _FleetScheduler(execution).run()


def run_step_task(execution: Execution) -> int:
    """In a step task's worker: run one attempt of one step (`launch.step`), store its
    output, and end with RUN_SUCCESS or RUN_FAILURE carrying what the orchestrator's
    retry decision needs (the control plane turns them into the step task's end)."""
    launch, sink = execution.launch, execution.sink
    name = launch.step
    sink.event(
        RUN_START,
        f"step task worker started (pid {os.getpid()} on {socket.gethostname()})",
        data={"pid": os.getpid(), "executor": "fleet_step"},
    )
    node = execution.job.nodes.get(name)
    if node is None:
        attempt = StepAttempt(False, error=error_data(KeyError(f"no step {name!r} in the job")))
    else:
        try:
            inputs = [
                pickle.loads(execution.store.get(launch.reuse_outputs.get(u, launch.run_id), u))
                for u in node.upstream
            ]
        except Exception as exc:
            attempt = StepAttempt(False, error=error_data(exc))
        else:
            attempt = attempt_step(
                node, inputs, launch, sink, launch.step_attempt, capture_step_output
            )
    if attempt.ok:
        try:
            execution.save_output(name, execution.encode(name, attempt.value))
        except Exception as exc:
            attempt = StepAttempt(False, error=error_data(exc))
    if attempt.ok:
        kind = type(attempt.value).__name__
        sink.event("STEP_OUTPUT", f"output of type {kind}", name, {"type": kind})
        sink.event(
            RUN_SUCCESS,
            f"step {name} succeeded in {attempt.duration:.3f} s",
            data={"duration_seconds": attempt.duration},
        )
        return 0
    error = attempt.error or {}
    data: dict[str, Any] = {"step_error": error}
    if attempt.max_retries is not None:
        data["max_retries"] = attempt.max_retries
    if attempt.wait is not None:
        data["wait_seconds"] = attempt.wait
    sink.event(RUN_FAILURE, f"{error.get('error_type')}: {error.get('message')}", data=data)
    return 0
