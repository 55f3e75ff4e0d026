"""Jobs the soak test (`bench/soak.py`) runs: a mix of short, chained, chatty, slow and flaky.

Every op execution first appends one line `run_id lease step time pid` to the file named
by the run config key `marker`, with a single O_APPEND write (atomic for lines this
short), before doing anything else. The harness reads that file at the end to count
executions per run, per attempt (lease) and per step, independently of what the control
plane recorded: a step executed twice under one lease, or after the control plane fenced
its lease, shows up there even if its records were refused.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from agent.sdk import Definitions, Failure, job, op


def _mark(context: Any) -> None:
    """Record this execution before the op does anything that could fail or be killed."""
    path = context.run_config.get("marker")
    if not path:
        return
    line = f"{context.run_id} {context.lease} {context.step} {time.time():.6f} {os.getpid()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@op
def quick_op(context):
    _mark(context)
    return 1


@job(tags={"soak/kind": "quick"})
def soak_quick():
    quick_op()


def _pause(context: Any) -> None:
    """Chain steps take a moment, so a fault can land between two steps of one attempt."""
    time.sleep(float(context.run_config.get("step_seconds", 0.0)))


@op
def chain_a(context):
    _mark(context)
    _pause(context)
    return [1, 2, 3]


@op
def chain_b(context, rows):
    _mark(context)
    _pause(context)
    return [r * 2 for r in rows]


@op
def chain_c(context, rows):
    _mark(context)
    _pause(context)
    context.log.info("chain total %d", sum(rows))
    return sum(rows)


@job(tags={"soak/kind": "chain"})
def soak_chain():
    chain_c(chain_b(chain_a()))


@op
def chatter(context):
    """Many compute-log lines (stdout and some stderr) and a few LOG events, over ~1 s."""
    _mark(context)
    lines = int(context.run_config.get("lines", 1000))
    for i in range(lines):
        print(f"soak line {i} of {lines} for run {context.run_id}: " + "x" * 24)
        if i % 50 == 0:
            print(f"soak stderr line {i}", file=sys.stderr)
        if i % 100 == 99:
            sys.stdout.flush()
            time.sleep(0.1)
        if i % 250 == 0:
            context.log.info("chatter progress %d/%d", i, lines)
    return lines


@job(tags={"soak/kind": "chatty"})
def soak_chatty():
    chatter()


@op
def nap(context):
    _mark(context)
    time.sleep(float(context.run_config.get("seconds", 3.0)))
    return "rested"


@job(tags={"soak/kind": "sleep"})
def soak_sleep():
    nap()


@op
def flaky_prepare(context):
    _mark(context)
    return {"rows": 3}


@op
def flaky_step(context, batch):
    """Fails while the run's retry number is below `fail_until_retry` (from run config).

    Deterministic, so the harness knows which retry chains should end in SUCCESS: with
    `max_retries = 2`, a value of 0-2 succeeds (on that retry), 3 exhausts the retries.
    """
    _mark(context)
    until = int(context.run_config.get("fail_until_retry", 0))
    retry = int(context.tags.get("fleetrun/retry_number", "0"))
    if retry < until:
        raise Failure(f"soak: planned failure on retry {retry} (succeeds from retry {until})")
    return batch["rows"]


@job(tags={"soak/kind": "flaky"})
def soak_flaky():
    flaky_step(flaky_prepare())


defs = Definitions(jobs=[soak_quick, soak_chain, soak_chatty, soak_sleep, soak_flaky])
