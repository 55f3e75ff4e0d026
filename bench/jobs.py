"""Jobs the benchmarks run (besides the examples)."""

import time

from agent.sdk import Definitions, job, op


@op
def sleep_a_minute(context):
    time.sleep(60)


@job
def sleepy():
    sleep_a_minute()


@op
def add_one(context, value):
    return value + 1


@op
def zero(context):
    return 0


@job
def chain_100():
    value = zero()
    for _ in range(99):
        value = add_one(value)


@job
def chain_10():
    value = zero()
    for _ in range(9):
        value = add_one(value)


@job
def fan_out_100():
    """One root and 99 steps that each take its output: 100 steps, 99 of them ready at
    once."""
    value = zero()
    for i in range(99):
        add_one.alias(f"leaf_{i}")(value)


@op(pool="bench")
def pooled_step(context):
    return None


@job
def pooled_tick():
    """One step in pool `bench`: workload 11 times the handover of its slot."""
    pooled_step()


defs = Definitions(jobs=[sleepy, chain_100, chain_10, fan_out_100, pooled_tick])
