"""Jobs the benchmarks run (besides the examples)."""

import time

from agent.sdk import Definitions, job, op


@op
def sleep_a_minute(context):
    time.sleep(60)


@job
def sleepy():
    sleep_a_minute()


defs = Definitions(jobs=[sleepy])
